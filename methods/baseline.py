from bench.core.spec import Method


class Baseline(Method):
    """DDPM (Ho et al. 2020): t ~ Uniform{0..T-1}, unweighted MSE on the prediction target,
    AdamW with the configured betas. Fills no slot: the harness's defaults are the baseline."""

    name = "baseline"
    source = "DDPM, Ho et al. 2020"
