import math

import torch

from bench.core.densities import binned, normal_cdf
from bench.core.spec import Method, Param, weight_from_eps


def mode_inverse(y: torch.Tensor, s: float, iters: int = 80) -> torch.Tensor:
    """u with f(u) = y for SD3's mode density f(u) = 1 - u - s (cos^2(pi u / 2) - 1 + u), by bisection
    (f falls from 1 at u = 0 to 0 at u = 1 when f'(u) = -1 - s + s (pi / 2) sin(pi u) < 0: s < 1.75)."""
    lo, hi = torch.zeros_like(y), torch.ones_like(y)
    for _ in range(iters):
        mid = (lo + hi) / 2
        f = 1 - mid - s * (torch.cos(math.pi * mid / 2) ** 2 - 1 + mid)
        lo, hi = torch.where(f > y, mid, lo), torch.where(f > y, hi, mid)
    return (lo + hi) / 2


class LogitNormal(Method):
    """SD3's timestep densities (Esser et al. 2024; diffusers ``compute_density_for_timestep_sampling``),
    moved from rectified flow to the discrete VP schedule by matching log-SNR.

    logit_normal: t_rf = sigmoid(n), n ~ N(m, s^2); ln SNR = -2 logit(t_rf), so ln sigma = n, binned
    over the discrete t as for edm (linear schedule, m = 0, s = 1: median t = 259).
    mode: t_rf = 1 - u - s_mode (cos^2(pi u / 2) - 1 + u), u ~ U(0, 1), the same way.
    weighting = true adds the rectified-flow velocity objective's weight in eps units,
    w_eps = (1 + SNR^-1/2)^2, clamped at `max_weight` (the suite's choice), normalised to mean 1.

    Reconstruction: the log-SNR matching, the binning and the clamp are the suite's (SD3 trains a
    rectified flow in continuous time)."""

    name = "logit_normal"
    slots = frozenset({"timesteps", "weighting"})  # an instance without `weighting` fills timesteps only
    source = "Esser et al. 2024 (SD3); diffusers compute_density_for_timestep_sampling; VP mapping is the suite's"
    params = {
        "density": Param("logit_normal", "which of SD3's densities", choices=("logit_normal", "mode")),
        "m": Param(0.0, "logit-normal location"),
        "s": Param(1.0, "logit-normal scale", low=0.0, low_open=True),
        "mode_scale": Param(1.29, "s_mode of the mode density (below 1/(pi/2 - 1): monotone)", low=0.0, high=1.75,
                            high_open=True),
        "weighting": Param(False, "add the rectified-flow velocity weight (1 + SNR^-1/2)^2"),
        "max_weight": Param(1000.0, "clamp of that weight", low=1.0),
    }

    def __init__(self, **overrides):
        super().__init__(**overrides)
        if not self.hp["weighting"]:
            self.slots = frozenset({"timesteps"})

    def timestep_probs(self, p, schedule):
        if self.hp["density"] == "logit_normal":
            return binned(schedule, normal_cdf(self.hp["m"], self.hp["s"]))
        # P(ln sigma <= x) = P(t_rf <= sigmoid(x)) = 1 - f^-1(sigmoid(x)), f decreasing
        return binned(schedule, lambda x: 1 - mode_inverse(torch.sigmoid(x), self.hp["mode_scale"]))

    def loss_weights(self, t, p, schedule, target):
        snr = schedule.snr[t]
        w_eps = torch.clamp((1 + snr.rsqrt()) ** 2, max=self.hp["max_weight"])
        return weight_from_eps(w_eps, snr, target)
