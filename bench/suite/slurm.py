"""Running a suite's runs as a Slurm job array through submitit (or its local and debug
executors, to try this path without a cluster). A job is one run.

Time limits and pre-emption: Slurm signals the job (SIGUSR2, submitit's `--signal`); the run
checkpoints at the next step boundary, submitit requeues the job, and bench.train.loop resumes from
that checkpoint, exactly. A run of ``gpus = N`` (the suite's [train]) is one job of N tasks on
one node with N GPUs; submitit starts the tasks and each exports torch.distributed's environment
(submitit.helpers.TorchDistributedEnvironment: rank, world size, master address and port)
before training, so no torchrun is needed inside the job.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from bench import fileio
from bench.errors import ConfigError
from bench.suite.executors import Executor, execute_run, train_fn_ref
from bench.suite.grid import RunSpec
from bench.suite.poller import FilePoller
from bench.suite.schema import SLURM_SCHEMA, parse_slurm_time
from bench.train.run_folder import (
    RunOutcome,
    last_step,
    outcome_from_dict,
    outcome_from_status,
    read_status,
    write_failed,
)


class RunJob:
    """A Slurm (submitit) job: one run. Checkpointable: on timeout or preemption submitit
    requeues it, and bench.train.loop resumes from the run's last checkpoint."""

    def __init__(self, run: dict, run_dir: str, train_fn: str, retry_failed: bool):
        self.run, self.run_dir, self.train_fn, self.retry_failed = run, run_dir, train_fn, retry_failed

    def __call__(self) -> dict:
        import submitit

        # torch on first use: submitting jobs needs no torch
        from bench.core.runtime import StopRequested, finish_processes, unwatch_stop_signal, watch_stop_signal

        env = submitit.JobEnvironment()
        if env.num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        # submitit's handler would requeue mid-step; ours lets the run checkpoint at a step boundary first.
        signum = env._usr_sig()
        requeue = watch_stop_signal(signum)
        try:
            out = execute_run(self.run, self.run_dir, self.train_fn, self.retry_failed)
        except StopRequested:
            if env.global_rank != 0:  # rank 0 requeues the job, which restarts every task
                return outcome_from_status(f"{self.run.get('workload')}/{self.run.get('label')}/seed"
                                           f"{self.run.get('seed')}", Path(self.run_dir), "ran").as_dict()
            if callable(requeue):
                requeue(signum, None)  # submitit: checkpoint() -> requeue the job -> exit
            raise
        finally:
            unwatch_stop_signal(signum, requeue)
            finish_processes()
        if env.num_tasks > 1 and out.get("state") == "failed":
            # A failed task exits non-zero, so that srun (--kill-on-bad-exit) stops the others.
            raise RuntimeError(f"run {self.run_dir} failed: {out.get('reason')}")
        return out

    def checkpoint(self, *args, **kwargs):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self)


def slurm_parameters(settings: dict, suite_name: str, cluster: str, gpus: int = 1) -> dict:
    """submitit AutoExecutor parameters from a [slurm] table (plus overrides), for runs of `gpus`
    processes ([train] gpus): one task per GPU."""
    known = set(SLURM_SCHEMA) | {"name"}  # the suite's [slurm] keys, and the job name
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ConfigError(f"unknown Slurm setting {unknown[0]!r}; known: {', '.join(sorted(known))}")
    p: dict[str, Any] = {"name": settings.get("name") or f"diffbench-{suite_name}"}
    if gpus > 1:
        if settings.get("gpus") not in (None, gpus):
            raise ConfigError(f"Slurm settings: gpus={settings['gpus']} but the runs train with gpus = {gpus} "
                              f"([train]): a job needs one GPU per process; set gpus = {gpus} in [slurm] or drop it")
        if cluster == "debug":
            raise ConfigError(f"the submitit-debug executor runs one process, and these runs need gpus = {gpus}; "
                              "use --executor submitit-local or local")
        settings = {**settings, "gpus": gpus}
        p["tasks_per_node"] = gpus
        p["nodes"] = 1
        if cluster == "slurm":
            p["slurm_srun_args"] = ["--kill-on-bad-exit=1"]  # a failed process stops its job
    try:
        return _slurm_parameters(settings, p, cluster)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"Slurm settings: {exc}; e.g. time=48:00:00 gpus=1 mem_gb=64 partition=gpu") from None


def _slurm_parameters(settings: dict, p: dict, cluster: str) -> dict:
    if "time" in settings:
        p["timeout_min"] = parse_slurm_time(settings["time"])
    if "gpus" in settings and (cluster == "slurm" or (cluster == "local" and _has_cuda())):
        p["gpus_per_node"] = int(settings["gpus"])  # submitit's local executor hides GPUs not asked for
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


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


