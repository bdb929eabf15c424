"""The report of a suite's results: tables (CSV, Markdown, LaTeX), figures (PNG, PDF), report.md.

``build_report(results/<suite>)`` reads every run folder (config.json, status.json, evals.jsonl,
steps.jsonl, method_trace.json, machine.json) and the suite's suite.json, and writes into
``results/<suite>/``:

- report.md                       all of the below, with what every number is (metric, feature
                                  extractor, N, sampler), every method label's hyperparameters,
                                  the machines the runs ran on, and the failed runs
- tables/evaluations.csv          every evaluation, one tidy row per (run, step, metric)
- tables/speedup.{csv,md,tex}     paired speed-up of every method over the baseline (bench.speedup) at
                                  each target fraction, per workload and metric, with its interval,
                                  the paired final-metric difference and the A/A control row
- tables/training.csv             per method: mean learning-rate factor and share of clipped steps
- tables/fractions.{csv,md,tex}   each metric at fixed fractions of the budget, mean and std
- tables/curves.csv               the seed-mean and std curve of every method
- figures/*.{png,pdf}             metric vs iterations with seed bands, timestep distribution over
                                  training, beta1 and lr over training, loss per timestep quartile

Reads files only: never imports torch (the report can be built on a laptop).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bench.io import atomic_write, atomic_write_bytes, iter_jsonl, read_jsonl
from bench.report_stats import (
    AA_LABEL,
    final_values,
    limits_lines,
    speedup_display,
    speedup_frame,
    speedup_rows,
    training_display,
    training_facts,
)
from bench.speedup import complete_points, lower_is_better, values_at_fractions

SKIP_DIRS = {"report", "_submitit", "figures", "tables"}
N_BINS = 100  # steps.jsonl is summarised in this many bins of the budget for the figures


# ----------------------------------------------------------------------------------------------
# Reading the results.


def _read_json(path: Path):
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def find_runs(suite_dir: Path) -> list[dict]:
    """Every run folder <workload>/<label>/seed<k> with what it holds."""
    suite_dir = Path(suite_dir)
    runs = []
    for run_dir in sorted(suite_dir.glob("*/*/seed*")):
        if not run_dir.is_dir() or run_dir.parts[-3] in SKIP_DIRS:
            continue
        config = _read_json(run_dir / "config.json")
        status = _read_json(run_dir / "status.json")
        if config is None and status is None:
            continue
        config = config or {}
        try:
            seed = int(run_dir.name.removeprefix("seed"))
        except ValueError:
            continue
        runs.append({
            "workload": run_dir.parts[-3], "label": run_dir.parts[-2], "seed": seed, "dir": run_dir,
            "config": config, "status": status or {"state": "unknown"},
            "machine": _read_json(run_dir / "machine.json"),
        })
    return runs


def evaluations_table(suite_dir: Path, runs: list[dict] | None = None) -> pd.DataFrame:
    """One tidy row per evaluation: run identity, step, images seen, metric, value, protocol."""
    runs = find_runs(suite_dir) if runs is None else runs
    rows = []
    for r in runs:
        cfg = r["config"]
        iters, batch = cfg.get("iters"), cfg.get("batch_size")
        for e in read_jsonl(r["dir"] / "evals.jsonl"):
            step = e.get("step")
            rows.append({
                "workload": r["workload"], "method_label": r["label"], "method": cfg.get("method", r["label"]),
                "seed": r["seed"], "dataset": cfg.get("dataset"), "resolution": cfg.get("resolution"),
                "arch": cfg.get("arch"), "iters": iters, "batch_size": batch, "step": step,
                "images_seen": step * batch if step is not None and batch else None,
                "fraction": step / iters if step is not None and iters else None,
                **{k: v for k, v in e.items() if k != "step"},
            })
    cols = ["workload", "method_label", "method", "seed", "dataset", "resolution", "arch", "iters", "batch_size",
            "step", "images_seen", "fraction", "metric", "value"]
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=cols)
    df["value"] = pd.to_numeric(df["value"], errors="coerce")
    rest = [c for c in df.columns if c not in cols]
    return df[[c for c in cols if c in df.columns] + rest].sort_values(
        ["workload", "metric", "method_label", "seed", "step"], kind="stable").reset_index(drop=True)


def binned_steps(path: Path, iters: int, n_bins: int = N_BINS) -> pd.DataFrame:
    """steps.jsonl summarised in one pass (constant memory): per bin of the budget, the mean loss
    and MSE per timestep quartile, and the last lr and beta1."""
    width = max(1, math.ceil(iters / n_bins))
    keys = ("loss", "loss_q0", "loss_q1", "loss_q2", "loss_q3")
    sums: dict[int, dict] = {}
    for row in iter_jsonl(path):
        step = row.get("step")
        if not isinstance(step, (int, float)):
            continue
        b = int((step - 1) // width)
        acc = sums.setdefault(b, {"n": {k: 0 for k in keys}, "s": {k: 0.0 for k in keys}})
        for k in keys:
            v = row.get(k)
            if isinstance(v, (int, float)) and math.isfinite(v):
                acc["n"][k] += 1
                acc["s"][k] += v
        acc["step"] = step
        for k in ("lr", "beta1"):
            if isinstance(row.get(k), (int, float)):
                acc[k] = row[k]
    out = []
    for b in sorted(sums):
        acc = sums[b]
        out.append({"bin": b, "step": acc["step"], "lr": acc.get("lr"), "beta1": acc.get("beta1"),
                    **{k: acc["s"][k] / acc["n"][k] if acc["n"][k] else np.nan for k in keys}})
    return pd.DataFrame(out)


# ----------------------------------------------------------------------------------------------
# Tables.


def _curves(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """steps [P] and values [seeds, P] (NaN where a seed has no value) of one run group."""
    wide = df.pivot_table(index="seed", columns="step", values="value", aggfunc="last").sort_index(axis=1)
    return wide.columns.to_numpy(dtype=float), wide.to_numpy(dtype=float), list(wide.index)


def fractions_table(evals: pd.DataFrame, runs: list[dict], fractions) -> pd.DataFrame:
    rows = []
    if evals.empty:
        return pd.DataFrame(rows)
    budgets = _budgets(runs)
    for (workload, metric, label), g in evals.groupby(["workload", "metric", "method_label"], sort=True):
        steps, values, _ = _curves(g)
        budget = budgets.get(workload) or float(np.nanmax(steps))
        for r in values_at_fractions(steps, values, budget, fractions):
            rows.append({"workload": workload, "metric": metric, "method_label": label, **r})
    return pd.DataFrame(rows)


def curves_table(evals: pd.DataFrame, runs: list[dict]) -> pd.DataFrame:
    """Seed-mean and std of every method's curve at the points where all its seeds have a value."""
    rows = []
    budgets = _budgets(runs)
    for (workload, metric, label), g in evals.groupby(["workload", "metric", "method_label"], sort=True):
        steps, values, seeds = _curves(g)
        steps, values = complete_points(steps, values, budgets.get(workload))
        for j, step in enumerate(steps):
            col = values[:, j]
            rows.append({"workload": workload, "metric": metric, "method_label": label, "step": int(step),
                         "mean": float(col.mean()), "std": float(col.std(ddof=1)) if len(col) > 1 else np.nan,
                         "n_seeds": len(col)})
    return pd.DataFrame(rows)


