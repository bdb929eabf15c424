"""Speed-up of a method over the baseline: the suite's authoritative definition.

../shared/METHODS.md ("Speed-up, the suite's definition") summarises this; where the two differ,
this docstring is the definition. Everything here is a pure function of the metric curves.

Inputs. ``b_values[k]`` and ``m_values[k]`` are the metric curves of the baseline B and of the
method M for the SAME training seed k (same initialisation, data order and noise), arrays
[n_seeds, len(steps)] with NaN where a seed has no value. B and M may use different evaluation
grids. Only evaluations at steps <= ``budget`` are used. Lower is better unless
``lower_is_better=False``; higher-is-better metrics are negated internally and every value is
reported back in the metric's own units.

Why paired: seed-to-seed spread is usually larger than the effect of a method, and most of it is
shared by B_k and M_k (the same seed). Comparing seed k with seed k cancels that shared part, which
an unpaired comparison (resampling B's and M's seeds independently) cannot do.

Two statistics, both per seed and then over seeds:

A. Headline: baseline-equivalent speed-up at the budget (``baseline_equivalent``), the paper's
   reading of "2x": M trained for N = ``budget`` iterations is as good as B trained for 2N. B is
   trained to E x N (``extend = E``, the suite's ``[budget] baseline_extend``), M to N.
   - v_k = M_k's value at N (its evaluation there; linear interpolation between evaluations if N
     falls between two). Values of B and M compared here must be at the same number of generated
     images (the Frechet distance's bias depends on N): the report only pairs rows of one metric,
     and a metric's rows share their num_gen.
   - n_k = the first step at which B_k reaches v_k, read on B_k's curve up to E x N (and from its
     first evaluation on), interpolated in log-iterations between the evaluation before the
     crossing and the first at or past it (curves are close to linear in log-iterations).
   - s_k = n_k / N.
   - Bounds. B_k never reaches v_k within its curve: s_k >= (B_k's last evaluation) / N, shown
     ">= E" when B_k was evaluated to E x N (``lower_bound``, ``n_beyond``). M_k ends no better
     than B_k's first evaluation: s_k <= (B_k's first evaluation step) / N (``upper_bound``,
     ``n_before``). A bound gets no interval (``interval = "censored"``); "~x" when both occur.
   - The baseline's own row is exactly 1 (its value at N is reached at N).
   - A seed whose M_k has no value at N (its curve stops before the budget) or whose B_k has no
     finite evaluation leaves the pairing (``n_dropped``).
B. Secondary: the early-training rate (``paired_speedup``): crossings of each seed's own
   baseline value at fractions f < 1 of the budget (points 1 to 6 below). With f = 1 it could
   only show the sign of each seed's final difference (point 5b), so the report reads the end of
   the budget from A and from the paired final difference (point 7) instead.

Intervals (both statistics, and the final difference): bench/report/intervals.py (t intervals below 20
paired seeds, the percentile bootstrap from 20, p-values, Holm's adjustment across methods).

Early-training rate (B):

1. Target at fraction f of the budget (0 < f <= 1). For each seed, target_k = B_k's value at
   f * budget (linear interpolation between B_k's evaluations, ``value_at``). The reported target
   is F*(f) = mean_k target_k, which equals the seed-mean curve's value at f * budget. Why
   per-seed targets: seed k of M is asked to reach what seed k of B reached at f * budget, so the
   baseline always reaches its own target, at or before f * budget, and a per-seed speed-up exists
   even at f = 1 (with a seed-mean target, the better half of B's seeds would reach it and the
   worse half would not). f = 1 is the paper's reading (B's final quality); f = 0.5 and 0.75 let a
   method that is up to 1/f times slower than B still reach the target.
2. Crossings. n_B,k = the first step at which B_k reaches target_k (<= f * budget); n_M,k = the
   first step at which M_k reaches target_k within the budget, None = not reached. A crossing is
   interpolated between the evaluation before it and the first evaluation at or past the target
   (a curve already at the target at its first evaluation needs that first step: there is no
   earlier point). Interpolation is linear in iterations, or linear in log-iterations when a run
   group's evaluation grid (within the budget) is geometric: >= 3 points, consecutive ratio
   constant within 1e-6 relative and > 1.0001. Why: on a geometric grid the curve is sampled as a
   function of log-iterations, and linear interpolation over a wide gap (e.g. 2000 -> 4000) would
   put every crossing late. Note: the target itself is always interpolated linearly (point 1),
   so on a geometric grid with f * budget between two evaluations n_B,k can be slightly below
   f * budget (log-interpolation lies below the chord); on the evaluations themselves it is exact.
3. Per seed: s_k = n_B,k / n_M,k.
4. Over seeds: the geometric mean of s_k over the paired seeds (speed-ups are ratios: 2x and 0.5x
   must average to 1x). Interval on log s_k at level ``confidence``:
   - n < 3 paired seeds: no interval ("too few seeds"); the point estimate is still given.
     With fewer than 3 seeds a spread estimate is too unstable to print an interval.
   - 3 <= n < 20: Student t interval, exp(mean(log s) +- t_{n-1} * sd / sqrt(n)) ("t").
   - n >= 20 and ``n_boot > 0``: paired bootstrap over seeds ("bootstrap"): resample seed indices
     with replacement (the pair (B_k, M_k) moves together), ``n_boot`` replicates from
     ``numpy.random.default_rng(seed)``, percentile interval of the replicates' geometric means.
     Deterministic given ``seed``.
5. Not reached. A seed whose M_k does not reach target_k is counted as needing its last
   evaluation within the budget (the budget itself whenever M_k is evaluated there, the normal
   case). M_k needs MORE than that, so s_k computed this way is an upper bound, and so is the
   geometric mean: ``upper_bound=True``, with ``n_reached`` beside it. (The last evaluation rather
   than the budget: a curve whose evaluations stop before the budget might still reach the target
   between its last evaluation and the budget, and then n_B,k / budget would not be an upper
   bound.) If no seed reaches, the number is still that upper bound, flagged; the display says
   "not reached (<= x)". The interval is NOT given then (interval "censored"): lowering a capped
   s_k can widen the spread, so neither end of an interval computed from the caps is a bound.
   Likewise a seed whose M_k is already at the target at its first evaluation may have got there
   earlier: its s_k is a lower bound (``n_first``, ``lower_bound=True``, shown ">= x", no
   interval). With bounds both ways the point is neither (both flags set; shown "~x"). A number
   is never returned without saying it is a bound.
5b. At f = 1 each baseline seed needs the whole budget to reach its own final value, so a seed
   that reaches the target has s_k >= 1 by construction and one that does not is capped at 1:
   the speed-ups at f = 1 are one-sided around 1 and no interval is given (interval
   "one-sided"); the paired final-metric difference (point 7) is the evidence at the budget's
   end. The same floor, at f, applies at any f < 1, where it only matters for methods slower
   than f.
6. Dropped seeds (``n_dropped``): a seed whose B_k or M_k has no finite evaluation within the
   budget, whose B_k does not cover f * budget (its target is undefined), or whose crossing is at
   a step <= 0 (ratio undefined) leaves the pairing. F*(f) is the mean over the paired seeds.
7. Final-metric difference (``paired_difference``): d_k = M_k - B_k at the last evaluation within
   the budget where every paired seed of both groups has a value (the later of the two groups'
   last complete evaluations is cut to the earlier, interpolating linearly if the grids differ,
   so both are compared at the same iteration). Raw values, method minus baseline, in the metric's
   units (not negated: for FID a negative d is an improvement). Mean with a t interval (n >= 3)
   or "too few seeds" (n < 3), plus the mean relative difference mean(d_k / B_k).
8. Controls. The placebo (methods/placebo.py: the baseline with its timestep and noise streams
   re-seeded) is a method like any other: its intervals show what noise alone gives. The A/A
   control: ``aa_split(n)`` splits B's seed order into a first and a second half (the middle
   seed is left out when n is odd). The second half plays the method and the first half the
   baseline, half1[i] paired with half2[i], with exactly the same statistics, e.g.
   ``paired_speedup(steps, b[h1], steps, b[h2], ...)``. It shows what noise alone gives. With 4
   seeds that is 2 pairs, so the A/A row says "too few seeds": that is the honest answer, not a
   defect (the A/A pairs are different seeds, so they are not noise-matched like B_k and M_k).
9. The baseline row: speed-up exactly 1, no interval (interval "none"; ``is_baseline=True``).

This module (with bench/report/curves.py and bench/report/intervals.py) needs numpy and scipy.stats only: never torch or pandas (the report runs without them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from bench.report.curves import (
    as_curves,
    complete_points,
    first_crossing,
    is_geometric,
    value_at,
    values_at,
)
from bench.report.intervals import log_interval, t_interval, t_pvalue

#: metrics for which a smaller value is better; any other metric is taken as higher-is-better
LOWER_IS_BETTER = {"fid", "kid", "proxy_fd", "proxy_kid", "fd", "loss"}


def lower_is_better(metric: str) -> bool:
    metric = metric.removesuffix("_final").removesuffix("_sampler2")  # end-of-budget evaluations
    return metric in LOWER_IS_BETTER or metric.endswith("_fd") or metric.endswith("_kid") or metric.endswith("fid")


# ----------------------------------------------------------------------------------------------
# Paired statistics.


@dataclass(kw_only=True)
class PairedSpeedup:
    """Paired speed-up of one method over the baseline at one fraction of the budget."""

    fraction: float            # f
    target: float | None       # F*(f), the seed-mean of the per-seed targets (metric units)
    seeds: list                # the seed ids that entered the pairing
    per_seed: list             # s_k per paired seed, None where not reached
    n_paired: int
    n_reached: int
    n_dropped: int
    speedup: float | None      # geometric mean (an upper bound when upper_bound)
    ci_low: float | None
    ci_high: float | None
    interval: str              # "t", "bootstrap", "too few seeds", "censored", "one-sided" (f = 1),
                               # "none" (baseline), "no data"
    upper_bound: bool
    confidence: float
    baseline_steps: list       # n_B,k per paired seed
    method_steps: list         # n_M,k per paired seed (None = not reached)
    lower_bound: bool = False  # some seed was at the target by its first evaluation (s_k >= shown)
    n_first: int = 0           # how many seeds were at the target by their first evaluation

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(kw_only=True)
class PairedDifference:
    """Paired difference of the final metric, method minus baseline, in the metric's units."""

    mean: float | None
    ci_low: float | None
    ci_high: float | None
    relative_mean: float | None  # mean of d_k / B_k
    n: int
    interval: str                # "t", "too few seeds", "no data"
    confidence: float
    per_seed: list               # d_k per paired seed
    step: float | None = None    # the iteration at which both are compared
    seeds: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _seed_ids(seeds, n: int) -> list:
    ids = list(range(n)) if seeds is None else list(seeds)
    if len(ids) != n:
        raise ValueError(f"{len(ids)} seed ids for {n} seeds")
    return ids


