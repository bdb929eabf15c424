"""Censored headline cells: a baseline-equivalent speed-up that is a bound (bench/report/speedup.py, A),
with what censored it and what would resolve it.

">= E": some baseline seed never reached the method seed's value within its curve, which the suite
stopped at E x the budget (`[budget] baseline_extend = E`). What resolves it is a longer baseline: the
report estimates how long by extending each such baseline seed's curve from its last two evaluations,
linearly in log-iterations (the speed-up's own interpolation). Curves flatten as they go, so the
estimate is a lower bound on the iterations needed, and a baseline that stopped improving gives none.
"<=": some method seed ended no better than its baseline seed's first evaluation; an earlier first
evaluation (a smaller `[eval] every`) resolves it. Files only, no torch.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from bench.report.speedup import baseline_equivalent, lower_is_better
from bench.report.stats import pair_seeds, same_n, seed_curves


def needed_step(steps: np.ndarray, row: np.ndarray, value: float, lower: bool = True) -> float | None:
    """The step at which one baseline seed's curve, continued linearly in log-iterations from its last two
    finite evaluations, reaches `value`; None when it is not improving there (no estimate)."""
    keep = np.isfinite(row) & (steps > 0)
    s, v = steps[keep], (row[keep] if lower else -row[keep])
    target = value if lower else -value
    if s.size < 2:
        return None
    slope = (v[-1] - v[-2]) / (math.log(s[-1]) - math.log(s[-2]))  # per unit of log-iterations
    if not slope < 0:
        return None
    return float(s[-1] * math.exp((target - v[-1]) / slope)) if target < v[-1] else float(s[-1])


def censored_cells(evals: pd.DataFrame, metric: str, baseline: str, labels: list[str], budgets: dict,
                   extends: dict) -> list[dict]:
    """Every headline cell (workload x method label but the baseline) of `metric`, with its bound, if any,
    and for ">=" the baseline's last evaluation and the estimated step that would resolve it."""
    lower, cells = lower_is_better(metric), []
    for w in sorted(budgets):
        g = same_n(evals[(evals.workload == w) & (evals.metric == metric)].dropna(subset=["value"]))
        if g[g.method_label == baseline].empty:
            continue
        base = seed_curves(g[g.method_label == baseline])
        budget, extend = budgets[w], extends.get(w, 1.0)
        for label in labels:
            sub = g[g.method_label == label]
            if label == baseline or sub.empty:
                continue
            bs, bv, ms, mv, seeds = pair_seeds(base, seed_curves(sub))
            e = baseline_equivalent(bs, bv, ms, mv, budget=budget, extend=extend, seeds=seeds, lower_is_better=lower)
            if not e.n_paired:
                continue
            cell = {"workload": w, "method_label": label, "speedup": e.speedup, "n_paired": e.n_paired,
                    "n_beyond": e.n_beyond, "n_before": e.n_before, "extend": extend, "budget": budget,
                    "bound": ("~" if e.n_beyond and e.n_before else ">=" if e.n_beyond else "<=" if e.n_before else "")}
            horizon = extend * budget * (1 + 1e-9)
            rows = {s: k for k, s in enumerate(seeds)}
            need, last = [], []
            for sd, v, b in zip(e.seeds, e.method_values, e.bounds):
                if b != ">=":
                    continue
                row = np.where(bs <= horizon, bv[rows[sd]], np.nan)
                last.append(float(np.nanmax(np.where(np.isfinite(row), bs, np.nan))))
                need.append(needed_step(bs, row, v, lower))
            cell["last_step"] = max(last) if last else None
            cell["needed_step"] = None if not need or None in need else max(need)
            first = [float(bs[np.isfinite(bv[rows[sd]])][0]) for sd, b in zip(e.seeds, e.bounds) if b == "<="]
            cell["first_step"] = min(first) if first else None
            cells.append(cell)
    return cells


def censoring_lines(cells: list[dict]) -> list[str]:
    """"censored: K of N headline cells are bounds", then each bound with what would resolve it."""
    bounds = [c for c in cells if c["bound"]]
    lines = [f"censored: {len(bounds)} of {len(cells)} headline cells are bounds", ""]
    if not bounds:
        return lines + ["Every headline speed-up is a value with its interval: no baseline seed stopped short of a "
                        "method seed's value, and no method seed ended no better than its baseline's first "
                        "evaluation.", ""]
    lines += ["A bound has no interval and is not a measured speed-up; each is named with what would resolve it "
              "([protocol.md](../../docs/protocol.md#censored-cells) says how to extend a study):", ""]
    for c in bounds:
        head = f"- `{c['workload']}` / `{c['method_label']}` ({c['bound']} {c['speedup']:.3g}x):"
        parts = []
        if c["n_beyond"]:
            need = c["needed_step"]
            parts.append(
                f" {c['n_beyond']} of {c['n_paired']} seeds beat the baseline's whole curve, which "
                f"`baseline_extend = {c['extend']:g}` stopped at step {c['last_step']:,.0f}; "
                + (f"continued log-linearly from its last two evaluations it would reach them by step {need:,.0f} at "
                   f"the earliest: `baseline_extend` >= {math.ceil(10 * need / c['budget']) / 10:g} (+{need - c['last_step']:,.0f} "
                   f"baseline iterations per seed) would resolve it"
                   if need else "the baseline stopped improving there, so no extension can be estimated"))
        if c["n_before"]:
            parts.append(f" {c['n_before']} of {c['n_paired']} seeds ended no better than the baseline's first "
                         f"evaluation (step {c['first_step']:,.0f}): an earlier first evaluation (`[eval] every` "
                         f"< {c['first_step']:,.0f}) would resolve it")
        lines.append(head + ";".join(parts) + ".")
    return lines + [""]
