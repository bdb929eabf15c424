"""The report's statistics: paired speed-ups with their intervals, the A/A control, paired
final-metric differences, and the training facts a reviewer checks (learning-rate factor,
clipped steps, convergence of the baseline, the metric's noise floor, the sampler's timesteps).

Every table here is built from logged files alone (evals.jsonl rows, steps.jsonl summaries,
config.json) through bench.report.speedup's definitions: never imports torch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from bench.fileio import iter_jsonl
from bench.report.curves import relative_improvement
from bench.report.intervals import holm, holm_levels, t_interval_at, t_pvalue
from bench.report.speedup import (
    EquivalentSpeedup,
    PairedDifference,
    PairedSpeedup,
    aa_split,
    baseline_equivalent,
    lower_is_better,
    paired_difference,
    paired_speedup,
)

AA_LABEL = "A/A: baseline vs baseline"
#: the registered control method (methods/placebo.py); its labels are controls, not methods under test
PLACEBO = "placebo"


def is_control(label: str) -> bool:
    """The A/A row and the placebo's labels: shown beside the methods, outside Holm's family."""
    return label == AA_LABEL or label == PLACEBO or label.startswith(PLACEBO + "-")


# ----------------------------------------------------------------------------------------------
# Curves, aligned by seed.


def seed_curves(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """steps [P] and values [seeds, P] (NaN where a seed has no value) of one run group."""
    wide = df.pivot_table(index="seed", columns="step", values="value", aggfunc="last").sort_index(axis=1)
    return wide.columns.to_numpy(dtype=float), wide.to_numpy(dtype=float), list(wide.index)


def pair_seeds(base: tuple, meth: tuple) -> tuple:
    """The rows of both groups for the seeds they share, in one order (the pairing)."""
    bs, bv, b_seeds = base
    ms, mv, m_seeds = meth
    seeds = [s for s in b_seeds if s in m_seeds]
    bi = [b_seeds.index(s) for s in seeds]
    mi = [m_seeds.index(s) for s in seeds]
    return bs, bv[bi], ms, mv[mi], seeds


def _stats_row(base: tuple, meth: tuple, *, budget, targets, lib, confidence, n_boot, seed, extend=1.0,
               is_baseline: bool = False) -> dict:
    bs, bv, ms, mv, seeds = pair_seeds(base, meth)
    row = {"seeds": seeds, "n_paired": len(seeds)}
    row["equiv"] = baseline_equivalent(bs, bv, ms, mv, budget=budget, extend=extend, seeds=seeds,
                                       lower_is_better=lib, confidence=confidence, n_boot=n_boot, seed=seed,
                                       is_baseline=is_baseline)
    for f in targets:
        s = paired_speedup(bs, bv, ms, mv, budget=budget, fraction=f, seeds=seeds, lower_is_better=lib,
                           confidence=confidence, n_boot=n_boot, seed=seed, is_baseline=is_baseline)
        row[f"speedup@{f:g}"] = s
    d = paired_difference(bs, bv, ms, mv, budget=budget, seeds=seeds, confidence=confidence)
    row["final_diff"] = d
    row["final_p"] = t_pvalue(d.per_seed) if d.interval == "t" else None
    return row


def same_n(g: pd.DataFrame) -> pd.DataFrame:
    """The rows of one metric at one number of generated images (the Frechet distance's bias depends
    on N, so values at different N are never compared): the most common N, when rows differ."""
    if "num_gen" not in g or g.num_gen.nunique(dropna=True) <= 1:
        return g
    return g[g.num_gen == g.num_gen.mode().iloc[0]]


def early_targets(targets) -> list[float]:
    """The early-training rate's fractions: f < 1 (at f = 1 it only encodes the final difference's sign)."""
    return [float(f) for f in targets if float(f) < 1.0]


def speedup_rows(evals: pd.DataFrame, baseline: str, labels: list[str], budget: float, metric: str, *,
                 targets, extend: float = 1.0, confidence: float = 0.95, n_boot: int = 2000,
                 seed: int = 0) -> list[dict]:
    """Per method label against `baseline`: the baseline-equivalent speed-up at the budget (the
    headline, B's curve read up to extend x budget), the early-training rate at every target
    fraction f < 1 and the paired final difference, with Holm-adjusted intervals across the
    methods that are not controls; then, when no placebo ran, the A/A row (the baseline's seed halves)."""
    g = same_n(evals[evals.metric == metric])
    base_df = g[g.method_label == baseline]
    if base_df.empty:
        return []
    # Controls by what ran (a placebo under any label), else by label.
    placebos = set(g[g.method == PLACEBO].method_label) if "method" in g else set()
    lib = lower_is_better(metric)
    base = seed_curves(base_df)
    kw = dict(budget=budget, targets=early_targets(targets), lib=lib, confidence=confidence, n_boot=n_boot,
              seed=seed, extend=extend)
    rows = []
    for label in labels:
        sub = g[g.method_label == label]
        if sub.empty:
            continue
        rows.append({"method_label": label, "is_baseline": label == baseline,
                     "is_control": label != baseline and (is_control(label) or label in placebos),
                     **_stats_row(base, seed_curves(sub), is_baseline=label == baseline, **kw)})
    # A/A: the second half of the baseline's seeds as if it were a method, paired with the first half.
    bs, bv, b_seeds = base
    first, second = aa_split(len(b_seeds))
    if first and not any(r["is_control"] for r in rows):
        half1 = (bs, bv[first], list(range(len(first))))
        half2 = (bs, bv[second], list(range(len(second))))
        aa = _stats_row(half1, half2, **kw)
        aa["seeds"] = [f"{b_seeds[i]}|{b_seeds[j]}" for i, j in zip(first, second)]
        rows.append({"method_label": AA_LABEL, "is_baseline": False, "is_control": True, **aa})
    adjust_holm(rows, confidence)
    return rows


def adjust_holm(rows: list[dict], confidence: float) -> None:
    """Holm-adjusted p-values and intervals (bench.report.intervals.holm_levels) of the headline and of the
    final difference, across the rows that are neither the baseline nor a control."""
    family = [r for r in rows if not r["is_baseline"] and not r["is_control"]]
    for key, p_of, sample_of, transform in (
            ("equiv", lambda r: r["equiv"].p_value, lambda r: r["equiv"].log_s, np.exp),
            ("final_diff", lambda r: r["final_p"], lambda r: r["final_diff"].per_seed, lambda x: x)):
        ps = {r["method_label"]: p_of(r) for r in family}
        adjusted, levels = holm(ps), holm_levels(ps, confidence)
        for r in family:
            label, ci = r["method_label"], None
            if ps[label] is not None:
                lo_hi = t_interval_at(sample_of(r), levels[label])
                ci = (float(transform(lo_hi[0])), float(transform(lo_hi[1]))) if lo_hi else None
            r[f"{key}_holm"] = {"p": ps[label], "p_adj": adjusted[label], "level": levels[label], "ci": ci,
                                "m": len(family)}


def speedup_frame(rows: list[dict], targets) -> pd.DataFrame:
    """The machine-readable table (tables/speedup.csv): per method, one row for the headline
    (statistic "baseline_equivalent") and one per early-training target (statistic "early_rate")."""
    out = []

    def flat(obj) -> dict:
        return {k: (json.dumps(v) if isinstance(v, list) else v) for k, v in obj.as_dict().items()}

    for r in rows:
        d = r["final_diff"]
        common = {"method_label": r["method_label"], "is_control": r["is_control"],
                  "final_diff_mean": d.mean, "final_diff_ci_low": d.ci_low, "final_diff_ci_high": d.ci_high,
                  "final_diff_relative": d.relative_mean, "final_diff_interval": d.interval,
                  "final_diff_p": r.get("final_p")}
        fh = r.get("final_diff_holm") or {}
        common.update(final_diff_p_holm=fh.get("p_adj"), final_diff_holm_level=fh.get("level"),
                      final_diff_holm_low=(fh.get("ci") or (None, None))[0],
                      final_diff_holm_high=(fh.get("ci") or (None, None))[1])
        e, eh = r["equiv"], r.get("equiv_holm") or {}
        out.append({**common, "statistic": "baseline_equivalent", "fraction": 1.0,
                    **{k: v for k, v in flat(e).items() if k not in ("budget",)},
                    "p_holm": eh.get("p_adj"), "holm_level": eh.get("level"),
                    "holm_low": (eh.get("ci") or (None, None))[0], "holm_high": (eh.get("ci") or (None, None))[1]})
        for f in early_targets(targets):
            sp = r[f"speedup@{f:g}"]
            out.append({**common, "statistic": "early_rate", **flat(sp)})
    return pd.DataFrame(out)


def format_speedup(s: PairedSpeedup) -> tuple[str, str]:
    """(point, interval) as the report prints them. A bound is always printed as such: "<= x" (some
    seeds never reached; "not reached (<= x)" when at least half of them), ">= x" (some seeds were
    at the target by their first evaluation), "~x" (bounds both ways); those get no interval, only
    a note of how many seeds are bounds."""
    if s.interval == "none":
        return "1 (reference)", ""
    if s.speedup is None:
        return "no data", ""
    n, missed = s.n_paired, s.n_paired - s.n_reached
    notes = ([f"{missed} of {n} seeds not reached"] if s.upper_bound else []) + \
        ([f"{s.n_first} of {n} seeds at the target by their first evaluation"] if s.lower_bound else [])
    if s.upper_bound and s.lower_bound:
        return f"~{s.speedup:.2f}x", "bounds both ways: " + ", ".join(notes)
    if s.upper_bound:
        point = f"not reached (<= {s.speedup:.2f}x)" if 2 * missed >= n else f"<= {s.speedup:.2f}x"
        return point, notes[0]
    if s.lower_bound:
        return f">= {s.speedup:.2f}x", notes[0]
    if s.interval == "one-sided":
        return f"{s.speedup:.2f}x", "one-sided at f = 1, no interval"
    if s.ci_low is None:
        return f"{s.speedup:.2f}x", f"too few seeds (n={n})"
    return f"{s.speedup:.2f}x", f"[{s.ci_low:.2f}, {s.ci_high:.2f}] ({s.interval}, n={n})"


def equivalent_cell(e: EquivalentSpeedup) -> str:
    """The headline cell, e.g. "1.35x [1.10, 1.66]", ">= 1.71x; 2 of 4 seeds beyond the baseline's
    curve", "<= 0.14x; 4 of 4 seeds no better than the baseline's first evaluation"."""
    if e.interval == "none":
        return "1 (reference)"
    if e.speedup is None:
        return "no data"
    n = e.n_paired
    reach = max((s for s, b in zip(e.per_seed, e.bounds) if b == ">="), default=e.extend)
    notes = ([f"{e.n_beyond} of {n} seeds better than the baseline's whole curve (to {reach:g}x the budget)"]
             if e.lower_bound else []) + \
        ([f"{e.n_before} of {n} seeds no better than the baseline's first evaluation"] if e.upper_bound else [])
    if e.lower_bound and e.upper_bound:
        return f"~{e.speedup:.2f}x; " + ", ".join(notes)
    if e.lower_bound:
        return f">= {e.speedup:.2f}x; {notes[0]}"
    if e.upper_bound:
        return f"<= {e.speedup:.2f}x; {notes[0]}"
    if e.ci_low is None:
        return f"{e.speedup:.2f}x; too few seeds (n={n})"
    return f"{e.speedup:.2f}x [{e.ci_low:.2f}, {e.ci_high:.2f}]"


def holm_cell(h: dict | None, ratio: bool) -> str:
    """A Holm-adjusted interval with its adjusted p-value; '-' outside the family or without a test."""
    if not h or h["ci"] is None:
        return "-"
    lo, hi = h["ci"]
    shown = f"[{lo:.2f}, {hi:.2f}]" if ratio else f"[{lo:.3g}, {hi:.3g}]"
    return f"{shown} p={h['p_adj']:.2g}"


def format_difference(d: PairedDifference, digits: int = 4) -> str:
    """The paired final-metric difference as the report prints it, e.g. "-2.31 [-3.9, -0.7]"."""
    if d.mean is None:
        return "no data"
    point = f"{d.mean:.{digits}g}"
    if d.ci_low is None:
        return f"{point} ({d.interval})"
    return f"{point} [{d.ci_low:.{digits}g}, {d.ci_high:.{digits}g}]"


def speedup_cell(s) -> str:
    """One target's speed-up with its interval in one cell, e.g. "1.12x [0.92, 1.36]",
    "0.96x; too few seeds (n=2)", "not reached (<= 0.76x); 2 of 4 seeds not reached"."""
    point, interval = format_speedup(s)
    if s.interval == "none" or s.speedup is None:
        return point
    if s.ci_low is None:
        return f"{point}; {interval}"
    return f"{point} [{s.ci_low:.2f}, {s.ci_high:.2f}]"


def speedup_display(rows: list[dict], targets, finals: dict[str, str],
                    with_equiv: bool = True) -> pd.DataFrame:
    """The table people read: the baseline-equivalent speed-up at the budget (the headline) and the
    paired final difference, each with its unadjusted and its Holm-adjusted interval, the final
    value (mean ± sd over seeds), and the early-training rate at each target f < 1."""
    out = []
    for r in rows:
        base = r["is_baseline"]
        line = {"method": r["method_label"], "paired seeds": r["n_paired"]}
        if with_equiv:
            line["speed-up at the budget (baseline-equivalent)"] = equivalent_cell(r["equiv"])
            line["Holm-adjusted"] = "1 (reference)" if base else holm_cell(r.get("equiv_holm"), True)
        line["final - baseline (paired)"] = "0 (reference)" if base else format_difference(r["final_diff"])
        line["final, Holm-adjusted"] = "0 (reference)" if base else holm_cell(r.get("final_diff_holm"), False)
        line["final (mean ± sd)"] = finals.get(r["method_label"], "")
        for f in early_targets(targets):
            name = f"early rate, F* at {100 * f:g}%"
            line[name] = "1 (reference)" if base else speedup_cell(r[f"speedup@{f:g}"])
        out.append(line)
    return pd.DataFrame(out)


def final_values(evals: pd.DataFrame, metric: str, budget: float) -> dict[str, str]:
    """Each label's metric at its last evaluation within the budget: mean ± sd over seeds."""
    out = {}
    g = evals[(evals.metric == metric) & (evals.step <= budget)]
    for label, sub in g.groupby("method_label"):
        last = sub.sort_values("step").groupby("seed").value.last()
        out[label] = f"{last.mean():.4g} ± {last.std(ddof=1):.2g}" if len(last) > 1 else f"{last.mean():.4g}"
    return out


# ----------------------------------------------------------------------------------------------
# Training facts from steps.jsonl.


def step_summary(path: Path, grad_clip: float | None, lr: float | None = None, warmup: int = 0,
                 budget: int | None = None) -> dict:
    """One pass over steps.jsonl (up to `budget`: an extended baseline's later steps are not the
    workload's): steps, clipped steps, mean and smallest learning-rate factor. Logs from before
    `lr_scale` was recorded get it back from lr / (base lr x warm-up factor)."""
    n = clipped = 0
    scale_sum, scale_min = 0.0, math.inf
    for row in iter_jsonl(path):
        if budget and isinstance(row.get("step"), (int, float)) and row["step"] > budget:
            continue
        n += 1
        if "clipped" in row:
            clipped += bool(row["clipped"])
        elif grad_clip and isinstance(row.get("grad_norm"), (int, float)):  # logs from before `clipped`
            clipped += row["grad_norm"] > grad_clip
        scale = row.get("lr_scale")
        if scale is None:
            warm = min(1.0, row.get("step", 1) / warmup) if warmup else 1.0
            scale = row["lr"] / (lr * warm) if lr and isinstance(row.get("lr"), (int, float)) else 1.0
        scale_sum += scale
        scale_min = min(scale_min, scale)
    if not n:
        return {"steps": 0}
    return {"steps": n, "clipped": clipped, "lr_scale_mean": scale_sum / n, "lr_scale_min": scale_min}


def training_facts(runs: list[dict], order: list[str]) -> pd.DataFrame:
    """Per method label: its slots, the mean (and smallest) learning-rate factor its optimizer slot
    applied, and the share of steps whose gradient norm was clipped (over all its seeds)."""
    acc: dict[str, dict] = {}
    for r in runs:
        cfg = r["config"]
        s = step_summary(r["dir"] / "steps.jsonl", cfg.get("grad_clip"), cfg.get("lr"), cfg.get("warmup") or 0,
                         cfg.get("budget_iters") or None)
        if not s["steps"]:
            continue
        a = acc.setdefault(r["label"], {"steps": 0, "clipped": 0, "scale": 0.0, "min": math.inf,
                                        "slots": cfg.get("method_slots") or [], "lr": cfg.get("lr"),
                                        "grad_clip": cfg.get("grad_clip")})
        a["steps"] += s["steps"]
        a["clipped"] += s["clipped"]
        a["scale"] += s["lr_scale_mean"] * s["steps"]
        a["min"] = min(a["min"], s["lr_scale_min"])
    rows = []
    for label in [x for x in order if x in acc] + sorted(set(acc) - set(order)):
        a = acc[label]
        rows.append({"method": label, "slots": ", ".join(a["slots"]) or "-", "lr": a["lr"],
                     "optimizer_slot": "optimizer" in a["slots"], "lr_factor_mean": a["scale"] / a["steps"],
                     "lr_factor_min": a["min"], "clipped_fraction": a["clipped"] / a["steps"],
                     "grad_clip": a["grad_clip"], "steps": a["steps"]})
    return pd.DataFrame(rows)


def training_display(facts: pd.DataFrame) -> pd.DataFrame:
    """training_facts as people read it."""
    rows = []
    for _, f in facts.iterrows():
        opt = bool(f["optimizer_slot"])
        rows.append({"method": f["method"], "slots": f["slots"], "lr": f"{f['lr']:g}",
                     "mean lr factor": f"{f['lr_factor_mean']:.3f}" if opt else "1 (no optimizer slot)",
                     "smallest lr factor": f"{f['lr_factor_min']:.3f}" if opt else "1",
                     "clipped steps": f"{100 * f['clipped_fraction']:.1f}% (clip {f['grad_clip']:g})"
                     if f["grad_clip"] else "no clipping"})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------
# What the report does not show.


def limits_lines(evals: pd.DataFrame, runs: list[dict], baseline: str | None, metric: str, budget: float,
                 sweep: dict[str, float]) -> list[str]:
    """The report's limits, each a sentence with its number: convergence, sampler, noise floor,
    learning rate, clipping (the table beside it), and what the metric is."""
    g = evals[evals.metric == metric]
    lines = []
    base = g[g.method_label == baseline] if baseline else g.iloc[0:0]
    if not base.empty:
        steps, values, seeds = seed_curves(base)
        rel = relative_improvement(steps, values, budget, last=0.2, lower_is_better=lower_is_better(metric))
        if rel is None:
            lines.append("- **Convergence**: the baseline's curve does not cover the last 20% of the budget; "
                         "where F* sits relative to convergence is unknown.")
        else:
            verdict = ("still improving quickly: F* is an early-training quality, not the converged one, and the "
                       "speed-ups are for this stage of training" if rel > 0.1 else
                       "flattening but not converged: a longer budget could change the ranking" if rel > 0.02
                       else "nearly flat: F* is close to what this budget can reach")
            lines.append(f"- **Convergence**: the baseline's seed-mean {metric} improved by {100 * rel:.1f}% over "
                         f"the last 20% of the budget ({0.8 * budget:g} -> {budget:g} iterations): {verdict}.")
    lines += _sampler_lines(g)
    lines += _floor_lines(g, base[base.step <= budget])  # an extended baseline trains past the budget
    lines += _lr_lines(runs, sweep)
    lines += _ema_lines(runs)
    return lines


def _ema_lines(runs: list[dict]) -> list[str]:
    """What the EMA averaged over at the end: with warm-up, min(decay, (1 + k) / (10 + k)) at step k."""
    cfg = next((r["config"] for r in runs if r["config"].get("iters")), None)
    if not cfg or cfg.get("ema_decay") is None:
        return []
    decay, k = float(cfg["ema_decay"]), int(cfg.get("budget_iters") or cfg["iters"]) - 1  # at the budget
    if cfg.get("ema_warmup"):
        eff = min(decay, (1 + k) / (10 + k))
        why = ("the warm-up term, not the configured decay" if eff < decay else "the configured decay")
        return [f"- **EMA**: evaluated on the EMA of the weights, decay min({decay:g}, (1 + k) / (10 + k)) at step "
                f"k; at the last step it is {eff:.4f} ({why}), an average over about {1 / (1 - eff):.0f} steps."]
    return [f"- **EMA**: evaluated on the EMA of the weights with a constant decay {decay:g} from the first step "
            f"(no warm-up): {100 * decay ** (k + 1):.1f}% of it is still the initial weights at the end."]


def _sampler_lines(g: pd.DataFrame) -> list[str]:
    out = []
    cols = [c for c in ("sampler", "sampler_steps", "timestep_spacing", "timesteps") if c in g]
    recorded = g.dropna(subset=["timesteps"]) if "timesteps" in cols else g.iloc[0:0]
    if len(recorded) < len(g):
        out.append("- **Sampler**: the visited timesteps were not recorded for some evaluations (runs from "
                   "before they were logged).")
    for _, c in recorded[cols].drop_duplicates().iterrows():
        ts = [int(t) for t in str(c["timesteps"]).split(",") if t.strip()]
        low = [t for t in ts if t < 100]
        shown = ", ".join(map(str, ts)) if len(ts) <= 25 else f"{ts[0]}, {ts[1]}, ..., {ts[-2]}, {ts[-1]}"
        out.append(f"- **Sampler**: {c['sampler']} with {len(ts)} steps, {c.get('timestep_spacing', '?')} spacing, "
                   f"visits t = {shown}; {len(low)} of them below t = 100 (the low-noise steps that P2 and "
                   f"Min-SNR down-weight), {'including' if 0 in ts else 'not including'} t = 0.")
    return out


def _floor_lines(g: pd.DataFrame, base: pd.DataFrame) -> list[str]:
    if "noise_floor" not in g or g.noise_floor.dropna().empty:
        sources = g.noise_floor_source.dropna() if "noise_floor_source" in g else g.iloc[0:0]
        why = sources.iloc[0] if len(sources) else "not recorded (runs from before it was measured)"
        return [f"- **Noise floor**: {str(why).rstrip('.')}."]
    floor = float(g.noise_floor.dropna().iloc[0])
    src = g.noise_floor_source.dropna().iloc[0] if "noise_floor_source" in g else "real images"
    n_gen = int(g.num_gen.dropna().iloc[0]) if "num_gen" in g and g.num_gen.notna().any() else "?"
    text = (f"- **Noise floor**: {g.metric.iloc[0]} between {src} and the reference is {floor:.4g}: what a "
            f"perfect generator would score at N = {n_gen}; differences between methods are read against it")
    if not base.empty:
        last = base.sort_values("step").groupby("seed").value.last().mean()
        text += f" (the baseline ends the budget at {last:.4g}, {last / floor:.1f}x the floor)" if floor > 0 else ""
    return [text + "."]


def _lr_lines(runs: list[dict], sweep: dict[str, float]) -> list[str]:
    cfgs = [r["config"] for r in runs if r["config"] and r["label"] not in sweep or r["label"] == next(iter(sweep), None)]
    lrs = sorted({c.get("lr") for c in cfgs if c.get("lr") is not None})
    shown = ", ".join(f"{lr:g}" for lr in lrs) or "?"
    if len(lrs) > 1:  # only [tune] gives grid methods learning rates of their own
        return [f"- **Learning rate**: chosen per method by the suite's tuning (the Tuning section: {shown}), times "
                "its own lr factor (table below), the same warm-up and clipping; a method whose best rate lies "
                "outside the tuning grid is still at a disadvantage."]
    text = (f"- **Learning rate**: {shown} for every method (times its own lr factor, table below), with the same "
            "warm-up and gradient clipping; it was not tuned per method, so a method that needs another learning "
            "rate is at a disadvantage.")
    text += (" The baseline's learning-rate sweep is shown with the speed-up table." if sweep else
             " Add `lr_sweep = [...]` to the suite's [grid] for a tuned baseline.")
    return [text]
