"""A run folder (results/<suite>/<workload>/<label>/seed<k>/): its status, lock, config check
and outcome. status.json is written here and by bench.train.loop only, through :func:`write_status`;
an outcome is built from it by :func:`outcome_from_status`.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bench import fileio
from bench.errors import ConfigError
from bench.train import logs

if TYPE_CHECKING:  # annotations only
    from bench.core.config import TrainConfig
    from bench.core.runtime import Runtime


class ResultsConflictError(ConfigError):
    """A run folder holds results of another configuration."""


#: the reason of a run skipped because another process holds its folder
LOCKED = "running in another process (its folder is locked)"


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
    def elsewhere(self) -> list[RunOutcome]:
        """Runs another process was training (their folders locked): its work, not this invocation's."""
        return [o for o in self.outcomes if o.action == "skipped" and o.reason == LOCKED]

    @property
    def ok(self) -> bool:
        """Whether this invocation's own work succeeded: every run done, or left to the process training it."""
        return all(o.state == "done" or o in self.elsewhere for o in self.outcomes)


def outcome_from_dict(d: dict) -> RunOutcome:
    return RunOutcome(**d)


def workload_name(dataset: str, resolution: int | None, arch: str) -> str:
    """The folder of a workload, <dataset>-<resolution>_<arch>: the one rule for a suite's grid and the
    command line's `train`. An architecture's "/" becomes "-" (dit-s/2 -> dit-s-2: one folder)."""
    arch = arch.replace("/", "-")
    return f"{dataset}-{resolution}_{arch}" if resolution else f"{dataset}_{arch}"


def write_status(run_dir: Path, state: str, step: int, reason: str | None = None, **extra) -> None:
    """status.json, atomically: state (running | done | failed), step, reason, and the clocks
    (train_seconds, eval_seconds; kept from the previous status when not given)."""
    keys = ("train_seconds", "eval_seconds")
    old = {} if all(k in extra for k in keys) else read_status(run_dir) or {}  # train passes its clocks
    clocks = {k: extra.pop(k, old.get(k, 0.0)) for k in keys}
    fileio.write_json(Path(run_dir) / "status.json", {"state": state, "step": int(step), "reason": reason,
                                                      **clocks, **extra})


def outcome_from_status(key: str, run_dir: Path, action: str, seconds: float = 0.0,
                        reason: str | None = None, default_state: str = "failed") -> RunOutcome:
    """What happened to a run, read back from its folder."""
    status = read_status(run_dir) or {}
    return RunOutcome(key, str(run_dir), status.get("state", default_state), action, status.get("step"),
                      reason or status.get("reason"), seconds, final_metrics(run_dir))


def read_status(run_dir: Path) -> dict | None:
    try:
        return fileio.read_json(Path(run_dir) / "status.json")
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
    for row in fileio.read_jsonl(Path(run_dir) / "evals.jsonl"):
        if "metric" in row:
            out[row["metric"]] = row.get("value")
    return out


def is_diverged(status: dict | None) -> bool:
    if not status or status.get("state") != "failed":
        return False
    if status.get("error"):
        return status["error"] == "divergence"
    return "non-finite" in str(status.get("reason") or "")


def should_run(status: dict | None, retry_failed: bool) -> bool:
    if status is None:
        return True
    state = status.get("state")
    if state == "done":
        return False
    if state == "failed" and is_diverged(status) and not retry_failed:
        return False
    return True


def write_failed(run_dir: Path, step: int, reason: str, error: str) -> None:
    """Record a failure, keeping the clocks bench.train.loop had recorded; `error` is its kind
    (divergence, oom, exception). `step` is where it failed; `resumes_from` the step of the kept
    checkpoint (a running run's status names it after every checkpoint), where a retry starts."""
    prev = read_status(run_dir) or {}
    kept = {"resumes_from": prev["step"]} if prev.get("state") == "running" and isinstance(prev.get("step"), int) \
        else {}
    write_status(run_dir, "failed", step, reason, error=error, **kept)


#: instruction-set extensions that change which floating-point kernels run (and so the last bits)
CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "asimd", "sve")


def cpu_model() -> tuple[str, list[str]]:
    """The CPU's model name and its instruction-set extensions among CPU_FLAGS (Linux's
    /proc/cpuinfo; elsewhere platform.processor() and no flags)."""
    name, flags = platform.processor() or platform.machine(), []
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return name, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model", "cpu model") and value.strip():
            name = value.strip()
        elif key in ("flags", "Features") and not flags:
            have = set(value.split())
            flags = [f for f in CPU_FLAGS if f in have]
    return name, flags


