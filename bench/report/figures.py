"""The report's figures (PNG and PDF, written atomically), print-ready (bench/report/style.py: a colour
per method that the method list does not change, display names, column or full width, TrueType fonts):
the metric against log-iterations with the paired differences from the baseline, the timestep
distribution over training, beta1 and the learning rate, and the training loss over t. Files only, no torch.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from bench.fileio import atomic_write
from bench.report.curves import complete_points, values_at
from bench.report.intervals import t_interval_at
from bench.report.stats import pair_seeds, same_n, seed_curves
from bench.report.style import (
    COLUMN_IN,
    FONT_PT,
    FULL_IN,
    Look,
    figsize,
    is_control_label,
    metric_short,
    metric_words,
    rc_params,
    workload_words,
)
from bench.report.tables import binned_steps, read_json_or_none, run_budget
from bench.suite.schema import REPORT_DEFAULTS


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")
    matplotlib.rcParams.update(rc_params())  # after seaborn's theme, which resets sizes and fonts
    return plt, sns

def _save(fig, fig_dir: Path, stem: str, tight: bool = False) -> str:
    """PNG and PDF at the figure's own size (a column or the full width; `tight` only for image grids)."""
    fig_dir.mkdir(parents=True, exist_ok=True)
    for ext in ("png", "pdf"):
        # No creation date in a PDF: the same results give the same bytes, so a rerun shows no change.
        meta = {"CreationDate": None} if ext == "pdf" else None
        atomic_write(fig_dir / f"{stem}.{ext}", lambda f, ext=ext, meta=meta: fig.savefig(
            f, format=ext, metadata=meta, bbox_inches="tight" if tight else None))
    import matplotlib.pyplot as plt

    plt.close(fig)
    return stem

def safe_filename(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)

def _legend_below(fig, look: Look, labels: list[str], extra=()) -> None:
    """One legend for all panels, under them (never over a curve or the target line)."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], **{k: v for k, v in look.line(m).items() if k != "zorder"}) for m in labels]
    names = [look.name(m) for m in labels]
    for h, name in extra:
        handles.append(h)
        names.append(name)
    fig.legend(handles, names, loc="outside lower center", ncol=len(names) if len(names) <= 5 else
               math.ceil(len(names) / math.ceil(len(names) / 5)))

def _mark_budget(ax, budget: float | None) -> None:
    if budget:
        ax.axvline(budget, color="0.35", lw=0.7, ls=":", zorder=1)
        ax.annotate("budget", (budget, 1), xycoords=("data", "axes fraction"), xytext=(-2, -3),
                    textcoords="offset points", ha="right", va="top", rotation=90, color="0.35")

def plain_log(axis, lo: float, hi: float) -> None:
    """Plain numbers (100, 200, 400; not 2 x 10^2) on a log axis; some minor ticks labelled too when the
    axis spans less than a factor 20, where there would be one label or none otherwise."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    # 2, 3, 4, 5 x 10^k only: 600 700 800 would run into each other
    some = FuncFormatter(lambda v, _: f"{v:g}" if f"{v:e}"[0] in "2345" else "")
    axis.set_major_formatter(plain)
    axis.set_minor_formatter(some if hi / lo < 20 else NullFormatter())
    axis.set_tick_params(which="both", length=2.5, width=0.6, pad=2)  # minor labels in line with the majors

def _legend_order(look: Look, labels: list[str]) -> list[str]:
    """The baseline first, the controls last, the methods between them in the report's order."""
    ctrl = [m for m in labels if m != look.baseline and is_control_label(m, look.controls)]
    return [m for m in labels if m == look.baseline] + [m for m in labels if m != look.baseline and m not in ctrl] + ctrl

