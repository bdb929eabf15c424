"""Run a suite: every run of the grid, locally (in this process, or N worker processes) or on
Slurm through submitit (one job array), with a live progress display and a summary table.

Results go to ``results/<suite>/<workload>/<method-label>/seed<k>/`` (see bench.train for the
files of a run folder). The runner adds ``machine.json`` (where the run ran), ``error.log``
(the traceback of a failed run) and, for worker processes, ``worker.log``; and
``results/<suite>/suite.json`` (the resolved suite, read by the report).

Running a suite again:

- runs whose status is ``done`` are skipped;
- interrupted runs (status ``running``: killed, timed out, Ctrl-C) resume from their checkpoint
  (bench.train resumes by itself, exactly);
- failed runs are retried, except runs that diverged (a non-finite loss is deterministic: it
  would diverge again), unless ``retry_failed`` asks for those too;
- a run folder whose config.json differs from what the suite asks for stops the whole suite
  before anything runs (:class:`ResultsConflictError`): results are never mixed or overwritten.

A failure of one run (divergence, any exception, out of memory, a worker killed by the
system) is recorded in its status.json with the reason and the step, and the others go on.
"""

from __future__ import annotations

import fnmatch
import importlib
import json
import os
import platform
import socket
import subprocess
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bench import io
from bench.budget import evaluates, is_eval_step
from bench.errors import BenchError, ConfigError
from bench.suite import RunSpec, Suite, describe_plan, format_duration, load_suite

DEFAULT_TRAIN_FN = "bench.train:train"
EXECUTORS = ("local", "slurm", "submitit-local", "submitit-debug")


class ResultsConflictError(ConfigError):
    """A run folder holds results of another configuration."""


@dataclass
class RunOutcome:
    """What happened to one run in this invocation."""

    key: str
    run_dir: str
    state: str            # done | failed | running (interrupted) | todo (dry run) | submitted
    action: str           # ran | resumed | skipped | planned | submitted
    step: int | None = None
    reason: str | None = None
    seconds: float = 0.0  # wall time of this invocation's attempt
    final: dict = field(default_factory=dict)  # last value of every metric

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class SuiteResult:
    suite: str
    suite_dir: Path
    outcomes: list[RunOutcome]
    plan: str = ""

    def by_state(self, state: str) -> list[RunOutcome]:
        return [o for o in self.outcomes if o.state == state]

    @property
    def ok(self) -> bool:
        return all(o.state == "done" for o in self.outcomes)


# ----------------------------------------------------------------------------------------------
# Run folders.


def read_status(run_dir: Path) -> dict | None:
    try:
        return io.read_json(Path(run_dir) / "status.json")
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def last_step(run_dir: Path) -> int:
    """The last step a run logged (status.json or the last complete steps.jsonl row)."""
    step = 0
    status = read_status(run_dir)
    if status and isinstance(status.get("step"), int):
        step = status["step"]
    path = Path(run_dir) / "steps.jsonl"
    if path.exists():
        row = _last_jsonl_row(path)
        if row and isinstance(row.get("step"), int):
            step = max(step, row["step"])
    return step


def _last_jsonl_row(path: Path) -> dict | None:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 65536))
        lines = f.read().splitlines()
    for line in reversed(lines):
        try:
            return json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
    return None


def final_metrics(run_dir: Path) -> dict:
    """{metric: value} of the last evaluation of each metric."""
    out = {}
    for row in io.read_jsonl(Path(run_dir) / "evals.jsonl"):
        if "metric" in row:
            out[row["metric"]] = row.get("value")
    return out


def is_diverged(status: dict | None) -> bool:
    if not status or status.get("state") != "failed":
        return False
    if status.get("error"):
        return status["error"] == "divergence"
    return "non-finite" in str(status.get("reason") or "")


def write_failed(run_dir: Path, step: int, reason: str, error: str) -> None:
    """Record a failure atomically, keeping the clocks bench.train had recorded."""
    old = read_status(run_dir) or {}
    io.write_json(Path(run_dir) / "status.json", {
        "state": "failed", "step": int(step), "reason": reason, "error": error,
        "train_seconds": old.get("train_seconds", 0.0), "eval_seconds": old.get("eval_seconds", 0.0)})


