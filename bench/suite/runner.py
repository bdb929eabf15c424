"""Run a suite: every run of the grid, locally (in this process, or N worker processes) or on
Slurm through submitit (one job array), with a live progress display and a summary table.

Results go to ``results/<suite>/<workload>/<method-label>/seed<k>/`` (see bench.train.loop for the
files of a run folder). The runner adds ``machine.json`` (where the run ran), ``error.log``
(the traceback of a failed run) and, for worker processes, ``worker.log``; and
``results/<suite>/suite.json`` (the resolved suite, read by the report).

Running a suite again:

- runs whose status is ``done`` are skipped;
- interrupted runs (status ``running``: killed, timed out, Ctrl-C) resume from their checkpoint
  (bench.train.loop resumes by itself, exactly);
- failed runs are retried, except runs that diverged (a non-finite loss is deterministic: it
  would diverge again), unless ``retry_failed`` asks for those too;
- a run folder whose config.json differs from what the suite asks for stops the whole suite
  before anything runs (:class:`ResultsConflictError`): results are never mixed or overwritten.

A failure of one run (divergence, any exception, out of memory, a worker killed by the
system) is recorded in its status.json with the reason and the step, and the others go on.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
from pathlib import Path
from typing import Callable

from bench import fileio
from bench.errors import ConfigError
from bench.suite.cost import describe_plan
from bench.suite.display import make_reporter
from bench.suite.executors import Executor, InlineExecutor, WorkerPool, skipped_outcome
from bench.suite.grid import RunSpec, Suite, load_suite
from bench.suite.replicates import replicate_lines
from bench.suite.slurm import SubmititExecutor
from bench.suite.study import check_same_study
from bench.suite.two_phase import run_tuned
from bench.train.live_log import LOG_ENV, check_logger
from bench.train.run_folder import (
    ResultsConflictError,
    RunOutcome,
    SuiteResult,
    check_conflict,
    outcome_from_dict,
    read_status,
    should_run,
)

EXECUTORS = ("local", "slurm", "submitit-local", "submitit-debug")


def run_suite(suite: Suite | str | os.PathLike, executor: str = "local", jobs: int = 1, dry_run: bool = False,
              results_root: str | os.PathLike = "results", progress=None, *, slurm: dict | None = None,
              retry_failed: bool = False, only: str | list[str] | None = None,
              train_fn: str | Callable | None = None, wait: bool = True) -> SuiteResult:
    """Run every unfinished run of a suite; return what happened to each.

    suite:        a Suite, or a suite name / TOML path (loaded and validated first).
    executor:     "local" (this process when jobs == 1, else `jobs` worker processes; a run with
                  gpus = N > 1 is a worker of N processes started through torchrun), "slurm"
                  (a submitit job array), or "submitit-local" / "submitit-debug" (the same job
                  array through submitit's LocalExecutor / DebugExecutor, to try the Slurm path
                  without a cluster).
    jobs:         parallel local runs (each worker gets cpu_count // jobs threads).
    dry_run:      print the runs with their state and the cost estimate; run nothing.
    results_root: results go to <results_root>/<suite>/...
    progress:     None (a live display on a terminal, plain lines otherwise), False (silent), True
                  (live display), a callable receiving event dicts, or a Reporter.
    slurm:        overrides of the suite's [slurm] table (partition, gpus, time, account, ...).
    retry_failed: also rerun runs that diverged (other failures are always retried).
    only:         glob pattern(s) on run keys "<workload>/<label>/seed<k>" to run a subset.
    train_fn:     the training function (default bench.train.loop:train), a callable or "module:function".
    wait:         Slurm only: wait for the jobs (with progress) or return once they are submitted.

    Raises SuiteError / ResultsConflictError before anything runs if the suite is invalid or a
    run folder holds another configuration's results.
    """
    if executor not in EXECUTORS:
        raise ConfigError(f"unknown executor {executor!r}; use one of {', '.join(EXECUTORS)}")
    if jobs < 1:
        raise ConfigError(f"jobs={jobs} must be >= 1")
    if not isinstance(suite, Suite):
        suite = load_suite(suite)
    fileio.check_output_folder(results_root, "--results")
    if suite.tune and suite.lr_chosen is None:  # two phases: tuning, then the headline (bench/suite/tuning.py)
        return run_tuned(suite, run_suite, make_reporter(progress), dry_run=dry_run, only=only, results_root=results_root,
                         executor=executor, jobs=jobs, slurm=slurm, retry_failed=retry_failed, train_fn=train_fn,
                         wait=wait)
    log_to = None if dry_run or LOG_ENV in os.environ else suite.log.get("to")  # --log on the command line wins
    if log_to:
        check_logger(log_to)
    suite_dir = Path(results_root) / suite.name
    runs = _select(suite, only)
    dirs = {r.key: r.run_dir(results_root) for r in runs}
    _refuse_conflicts(runs, dirs)
    check_same_study(suite_dir / "suite.json", suite.to_dict())  # another study of the same name: never merged
    statuses = {r.key: read_status(dirs[r.key]) for r in runs}
    reporter = make_reporter(progress)
    if dry_run:
        return _plan(suite, runs, dirs, statuses, jobs, reporter, suite_dir)

    # Run what is not finished; the rest is reported as skipped.
    if executor != "slurm":
        _check_local_devices(runs)
    suite_dir.mkdir(parents=True, exist_ok=True)
    fileio.write_json(suite_dir / "suite.json", suite.to_dict())
    todo = [r for r in runs if should_run(statuses[r.key], retry_failed)]
    reporter.suite_start(suite, todo, len(runs))
    outcomes: dict[str, RunOutcome] = {r.key: outcome_from_dict(skipped_outcome(r, dirs[r.key]))
                                       for r in runs if r not in todo}
    if train_fn is None and todo:
        _prepare_references(todo, reporter, executor)
    multi = any(r.config.get("gpus", 1) > 1 for r in todo)  # torchrun's processes: a worker each
    common = (dirs, reporter, train_fn, retry_failed)
    if executor == "local" and jobs == 1 and not multi:
        runner: Executor = InlineExecutor(*common)
    elif executor == "local":
        runner = WorkerPool(*common, jobs=jobs)
    else:
        cluster = {"slurm": "slurm", "submitit-local": "local", "submitit-debug": "debug"}[executor]
        runner = SubmititExecutor(*common, suite_name=suite.name, suite_dir=suite_dir, cluster=cluster,
                                  settings={**suite.slurm, **(slurm or {})}, wait=wait)
    try:
        if log_to:  # for this suite's runs only (workers and jobs inherit it)
            os.environ[LOG_ENV] = log_to
        runner.run(todo)
    finally:  # interrupted too: the runs that ended are in the result
        if log_to:
            os.environ.pop(LOG_ENV, None)
        outcomes.update(runner.outcomes)
        result = SuiteResult(suite.name, suite_dir, [outcomes[r.key] for r in runs if r.key in outcomes])
        reporter.suite_end(result)
        if result.elsewhere:
            reporter.message(f"{len(result.elsewhere)} run(s) were being trained by another process and were left to "
                             "it (not trained twice); run the same command again once it has finished")
    return result


def _prepare_references(todo: list[RunSpec], reporter, executor: str) -> None:
    """Proxy extractors, reference statistics and noise floors once, before any run: parallel workers
    would race to compute them, and a training job computes small ones only. Under Slurm this is the
    submitting machine: it computes the small ones, and a large one is an error naming `ref-stats`
    (to run on a GPU node) before anything is submitted."""
    # torch on first use: the runner starts without torch
    from bench.eval.reference import TRAIN_COMPUTE_LIMIT, prepare_references
    from bench.train.resolve import resolve_run

    specs = [resolve_run(r.config, where=f"run {r.key}").eval_spec for r in todo]
    on_cluster = executor == "slurm"
    prepare_references(specs, device="cpu" if on_cluster else None,
                       compute_limit=TRAIN_COMPUTE_LIMIT if on_cluster else None, say=reporter.message)


def _check_local_devices(todo: list[RunSpec]) -> None:
    """Refuse, before anything runs, runs that ask for a CUDA GPU on a machine without one."""
    wants = sorted({r.config.get("device", "auto") for r in todo} - {"auto", "cpu"})
    if not wants:
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"the suite asks for device {wants[0]!r} but torch sees no CUDA GPU on this machine; "
                          "set device = \"auto\" (or \"cpu\") in [train], or run it where there is a GPU "
                          "(--executor slurm)")


def _select(suite: Suite, only: str | list[str] | None) -> list[RunSpec]:
    """The suite's runs, or those whose key matches one of the `only` glob patterns."""
    runs = suite.runs()
    if not only:
        return runs
    patterns = [only] if isinstance(only, str) else list(only)
    runs = [r for r in runs if any(fnmatch.fnmatchcase(r.key, p) for p in patterns)]
    if not runs:
        raise ConfigError(f"--only {patterns} matches no run of suite {suite.name}; run keys look like "
                          f"{suite.runs()[0].key}")
    return runs


def _refuse_conflicts(runs: list[RunSpec], dirs: dict[str, Path]) -> None:
    """Refuse to mix configurations, before anything runs."""
    conflicts = []
    for r in runs:
        why = check_conflict(r.config, dirs[r.key])
        if why:
            conflicts.append(f"{dirs[r.key]} ({why})")
    if conflicts:
        more = f" and {len(conflicts) - 3} more" if len(conflicts) > 3 else ""
        raise ResultsConflictError(
            f"results of another configuration are in the way: {'; '.join(conflicts[:3])}{more}. Refusing to mix "
            f"them: move or delete those folders, rename the suite, or pass another results root")


def _plan(suite: Suite, runs: list[RunSpec], dirs: dict, statuses: dict, jobs: int, reporter,
          suite_dir: Path) -> SuiteResult:
    """The dry run: every run with its state and the cost estimate; nothing runs."""
    states = {k: (s or {}).get("state", "todo") for k, s in statuses.items()}
    plan = describe_plan(suite.subset(runs), states, jobs)
    if "/" not in suite.name:  # a phase of a tuned suite ("<suite>/tuning") is not a study of its own
        plan += "\n" + "\n".join(replicate_lines(suite.name, [dataclasses.asdict(w) for w in suite.workloads], suite.seeds))
    reporter.message(plan)
    outcomes = [RunOutcome(r.key, str(dirs[r.key]), states[r.key], "planned",
                           (statuses[r.key] or {}).get("step")) for r in runs]
    result = SuiteResult(suite.name, suite_dir, outcomes, plan=plan)
    reporter.suite_end(result)
    return result