def paired_difference_curve(base: tuple, meth: tuple, budget: float | None, confidence: float):
    """Per evaluation step of the method within the budget and the baseline's curve: the mean of
    d_k = M_k - B_k over the paired seeds and its t-interval (NaN below 3 seeds), as the tables pair them."""
    bs, bv, ms, mv, _ = pair_seeds(base, meth)
    bs, bv = complete_points(bs, bv)
    ms, mv = complete_points(ms, mv, budget)
    rows = []
    for j, step in enumerate(ms):
        if bs.size == 0 or not bs[0] <= step <= bs[-1]:
            continue
        d = mv[:, j] - values_at(bs, bv, step)
        if d.size == 0:  # no seed in common
            break
        ci = t_interval_at(d, confidence) or (np.nan, np.nan)
        rows.append((step, float(d.mean()), *ci))
    return np.array(rows, dtype=float).reshape(-1, 4)

CURVES_CAPTION = ("Left: each method's mean over seeds against log-iterations, the budget marked (the baseline "
                  "goes on past it when extended). Right: each method's paired difference from the baseline, seed k "
                  "with seed k, with its 95% t-interval over seeds, as the tables pair them.")

def figure_curves(evals: pd.DataFrame, workload: str, metric: str, target: float | None, order: list[str],
                  fig_dir: Path, target_label: str = "F* (headline target)", *, look: Look | None = None,
                  budget: float | None = None, confidence: float = 0.95, title: str | None = None) -> str | None:
    """Left: each method's seed-mean curve on log-iterations, the budget marked. Right: the paired
    difference from the baseline with its t-interval over seeds (the tables' pairing)."""
    look = look or Look()
    plt, _ = _plt()
    g = same_n(evals[(evals.workload == workload) & (evals.metric == metric)].dropna(subset=["value"]))
    g = g[g.step > 0]  # a log axis
    if g.empty:
        return None
    shown = _legend_order(look, [m for m in order if m in set(g.method_label)])
    base = seed_curves(g[g.method_label == look.baseline]) if look.baseline in shown else None
    fig, axes = plt.subplots(1, 2 if base else 1, figsize=figsize("full" if base else "column", 2.9),
                             squeeze=False, layout="constrained")
    ax, dax = axes[0, 0], (axes[0, 1] if base else None)
    paired_points = 0
    for m in shown:
        steps, values, _ = seed_curves(g[g.method_label == m])
        steps, values = complete_points(steps, values)
        ax.plot(steps, values.mean(axis=0), **look.line(m))
        if dax is not None and m != look.baseline:
            d = paired_difference_curve(base, seed_curves(g[g.method_label == m]), budget, confidence)
            paired_points += len(d)
            kw = look.line(m)
            dax.plot(d[:, 0], d[:, 1], **kw)
            dax.fill_between(d[:, 0], d[:, 2], d[:, 3], color=kw["color"], alpha=0.15, lw=0)
    extra = []
    if target is not None and np.isfinite(target):
        h = ax.axhline(target, color="0.2", lw=0.8, ls=(0, (1, 1.5)), zorder=1)
        extra.append((h, target_label))
    ax.set_ylabel(metric_words(metric))
    look.title(ax, "mean over seeds")
    look.title(fig, f"{metric_words(metric)}, {title or workload_words(workload)}", FULL_IN if base else COLUMN_IN)
    if dax is not None:
        dax.axhline(0, color="black", lw=0.7, zorder=1)
        dax.set_ylabel(f"{metric_short(metric)}: method − {look.name(look.baseline)}")
        look.title(dax, f"paired difference, {100 * confidence:g}% interval over seeds")
    if dax is not None and not paired_points:
        dax.set_xlim(ax.get_xlim())  # no paired point to draw: an empty log axis cannot scale itself
    for a in axes.flat:
        a.set_xscale("log")
        a.set_xlabel("iterations (log scale)")
        _mark_budget(a, budget)
        plain_log(a.xaxis, *a.get_xlim())
    _legend_below(fig, look, shown, extra)
    return _save(fig, fig_dir, f"curves_{safe_filename(workload)}_{safe_filename(metric)}")