def machine_info() -> dict:
    """Where a run ran (machine.json; the report lists these)."""
    info = {"hostname": socket.gethostname(), "platform": platform.platform(), "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    return info


def expected_record(config: dict) -> dict:
    """What bench.train will write as config.json for this config (to compare before running)."""
    from bench.train import TrainConfig, run_record

    return json.loads(io.dumps(run_record(TrainConfig.from_dict(config))))


def check_conflict(run: RunSpec, run_dir: Path) -> str | None:
    """None when the folder is empty or holds this very config; else what differs."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        return None
    try:
        old = json.loads(io.dumps(io.read_json(path)))
    except json.JSONDecodeError:
        return "its config.json is unreadable"
    new = expected_record(run.config)
    if old == new:
        return None
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    details = []
    for k in changed[:4]:
        details.append(f"{k}: {_short(old.get(k))} there, {_short(new.get(k))} requested")
    return "; ".join(details) + (f"; and {len(changed) - 4} more" if len(changed) > 4 else "")


def _short(v) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 60 else s[:57] + "..."


# ----------------------------------------------------------------------------------------------
# Executing one run (in this process, a worker process, or a Slurm job).


def resolve_train_fn(train_fn: str | Callable | None) -> Callable:
    if callable(train_fn):
        return train_fn
    module, _, name = (train_fn or DEFAULT_TRAIN_FN).partition(":")
    return getattr(importlib.import_module(module), name)


def _train_fn_ref(train_fn: str | Callable | None) -> str:
    """A string reference that a fresh process can import."""
    if train_fn is None or isinstance(train_fn, str):
        return train_fn or DEFAULT_TRAIN_FN
    return f"{train_fn.__module__}:{train_fn.__qualname__}"


def should_run(status: dict | None, retry_failed: bool) -> bool:
    if status is None:
        return True
    state = status.get("state")
    if state == "done":
        return False
    if state == "failed" and is_diverged(status) and not retry_failed:
        return False
    return True


def execute_run(run: RunSpec | dict, run_dir: str | os.PathLike, train_fn: str | Callable | None = None,
                retry_failed: bool = False, events=None) -> dict:
    """Train one run into `run_dir` unless it is finished; never raises for a failed run.

    Returns a RunOutcome as a dict. Any exception of training (divergence, out of memory, a bug)
    is written to status.json as ``failed`` with the reason and the last step, its traceback to
    error.log. KeyboardInterrupt propagates and leaves the run resumable.
    """
    run = run if isinstance(run, RunSpec) else RunSpec.from_dict(run)
    run_dir = Path(run_dir)
    status = read_status(run_dir)
    if not should_run(status, retry_failed):
        return _skipped(run, run_dir, status)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = _try_lock(run_dir)
    if lock is None:
        return _skipped(run, run_dir, read_status(run_dir) or {}, "running in another process (its folder is locked)")
    try:
        return _execute_locked(run, run_dir, train_fn, retry_failed, events)
    finally:
        lock.close()


def _skipped(run: RunSpec, run_dir: Path, status: dict, reason: str | None = None) -> dict:
    return RunOutcome(run.key, str(run_dir), status.get("state", "running"), "skipped", status.get("step"),
                      reason or status.get("reason"), 0.0, final_metrics(run_dir)).as_dict()


def _try_lock(run_dir: Path):
    """An exclusive lock on the run folder (released when the process ends), or None if taken."""
    import fcntl

    f = open(run_dir / ".lock", "a")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return None
    return f


def _execute_locked(run: RunSpec, run_dir: Path, train_fn, retry_failed: bool, events) -> dict:
    status = read_status(run_dir)  # again: another process may have finished it meanwhile
    if not should_run(status, retry_failed):
        return _skipped(run, run_dir, status)
    action = "resumed" if (run_dir / "checkpoint.pt").exists() else "ran"
    start = time.time()
    try:
        from bench.train import TrainConfig

        cfg = TrainConfig.from_dict(run.config, where=f"run {run.key}")
        io.write_json(run_dir / "machine.json", {**machine_info(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        fn = resolve_train_fn(train_fn)
        if events is not None:
            fn(cfg, run_dir, events)
        else:
            fn(cfg, run_dir)
        status = read_status(run_dir)
        if not status or status.get("state") != "done":
            # train() returned normally: the run is complete even if it did not say so.
            old = status or {}
            io.write_json(run_dir / "status.json", {
                "state": "done", "step": cfg.iters, "reason": None,
                "train_seconds": old.get("train_seconds", 0.0), "eval_seconds": old.get("eval_seconds", 0.0)})
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 -- one run's failure must not stop the others
        if isinstance(exc, SystemExit) and exc.code in (0, None):
            raise
        kind, reason = classify_exception(exc)
        step = getattr(exc, "step", None)
        step = last_step(run_dir) if not isinstance(step, int) else step
        try:
            io.atomic_write_bytes(run_dir / "error.log", "".join(
                traceback.format_exception(type(exc), exc, exc.__traceback__)).encode())
        except OSError:
            pass
        now = read_status(run_dir) or {}
        if now.get("state") == "failed" and kind == "divergence":
            # bench.train recorded the divergence itself: keep its reason and step, add the kind.
            io.write_json(run_dir / "status.json", {**now, "error": kind})
        else:
            write_failed(run_dir, step, reason, kind)
    status = read_status(run_dir) or {}
    return RunOutcome(run.key, str(run_dir), status.get("state", "failed"), action, status.get("step"),
                      status.get("reason"), time.time() - start, final_metrics(run_dir)).as_dict()


def classify_exception(exc: BaseException) -> tuple[str, str]:
    """(kind, one-line reason): kind is divergence, oom or exception."""
    from bench.errors import DivergenceError

    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, DivergenceError):
        return "divergence", text or "training diverged"
    name = type(exc).__name__
    if isinstance(exc, MemoryError) or name == "OutOfMemoryError" or "out of memory" in text.lower():
        return "oom", f"out of memory ({name}: {text[:200]}); lower batch_size or use a larger device"
    if isinstance(exc, BenchError):
        return "exception", text[:300]
    return "exception", f"{name}: {text[:300]}"


class RunJob:
    """A Slurm (submitit) job: one run. Checkpointable: on timeout or preemption submitit
    requeues it, and bench.train resumes from the run's last checkpoint."""

    def __init__(self, run: dict, run_dir: str, train_fn: str, retry_failed: bool):
        self.run, self.run_dir, self.train_fn, self.retry_failed = run, run_dir, train_fn, retry_failed

    def __call__(self) -> dict:
        return execute_run(self.run, self.run_dir, self.train_fn, self.retry_failed)

    def checkpoint(self, *args, **kwargs):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self)


