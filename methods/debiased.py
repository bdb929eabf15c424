import torch

from bench.core.spec import Method, Param, weight_from_eps


class Debiased(Method):
    """Debiased weighting (Yu et al. 2024; yuhuUSTC/Debias ``gaussian_diffusion.py``):
    w_eps = 1 / sqrt(min(SNR, snr_max)).

    Its mean under uniform t on the linear schedule is 17.8, so the weights are normalised to mean 1
    under the method's sampling (METHODS.md). The suite's choice: where SNR = 0 (a zero-terminal-SNR
    schedule's last step, where the formula is infinite) SNR is floored at the schedule's smallest
    positive SNR."""

    name = "debiased"
    slots = frozenset({"weighting"})
    source = "Yu et al. 2024 (Debias), gaussian_diffusion.py; SNR = 0 floored (the suite's choice)"
    params = {"snr_max": Param(1000.0, "SNR clamp", low=0.0, low_open=True)}

    def loss_weights(self, t, p, schedule, target):
        table = schedule.snr
        floor = table[table > 0].min()
        snr = table[t]
        w_eps = 1.0 / torch.sqrt(torch.clamp(snr, min=floor, max=self.hp["snr_max"]))
        return weight_from_eps(w_eps, snr, target)