def _budgets(runs: list[dict]) -> dict[str, int]:
    out = {}
    for r in runs:
        it = r["config"].get("iters")
        if it:
            out[r["workload"]] = max(out.get(r["workload"], 0), int(it))
    return out


def _method_order(labels, baseline: str | None) -> list[str]:
    labels = sorted(labels)
    if baseline in labels:
        labels.remove(baseline)
        labels.insert(0, baseline)
    return labels


def _num(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{digits}g}"


def fractions_display(df: pd.DataFrame) -> pd.DataFrame:
    out = {}
    for _, r in df.iterrows():
        row = out.setdefault(r["method_label"], {"method": r["method_label"]})
        col = f"{100 * r['fraction']:g}% ({int(round(r['step']))} it)"
        if not np.isfinite(r["mean"]):
            row[col] = {"before first evaluation": "no eval yet"}.get(r.get("status"), "not all seeds")
        elif np.isfinite(r["std"]):
            row[col] = f"{r['mean']:.4g} ± {r['std']:.2g}"
        else:
            row[col] = f"{r['mean']:.4g}"
    return pd.DataFrame(list(out.values()))


def to_markdown(df: pd.DataFrame) -> str:
    if df.empty:
        return "_(no data)_"
    return df.to_markdown(index=False)


_LATEX_ESCAPE = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$"}


