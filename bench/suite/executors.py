"""Executing runs on this machine: one run in this process (:func:`execute_run`, also what a
worker process and a Slurm job call), a suite's runs inline or in N worker processes.

A run with ``gpus = N > 1`` is N processes: a worker started through torchrun (locally), or N
Slurm tasks; each calls :func:`execute_run`, rank 0 decides whether the run is due, holds its
folder's lock and records its outcome, and every rank trains.
"""

from __future__ import annotations

import importlib
import json
import os
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from bench import fileio
from bench.core.eval_steps import evaluates, is_eval_step
from bench.errors import BenchError, DivergenceError
from bench.suite.exits import JobRequeued, exit_in_words, signal_in_words
from bench.suite.grid import RunSpec
from bench.suite.poller import FilePoller
from bench.suite.workers import die_with_parent, start_worker, worker_records
from bench.train.run_folder import (
    LOCKED,
    RunOutcome,
    last_step,
    machine_info,
    outcome_from_dict,
    outcome_from_status,
    read_status,
    should_run,
    try_lock,
    write_failed,
    write_status,
)

DEFAULT_TRAIN_FN = "bench.train.loop:train"

def resolve_train_fn(train_fn: str | Callable | None) -> Callable:
    if callable(train_fn):
        return train_fn
    module, _, name = (train_fn or DEFAULT_TRAIN_FN).partition(":")
    return getattr(importlib.import_module(module), name)


def train_fn_ref(train_fn: str | Callable | None) -> str:
    """A string reference that a fresh process can import."""
    if train_fn is None or isinstance(train_fn, str):
        return train_fn or DEFAULT_TRAIN_FN
    return f"{train_fn.__module__}:{train_fn.__qualname__}"