def _worker_main(payload_path: str) -> int:
    """Entry point of a local worker process: ``python -m bench.runner worker PAYLOAD.json``."""
    payload = json.loads(Path(payload_path).read_text())
    from bench.perf import tune_allocator

    tune_allocator()
    try:
        import torch

        torch.set_num_threads(int(payload["threads"]))
    except ImportError:
        pass
    execute_run(payload["run"], payload["run_dir"], payload["train_fn"], payload["retry_failed"])
    return 0


def _start_worker(run: RunSpec, run_dir: Path, train_fn: str, retry_failed: bool, threads: int):
    """A fresh Python process for one run (nothing inherited but the environment and sys.path);
    its output goes to the run's worker.log."""
    import subprocess
    import sys

    run_dir.mkdir(parents=True, exist_ok=True)
    payload = run_dir / ".worker.json"
    io.write_json(payload, {"run": run.to_dict(), "run_dir": str(run_dir), "train_fn": train_fn,
                            "retry_failed": retry_failed, "threads": threads})
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join(p for p in [str(Path(__file__).resolve().parent.parent), *sys.path] if p))
    log = open(run_dir / "worker.log", "ab")
    try:
        return subprocess.Popen([sys.executable, "-m", "bench.runner", "worker", str(payload)], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    finally:
        log.close()


# ----------------------------------------------------------------------------------------------
# Progress display.


class Reporter:
    """Receives the runner's events; the base class ignores them all."""

    def suite_start(self, suite: Suite, todo: list[RunSpec], total: int) -> None: ...
    def run_start(self, run: RunSpec) -> None: ...
    def run_step(self, run: RunSpec, step: int, iters: int) -> None: ...
    def run_eval(self, run: RunSpec, step: int, rows: list[dict], evaluating: bool = False) -> None: ...
    def run_end(self, run: RunSpec, outcome: RunOutcome) -> None: ...
    def message(self, text: str) -> None: ...
    def suite_end(self, result: SuiteResult) -> None: ...


class CallbackReporter(Reporter):
    """Calls fn(event_dict) for every event (for tools and tests)."""

    def __init__(self, fn: Callable[[dict], Any]):
        self.fn = fn

    def suite_start(self, suite, todo, total):
        self.fn({"event": "suite_start", "suite": suite.name, "todo": [r.key for r in todo], "total": total})

    def run_start(self, run):
        self.fn({"event": "run_start", "run": run.key})

    def run_step(self, run, step, iters):
        self.fn({"event": "step", "run": run.key, "step": step, "iters": iters})

    def run_eval(self, run, step, rows, evaluating=False):
        self.fn({"event": "evaluating" if evaluating else "eval", "run": run.key, "step": step, "rows": rows})

    def run_end(self, run, outcome):
        self.fn({"event": "run_end", "run": run.key, **outcome.as_dict()})

    def message(self, text):
        self.fn({"event": "message", "text": text})

    def suite_end(self, result):
        self.fn({"event": "suite_end", "suite": result.suite, "outcomes": [o.as_dict() for o in result.outcomes]})


def escape(text: str) -> str:
    """Text shown through rich, with its markup characters escaped."""
    from rich.markup import escape as _escape

    return _escape(str(text))


def _fmt_eval(rows: list[dict]) -> str:
    return ", ".join(f"{r.get('metric')}={r.get('value'):.4g}" for r in rows
                     if isinstance(r.get("value"), (int, float)))


class RichReporter(Reporter):
    """A live rich display: the suite's runs, each running run's iterations and its last evaluation;
    then a summary table. Without a terminal it prints one line per event instead."""

    def __init__(self, console=None, live: bool | None = None):
        from rich.console import Console

        self.console = console or Console()
        self.live = self.console.is_terminal if live is None else live
        self.progress = None
        self.tasks: dict[str, int] = {}
        self.suite_task = None
        self.metric = None
        self.lock = threading.Lock()
        self._last_line: dict[str, float] = {}

    def suite_start(self, suite, todo, total):
        self.metric = suite.report.get("metric")
        self.console.print(f"[bold]suite {suite.name}[/bold]: {total} runs, {total - len(todo)} already finished, "
                           f"{len(todo)} to run")
        if self.live and todo:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TimeRemainingColumn(), console=self.console)
            self.progress.start()
            self.suite_task = self.progress.add_task(f"suite {suite.name}", total=len(todo))

    def run_start(self, run):
        with self.lock:
            if self.progress:
                self.tasks[run.key] = self.progress.add_task(f"  {escape(run.key)}", total=run.config["iters"])
            else:
                self.console.print(f"start {escape(run.key)}")

    def run_step(self, run, step, iters):
        with self.lock:
            if self.progress and run.key in self.tasks:
                self.progress.update(self.tasks[run.key], completed=step)
            elif not self.progress:
                now = time.time()
                if now - self._last_line.get(run.key, 0) > 30:
                    self._last_line[run.key] = now
                    self.console.print(f"  {escape(run.key)}: step {step}/{iters}")

    def run_eval(self, run, step, rows, evaluating=False):
        with self.lock:
            text = escape(f"evaluating at step {step}..." if evaluating else f"eval @ {step}: {_fmt_eval(rows)}")
            if self.progress and run.key in self.tasks:
                self.progress.update(self.tasks[run.key], description=f"  {escape(run.key)}  [dim]{text}[/dim]")
            elif not self.progress and not evaluating:
                self.console.print(f"  {escape(run.key)}: {text}")

    def run_end(self, run, outcome):
        with self.lock:
            if self.progress:
                task = self.tasks.pop(run.key, None)
                if task is not None:
                    self.progress.remove_task(task)
                self.progress.advance(self.suite_task)
            colour = {"done": "green", "failed": "red"}.get(outcome.state, "yellow")
            extra = f": {escape(outcome.reason)}" if outcome.state == "failed" and outcome.reason else ""
            self.console.print(f"[{colour}]{outcome.state}[/{colour}] {escape(run.key)} ({outcome.action}, "
                               f"{format_duration(outcome.seconds)}){extra}")

    def message(self, text):
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def suite_end(self, result):
        if self.progress:
            self.progress.stop()
            self.progress = None
        if result.plan:
            return
        self.console.print(summary_table(result, self.metric))


