import torch

from bench.core.spec import Method, Param, weight_from_eps


class Debiased(Method):
    """Debiased weighting (Yu et al. 2024; yuhuUSTC/Debias ``gaussian_diffusion.py``): w_eps = 1 / sqrt(SNR),
    with no clamp, as the source computes it (``weight = 1/self.sqrt_snr``).

    Where SNR is largest (t = 0) the weight is smallest (0.01 on the linear schedule, where SNR(0) is about
    1e4), so no clamp is needed for it to stay finite. Its mean under uniform t on the linear schedule is
    17.8, so the weights are normalised to mean 1 under the method's sampling (METHODS.md).

    Options (off by default): `snr_clamp` > 0 caps SNR there, w_eps = 1 / sqrt(min(SNR, snr_clamp)): a
    third-party re-implementation's form (kohya-ss sd-scripts, 1000), not the source's. The suite's choice:
    where SNR = 0 (a zero-terminal-SNR schedule's last step, where the formula is infinite) SNR is floored at
    the schedule's smallest positive SNR."""

    name = "debiased"
    slots = frozenset({"weighting"})
    source = "Yu et al. 2024 (Debias), gaussian_diffusion.py; SNR = 0 floored (the suite's choice)"
    params = {"snr_clamp": Param(0.0, "SNR cap before 1/sqrt (0: none, the source's; 1000: kohya-ss sd-scripts')",
                                 low=0.0)}

    def loss_weights(self, t, p, schedule, target):
        table = schedule.snr
        floor = table[table > 0].min()
        snr = table[t]
        cap = self.hp["snr_clamp"] or None  # 0: no cap
        w_eps = 1.0 / torch.sqrt(torch.clamp(snr, min=floor, max=cap))
        return weight_from_eps(w_eps, snr, target)
