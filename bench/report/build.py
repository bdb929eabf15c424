"""The report of a suite's results: tables (CSV, Markdown, LaTeX), figures (PNG, PDF), report.md.

``build_report(results/<suite>)`` reads every run folder (config.json, status.json, evals.jsonl,
steps.jsonl, method_trace.json, machine.json) and the suite's suite.json, and writes into
``results/<suite>/``:

- report.md                       all of the below, with what every number is (metric, feature
                                  extractor, N, sampler), every method label's hyperparameters,
                                  the machines the runs ran on, and the failed runs
- tables/evaluations.csv          every evaluation, one tidy row per (run, step, metric)
- tables/speedup.{csv,md,tex}     paired speed-up of every method over the baseline (bench.report.speedup) at
                                  each target fraction, per workload and metric, with its interval,
                                  the paired final-metric difference and the A/A control row
- tables/training.csv             per method: mean learning-rate factor and share of clipped steps
- tables/fractions.{csv,md,tex}   each metric at fixed fractions of the budget, mean and std
- tables/curves.csv               the seed-mean and std curve of every method
- tables/verdicts.csv, compare.*  the verdicts that open report.md, and [report] compare (text.py)
- figures/*.{png,pdf}             metric vs log-iterations with the paired differences, and the slots'
                                  figures (bench/report/figures.py: p(t), beta1 and lr, loss over t)

Reads files only: never imports torch (the report can be built on a laptop).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from bench.errors import ConfigError
from bench.fileio import atomic_write_bytes
from bench.report.figures import CURVES_CAPTION, figure_curves, look_for, safe_filename, training_figure_lines
from bench.report.noise import metric_noise, noise_lines, sampler_robustness
from bench.report.publish import staged_report
from bench.report.samples import sample_lines
from bench.report.scores import scores_lines
from bench.report.speedup import lower_is_better
from bench.report.stats import (
    early_targets,
    final_values,
    limits_lines,
    speedup_display,
    speedup_frame,
    speedup_rows,
    training_display,
    training_facts,
)
from bench.report.study import study_lines
from bench.report.style import runs_workload_words
from bench.report.tables import (
    curves_table,
    evaluations_table,
    find_runs,
    fractions_display,
    fractions_table,
    latex_speedup,
    method_order,
    method_table,
    read_json_or_none,
    run_budget,
    to_latex,
    to_markdown,
)
from bench.report.text import (
    machine_lines,
    protocol_lines,
    ruled,
    runtime_lines,
    speedup_text,
    training_lines,
    verdict_section,
    workload_verdicts,
)
from bench.suite.schema import REPORT_DEFAULTS
from bench.suite.study import suite_file_drift


@dataclass
class _Report:
    """What every section of one report reads (the results) and adds to (the tables' parts)."""

    suite_dir: Path
    out: Path
    info: dict
    runs: list[dict]
    evals: pd.DataFrame
    baseline: str | None
    order: list[str]
    metrics: list[str]
    primary: str | None
    fractions: list[float]
    sweep: dict
    targets: list[float]
    headline: float
    stats_kw: dict
    outside: list[dict] = field(default_factory=list)  # run folders outside the suite's grid: left out
    parts: dict = field(default_factory=lambda: {k: [] for k in ("md_sp", "tex_sp", "md_fr", "tex_fr", "sp", "facts")})

    @property
    def fig_dir(self) -> Path:
        return self.out / "figures"

    @property
    def tab_dir(self) -> Path:
        return self.out / "tables"


def _read_results(suite_dir: Path, out: Path) -> _Report:
    """The results tree and the suite's report settings (suite.json), with their defaults."""
    info = read_json_or_none(suite_dir / "suite.json") or {}
    rep = {**REPORT_DEFAULTS, **(info.get("report") or {})}  # a results tree from an older suite.json
    runs, outside = in_grid(info, find_runs(suite_dir))
    evals = evaluations_table(suite_dir, runs)
    labels = sorted({r["label"] for r in runs})
    baseline = rep["baseline"] if rep["baseline"] in labels else None
    primary = rep.get("metric") or (sorted(evals.metric.unique())[0] if not evals.empty else None)
    metrics = sorted(evals.metric.unique(), key=lambda m: (m != primary, m)) if not evals.empty else []
    targets = [float(f) for f in rep["targets"]]
    headline = float(rep["headline"]) if float(rep["headline"]) in targets else targets[-1]
    stats_kw = dict(targets=targets, confidence=float(rep["confidence"]), n_boot=int(rep["bootstrap"]),
                    seed=int(rep["seed"]))
    return _Report(suite_dir, out, info, runs, evals, baseline, method_order(labels, baseline), metrics, primary,
                   rep["fractions"], _lr_sweep(info), targets, headline,
                   stats_kw, outside)


def _lr_sweep(info: dict) -> dict[str, float]:
    """[grid] lr_sweep's baseline runs (label -> lr). A tuned method's lr is its tuning's choice, never a
    sweep entry: suite.json files written before the runner knew that listed every tuned label here."""
    chosen = info.get("lr_chosen") or {}
    sweep = {k: v for k, v in (info.get("lr_sweep") or {}).items() if k not in chosen}
    base = (info.get("report") or {}).get("baseline", REPORT_DEFAULTS["baseline"])
    if not sweep or set(sweep) == {base}:
        return {}
    return {base: (info.get("lr_sweep") or {}).get(base, chosen.get(base)), **sweep}


def in_grid(info: dict, runs: list[dict]) -> tuple[list[dict], list[dict]]:
    """The runs of the suite's grid as `run` last wrote it (suite.json: method labels, workloads, seeds),
    and the rest: folders that a changed suite left behind, which no table nor Holm family may count.
    A suite.json without a grid (older results) keeps every run."""
    grid = {"label": {m.get("label") for m in info.get("methods") or []},
            "workload": {w.get("name") for w in info.get("workloads") or []}, "seed": set(info.get("seeds") or [])}

    def inside(r: dict) -> bool:
        return all(not keep or r[key] in keep for key, keep in grid.items())

    return [r for r in runs if inside(r)], [r for r in runs if not inside(r)]


def build_report(suite_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path:
    """Write tables, figures and report.md for results/<suite>; return the path of report.md. All of it
    is written into a staging folder first and moved into place when whole: a report that fails half-way
    (a full disk) leaves the previous one as it was."""
    suite_dir = Path(suite_dir)
    if not suite_dir.is_dir():
        raise ConfigError(f"no results folder {suite_dir}; run the suite first")
    out = Path(out_dir) if out_dir else suite_dir
    with staged_report(out) as staging:  # one report at a time, in its own staging folder (report/publish.py)
        _build_into(suite_dir, staging)
    return out / "report.md"


def _build_into(suite_dir: Path, out: Path) -> Path:
    ctx = _read_results(suite_dir, out)
    ctx.tab_dir.mkdir(parents=True, exist_ok=True)
    fr = fractions_table(ctx.evals, ctx.runs, ctx.fractions)
    _write_text(ctx.tab_dir / "evaluations.csv", ctx.evals.to_csv(index=False))
    _write_text(ctx.tab_dir / "fractions.csv", fr.to_csv(index=False))
    _write_text(ctx.tab_dir / "curves.csv", curves_table(ctx.evals).to_csv(index=False))

    sections = []
    for w in sorted({r["workload"] for r in ctx.runs}):
        sections += _workload_section(ctx, w, fr)
    _write_parts(ctx)
    sections += _scores_section(ctx)
    head = _header_lines(ctx)
    if drift := suite_file_drift(ctx.info):  # the report follows suite.json: an edited suite file is said
        head[2:2] = [f"**Note: {drift}.**", ""]
        print(f"note: {drift}", file=sys.stderr)
    for r in (r for r in ctx.runs if r.get("unreadable_log")):  # lost evaluations: here too, not only in report.md
        print(f"note: {r['workload']}/{r['label']}/seed{r['seed']}: {r['status']['reason']}", file=sys.stderr)
    at = head.index("## What the numbers are")  # the verdicts first
    lines = head[:at] + verdict_section(ctx) + head[at:] + study_lines(ctx) + sections + _footer_lines(ctx)
    path = ctx.out / "report.md"
    _write_text(path, "\n".join(lines))
    return path


def _workload_section(ctx: _Report, w: str, fr: pd.DataFrame) -> list[str]:
    """One workload: per metric its speed-ups, fractions and curve; the training figures; the limits."""
    w_runs = [r for r in ctx.runs if r["workload"] == w]
    w_evals = ctx.evals[ctx.evals.workload == w] if not ctx.evals.empty else ctx.evals
    budget = max((run_budget(r["config"]) or 0) for r in w_runs)
    sec = [f"## Workload {w}", ""]
    for metric in ctx.metrics:
        sec += _metric_section(ctx, w, w_evals, budget, metric, fr)
    sec += _figure_section(ctx, w, w_runs)
    sec += sample_lines(w_runs, w, budget, ctx.order, ctx.fig_dir, _fig)
    fact = training_facts(w_runs, ctx.order)
    ctx.parts["facts"].append(fact.assign(workload=w))
    sec += ["### What this report does not show", ""]
    sec += limits_lines(w_evals, w_runs, ctx.baseline, ctx.primary, budget, ctx.sweep) if ctx.primary else []
    sec += ["", "Learning-rate factor (the optimizer slot's scale of the shared learning rate, mean over all "
            "steps and seeds) and the share of steps whose gradient norm was clipped:", "",
            to_markdown(training_display(fact)), ""]
    return sec


def _metric_section(ctx: _Report, w: str, w_evals: pd.DataFrame, budget: int, metric: str,
                    fr: pd.DataFrame) -> list[str]:
    if metric.endswith("_sampler2"):
        return []  # read beside its metric (sampler robustness)
    if metric.endswith("_final"):
        return _final_metric_section(ctx, w, w_evals, budget, metric)
    tag, target, sec = f"{w} / {metric}", None, []
    if ctx.baseline:
        main = [label for label in ctx.order if label not in ctx.sweep or label == ctx.baseline]
        extend = _baseline_extend(ctx, w, budget)
        rows = speedup_rows(ruled(ctx, w_evals), ctx.baseline, main, budget, metric, extend=extend, **ctx.stats_kw)
        if rows:
            ctx.parts["sp"].append(speedup_frame(rows, ctx.targets).assign(
                workload=w, metric=metric, baseline=ctx.baseline, budget_iters=budget, baseline_extend=extend))
            early = early_targets(ctx.targets)
            target = rows[0][f"speedup@{ctx.headline:g}"].target if ctx.headline in early else None
            disp = speedup_display(rows, ctx.targets, final_values(w_evals, metric, budget))
            ctx.parts["md_sp"] += [f"### {tag}", "", to_markdown(disp), ""]
            ctx.parts["tex_sp"].append(latex_speedup(rows, metric=metric, workload=runs_workload_words(ctx.runs, w),
                look=look_for(ctx.info, ctx.runs, ctx.baseline), confidence=ctx.stats_kw["confidence"],
                label=f"tab:speedup:{safe_filename(w)}:{safe_filename(metric)}"))
            sec += speedup_text(rows, ctx.baseline, metric, budget, extend, early, ctx.stats_kw,
                                 _baseline_slots(ctx, w))
            sec += [to_markdown(disp), ""] + workload_verdicts(ctx, w, w_evals, rows, main, budget, metric, extend)
            sec += _noise_section(ctx, w_evals, metric, budget, main)
            sec += _sweep_section(w_evals, ctx.baseline, ctx.sweep, metric, budget, ctx.order, ctx.stats_kw,
                                  ctx.headline)
    fsub = fr[(fr.workload == w) & (fr.metric == metric)] if not fr.empty else pd.DataFrame()
    if not fsub.empty:
        disp = fractions_display(fsub)
        ctx.parts["md_fr"] += [f"### {tag}", "", to_markdown(disp), ""]
        ctx.parts["tex_fr"].append(to_latex(disp, f"{metric} at fractions of the budget ({w}); mean ± sd over seeds",
                                            f"tab:fractions:{safe_filename(w)}:{safe_filename(metric)}"))
        sec += [f"### {metric} at fractions of the budget (mean ± sd over seeds)", "",
                "Linear interpolation between evaluations; 'no eval yet': before the first evaluation; "
                "'not all seeds': past the last evaluation that every seed reached.",
                "", to_markdown(disp), ""]
    stem = figure_curves(ctx.evals, w, metric, target, ctx.order, ctx.fig_dir,
                         f"F*: baseline at {100 * ctx.headline:g}% of the budget", look=look_for(
                             ctx.info, ctx.runs, ctx.baseline), budget=budget,
                         confidence=ctx.stats_kw["confidence"], title=runs_workload_words(ctx.runs, w))
    if stem:
        sec += [CURVES_CAPTION, "", f"![{metric} vs iterations]({_fig(stem)}.png) ([PDF]({_fig(stem)}.pdf))", ""]
    return sec


def _final_metric_section(ctx: _Report, w: str, w_evals: pd.DataFrame, budget: int, metric: str) -> list[str]:
    """A metric measured once, at the end of the budget (final_num_images): no curve to cross, so no
    speed-up; the final values and their paired differences from the baseline."""
    if not ctx.baseline:
        return []
    main = [label for label in ctx.order if label not in ctx.sweep or label == ctx.baseline]
    rows = speedup_rows(w_evals, ctx.baseline, main, budget, metric, **ctx.stats_kw)
    if not rows:
        return []
    disp = speedup_display(rows, [], final_values(w_evals, metric, budget), with_equiv=False)
    ctx.parts["md_sp"] += [f"### {w} / {metric} (end of the budget)", "", to_markdown(disp), ""]
    ctx.parts["tex_sp"].append(latex_speedup(rows, metric=metric, workload=runs_workload_words(ctx.runs, w),
        look=look_for(ctx.info, ctx.runs, ctx.baseline), confidence=ctx.stats_kw["confidence"],
        label=f"tab:final:{safe_filename(w)}:{safe_filename(metric)}", with_speedup=False))
    better = "negative" if lower_is_better(metric) else "positive"
    return [f"### {metric}: the end of the budget", "",
            f"Measured once, after the last iteration, with more images than the curve's points "
            f"(final_num_images), so it has no speed-up. 'final - baseline' is the paired difference from "
            f"seed k of `{ctx.baseline}` ({better} is better) with its {100 * ctx.stats_kw['confidence']:g}% "
            "t-interval over the seeds.", "", to_markdown(disp), ""]


def _figure_section(ctx: _Report, w: str, w_runs: list[dict]) -> list[str]:
    """The training figures of the slots the workload's methods use (bench/report/figures.py)."""
    return training_figure_lines(w_runs, w, ctx.order, ctx.fig_dir, look_for(ctx.info, ctx.runs, ctx.baseline))


def _write_parts(ctx: _Report) -> None:
    """The speed-up, fractions and training tables gathered over the workloads."""
    p, tab = ctx.parts, ctx.tab_dir
    sp = pd.concat(p["sp"], ignore_index=True) if p["sp"] else pd.DataFrame()
    _write_text(tab / "speedup.csv", sp.to_csv(index=False))
    _write_text(tab / "training.csv", pd.concat(p["facts"], ignore_index=True).to_csv(index=False) if p["facts"] else "")
    _write_text(tab / "speedup.md", "\n".join(p["md_sp"]) or "_(no speed-up: no baseline or no evaluations)_\n")
    _write_text(tab / "fractions.md", "\n".join(p["md_fr"]) or "_(no evaluations)_\n")
    _write_text(tab / "speedup.tex", "\n".join(p["tex_sp"]))
    _write_text(tab / "fractions.tex", "\n".join(p["tex_fr"]))


def _scores_section(ctx: _Report) -> list[str]:
    """One score per method across the workloads, when there are several (bench/report/scores.py)."""
    sp = pd.concat(ctx.parts["sp"], ignore_index=True) if ctx.parts["sp"] else pd.DataFrame()
    if sp.empty or sp.workload.nunique() < 2 or not ctx.primary:
        return []
    return scores_lines(sp, ctx.primary, ctx.tab_dir, ctx.fig_dir)


def _header_lines(ctx: _Report) -> list[str]:
    """Title, what the numbers are (protocol, training, machines) and the methods."""
    runs, info = ctx.runs, ctx.info
    failed = [r for r in runs if r["status"].get("state") == "failed"]
    done = [r for r in runs if r["status"].get("state") == "done"]
    unfinished = [r for r in runs if r["status"].get("state") not in ("done", "failed")]
    lines = [f"# Suite `{info.get('name') or ctx.suite_dir.name}`: report", ""]
    if info.get("description"):
        lines += [info["description"].strip(), ""]
    lines += [f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} from the results folder `{ctx.suite_dir.name}`"
              + (f" (suite file `{_short_path(info['file'])}`)" if info.get("file") else "") + ".", "",
              f"Runs: {len(runs)} found; {len(done)} done, {len(failed)} failed, "
              f"{len(unfinished)} unfinished." + (" Tables use every evaluation recorded so far; a method's "
                                                  "seed-mean curve stops where one of its seeds stops."
                                                  if failed or unfinished else "")
              + (f" **{len(ctx.outside)} run folder(s) outside the suite's grid are left out** of every table, "
                 "figure and Holm family (listed under \"Runs outside the grid\")." if ctx.outside else ""), "",
              "## What the numbers are", ""]
    lines += protocol_lines(ctx.evals)
    training = training_lines(runs, ctx.sweep)
    tuned = bool(info.get("lr_chosen"))  # the headline phase of a [tune] suite: lr is per method
    lines += ["", "Training (identical for every method of a workload" + (" but its learning rate, which the tuning "
              "chose" if tuned else "") + "; the method changes only its slots):", ""]
    lines += training
    lines += ["", "Machines:", ""] + machine_lines(runs) + runtime_lines(runs)
    lines += ["", "## Methods", "", "Every method label with its resolved hyperparameters (a label encodes the "
              "non-default ones):", "", to_markdown(method_table(runs)), ""]
    return lines


def _footer_lines(ctx: _Report) -> list[str]:
    """Failed and unfinished runs, and the files beside report.md."""
    failed = [r for r in ctx.runs if r["status"].get("state") == "failed"]
    unfinished = [r for r in ctx.runs if r["status"].get("state") not in ("done", "failed")]
    lines = ["## Failed runs", ""]
    if failed:
        lines += [to_markdown(pd.DataFrame([{"run": f"{r['workload']}/{r['label']}/seed{r['seed']}",
                                             "step": r["status"].get("step"), "reason": r["status"].get("reason")}
                                            for r in failed])), ""]
    else:
        lines += ["None.", ""]
    if unfinished:
        lines += ["## Unfinished runs", "", to_markdown(pd.DataFrame([{
            "run": f"{r['workload']}/{r['label']}/seed{r['seed']}", "state": r["status"].get("state"),
            "step": r["status"].get("step")} for r in unfinished])), ""]
    if ctx.outside:  # a suite that dropped a method or seed, or changed a workload, since they ran
        lines += ["## Runs outside the grid", "", "In the results folder but not in the suite's grid (suite.json, "
                  "written by `run`): left out; delete them, or put them back in the suite, to end this list.", "",
                  to_markdown(pd.DataFrame([{"run": f"{r['workload']}/{r['label']}/seed{r['seed']}",
                                             "state": r["status"].get("state")} for r in ctx.outside])), ""]
    return lines + ["## Files", "",
                    "- [tables/evaluations.csv](tables/evaluations.csv): every evaluation, one tidy row per run, step "
                    "and metric",
                    "- [tables/curves.csv](tables/curves.csv): seed-mean and sd curves",
                    "- speed-up: [CSV](tables/speedup.csv), [Markdown](tables/speedup.md), [LaTeX](tables/speedup.tex)",
                    "- metric at fractions of the budget: [CSV](tables/fractions.csv), [Markdown](tables/fractions.md), "
                    "[LaTeX](tables/fractions.tex)",
                    "- [figures/](figures/): PNG and PDF of every figure", ""]


def _baseline_extend(ctx: _Report, w: str, budget: int) -> float:
    """How far the baseline's runs of workload `w` were trained, in budgets (1: not extended)."""
    its = [r["config"].get("iters") or 0 for r in ctx.runs if r["workload"] == w and r["label"] == ctx.baseline]
    return max(1.0, max(its) / budget) if its and budget else 1.0


def _baseline_slots(ctx: _Report, w: str) -> list[str]:
    cfg = next((r["config"] for r in ctx.runs if r["workload"] == w and r["label"] == ctx.baseline), {})
    return [s for s in cfg.get("method_slots") or [] if s != "streams"]


def _noise_section(ctx: _Report, w_evals: pd.DataFrame, metric: str, budget: int, labels: list[str]) -> list[str]:
    """The metric's noise at the budget, and the final differences under the second sampler."""
    summary, table = metric_noise(w_evals, metric, ctx.baseline, budget, labels)
    sec = ["#### The metric's own noise", ""] + noise_lines(summary, table, metric) + [""]
    if not table.empty:
        sec += [to_markdown(table.round(3)), ""]
    robust = sampler_robustness(w_evals, metric, ctx.baseline, budget, labels, ctx.stats_kw["confidence"])
    if not robust.empty:
        flips = list(robust[robust.sign == "changes"].method)
        noise = list(robust[robust.sign.str.startswith("changes (")].method)
        sec += ["#### Sampler robustness", "",
                "The final checkpoints evaluated with a second sampler (one noise set): the paired final differences "
                "under both. " + (f"**The sign changes for {', '.join(flips)}**: their ranking against the baseline "
                                  "depends on the sampler." if flips else
                                  "No method's difference that an interval separates from 0 changes sign.")
                + (f" ({', '.join(noise)}: the sign changes between two differences whose intervals both contain 0.)"
                   if noise else ""), "", to_markdown(robust), ""]
    return sec


def _sweep_section(evals, baseline, sweep, metric, budget, order, kw, headline) -> list[str]:
    """The baseline at each learning rate of [grid] lr_sweep, and the methods against the best one."""
    if not sweep or metric != evals.metric.iloc[0] and metric not in set(evals.metric):
        return []
    finals = final_values(evals, metric, budget)
    g = evals[(evals.metric == metric) & (evals.step <= budget)]
    means = {lab: g[g.method_label == lab].sort_values("step").groupby("seed").value.last().mean() for lab in sweep}
    means = {k: v for k, v in means.items() if np.isfinite(v)}
    if not means:
        return []
    pick = min if lower_is_better(metric) else max
    best = pick(means, key=means.get)
    table = pd.DataFrame([{"baseline run": lab, "lr": f"{lr:g}", "final (mean ± sd)": finals.get(lab, "-"),
                           "best": "yes" if lab == best else ""} for lab, lr in sweep.items()])
    out = [f"#### Learning-rate sweep of `{baseline}` ({metric})", "", to_markdown(table), "",
           "The best learning rate is picked on the same seeds it is then compared on, which flatters the "
           "tuned baseline a little (a fair tuning would use seeds of its own).", ""]
    if best == baseline:
        return out + ["The shared learning rate is the best of the sweep: the table above is already against "
                      "the best-tuned baseline.", ""]
    main = [lab for lab in order if lab not in sweep or lab == best]
    rows = speedup_rows(evals, best, main, budget, metric, **{**kw, "targets": [headline]})
    disp = speedup_display(rows, [headline], finals)
    return out + [f"Against the best-tuned baseline `{best}` (every other method keeps the shared learning rate):",
                  "", to_markdown(disp), ""]

def _short_path(path: str) -> str:
    """A suite file's path as a committed report may show it: suites/<name>.toml for a shipped
    suite, else the file's name (never a machine's absolute folder)."""
    p = Path(path)
    return f"{p.parent.name}/{p.name}" if p.parent.name == "suites" else p.name


def _fig(stem: str) -> str:
    return f"figures/{stem}"

def _write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())