def summary_table(result: SuiteResult, metric: str | None = None):
    """A rich table of every run: state, last step, final metric, time, and the reason of a failure."""
    from rich.table import Table

    metrics = [metric] if metric else sorted({m for o in result.outcomes for m in o.final})
    workloads = sorted({o.key.split("/")[0] for o in result.outcomes})
    title = (f"suite {result.suite}: {len(result.by_state('done'))}/{len(result.outcomes)} done, "
             f"{len(result.by_state('failed'))} failed")
    if len(workloads) == 1:
        title += f" ({workloads[0]})"
    table = Table(title=title, caption=f"results in {result.suite_dir}")
    if len(workloads) > 1:
        table.add_column("workload", no_wrap=True)
    table.add_column("method", no_wrap=True)
    for col in ("seed", "state", "step", *metrics, "time"):
        table.add_column(col, justify="left" if col == "state" else "right", no_wrap=True)
    table.add_column("note", ratio=1, overflow="fold")
    for o in result.outcomes:
        workload, label, seed = o.key.split("/")
        colour = {"done": "green", "failed": "red"}.get(o.state, "yellow")
        vals = [f"{o.final[m]:.4g}" if isinstance(o.final.get(m), (int, float)) else "-" for m in metrics]
        note = escape(o.reason or ("" if o.action in ("ran", "resumed") else o.action))
        if o.action == "resumed":
            note = ("resumed; " + note).strip("; ")
        cells = [workload] if len(workloads) > 1 else []
        cells += [label, seed.removeprefix("seed"), f"[{colour}]{o.state}[/{colour}]",
                  "-" if o.step is None else str(o.step), *vals,
                  format_duration(o.seconds) if o.seconds else "-", note]
        table.add_row(*cells)
    return table


