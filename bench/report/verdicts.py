"""The report's verdicts: per workload, which methods are faster, slower or not separated from the
baseline, and how strong each call is. Files only, no torch.

- Verdict (``classify``): the headline, the baseline-equivalent speed-up at the budget, Holm-adjusted
  across the methods of a workload: "faster" when its adjusted interval lies above 1, "slower" below,
  "not separated" otherwise. Where the speed-up is a bound (">=" past the baseline's curve, "<=" before
  its first evaluation) it has no test; the Holm-adjusted final difference decides instead, and the
  verdict says so.
- Minimum detectable effect (``mde``): the true effect a two-sided one-sample t test on the paired
  seeds finds with 80% power at Holm's strictest level alpha / m (what a method needs when it is the
  only one separated), from an observed paired spread: the method's own sd of log s_k when its
  speed-up is uncensored, else the placebo's (the verdict says which).
- Baseline-curve rule (``apply_rule``), fixed before the results by ``[report] baseline_curve``:
  "raw" reads the baseline's evaluations as measured; "monotone" replaces each baseline seed's curve by
  its isotonic (least-squares monotone) fit in step order, which is the same in log-iterations since
  the order is; speed-ups are read on it interpolated in log-iterations as always. The other rule is
  the sensitivity column.
- Fragile: a verdict that changes under the other rule, or when the value at the budget is one noise
  set's instead of the mean of ``[eval] noise_sets`` (rows keep each set's value in ``set_values``).
- Saturated: a ">=" speed-up, with the extension that would resolve it (``extension_needed``).
- Flags: a method whose share of clipped steps is more than twice the baseline's; REPA's teacher.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import optimize, stats

from bench.report.speedup import lower_is_better
from bench.report.stats import PLACEBO, same_n, seed_curves, speedup_rows
from bench.suite.schema import REPORT_DEFAULTS

FASTER, SLOWER, NULL, NO_TEST = "faster", "slower", "not separated", "no test"
POWER = 0.8
#: a share of clipped steps above this multiple of the baseline's is flagged
CLIP_RATIO_MAX = 2.0
#: the extension recommended for a saturated cell: the extrapolated need times this margin
EXTEND_MARGIN = 1.25
OTHER_RULE = {"raw": "monotone", "monotone": "raw"}


def settings(info: dict) -> dict:
    """The suite's [report] settings (suite.json) with the defaults of keys an older suite.json lacks."""
    return {**REPORT_DEFAULTS, **(info.get("report") or {})}


# ----------------------------------------------------------------------------------------------
# The baseline's curve under a rule, and the value of one noise set.


def apply_rule(evals: pd.DataFrame, baseline: str | None, rule: str) -> pd.DataFrame:
    """The evaluations with the baseline's curves under `rule` (module docstring); "raw" returns them as they are."""
    if rule == "raw" or baseline is None or evals.empty:
        return evals
    out = evals.copy()
    base = out[(out.method_label == baseline) & out.value.notna()]
    keys = ["metric", "seed"] + (["num_gen"] if "num_gen" in out else [])
    for _, g in base.groupby(keys, dropna=False):
        g = g.sort_values("step")
        lib = lower_is_better(str(g.metric.iloc[0]))
        fit = optimize.isotonic_regression(g.value.to_numpy(float), increasing=not lib).x
        out.loc[g.index, "value"] = fit
    return out


def noise_set_count(evals: pd.DataFrame, metric: str) -> int:
    """The number of noise sets the rows of `metric` recorded (0 when none kept their sets)."""
    if "set_values" not in evals:
        return 0
    sets = evals[(evals.metric == metric) & evals.set_values.notna()].set_values
    return int(min((len(str(s).split(",")) for s in sets), default=0))


def single_set(evals: pd.DataFrame, j: int) -> pd.DataFrame:
    """The evaluations with set j's value in place of the mean wherever a row kept its sets."""
    if "set_values" not in evals:
        return evals
    out = evals.copy()
    has = out.set_values.notna()
    out.loc[has, "value"] = [float(str(s).split(",")[j]) for s in out.loc[has, "set_values"]]
    return out


