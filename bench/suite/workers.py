"""Local worker processes of a suite (bench.suite.executors.WorkerPool): how one starts (its records,
environment and log), the files between it and its runner, and that it ends with its runner.
"""

from __future__ import annotations

import os
from pathlib import Path

from bench import fileio
from bench.suite.grid import RunSpec

#: the environment of a torchrun / Slurm task; a worker started from one must not inherit it
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def die_with_parent(parent: int) -> None:
    """Linux: the kernel sends this process SIGTERM when the runner that started it ends, however it
    ends (SIGKILL included), so a worker never trains on as an orphan; SIGTERM checkpoints and stops
    a run like a Slurm pre-emption. Elsewhere a no-op."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(signal.SIGTERM), 0, 0, 0) != 0:  # 1: PR_SET_PDEATHSIG
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the runner ended before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def start_worker(run: RunSpec, run_dir: Path, train_fn: str, retry_failed: bool, threads: int,
                 visible_gpus: list[int] | None = None):
    """A fresh Python process for one run (nothing inherited but the environment and sys.path), or
    torchrun's N processes for a run with gpus = N; the output goes to the run's worker.log."""
    import subprocess
    import sys

    run_dir.mkdir(parents=True, exist_ok=True)
    gpus = int(run.config.get("gpus", 1))
    threads = max(1, threads // gpus)
    payload, outcome = worker_records(run_dir)
    remove_dead_records(run_dir)
    # One process per run: it ends with the runner (torchrun's processes have torchrun as their parent).
    fileio.write_json(payload, {"run": run.to_dict(), "run_dir": str(run_dir), "train_fn": train_fn,
                                "retry_failed": retry_failed, "threads": threads, "outcome": str(outcome),
                                "parent_pid": os.getpid() if gpus == 1 else None})
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}  # the worker's processes are its own
    if visible_gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, visible_gpus))
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join(p for p in [str(Path(__file__).resolve().parents[2]), *sys.path] if p))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"] \
        if gpus > 1 else [sys.executable]
    log = open(run_dir / "worker.log", "ab")
    try:
        return subprocess.Popen([*launch, "-m", "bench.suite.executors", "worker", str(payload)], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    finally:
        log.close()


def worker_records(run_dir: Path, pid: int | None = None) -> tuple[Path, Path]:
    """The files between runner `pid` (this process) and its worker of a run: what to run, and what
    happened. Named by the runner, so that two runners on one folder never read each other's."""
    pid = os.getpid() if pid is None else pid
    return run_dir / f".worker-{pid}.json", run_dir / f".worker-{pid}.outcome.json"


def remove_dead_records(run_dir: Path) -> None:
    """The worker records of runners that are gone (killed before they reaped their worker)."""
    for record in [*run_dir.glob(".worker-*.json"), run_dir / ".worker.json"]:  # .worker.json: before per-runner
        pid = record.name.split(".")[1].removeprefix("worker-")
        if not (pid.isdigit() and fileio.pid_running(int(pid))):
            record.unlink(missing_ok=True)


