"""A suite's results as pandas DataFrames, for a notebook (no torch):

    from bench.results import load
    r = load("results/mini")            # a suite's results folder, or its name under results/
    r.evaluations                       # one row per run, evaluation step and metric (tables/evaluations.csv)
    r.steps                             # one row per training step of every run (steps.jsonl), read on first use
    r.speedup                           # the report's speed-up table (tables/speedup.csv), None before a report
    r.runs                              # one row per run: its state, last step and why it failed

Rows read from the run folders themselves, as the report reads them: a log line that cannot be read
is never data (the run is listed as failed with the line in `runs.reason`). A suite whose run folders
are absent (a fresh clone: only the reports are committed) is read from its report's tables instead:
`r.source` says which ("runs" or "tables"), and a warning says so when it is the tables.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pandas as pd

from bench.errors import ConfigError
from bench.fileio import iter_jsonl
from bench.report.tables import evaluations_table, find_runs

RESULTS_ROOT = Path(__file__).resolve().parent.parent / "results"
TABLE = "tables/evaluations.csv"  # what a report writes of every evaluation (bench/report/build.py)


@dataclass
class Results:
    """One suite's results; every table is a tidy DataFrame with the run's workload, method and seed."""

    suite_dir: Path
    found: list[dict]
    source: str = "runs"  # "tables": no run folders, read from tables/*.csv (no steps, no run states)

    @cached_property
    def runs(self) -> pd.DataFrame:
        if self.source == "tables":  # a run with evaluations, its last evaluated step; states are not in tables
            last = self.evaluations.groupby(["workload", "method_label", "seed", "method"], as_index=False).step.max()
            return last.assign(state=None, reason=None, dir=None)[
                ["workload", "method_label", "seed", "method", "state", "step", "reason", "dir"]]
        return pd.DataFrame([{"workload": r["workload"], "method_label": r["label"], "seed": r["seed"],
                              "method": r["config"].get("method"), "state": r["status"].get("state"),
                              "step": r["status"].get("step"), "reason": r["status"].get("reason"),
                              "dir": str(r["dir"])} for r in self.found])

    @cached_property
    def evaluations(self) -> pd.DataFrame:
        if self.source == "tables":
            return pd.read_csv(self.suite_dir / TABLE)
        return evaluations_table(self.suite_dir, self.found)

    @cached_property
    def steps(self) -> pd.DataFrame:
        frames = []
        for r in self.found:
            rows = list(iter_jsonl(r["dir"] / "steps.jsonl"))
            if rows:
                frames.append(pd.DataFrame(rows).assign(workload=r["workload"], method_label=r["label"],
                                                        seed=r["seed"]))
        if not frames:
            return pd.DataFrame(columns=["workload", "method_label", "seed", "step"])
        df = pd.concat(frames, ignore_index=True)
        first = ["workload", "method_label", "seed", "step"]
        return df[first + [c for c in df.columns if c not in first]]

    @cached_property
    def speedup(self) -> pd.DataFrame | None:
        path = self.suite_dir / "tables" / "speedup.csv"
        try:
            return pd.read_csv(path)
        except (FileNotFoundError, pd.errors.EmptyDataError):  # no report yet, or one with no speed-ups
            return None


def load(path: str | os.PathLike) -> Results:
    """The results of a suite: its results folder, or its name under the checkout's results/."""
    suite_dir = Path(path)
    if not suite_dir.is_dir() and (RESULTS_ROOT / str(path)).is_dir():
        suite_dir = RESULTS_ROOT / str(path)
    if not suite_dir.is_dir():
        raise ConfigError(f"no results folder {path!r} (nor {RESULTS_ROOT / str(path)}); run the suite first")
    found = find_runs(suite_dir)
    if not found and (suite_dir / TABLE).is_file():  # committed results: the report's tables, not the runs
        warnings.warn(f"{suite_dir} has no run folders: read from its report's tables ({TABLE}, tables/speedup.csv); "
                      "steps and run states are not in them (.steps is empty): run the suite for those",
                      stacklevel=2)
        return Results(suite_dir, [], source="tables")
    return Results(suite_dir, found)