def latex_escape(text) -> str:
    return "".join(_LATEX_ESCAPE.get(c, c) for c in str(text))


def to_latex(df: pd.DataFrame, caption: str, label: str) -> str:
    """A booktabs table (no jinja2 needed)."""
    cols = list(df.columns)
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{latex_escape(caption)}}}",
             rf"\label{{{label}}}", r"\begin{tabular}{l" + "r" * (len(cols) - 1) + "}", r"\toprule",
             " & ".join(latex_escape(c) for c in cols) + r" \\", r"\midrule"]
    for _, row in df.iterrows():
        lines.append(" & ".join(latex_escape(v) for v in row.tolist()) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Figures.


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")
    return plt, sns


def _save(fig, fig_dir: Path, stem: str) -> str:
    fig_dir.mkdir(parents=True, exist_ok=True)
    for ext in ("png", "pdf"):
        atomic_write(fig_dir / f"{stem}.{ext}", lambda f, ext=ext: fig.savefig(f, dpi=150, bbox_inches="tight", format=ext))
    import matplotlib.pyplot as plt

    plt.close(fig)
    return stem


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def figure_curves(evals: pd.DataFrame, workload: str, metric: str, target: float | None, order: list[str],
                  fig_dir: Path, target_label: str = "F* (headline target)") -> str | None:
    plt, sns = _plt()
    g = evals[(evals.workload == workload) & (evals.metric == metric)].dropna(subset=["value"])
    if g.empty:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4), layout="constrained")
    sns.lineplot(data=g, x="step", y="value", hue="method_label", hue_order=[m for m in order if m in set(
        g.method_label)], errorbar="sd", marker="o", ax=ax)
    if target is not None and np.isfinite(target):
        ax.axhline(target, color="grey", ls="--", lw=1, label=target_label)
    ax.set_xlabel("iterations")
    ax.set_ylabel(f"{metric} (mean ± sd over seeds)")
    ax.set_title(f"{workload}: {metric}")
    ax.legend(fontsize=7)
    return _save(fig, fig_dir, f"curves_{_safe(workload)}_{_safe(metric)}")


def figure_timesteps(traces: dict[str, dict], workload: str, fig_dir: Path) -> str | None:
    plt, _ = _plt()
    traces = {k: v for k, v in traces.items() if v and v.get("timestep_probs")}
    if not traces:
        return None
    n = len(traces)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.6 * rows), squeeze=False, sharex=True,
                             layout="constrained")
    cmap = plt.get_cmap("viridis")
    for ax, (label, tr) in zip(axes.flat, traces.items()):
        ps = tr.get("progress") or [i / max(1, len(tr["timestep_probs"]) - 1) for i in range(len(tr["timestep_probs"]))]
        for p, probs in zip(ps, tr["timestep_probs"]):
            ax.plot(np.arange(len(probs)), probs, color=cmap(p), lw=1)
        ax.set_ylim(0, 1.1 * max(max(probs) for probs in tr["timestep_probs"]))
        ax.set_title(label, fontsize=8)
        ax.set_xlabel("timestep t")
        ax.set_ylabel("p(t)")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, 1))
    fig.colorbar(sm, ax=axes, label="training progress p", shrink=0.8)
    fig.suptitle(f"{workload}: timestep distribution over training")
    return _save(fig, fig_dir, f"timesteps_{_safe(workload)}")


