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
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from bench import fileio
from bench.errors import ConfigError
from bench.suite.executors import Executor, execute_run, train_fn_ref
from bench.suite.exits import (
    LOCAL_REQUEUE_EXIT,
    JobRequeued,
    TimeLimitReached,
    asked_requeue,
    job_end_in_words,
    log_tail,
    timed_out_in_words,
)
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
    requeues it, and bench.train.loop resumes from the run's last checkpoint. `limit_min` (the
    job's time limit) only words the failure of a run that timed out once too often."""

    def __init__(self, run: dict, run_dir: str, train_fn: str, retry_failed: bool, limit_min: float | None = None):
        self.run, self.run_dir, self.train_fn, self.retry_failed = run, run_dir, train_fn, retry_failed
        self.limit_min = limit_min

    def __call__(self) -> dict:
        import signal

        import submitit

        # torch on first use: submitting jobs needs no torch
        from bench.core.runtime import StopRequested, finish_processes, unwatch_stop_signal, watch_stop_signal

        env = submitit.JobEnvironment()
        if env.num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        # submitit's handler would requeue mid-step; ours lets the run checkpoint at a step boundary first.
        signum = env._usr_sig()
        submitits = signal.getsignal(signum)
        signal.signal(signum, self._requeue_handler(submitits))
        requeue = watch_stop_signal(signum)
        run_dir = Path(self.run_dir)
        self._requeued = None
        try:
            out = execute_run(self.run, self.run_dir, self.train_fn, self.retry_failed)
            if self._requeued is not None:  # requeued where something caught the exit (a plugin's import)
                raise JobRequeued(self._requeued)
        except StopRequested:
            if env.global_rank != 0:  # rank 0 requeues the job, which restarts every task
                return outcome_from_status(self._key(), run_dir, "ran").as_dict()
            try:
                requeue(signum, None)  # checkpoint() -> requeue the job -> exit (JobRequeued)
            except TimeLimitReached as exc:  # timed out once too often: the run fails, its checkpoint kept
                write_failed(run_dir, last_step(run_dir), str(exc), "exception")
                return outcome_from_status(self._key(), run_dir, "ran").as_dict()
            raise
        finally:
            unwatch_stop_signal(signum, requeue)
            signal.signal(signum, submitits if submitits is not None else signal.SIG_DFL)
            finish_processes()
        if env.num_tasks > 1 and out.get("state") == "failed":
            # A failed task exits non-zero, so that srun (--kill-on-bad-exit) stops the others.
            raise RuntimeError(f"run {self.run_dir} failed: {out.get('reason')}")
        return out

    def _key(self) -> str:
        return f"{self.run.get('workload')}/{self.run.get('label')}/seed{self.run.get('seed')}"

    def _requeue_handler(self, submitits):
        """submitit's signal handler (checkpoint, requeue, exit), whose exit a run lets through as
        JobRequeued wherever the signal lands; submitit's refusal to requeue again becomes
        TimeLimitReached, in words. Under the debug executor (no handler: the job runs in the runner's
        process) the JobRequeued reaches the runner, which runs the job again."""
        from submitit.core.utils import UncompletedJobError

        def requeue(signum, frame):
            if not callable(submitits):
                self._requeued = LOCAL_REQUEUE_EXIT
                raise JobRequeued(LOCAL_REQUEUE_EXIT)
            try:
                submitits(signum, frame)  # returns in a task of rank > 0: rank 0 requeues
            except JobRequeued:
                raise
            except SystemExit as exc:
                self._requeued = exc.code
                raise JobRequeued(exc.code) from None
            except UncompletedJobError as exc:  # submitit will not requeue it again
                why = re.sub(r"^Job not requeued because: |\.$", "", str(exc).strip())
                run_dir = Path(self.run_dir)
                raise TimeLimitReached(timed_out_in_words(self.limit_min, last_step(run_dir), f"submitit: {why}",
                                                          (run_dir / "checkpoint.pt").exists())) from None
        return requeue

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


#: submitit-local's time limit when [slurm] time sets none (submitit's own default, 2 min, cuts
#: the smoke suite's runs on a busy machine); a run past it checkpoints and is started again
LOCAL_TIME_MIN = 24 * 60
#: submitit's default: how many times a job that reaches its time limit is requeued
MAX_NUM_TIMEOUT = 3


def _slurm_parameters(settings: dict, p: dict, cluster: str) -> dict:
    if "time" in settings:
        p["timeout_min"] = parse_slurm_time(settings["time"])
    elif cluster == "local":
        p["timeout_min"] = LOCAL_TIME_MIN
    if "gpus" in settings and (cluster == "slurm" or (cluster == "local" and _has_cuda())):
        p["gpus_per_node"] = int(settings["gpus"])  # submitit's local executor hides GPUs not asked for
    if "cpus_per_task" in settings:
        p["cpus_per_task"] = int(settings["cpus_per_task"])
    if "mem_gb" in settings:
        p["mem_gb"] = float(settings["mem_gb"])
    for key in ("partition", "account", "qos", "constraint"):
        if settings.get(key) not in (None, ""):
            p[f"slurm_{key}"] = str(settings[key])
    max_num_timeout(settings)  # checked here, passed to the executor itself
    if settings.get("array_parallelism") not in (None, ""):
        p["slurm_array_parallelism"] = int(settings["array_parallelism"])
    if settings.get("setup"):
        setup = settings["setup"]
        p["slurm_setup"] = [setup] if isinstance(setup, str) else list(setup)
    if settings.get("additional"):
        p["slurm_additional_parameters"] = dict(settings["additional"])
    return p