def execute_run(run: RunSpec | dict, run_dir: str | os.PathLike, train_fn: str | Callable | None = None,
                retry_failed: bool = False, events=None) -> dict:
    """Train one run into `run_dir` unless it is finished; never raises for a failed run.

    Returns a RunOutcome as a dict. Any exception of training (divergence, out of memory, a bug)
    is written to status.json as ``failed`` with the reason and the last step, its traceback to
    error.log. KeyboardInterrupt, StopRequested and submitit's requeue (JobRequeued) propagate and
    leave the run resumable.
    """
    run = run if isinstance(run, RunSpec) else RunSpec.from_dict(run)
    run_dir = Path(run_dir)
    # torch on first use: the runner and its worker pool start without torch
    from bench.core.runtime import world

    if world()[1] > 1:
        return _execute_rank(run, run_dir, train_fn, retry_failed, events)
    status = read_status(run_dir)
    if not should_run(status, retry_failed):
        return skipped_outcome(run, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = try_lock(run_dir)
    if lock is None:
        return skipped_outcome(run, run_dir, LOCKED)
    try:
        return _execute_locked(run, run_dir, train_fn, retry_failed, events)
    finally:
        lock.close()


def _execute_rank(run: RunSpec, run_dir: Path, train_fn, retry_failed: bool, events) -> dict:
    """execute_run in one of the N processes of a multi-process run. A failure that only this
    process sees (rank > 0) goes to error.rank<k>.log and is raised, so that torchrun or srun
    stops the others instead of leaving them waiting in a collective."""
    # torch on first use: the runner and its worker pool start without torch
    from bench.core.runtime import StopRequested, broadcast, is_main, make_runtime, world
    from bench.train.resolve import resolve_run

    if not should_run(read_status(run_dir), retry_failed):  # every rank reads the same finished status
        return skipped_outcome(run, run_dir)
    main, lock, why = is_main(), None, None
    try:
        resolved = resolve_run(run.config, where=f"run {run.key}")
        make_runtime(resolved.config)  # joins the process group (every rank, or none, fails here)
    except Exception as exc:  # noqa: BLE001 -- recorded by rank 0, like any failure of the run
        if main:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_failed(run_dir, last_step(run_dir), classify_exception(exc)[1], "exception")
        return outcome_from_status(run.key, run_dir, "ran").as_dict()
    if main:  # rank 0 decides, for all: is the run still due, and is its folder free?
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = try_lock(run_dir)
        if lock is None:
            why = LOCKED
        elif not should_run(read_status(run_dir), retry_failed):  # finished meanwhile
            why = "done"
    why = broadcast(why)
    if why is not None:
        if lock is not None:
            lock.close()
        return skipped_outcome(run, run_dir, None if why == "done" else why)
    if main:
        try:
            return _execute_locked(run, run_dir, train_fn, retry_failed, events)
        finally:
            lock.close()
    try:
        fn = resolve_train_fn(train_fn)
        fn(resolved, run_dir, events) if events is not None else fn(resolved, run_dir)
    except (KeyboardInterrupt, StopRequested):
        raise
    except BenchError:  # divergence, a bad checkpoint: rank 0 meets the same and records it
        pass
    except BaseException as exc:
        fileio.atomic_write_bytes(run_dir / f"error.rank{world()[0]}.log", "".join(
            traceback.format_exception(type(exc), exc, exc.__traceback__)).encode())
        raise
    return outcome_from_status(run.key, run_dir, "ran").as_dict()


def skipped_outcome(run: RunSpec, run_dir: Path, reason: str | None = None) -> dict:
    """The outcome of a run left as it is, read from its folder."""
    return outcome_from_status(run.key, run_dir, "skipped", reason=reason, default_state="running").as_dict()


def _execute_locked(run: RunSpec, run_dir: Path, train_fn, retry_failed: bool, events) -> dict:
    status = read_status(run_dir)  # again: another process may have finished it meanwhile
    if not should_run(status, retry_failed):
        return skipped_outcome(run, run_dir)
    action = "resumed" if (run_dir / "checkpoint.pt").exists() else "ran"
    start = time.time()
    # torch on first use: the runner and its worker pool start without torch
    from bench.core.runtime import StopRequested

    try:
        # torch on first use: the runner and its worker pool start without torch
        from bench.train.resolve import resolve_run

        resolved = resolve_run(run.config, where=f"run {run.key}")
        fileio.write_json(run_dir / "machine.json", {**machine_info(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        fn = resolve_train_fn(train_fn)
        if events is not None:
            fn(resolved, run_dir, events)
        else:
            fn(resolved, run_dir)
        status = read_status(run_dir)
        if not status or status.get("state") != "done":
            # train() returned normally: the run is complete even if it did not say so.
            write_status(run_dir, "done", resolved.config.iters)
    except (KeyboardInterrupt, StopRequested, JobRequeued):  # the run stays resumable
        raise
    except BaseException as exc:  # noqa: BLE001 -- one run's failure must not stop the others
        if isinstance(exc, SystemExit) and exc.code in (0, None):
            raise
        kind, reason = classify_exception(exc)
        step = getattr(exc, "step", None)
        step = last_step(run_dir) if not isinstance(step, int) else step
        try:
            fileio.atomic_write_bytes(run_dir / "error.log", "".join(
                traceback.format_exception(type(exc), exc, exc.__traceback__)).encode())
        except OSError:
            pass
        now = read_status(run_dir) or {}
        if not (now.get("state") == "failed" and kind == "divergence"):  # train records a divergence itself
            write_failed(run_dir, step, reason, kind)
    return outcome_from_status(run.key, run_dir, action, time.time() - start).as_dict()


def classify_exception(exc: BaseException) -> tuple[str, str]:
    """(kind, one-line reason): kind is divergence, oom or exception."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, DivergenceError):
        return "divergence", text or "training diverged"
    name = type(exc).__name__
    if isinstance(exc, MemoryError) or name == "OutOfMemoryError" or "out of memory" in text.lower():
        return "oom", f"out of memory ({name}: {text[:200]}); lower batch_size or use a larger device"
    if isinstance(exc, BenchError):
        return "exception", text[:300]
    if isinstance(exc, SystemExit):  # sys.exit(n) inside training: say what n means
        return "exception", f"the run called sys.exit({exc.code!r}): " + (
            exit_in_words(exc.code) if isinstance(exc.code, int) else "a message as the exit status")
    return "exception", f"{name}: {text[:300]}"


def _worker_main(payload_path: str) -> int:
    """Entry point of a local worker process: ``python -m bench.suite.executors worker PAYLOAD.json``."""
    payload = json.loads(Path(payload_path).read_text())
    if payload.get("parent_pid"):
        die_with_parent(int(payload["parent_pid"]))
    # torch on first use: the runner and its worker pool start without torch
    from bench.core.perf import tune_allocator

    tune_allocator()
    try:
        import torch

        torch.set_num_threads(int(payload["threads"]))
    except ImportError:
        pass
    # torch on first use: the runner and its worker pool start without torch
    from bench.core.runtime import finish_processes

    try:
        out = execute_run(payload["run"], payload["run_dir"], payload["train_fn"], payload["retry_failed"])
    finally:
        finish_processes()
    if payload.get("outcome") and int(os.environ.get("RANK", 0)) == 0:  # the runner reads why (held elsewhere)
        fileio.write_json(Path(payload["outcome"]), out)
    # A failed multi-process run exits non-zero, so that torchrun stops the other processes.
    return 1 if out.get("state") == "failed" and int(os.environ.get("WORLD_SIZE", 1)) > 1 else 0


def held_elsewhere(run: RunSpec, run_dir: Path, reporter) -> RunOutcome:
    """A run whose folder another process holds: left to it, untouched, and said with the holder."""
    holder = fileio.lock_holder(run_dir / ".lock")
    reporter.message(f"{run.key} is held by another process ({holder or 'its pid unknown'}): left to it")
    return outcome_from_dict(skipped_outcome(run, run_dir, LOCKED))


class _RunEvents:
    """bench.train.loop.TrainEvents for one run of this process: forwards to the suite's reporter,
    and says "evaluating" as the step that evaluates ends (the evaluation follows it)."""

    def __init__(self, reporter, run: RunSpec, evaluating: bool):
        self.reporter, self.run, self.evaluating = reporter, run, evaluating
        self.every = run.config.get("eval_every") or 0

    def on_step(self, step: int, iters: int, row: dict) -> None:
        self.reporter.run_step(self.run, step, iters)
        if self.evaluating and is_eval_step(step, iters, self.every, self.run.config.get("budget_iters") or None):
            self.reporter.run_eval(self.run, step, [], evaluating=True)

    def on_eval(self, step: int, rows: list[dict]) -> None:
        self.reporter.run_eval(self.run, step, rows)


class Executor:
    """How a suite's runs execute; the runner picks one and calls :meth:`run`.

    Contract: ``run(todo)`` executes every run of `todo` (RunSpecs, none finished) into its folder
    ``dirs[run.key]`` (or, for a cluster, submits it: SubmititExecutor), reports what it executes
    through the reporter's ``run_start`` / ``run_end``, and returns ``{key: RunOutcome}`` for every run
    it ran, skipped or submitted. Outcomes are recorded in ``self.outcomes`` as runs end, so an
    interrupted ``run`` leaves the finished ones there for the suite's result. A failed run is an
    outcome, never an exception; an exception means the executor itself could not go on.
    """

    def __init__(self, dirs: dict[str, Path], reporter, train_fn: str | Callable | None = None,
                 retry_failed: bool = False):
        self.dirs, self.reporter, self.train_fn, self.retry_failed = dirs, reporter, train_fn, retry_failed
        self.outcomes: dict[str, RunOutcome] = {}

    def run(self, todo: list[RunSpec]) -> dict[str, RunOutcome]:
        raise NotImplementedError

    def _finished(self, run: RunSpec, out: RunOutcome) -> None:
        self.outcomes[run.key] = out
        self.reporter.run_end(run, out)


class InlineExecutor(Executor):
    """Every run in this process, one after another."""

    def run(self, todo: list[RunSpec]) -> dict[str, RunOutcome]:
        fn = resolve_train_fn(self.train_fn) if todo else None  # nothing to run: nothing imported
        for run in todo:
            self.reporter.run_start(run)
            evaluating = evaluates(run.config.get("eval"), run.config.get("eval_every") or 0)
            events = _RunEvents(self.reporter, run, evaluating)
            out = outcome_from_dict(execute_run(run, self.dirs[run.key], fn, self.retry_failed, events))
            if out.action == "skipped" and out.reason == LOCKED:
                out = held_elsewhere(run, self.dirs[run.key], self.reporter)
            self._finished(run, out)
        return self.outcomes


class _GpuPool:
    """Which GPUs each local worker sees (CUDA_VISIBLE_DEVICES): the least busy ones, so parallel
    workers spread over the machine's GPUs instead of all using GPU 0."""

    def __init__(self):
        import torch

        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        entries = [x.strip() for x in visible.split(",")] if visible else [str(i) for i in range(count)]
        # GPU UUIDs or MIG names: leave the workers' view alone rather than guess
        ids = [int(x) for x in entries] if all(x.isdigit() for x in entries) else []
        self.busy = {g: 0 for g in ids[:count]}

    def take(self, n: int) -> list[int] | None:
        if not self.busy:
            return None
        pick = sorted(self.busy, key=lambda g: (self.busy[g], g))[:n]
        for g in pick:
            self.busy[g] += 1
        return pick

    def give(self, gpus: list[int] | None) -> None:
        for g in gpus or []:
            self.busy[g] -= 1


class WorkerPool(Executor):
    """`jobs` worker processes at once (``python -m bench.suite.executors worker``), each training one
    run; a run of gpus = N > 1 is a worker of N processes started through torchrun."""

    def __init__(self, dirs: dict[str, Path], reporter, train_fn: str | Callable | None = None,
                 retry_failed: bool = False, jobs: int = 1):
        super().__init__(dirs, reporter, train_fn, retry_failed)
        self.jobs = jobs

    def run(self, todo: list[RunSpec]) -> dict[str, RunOutcome]:
        threads = max(1, (os.cpu_count() or 1) // self.jobs)
        gpu_pool = _GpuPool()
        ref = train_fn_ref(self.train_fn)
        pending = list(todo)
        active: dict[str, tuple[RunSpec, Any, float, list[int] | None]] = {}
        resumed: set[str] = set()
        with FilePoller(self.reporter) as poller:
            try:
                while pending or active:
                    while pending and len(active) < self.jobs:
                        run = pending.pop(0)
                        if not self._free(run):  # no worker, nothing written: another process holds it
                            self._finished(run, held_elsewhere(run, self.dirs[run.key], self.reporter))
                            continue
                        if (self.dirs[run.key] / "checkpoint.pt").exists():
                            resumed.add(run.key)
                        self.reporter.run_start(run)
                        gpus = gpu_pool.take(int(run.config.get("gpus", 1)))
                        proc = start_worker(run, self.dirs[run.key], ref, self.retry_failed, threads, gpus)
                        active[run.key] = (run, proc, time.time(), gpus)
                        poller.add(run, self.dirs[run.key])
                    time.sleep(0.2)
                    for key, (run, proc, started, gpus) in list(active.items()):
                        code = proc.poll()
                        if code is None:
                            continue
                        del active[key]
                        gpu_pool.give(gpus)
                        poller.remove(run)
                        self._reap(run, code, "resumed" if key in resumed else "ran", started)
            finally:
                for run, proc, _, _ in active.values():  # interrupted: stop our workers, runs stay resumable
                    if proc.poll() is None:
                        proc.terminate()
                    try:
                        proc.wait(timeout=10)
                    except Exception:  # noqa: BLE001
                        proc.kill()
        return self.outcomes

    def _free(self, run: RunSpec) -> bool:
        """Whether no other process holds the run's folder now (its worker takes the lock itself)."""
        if not self.dirs[run.key].is_dir():
            return True
        lock = try_lock(self.dirs[run.key])
        if lock is not None:
            lock.close()
        return lock is not None

    def _reap(self, run: RunSpec, code: int, action: str, started: float) -> None:
        """A worker ended with exit code `code`: its outcome, from the status it wrote (a worker that
        died before writing one, e.g. killed for memory, gets a failed status here, under the folder's
        lock: a folder another process holds is its, and left to it untouched)."""
        run_dir = self.dirs[run.key]
        payload, outcome = worker_records(run_dir)
        told = fileio.read_json(outcome) if outcome.is_file() else {}
        for record in (payload, outcome):
            record.unlink(missing_ok=True)
        if told.get("action") == "skipped" and told.get("reason") == LOCKED:
            return self._finished(run, held_elsewhere(run, run_dir, self.reporter))
        status = read_status(run_dir)
        if code != 0 and (not status or status.get("state") not in ("done", "failed")):
            claim = try_lock(run_dir)
            if claim is None:  # taken by another process since: its run now
                return self._finished(run, held_elsewhere(run, run_dir, self.reporter))
            with claim:
                why = "worker process " + (signal_in_words(-code) if code < 0 else f"exited with {exit_in_words(code)}")
                write_failed(run_dir, last_step(run_dir), why + f"; see {run_dir / 'worker.log'}",
                             "oom" if code == -9 else "exception")
        self._finished(run, outcome_from_status(run.key, run_dir, action, time.time() - started))


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "worker":
        sys.exit(_worker_main(sys.argv[2]))
    sys.exit("usage: python -m bench.suite.executors worker PAYLOAD.json (internal: one run of a suite)")
