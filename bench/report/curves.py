"""Curve geometry of logged evaluations: metric values against training steps, per seed (numpy
only, no torch). bench/report/speedup.py builds its statistics on these; the report reads fractions of
the budget and the baseline's convergence from them."""

from __future__ import annotations

import numpy as np


def as_curves(steps, values) -> tuple[np.ndarray, np.ndarray]:
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
    steps, values = as_curves(steps, values)
    keep = np.all(np.isfinite(values), axis=0)
    if budget is not None:
        keep &= steps <= budget
    return steps[keep], values[:, keep]


def is_geometric(steps: np.ndarray) -> bool:
    """A geometric grid: >= 3 positive points with a constant ratio (1e-6 relative) above 1.0001."""
    if steps.size < 3 or steps[0] <= 0:
        return False
    ratios = steps[1:] / steps[:-1]
    return bool(ratios[0] > 1.0001 and np.all(np.abs(ratios - ratios[0]) <= 1e-6 * ratios[0]))


def first_crossing(steps: np.ndarray, curve: np.ndarray, target: float, log_steps: bool = False) -> float | None:
    """First crossing of `target` by a lower-is-better curve, interpolated linearly in steps or,
    with `log_steps`, in log-steps; None when never reached."""
    reached = np.flatnonzero(curve <= target)
    if reached.size == 0:
        return None
    i = int(reached[0])
    if i == 0:
        return float(steps[0])  # no earlier point to interpolate from
    v0, v1 = curve[i - 1], curve[i]
    s0, s1 = steps[i - 1], steps[i]
    frac = (v0 - target) / (v0 - v1)  # v0 > target >= v1, so the denominator is positive
    if log_steps:
        return float(s0 * (s1 / s0) ** frac)
    return float(s0 + frac * (s1 - s0))


def crossing_step(steps, curve, target: float, lower_is_better: bool = True) -> float | None:
    """Iterations a curve needs to reach `target`: the first evaluation at or past the target,
    linearly interpolated with the evaluation before it; None when it is never reached."""
    steps = np.asarray(steps, dtype=float)
    curve = np.asarray(curve, dtype=float)
    if not lower_is_better:
        curve, target = -curve, -target
    return first_crossing(steps, curve, target)


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
    Points where a seed has no value are dropped for every seed. `status` says why a mean is NaN:
    "before first evaluation", "after last complete evaluation", "no data"."""
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


def values_at(steps: np.ndarray, values: np.ndarray, at: float) -> np.ndarray:
    """Every row of `values` [seeds, P] linearly interpolated at `at` (inside the grid)."""
    j = int(np.clip(np.searchsorted(steps, at), 1, steps.size - 1)) if steps.size > 1 else 0
    if steps.size == 1 or at == steps[j]:
        return values[:, j]
    w = (at - steps[j - 1]) / (steps[j] - steps[j - 1])
    return values[:, j - 1] + w * (values[:, j] - values[:, j - 1])


def relative_improvement(steps, values, budget: float, last: float = 0.2,
                         lower_is_better: bool = True) -> float | None:
    """Relative improvement of the seed-mean curve over the last `last` fraction of the budget:
    (mean at (1 - last) * budget - mean at the end) / |mean at (1 - last) * budget| for
    lower-is-better metrics (positive = still improving), where the end is the last complete
    evaluation within the budget (the budget itself on the suite's grids). None when the curve
    does not cover (1 - last) * budget."""
    steps, values = complete_points(steps, values, budget)
    if steps.size == 0:
        return None
    mean = values.mean(axis=0)
    start = value_at(steps, mean, (1.0 - last) * budget)
    if not np.isfinite(start) or start == 0:
        return None
    gain = (start - mean[-1]) if lower_is_better else (mean[-1] - start)
    return float(gain / abs(start))