def max_num_timeout(settings: dict) -> int:
    """[slurm] max_num_timeout: an argument of submitit's executor, not a job parameter."""
    value = settings.get("max_num_timeout")
    n = MAX_NUM_TIMEOUT if value in (None, "") else int(value)
    if n < 0:
        raise ValueError(f"max_num_timeout={n} must be >= 0")
    return n


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
    already queued on Slurm are not submitted twice; with wait=False, run returns once submitted.

    A job that reaches its time limit checkpoints and is requeued (Slurm; submitit-local's controller
    starts it again); one that ended without a result although its last attempt asked for that (or
    under submitit-debug, which runs jobs in this process and requeues nothing) is submitted again
    here, up to [slurm] max_num_timeout times, and resumes from its checkpoint."""

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
        self.max_timeouts = max_num_timeout(self.settings)
        jobs = []
        try:
            ctor = {f"{self.cluster}_max_num_timeout": self.max_timeouts} if self.cluster != "debug" else {}
            self.executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=self.cluster, **ctor)
            self.executor.update_parameters(**params)
            with self.executor.batch():
                for run in todo:
                    jobs.append((run, self.executor.submit(self._job(run, params))))
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            raise ConfigError(f"could not submit the job array through submitit ({self.cluster}): {type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}; "
                              "run from a Slurm login node (srun and sbatch on PATH), or use --executor local") from None
        for run, job in jobs:
            self._record_job(run, job)
        ids = ", ".join(sorted({str(j.job_id).split("_")[0] for _, j in jobs}))
        self.reporter.message(f"submitted {len(jobs)} runs as job array {ids} ({self.cluster}); logs in {folder}")
        if not self.wait:
            for run, job in jobs:
                self.outcomes[run.key] = RunOutcome(run.key, str(self.dirs[run.key]), "submitted", "submitted",
                                               reason=f"job {job.job_id}")
            return self.outcomes
        started = time.time()
        try:
            self._wait_jobs(jobs, started, params)
        except KeyboardInterrupt:
            if self.cluster == "slurm":
                self.reporter.message("stopped waiting; the jobs keep running on the cluster. Run the same command again "
                                 "to follow them (queued runs are not submitted twice), or build the report later")
            raise
        return self.outcomes

    def _job(self, run: RunSpec, params: dict) -> RunJob:
        limit = params.get("timeout_min") if self.cluster != "debug" else None  # debug: no time limit
        return RunJob(run.to_dict(), str(self.dirs[run.key]), train_fn_ref(self.train_fn), self.retry_failed, limit)

    def _record_job(self, run: RunSpec, job) -> None:
        fileio.write_json(self.dirs[run.key] / "job.json", {"job_id": str(job.job_id), "cluster": self.cluster,
                                                           "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    def _wait_jobs(self, jobs, started: float, params: dict) -> None:
        resubmitted = {run.key: 0 for run, _ in jobs}
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
                    out, why = self._job_outcome(run, job, started)
                    if out is None and resubmitted[run.key] < self.max_timeouts:  # timed out: go on from the checkpoint
                        resubmitted[run.key] += 1
                        again = self.executor.submit(self._job(run, params))
                        self._record_job(run, again)
                        self.reporter.message(f"{run.key}: {why}; submitted again as job {again.job_id}, resuming "
                                              f"from step {last_step(self.dirs[run.key])}")
                        remaining.append((run, again))
                        continue
                    if out is None:
                        run_dir = self.dirs[run.key]
                        write_failed(run_dir, last_step(run_dir), timed_out_in_words(
                            params.get("timeout_min") if self.cluster != "debug" else None, last_step(run_dir),
                            f"{why}; submitted again {resubmitted[run.key]} times", (run_dir / "checkpoint.pt").exists()),
                            "exception")
                        out = outcome_from_status(run.key, self.dirs[run.key], "ran", time.time() - started)
                    poller.remove(run)
                    self._finished(run, out)
                if remaining:
                    time.sleep(1.0)

    def _job_outcome(self, run: RunSpec, job, started: float) -> tuple[RunOutcome | None, str]:
        """The outcome of an ended job; (None, why) for one to submit again: its last attempt was
        timed out or pre-empted and its run is still resumable."""
        run_dir = self.dirs[run.key]
        try:
            return outcome_from_dict(job.results()[0]), ""
        except JobRequeued as exc:  # the debug executor: the requeue reached this process
            requeued, error = True, exc
        except Exception as exc:  # noqa: BLE001 -- the job died outside execute_run
            requeued, error = None, exc
        now = (read_status(run_dir) or {}).get("state")
        if now == "done" or (now == "failed" and requeued is None):  # (a requeue outdoes a failure it caused)
            return outcome_from_status(run.key, run_dir, "ran", time.time() - started), ""
        state, out_log, err_log = _job_state(job), job.paths.stdout, job.paths.stderr
        if requeued is None:  # the job's logs and state say whether it ended at its time limit
            requeued = state in ("TIMEOUT", "PREEMPTED") or asked_requeue(log_tail(out_log), log_tail(err_log))
        why = job_end_in_words(str(job.job_id), state, error, out_log, err_log, _exit_code(job))
        if requeued:
            return None, why
        write_failed(run_dir, last_step(run_dir), why, "exception")
        return outcome_from_status(run.key, run_dir, "ran", time.time() - started), ""


def _job_state(job) -> str | None:
    try:
        return str(job.state)
    except Exception:  # noqa: BLE001 -- sacct unreachable: the state is only a hint
        return None


def _exit_code(job) -> int | None:
    """The exit status of a local job's controller process (None elsewhere)."""
    process = getattr(job, "_process", None)
    return process.poll() if process is not None else None