def make_reporter(progress) -> Reporter:
    if isinstance(progress, Reporter):
        return progress
    if progress is False:
        return Reporter()
    if callable(progress):
        return CallbackReporter(progress)
    return RichReporter(live=None if progress is None else bool(progress))


class FilePoller:
    """Follows runs that execute elsewhere (worker processes, Slurm jobs) through their files:
    the last step in status.json / steps.jsonl, new rows of evals.jsonl."""

    def __init__(self, reporter: Reporter, interval: float = 1.0):
        self.reporter, self.interval = reporter, interval
        self.active: dict[str, tuple[RunSpec, Path]] = {}
        self.eval_offsets: dict[str, int] = {}
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join(timeout=5)

    def add(self, run: RunSpec, run_dir: Path):
        with self.lock:
            self.active[run.key] = (run, run_dir)
            p = run_dir / "evals.jsonl"
            self.eval_offsets[run.key] = p.stat().st_size if p.exists() else 0

    def remove(self, run: RunSpec):
        with self.lock:
            self.active.pop(run.key, None)

    def poll(self):
        with self.lock:
            items = list(self.active.values())
        for run, run_dir in items:
            try:
                self.reporter.run_step(run, last_step(run_dir), run.config["iters"])
                p = run_dir / "evals.jsonl"
                if p.exists():
                    off = self.eval_offsets.get(run.key, 0)
                    with open(p, "rb") as f:
                        f.seek(off)
                        data = f.read()
                    end = data.rfind(b"\n") + 1
                    if end:
                        rows = [json.loads(x) for x in data[:end].splitlines() if x.strip()]
                        self.eval_offsets[run.key] = off + end
                        if rows:
                            self.reporter.run_eval(run, rows[-1].get("step", 0), rows)
            except (OSError, json.JSONDecodeError, ValueError):
                continue

    def _loop(self):
        while not self._stop.wait(self.interval):
            self.poll()


# ----------------------------------------------------------------------------------------------
# The suite.


