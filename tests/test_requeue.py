"""Time limits under submitit (bench/suite/slurm.py, bench/suite/exits.py): a run whose job reaches its
time limit checkpoints, is requeued and ends as an uninterrupted run would, wherever the signal lands
(inside the training steps, or in an evaluation, where submitit requeues at once); a run that timed
out once too often fails in words, its checkpoint kept; and every other way a job or worker ends is
told in words with its log's path.

The signal is sent by the run itself at a named point (after step k, or inside the evaluation at step
k), on its first attempt only: nothing depends on the clock or the machine's load.
"""

import os
import signal
from pathlib import Path

import pytest

from bench import fileio
from bench.errors import ConfigError
from bench.suite.exits import (
    JobRequeued,
    asked_requeue,
    exit_in_words,
    job_end_in_words,
    timed_out_in_words,
)
from bench.suite.grid import load_suite
from bench.train.run_folder import read_status, write_status

REPO = Path(__file__).resolve().parent.parent
TRAIN_REF = f"{__name__}:signalled_train"
RUN = Path("rq") / "synthetic-16_unet-micro" / "baseline" / "seed0"

SUITE = """
[suite]
name = "rq"
[grid]
methods = ["baseline"]
datasets = ["synthetic"]
archs = ["unet-micro"]
seeds = [0]
[budget]
iters = 8
batch_size = 2
[train]
lr = 1e-3
ckpt_every = 2
[eval]
every = 4
metrics = ["proxy_fd"]
num_images = 8
sampler_steps = 2
batch_size = 8
"""


def signalled_train(run, out_dir, events=None):
    """bench.train.loop.train, whose first call sends its own process SIGUSR2 (submitit's time-limit
    signal) at $SIGNAL_AT: "step:<k>" right after step k (inside the training steps) or "eval:<k>"
    inside the evaluation at step k (outside them). Every call's start step goes to $TRAIN_LOG."""
    import torch

    from bench.train import loop

    out, log = Path(out_dir), Path(os.environ["TRAIN_LOG"])
    ckpt = out / "checkpoint.pt"
    start = torch.load(ckpt, weights_only=True)["step"] if ckpt.exists() else 0  # where train resumes
    first = not log.exists() or not log.read_text().strip()
    with open(log, "a") as f:
        f.write(f"{start}\n")
    where, at = os.environ["SIGNAL_AT"].split(":")
    if not first:
        return loop.train(run, out_dir, events)
    if where == "step":
        class Signal(loop.TrainEvents):
            def on_step(self, step, iters, row):
                if step == int(at):
                    os.kill(os.getpid(), signal.SIGUSR2)

        return loop.train(run, out_dir, Signal())
    evaluate = loop._evaluate

    def signalled_evaluate(state, *args):
        if state.step == int(at):
            loop.stepping(False)  # as _evaluate's first line: from here on the evaluation runs
            os.kill(os.getpid(), signal.SIGUSR2)  # the handler acts here, before the evaluation's first image
        return evaluate(state, *args)

    loop._evaluate = signalled_evaluate
    try:
        return loop.train(run, out_dir, events)
    finally:  # the debug executor trains in this process
        loop._evaluate = evaluate


