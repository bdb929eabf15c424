"""The metric's own noise and the sampler's influence, from logged evaluations alone (no torch).

- ``metric_noise``: at the budget every run evaluates its final EMA weights under K noise sets
  (the evaluation spec's ``noise_sets``; rows keep each set's value in ``set_values``). The
  sampling sd of one value at the metric's N is the within-run sd over the sets, pooled over
  runs; the value the report uses is the mean over the K sets, so its sd is that / sqrt(K). The
  noise sets are shared by every method (set j of M_k and of B_k use the same noise), so the part
  of that noise that moves every model's value together cancels in a paired difference d_k =
  M_k - B_k: the noise that reaches the report's paired statistics is the within-seed sd of d over
  the sets, pooled over seeds, / sqrt(K). Per method it is compared with the paired between-seed
  sd (the sd over seeds of d_k, each the mean over the sets), the spread every interval of the
  report is built from: the metric is precise enough when it is at most a third of it; the report
  says when it is not.
- ``sampler_robustness``: the paired final differences under the suite's sampler and under its
  second sampler (``sampler2``, metric "<metric>_sampler2"), with a flag where the sign of the
  mean changes; a change between two differences whose intervals both contain 0 is noise, and
  is shown as such rather than flagged.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from bench.report.speedup import paired_difference
from bench.report.stats import format_difference, pair_seeds, seed_curves

#: the metric's sd may be at most this share of the paired between-seed sd
NOISE_RATIO_MAX = 1.0 / 3.0


def _set_table(evals: pd.DataFrame, metric: str, budget: float) -> pd.DataFrame:
    """(method_label, seed) -> array of per-set values at the budget, for rows that have them."""
    if "set_values" not in evals:
        return pd.DataFrame(columns=["method_label", "seed", "sets"])
    g = evals[(evals.metric == metric) & (evals.step == budget) & evals.set_values.notna()]
    rows = [{"method_label": r.method_label, "seed": r.seed,
             "sets": np.array([float(v) for v in str(r.set_values).split(",")])} for r in g.itertuples()]
    return pd.DataFrame(rows, columns=["method_label", "seed", "sets"])


def _pooled_sd(samples: list[np.ndarray]) -> float | None:
    """sqrt of the mean within-sample variance (ddof 1) over samples of >= 2 values."""
    var = [np.var(x, ddof=1) for x in samples if len(x) >= 2]
    return float(np.sqrt(np.mean(var))) if var else None


def metric_noise(evals: pd.DataFrame, metric: str, baseline: str | None, budget: float,
                 labels: list[str]) -> tuple[dict, pd.DataFrame]:
    """(summary, per-method table) of the metric's noise at the budget (module docstring); the
    summary is empty when no run evaluated more than one noise set."""
    sets = _set_table(evals, metric, budget)
    if sets.empty:
        return {}, pd.DataFrame()
    k = int(np.median([len(x) for x in sets.sets]))
    sd_one = _pooled_sd(list(sets.sets))
    summary = {"noise_sets": k, "sd_one": sd_one, "sd_used": sd_one / np.sqrt(k) if sd_one is not None else None,
               "runs": len(sets), "num_gen": _num_gen(evals, metric)}
    base = {r.seed: r.sets for r in sets[sets.method_label == baseline].itertuples()} if baseline else {}
    rows = []
    for label in labels:
        if label == baseline:
            continue
        mine = {r.seed: r.sets for r in sets[sets.method_label == label].itertuples()}
        diffs = [mine[s] - base[s] for s in mine if s in base and len(mine[s]) == len(base[s])]
        if len(diffs) < 2:
            continue
        paired_sd = float(np.std([d.mean() for d in diffs], ddof=1))
        sd_diff = _pooled_sd(diffs)
        noise = sd_diff / np.sqrt(k) if sd_diff is not None else None
        ratio = noise / paired_sd if noise is not None and paired_sd > 0 else None
        rows.append({"method": label, "seeds": len(diffs), "paired between-seed sd": paired_sd,
                     f"metric sd of a paired difference (mean of {k} sets)": noise,
                     "metric sd / paired sd": ratio,
                     "precise enough (<= 1/3)": None if ratio is None else ("yes" if ratio <= NOISE_RATIO_MAX else "no")})
    return summary, pd.DataFrame(rows)


def _num_gen(evals: pd.DataFrame, metric: str):
    g = evals[evals.metric == metric]
    return int(g.num_gen.dropna().iloc[0]) if "num_gen" in g and g.num_gen.notna().any() else None


def noise_lines(summary: dict, table: pd.DataFrame, metric: str) -> list[str]:
    """The report's paragraph on the metric's noise."""
    if not summary or summary["sd_one"] is None:
        return [f"The metric's own noise was not measured: no run evaluated {metric} under more than one noise set "
                "at the budget (set [eval] noise_sets = 3 or more)."]
    k, n = summary["noise_sets"], summary["num_gen"]
    text = (f"Each run's final EMA weights were evaluated under {k} noise sets of {n} images each. One value of "
            f"{metric} at N = {n} scatters with sd {summary['sd_one']:.3g} (within-run sd over the sets, pooled over "
            f"{summary['runs']} runs); the value used at the budget is the mean of the {k} sets, sd "
            f"{summary['sd_used']:.3g}. Every method is evaluated on the same noise sets, so the part of this noise "
            "that moves all models together cancels in the paired differences the report is built from; the table "
            "gives, per method, the metric's sd of a paired difference (within-seed sd over the sets / sqrt(K)) "
            "against the paired between-seed sd.")
    if table.empty:
        return [text]
    bad = table[table["precise enough (<= 1/3)"] == "no"]
    ratios = table["metric sd / paired sd"].dropna()
    if bad.empty and len(ratios):
        text += (f" It is at most {ratios.max():.2f} of the paired sd for every method: the metric's noise is small "
                 "against the spread the intervals are built from.")
    elif len(ratios):
        text += (f" **Not precise enough** for {', '.join(bad.method)}: there the metric's sd is more than a third of "
                 f"the paired between-seed sd (up to {ratios.max():.2f} of it), so part of what their intervals show "
                 "is the metric's own noise; more images or noise sets would narrow them.")
    return [text]


def sampler_robustness(evals: pd.DataFrame, metric: str, baseline: str | None, budget: float, labels: list[str],
                       confidence: float = 0.95) -> pd.DataFrame:
    """Per method: the paired final difference under the suite's sampler and under sampler2, and
    whether the sign of the mean changes."""
    second = f"{metric}_sampler2"
    if baseline is None or second not in set(evals.metric):
        return pd.DataFrame()
    rows = []
    for label in labels:
        if label == baseline:
            continue
        ds = []
        for m in (metric, second):
            g = evals[(evals.metric == m) & (evals.step == budget)]
            b, x = g[g.method_label == baseline], g[g.method_label == label]
            if b.empty or x.empty:
                ds.append(None)
                continue
            bs, bv, xs, xv, seeds = pair_seeds(seed_curves(b), seed_curves(x))
            ds.append(paired_difference(bs, bv, xs, xv, budget=budget, seeds=seeds, confidence=confidence))
        if any(d is None or d.mean is None for d in ds):
            continue
        flip = np.sign(ds[0].mean) != np.sign(ds[1].mean)
        clear = any(d.ci_low is not None and (d.ci_low > 0 or d.ci_high < 0) for d in ds)
        sign = "same" if not flip else "changes" if clear else "changes (both intervals contain 0)"
        rows.append({"method": label, f"final - baseline, {_sampler_name(evals, metric)}": format_difference(ds[0]),
                     f"final - baseline, {_sampler_name(evals, second)}": format_difference(ds[1]), "sign": sign})
    return pd.DataFrame(rows)


def _sampler_name(evals: pd.DataFrame, metric: str) -> str:
    g = evals[evals.metric == metric]
    if g.empty or "sampler" not in g:
        return metric
    r = g.iloc[0]
    return f"{r['sampler']} {int(r['sampler_steps'])} steps, {r.get('timestep_spacing', '?')}"
