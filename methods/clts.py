import torch

from bench.core.spec import Method, Param, progress_ramp


class CLTS(Method):
    """Curriculum timestep schedule (Xu et al. 2024).

    pi_p(t) = (1 - lam(p)) U(t) + lam(p) G(t), with G(t) proportional to
    exp(-(t/T - mu)^2 / (2 sigma^2)) normalised over the T steps, and
    lam(p) = lam_max * min(1, p / ramp).

    Reconstruction (METHODS.md): the paper's body was not readable. Its ablation's best mean
    (about 0.3 T) is known; sigma, the ramp and lam_max are the suite's choices. The SpeeD
    repository's re-implementation (mu = 300, uncapped lam, a Gaussian collapsed by operator
    precedence) is deliberately not reproduced.
    """

    name = "clts"
    slots = frozenset({"timesteps"})
    budget_dependent = True  # lam(p) follows progress = step / iters: another budget, another schedule
    source = "Xu et al. 2024 (seed paper); sigma, ramp, lam_max are the suite's reconstruction"
    params = {
        "mu": Param(0.3, "Gaussian mean as a fraction of T", low=0.0, high=1.0),
        "sigma": Param(0.25, "Gaussian std as a fraction of T", low=0.0, low_open=True),
        "lam_max": Param(1.0, "final weight of the Gaussian", low=0.0, high=1.0),
        "ramp": Param(1.0, "progress at which lam reaches lam_max", low=0.0, high=1.0, low_open=True),
    }

    def timestep_probs(self, p, schedule):
        T = schedule.T
        u = torch.arange(T, dtype=torch.float64) / T
        g = torch.exp(-((u - self.hp["mu"]) ** 2) / (2 * self.hp["sigma"] ** 2))
        g = g / g.sum()
        lam = self.hp["lam_max"] * progress_ramp(p, self.hp["ramp"])
        return (1 - lam) / T + lam * g
