"""Two processes on one results folder (issue 30, items 4 and 5) and a suite that is not the study its
results hold (weaknesses W1, W2).

A run's folder held by another process is left to it untouched, and the runner says so and exits 0;
two reports of one folder at once never mix or delete each other's files; a different study under a
suite's name is refused; a suite file edited since its runs is said by the report. No clock: the
tests hold the claim themselves, and threads wait on events, not on time.
"""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from bench import fileio
from bench.cli import main
from bench.report import build, publish
from bench.suite.display import make_reporter
from bench.suite.executors import InlineExecutor, WorkerPool
from bench.suite.grid import load_suite
from bench.suite.runner import run_suite
from bench.suite.workers import start_worker, worker_records
from bench.train.run_folder import LOCKED, ResultsConflictError, read_status

REPO = Path(__file__).resolve().parents[1]
WORKLOAD = "synthetic-16_unet-micro"

SUITE = """
[suite]
name = "twice"
[grid]
methods = {methods}
datasets = ["synthetic"]
archs = ["unet-micro"]
seeds = {seeds}
[budget]
iters = 2
batch_size = 2
[train]
lr = {lr}
[eval]
every = 2
metrics = ["proxy_fd"]
num_images = 8
sampler_steps = 2
batch_size = 8
"""


def write_suite(tmp_path, methods=("baseline",), seeds=(0,), lr=1e-3, name="twice.toml") -> Path:
    path = tmp_path / name
    path.write_text(SUITE.format(methods=json.dumps(list(methods)), seeds=json.dumps(list(seeds)), lr=lr))
    return path


def held_run(tmp_path):
    """The suite's one run, its folder mid-training in another process: a status and the folder's lock,
    held by this test (flock: a second open file is refused even in this process)."""
    run = load_suite(write_suite(tmp_path)).runs()[0]
    run_dir = run.run_dir(tmp_path / "r")
    fileio.write_json(run_dir / "status.json", {"state": "running", "step": 1, "reason": None})
    return run, run_dir, fileio.try_lock(run_dir / ".lock")


def folder_state(run_dir: Path) -> dict:
    return {p.name: p.read_bytes() for p in run_dir.iterdir()}


def test_a_second_runner_leaves_a_held_run_to_its_holder_and_exits_0(tmp_path):
    """`run --jobs 2` while another process trains the suite's run: no worker, nothing written into
    that folder, a line naming the holder's pid, exit 0 (its own work: none, succeeded)."""
    run, run_dir, lock = held_run(tmp_path)
    before = folder_state(run_dir)
    try:
        out = subprocess.run([sys.executable, "run_bench.py", "--results", str(tmp_path / "r"), "run",
                              str(tmp_path / "twice.toml"), "--jobs", "2", "--no-report"], cwd=REPO,
                             capture_output=True, text=True, timeout=600)
        after = folder_state(run_dir)
    finally:
        lock.close()
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"{run.key} is held by another process (host " in out.stdout and f"pid {os.getpid()})" in out.stdout
    assert after == before


def test_an_inline_runner_names_the_holder_of_a_run_it_leaves(tmp_path):
    run, run_dir, lock = held_run(tmp_path)
    events = []
    try:
        pool = InlineExecutor({run.key: run_dir}, make_reporter(events.append), train_fn=pytest.fail)
        out = pool.run([run])[run.key]
    finally:
        lock.close()
    assert out.action == "skipped" and out.reason == LOCKED and read_status(run_dir)["state"] == "running"
    said = [e["text"] for e in events if e["event"] == "message"]
    assert any(f"pid {os.getpid()})" in text and run.key in text for text in said), said


