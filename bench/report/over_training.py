"""Speed-up over training: the headline statistic (bench/report/speedup.py, A) read at every evaluation
step N' <= N of the budget, not only at N. Does a method's advantage grow, hold or vanish as training
goes on?

At N' the per-seed speed-up is s_k(N') = (iterations baseline seed k needs to reach method seed k's
value at N') / N', read on the baseline's whole curve (to E x N, so it covers E x N' and more), paired
over seeds and with the same intervals and bounds as the headline: at N' = N it is the headline.

Why only budget-independent methods. A method whose schedule reads progress p = step / iters (CLTS's
curriculum, MDLRC's momentum decay, their combination, MDLRC's learning-rate control: the class
attribute ``budget_dependent``, recorded per method in suite.json) is at N' < N in the middle of its
schedule, not where a run with budget N' would end: its curve is not a curve of budgets. Those are
marked and left out (runs at several budgets would measure them). The baseline, whose curve is read,
must itself not depend on the budget. Files only, no torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from bench.fileio import atomic_write, atomic_write_bytes
from bench.report.speedup import baseline_equivalent, lower_is_better
from bench.report.stats import pair_seeds, same_n, seed_curves

COLUMNS = ["workload", "metric", "method_label", "step", "speedup", "ci_low", "ci_high", "interval", "bound",
           "n_paired", "n_beyond", "n_before"]


def budget_dependence(info: dict) -> dict[str, bool | None]:
    """Label -> whether its method's schedule depends on the budget (None: suite.json from before the flag)."""
    return {m.get("label"): m.get("budget_dependent") for m in info.get("methods") or []}