def machine_info() -> dict:
    """Where a run ran (machine.json; the report lists these): the CPU model and instruction set
    are there because floating-point results differ between machines (training rounds differently)."""
    model, flags = cpu_model()
    info = {"hostname": socket.gethostname(), "platform": platform.platform(), "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(), "cpu_model": model, "cpu_flags": flags,
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    return info


def expected_record(config: dict) -> dict:
    """What bench.train.loop will write as config.json for this config (to compare before running)."""
    # torch on first use: the runner and display read run folders without torch
    from bench.train.resolve import resolve_run

    return json.loads(fileio.dumps(resolve_run(config).record))


def check_conflict(config: dict, run_dir: Path) -> str | None:
    """None when the folder is empty or holds this very config; else what differs."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        return None
    try:
        old = json.loads(fileio.dumps(fileio.read_json(path)))
    except json.JSONDecodeError:
        return "its config.json is unreadable"
    new = expected_record(config)
    changed = config_diff(old, new)
    if not changed:
        return None
    details = [_difference(k, old, new) for k in changed[:4]]
    return "; ".join(details) + (f"; and {len(changed) - 4} more" if len(changed) > 4 else "")


#: `eval` settings that change what an evaluation writes, not what it measures
EVAL_OUTPUT_KEYS = ("save_samples", "verbose")


def config_diff(old: dict, new: dict) -> list[str]:
    """The keys in which two config.json records differ (compared as JSON), sorted. Settings of how
    a run executes (device, precision, ...: config.RUNTIME_KEYS) never differ, nor do the evaluation's
    output switches (EVAL_OUTPUT_KEYS: saving samples turned on for a finished run keeps it), and a setting that
    is missing from `old` (added to the harness since that run began) differs only from a
    non-default value."""
    # torch on first use: the runner and display read run folders without torch
    from bench.core.config import RUNTIME_KEYS, TrainConfig

    defaults = json.loads(fileio.dumps(TrainConfig().to_dict()))
    old, new = json.loads(fileio.dumps(old)), json.loads(fileio.dumps(new))
    for record in (old, new):  # what an evaluation writes or prints beside its numbers, not what it measures
        if isinstance(record.get("eval"), dict):
            record["eval"] = {k: v for k, v in record["eval"].items() if k not in EVAL_OUTPUT_KEYS}

    def differs(k: str) -> bool:
        if k in RUNTIME_KEYS or (k == "method_sha256" and k not in old):  # a run recorded before the hash was
            return False
        if k not in old and k in defaults:
            return new.get(k) != defaults[k]
        return old.get(k) != new.get(k)

    return sorted(k for k in set(old) | set(new) if differs(k))


def _difference(k: str, old: dict, new: dict) -> str:
    """One setting in which a folder's record differs from the requested one, in words."""
    if k == "method_sha256":  # the same settings, other code: the run's results are not this code's
        return (f"the source file of method {new.get('method')!r} changed since this run (SHA-256 "
                f"{str(old.get(k))[:12]}... there, {str(new.get(k))[:12]}... now): delete the run folder to train "
                "it again with this code, or restore the file")
    return f"{k}: {_short(old.get(k))} there, {_short(new.get(k))} requested"


def _short(v) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 60 else s[:57] + "..."


def try_lock(run_dir: Path) -> fileio.HeldLock | None:
    """An exclusive lock on the run folder (its .lock file; released by close() or the process's end),
    or None if taken. Where the file system refuses flock (Lustre without -o flock), an owner file
    beside it (fileio.try_lock)."""
    return fileio.try_lock(Path(run_dir) / ".lock")


@contextlib.contextmanager
def claim_run_folder(out: Path, rank: int = 0):
    """The `train` command's claim on its folder, held by rank 0 while training: a second process
    training into the same folder is refused in one line instead of training it twice. A folder this
    claim created and training left empty (a run refused before it began) is removed again."""
    if rank != 0:
        yield
        return
    fresh = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = try_lock(out)
    if lock is None:
        raise ConfigError(f"{out} is being trained by another process (its folder is locked); wait for it to "
                          "finish, or train into another --out")
    lock_files = {".lock", fileio.owner_file_of(out / ".lock").name}
    try:
        yield
    finally:
        if fresh and {p.name for p in out.iterdir()} <= lock_files:  # removed while still held
            (out / ".lock").unlink(missing_ok=True)
            lock.close()  # an owner file goes with its lock
            out.rmdir()
        lock.close()


def trim_logs(out: Path, step: int) -> None:
    """Before a run resumes from its checkpoint at `step`: keep the log rows up to it, drop the rest
    (redone). Only the last line may be unreadable (a write cut short, always after the checkpoint):
    any other unreadable line, a step the checkpoint trained with no row, an evaluation it made with
    no row, or two different rows for one step refuses the run, naming the file, since the
    checkpoint cannot redo those steps. A row logged twice alike is a copy: dropped, with a note."""
    for name in ("steps.jsonl", "evals.jsonl"):
        path = out / name
        bad, torn = fileio.unreadable_lines(path)
        inner = [n for n in bad if n != torn]
        if inner:
            raise ConfigError(f"{path} line {inner[0]} is unreadable (not a torn last line): the rows it held cannot "
                              f"be redone from the checkpoint at step {step}; delete the run folder to train the run again")
    restart = "delete the run folder to train the run again (from scratch)"
    steps, copies, conflict = logs.unique_rows(out / "steps.jsonl", logs.STEP_KEY, upto=step)
    evals, eval_copies, eval_conflict = logs.unique_rows(out / "evals.jsonl", logs.EVAL_KEY, upto=step)
    if conflict or eval_conflict:
        raise ConfigError(f"{conflict or eval_conflict}, both before checkpoint.pt (step {step}): which one is this "
                          f"run's is unknown; {restart}")
    logged = {r.get("step") for r in steps}
    missing = [k for k in range(1, step + 1) if k not in logged]
    if missing:
        raise ConfigError(f"{out / 'steps.jsonl'} has no row for step {missing[0]} ({len(missing)} missing) that "
                          f"checkpoint.pt (step {step}) trained: the logs and the checkpoint are of different runs "
                          f"or the log was cut; {restart}")
    config = read_run_file(out / "config.json", "restore it, or delete the run folder to train the run again") \
        if (out / "config.json").exists() else {}
    holes = logs.missing_evaluations(config, evals, step)
    if holes:
        raise ConfigError(f"{out / 'evals.jsonl'} has no row for the evaluation of {holes[0]} ({len(holes)} missing) "
                          f"that checkpoint.pt (step {step}) made: the log was cut, and an evaluation is not redone "
                          f"from a later checkpoint; {restart}")
    for name, n in (("steps.jsonl", copies), ("evals.jsonl", eval_copies)):
        if n:
            print(f"note: {out / name}: {n} row(s) logged twice dropped (identical copies)", file=sys.stderr)
    for name, rows in (("steps.jsonl", steps), ("evals.jsonl", evals)):
        if (out / name).exists():
            logs.rewrite_rows(out / name, rows)


def record_runtime(out: Path, rt: Runtime, step: int) -> None:
    """Append this stretch's device, fast path and CPU threads to config.json's `runtime` list when they
    differ from the last stretch's (a run resumed on another device, or with another precision). On a
    CPU the thread count changes how sums are ordered, and so the last digits of every number: a
    resume under another count is refused rather than mixed in silence."""
    import torch

    record = fileio.read_json(out / "config.json")
    stretches = record.get("runtime") or []
    now = rt.record(step)
    if now.get("device", "").startswith("cpu"):
        now["cpu_threads"] = torch.get_num_threads()
        before = stretches[-1].get("cpu_threads") if stretches else None
        if step > 0 and before is not None and before != now["cpu_threads"]:  # step 0: nothing trained yet
            raise ConfigError(f"{out} trained to step {step} with {before} CPU thread(s) and this process has "
                              f"{now['cpu_threads']}: the numbers would differ from an uninterrupted run; resume it "
                              f"with {before} (a suite's --jobs J gives each run CPUs / J threads; `train`: "
                              f"OMP_NUM_THREADS={before}), or delete the folder to train it again")
    if not stretches or {**stretches[-1], "from_step": step} != now:
        fileio.write_json(out / "config.json", {**record, "runtime": [*stretches, now]})


def read_run_file(path: Path, fix: str) -> dict:
    """A run folder's JSON record, or one ConfigError line naming the file and the fix."""
    try:
        data = fileio.read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is corrupt ({type(exc).__name__}); {fix}") from None
    except OSError as exc:
        raise ConfigError(f"{path} cannot be read ({exc.strerror or type(exc).__name__}); {fix}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is corrupt (not a JSON object); {fix}")
    return data


def open_run_folder(cfg: TrainConfig, out: Path, record: dict, rt: Runtime) -> dict | None:
    """Write config.json (rank 0), or refuse a folder that holds another config; the final status
    of a finished run (nothing to do), else None."""
    if rt.rank == 0:  # the temporary files of writes killed with their process (the folder is this run's)
        fileio.remove_stale_temporaries(out)
    status = read_run_file(out / "status.json", "delete it: the run resumes from its checkpoint") \
        if (out / "status.json").exists() else None
    done = status if status and status.get("state") == "done" else None
    if not (out / "config.json").exists():
        if rt.rank == 0:
            fileio.write_json(out / "config.json", {**record, "runtime": []})
        return done
    old = read_run_file(out / "config.json", "restore it, or delete the run folder to train the run again")
    changed = config_diff(old, record)
    if done and set(changed) <= {"gpus"}:  # finished: how many processes trained it no longer matters
        return done
    saved = old.get("gpus", 1)
    if saved != cfg.gpus:
        raise ConfigError(
            f"{out} holds a run trained by {saved} process(es) (gpus={saved}) and this run asks for {cfg.gpus}: "
            f"resume it with gpus = {saved}" + (f" (torchrun --nproc_per_node {saved})" if saved > 1 else
                                                " (one process, no torchrun)") + ", or use another output folder")
    if "method_sha256" in changed:  # not counted as done, nor resumed, with other code
        raise ConfigError(f"{out}: {_difference('method_sha256', old, record)}")
    if changed:
        raise ConfigError(f"{out} holds a run with a different config (differs in: {', '.join(changed)}); "
                          "use another output folder or delete that one")
    return done
