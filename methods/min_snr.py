import torch

from bench.core.spec import Method, Param, weight_from_x0


class MinSNR(Method):
    """Min-SNR-gamma weighting (Hang et al. 2023): w_x0 = min(SNR, gamma),
    w_eps = min(SNR, gamma) / SNR, w_v = min(SNR, gamma) / (SNR + 1).

    Where SNR == 0 (the last step of a zero-terminal-SNR schedule) the weight is 1 for every
    target, as METHODS.md fixes (w_eps would be 0/0 there). Written from the formula, not from
    the SpeeD repository's baseline, which computes gamma / (SNR + 1) by mistake.
    """

    name = "min_snr"
    slots = frozenset({"weighting"})
    weight_scale = "source"  # the seed paper's study used the source's scale; its committed results keep it
    source = "Hang et al. 2023 (Efficient Diffusion Training via Min-SNR Weighting); diffusers --snr_gamma"
    params = {"gamma": Param(5.0, "SNR clamp", low=0.0, low_open=True)}

    def loss_weights(self, t, p, schedule, target):
        snr = schedule.snr[t]
        w = weight_from_x0(torch.clamp(snr, max=self.hp["gamma"]), snr, target)
        return torch.where(snr == 0, torch.ones_like(w), w)
