"""Speed-up of a method over the baseline, as ../shared/METHODS.md defines it.

For a method M and the baseline B on the same workload and iteration budget:

- the seed-mean curve of a run group is the mean over seeds of the metric at each evaluation
  step (only steps where every seed has a finite value, and only steps within the budget);
- F* is the best value of B's seed-mean curve (the minimum, for FID-like metrics);
- the iterations a curve needs to reach F* are found by linear interpolation between the two
  evaluation points around the first crossing of the level F* (a curve whose first evaluation
  already reaches F* needs that first evaluation's step: there is no earlier point to
  interpolate from);
- speedup = iterations B needs / iterations M needs. A method that never reaches F* within
  the budget is "not reached" (``speedup`` is None), never a made-up number;
- the confidence interval is a percentile bootstrap over seeds: each replicate resamples B's
  seeds and M's seeds with replacement (independently; seeds are not paired across methods),
  recomputes F*, both crossings and the ratio. A replicate in which M does not reach F* counts
  as speed-up 0 (B's iterations over infinitely many), so the interval stays honest; the
  fraction of replicates that reached F* is reported beside it. The RNG is seeded, so the
  interval is reproducible.

This module only needs numpy: never torch (the report runs on machines without it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

#: metrics for which a smaller value is better; any other metric is taken as higher-is-better
LOWER_IS_BETTER = {"fid", "kid", "proxy_fd", "proxy_kid", "fd", "loss"}


def lower_is_better(metric: str) -> bool:
    return metric in LOWER_IS_BETTER or metric.endswith("_fd") or metric.endswith("_kid") or metric.endswith("fid")


def _as_curves(steps, values) -> tuple[np.ndarray, np.ndarray]:
    steps = np.asarray(steps, dtype=float)
    values = np.asarray(values, dtype=float)
    if values.ndim == 1:
        values = values[None, :]
    if steps.ndim != 1 or values.shape[1] != steps.shape[0]:
        raise ValueError(f"steps has shape {steps.shape} but values has shape {values.shape}; "
                         "values must be [seeds, len(steps)]")
    if np.any(np.diff(steps) <= 0):
        raise ValueError("evaluation steps must be strictly increasing")
    return steps, values


def complete_points(steps, values, budget: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Keep the evaluation points within the budget where every seed has a finite value."""
    steps, values = _as_curves(steps, values)
    keep = np.all(np.isfinite(values), axis=0)
    if budget is not None:
        keep &= steps <= budget
    return steps[keep], values[:, keep]


def crossing_step(steps, curve, target: float, lower_is_better: bool = True) -> float | None:
    """Iterations a curve needs to reach `target`: the first evaluation at or past the target,
    linearly interpolated with the evaluation before it; None when it is never reached."""
    steps = np.asarray(steps, dtype=float)
    curve = np.asarray(curve, dtype=float)
    if not lower_is_better:
        curve, target = -curve, -target
    reached = np.flatnonzero(curve <= target)
    if reached.size == 0:
        return None
    i = int(reached[0])
    if i == 0:
        return float(steps[0])
    v0, v1 = curve[i - 1], curve[i]
    s0, s1 = steps[i - 1], steps[i]
    frac = (v0 - target) / (v0 - v1)
    return float(s0 + frac * (s1 - s0))