def _check_paired(steps_b, b_values, steps_m, m_values):
    bs, bv = as_curves(steps_b, b_values)
    ms, mv = as_curves(steps_m, m_values)
    if bv.shape[0] != mv.shape[0]:
        raise ValueError(f"paired seeds: baseline has {bv.shape[0]} seeds, method {mv.shape[0]}")
    return bs, bv, ms, mv


def _finite_in_budget(steps: np.ndarray, row: np.ndarray, budget: float):
    keep = np.isfinite(row) & (steps <= budget)
    return steps[keep], row[keep]


def _seed_crossings(bs, b_row, ms, m_row, budget, at, log_b, log_m):
    """(target_k, n_B,k, n_M,k or None, M_k's last step) for one seed of lower-is-better curves,
    or None when the seed leaves the pairing (point 6 of the module docstring)."""
    bs_k, bv_k = _finite_in_budget(bs, b_row, budget)
    ms_k, mv_k = _finite_in_budget(ms, m_row, budget)
    if bs_k.size == 0 or ms_k.size == 0:
        return None
    target = value_at(bs_k, bv_k, at)
    if not np.isfinite(target):
        return None
    n_b = first_crossing(bs_k, bv_k, target, log_b)
    n_m = first_crossing(ms_k, mv_k, target, log_m)
    if n_b is None or n_b <= 0 or (n_m is not None and n_m <= 0):
        return None
    first = n_m is not None and mv_k[0] <= target  # at the target by M_k's first evaluation: a lower bound
    return target, n_b, n_m, float(ms_k[-1]), first