# ----------------------------------------------------------------------------------------------
# Verdicts and their power.


def classify(row: dict, lib: bool) -> tuple[str, str]:
    """(verdict, basis) of one row of speedup_rows (or compare_rows) from its Holm-adjusted intervals."""
    eh = row.get("equiv_holm") or {}
    if eh.get("ci") is not None:
        lo, hi = eh["ci"]
        return (FASTER if lo > 1 else SLOWER if hi < 1 else NULL), "speed-up"
    fh = row.get("final_diff_holm") or {}
    if fh.get("ci") is not None:
        lo, hi = fh["ci"] if lib else (-fh["ci"][1], -fh["ci"][0])  # made lower-is-better
        return (FASTER if hi < 0 else SLOWER if lo > 0 else NULL), "final difference"
    return NO_TEST, "too few seeds"


def mde(sd: float, n: int, alpha: float, power: float = POWER) -> float | None:
    """Smallest true mean a two-sided one-sample t test of n values with sd `sd` detects with `power`
    at level `alpha` (the noncentral t's exact power; module docstring); None below 3 values."""
    if n < 3 or not sd > 0:
        return None
    df, crit = n - 1, stats.t.ppf(1 - alpha / 2, n - 1)

    def short(nc: float) -> float:
        wrong_side = float(np.nan_to_num(stats.nct.cdf(-crit, df, nc)))  # scipy's NaN where it is ~0
        return float(stats.nct.sf(crit, df, nc)) + wrong_side - power

    hi = 2 * crit + 4  # widened until the power passes
    while short(hi) < 0:
        hi *= 2
    return float(optimize.brentq(short, 0.0, hi) * sd / math.sqrt(n))


def _uncensored_log_s(row: dict | None) -> np.ndarray | None:
    e = row["equiv"] if row else None
    if e is None or e.interval in ("censored", "none", "no data") or len(e.log_s) < 3:
        return None
    return np.asarray(e.log_s, float)


def mde_text(row: dict, placebo: dict | None, alpha: float, lib: bool) -> str:
    """The minimum detectable effect of a "not separated" row, saying whose spread it is from."""
    own = _uncensored_log_s(row)
    spread, whose = (own, "its own spread") if own is not None else (_uncensored_log_s(placebo), "the placebo's spread")
    if spread is not None:
        d = mde(float(spread.std(ddof=1)), spread.size, alpha)
        if d is not None:
            return f"detectable at 80% power after Holm: >= {math.exp(d):.2f}x or <= {math.exp(-d):.2f}x ({whose})"
    diff = np.asarray(row["final_diff"].per_seed, float)
    d = mde(float(diff.std(ddof=1)), diff.size, alpha) if diff.size >= 3 else None
    if d is not None:
        return f"detectable at 80% power after Holm: a final difference of ±{d:.3g} (its own spread)"
    return "no detectable effect computed (fewer than 3 paired seeds)"


# ----------------------------------------------------------------------------------------------
# Saturated cells: the extension that would resolve them.


def extension_needed(base_df: pd.DataFrame, e, budget: float, lib: bool) -> float | None:
    """Budgets x the baseline would need for its seeds that never reached the method's value: the seed-mean
    curve's least-squares slope over its last three evaluations in log-iterations (one seed's is too noisy),
    from each such seed's last value (curves flatten, so this is a low estimate); None when it no longer
    improves."""
    steps, values, seeds = seed_curves(base_df)
    sign = 1.0 if lib else -1.0
    ok = (steps <= e.extend * budget * (1 + 1e-9)) & np.isfinite(values).all(axis=0)
    if ok.sum() < 2:
        return None
    slope = np.polyfit(np.log(steps[ok][-3:]), sign * values[:, ok][:, -3:].mean(axis=0), 1)[0]
    if slope >= 0:
        return None
    last = float(np.log(steps[ok][-1]))
    need = [math.exp(last + (sign * v - sign * values[seeds.index(seed), ok][-1]) / slope) / budget
            for seed, v, bound in zip(e.seeds, e.method_values, e.bounds) if bound == ">="]
    return max(need) if need else None


