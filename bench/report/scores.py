"""One score per method across a suite's workloads, by MLCommons AlgoPerf's rules (METHODS.md,
"Scoring across workloads"); from the speed-up table alone, no torch.

For method s on workload w, t_{s,w} is its time to the target in baseline units: 1 / (its
baseline-equivalent speed-up at the budget), so the baseline's is 1 and a 2x method's 0.5. It is
infinite when the method failed or was not reached (a speed-up printed as "<= x": some seed ended no
better than the baseline's first evaluation), and a lower bound of the speed-up (">= x") counts at
its bound, in the method's disfavour. The performance ratio r_{s,w} = t_{s,w} / min over methods of
t_{s',w}; a ratio above r_max (4) counts as infinite. The profile rho_s(tau) is the share of
workloads with r_{s,w} <= tau, and the score is the area under rho_s from 1 to r_max divided by
r_max - 1, integrated on `points` evenly spaced tau with the trapezoid rule (AlgoPerf: 100): 1 for
a method that is best everywhere, 0 for one never within r_max of the best.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from bench.fileio import atomic_write_bytes
from bench.report.figures import figure_profiles
from bench.report.tables import to_markdown

R_MAX = 4.0
POINTS = 100


def times_to_target(speedups: pd.DataFrame, metric: str, controls: bool = False) -> pd.DataFrame:
    """t_{s,w} as a table (rows: method labels, columns: workloads) from tables/speedup.csv's rows of
    the headline statistic; a method missing on a workload (failed, no evaluation) is infinite there."""
    rows = speedups[(speedups.statistic == "baseline_equivalent") & (speedups.metric == metric)]
    if not controls:
        rows = rows[~rows.is_control.astype(bool)]
    t = {}
    for _, r in rows.iterrows():
        s = r["speedup"]
        reached = s is not None and not pd.isna(s) and s > 0 and not bool(r.get("upper_bound"))
        t[(r["method_label"], r["workload"])] = 1.0 / float(s) if reached else math.inf
    labels = list(dict.fromkeys(rows.method_label))
    workloads = sorted(set(rows.workload))
    return pd.DataFrame([[t.get((m, w), math.inf) for w in workloads] for m in labels], index=labels,
                        columns=workloads, dtype=float)


def performance_ratios(times: pd.DataFrame, r_max: float = R_MAX) -> pd.DataFrame:
    """r_{s,w} = t_{s,w} / min_s' t_{s',w}, infinite above r_max (and where no method reached)."""
    best = times.min(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = times / best
    r.loc[:, ~np.isfinite(best.to_numpy())] = math.inf  # a workload no method reached counts for no one
    return r.where(r <= r_max, math.inf)


def profiles(ratios: pd.DataFrame, r_max: float = R_MAX, points: int = POINTS) -> tuple[np.ndarray, pd.DataFrame]:
    """(tau, rho): rho_s(tau) = share of workloads with r_{s,w} <= tau, at `points` tau from 1 to r_max."""
    tau = np.linspace(1.0, r_max, points)
    rho = pd.DataFrame({s: [(ratios.loc[s] <= x).mean() for x in tau] for s in ratios.index}, index=tau)
    return tau, rho


def scores(ratios: pd.DataFrame, r_max: float = R_MAX, points: int = POINTS) -> pd.Series:
    """B_s = (1 / (r_max - 1)) x the trapezoid integral of rho_s over [1, r_max]."""
    tau, rho = profiles(ratios, r_max, points)

    def area(y: np.ndarray) -> float:  # the trapezoid rule (numpy's own changed name between versions)
        return float(((y[1:] + y[:-1]) / 2 * np.diff(tau)).sum())

    return pd.Series({s: area(rho[s].to_numpy()) / (r_max - 1) for s in rho.columns},
                     name="score").sort_values(ascending=False, kind="stable")


def scores_lines(speedups: pd.DataFrame, metric: str, tab_dir: Path, fig_dir: Path) -> list[str]:
    """The report's section: every method's score and ratios (also tables/scores.csv) and the profiles' figure."""
    ratios = performance_ratios(times_to_target(speedups, metric))
    tau, rho = profiles(ratios)
    score = scores(ratios)
    table = pd.DataFrame({"score": score.round(3),
                          **{f"r: {w}": ratios.loc[score.index, w].map(lambda r: "inf" if r == math.inf else f"{r:.2f}")
                             for w in ratios.columns}}).rename_axis("method").reset_index()
    atomic_write_bytes(Path(tab_dir) / "scores.csv", table.to_csv(index=False).encode())
    stem = figure_profiles(tau, rho[score.index], Path(fig_dir))
    return ["## Scores across workloads (AlgoPerf's rules)", "",
            f"Time to target t = 1 / the baseline-equivalent speed-up at the budget ({metric}; '>= x' counts at its "
            "bound, '<= x' or a failed run as not reached); r = t / the best method's t on the workload, infinite "
            f"above {R_MAX:g} or when not reached; score = the area under the share of workloads with r <= tau, tau "
            f"from 1 to {R_MAX:g}, divided by {R_MAX - 1:g} (1: best everywhere). Point estimates only: read each "
            "workload's intervals above before ranking close scores. Controls are left out.", "",
            to_markdown(table), ""] + ([f"![performance profiles](figures/{stem}.png) ([PDF](figures/{stem}.pdf))", ""]
                                       if stem else [])