SLURM_ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING",
                "REQUEUE_HOLD", "REQUEUE_FED", "STAGE_OUT", "SIGNALING"}


def _queued_slurm_job(run_dir: Path) -> bool:
    """Whether the run's last submitted Slurm job (job.json) is still pending or running."""
    import subprocess

    info = None
    try:
        info = fileio.read_json(run_dir / "job.json")
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


class SubmititExecutor(Executor):
    """The runs as one submitit job array: on Slurm (cluster "slurm"), or through submitit's
    LocalExecutor / DebugExecutor ("local", "debug") to try this path without a cluster. Runs
    already queued on Slurm are not submitted twice; with wait=False, run returns once submitted."""

    def __init__(self, dirs: dict[str, Path], reporter, train_fn=None, retry_failed: bool = False, *,
                 suite_name: str, suite_dir: Path, cluster: str, settings: dict, wait: bool = True):
        super().__init__(dirs, reporter, train_fn, retry_failed)
        self.suite_name, self.suite_dir, self.cluster, self.settings, self.wait = (
            suite_name, Path(suite_dir), cluster, settings, wait)

    def run(self, todo: list[RunSpec]) -> dict[str, RunOutcome]:
        try:
            import submitit
        except ImportError:
            raise ConfigError("the Slurm executor needs submitit: pip install submitit") from None
        if not todo:
            return self.outcomes
        if self.cluster == "slurm":
            queued = [r for r in todo if _queued_slurm_job(self.dirs[r.key])]
            for run in queued:
                job = fileio.read_json(self.dirs[run.key] / "job.json")["job_id"]
                self.outcomes[run.key] = RunOutcome(run.key, str(self.dirs[run.key]), "submitted", "skipped",
                                               reason=f"already queued or running as Slurm job {job}")
            todo = [r for r in todo if r not in queued]
            if queued:
                self.reporter.message(f"{len(queued)} runs are already queued or running on Slurm: not submitted again")
            if not todo:
                return self.outcomes
        folder = self.suite_dir / "_submitit"
        params = slurm_parameters(self.settings, self.suite_name, self.cluster, max(int(r.config.get("gpus", 1)) for r in todo))
        ref = train_fn_ref(self.train_fn)
        jobs = []
        try:
            executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=self.cluster)
            executor.update_parameters(**params)
            with executor.batch():
                for run in todo:
                    jobs.append((run, executor.submit(RunJob(run.to_dict(), str(self.dirs[run.key]), ref, self.retry_failed))))
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            raise ConfigError(f"could not submit the job array through submitit ({self.cluster}): {type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}; "
                              "run from a Slurm login node (srun and sbatch on PATH), or use --executor local") from None
        for run, job in jobs:
            fileio.write_json(self.dirs[run.key] / "job.json", {"job_id": str(job.job_id), "cluster": self.cluster,
                                                       "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        ids = ", ".join(sorted({str(j.job_id).split("_")[0] for _, j in jobs}))
        self.reporter.message(f"submitted {len(jobs)} runs as job array {ids} ({self.cluster}); logs in {folder}")
        if not self.wait:
            for run, job in jobs:
                self.outcomes[run.key] = RunOutcome(run.key, str(self.dirs[run.key]), "submitted", "submitted",
                                               reason=f"job {job.job_id}")
            return self.outcomes
        started = time.time()
        try:
            self._wait_jobs(jobs, started)
        except KeyboardInterrupt:
            if self.cluster == "slurm":
                self.reporter.message("stopped waiting; the jobs keep running on the cluster. Run the same command again "
                                 "to follow them (queued runs are not submitted twice), or build the report later")
            raise
        return self.outcomes

    def _wait_jobs(self, jobs, started: float) -> None:
        with FilePoller(self.reporter, interval=2.0) as poller:
            for run, _ in jobs:
                self.reporter.run_start(run)
                poller.add(run, self.dirs[run.key])
            remaining = list(jobs)
            while remaining:
                for item in list(remaining):
                    run, job = item
                    if self.cluster != "debug" and not job.done():
                        continue
                    remaining.remove(item)
                    poller.remove(run)
                    try:
                        out = outcome_from_dict(job.results()[0])
                    except Exception as exc:  # noqa: BLE001 -- the job died outside execute_run
                        status = read_status(self.dirs[run.key])
                        if not status or status.get("state") not in ("done", "failed"):
                            text = str(exc).strip().splitlines()
                            write_failed(self.dirs[run.key], last_step(self.dirs[run.key]),
                                         f"job {job.job_id} failed: {type(exc).__name__}: "
                                         f"{(text[-1] if text else '')[:300]}", "exception")
                        out = outcome_from_status(run.key, self.dirs[run.key], "ran", time.time() - started)
                    self._finished(run, out)
                if remaining:
                    time.sleep(1.0)
