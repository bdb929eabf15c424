"""Discrete variance-preserving diffusion (DDPM): schedules, noising, targets.

Notation follows ../shared/METHODS.md: T steps, t in {0..T-1} with t = 0 the least noisy,
alpha_bar_t the cumulative product of (1 - beta), SNR(t) = alpha_bar_t / (1 - alpha_bar_t),
x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps.
Schedule tables are float64; they are cast to the data's dtype only when indexed.
"""

import math
from dataclasses import dataclass

import torch

from bench.errors import ConfigError

SCHEDULES = ("linear", "cosine")
TARGETS = ("eps", "x0", "v")


def linear_betas(T: int) -> torch.Tensor:
    """DDPM (Ho et al. 2020): beta from 1e-4 to 0.02, scaled so any T spans the same range."""
    scale = 1000.0 / T
    return torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64)


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021: alpha_bar(u) = cos^2((u + s) / (1 + s) * pi / 2), beta <= 0.999."""
    u = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    return torch.clamp(1 - f[1:] / f[:-1], max=max_beta)


def rescale_zero_terminal_snr(alphas_bar: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024: shift and scale sqrt(alpha_bar) so its last value is exactly 0.

    The first value is kept, so the least-noisy step is unchanged; SNR(T-1) becomes 0.
    """
    root = alphas_bar.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    return root**2


@dataclass
class Schedule:
    """Tables of one discrete VP schedule. Build it with :func:`make_schedule`."""

    name: str
    T: int
    zero_terminal_snr: bool
    betas: torch.Tensor
    alphas_bar: torch.Tensor

    @property
    def snr(self) -> torch.Tensor:
        return self.alphas_bar / (1 - self.alphas_bar)

    def _coef(self, table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[t] reshaped to broadcast against a batch shaped like `like`."""
        c = table.to(like.device)[t].to(like.dtype)
        return c.view(-1, *([1] * (like.ndim - 1)))

    def sqrt_ab(self, t, like):
        return self._coef(self.alphas_bar.sqrt(), t, like)

    def sqrt_1mab(self, t, like):
        return self._coef((1 - self.alphas_bar).sqrt(), t, like)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Draw x_t given x0 and the noise eps."""
        return self.sqrt_ab(t, x0) * x0 + self.sqrt_1mab(t, x0) * eps

    def target(self, kind: str, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The regression target of a model that predicts `kind` (eps, x0 or v)."""
        if kind == "eps":
            return eps
        if kind == "x0":
            return x0
        if kind == "v":  # Salimans & Ho 2022
            return self.sqrt_ab(t, x0) * eps - self.sqrt_1mab(t, x0) * x0
        raise ConfigError(f"unknown prediction target {kind!r}; use one of {', '.join(TARGETS)}")

    def predict_x0_eps(self, kind: str, x_t: torch.Tensor, t: torch.Tensor, pred: torch.Tensor):
        """Convert a model output of any target kind to (x0_hat, eps_hat)."""
        a, s = self.sqrt_ab(t, x_t), self.sqrt_1mab(t, x_t)
        if kind == "eps":
            # At a zero-terminal-SNR step a = 0 and x0 is not identifiable from eps.
            return (x_t - s * pred) / a.clamp(min=1e-8), pred
        if kind == "x0":
            return pred, (x_t - a * pred) / s.clamp(min=1e-8)
        if kind == "v":
            return a * x_t - s * pred, s * x_t + a * pred
        raise ConfigError(f"unknown prediction target {kind!r}; use one of {', '.join(TARGETS)}")


def make_schedule(name: str = "linear", T: int = 1000, zero_terminal_snr: bool = False) -> Schedule:
    """Build a schedule by name: "linear" (DDPM) or "cosine" (improved DDPM)."""
    if name not in SCHEDULES:
        raise ConfigError(f"unknown noise schedule {name!r}; use one of {', '.join(SCHEDULES)}")
    if not isinstance(T, int) or T < 2:
        raise ConfigError(f"T must be an integer >= 2, got {T!r}")
    betas = linear_betas(T) if name == "linear" else cosine_betas(T)
    if float(betas.max()) >= 1:  # the linear schedule's beta_max is 0.02 x 1000 / T
        raise ConfigError(f"T={T} puts the {name} schedule's largest beta at {float(betas.max()):.3g} (>= 1: no noise "
                          "level is defined); use T >= 21 or the cosine schedule")
    alphas_bar = torch.cumprod(1 - betas, dim=0)
    if zero_terminal_snr:
        alphas_bar = rescale_zero_terminal_snr(alphas_bar)
        prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_bar[:-1]])
        betas = 1 - alphas_bar / prev
    return Schedule(name, T, zero_terminal_snr, betas, alphas_bar)
