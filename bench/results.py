"""A suite's results as pandas DataFrames, for a notebook (no torch):

    from bench.results import load
    r = load("results/mini")            # a suite's results folder, or its name under results/
    r.evaluations                       # one row per run, evaluation step and metric (tables/evaluations.csv)
    r.steps                             # one row per training step of every run (steps.jsonl), read on first use
    r.speedup                           # the report's speed-up table (tables/speedup.csv), None before a report
    r.runs                              # one row per run: its state, last step and why it failed

Rows read from the run folders themselves, as the report reads them: a log line that cannot be read
is never data (the run is listed as failed with the line in `runs.reason`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pandas as pd

from bench.errors import ConfigError
from bench.fileio import iter_jsonl
from bench.report.tables import evaluations_table, find_runs

RESULTS_ROOT = Path(__file__).resolve().parent.parent / "results"


@dataclass
class Results:
    """One suite's results; every table is a tidy DataFrame with the run's workload, method and seed."""

    suite_dir: Path
    found: list[dict]

    @cached_property
    def runs(self) -> pd.DataFrame:
        return pd.DataFrame([{"workload": r["workload"], "method_label": r["label"], "seed": r["seed"],
                              "method": r["config"].get("method"), "state": r["status"].get("state"),
                              "step": r["status"].get("step"), "reason": r["status"].get("reason"),
                              "dir": str(r["dir"])} for r in self.found])

    @cached_property
    def evaluations(self) -> pd.DataFrame:
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
    return Results(suite_dir, find_runs(suite_dir))