def speedup_over_training(evals: pd.DataFrame, workload: str, metric: str, baseline: str, labels: list[str],
                          budget: float, *, confidence: float = 0.95, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """One row per method label and evaluation step N' <= budget: the baseline-equivalent speed-up at N'
    (module docstring), with its interval or its bound."""
    g = same_n(evals[(evals.workload == workload) & (evals.metric == metric)].dropna(subset=["value"]))
    base_df = g[g.method_label == baseline]
    if base_df.empty:
        return pd.DataFrame(columns=COLUMNS)
    base, rows = seed_curves(base_df), []
    for label in labels:
        sub = g[(g.method_label == label) & (g.step > 0) & (g.step <= budget * (1 + 1e-9))]
        if label == baseline or sub.empty:
            continue
        bs, bv, ms, mv, seeds = pair_seeds(base, seed_curves(sub))
        last = float(np.nanmax(np.where(np.isfinite(bv), bs, np.nan))) if np.isfinite(bv).any() else 0.0
        for n in ms:
            e = baseline_equivalent(bs, bv, ms, mv, budget=float(n), extend=max(1.0, last / n), seeds=seeds,
                                    lower_is_better=lower_is_better(metric), confidence=confidence, n_boot=n_boot,
                                    seed=seed)
            if not e.n_paired:
                continue
            bound = "~" if e.n_beyond and e.n_before else ">=" if e.n_beyond else "<=" if e.n_before else ""
            rows.append({"workload": workload, "metric": metric, "method_label": label, "step": float(n),
                         "speedup": e.speedup, "ci_low": e.ci_low, "ci_high": e.ci_high, "interval": e.interval,
                         "bound": bound, "n_paired": e.n_paired, "n_beyond": e.n_beyond, "n_before": e.n_before})
    return pd.DataFrame(rows, columns=COLUMNS)


def figure_over_training(table: pd.DataFrame, workload: str, metric: str, fig_dir: Path, look=None) -> str | None:
    """Speed-up against N' (log-log), one line per method with its interval; bounds hollow, no bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # the report's colours and names, the same in every figure (bench/report/style.py)
    from matplotlib.ticker import FuncFormatter, NullFormatter

    from bench.report.style import Look, rc_params

    look = look or Look()
    t = table[(table.workload == workload) & (table.metric == metric) & table.speedup.notna()]
    if t.empty:
        return None
    with plt.rc_context(rc_params()):  # print sizes, TrueType
        fig, ax = plt.subplots(figsize=(3.3, 3.0), layout="constrained")  # one column of a paper, legend below
        for label, g in t.groupby("method_label", sort=False):
            kw = {k: v for k, v in look.line(label).items() if k in ("color", "marker", "ls", "linestyle", "lw")}
            ax.plot(g.step, g.speedup, label=look.name(label), **kw)
            ok = g[g.ci_low.notna()]
            ax.errorbar(ok.step, ok.speedup, yerr=[ok.speedup - ok.ci_low, ok.ci_high - ok.speedup], fmt="none",
                        ecolor=kw.get("color"), elinewidth=0.8, capsize=2)
            cut = g[g.bound != ""]
            ax.scatter(cut.step, cut.speedup, s=28, facecolors="white", edgecolors=kw.get("color"), zorder=3)
        ax.axhline(1.0, color="black", lw=0.7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        # plain numbers on log axes ("200", "0.9x"), not powers of ten; x ticks at the evaluations
        ax.set_xticks(sorted(t.step.unique()))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.2g}x"))
        # minor labels on 0.2, 0.3, 0.5, 0.6, 0.8 (x 10^k) only: 0.9x would sit on 1x, 0.7x on 0.6x and 0.8x
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:.2g}x" if f"{v:e}"[0] in "23568" else ""))
        ax.set_xlabel("iterations N' (log scale)")
        ax.set_ylabel("baseline-equivalent speed-up at N'")
        # under the axes, never over a curve (the report's other figures do the same)
        fig.legend(loc="outside lower center", ncol=3)
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"over_training_{workload}_{metric}")
        fig_dir.mkdir(parents=True, exist_ok=True)
        for ext in ("png", "pdf"):
            meta = {"CreationDate": None} if ext == "pdf" else None  # the same results, the same bytes
            atomic_write(fig_dir / f"{stem}.{ext}", lambda f, ext=ext, meta=meta: fig.savefig(f, format=ext, metadata=meta))
        plt.close(fig)
    return stem


def over_training_lines(evals: pd.DataFrame, info: dict, baseline: str | None, metric: str | None, budgets: dict,
                        order: list[str], tab_dir: Path, fig_dir: Path, stats_kw: dict, look=None) -> list[str]:
    """The report's section: the table (tables/over_training.csv), a figure per workload, and which
    methods are left out and why."""
    if not baseline or not metric or evals.empty or metric.endswith(("_final", "_sampler2")):
        return []
    flags = budget_dependence(info)
    if flags.get(baseline):
        return ["## Speed-up over training", "", f"Not read: the baseline `{baseline}` has a budget-dependent "
                "schedule, so its extended run is not the curve of shorter budgets.", ""]
    kept = [m for m in order if m != baseline and flags.get(m) is False]
    marked = [m for m in order if flags.get(m)]
    unknown = [m for m in order if m != baseline and flags.get(m) is None]
    kw = {k: stats_kw[k] for k in ("confidence", "n_boot", "seed") if k in stats_kw}
    parts = [speedup_over_training(evals, w, metric, baseline, kept, budgets[w], **kw) for w in sorted(budgets)]
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=COLUMNS)
    tab_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(tab_dir / "over_training.csv", table.to_csv(index=False).encode())
    sec = [f"The headline's baseline-equivalent speed-up ({metric}) at every evaluation step N' up to the budget, "
           f"read on `{baseline}`'s whole extended curve, paired over seeds with the headline's intervals "
           "(bounds: hollow markers, no interval). Table: [tables/over_training.csv](tables/over_training.csv)."]
    if marked:
        sec.append("Left out, their schedule depends on the budget (progress = step / iters, so N' < N is mid-"
                   f"schedule, not a shorter run): {', '.join(f'`{m}`' for m in marked)}.")
    if unknown:
        sec.append(f"Left out, not recorded whether their schedule depends on the budget (suite.json from before the "
                   f"flag; `run` the suite again to rewrite it): {', '.join(f'`{m}`' for m in unknown)}.")
    for w in sorted(budgets):
        stem = figure_over_training(table, w, metric, fig_dir, look)
        if stem:
            sec.append(f"![speed-up over training, {w}](figures/{stem}.png) ([PDF](figures/{stem}.pdf))")
    return ["## Speed-up over training", ""] + [line for text in sec for line in (text, "")]
