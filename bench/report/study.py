"""What a study's design lets its report claim, as sections of report.md: the tuning by rule
(bench/report/tuning.py), independent replicates (bench/suite/replicates.py), censored headline cells
(bench/report/censoring.py) and the speed-up over training (bench/report/over_training.py). One entry,
:func:`study_lines`, which build.py calls with its report context. Files only, no torch.
"""

from __future__ import annotations

import sys

from bench.report.censoring import censored_cells, censoring_lines
from bench.report.figures import look_for
from bench.report.over_training import over_training_lines
from bench.report.tables import run_budget
from bench.report.tuning import tuning_lines
from bench.suite.replicates import replicate_lines


def workload_budgets(runs: list[dict], baseline: str | None) -> tuple[dict, dict]:
    """Per workload its budget N and how far its baseline's runs trained, in budgets (as the headline reads)."""
    budgets, extends = {}, {}
    for w in sorted({r["workload"] for r in runs}):
        budget = max((run_budget(r["config"]) or 0) for r in runs if r["workload"] == w)
        its = [r["config"].get("iters") or 0 for r in runs if r["workload"] == w and r["label"] == baseline]
        if budget:
            budgets[w] = budget
            extends[w] = max(1.0, max(its) / budget) if its else 1.0
    return budgets, extends


def study_lines(ctx) -> list[str]:
    """The four sections, from build.py's report context (results, order, baseline, metric, folders)."""
    lines = tuning_lines(ctx.suite_dir, ctx.info)
    info = ctx.info
    if info.get("name") and info.get("workloads") and info.get("seeds"):
        lines += ["## Independent replicates", ""] + replicate_lines(info["name"], info["workloads"], info["seeds"]) + [""]
    if not (ctx.baseline and ctx.primary) or ctx.evals.empty:
        return lines
    budgets, extends = workload_budgets(ctx.runs, ctx.baseline)
    labels = [m for m in ctx.order if m not in ctx.sweep]
    censored = censoring_lines(censored_cells(ctx.evals, ctx.primary, ctx.baseline, labels, budgets, extends))
    print(censored[0], file=sys.stderr)  # `report` says it on the terminal too: a bound is not a measurement
    lines += ["## Censored cells", ""] + censored
    lines += over_training_lines(ctx.evals, info, ctx.baseline, ctx.primary, budgets, labels, ctx.tab_dir,
                                 ctx.fig_dir, ctx.stats_kw, look_for(info, ctx.runs, ctx.baseline))
    return lines
