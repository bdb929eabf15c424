import torch

from bench.core.densities import derivative
from bench.core.spec import Method, Param, inverse_cdf, weight_from_eps


def central(values: torch.Tensor) -> torch.Tensor:
    """The derivative of a per-step table as numpy's np.gradient takes it (the source's): central
    differences (values[t + 1] - values[t - 1]) / 2 inside, one-sided differences at both ends."""
    return torch.gradient(values)[0]


class SpeeD(Method):
    """SpeeD (Wang et al. 2024; NUS-HPC-AI-Lab/SpeeD ``speed/diffusion/speed/__init__.py``): asymmetric
    sampling, change-aware weighting and dual sampling, as the source computes them.

    t_m = argmax(d sqrt(1 - alpha_bar_t) / dt < `threshold`) + 1, the derivative by central differences
    (np.gradient, one-sided at the ends) and the source's + 1 kept (642 on the linear schedule).
    Asymmetric sampling: p_a(t) proportional to k for t < tau, 1 otherwise. Dual sampling: a batch of n
    draws n//2 + 1 primaries t_a from p_a (one uniform each, by inverse CDF) and keeps the first n of
    [t_a, |t_a - t_m|], so t within a batch is not i.i.d. (the uniforms past the primaries are unused).
    timestep_probs is a large batch's marginal, (p_a + the law of |t_a - t_m|) / 2 (a batch of n has
    n//2 + 1 primaries and n - n//2 - 1 duals: the two parts' shares differ from 1/2 by 1/n). Change-aware
    weight on the eps-MSE: w = (1 - lam) + (2 lam - 1) gn(t) for t < tau, 1 otherwise, gn the min-max
    normalised central-difference d(1 - alpha_bar_t) / dt over all T steps; normalised to mean 1 under
    the marginal.

    The suite's choices: the source draws per process (n its process's batch); here n is the global batch,
    so a run does not depend on its process count (on one process the two agree). Where the derivative
    never falls below the threshold (no schedule of the suite's) t_m is T - 1, where the source's argmax
    would give 1. Options (off by default): differences = "backward" takes t_m as the first t where
    sqrt(1 - alpha_bar_t) - sqrt(1 - alpha_bar_{t-1}) < threshold and gn from backward differences with
    (1 - alpha_bar)[-1] = 0; primaries = "half" draws ceil(n / 2) primaries and floor(n / 2) duals (the
    suite's former reading of both)."""

    name = "speed"
    slots = frozenset({"timesteps", "weighting"})
    source = "Wang et al. 2024 (SpeeD), speed/diffusion/speed/__init__.py"
    params = {
        "k": Param(2.0, "sampling weight of t < tau relative to t >= tau", low=0.0, low_open=True),
        "lam": Param(0.6, "change-aware weighting strength", low=0.0, high=1.0),
        "tau": Param(700, "steps below tau are sampled k times as often and weighted", low=1),
        "threshold": Param(1e-4, "d sqrt(1 - alpha_bar) / dt below which the process has converged (t_m)",
                           low=0.0, low_open=True),
        "dual": Param(True, "dual sampling (part of the batch at |t_a - t_m|)"),
        "differences": Param("central", "derivatives: central (np.gradient, the source's) or backward",
                             choices=("central", "backward")),
        "primaries": Param("source", "primaries of a batch of n: source (n//2 + 1) or half (ceil(n / 2))",
                           choices=("source", "half")),
    }

    def t_m(self, schedule) -> int:
        root = (1 - schedule.alphas_bar).sqrt()
        if self.hp["differences"] == "backward":
            slope = derivative(root)[1:]  # slope[i] = root[i + 1] - root[i]
            below = (slope < self.hp["threshold"]).nonzero()
            return int(below[0]) + 1 if len(below) else schedule.T - 1
        below = (central(root) < self.hp["threshold"]).nonzero()
        return int(below[0]) + 1 if len(below) else schedule.T - 1  # the source's argmax + 1

    def asymmetric(self, schedule) -> torch.Tensor:
        tau = min(self.hp["tau"], schedule.T)
        p = torch.ones(schedule.T, dtype=torch.float64)
        p[:tau] = self.hp["k"]
        return p / p.sum()

    def timestep_probs(self, p, schedule):
        pa = self.asymmetric(schedule)
        if not self.hp["dual"]:
            return pa
        tm, T = self.t_m(schedule), schedule.T
        folded = torch.zeros(T, dtype=torch.float64)  # the law of |t_a - t_m|
        folded.index_add_(0, (torch.arange(T) - tm).abs(), pa)
        return (pa + folded) / 2

    def sample_timesteps(self, u, p, schedule):
        pa = self.asymmetric(schedule)
        if not self.hp["dual"]:
            return inverse_cdf(pa, u)
        n = len(u)
        primaries = min(n, n // 2 + 1) if self.hp["primaries"] == "source" else (n + 1) // 2
        t_a = inverse_cdf(pa, u[:primaries])
        return torch.cat([t_a, (t_a - self.t_m(schedule)).abs()])[:n]

    def loss_weights(self, t, p, schedule, target):
        change = (derivative if self.hp["differences"] == "backward" else central)(1 - schedule.alphas_bar)
        gn = (change - change.min()) / (change.max() - change.min())
        lam = self.hp["lam"]
        w_eps = torch.where(t < self.hp["tau"], (1 - lam) + (2 * lam - 1) * gn[t], torch.ones_like(gn[t]))
        return weight_from_eps(w_eps, schedule.snr[t], target)