def _seconds_per_iteration(runs: list[dict], baseline: str, info: dict) -> tuple[float | None, str]:
    """The baseline runs' measured training seconds per iteration, else the suite's [cost] throughput."""
    per = [r["status"]["train_seconds"] / r["status"]["step"] for r in runs if r["label"] == baseline
           and (r["status"].get("train_seconds") or 0) > 0 and (r["status"].get("step") or 0) > 0]
    if per:
        return float(np.mean(per)), "measured on the baseline's runs"
    cost, batch = info.get("cost") or {}, (info.get("budget") or {}).get("batch_size")
    if cost.get("train_images_per_s") and batch:
        return batch / float(cost["train_images_per_s"]), "[cost] train_images_per_s"
    return None, ""


def saturation_text(row: dict, base_df: pd.DataFrame, budget: float, lib: bool, runs: list[dict],
                    baseline: str, info: dict) -> str:
    """'extend to X x: about Y more baseline iterations per seed' for a ">=" cell, or why not."""
    e = row["equiv"]
    head = (f"{row['method_label']} (>= {e.speedup:.2f}x: {e.n_beyond} of {e.n_paired} seeds better than the "
            f"baseline's whole curve at baseline_extend = {e.extend:g})")
    need = extension_needed(base_df, e, budget, lib)
    if need is None:
        return head + ": the baseline's curve no longer improves there, so no extension can be estimated"
    x = max(e.extend + 0.5, math.ceil(2 * EXTEND_MARGIN * need) / 2)
    more = (x - e.extend) * budget
    seeds = len(set(base_df.seed))
    sec, basis = _seconds_per_iteration(runs, baseline, info)
    cost = f", about {more * seeds * sec / 60:.0f} min of training at {sec:.3g} s per iteration ({basis})" if sec else ""
    return (head + f": extend to {x:g}x (baseline_extend = {x:g}; the extrapolated need is {need:.2f}x, plus "
            f"{100 * (EXTEND_MARGIN - 1):g}%): about {more:,.0f} more baseline iterations per seed, "
            f"{more * seeds:,.0f} for its {seeds} seeds{cost}")


# ----------------------------------------------------------------------------------------------
# One workload's assessment.


@dataclass
class Assessment:
    """The verdicts of one workload on the headline metric, with their strength."""

    workload: str
    metric: str
    budget: float
    extend: float
    baseline: str
    rule: str
    n_sets: int
    family: int
    rows: list[dict]
    table: list[dict] = field(default_factory=list)
    lines: dict = field(default_factory=dict)  # verdict -> ["label (detail)", ...]
    compare: list[dict] = field(default_factory=list)


def _variant_verdicts(evals, baseline, labels, budget, metric, extend, kw, lib) -> dict[str, str]:
    rows = speedup_rows(evals, baseline, labels, budget, metric, extend=extend, **kw)
    return {r["method_label"]: classify(r, lib)[0] for r in rows if not r["is_baseline"] and not r["is_control"]}


