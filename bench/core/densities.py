"""Distributions over the discrete timesteps that continuous-time methods define on the noise level.

EDM's log-normal sigma and SD3's logit-normal t are densities over ln sigma (sigma_t = sqrt(1 / SNR(t)),
increasing with t). On the discrete VP schedule a step t gets the mass between the midpoints of its
neighbours' ln sigma, the tails folded onto t = 0 and t = T - 1 (METHODS.md, "Further methods"), so
the probabilities sum to 1 exactly and the inverse-CDF draw of the harness applies unchanged."""

from __future__ import annotations

from typing import Callable

import torch


def log_sigma(schedule) -> torch.Tensor:
    """ln sigma_t = -ln(SNR(t)) / 2 for every t (float64; +inf where SNR = 0)."""
    return -0.5 * torch.log(schedule.snr)


def binned(schedule, cdf: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """P(t) = cdf(edge_t) - cdf(edge_{t-1}), edges the midpoints of neighbouring ln sigma_t, the first and
    last edges -inf and +inf. `cdf` maps ln sigma values (float64) to probabilities."""
    ls = log_sigma(schedule)
    mids = (ls[1:] + ls[:-1]) / 2  # +inf next to a zero-SNR step: its mass goes to the step before
    inf = torch.tensor([float("inf")], dtype=torch.float64)
    upper = cdf(torch.cat([mids, inf])).clamp(0, 1)
    upper[-1] = 1.0
    lower = torch.cat([torch.zeros(1, dtype=torch.float64), upper[:-1]])
    return (upper - lower).clamp_(min=0)


def normal_cdf(mean: float, std: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """The CDF of N(mean, std^2), for `binned`."""
    return lambda x: torch.special.ndtr((x - mean) / std)


def derivative(values: torch.Tensor) -> torch.Tensor:
    """The backward difference of a per-step table: values[t] - values[t - 1], with values[-1] = 0."""
    return torch.diff(values, prepend=torch.zeros(1, dtype=values.dtype))