def logged(run_dir: Path, name: str) -> list[dict]:
    """A log's rows without the clock's fields (the only ones a resumed run may change)."""
    return [{k: v for k, v in r.items() if not (k.endswith("seconds") or k.endswith("per_s"))}
            for r in fileio.read_jsonl(run_dir / name)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The suite's run, trained inline without any signal."""
    from bench.suite.runner import run_suite

    root = tmp_path_factory.mktemp("whole")
    (root / "rq.toml").write_text(SUITE)
    assert run_suite(load_suite(root / "rq.toml"), results_root=root / "r", progress=False).ok
    return root / "r" / RUN


@pytest.fixture
def signalled(tmp_path, monkeypatch):
    """Sets where the first attempt is signalled; returns the start step of every attempt."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), str(Path(__file__).parent),
                                                      os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("TRAIN_LOG", str(tmp_path / "starts.log"))
    (tmp_path / "rq.toml").write_text(SUITE)

    def at(point: str):
        monkeypatch.setenv("SIGNAL_AT", point)
        return lambda: [int(x) for x in (tmp_path / "starts.log").read_text().split()]
    return at


# ---------------------------------------------------------------------------------------------- words


def test_exits_are_told_in_words(tmp_path):
    assert "requeue" in exit_in_words(144) and "time limit" in exit_in_words(144)
    assert "signal 9 (SIGKILL" in exit_in_words(-9) and "memory" in exit_in_words(-9)
    assert "signal 9 (SIGKILL" in exit_in_words(137)  # a shell's 128 + 9
    assert "SIGTERM" in exit_in_words(-15) and "SIGUSR2" in exit_in_words(-12)
    assert "requeueing a Slurm job" in exit_in_words(255) and exit_in_words(3) == "exit code 3"
    # The job log (submitit's stdout): timed out, requeued, and not started again.
    out = ["submitit INFO - Starting with JobEnvironment(job_id=25753, hostname=vm)",
           "submitit WARNING - Caught signal SIGUSR2 on vm: this job is timed-out.",
           "submitit INFO - Calling checkpoint method.", "submitit INFO - Requeued job 25753 (2 remaining timeouts)"]
    assert asked_requeue(out, []) and not asked_requeue(out + ["submitit INFO - Job completed successfully"], [])
    assert not asked_requeue(out[:1], ["Traceback (most recent call last):", "ValueError: bad thing"])
    # A task that submitit's local executor stopped at its limit while a step ran (no requeue logged).
    assert asked_requeue(out[:1], ["Traceback (most recent call last):", '  File "x.py", line 1', "KeyboardInterrupt"])
    (tmp_path / "o.out").write_text("\n".join(out) + "\n")
    log = tmp_path / "25753_0_log.err"
    log.write_text(out[1] + "\n")
    text = job_end_in_words("25753", "FINISHED", RuntimeError("no result"), tmp_path / "o.out", log)
    assert "stopped at the time limit (or pre-empted) and not started again" in text and text.endswith(f"log: {log}")
    (tmp_path / "o.out").write_text("submitit INFO - Job not requeued because: timed-out too many times.\n")
    log.write_text("Traceback (most recent call last):\nValueError: bad thing\n")
    text = job_end_in_words("7", "TIMEOUT", None, tmp_path / "o.out", log)
    assert "Slurm time limit" in text and "not requeued: timed-out too many times" in text
    assert "last error: ValueError: bad thing" in text
    assert "timed out after 2 min at step 5" in timed_out_in_words(2, 5) and "set [slurm] time" in timed_out_in_words(2, 5)
    assert "checkpoint at step 5 is kept" in timed_out_in_words(2, 5)
    assert "no checkpoint yet" in timed_out_in_words(1, 0, kept=False)  # the limit ran out in every set-up


def test_a_sys_exit_in_training_is_told_in_words():
    from bench.suite.executors import classify_exception

    kind, reason = classify_exception(SystemExit(144))
    assert kind == "exception" and "sys.exit(144)" in reason and "submitit's requeue" in reason


def test_max_num_timeout_reaches_submitits_executor_and_local_jobs_get_a_long_default_limit(tmp_path):
    submitit = pytest.importorskip("submitit")
    from bench.suite.slurm import LOCAL_TIME_MIN, max_num_timeout, slurm_parameters

    for cluster in ("local", "debug"):
        p = slurm_parameters({"max_num_timeout": 1}, "x", cluster)
        ex = submitit.AutoExecutor(folder=str(tmp_path / cluster), cluster=cluster)
        ex.update_parameters(**p)  # a max_num_timeout among the job parameters was a NameError here
    assert slurm_parameters({}, "x", "local")["timeout_min"] == LOCAL_TIME_MIN >= 60
    assert slurm_parameters({"time": 3}, "x", "local")["timeout_min"] == 3
    assert "timeout_min" not in slurm_parameters({}, "x", "slurm")  # the partition's default applies
    assert max_num_timeout({}) == 3 and max_num_timeout({"max_num_timeout": "0"}) == 0
    with pytest.raises(ConfigError, match="max_num_timeout"):
        slurm_parameters({"max_num_timeout": "-1"}, "x", "local")


# ------------------------------------------------------------------- a requeue outside the training steps


def _fake_run():
    from bench.suite.grid import RunSpec

    cfg = dict(dataset="synthetic", arch="unet-micro", iters=8, batch_size=2)
    return RunSpec.from_dict({"suite": "s", "workload": "w", "label": "baseline", "seed": 0, "config": cfg})


def requeued_in_setup(run, out_dir, events=None):
    """A train that has checkpointed step 3 and is signalled outside the steps (as in an evaluation)."""
    write_status(Path(out_dir), "running", 3)
    (Path(out_dir) / "checkpoint.pt").write_bytes(b"kept")
    os.kill(os.getpid(), signal.SIGUSR2)
    raise AssertionError("the signal's handler did not act")


def _handled(tmp_path, submitits):
    """execute_run of `requeued_in_setup` with RunJob's handler around `submitits` on SIGUSR2."""
    from bench.core.runtime import unwatch_stop_signal, watch_stop_signal
    from bench.suite.executors import execute_run
    from bench.suite.slurm import RunJob

    run, run_dir = _fake_run(), tmp_path / "run"
    before = signal.getsignal(signal.SIGUSR2)
    signal.signal(signal.SIGUSR2, RunJob(run.to_dict(), str(run_dir), "", False, 5)._requeue_handler(submitits))
    previous = watch_stop_signal(signal.SIGUSR2)
    try:
        return execute_run(run, run_dir, requeued_in_setup), run_dir
    finally:
        unwatch_stop_signal(signal.SIGUSR2, previous)
        signal.signal(signal.SIGUSR2, before)


def test_a_requeue_outside_the_steps_leaves_the_run_resumable(tmp_path):
    """submitit's handler exits with 144 where the signal lands (the issue: in an evaluation); that exit
    must leave the job's process, so submitit's controller starts it again, not be a failed run."""
    pytest.importorskip("submitit")

    def requeue_and_exit(signum, frame):  # what submitit's local handler does after checkpoint()
        raise SystemExit(144)

    with pytest.raises(JobRequeued) as caught:
        _handled(tmp_path, requeue_and_exit)
    assert caught.value.code == 144
    status = read_status(tmp_path / "run")
    assert status["state"] == "running" and status["step"] == 3 and not (tmp_path / "run" / "error.log").exists()


def test_a_signal_waiting_for_a_step_boundary_acts_when_an_evaluation_begins():
    """A signal in the step before an evaluation waits for the boundary, which comes after the evaluation:
    a Slurm job (or submitit-local's controller) would kill it there, past the signal's warning. It acts
    as the evaluation begins instead; one that a boundary took up (checkpoint, stop) does not act again."""
    from bench.core.runtime import stepping, stop_requested, unwatch_stop_signal, watch_stop_signal

    calls = []
    before = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    previous = watch_stop_signal(signal.SIGUSR2)
    try:
        stepping(True)
        os.kill(os.getpid(), signal.SIGUSR2)  # inside a step: waits
        assert calls == []
        stepping(False)  # an evaluation begins
        assert calls == [signal.SIGUSR2]
        stepping(True)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop_requested(None) and calls == [signal.SIGUSR2]  # a boundary takes it up
        stepping(False)  # the loop's last words before StopRequested: nothing more
        assert calls == [signal.SIGUSR2]
    finally:
        unwatch_stop_signal(signal.SIGUSR2, previous)
        signal.signal(signal.SIGUSR2, before)


def swallowing_train(run, out_dir, events=None):
    """A train whose set-up catches any exit, as the plugin loader turns a plugin's sys.exit() into an error."""
    write_status(Path(out_dir), "running", 2)
    try:
        os.kill(os.getpid(), signal.SIGUSR2)
    except SystemExit as exc:
        raise ValueError(f"caught {exc!r}") from None


def test_a_requeue_that_something_caught_still_ends_the_job_as_a_requeue(tmp_path, monkeypatch):
    """The signal in a plugin's import: the loader turns the exit into an error, so execute_run records a
    failure; the job must still exit as requeued (the requeue's checkpoint was written), not return it."""
    pytest.importorskip("submitit")
    from bench.suite.executors import train_fn_ref
    from bench.suite.slurm import RunJob

    monkeypatch.setenv("SUBMITIT_DEBUG_JOB_ID", "DEBUG_1")  # a job of submitit's debug executor, in this process
    before = signal.getsignal(signal.SIGUSR2)
    job = RunJob(_fake_run().to_dict(), str(tmp_path / "run"), train_fn_ref(swallowing_train), False)
    with pytest.raises(JobRequeued) as caught:
        job()
    assert caught.value.code == 144 and signal.getsignal(signal.SIGUSR2) == before


def test_a_run_that_timed_out_once_too_often_fails_in_words_with_its_checkpoint(tmp_path):
    pytest.importorskip("submitit")
    from submitit.core.utils import UncompletedJobError

    def refuse(signum, frame):  # submitit's handler when the job's timeouts are spent
        raise UncompletedJobError("Job not requeued because: timed-out too many times.")

    out, run_dir = _handled(tmp_path, refuse)
    assert out["state"] == "failed" and out["step"] == 3
    assert out["reason"].startswith("timed out after 5 min at step 3 (submitit: timed-out too many times); "
                                    "set [slurm] time longer than 5 min")
    assert (run_dir / "checkpoint.pt").read_bytes() == b"kept" and read_status(run_dir)["resumes_from"] == 3


# ----------------------------------------------------------------------------- whole suites (slow tier)


@pytest.mark.slow
@pytest.mark.parametrize("point, resumes_from", [("eval:4", 2), ("step:3", 3)])
def test_a_submitit_local_run_past_its_time_limit_ends_as_an_uninterrupted_run(
        uninterrupted, tmp_path, signalled, point, resumes_from):
    """The issue's run: submitit's time-limit signal during an evaluation (submitit requeues at once)
    or inside the steps (the run checkpoints at the step boundary): the job is requeued, the run
    resumes from its checkpoint and its logs equal an uninterrupted run's."""
    pytest.importorskip("submitit")
    from bench.suite.runner import run_suite

    starts = signalled(point)
    res = run_suite(load_suite(tmp_path / "rq.toml"), executor="submitit-local", results_root=tmp_path / "r",
                    progress=False, train_fn=TRAIN_REF, slurm={"time": 5})
    assert [(o.state, o.reason) for o in res.outcomes] == [("done", None)]
    assert starts() == [0, resumes_from]
    for name in ("steps.jsonl", "evals.jsonl"):
        assert logged(tmp_path / "r" / RUN, name) == logged(uninterrupted, name), name
    logs = "".join(p.read_text() for p in (tmp_path / "r" / "rq" / "_submitit").rglob("*_log.*"))
    assert "Requeued job" in logs and "Job completed successfully" in logs


@pytest.mark.slow
@pytest.mark.parametrize("point, resumes_from", [("eval:4", 2), ("step:3", 3)])
def test_a_submitit_debug_run_signalled_is_run_again_from_its_checkpoint(
        uninterrupted, tmp_path, signalled, point, resumes_from):
    """submitit-debug runs the job in this process and requeues nothing: the runner runs it again
    (up to max_num_timeout times); with max_num_timeout = 0 the run fails in words, its checkpoint
    kept, and the same command then resumes it to the uninterrupted run's logs."""
    pytest.importorskip("submitit")
    from bench.suite.runner import run_suite

    starts = signalled(point)
    suite = load_suite(tmp_path / "rq.toml")
    first = run_suite(suite, executor="submitit-debug", results_root=tmp_path / "r", progress=False,
                      train_fn=TRAIN_REF, slurm={"max_num_timeout": 0})
    (out,) = first.outcomes
    assert out.state == "failed" and out.step == resumes_from and "set [slurm] time" in out.reason, out.reason
    assert (tmp_path / "r" / RUN / "checkpoint.pt").exists()
    assert signal.getsignal(signal.SIGUSR2) in (signal.SIG_DFL, None)  # this process's handler given back
    again = run_suite(suite, executor="submitit-debug", results_root=tmp_path / "r", progress=False, train_fn=TRAIN_REF)
    assert [o.state for o in again.outcomes] == ["done"] and starts() == [0, resumes_from]
    for name in ("steps.jsonl", "evals.jsonl"):
        assert logged(tmp_path / "r" / RUN, name) == logged(uninterrupted, name), name

    # With requeues left, one command ends done: the runner itself runs the timed-out job again.
    (tmp_path / "starts.log").write_text("")
    fresh = run_suite(suite, executor="submitit-debug", results_root=tmp_path / "r2", progress=False,
                      train_fn=TRAIN_REF)
    assert [o.state for o in fresh.outcomes] == ["done"] and starts() == [0, resumes_from]
    for name in ("steps.jsonl", "evals.jsonl"):
        assert logged(tmp_path / "r2" / RUN, name) == logged(uninterrupted, name), name