def figure_timesteps(traces: dict[str, dict], workload: str, fig_dir: Path, look: Look | None = None,
                     config: dict | None = None) -> str | None:
    """Each method's p(t) at the points of training its trace records, coloured by progress."""
    look = look or Look()
    plt, _ = _plt()
    traces = {k: v for k, v in traces.items() if v and v.get("timestep_probs")}
    if not traces:
        return None
    n = len(traces)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=figsize("full" if n > 1 else "column", 0.3 + 1.5 * rows),
                             squeeze=False, layout="constrained")
    cmap = plt.get_cmap("viridis")
    for ax, (label, tr) in zip(axes.flat, traces.items()):
        probs_all = tr["timestep_probs"]
        ps = tr.get("progress") or [i / max(1, len(probs_all) - 1) for i in range(len(probs_all))]
        for p, probs in zip(ps, probs_all):
            ax.plot(np.arange(len(probs)) / len(probs), probs, color=cmap(p), lw=0.9)
        ax.set_ylim(0, 1.1 * max(max(probs) for probs in probs_all))
        ax.set_title(look.name(label), fontsize=FONT_PT)
        ax.set_xlim(0, 1)
        ax.set_xticks([0, 0.5, 1])
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.supxlabel("t / T (1: pure noise)", fontsize=FONT_PT)
    fig.supylabel("p(t)", fontsize=FONT_PT)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, 1))
    fig.colorbar(sm, ax=axes, label="training progress", shrink=0.8)
    look.title(fig, f"Timestep distribution over training, {workload_words(workload, config)}",
               FULL_IN if n > 1 else COLUMN_IN)
    return _save(fig, fig_dir, f"timesteps_{safe_filename(workload)}")

def figure_optimizer(binned: pd.DataFrame, workload: str, order: list[str], fig_dir: Path,
                     look: Look | None = None, config: dict | None = None) -> str | None:
    """Adam's beta1 and the learning rate over training, first seed of each method."""
    look = look or Look()
    plt, _ = _plt()
    if binned.empty or "beta1" not in binned:
        return None
    first_seed = binned[binned.seed == binned.groupby("method_label").seed.transform("min")]
    shown = _legend_order(look, [m for m in order if m in set(first_seed.method_label)])
    fig, axes = plt.subplots(1, 2, figsize=figsize("full", 2.5), squeeze=False, layout="constrained")
    for m in shown:
        sub = first_seed[first_seed.method_label == m].sort_values("step")
        kw = {**look.line(m), "marker": None}
        axes[0, 0].plot(sub.step, sub.beta1, **kw)
        axes[0, 1].plot(sub.step, sub.lr, **kw)
    axes[0, 0].set_ylabel("Adam β₁")
    axes[0, 1].set_ylabel("learning rate")
    for ax in axes.flat:
        ax.set_xlabel("iterations")
    _legend_below(fig, look, shown)
    look.title(fig, f"Optimizer over training (first seed), {workload_words(workload, config)}")
    return _save(fig, fig_dir, f"optimizer_{safe_filename(workload)}")

#: the training log's equal-width bins of t (bench/train/loop.py: loss_q<k> for t * 4 // T = k)
T_BINS = 4
LOSS_WINDOWS = ((0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0))  # parts of the budget, one panel each

def bin_positions(trace: dict | None, lo: float, hi: float) -> np.ndarray:
    """Where each t bin's mean loss sits on t / T: the mean t of the samples it averages, under the
    method's own p(t) in the window of progress [lo, hi] (the bin's centre without a trace)."""
    centres = (np.arange(T_BINS) + 0.5) / T_BINS
    if not trace or not trace.get("timestep_probs"):
        return centres
    probs = np.asarray(trace["timestep_probs"], dtype=float)
    prog = np.asarray(trace.get("progress") or np.linspace(0, 1, len(probs)), dtype=float)
    sel = (prog >= lo) & (prog <= hi)
    p = probs[sel].mean(axis=0) if sel.any() else probs[np.argmin(np.abs(prog - (lo + hi) / 2))]
    T = p.size
    t = np.arange(T)
    q = t * T_BINS // T
    mass = np.bincount(q, weights=p, minlength=T_BINS)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mass > 0, np.bincount(q, weights=p * t, minlength=T_BINS) / mass / T, np.nan)

