"""Pairwise method comparisons (``[report] compare = [["laplace", "logit_normal"], ...]``): method A
against method B, seed k with seed k (they share initialisation, data order and noise), as the
methods are paired with the baseline. Files only, no torch.

Two statistics per pair, each read from the rows every method already has against the baseline:
- the speed-up ratio, per seed s_A,k / s_B,k (the baseline iterations A's value is worth over those
  B's is worth), geometric mean with a t-interval on its logs; a bound when either speed-up of a
  seed is one (">=" or "<="), then with no test;
- the paired final difference A_k - B_k at the budget, mean with a t-interval.
Holm's adjustment runs over the pairs of a workload: the comparisons are their own family, apart
from the methods' family against the baseline. The verdict reads the adjusted ratio, or the adjusted
final difference where the ratio is a bound (bench/report/verdicts.py ``classify``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from bench.report.intervals import log_interval, t_pvalue
from bench.report.speedup import EquivalentSpeedup, lower_is_better, paired_difference
from bench.report.stats import adjust_holm, format_difference, holm_cell, pair_seeds, same_n, seed_curves
from bench.report.verdicts import FASTER, NO_TEST, SLOWER, classify


def _ratio(ea: EquivalentSpeedup, eb: EquivalentSpeedup, kw: dict) -> EquivalentSpeedup:
    """s_A,k / s_B,k over the seeds both speed-ups have; censored when a seed's either one is a bound."""
    a = {s: (v, b) for s, v, b in zip(ea.seeds, ea.per_seed, ea.bounds)}
    b = {s: (v, bd) for s, v, bd in zip(eb.seeds, eb.per_seed, eb.bounds)}
    seeds = [s for s in ea.seeds if s in b]
    per = [a[s][0] / b[s][0] for s in seeds]
    censored = any(a[s][1] or b[s][1] for s in seeds)
    out = EquivalentSpeedup(ea.budget, ea.extend, seeds, per, [""] * len(seeds), [], [], len(seeds), 0, None, None,
                            None, "no data", None, kw["confidence"])
    if not seeds:
        return out
    log_s = np.log(np.asarray(per, float))
    out.log_s, out.speedup = log_s.tolist(), float(np.exp(log_s.mean()))
    out.lower_bound = out.upper_bound = censored
    if censored:
        out.interval = "censored"
        return out
    lo, hi, out.interval = log_interval(log_s, kw["confidence"], kw["n_boot"], kw["seed"])
    if lo is not None:
        out.ci_low, out.ci_high, out.p_value = float(np.exp(lo)), float(np.exp(hi)), t_pvalue(log_s)
    return out


def compare_rows(evals: pd.DataFrame, pairs: list, rows: list[dict], budget: float, metric: str,
                 kw: dict) -> list[dict]:
    """One row per pair of labels that both ran (module docstring), Holm-adjusted over the pairs."""
    g = same_n(evals[evals.metric == metric])
    by = {r["method_label"]: r for r in rows}
    out = []
    for a, b in pairs:
        if a not in by or b not in by:
            continue
        bs, bv, as_, av, seeds = pair_seeds(seed_curves(g[g.method_label == b]), seed_curves(g[g.method_label == a]))
        d = paired_difference(bs, bv, as_, av, budget=budget, seeds=seeds, confidence=kw["confidence"])  # A - B
        out.append({"method_label": f"{a} vs {b}", "a": a, "b": b, "is_baseline": False, "is_control": False,
                    "n_paired": d.n, "equiv": _ratio(by[a]["equiv"], by[b]["equiv"], kw), "final_diff": d,
                    "final_p": t_pvalue(d.per_seed) if d.interval == "t" else None})
    adjust_holm(out, kw["confidence"])
    lib = lower_is_better(metric)
    for r in out:
        verdict, r["basis"] = classify(r, lib)
        r["verdict"] = {FASTER: f"{r['a']} better", SLOWER: f"{r['b']} better", NO_TEST: "no test"}.get(
            verdict, "not separated")
    return out


def _ratio_cell(e: EquivalentSpeedup) -> str:
    if e.speedup is None:
        return "no data"
    if e.interval == "censored":
        return f"~{e.speedup:.2f}x; a speed-up of a seed is a bound, no test"
    if e.ci_low is None:
        return f"{e.speedup:.2f}x; too few seeds (n={e.n_paired})"
    return f"{e.speedup:.2f}x [{e.ci_low:.2f}, {e.ci_high:.2f}]"


def compare_display(rows: list[dict]) -> pd.DataFrame:
    """The comparisons as people read them."""
    return pd.DataFrame([{"A vs B": r["method_label"], "paired seeds": r["n_paired"],
                          "speed-up ratio A / B": _ratio_cell(r["equiv"]),
                          "Holm-adjusted": holm_cell(r.get("equiv_holm"), True),
                          "final A - B (paired)": format_difference(r["final_diff"]),
                          "final, Holm-adjusted": holm_cell(r.get("final_diff_holm"), False),
                          "verdict": r["verdict"] + (f" (by the {r['basis']})" if r["basis"] != "too few seeds" else "")}
                         for r in rows])


def compare_frame(rows: list[dict], w: str, metric: str) -> pd.DataFrame:
    """The machine-readable comparisons (tables/compare.csv)."""
    out = []
    for r in rows:
        e, d, eh, fh = r["equiv"], r["final_diff"], r.get("equiv_holm") or {}, r.get("final_diff_holm") or {}
        out.append({"workload": w, "metric": metric, "a": r["a"], "b": r["b"], "n_paired": r["n_paired"],
                    "ratio": e.speedup, "ratio_ci_low": e.ci_low, "ratio_ci_high": e.ci_high,
                    "ratio_interval": e.interval, "ratio_p_holm": eh.get("p_adj"),
                    "ratio_holm_low": (eh.get("ci") or (None, None))[0],
                    "ratio_holm_high": (eh.get("ci") or (None, None))[1],
                    "final_diff_mean": d.mean, "final_diff_ci_low": d.ci_low, "final_diff_ci_high": d.ci_high,
                    "final_diff_p_holm": fh.get("p_adj"), "final_diff_holm_low": (fh.get("ci") or (None, None))[0],
                    "final_diff_holm_high": (fh.get("ci") or (None, None))[1], "holm_family_size": len(rows),
                    "verdict": r["verdict"], "basis": r["basis"]})
    return pd.DataFrame(out)


def compare_lines(rows: list[dict], metric: str, confidence: float) -> list[str]:
    """The report's section of one workload's comparisons."""
    if not rows:
        return []
    better = "negative" if lower_is_better(metric) else "positive"
    return ["#### Methods compared with each other ([report] compare)", "",
            f"Seed k of A paired with seed k of B. 'speed-up ratio A / B': per seed, the baseline-equivalent "
            f"speed-up of A over that of B (above 1: A is worth more baseline iterations), geometric mean with "
            f"its t-interval; 'final A - B': the paired difference of the {metric} at the budget ({better}: A is "
            f"better). **Holm's adjustment runs over these {len(rows)} comparison{'s' * (len(rows) != 1)} as a "
            f"family of their own**, apart from the methods against the baseline: the verdicts hold together at a "
            f"family-wise error of at most {100 * (1 - confidence):g}%. Where a ratio is a bound the adjusted final "
            "difference gives the verdict.", "", compare_display(rows).to_markdown(index=False), ""]