def test_a_worker_that_finds_the_folder_held_tells_its_runner(tmp_path):
    """The folder is taken between the runner's look and its worker's lock: the worker says why it did
    not train in its runner's own record, and the runner reports the run as left to its holder. Worker
    records are the runner's own: another live runner's is never touched, a dead one's is removed."""
    run, run_dir, lock = held_run(tmp_path)
    other, _ = worker_records(run_dir, os.getppid())  # a live process: another runner's record
    other.write_text("another runner's")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone, _ = worker_records(run_dir, int(dead.stdout))
    gone.write_text("{}")
    events = []
    try:
        proc = start_worker(run, run_dir, "bench.train.loop:train", False, 1)
        code = proc.wait(timeout=600)
        assert code == 0, (run_dir / "worker.log").read_text()[-2000:]
        pool = WorkerPool({run.key: run_dir}, make_reporter(events.append), jobs=2)
        pool._reap(run, code, "ran", 0.0)
    finally:
        lock.close()
    out = pool.outcomes[run.key]
    assert out.action == "skipped" and out.reason == LOCKED, out
    assert read_status(run_dir) == {"state": "running", "step": 1, "reason": None}
    assert not any(p.exists() for p in worker_records(run_dir)) and not gone.exists()
    assert other.read_text() == "another runner's"
    assert any(f"pid {os.getpid()})" in e.get("text", "") for e in events)


def test_a_dead_worker_never_marks_a_folder_another_process_holds_failed(tmp_path):
    """What the trial saw: a runner's worker died (SIGTERM) while another process trained the run; the
    runner wrote "failed" into the other's folder. The failure is recorded under the folder's lock only."""
    run, run_dir, lock = held_run(tmp_path)
    try:
        pool = WorkerPool({run.key: run_dir}, make_reporter(False), jobs=2)
        pool._reap(run, -15, "ran", 0.0)
        assert read_status(run_dir)["state"] == "running" and pool.outcomes[run.key].reason == LOCKED
    finally:
        lock.close()
    pool._reap(run, -15, "ran", 0.0)  # free now: the worker's death is this runner's to record
    assert read_status(run_dir)["state"] == "failed" and "worker process" in read_status(run_dir)["reason"]


def test_two_reports_at_once_never_mix_or_delete_each_others_files(tmp_path, monkeypatch):
    """Report A builds; report B starts meanwhile. B waits for A (one report of a folder at a time), A
    publishes whole, then B; B's report has none of A's files beside it (A's table, which B no longer
    makes, goes). Both builds are stand-ins writing a marker; the threads wait on events only."""
    suite_dir = tmp_path / "results" / "twice"
    suite_dir.mkdir(parents=True)
    a_built, b_waits_or_builds, a_done = threading.Event(), threading.Event(), threading.Event()
    real_try_lock = fileio.try_lock

    def try_lock(path):
        lock = real_try_lock(path)
        if lock is None and threading.current_thread().name == "B":
            b_waits_or_builds.set()  # B is refused the report lock: it waits for A
        return lock

    def fake_build(suite, staging):
        me = threading.current_thread().name
        if me == "B":
            b_waits_or_builds.set()  # (without the lock B would be building beside A now)
            a_done.wait()
        (staging / "tables").mkdir(parents=True)
        (staging / "tables" / f"{me.lower()}.csv").write_text(f"{me}\n")
        (staging / "report.md").write_text(f"report {me}\n")
        if me == "A":
            a_built.set()
            b_waits_or_builds.wait()
        return staging / "report.md"

    monkeypatch.setattr(fileio, "try_lock", try_lock)
    monkeypatch.setattr(build, "_build_into", fake_build)
    seen, errors = {}, []

    def report(name):
        try:
            path = build.build_report(suite_dir)
            seen[name] = (path.read_text() if path.exists() else None, sorted(os.listdir(suite_dir / "tables")))
        except Exception as exc:  # noqa: BLE001 -- the test reports it below
            errors.append(repr(exc))
        finally:
            if name == "A":
                a_done.set()

    a = threading.Thread(target=report, args=("A",), name="A")
    a.start()
    a_built.wait()
    b = threading.Thread(target=report, args=("B",), name="B")
    b.start()
    a.join()
    b.join()
    assert not errors, errors
    assert seen["A"] == ("report A\n", ["a.csv"])
    assert seen["B"] == ("report B\n", ["b.csv"])
    assert not list(suite_dir.glob(".report-staging*"))
    assert json.loads((suite_dir / publish.MANIFEST).read_text()) == ["tables/b.csv", "report.md"]