def figure_loss_over_t(binned: pd.DataFrame, traces: dict[str, dict], workload: str, order: list[str],
                       fig_dir: Path, look: Look | None = None, config: dict | None = None) -> str | None:
    """The unweighted training MSE over t, one panel per quarter of the budget: per t bin the mean
    over its samples (how many samples a method draws in a bin does not enter), mean over seeds."""
    look = look or Look()
    plt, _ = _plt()
    qs = [f"loss_q{k}" for k in range(T_BINS)]
    if binned.empty or "progress" not in binned or not set(qs) <= set(binned) or binned[qs].isna().all().all():
        return None
    shown = _legend_order(look, [m for m in order if m in set(binned.method_label)])
    fig, axes = plt.subplots(1, len(LOSS_WINDOWS), figsize=figsize("full", 2.3), squeeze=False, sharey=True,
                             layout="constrained")
    values = []
    for ax, (lo, hi) in zip(axes.flat, LOSS_WINDOWS):
        win = binned[(binned.progress > lo) & (binned.progress <= hi)]
        for m in shown:
            per_seed = win[win.method_label == m].groupby("seed")[qs].mean()  # each step's bin mean, equal weight
            if per_seed.empty:
                continue
            y = per_seed.mean(axis=0).to_numpy(dtype=float)
            ax.plot(bin_positions(traces.get(m), lo, hi), y, **look.line(m))
            values += [v for v in y if np.isfinite(v)]
        ax.set_title(f"{100 * lo:g}–{100 * hi:g}% of the budget", fontsize=FONT_PT)
        ax.set_xlabel("t / T (1: pure noise)")
        ax.set_xlim(0, 1)
        ax.set_xticks([0, 0.5, 1])
    axes[0, 0].set_ylabel("training MSE (unweighted)")
    if values and min(values) > 0 and max(values) / min(values) > 10:
        axes[0, 0].set_yscale("log")
        plain_log(axes[0, 0].yaxis, min(values), max(values))
    _legend_below(fig, look, shown)
    look.title(fig, f"Training loss over the timestep, {workload_words(workload, config)}")
    return _save(fig, fig_dir, f"loss_over_t_{safe_filename(workload)}")

LOSS_CAPTION = ("Unweighted training MSE over t (steps.jsonl), mean over seeds. The training log keeps, per "
                "step, the mean loss in each quarter of t (equal-width bins); a point is that mean over the "
                "window's steps, each step weighted equally, so how often a method samples a bin does not "
                "enter. It sits at the mean t of the samples it averages under the method's own p(t): within a "
                "bin a method that favours some t still tilts its mean toward them. No per-t loss on held-out "
                "data is logged.")

def look_for(info: dict, runs: list[dict], baseline: str | None) -> Look:
    """The figures' look from suite.json's [report] (labels, style) and the runs (placebos under any label)."""
    rep = {**REPORT_DEFAULTS, **(info.get("report") or {})}
    controls = tuple(sorted({r["label"] for r in runs if r["config"].get("method") == "placebo"}))
    return Look(baseline=baseline, labels=dict(rep.get("labels") or {}), style=rep["style"],
                controls=controls)