def _crossings_batch(steps: np.ndarray, curves: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Vectorised crossing_step for lower-is-better curves [R, P] and targets [R]; NaN = never."""
    reached = curves <= targets[:, None]
    any_reached = reached.any(axis=1)
    first = reached.argmax(axis=1)
    out = np.full(curves.shape[0], np.nan)
    rows = np.flatnonzero(any_reached & (first == 0))
    out[rows] = steps[0]
    rows = np.flatnonzero(any_reached & (first > 0))
    if rows.size:
        i = first[rows]
        v0, v1 = curves[rows, i - 1], curves[rows, i]
        s0, s1 = steps[i - 1], steps[i]
        out[rows] = s0 + (v0 - targets[rows]) / (v0 - v1) * (s1 - s0)
    return out


@dataclass
class Speedup:
    """Speed-up of one method over the baseline on one workload and metric."""

    target: float | None            # F*: the baseline's best seed-mean value within the budget
    baseline_steps: float | None    # iterations the baseline needs to reach F*
    method_steps: float | None      # iterations the method needs (None: not reached)
    speedup: float | None           # baseline_steps / method_steps (None: not reached)
    ci_low: float | None            # percentile bootstrap interval over seeds
    ci_high: float | None
    reached_fraction: float | None  # share of bootstrap replicates in which the method reached F*
    n_boot: int
    confidence: float
    n_seeds_baseline: int
    n_seeds_method: int
    method_best: float | None       # the method's best seed-mean value within the budget
    method_final: float | None      # the method's seed-mean value at its last complete evaluation

    @property
    def reached(self) -> bool:
        return self.speedup is not None

    def as_dict(self) -> dict:
        return asdict(self) | {"reached": self.reached}


def compute_speedup(baseline_steps, baseline_values, method_steps, method_values, *, budget: float | None = None,
                    lower_is_better: bool = True, n_boot: int = 2000, confidence: float = 0.95,
                    seed: int = 0, is_baseline: bool = False) -> Speedup:
    """Speed-up of a method over the baseline.

    ``*_values`` are arrays [seeds, len(steps)] of the metric (NaN where a seed has no value);
    ``budget`` caps the evaluation points used (the suite's iteration budget). With
    ``is_baseline`` the method is the baseline itself: speed-up exactly 1, no interval.
    """
    bs, bv = complete_points(baseline_steps, baseline_values, budget)
    ms, mv = complete_points(method_steps, method_values, budget)
    sign = 1.0 if lower_is_better else -1.0
    empty = Speedup(None, None, None, None, None, None, None, n_boot, confidence,
                    bv.shape[0], mv.shape[0], None, None)
    if bs.size == 0:
        return empty
    b_mean = sign * bv.mean(axis=0)
    target = float(b_mean.min())
    b_need = crossing_step(bs, b_mean, target)
    out = empty
    out.target = sign * target
    out.baseline_steps = b_need
    if ms.size == 0:
        return out
    m_mean = sign * mv.mean(axis=0)
    out.method_best = float(sign * m_mean.min())
    out.method_final = float(sign * m_mean[-1])
    if is_baseline:
        out.method_steps, out.speedup = b_need, 1.0
        return out
    m_need = crossing_step(ms, m_mean, target)
    out.method_steps = m_need
    out.speedup = None if m_need is None else b_need / m_need
    if n_boot <= 0:
        return out
    rng = np.random.default_rng(seed)
    ib = rng.integers(0, bv.shape[0], size=(n_boot, bv.shape[0]))
    im = rng.integers(0, mv.shape[0], size=(n_boot, mv.shape[0]))
    b_rep = sign * bv[ib].mean(axis=1)      # [n_boot, P_b]
    m_rep = sign * mv[im].mean(axis=1)      # [n_boot, P_m]
    t_rep = b_rep.min(axis=1)
    b_need_rep = bs[b_rep.argmin(axis=1)]   # the first minimum is the first crossing of its own level
    m_need_rep = _crossings_batch(ms, m_rep, t_rep)
    ratio = np.where(np.isnan(m_need_rep), 0.0, b_need_rep / np.where(np.isnan(m_need_rep), 1.0, m_need_rep))
    alpha = (1.0 - confidence) / 2.0
    out.ci_low = float(np.quantile(ratio, alpha))
    out.ci_high = float(np.quantile(ratio, 1.0 - alpha))
    out.reached_fraction = float(np.mean(~np.isnan(m_need_rep)))
    return out


def value_at(steps, curve, at: float) -> float:
    """The curve's value at iteration `at` by linear interpolation; NaN outside the evaluated range."""
    steps = np.asarray(steps, dtype=float)
    curve = np.asarray(curve, dtype=float)
    if steps.size == 0 or at < steps[0] or at > steps[-1]:
        return float("nan")
    return float(np.interp(at, steps, curve))


def values_at_fractions(steps, values, budget: float, fractions=(0.25, 0.5, 0.75, 1.0)) -> list[dict]:
    """Metric at fixed fractions of the budget: per fraction, the seed mean and standard deviation
    (ddof 1; NaN with one seed) of each seed's curve linearly interpolated at fraction * budget.
    Points where a seed has no value are dropped for every seed (as in the speed-up). `status`
    says why a mean is NaN: "before first evaluation", "after last complete evaluation", "no data"."""
    steps, values = complete_points(steps, values, budget)
    rows = []
    for f in fractions:
        at = f * budget
        per_seed = np.array([value_at(steps, v, at) for v in values]) if values.size else np.array([])
        finite = per_seed[np.isfinite(per_seed)] if per_seed.size else per_seed
        ok = per_seed.size > 0 and finite.size == per_seed.size
        if ok:
            status = "ok"
        elif steps.size == 0:
            status = "no data"
        elif at < steps[0]:
            status = "before first evaluation"
        else:
            status = "after last complete evaluation"
        rows.append({
            "fraction": float(f),
            "step": float(at),
            "mean": float(per_seed.mean()) if ok else float("nan"),
            "std": float(per_seed.std(ddof=1)) if ok and per_seed.size > 1 else float("nan"),
            "n_seeds": int(per_seed.size) if ok else 0,
            "status": status,
        })
    return rows