def assess(w: str, evals: pd.DataFrame, rows: list[dict], baseline: str, labels: list[str], budget: float,
           metric: str, extend: float, kw: dict, info: dict, runs: list[dict]) -> Assessment:
    """Verdicts of the rows (computed under the suite's rule) with the other rule's, each single noise
    set's, the minimum detectable effects and the saturated cells' extensions."""
    rule = settings(info)["baseline_curve"]
    lib, alpha = lower_is_better(metric), 1 - kw["confidence"]
    family = [r for r in rows if not r["is_baseline"] and not r["is_control"]]
    a = Assessment(w, metric, budget, extend, baseline, rule, noise_set_count(evals, metric), len(family), rows)
    ruled = apply_rule(evals, baseline, rule)
    other = _variant_verdicts(apply_rule(evals, baseline, OTHER_RULE[rule]), baseline, labels, budget, metric,
                              extend, kw, lib)
    sets = [_variant_verdicts(apply_rule(single_set(evals, j), baseline, rule), baseline, labels, budget, metric,
                              extend, kw, lib) for j in range(a.n_sets)] if a.n_sets > 1 else []
    placebo = next((r for r in rows if r["is_control"] and r["method_label"].split("-")[0] == PLACEBO), None)
    base_df = same_n(ruled[(ruled.metric == metric) & (ruled.method_label == baseline)])
    for r in family:
        label = r["method_label"]
        verdict, basis = classify(r, lib)
        changes = ([f"{verdict} -> {other[label]} with baseline_curve = {OTHER_RULE[rule]}"]
                   if other.get(label, verdict) != verdict else [])
        changes += [f"{verdict} -> {s[label]} with noise set {j + 1} alone" for j, s in enumerate(sets)
                    if s.get(label, verdict) != verdict]
        detail = _detail(r, basis)
        if verdict == NULL:
            detail += "; " + mde_text(r, placebo, alpha / max(1, len(family)), lib)
        a.lines.setdefault(verdict, []).append(f"{label} ({detail})")
        if r["equiv"].lower_bound and not r["equiv"].upper_bound:
            a.lines.setdefault("saturated", []).append(saturation_text(r, base_df, budget, lib, runs, baseline, info))
        if changes:
            a.lines.setdefault("fragile", []).append(f"{label} ({'; '.join(changes)})")
        a.table.append({"workload": w, "metric": metric, "method": label, "verdict": verdict, "basis": basis,
                        "headline, Holm-adjusted": detail, f"with baseline_curve = {OTHER_RULE[rule]}": other.get(label, "-"),
                        "single noise sets": ", ".join(s.get(label, "-") for s in sets) or "-",
                        "fragile": "fragile" if changes else ""})
    if placebo is not None:
        a.lines["control"] = [_placebo_text(placebo, alpha / max(1, len(family)))]
    return a


def _detail(r: dict, basis: str) -> str:
    if basis == "speed-up":
        h = r["equiv_holm"]
        return f"{r['equiv'].speedup:.2f}x, Holm-adjusted [{h['ci'][0]:.2f}, {h['ci'][1]:.2f}] p={h['p_adj']:.2g}"
    if basis == "final difference":
        h, e = r["final_diff_holm"], r["equiv"]
        kind = "~" if e.lower_bound == e.upper_bound else ">=" if e.lower_bound else "<="
        shown = f"{kind} {e.speedup:.2f}x" if e.speedup is not None else "no speed-up"
        return (f"speed-up {shown} is a bound, so the final difference decides: {r['final_diff'].mean:.3g}, "
                f"Holm-adjusted [{h['ci'][0]:.3g}, {h['ci'][1]:.3g}] p={h['p_adj']:.2g}")
    return f"{r['n_paired']} paired seeds: no test"


def _placebo_text(r: dict, alpha: float) -> str:
    e = r["equiv"]
    log_s = _uncensored_log_s(r)
    if log_s is None or e.ci_low is None:
        return f"{r['method_label']}: its speed-up is {'a bound' if e.speedup is not None else 'missing'}, no interval"
    covers = e.ci_low <= 1 <= e.ci_high
    d = mde(float(log_s.std(ddof=1)), log_s.size, alpha)
    return (f"{r['method_label']} {e.speedup:.2f}x [{e.ci_low:.2f}, {e.ci_high:.2f}] "
            + ("covers 1, as noise alone should" if covers else "**does not cover 1**: read every verdict with care")
            + (f"; from its spread, the smallest speed-up detectable at 80% power after Holm (level {alpha:.3g}) "
               f"is {math.exp(d):.2f}x" if d is not None else ""))