def training_figure_lines(w_runs: list[dict], w: str, order: list[str], fig_dir: Path, look: Look) -> list[str]:
    """report.md's training figures of one workload, only those of the slots its methods use: p(t) for
    a timesteps slot, beta1 and lr for an optimizer slot; the training loss over t always."""
    slots = {r["label"]: set(r["config"].get("method_slots") or []) for r in w_runs}
    config = w_runs[0]["config"] if w_runs else None
    traces = {}
    for r in sorted(w_runs, key=lambda r: r["seed"]):
        if r["label"] not in traces:
            traces[r["label"]] = read_json_or_none(r["dir"] / "method_trace.json")
    binned = []
    for r in w_runs:
        budget = run_budget(r["config"]) or 1
        b = binned_steps(r["dir"] / "steps.jsonl", budget)  # the extended baseline: to the budget
        if not b.empty:
            binned.append(b.assign(method_label=r["label"], seed=r["seed"], progress=b.step / budget))
    binned = pd.concat(binned, ignore_index=True) if binned else pd.DataFrame()

    def with_slot(slot: str) -> list[str]:
        return [m for m in order if slot in slots.get(m, ())]

    opt = with_slot("optimizer")
    figs = [("Timestep distribution over training",
             "Each panel: a method's p(t) (from method_trace.json) at points of training, coloured by progress; "
             "methods without a timesteps slot sample t uniformly.",
             figure_timesteps({m: traces[m] for m in with_slot("timesteps") if traces.get(m)}, w, fig_dir, look,
                              config) if with_slot("timesteps") else None),
            ("Adam beta1 and learning rate over training",
             "The first seed of each method with an optimizer slot, and the baseline (from steps.jsonl).",
             figure_optimizer(binned[binned.method_label.isin(opt + [look.baseline])], w, order, fig_dir, look,
                              config) if opt and not binned.empty else None),
            ("Training loss over the timestep", LOSS_CAPTION,
             figure_loss_over_t(binned, traces, w, order, fig_dir, look, config))]
    sec = []
    for title, caption, stem in figs:
        if stem:
            sec += [f"### {title}", "", caption, "",
                    f"![{title}](figures/{stem}.png) ([PDF](figures/{stem}.pdf))", ""]
    return sec


def figure_profiles(tau, rho: pd.DataFrame, fig_dir: Path) -> str | None:
    """AlgoPerf's performance profiles: the share of workloads within a factor tau of the best method."""
    if rho.empty:
        return None
    plt, _ = _plt()
    fig, ax = plt.subplots(figsize=figsize("column", 2.8), layout="constrained")
    for label in rho.columns:
        ax.step(tau, rho[label], where="post", label=label)
    ax.set_xlabel("τ (time-to-target / the best method's)")
    ax.set_ylabel("share of workloads within τ of the best")
    ax.set_ylim(-0.02, 1.02)
    fig.legend(loc="outside lower center", ncol=3)
    return _save(fig, fig_dir, "performance_profiles")


def figure_consistency_matrix(pairs: pd.DataFrame, labels: list[str], fig_dir: Path) -> str:
    """Same-noise agreement and RMSE between every two models (diagonal: RMSE for different noise)."""
    plt, sns = _plt()
    agree = pairs.pivot(index="model_a", columns="model_b", values="agreement").reindex(index=labels, columns=labels)
    rmse = pairs.pivot(index="model_a", columns="model_b", values="rmse_same").reindex(index=labels, columns=labels)
    diag = pairs[pairs.model_a == pairs.model_b].set_index("model_a").rmse_different
    for m in labels:  # a model against itself: its own diversity, the reference level
        rmse.loc[m, m] = diag.get(m, np.nan)
    size = max(4.0, 0.55 * len(labels) + 2.5)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size, size), layout="constrained")
    sns.heatmap(agree, vmin=0, vmax=1, annot=len(labels) <= 12, fmt=".2f", cmap="viridis", ax=axes[0])
    axes[0].set_title("agreement: 1 - MSE same noise / MSE different noise")
    sns.heatmap(rmse, annot=len(labels) <= 12, fmt=".3f", cmap="magma_r", ax=axes[1])
    axes[1].set_title("RMSE same noise (diagonal: different noise)")
    for ax in axes:
        ax.set_xlabel("")
        ax.set_ylabel("")
        ax.tick_params(axis="x", labelrotation=90)
        ax.tick_params(axis="y", labelrotation=0)
    return _save(fig, fig_dir, "consistency_matrix")