def figure_optimizer(binned: pd.DataFrame, workload: str, order: list[str], fig_dir: Path) -> str | None:
    plt, sns = _plt()
    if binned.empty or "beta1" not in binned:
        return None
    first_seed = binned[binned.seed == binned.groupby("method_label").seed.transform("min")]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), layout="constrained")
    hue_order = [m for m in order if m in set(first_seed.method_label)]
    sns.lineplot(data=first_seed, x="step", y="beta1", hue="method_label", hue_order=hue_order, ax=axes[0])
    sns.lineplot(data=first_seed, x="step", y="lr", hue="method_label", hue_order=hue_order, ax=axes[1],
                 legend=False)
    axes[0].set_title("Adam beta1")
    axes[1].set_title("learning rate (with warmup and compensation)")
    for ax in axes:
        ax.set_xlabel("iterations")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{workload}: optimizer over training (MDLRC's schedule; first seed)")
    return _save(fig, fig_dir, f"optimizer_{_safe(workload)}")


QUARTILE_TITLES = {"loss_q0": "t in [0, T/4): least noisy", "loss_q1": "t in [T/4, T/2)",
                   "loss_q2": "t in [T/2, 3T/4)", "loss_q3": "t in [3T/4, T): most noisy"}


def figure_loss_quartiles(binned: pd.DataFrame, workload: str, order: list[str], fig_dir: Path) -> str | None:
    plt, sns = _plt()
    qs = [q for q in QUARTILE_TITLES if q in binned]
    if binned.empty or not qs or binned[qs].isna().all().all():
        return None
    fig, axes = plt.subplots(1, len(qs), figsize=(3.2 * len(qs), 3.2), squeeze=False, layout="constrained")
    hue_order = [m for m in order if m in set(binned.method_label)]
    legend_done = False
    for ax, q in zip(axes.flat, qs):
        data = binned.dropna(subset=[q])
        ax.set_title(QUARTILE_TITLES[q], fontsize=8)
        ax.set_xlabel("iterations")
        ax.set_ylabel("unweighted MSE")
        if data.empty:
            ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
            continue
        sns.lineplot(data=data, x="step", y=q, hue="method_label", hue_order=hue_order, errorbar="sd", ax=ax,
                     legend=not legend_done)
        lo, hi = data[q].min(), data[q].max()
        if lo > 0 and hi / lo > 10:
            ax.set_yscale("log")
        if not legend_done and ax.get_legend():
            ax.legend(fontsize=6)
        legend_done = True
    fig.suptitle(f"{workload}: training MSE per timestep quartile (bin means; band: sd over seeds)")
    return _save(fig, fig_dir, f"loss_quartiles_{_safe(workload)}")


# ----------------------------------------------------------------------------------------------
# report.md


def _machine_lines(runs: list[dict]) -> list[str]:
    groups: dict[str, int] = {}
    for r in runs:
        m = r.get("machine")
        if not m:
            continue
        desc = f"{m.get('platform')}, {m.get('processor')}, {m.get('cpu_count')} CPUs"
        if m.get("gpus"):
            desc += ", GPU: " + ", ".join(m["gpus"])
        if m.get("torch"):
            desc += f", torch {m['torch']} ({m.get('torch_threads')} threads)"
        groups[desc] = groups.get(desc, 0) + 1
    lines = [f"- runs ran on: {desc} ({n} run{'s' if n != 1 else ''})" for desc, n in groups.items()]
    if not lines:
        lines = ["- runs ran on: not recorded (no machine.json in the run folders)"]
    lines.append(f"- this report was built on: {platform.platform()}, {platform.processor() or platform.machine()}, "
                 f"{os.cpu_count()} CPUs, Python {platform.python_version()}")
    return lines


def _protocol_lines(evals: pd.DataFrame) -> list[str]:
    """What every metric is: feature extractor (and its weights' hash), N generated and reference
    images, the reference split, the sampler, and when it was evaluated."""
    lines = []
    if evals.empty:
        return ["- no evaluations recorded yet"]
    cols = [c for c in ("feature_extractor", "weights_sha1", "weights_sha256", "weights_shipped", "num_gen", "num_ref",
                        "ref_split", "sampler", "sampler_steps", "timestep_spacing", "eta", "noise_seed") if c in evals]
    for metric, g in evals.groupby("metric", sort=True):
        combos = g[cols].drop_duplicates() if cols else pd.DataFrame([{}])
        for _, c in combos.iterrows():
            d = {k: (None if (isinstance(v, float) and not math.isfinite(v)) else v) for k, v in c.to_dict().items()}

            def show(key, default="?"):
                v = d.get(key)
                if v is None:
                    return default
                return str(int(v)) if isinstance(v, float) and v.is_integer() and key != "eta" else str(v)

            features = show("feature_extractor")
            if d.get("weights_sha256"):
                where = {True: "shipped in bench/proxy_weights", False: "trained on this machine"}.get(
                    d.get("weights_shipped"), "")
                features += f" (weights sha256 {str(d['weights_sha256'])[:16]}{', ' + where if where else ''})"
            elif d.get("weights_sha1"):
                features += f" (weights sha1 {str(d['weights_sha1'])[:12]})"
            sampler = f"sampler {show('sampler')} with {show('sampler_steps')} steps"
            if d.get("timestep_spacing"):
                sampler += f" ({show('timestep_spacing')} spacing)"
            if d.get("eta") is not None:
                sampler += f", eta {show('eta')}"
            if d.get("noise_seed") is not None:
                sampler += f", fixed noise (seed {show('noise_seed')})"
            lines.append(
                f"- **{metric}** ({'lower' if lower_is_better(metric) else 'higher'} is better): features "
                f"{features}; N = {show('num_gen')} generated images (EMA weights) against {show('num_ref')} "
                f"reference images of the {show('ref_split')} split; {sampler}")
        steps = sorted(int(s) for s in g.step.dropna().unique())
        shown = ", ".join(map(str, steps[:12])) + (", ..." if len(steps) > 12 else "")
        lines.append(f"  evaluated at iterations {shown}")
    return lines


def _method_table(runs: list[dict]) -> pd.DataFrame:
    seen = {}
    for r in runs:
        cfg = r["config"]
        if r["label"] in seen or not cfg:
            continue
        params = cfg.get("method_resolved_params") or cfg.get("method_params") or {}
        seen[r["label"]] = {
            "label": r["label"], "method": cfg.get("method", ""),
            "slots": ", ".join(cfg.get("method_slots") or []) or "-",
            "hyperparameters": ", ".join(f"{k}={v}" for k, v in sorted(params.items())) or "-",
            "source": cfg.get("method_source", ""),
        }
    return pd.DataFrame(list(seen.values()))


COMMON_KEYS = ("lr", "warmup", "grad_clip", "weight_decay", "beta1", "beta2", "ema_decay", "ema_warmup", "schedule", "T",
               "target", "zero_terminal_snr", "flip", "eval_every")


def _training_lines(runs: list[dict]) -> list[str]:
    lines = []
    by_workload: dict[str, dict] = {}
    for r in runs:
        if r["config"]:
            by_workload.setdefault(r["workload"], r["config"])
    for w, cfg in sorted(by_workload.items()):
        images = (cfg.get("iters") or 0) * (cfg.get("batch_size") or 0)
        settings = ", ".join(f"{k} {cfg[k]}" for k in COMMON_KEYS if k in cfg)
        lines.append(f"- **{w}**: dataset {cfg.get('dataset')} at resolution {cfg.get('resolution') or 'native'}, "
                     f"architecture {cfg.get('arch')}; budget {cfg.get('iters')} iterations x batch "
                     f"{cfg.get('batch_size')} = {images:,} images for every method; {settings}")
    return lines


def build_report(suite_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path:
    """Write tables, figures and report.md for results/<suite>; return the path of report.md."""
    suite_dir = Path(suite_dir)
    if not suite_dir.is_dir():
        from bench.errors import ConfigError

        raise ConfigError(f"no results folder {suite_dir}; run the suite first")
    out = Path(out_dir) if out_dir else suite_dir
    fig_dir = out / "figures"
    tab_dir = out / "tables"
    tab_dir.mkdir(parents=True, exist_ok=True)
    info = _read_json(suite_dir / "suite.json") or {}
    rep = info.get("report") or {}
    runs = find_runs(suite_dir)
    evals = evaluations_table(suite_dir, runs)
    labels = sorted({r["label"] for r in runs})
    baseline = rep.get("baseline", "baseline" if "baseline" in labels else None)
    if baseline not in labels:
        baseline = None
    fractions = rep.get("fractions") or [0.25, 0.5, 0.75, 1.0]
    primary = rep.get("metric") or (sorted(evals.metric.unique())[0] if not evals.empty else None)
    metrics = sorted(evals.metric.unique(), key=lambda m: (m != primary, m)) if not evals.empty else []
    order = _method_order(labels, baseline)

    sweep = info.get("lr_sweep") or {}
    targets = [float(f) for f in rep.get("targets") or [0.5, 0.75, 1.0]]
    headline = float(rep.get("headline", 0.75 if 0.75 in targets else targets[-1]))
    stats_kw = dict(targets=targets, confidence=float(rep.get("confidence", 0.95)),
                    n_boot=int(rep.get("bootstrap", 2000)), seed=int(rep.get("seed", 0)))
    fr = fractions_table(evals, runs, fractions)
    cv = curves_table(evals, runs)
    _write_text(tab_dir / "evaluations.csv", evals.to_csv(index=False))
    _write_text(tab_dir / "fractions.csv", fr.to_csv(index=False))
    _write_text(tab_dir / "curves.csv", cv.to_csv(index=False))

    workloads = sorted({r["workload"] for r in runs})
    md_sp, tex_sp, md_fr, tex_fr, sp_frames, facts = [], [], [], [], [], []
    sections = []
    for w in workloads:
        sec = [f"## Workload {w}", ""]
        w_runs = [r for r in runs if r["workload"] == w]
        w_evals = evals[evals.workload == w] if not evals.empty else evals
        budget = max((r["config"].get("iters") or 0) for r in w_runs)
        for metric in metrics:
            tag = f"{w} / {metric}"
            target = None
            if baseline:
                main = [label for label in order if label not in sweep or label == baseline]
                rows = speedup_rows(w_evals, baseline, main, budget, metric, **stats_kw)
                if rows:
                    sp_frames.append(speedup_frame(rows, targets).assign(workload=w, metric=metric,
                                                                         baseline=baseline, budget_iters=budget))
                    target = rows[0][f"speedup@{headline:g}"].target
                    disp = speedup_display(rows, targets, headline, final_values(w_evals, metric, budget))
                    md_sp += [f"### {tag}", "", to_markdown(disp), ""]
                    tex_sp.append(to_latex(disp, f"Paired speed-up over {baseline} ({metric}, {w})",
                                           f"tab:speedup:{_safe(w)}:{_safe(metric)}"))
                    sec += _speedup_text(rows, baseline, metric, budget, targets, headline, stats_kw)
                    sec += [to_markdown(disp), ""]
                    sec += _sweep_section(w_evals, baseline, sweep, metric, budget, order, stats_kw, headline)
            fsub = fr[(fr.workload == w) & (fr.metric == metric)] if not fr.empty else pd.DataFrame()
            if not fsub.empty:
                disp = fractions_display(fsub)
                md_fr += [f"### {tag}", "", to_markdown(disp), ""]
                tex_fr.append(to_latex(disp, f"{metric} at fractions of the budget ({w}); mean ± sd over seeds",
                                       f"tab:fractions:{_safe(w)}:{_safe(metric)}"))
                sec += [f"### {metric} at fractions of the budget (mean ± sd over seeds)", "",
                        "Linear interpolation between evaluations; 'no eval yet': before the first evaluation; "
                        "'not all seeds': past the last evaluation that every seed reached.",
                        "", to_markdown(disp), ""]
            stem = figure_curves(evals, w, metric, target, order, fig_dir,
                                 f"F*: baseline at {100 * headline:g}% of the budget (headline target)")
            if stem:
                sec += [f"![{metric} vs iterations]({_fig(stem)}.png) ([PDF]({_fig(stem)}.pdf))", ""]
        traces = {}
        for r in sorted(w_runs, key=lambda r: r["seed"]):
            if r["label"] not in traces:
                tr = _read_json(r["dir"] / "method_trace.json")
                if tr:
                    traces[r["label"]] = tr
        binned = []
        for r in w_runs:
            b = binned_steps(r["dir"] / "steps.jsonl", r["config"].get("iters") or 1)
            if not b.empty:
                binned.append(b.assign(method_label=r["label"], seed=r["seed"]))
        binned = pd.concat(binned, ignore_index=True) if binned else pd.DataFrame()
        figs = [("Timestep distribution over training (from method_trace.json; colour: progress p)",
                 figure_timesteps({k: traces[k] for k in order if k in traces}, w, fig_dir)),
                ("Adam beta1 and learning rate over training (MDLRC's schedule; from steps.jsonl)",
                 figure_optimizer(binned, w, order, fig_dir)),
                ("Training MSE per timestep quartile (from steps.jsonl)",
                 figure_loss_quartiles(binned, w, order, fig_dir))]
        for title, stem in figs:
            if stem:
                sec += [f"### {title}", "", f"![{title}]({_fig(stem)}.png) ([PDF]({_fig(stem)}.pdf))", ""]
        fact = training_facts(w_runs, order)
        facts.append(fact.assign(workload=w))
        sec += ["### What this report does not show", ""]
        sec += limits_lines(w_evals, w_runs, baseline, primary, budget, sweep) if primary else []
        sec += ["", "Learning-rate factor (the optimizer slot's scale of the shared learning rate, mean over all "
                "steps and seeds) and the share of steps whose gradient norm was clipped:", "",
                to_markdown(training_display(fact)), ""]
        sections += sec
    sp = pd.concat(sp_frames, ignore_index=True) if sp_frames else pd.DataFrame()
    _write_text(tab_dir / "speedup.csv", sp.to_csv(index=False))
    _write_text(tab_dir / "training.csv", pd.concat(facts, ignore_index=True).to_csv(index=False) if facts else "")

    _write_text(tab_dir / "speedup.md", "\n".join(md_sp) or "_(no speed-up: no baseline or no evaluations)_\n")
    _write_text(tab_dir / "fractions.md", "\n".join(md_fr) or "_(no evaluations)_\n")
    _write_text(tab_dir / "speedup.tex", "\n".join(tex_sp))
    _write_text(tab_dir / "fractions.tex", "\n".join(tex_fr))

    states = {}
    for r in runs:
        states.setdefault(r["status"].get("state", "unknown"), []).append(r)
    failed = states.get("failed", [])
    unfinished = [r for r in runs if r["status"].get("state") not in ("done", "failed")]
    name = info.get("name") or suite_dir.name
    lines = [f"# Suite `{name}`: report", ""]
    if info.get("description"):
        lines += [info["description"].strip(), ""]
    lines += [f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} from `{suite_dir}`"
              + (f" (suite file `{info['file']}`)" if info.get("file") else "") + ".", "",
              f"Runs: {len(runs)} found; {len(states.get('done', []))} done, {len(failed)} failed, "
              f"{len(unfinished)} unfinished." + (" Tables use every evaluation recorded so far; a method's "
                                                  "seed-mean curve stops where one of its seeds stops."
                                                  if failed or unfinished else ""), "",
              "## What the numbers are", ""]
    lines += _protocol_lines(evals)
    lines += ["", "Training (identical for every method of a workload; the method changes only its slots):", ""]
    lines += _training_lines(runs)
    lines += ["", "Machines:", ""] + _machine_lines(runs)
    lines += ["", "## Methods", "", "Every method label with its resolved hyperparameters (a label encodes the "
              "non-default ones):", "", to_markdown(_method_table(runs)), ""]
    lines += sections
    lines += ["## Failed runs", ""]
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
    lines += ["## Files", "",
              "- [tables/evaluations.csv](tables/evaluations.csv): every evaluation, one tidy row per run, step "
              "and metric",
              "- [tables/curves.csv](tables/curves.csv): seed-mean and sd curves",
              "- speed-up: [CSV](tables/speedup.csv), [Markdown](tables/speedup.md), [LaTeX](tables/speedup.tex)",
              "- metric at fractions of the budget: [CSV](tables/fractions.csv), [Markdown](tables/fractions.md), "
              "[LaTeX](tables/fractions.tex)",
              "- [figures/](figures/): PNG and PDF of every figure", ""]
    path = out / "report.md"
    _write_text(path, "\n".join(lines))
    return path


def _speedup_text(rows, baseline, metric, budget, targets, headline, kw) -> list[str]:
    """What the speed-up table's numbers are, with this suite's targets and seed counts."""
    n = rows[0]["n_paired"]
    f_stars = ", ".join(f"{_num(rows[0][f'speedup@{f:g}'].target)} at {100 * f:g}%" for f in targets)
    how = ("a t-interval on log speed-up (n - 1 degrees of freedom)" if 3 <= n < 6 else
           f"a paired bootstrap over seeds ({kw['n_boot']} resamples, RNG seed {kw['seed']})" if n >= 6 else
           "no interval: fewer than 3 paired seeds (\"too few seeds\")")
    better = "negative" if lower_is_better(metric) else "positive"
    aa = (" The A/A row compares the baseline's seed halves as if they were two methods: the spread noise "
          "alone gives (its pairs are different seeds, so it is wider than a paired method's)."
          if any(r["method_label"] == AA_LABEL for r in rows) else "")
    return [f"### Paired speed-up over `{baseline}` ({metric})", "",
            f"Seeds are paired: seed k of a method shares initialisation, data order, timestep draws' random "
            f"numbers and noise with seed k of `{baseline}`. Target F*(f) = `{baseline}`'s {metric} at fraction f "
            f"of the {budget}-iteration budget; each seed's target is its own baseline seed's value there, whose "
            f"seed mean is F* ({f_stars}). Per seed, speed-up = iterations the baseline seed needs / iterations "
            f"the method's seed needs to reach that target (interpolated between evaluations: linearly, or in "
            f"log-iterations on a geometric grid). The headline, fixed in the suite before the runs, is read at "
            f"F* = {100 * headline:g}% of the budget, where a method up to {1 / headline:.2f}x slower than the "
            f"baseline still gets a number: the geometric mean over {n} paired seeds with {how}, in brackets. "
            f"Bounds get no interval: '<= x', some seeds never reached the target and were counted at the "
            f"budget's end; '>= x', some were at the target by their first evaluation; '~x', both. At 100% a "
            f"seed that reaches its target is >= 1x by construction, so that column has no interval; read "
            f"the end of the budget from 'final - baseline': the paired difference of the final {metric} "
            f"({better} is better), mean [t-interval].{aa} Per-seed values are in tables/speedup.csv.", ""]


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
    disp = speedup_display(rows, [headline], headline, finals)
    return out + [f"Against the best-tuned baseline `{best}` (every other method keeps the shared learning rate):",
                  "", to_markdown(disp), ""]


def _fig(stem: str) -> str:
    return f"figures/{stem}"


def _write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())