def run_suite(suite: Suite | str | os.PathLike, executor: str = "local", jobs: int = 1, dry_run: bool = False,
              results_root: str | os.PathLike = "results", progress=None, *, slurm: dict | None = None,
              retry_failed: bool = False, only: str | list[str] | None = None,
              train_fn: str | Callable | None = None, wait: bool = True) -> SuiteResult:
    """Run every unfinished run of a suite; return what happened to each.

    suite:        a Suite, or a suite name / TOML path (loaded and validated first).
    executor:     "local" (this process when jobs == 1, else `jobs` worker processes), "slurm"
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
    train_fn:     the training function (default bench.train:train), a callable or "module:function".
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
    suite_dir = Path(results_root) / suite.name
    runs = suite.runs()
    if only:
        patterns = [only] if isinstance(only, str) else list(only)
        runs = [r for r in runs if any(fnmatch.fnmatchcase(r.key, p) for p in patterns)]
        if not runs:
            raise ConfigError(f"--only {patterns} matches no run of suite {suite.name}; run keys look like "
                              f"{suite.runs()[0].key}")
    dirs = {r.key: r.run_dir(results_root) for r in runs}

    # Refuse to mix configurations, before anything runs.
    conflicts = []
    for r in runs:
        why = check_conflict(r, dirs[r.key])
        if why:
            conflicts.append(f"{dirs[r.key]} ({why})")
    if conflicts:
        more = f" and {len(conflicts) - 3} more" if len(conflicts) > 3 else ""
        raise ResultsConflictError(
            f"results of another configuration are in the way: {'; '.join(conflicts[:3])}{more}. Refusing to mix "
            f"them: move or delete those folders, rename the suite, or pass another results root")

    statuses = {r.key: read_status(dirs[r.key]) for r in runs}
    reporter = make_reporter(progress)

    if dry_run:
        states = {k: (s or {}).get("state", "todo") for k, s in statuses.items()}
        plan = describe_plan(_subset(suite, runs), states, jobs)
        reporter.message(plan)
        outcomes = [RunOutcome(r.key, str(dirs[r.key]), states[r.key], "planned",
                               (statuses[r.key] or {}).get("step")) for r in runs]
        result = SuiteResult(suite.name, suite_dir, outcomes, plan=plan)
        reporter.suite_end(result)
        return result

    suite_dir.mkdir(parents=True, exist_ok=True)
    io.write_json(suite_dir / "suite.json", suite.to_dict())
    todo = [r for r in runs if should_run(statuses[r.key], retry_failed)]
    todo_keys = {r.key for r in todo}
    reporter.suite_start(suite, todo, len(runs))
    outcomes: dict[str, RunOutcome] = {}
    for r in runs:
        if r.key not in todo_keys:
            outcomes[r.key] = _outcome(_skipped(r, dirs[r.key], statuses[r.key]))
    try:
        if executor == "local" and jobs == 1:
            _run_inline(todo, dirs, train_fn, retry_failed, reporter, outcomes)
        elif executor == "local":
            _run_workers(todo, dirs, train_fn, retry_failed, reporter, outcomes, jobs)
        else:
            cluster = {"slurm": "slurm", "submitit-local": "local", "submitit-debug": "debug"}[executor]
            _run_submitit(suite, todo, dirs, train_fn, retry_failed, reporter, outcomes, cluster,
                          {**suite.slurm, **(slurm or {})}, suite_dir, wait)
    finally:
        result = SuiteResult(suite.name, suite_dir, [outcomes[r.key] for r in runs if r.key in outcomes])
        reporter.suite_end(result)
    return result


def _subset(suite: Suite, runs: list[RunSpec]) -> Suite:
    import copy

    s = copy.copy(suite)
    s._runs = list(runs)
    return s


def _outcome(d: dict) -> RunOutcome:
    return RunOutcome(**d)


class _RunEvents:
    """bench.train.TrainEvents for one run of this process: forwards to the suite's reporter,
    and says "evaluating" as the step that evaluates ends (the evaluation follows it)."""

    def __init__(self, reporter, run: RunSpec, evaluating: bool):
        self.reporter, self.run, self.evaluating = reporter, run, evaluating
        self.every = run.config.get("eval_every") or 0

    def on_step(self, step: int, iters: int, row: dict) -> None:
        self.reporter.run_step(self.run, step, iters)
        if self.evaluating and is_eval_step(step, iters, self.every):
            self.reporter.run_eval(self.run, step, [], evaluating=True)

    def on_eval(self, step: int, rows: list[dict]) -> None:
        self.reporter.run_eval(self.run, step, rows)


def _run_inline(todo, dirs, train_fn, retry_failed, reporter, outcomes):
    for run in todo:
        reporter.run_start(run)
        evaluating = evaluates(run.config.get("eval"), run.config.get("eval_every") or 0)

        fn = resolve_train_fn(train_fn)
        events = _RunEvents(reporter, run, evaluating)
        out = _outcome(execute_run(run, dirs[run.key], fn, retry_failed, events))
        outcomes[run.key] = out
        reporter.run_end(run, out)


def _prepare_evaluators(todo, reporter):
    """Train proxy classifiers and reference statistics once, before parallel workers race to."""
    from bench.evaluate import Evaluator
    from bench.train import TrainConfig, evaluator_spec

    seen = set()
    for run in todo:
        cfg = TrainConfig.from_dict(run.config)
        key = json.dumps(evaluator_spec(cfg), sort_keys=True)
        if cfg.eval and key not in seen:
            seen.add(key)
            reporter.message(f"preparing evaluation on {cfg.dataset} (feature extractor and reference statistics; "
                             "cached after the first time)")
            Evaluator(evaluator_spec(cfg)).prepare()


def _run_workers(todo, dirs, train_fn, retry_failed, reporter, outcomes, jobs):
    threads = max(1, (os.cpu_count() or 1) // jobs)
    if train_fn is None:
        _prepare_evaluators(todo, reporter)
    ref = _train_fn_ref(train_fn)
    pending = list(todo)
    active: dict[str, tuple[RunSpec, Any, float]] = {}
    resumed: set[str] = set()
    with FilePoller(reporter) as poller:
        try:
            while pending or active:
                while pending and len(active) < jobs:
                    run = pending.pop(0)
                    if (dirs[run.key] / "checkpoint.pt").exists():
                        resumed.add(run.key)
                    reporter.run_start(run)
                    proc = _start_worker(run, dirs[run.key], ref, retry_failed, threads)
                    active[run.key] = (run, proc, time.time())
                    poller.add(run, dirs[run.key])
                time.sleep(0.2)
                for key, (run, proc, started) in list(active.items()):
                    code = proc.poll()
                    if code is None:
                        continue
                    del active[key]
                    poller.remove(run)
                    status = read_status(dirs[key])
                    if code != 0 and (not status or status.get("state") not in ("done", "failed")):
                        why = (f"worker process killed by signal {-code}"
                               + (" (SIGKILL: most often the system ran out of memory)" if code == -9 else "")
                               if code < 0 else f"worker process exited with code {code}")
                        write_failed(dirs[key], last_step(dirs[key]), why + f"; see {dirs[key] / 'worker.log'}",
                                     "oom" if code == -9 else "exception")
                        status = read_status(dirs[key])
                    status = status or {}
                    out = RunOutcome(key, str(dirs[key]), status.get("state", "failed"),
                                     "resumed" if key in resumed else "ran",
                                     status.get("step"), status.get("reason"), time.time() - started,
                                     final_metrics(dirs[key]))
                    outcomes[key] = out
                    reporter.run_end(run, out)
        finally:
            for run, proc, _ in active.values():  # interrupted: stop our workers, runs stay resumable
                if proc.poll() is None:
                    proc.terminate()
                try:
                    proc.wait(timeout=10)
                except Exception:  # noqa: BLE001
                    proc.kill()


def slurm_parameters(settings: dict, suite_name: str, cluster: str) -> dict:
    """submitit AutoExecutor parameters from a [slurm] table (plus overrides)."""
    known = {"partition", "gpus", "time", "account", "qos", "constraint", "cpus_per_task", "mem_gb",
             "array_parallelism", "max_num_timeout", "setup", "additional", "name"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ConfigError(f"unknown Slurm setting {unknown[0]!r}; known: {', '.join(sorted(known))}")
    p: dict[str, Any] = {"name": settings.get("name") or f"diffbench-{suite_name}"}
    try:
        return _slurm_parameters(settings, p, cluster)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"Slurm settings: {exc}; e.g. time=48:00:00 gpus=1 mem_gb=64 partition=gpu") from None


def _slurm_parameters(settings: dict, p: dict, cluster: str) -> dict:
    from bench.suite import parse_slurm_time

    if "time" in settings:
        p["timeout_min"] = parse_slurm_time(settings["time"])
    if "gpus" in settings and cluster == "slurm":
        p["gpus_per_node"] = int(settings["gpus"])
    if "cpus_per_task" in settings:
        p["cpus_per_task"] = int(settings["cpus_per_task"])
    if "mem_gb" in settings:
        p["mem_gb"] = float(settings["mem_gb"])
    for key in ("partition", "account", "qos", "constraint"):
        if settings.get(key) not in (None, ""):
            p[f"slurm_{key}"] = str(settings[key])
    for key in ("array_parallelism", "max_num_timeout"):
        if settings.get(key) not in (None, ""):
            p[f"slurm_{key}"] = int(settings[key])
    if settings.get("setup"):
        setup = settings["setup"]
        p["slurm_setup"] = [setup] if isinstance(setup, str) else list(setup)
    if settings.get("additional"):
        p["slurm_additional_parameters"] = dict(settings["additional"])
    return p


SLURM_ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING",
                "REQUEUE_HOLD", "REQUEUE_FED", "STAGE_OUT", "SIGNALING"}


def _queued_slurm_job(run_dir: Path) -> bool:
    """Whether the run's last submitted Slurm job (job.json) is still pending or running."""
    import subprocess

    info = None
    try:
        info = io.read_json(run_dir / "job.json")
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    if info.get("cluster") != "slurm":
        return False
    try:
        out = subprocess.run(["squeue", "-h", "-j", str(info["job_id"]), "-o", "%T"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return any(line.strip() in SLURM_ACTIVE for line in out.stdout.splitlines())


def _run_submitit(suite, todo, dirs, train_fn, retry_failed, reporter, outcomes, cluster, settings, suite_dir,
                  wait):
    try:
        import submitit
    except ImportError:
        raise ConfigError("the Slurm executor needs submitit: pip install submitit") from None
    if not todo:
        return
    if cluster == "slurm":
        queued = [r for r in todo if _queued_slurm_job(dirs[r.key])]
        for run in queued:
            job = io.read_json(dirs[run.key] / "job.json")["job_id"]
            outcomes[run.key] = RunOutcome(run.key, str(dirs[run.key]), "submitted", "skipped",
                                           reason=f"already queued or running as Slurm job {job}")
        todo = [r for r in todo if r not in queued]
        if queued:
            reporter.message(f"{len(queued)} runs are already queued or running on Slurm: not submitted again")
        if not todo:
            return
    folder = suite_dir / "_submitit"
    params = slurm_parameters(settings, suite.name, cluster)
    ref = _train_fn_ref(train_fn)
    jobs = []
    try:
        executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=cluster)
        executor.update_parameters(**params)
        with executor.batch():
            for run in todo:
                jobs.append((run, executor.submit(RunJob(run.to_dict(), str(dirs[run.key]), ref, retry_failed))))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        raise ConfigError(f"could not submit the job array through submitit ({cluster}): {type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}; "
                          "run from a Slurm login node (srun and sbatch on PATH), or use --executor local") from None
    for run, job in jobs:
        io.write_json(dirs[run.key] / "job.json", {"job_id": str(job.job_id), "cluster": cluster,
                                                   "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    ids = ", ".join(sorted({str(j.job_id).split("_")[0] for _, j in jobs}))
    reporter.message(f"submitted {len(jobs)} runs as job array {ids} ({cluster}); logs in {folder}")
    if not wait:
        for run, job in jobs:
            outcomes[run.key] = RunOutcome(run.key, str(dirs[run.key]), "submitted", "submitted",
                                           reason=f"job {job.job_id}")
        return
    started = time.time()
    try:
        _wait_jobs(jobs, dirs, reporter, outcomes, cluster, started)
    except KeyboardInterrupt:
        if cluster == "slurm":
            reporter.message("stopped waiting; the jobs keep running on the cluster. Run the same command again "
                             "to follow them (queued runs are not submitted twice), or build the report later")
        raise


def _wait_jobs(jobs, dirs, reporter, outcomes, cluster, started):
    with FilePoller(reporter, interval=2.0) as poller:
        for run, _ in jobs:
            reporter.run_start(run)
            poller.add(run, dirs[run.key])
        remaining = list(jobs)
        while remaining:
            for item in list(remaining):
                run, job = item
                if cluster != "debug" and not job.done():
                    continue
                remaining.remove(item)
                poller.remove(run)
                try:
                    out = _outcome(job.result())
                except Exception as exc:  # noqa: BLE001 -- the job died outside execute_run
                    status = read_status(dirs[run.key])
                    if not status or status.get("state") not in ("done", "failed"):
                        text = str(exc).strip().splitlines()
                        write_failed(dirs[run.key], last_step(dirs[run.key]),
                                     f"job {job.job_id} failed: {type(exc).__name__}: "
                                     f"{(text[-1] if text else '')[:300]}", "exception")
                    status = read_status(dirs[run.key]) or {}
                    out = RunOutcome(run.key, str(dirs[run.key]), status.get("state", "failed"), "ran",
                                     status.get("step"), status.get("reason"), time.time() - started,
                                     final_metrics(dirs[run.key]))
                outcomes[run.key] = out
                reporter.run_end(run, out)
            if remaining:
                time.sleep(1.0)


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "worker":
        sys.exit(_worker_main(sys.argv[2]))
    sys.exit("usage: python -m bench.runner worker PAYLOAD.json (internal: one run of a suite)")
