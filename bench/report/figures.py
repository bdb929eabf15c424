"""The report's figures (PNG and PDF, written atomically): metric against iterations with seed
bands, the timestep distribution over training, beta1 and the learning rate, and the training MSE
per timestep quartile. Files only, no torch.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from bench.fileio import atomic_write


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
        # No creation date in a PDF: the same results give the same bytes, so a rerun shows no change.
        meta = {"CreationDate": None} if ext == "pdf" else None
        atomic_write(fig_dir / f"{stem}.{ext}", lambda f, ext=ext, meta=meta: fig.savefig(
            f, dpi=150, bbox_inches="tight", format=ext, metadata=meta))
    import matplotlib.pyplot as plt

    plt.close(fig)
    return stem

def safe_filename(name: str) -> str:
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
    return _save(fig, fig_dir, f"curves_{safe_filename(workload)}_{safe_filename(metric)}")

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
    return _save(fig, fig_dir, f"timesteps_{safe_filename(workload)}")

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
    return _save(fig, fig_dir, f"optimizer_{safe_filename(workload)}")

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
    return _save(fig, fig_dir, f"loss_quartiles_{safe_filename(workload)}")


def figure_profiles(tau, rho: pd.DataFrame, fig_dir: Path) -> str | None:
    """AlgoPerf's performance profiles: the share of workloads within a factor tau of the best method."""
    if rho.empty:
        return None
    plt, _ = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6), layout="constrained")
    for label in rho.columns:
        ax.step(tau, rho[label], where="post", label=label)
    ax.set_xlabel("tau (time-to-target / the best method's)")
    ax.set_ylabel("share of workloads within tau of the best")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=6, ncol=2)
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
    fig, axes = plt.subplots(rows, cols, figsize=(0.9 * cols + 1.6, 0.9 * rows + 0.3), squeeze=False)
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
                ax.set_ylabel(row_labels[r], rotation=0, ha="right", va="center", fontsize=7)
            if r == 0:
                ax.set_title(col_labels[c], fontsize=7)
    fig.subplots_adjust(wspace=0.05, hspace=0.05)
    return _save(fig, fig_dir, safe_filename(stem))
