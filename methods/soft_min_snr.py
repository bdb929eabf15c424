from bench.core.spec import Method, Param, weight_from_eps


class SoftMinSNR(Method):
    """Soft-min-SNR weighting (Crowson et al. 2024, HDiT; k-diffusion ``layers.py``):
    w_eps = 1 / (1 + sd^2 SNR), i.e. w_x0 = SNR / (1 + sd^2 SNR), a smooth min of SNR and 1 / sd^2.

    Weights are normalised to mean 1 under uniform t (the harness's default, METHODS.md); the formula
    and sigma_data are the source's."""

    name = "soft_min_snr"
    slots = frozenset({"weighting"})
    source = "Crowson et al. 2024 (HDiT), k-diffusion layers.py"
    params = {"sigma_data": Param(0.5, "data standard deviation sd", low=0.0, low_open=True)}

    def loss_weights(self, t, p, schedule, target):
        snr = schedule.snr[t]
        return weight_from_eps(1.0 / (1.0 + self.hp["sigma_data"] ** 2 * snr), snr, target)