def paired_speedup(steps_b, b_values, steps_m, m_values, *, budget: float, fraction: float = 1.0, seeds=None,
                   lower_is_better: bool = True, confidence: float = 0.95, n_boot: int = 2000, seed: int = 0,
                   is_baseline: bool = False) -> PairedSpeedup:
    """Paired speed-up of M over B at `fraction` of `budget` (see the module docstring).
    With `is_baseline` the row is the baseline itself (the method curves are ignored): 1, no interval."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    bs, bv, ms, mv = _check_paired(steps_b, b_values, steps_m, m_values)
    if is_baseline:
        ms, mv = bs, bv
    ids = _seed_ids(seeds, bv.shape[0])
    sign = 1.0 if lower_is_better else -1.0  # curves are made lower-is-better, targets reported back
    log_b, log_m = is_geometric(bs[bs <= budget]), is_geometric(ms[ms <= budget])
    rows = [_seed_crossings(bs, sign * bv[k], ms, sign * mv[k], budget, fraction * budget, log_b, log_m)
            for k in range(bv.shape[0])]
    kept = [k for k, r in enumerate(rows) if r is not None]
    out = PairedSpeedup(fraction=float(fraction), target=None, seeds=[ids[k] for k in kept], per_seed=[],
                        n_paired=len(kept), n_reached=0, n_dropped=len(rows) - len(kept), speedup=None,
                        ci_low=None, ci_high=None, interval="no data", upper_bound=False,
                        confidence=float(confidence), baseline_steps=[], method_steps=[])
    if not kept:
        return out
    target, n_b, n_m, m_last, first = (np.array([rows[k][j] if rows[k][j] is not None else np.nan for k in kept])
                                       for j in range(5))
    first = first.astype(bool)
    reached = np.isfinite(n_m)
    out.target = float(sign * target.mean())
    out.baseline_steps = n_b.tolist()
    out.method_steps = [float(x) if ok else None for x, ok in zip(n_m, reached)]
    out.n_reached = int(reached.sum())
    if is_baseline:
        out.per_seed, out.speedup, out.interval = [1.0] * len(kept), 1.0, "none"
        return out
    # not reached: M_k needs more than its last evaluation, so this s_k is an upper bound
    s = n_b / np.where(reached, n_m, m_last)
    out.per_seed = [float(x) if ok else None for x, ok in zip(s, reached)]
    out.upper_bound = bool(not reached.all())
    out.n_first = int(first.sum())
    out.lower_bound = out.n_first > 0
    log_s = np.log(s)
    out.speedup = float(np.exp(log_s.mean()))
    if out.upper_bound or out.lower_bound:
        out.interval = "censored"  # point 5: an interval of bounds bounds nothing
        return out
    if fraction >= 1.0:
        out.interval = "one-sided"  # point 5b
        return out
    lo, hi, out.interval = log_interval(log_s, confidence, n_boot, seed)
    if lo is not None:
        out.ci_low, out.ci_high = float(np.exp(lo)), float(np.exp(hi))
    return out


def paired_difference(steps_b, b_values, steps_m, m_values, *, budget: float, seeds=None,
                      confidence: float = 0.95) -> PairedDifference:
    """Paired difference of the final metric, M_k - B_k (point 7 of the module docstring)."""
    bs, bv, ms, mv = _check_paired(steps_b, b_values, steps_m, m_values)
    ids = _seed_ids(seeds, bv.shape[0])
    in_b = (bs <= budget)
    in_m = (ms <= budget)
    kept = [k for k in range(bv.shape[0])
            if np.isfinite(bv[k, in_b]).any() and np.isfinite(mv[k, in_m]).any()]
    out = PairedDifference(mean=None, ci_low=None, ci_high=None, relative_mean=None, n=0, interval="no data",
                           confidence=float(confidence), per_seed=[])
    bs, bv = complete_points(bs, bv[kept], budget)
    ms, mv = complete_points(ms, mv[kept], budget)
    if not kept or bs.size == 0 or ms.size == 0:
        return out
    at = min(bs[-1], ms[-1])  # compare both at the same iteration
    if at < bs[0] or at < ms[0]:
        return out
    b_at, m_at = values_at(bs, bv, at), values_at(ms, mv, at)
    d = m_at - b_at
    out.n, out.step, out.seeds = int(d.size), float(at), [ids[k] for k in kept]
    out.per_seed, out.mean = d.tolist(), float(d.mean())
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = float(np.mean(d / b_at))
    out.relative_mean = rel if np.isfinite(rel) else None
    out.interval = "t" if d.size >= 3 else "too few seeds"
    if d.size >= 3:
        out.ci_low, out.ci_high = t_interval(d, confidence)
    return out


def aa_split(n: int) -> tuple[list[int], list[int]]:
    """Two disjoint halves of the seed order for the A/A control; the middle seed of an odd n is left out."""
    half = n // 2
    return list(range(half)), list(range(n - half, n))


# ----------------------------------------------------------------------------------------------
# The headline: baseline-equivalent speed-up (statistic A of the module docstring).


@dataclass
class EquivalentSpeedup:
    """Baseline-equivalent speed-up of one method at the budget (statistic A)."""

    budget: float
    extend: float              # E: the baseline's curve was read up to E x budget
    seeds: list                # the seed ids that entered the pairing
    per_seed: list             # s_k (a bound where flagged in `bounds`)
    bounds: list               # per seed: "" (a value), ">=" (B_k never got there) or "<=" (M_k ended
                               # no better than B_k's first evaluation)
    method_values: list        # v_k, M_k's value at the budget (metric units)
    baseline_steps: list       # n_k, None where B_k never reached v_k
    n_paired: int
    n_dropped: int
    speedup: float | None      # geometric mean of s_k (a bound when upper_bound or lower_bound)
    ci_low: float | None
    ci_high: float | None
    interval: str              # "t", "bootstrap", "too few seeds", "censored", "none" (baseline), "no data"
    p_value: float | None      # two-sided t test of mean(log s_k) = 0 (None with bounds or < 3 seeds)
    confidence: float
    upper_bound: bool = False  # some M_k ended no better than B_k's first evaluation
    lower_bound: bool = False  # some B_k never reached M_k's value within its curve
    n_before: int = 0
    n_beyond: int = 0
    log_s: list = field(default_factory=list)  # log s_k, for adjusted intervals

    def as_dict(self) -> dict:
        return asdict(self)


def baseline_equivalent(steps_b, b_values, steps_m, m_values, *, budget: float, extend: float = 1.0,
                        seeds=None, lower_is_better: bool = True, confidence: float = 0.95, n_boot: int = 2000,
                        seed: int = 0, is_baseline: bool = False) -> EquivalentSpeedup:
    """Iterations B_k needs to reach M_k's value at `budget`, over `budget` (module docstring, A).
    B's curve is read up to ``extend x budget``; M's value is taken at `budget`."""
    bs, bv, ms, mv = _check_paired(steps_b, b_values, steps_m, m_values)
    ids = _seed_ids(seeds, bv.shape[0])
    sign = 1.0 if lower_is_better else -1.0
    if is_baseline:
        ms, mv = bs, bv
    horizon = extend * budget * (1 + 1e-9)
    out = EquivalentSpeedup(float(budget), float(extend), [], [], [], [], [], 0, 0, None, None, None, "no data",
                            None, float(confidence))
    per = []
    for k in range(bv.shape[0]):
        b_s, b_v = _finite_in_budget(bs, sign * bv[k], horizon)
        m_s, m_v = _finite_in_budget(ms, sign * mv[k], budget)
        if b_s.size == 0 or m_s.size == 0 or m_s[-1] < budget * (1 - 1e-9) or b_s[0] <= 0:
            out.n_dropped += 1
            continue
        v = value_at(m_s, m_v, budget)
        if is_baseline:
            per.append((ids[k], v, float(budget), 1.0, ""))
            continue
        n = first_crossing(b_s, b_v, v, log_steps=True)
        if n is None:  # B_k never got there: M_k is worth at least B_k's whole curve
            per.append((ids[k], v, None, float(b_s[-1]) / budget, ">="))
        elif b_v[0] <= v:  # no better than B_k's first evaluation: worth at most that step
            per.append((ids[k], v, float(b_s[0]), float(b_s[0]) / budget, "<="))
        else:
            per.append((ids[k], v, n, n / budget, ""))
    if not per:
        return out
    out.seeds = [p[0] for p in per]
    out.method_values = [float(sign * p[1]) for p in per]
    out.baseline_steps = [p[2] for p in per]
    out.per_seed = [p[3] for p in per]
    out.bounds = [p[4] for p in per]
    out.n_paired = len(per)
    log_s = np.log(np.array(out.per_seed))
    out.log_s = log_s.tolist()
    out.speedup = float(np.exp(log_s.mean()))
    if is_baseline:
        out.interval = "none"
        return out
    out.n_before = out.bounds.count("<=")
    out.n_beyond = out.bounds.count(">=")
    out.upper_bound, out.lower_bound = out.n_before > 0, out.n_beyond > 0
    if out.upper_bound or out.lower_bound:
        out.interval = "censored"  # an interval of bounds bounds nothing
        return out
    lo, hi, out.interval = log_interval(log_s, confidence, n_boot, seed)
    if lo is not None:
        out.ci_low, out.ci_high = float(np.exp(lo)), float(np.exp(hi))
        out.p_value = t_pvalue(log_s)
    return out
