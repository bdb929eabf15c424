"""How a job or worker ended, in words: a non-zero exit code, a signal, a scheduler's state, the
time limit; and submitit's requeue, which a run that reaches its time limit asks for.

Imports neither torch nor submitit: the runner reads these while its jobs run elsewhere.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path

from bench.errors import BenchError

#: submitit's local executor: the exit code of a job that asks to be started again
#: (submitit.local.local.LOCAL_REQUEUE_RETURN_CODE; its controller restarts a task that exits so)
LOCAL_REQUEUE_EXIT = 144


class JobRequeued(SystemExit):
    """submitit requeued the job where the signal found it (set-up, an evaluation: outside the
    training steps). The run stays resumable from its last checkpoint, so execute_run lets this
    through instead of recording a failure; a SystemExit, so that the job's process exits with
    submitit's code (144 locally: its controller starts the job again)."""


class TimeLimitReached(BenchError):
    """A job reached its time limit and submitit would not requeue it again (max_num_timeout)."""


def timed_out_in_words(limit_min: float | None, step: int, why: str = "", kept: bool = True) -> str:
    """The reason of a run that timed out once too often: the limit, the step, the setting to change,
    and whether a checkpoint (`kept`) lets the same command resume it."""
    limit = f"{limit_min:g} min" if limit_min else "the job's time limit"
    why = f" ({why})" if why else ""
    then = (f"the checkpoint at step {step} is kept: the same command resumes from it" if kept else
            "no checkpoint yet: every attempt ended before its first one (set-up alone outlasts the limit)")
    return (f"timed out after {limit} at step {step}{why}; set [slurm] time longer than {limit} (or raise "
            f"[slurm] max_num_timeout); {then}")


_SIGNAL_HINTS = {
    signal.SIGKILL: "most often the system ran out of memory, or a scheduler's hard kill past the time limit",
    signal.SIGTERM: "cancelled or pre-empted (scancel, a node shut down), or the runner that started it ended",
    signal.SIGINT: "interrupted: Ctrl-C, or submitit's local executor stopping a task past its time limit",
    signal.SIGUSR2: "submitit's time-limit / pre-emption warning, which the process did not handle",
    signal.SIGSEGV: "a crash in native code (torch, a driver)",
    signal.SIGBUS: "a crash in native code, or a memory-mapped file that went away",
    signal.SIGABRT: "an abort in native code (an assertion in torch or a library)",
}


def signal_in_words(signum: int) -> str:
    try:
        name = signal.Signals(signum).name
    except ValueError:
        return f"killed by signal {signum}"
    hint = _SIGNAL_HINTS.get(signum)
    return f"killed by signal {signum} ({name}{': ' + hint if hint else ''})"


def exit_in_words(code: int | None) -> str:
    """A process's end in words; `code` as Popen reports it (negative: the signal that killed it) or
    as a shell does (128 + n: signal n)."""
    if code is None:
        return "ended without an exit status"
    if code < 0 and code != -1:
        return signal_in_words(-code)
    if code == 0:
        return "exited normally (code 0)"
    if code == LOCAL_REQUEUE_EXIT:
        return (f"exit code {code}: submitit's requeue (the job reached its time limit or was pre-empted, "
                "checkpointed and asked to be started again)")
    if code in (-1, 255):
        return f"exit code {code}: submitit's exit after requeueing a Slurm job (time limit or pre-emption)"
    if 128 < code <= 128 + 64:
        return f"exit code {code}: " + signal_in_words(code - 128)
    if code == 1:
        return "exit code 1: an uncaught exception (its traceback is in the log)"
    return f"exit code {code}"


#: Slurm job states that end a job other than by finishing
_STATES = {
    "TIMEOUT": "reached its Slurm time limit without being requeued ([slurm] time)",
    "OUT_OF_MEMORY": "ran out of memory (raise [slurm] mem_gb)",
    "CANCELLED": "was cancelled (scancel, or the scheduler)",
    "NODE_FAIL": "lost its node",
    "PREEMPTED": "was pre-empted and not requeued",
    "BOOT_FAIL": "could not start its node",
    "DEADLINE": "reached its deadline",
    "INTERRUPTED": "was killed by a signal",
    "NO PROCESS AND NO RESULT": "left no result (its process is gone)",
}

#: submitit's lines (its stdout log) that say how a job's attempt ended
_REQUEUED = re.compile(r"Requeued job|this job is (timed-out|preempted)")
_ENDED = re.compile(r"Job completed successfully|Job not requeued because|Submitted job triggered an exception")
_STARTED = "Starting with JobEnvironment"
#: a traceback's last line: the error that ended a process
_ERROR = re.compile(r"^(KeyboardInterrupt|\w+(\.\w+)*(Error|Exception|Exit|Interrupt)\b)")


def log_tail(path: Path, size: int = 20000) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - size))
            return f.read().decode(errors="replace").splitlines()
    except OSError:
        return []


def asked_requeue(out: list[str], err: list[str]) -> bool:
    """Whether a job's last attempt ended at its time limit or by pre-emption, from its logs (submitit's
    stdout and stderr): submitit's time-limit warning or requeue with no end after it, or a task stopped
    by SIGINT (KeyboardInterrupt), as submitit's local executor stops a task still running at its limit."""
    for line in reversed(out):
        if _ENDED.search(line):
            return False
        if _REQUEUED.search(line):
            return True
        if _STARTED in line:
            break
    last = next((x.strip() for x in reversed(err) if x.strip()), "")
    return last == "KeyboardInterrupt"


def job_end_in_words(job_id: str, state: str | None, exc: BaseException | None, out_log: Path, err_log: Path,
                     code: int | None = None) -> str:
    """Why a job ended without a result, from what the runner can see: the scheduler's state, the
    exit of its process, its logs (submitit's lines, the last error); with the error log's path."""
    out, err = log_tail(out_log), log_tail(err_log)
    parts = []
    if state in _STATES:
        parts.append(_STATES[state])
    if code not in (None, 0):
        parts.append(exit_in_words(code))
    for line in reversed(out + err):
        m = re.search(r"Job not requeued because: (.*?)\.?$", line)
        if m:
            parts.append(f"not requeued: {m.group(1)}")
            break
    error = next((x.strip() for x in reversed(err) if _ERROR.match(x.strip())), None)
    if asked_requeue(out, err):
        parts.append("its last attempt was stopped at the time limit (or pre-empted) and not started again"
                     + (" (KeyboardInterrupt: submitit's local executor stops a task still running at its limit)"
                        if error == "KeyboardInterrupt" else ""))
    elif error:
        parts.append(f"last error: {error[:200]}")
    if not parts and exc is not None:
        text = str(exc).strip().splitlines()
        parts.append(f"{type(exc).__name__}: {(text[0] if text else '')[:200]}")
    return f"job {job_id}: {'; '.join(parts) or 'ended without a result'}; log: {err_log}"