def figure_consistency_over_t(summary: pd.DataFrame, errors: pd.DataFrame | None, T: int, fig_dir: Path) -> str:
    """Per-timestep agreement of the models' predictions (mean over pairs; band: min..max) and the RMSEs."""
    plt, _ = _plt()
    t = summary.index.to_numpy() / T
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), layout="constrained")
    for col, label in (("agreement_truth", "vs truth (same errors)"), ("agreement_inputs", "x0 vs different inputs"),
                       ("agreement_inputs_eps", "eps vs different inputs")):
        axes[0].plot(t, summary[(col, "mean")], marker="o", ms=3, label=label)
        axes[0].fill_between(t, summary[(col, "min")], summary[(col, "max")], alpha=0.2)
    low = min(float(np.nanmin(summary[(c, "min")])) for c in ("agreement_truth", "agreement_inputs", "agreement_inputs_eps"))
    axes[0].set_ylim(min(0.0, low) - 0.02, 1.02)
    axes[0].set_ylabel("agreement between models")
    axes[0].legend(fontsize=7)
    axes[1].plot(t, summary[("rmse_same", "mean")], marker="o", ms=3, label="between models, same x_t")
    if errors is not None:
        axes[1].plot(errors.index.to_numpy() / T, errors.rmse_truth.to_numpy(), marker="s", ms=3, label="model to truth")
        axes[2].plot(errors.index.to_numpy() / T, errors.eps_rmse_truth.to_numpy(), marker="s", ms=3, color="C2")
    axes[1].set_ylabel("x0 RMSE (pixels in [0, 1])")
    axes[1].legend(fontsize=7)
    axes[2].set_ylabel("eps RMSE to truth (mean over models)")
    for ax in axes:
        ax.set_xlabel("t / T (1 = pure noise)")
    return _save(fig, fig_dir, "consistency_over_t")


def figure_consistency_over_training(summary: pd.DataFrame, fig_dir: Path) -> str:
    """Same-noise agreement of the models' evaluation samples at each saved step."""
    plt, _ = _plt()
    step = summary.index.to_numpy()
    fig, ax = plt.subplots(figsize=(5.5, 3.6), layout="constrained")
    ax.plot(step, summary[("agreement", "mean")], marker="o", label="pixels")
    ax.fill_between(step, summary[("agreement", "min")], summary[("agreement", "max")], alpha=0.2)
    if ("cosine_same", "mean") in summary:
        ax.plot(step, summary[("cosine_same", "mean")], marker="s", label="feature cosine, same noise")
        ax.plot(step, summary[("cosine_different", "mean")], ls="--", label="feature cosine, different noise")
    ax.set_xlabel("iterations")
    ax.set_ylabel("agreement")
    ax.legend(fontsize=7)
    return _save(fig, fig_dir, "consistency_over_training")


def figure_consistency_grid(images: np.ndarray, labels: list[str], fig_dir: Path) -> str:
    """images uint8 [models, columns, H, W, C]: one row per model, one column per noise."""
    return figure_image_grid(images, labels, [f"noise {c}" for c in range(images.shape[1])], fig_dir,
                             "consistency_grid")


def figure_image_grid(images: np.ndarray, row_labels: list[str], col_labels: list[str], fig_dir: Path,
                      stem: str) -> str:
    """images uint8 [rows, columns, H, W, C] as a labelled grid, pixels as they are (no smoothing)."""
    plt, _ = _plt()
    rows, cols = images.shape[:2]
    cell_in = min(0.9, (FULL_IN - 1.2) / cols)  # within a page's width, 1.2 in left for the row labels
    fig, axes = plt.subplots(rows, cols, figsize=(cell_in * cols + 1.2, cell_in * rows + 0.3), squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r, c]
            img = images[r, c]
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                      vmin=0, vmax=255, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            if c == 0:
                ax.set_ylabel(row_labels[r], rotation=0, ha="right", va="center", fontsize=FONT_PT)
            if r == 0:
                ax.set_title(col_labels[c], fontsize=FONT_PT)
    fig.subplots_adjust(wspace=0.05, hspace=0.05)
    return _save(fig, fig_dir, safe_filename(stem), tight=True)  # row labels stand left of the axes
