"""Intervals, p-values and the multiple-comparison adjustment of the suite's statistics (numpy and
scipy.stats only). bench/report/speedup.py's docstring defines the statistics; this is how their
uncertainty is stated.

Intervals (both statistics, and the final difference): the geometric mean of s_k (speed-ups are
ratios: 2x and 0.5x must average to 1x) with a Student t interval on log s_k, n - 1 degrees of
freedom, for 3 <= n < 20 paired seeds; "too few seeds" below 3 (point estimate only). From 20
seeds on a paired bootstrap (``n_boot`` resamples of seed indices, the pair moving together,
percentile interval) may replace it: below 20 the percentile bootstrap under-covers (simulated
coverage of a nominal 95% interval: 85.6% at n = 6, 88.6% at n = 8), the t interval does not
lean on more than log s_k being roughly normal. Each interval comes with the two-sided p-value of
its t test (log s = 0, or d = 0), which ``holm`` adjusts across the methods of a workload.

Multiple comparisons (``holm``, ``holm_levels``): m methods compared with one baseline are m
tests. Holm's step-down: sort the p-values, p_(1) <= ... <= p_(m); reject while p_(j) <=
alpha / (m - j + 1); adjusted p_(j) = max over i <= j of min(1, (m - i + 1) p_(i)). The adjusted
interval of the j-th smallest p-value is the t interval at level 1 - alpha / (m - j + 1), and from
the first hypothesis Holm does not reject on, every later one keeps that hypothesis's level: an
adjusted interval excludes the null exactly when Holm rejects it. Methods without a p-value (a
bound, too few seeds) count in m with p = 1.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

#: fewest paired seeds for which the percentile bootstrap may replace the t interval
BOOTSTRAP_MIN_SEEDS = 20


def t_interval(x: np.ndarray, confidence: float) -> tuple[float, float]:
    half = stats.t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size)
    return float(x.mean() - half), float(x.mean() + half)


def t_pvalue(x) -> float | None:
    """Two-sided p-value of the one-sample t test of mean(x) = 0; None below 3 values. A sample with
    no spread is 0 when its mean is not 0 and 1 when it is."""
    x = np.asarray(x, dtype=float)
    if x.size < 3:
        return None
    sd = x.std(ddof=1)
    if sd == 0:
        return 1.0 if x.mean() == 0 else 0.0
    tstat = x.mean() / (sd / np.sqrt(x.size))
    return float(2 * stats.t.sf(abs(tstat), x.size - 1))


def log_interval(log_s: np.ndarray, confidence: float, n_boot: int, seed: int):
    """(low, high, kind) of the interval on log s_k (module docstring, "Intervals")."""
    n = log_s.size
    if n < 3:
        return None, None, "too few seeds"
    if n < BOOTSTRAP_MIN_SEEDS or n_boot <= 0:
        return (*t_interval(log_s, confidence), "t")
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))  # pairs move together
    reps = log_s[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    return float(np.quantile(reps, alpha)), float(np.quantile(reps, 1.0 - alpha)), "bootstrap"


def holm(p_values: dict) -> dict:
    """Holm-adjusted p-values {name: p_adj}; a None p-value counts in m as 1 (module docstring)."""
    names = list(p_values)
    m = len(names)
    ps = np.array([1.0 if p_values[n] is None else float(p_values[n]) for n in names])
    order = np.argsort(ps, kind="stable")
    adjusted, running = {}, 0.0
    for j, i in enumerate(order):
        running = max(running, min(1.0, (m - j) * ps[i]))
        adjusted[names[i]] = float(running)
    return {n: (adjusted[n] if p_values[n] is not None else None) for n in names}


def holm_levels(p_values: dict, confidence: float = 0.95) -> dict:
    """The confidence level of each name's Holm-adjusted interval (module docstring): the j-th
    smallest p-value gets 1 - alpha / (m - j + 1) while Holm rejects; from the first hypothesis it
    does not reject on, that hypothesis's level. A None p-value counts in m as 1."""
    names = list(p_values)
    m, alpha = len(names), 1.0 - confidence
    ps = np.array([1.0 if p_values[n] is None else float(p_values[n]) for n in names])
    order = np.argsort(ps, kind="stable")
    levels, frozen = {}, None
    for j, i in enumerate(order):
        step_alpha = alpha / (m - j)
        if frozen is None and ps[i] > step_alpha:
            frozen = step_alpha
        levels[names[i]] = float(1.0 - (frozen if frozen is not None else step_alpha))
    return levels


def t_interval_at(x, confidence: float) -> tuple[float, float] | None:
    """The t interval of mean(x) at `confidence`; None below 3 values."""
    x = np.asarray(x, dtype=float)
    if x.size < 3:
        return None
    return t_interval(x, confidence)
