import torch

from bench.core.densities import binned, normal_cdf
from bench.core.spec import Method, Param, weight_from_eps


class EDM(Method):
    """EDM's training distribution and weight (Karras et al. 2022; NVlabs/edm ``training/loss.py``) on
    the discrete VP schedule.

    Timesteps: ln sigma ~ N(P_mean, P_std^2) with sigma_t = sqrt(1 / SNR(t)), binned over the discrete t
    between the midpoints of neighbouring ln sigma_t, the tails folded onto t = 0 and T - 1
    (bench/core/densities.py). Weight on the eps-MSE: w_eps = 1 + 1 / (sd^2 SNR), EDM's
    lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 in eps units, clamped at `max_weight`, then
    normalised to mean 1 under the method's sampling.

    Reconstruction: the binning and the clamp (the weight reaches ~1e5 at t = T - 1 on the linear
    schedule; 1000 is the suite's choice) are ours; EDM defines both on continuous sigma."""

    name = "edm"
    slots = frozenset({"timesteps", "weighting"})
    source = "Karras et al. 2022 (EDM), training/loss.py; discrete binning and weight clamp are the suite's"
    params = {
        "p_mean": Param(-1.2, "mean of ln sigma (EDM2: -0.4)"),
        "p_std": Param(1.2, "std of ln sigma (EDM2: 1.0)", low=0.0, low_open=True),
        "sigma_data": Param(0.5, "data standard deviation sd", low=0.0, low_open=True),
        "max_weight": Param(1000.0, "clamp of the eps-MSE weight", low=1.0),
    }

    def timestep_probs(self, p, schedule):
        return binned(schedule, normal_cdf(self.hp["p_mean"], self.hp["p_std"]))

    def loss_weights(self, t, p, schedule, target):
        snr = schedule.snr[t]
        with torch.no_grad():
            w_eps = torch.clamp(1.0 + 1.0 / (self.hp["sigma_data"] ** 2 * snr), max=self.hp["max_weight"])
        return weight_from_eps(w_eps, snr, target)