def test_staging_folders_of_dead_reports_are_removed_and_a_failed_build_keeps_the_report(tmp_path, monkeypatch):
    suite_dir = tmp_path / "twice"
    (suite_dir / "tables").mkdir(parents=True)
    (suite_dir / "tables" / "old.csv").write_text("old\n")
    (suite_dir / "report.md").write_text("old report\n")
    for stale in (".report-staging", ".report-staging-999999-abc"):  # before per-process staging, and a killed one
        (suite_dir / stale / "tables").mkdir(parents=True)

    def broken(suite, staging):
        (staging / "report.md").write_text("half\n")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(build, "_build_into", broken)
    with pytest.raises(OSError):
        build.build_report(suite_dir)
    assert (suite_dir / "report.md").read_text() == "old report\n" and (suite_dir / "tables" / "old.csv").exists()
    assert not list(suite_dir.glob(".report-staging*"))


def test_another_study_under_the_suite_name_is_refused_in_one_line(tmp_path, capsys):
    """A different suite file with the same name: refused before anything runs, naming what differs
    and the fix. The same study with a seed or a method added (or its report settings changed) runs."""
    results = tmp_path / "r"
    first = load_suite(write_suite(tmp_path))
    (results / "twice").mkdir(parents=True)
    fileio.write_json(results / "twice" / "suite.json", first.to_dict())
    grown = write_suite(tmp_path, methods=["baseline", "p2"], seeds=[0, 1], name="grown.toml")
    assert run_suite(grown, results_root=results, dry_run=True, progress=False).plan
    other = write_suite(tmp_path, methods=["p2"], lr=2e-3, name="other.toml")
    with pytest.raises(ResultsConflictError, match=r"\[train\] lr: 0\.001 there, 0\.002 now"):
        run_suite(other, results_root=results, dry_run=True, progress=False)
    assert main(["--results", str(results), "run", str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "another study named 'twice'" in err[0], err
    assert "rename this suite ([suite] name) or pass another --results folder" in err[0]
    assert not (results / "twice" / WORKLOAD / "p2").exists()
    assert json.loads((results / "twice" / "suite.json").read_text())["train"]["lr"] == 1e-3


def test_a_different_data_set_or_budget_is_another_study():
    from bench.suite.study import study_differences

    old = {"budget": {"iters": 8, "batch_size": 2, "images": 16}, "train": {"lr": 1e-3, "device": "cpu"},
           "eval": {"every": 4, "metrics": ["proxy_fd"]},
           "workloads": [{"name": "synthetic-16_unet-micro", "dataset": "synthetic", "resolution": 16}]}
    same = {**old, "train": {"lr": 1e-3, "device": "cuda", "plugins": ["/elsewhere/p.py"]},
            "eval": {**old["eval"], "save_samples": True}, "seeds": [0, 1, 2], "report": {"baseline": "p2"}}
    assert study_differences(old, same) == []
    moved = {**old, "workloads": [{**old["workloads"][0], "dataset": "fashion-mnist"}]}
    assert study_differences(old, moved) == [
        '[grid] datasets: ["synthetic at 16 px"] there, ["fashion-mnist at 16 px"] now']
    assert study_differences(old, {**old, "budget": {**old["budget"], "iters": 16}}) == [
        "[budget] iters: 8 there, 16 now"]


def test_the_report_says_when_the_suite_file_changed_since_the_runs(tmp_path, capsys):
    suite_file = write_suite(tmp_path)
    suite_dir = tmp_path / "r" / "twice"
    suite_dir.mkdir(parents=True)
    fileio.write_json(suite_dir / "suite.json", load_suite(suite_file).to_dict())
    assert "Note: the suite file" not in build.build_report(suite_dir).read_text()
    assert "note:" not in capsys.readouterr().err
    write_suite(tmp_path, seeds=[0, 1], lr=2e-3)  # edited after `run`
    text = build.build_report(suite_dir).read_text()
    line = f"the suite file {suite_file} changed since the runs ([grid] seeds: [0] then, [0, 1] now; [train] lr: " \
           "0.001 then, 0.002 now); this report shows the suite as run (suite.json): `run` it again to apply the change"
    assert f"**Note: {line}.**" in text
    assert f"note: {line}" in capsys.readouterr().err
