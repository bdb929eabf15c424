import torch

from bench.core.densities import derivative
from bench.core.spec import Method, Param, inverse_cdf, weight_from_eps


class SpeeD(Method):
    """SpeeD (Wang et al. 2024; NUS-HPC-AI-Lab/SpeeD ``speed/diffusion/speed/__init__.py``): asymmetric
    sampling, change-aware weighting and dual sampling.

    t_m: the first t where d sqrt(1 - alpha_bar_t) / dt (backward difference) falls below `threshold`
    (642 on the linear schedule). Asymmetric sampling: p_a(t) proportional to k for t < tau, 1 otherwise.
    Dual sampling: the first half of the global batch draws t_a from p_a (one uniform each, by inverse
    CDF); the second half takes t_b = |t_a - t_m| of the first half's draws, so t within a batch is not
    i.i.d. (its second half's uniforms are unused). timestep_probs is the batch's marginal,
    (p_a + the law of |t_a - t_m|) / 2. Change-aware weight on the eps-MSE: w = (1 - lam) + (2 lam - 1)
    gn(t) for t < tau, 1 otherwise, gn the min-max normalised d(1 - alpha_bar_t) / dt; normalised to
    mean 1 under the marginal.

    The suite's reading where the source is terse: gn is min-max normalised over all T steps, and
    derivatives are backward differences."""

    name = "speed"
    slots = frozenset({"timesteps", "weighting"})
    source = "Wang et al. 2024 (SpeeD), speed/diffusion/speed/__init__.py"
    params = {
        "k": Param(2.0, "sampling weight of t < tau relative to t >= tau", low=0.0, low_open=True),
        "lam": Param(0.6, "change-aware weighting strength", low=0.0, high=1.0),
        "tau": Param(700, "steps below tau are sampled k times as often and weighted", low=1),
        "threshold": Param(1e-4, "d sqrt(1 - alpha_bar) / dt below which the process has converged (t_m)",
                           low=0.0, low_open=True),
        "dual": Param(True, "dual sampling (half the batch at |t_a - t_m|)"),
    }

    def t_m(self, schedule) -> int:
        slope = derivative((1 - schedule.alphas_bar).sqrt())[1:]
        below = (slope < self.hp["threshold"]).nonzero()
        return int(below[0]) + 1 if len(below) else schedule.T - 1

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
        half = (len(u) + 1) // 2
        t_a = inverse_cdf(pa, u[:half])
        return torch.cat([t_a, (t_a[: len(u) - half] - self.t_m(schedule)).abs()])

    def loss_weights(self, t, p, schedule, target):
        change = derivative(1 - schedule.alphas_bar)
        gn = (change - change.min()) / (change.max() - change.min())
        lam = self.hp["lam"]
        w_eps = torch.where(t < self.hp["tau"], (1 - lam) + (2 * lam - 1) * gn[t], torch.ones_like(gn[t]))
        return weight_from_eps(w_eps, schedule.snr[t], target)
