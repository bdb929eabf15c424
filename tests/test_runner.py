"""The suite runner (bench/suite/runner.py and its executors): layout, skipping and resuming, failure
isolation, refusing to mix configurations, worker processes, submitit's local executor, and the
smoke suite end to end.

Every test runs the real bench.train.loop.train on a tiny configuration (unet-micro, 8 steps of 2
images, 8 evaluation images with 2 sampler steps). Failures come from the `faulty` plugin method
(tests/plugins/faulty.py): it behaves as the baseline unless the FAULTS environment variable names
its tag, so worker processes and submitit jobs see the same faults; `logged_train` records every
call of train with the step it started from.
"""

import io as _io
import json
import os
import re
from pathlib import Path

import pytest

from bench import fileio
from bench.errors import ConfigError
from bench.suite.display import RichReporter
from bench.suite.grid import load_suite
from bench.suite.runner import run_suite
from bench.suite.slurm import slurm_parameters
from bench.train.run_folder import ResultsConflictError, check_conflict, read_status

REPO = Path(__file__).resolve().parent.parent
PLUGINS = Path(__file__).resolve().parent / "plugins"
TRAIN_REF = f"{__name__}:logged_train"
WORKLOAD = "synthetic-16_unet-micro"

SUITE = """
[suite]
name = "rt"

[grid]
methods = {methods}
datasets = ["synthetic"]
archs = ["unet-micro"]
seeds = {seeds}

[budget]
iters = 8
batch_size = 2

[train]
lr = {lr}
ckpt_every = 2
plugins = [{plugins}]

[eval]
every = 4
metrics = ["proxy_fd"]
num_images = 8
sampler_steps = 2
batch_size = 8
"""


def make_suite(tmp_path, methods=("baseline", "faulty-tagb"), seeds=(0, 1), lr=1e-3):
    """A suite of the given method labels: "faulty-tag<x>" is the faulty plugin with tag x."""
    entries = [{"name": "faulty", "tag": m.split("-tag")[1]} if m.startswith("faulty-tag") else m for m in methods]
    toml = json.dumps(entries).replace('{"name": "faulty", "tag": ', '{name = "faulty", tag = ')
    p = tmp_path / "rt.toml"
    p.write_text(SUITE.format(methods=toml, seeds=json.dumps(list(seeds)), lr=lr,
                              plugins=json.dumps(str(PLUGINS / "faulty.py"))))
    return load_suite(p)


def logged_train(run, out_dir, events=None):
    """bench.train.loop.train, logging "<label>/<seed folder> <start step>" to $TRAIN_LOG (across processes)."""
    from bench.train.loop import train

    status = read_status(Path(out_dir))
    start = status["step"] if status and (Path(out_dir) / "checkpoint.pt").exists() else 0
    if os.environ.get("TRAIN_LOG"):
        with open(os.environ["TRAIN_LOG"], "a") as f:
            f.write(f"{Path(out_dir).parent.name}/{Path(out_dir).name} {start}\n")
    return train(run, out_dir, events)


@pytest.fixture
def calls(tmp_path, monkeypatch):
    """The list of (run, start step) of every train call, across processes."""
    log = tmp_path / "calls.log"
    log.touch()
    monkeypatch.setenv("TRAIN_LOG", str(log))
    monkeypatch.delenv("FAULTS", raising=False)
    return lambda: [tuple(line.split()) for line in log.read_text().splitlines()]


# ----------------------------------------------------------------------------------------------


def test_runs_every_run_into_its_folder_then_skips_them(tmp_path, calls):
    suite = make_suite(tmp_path)
    events = []
    res = run_suite(suite, results_root=tmp_path / "results", progress=events.append, train_fn=logged_train)
    assert res.ok and len(res.outcomes) == 4
    root = tmp_path / "results" / "rt" / WORKLOAD
    for label in ("baseline", "faulty-tagb"):
        for seed in (0, 1):
            d = root / label / f"seed{seed}"
            assert read_status(d)["state"] == "done"
            assert (d / "machine.json").exists() and (d / "config.json").exists()
    assert json.loads((tmp_path / "results" / "rt" / "suite.json").read_text())["name"] == "rt"
    assert [c[0] for c in calls()] == ["baseline/seed0", "faulty-tagb/seed0", "baseline/seed1", "faulty-tagb/seed1"]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "suite_start" and kinds[-1] == "suite_end"
    assert {"run_start", "step", "evaluating", "eval", "run_end"} <= set(kinds)
    assert all(o.final["proxy_fd"] > 0 for o in res.outcomes)

    again = run_suite(suite, results_root=tmp_path / "results", progress=False, train_fn=logged_train)
    assert [o.action for o in again.outcomes] == ["skipped"] * 4 and again.ok
    assert len(calls()) == 4  # nothing ran


def test_interrupted_run_resumes_where_it_stopped(tmp_path, calls, monkeypatch):
    suite = make_suite(tmp_path, seeds=[0])
    monkeypatch.setenv("FAULTS", "b:interrupt@5")  # Ctrl-C during step 5, after the checkpoint at 4
    with pytest.raises(KeyboardInterrupt, match="^faulty b: interrupt at step 5$"):
        run_suite(suite, results_root=tmp_path / "r", progress=False, train_fn=logged_train)
    d = tmp_path / "r" / "rt" / WORKLOAD / "faulty-tagb" / "seed0"
    assert read_status(d)["state"] == "running" and read_status(d)["step"] == 4
    monkeypatch.delenv("FAULTS")
    res = run_suite(suite, results_root=tmp_path / "r", progress=False, train_fn=logged_train)
    by = {o.key.split("/")[1]: o for o in res.outcomes}
    assert by["baseline"].action == "skipped" and by["faulty-tagb"].action == "resumed" and res.ok
    assert calls() == [("baseline/seed0", "0"), ("faulty-tagb/seed0", "0"), ("faulty-tagb/seed0", "4")]
    steps = [r["step"] for r in fileio.read_jsonl(d / "steps.jsonl")]
    assert steps == list(range(1, 9))  # every step exactly once
    assert [r["step"] for r in fileio.read_jsonl(d / "evals.jsonl")] == [4, 8]


def test_a_failed_run_is_recorded_and_the_others_go_on(tmp_path, calls, monkeypatch):
    suite = make_suite(tmp_path, methods=["baseline", "faulty-tago", "faulty-tagd", "faulty-tage"], seeds=[0])
    # Out of memory in step 3 and an exception in step 3 (the last checkpoint was at 2); a non-finite
    # loss at step 5, which train records itself.
    monkeypatch.setenv("FAULTS", "o:oom@3,d:diverge@5,e:error@3")
    res = run_suite(suite, results_root=tmp_path / "r", progress=False, train_fn=logged_train)
    by = {o.key.split("/")[1]: o for o in res.outcomes}
    assert by["baseline"].state == "done"
    root = tmp_path / "r" / "rt" / WORKLOAD
    oom = read_status(root / "faulty-tago" / "seed0")
    assert oom["state"] == "failed" and oom["step"] == 2 and oom["error"] == "oom"
    assert "out of memory" in oom["reason"] and "batch_size" in oom["reason"]
    ms = read_status(root / "faulty-tagd" / "seed0")
    assert ms["state"] == "failed" and ms["step"] == 5 and "non-finite" in ms["reason"]
    cl = read_status(root / "faulty-tage" / "seed0")
    assert cl["state"] == "failed" and cl["step"] == 2 and cl["reason"] == "ValueError: bad thing happened"
    assert "Traceback" in (root / "faulty-tage" / "seed0" / "error.log").read_text()
    assert not res.ok and len(res.by_state("failed")) == 3

    # Again: the divergence is deterministic and stays recorded; the other failures are retried.
    n = len(calls())
    res = run_suite(suite, results_root=tmp_path / "r", progress=False, train_fn=logged_train)
    rerun = {c[0] for c in calls()[n:]}
    assert rerun == {"faulty-tago/seed0", "faulty-tage/seed0"}
    assert {o.key.split("/")[1]: o.action for o in res.outcomes}["faulty-tagd"] == "skipped"
    n = len(calls())
    monkeypatch.delenv("FAULTS")
    res = run_suite(suite, results_root=tmp_path / "r", progress=False, train_fn=logged_train, retry_failed=True)
    assert {c[0] for c in calls()[n:]} == {"faulty-tago/seed0", "faulty-tage/seed0", "faulty-tagd/seed0"}
    assert res.ok


def test_results_of_another_config_are_never_mixed(tmp_path, calls):
    suite = make_suite(tmp_path, methods=["baseline"], seeds=[0])
    run_suite(suite, results_root=tmp_path / "r", progress=False, train_fn=logged_train)
    changed = make_suite(tmp_path, methods=["baseline"], seeds=[0], lr=2e-3)
    d = tmp_path / "r" / "rt" / WORKLOAD / "baseline" / "seed0"
    assert "lr: 0.001 there, 0.002 requested" in check_conflict(changed.runs()[0].config, d)
    before = (d / "config.json").read_text()
    for dry in (False, True):
        with pytest.raises(ResultsConflictError, match=rf"^results of another configuration are in the way: "
                                                       rf"{re.escape(str(d))} \(lr: 0\.001 there, 0\.002 requested\)\. "
                                                       r"Refusing to mix them") as info:
            run_suite(changed, results_root=tmp_path / "r", progress=False, train_fn=logged_train, dry_run=dry)
        assert str(d) in str(info.value) and "lr" in str(info.value) and "Refusing to mix" in str(info.value)
    assert len(calls()) == 1 and (d / "config.json").read_text() == before


def test_saving_samples_does_not_change_what_a_run_is():
    """A finished suite whose [eval] now saves samples keeps its runs; a change of what is measured does not."""
    from bench.train.run_folder import config_diff

    old = {"lr": 1e-3, "eval": {"metrics": ["proxy_fd"], "num_images": 400, "save_samples": False}}
    assert config_diff(old, {**old, "eval": {**old["eval"], "save_samples": True, "verbose": True}}) == []
    assert config_diff(old, {**old, "eval": {**old["eval"], "num_images": 800}}) == ["eval"]
    assert old["eval"]["save_samples"] is False  # the caller's records are left as they were


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path, calls):
    suite = make_suite(tmp_path)
    events = []
    res = run_suite(suite, results_root=tmp_path / "r", dry_run=True, progress=events.append, train_fn=logged_train)
    assert not (tmp_path / "r").exists() and calls() == []
    plan = res.plan
    for r in suite.runs():
        assert r.key in plan
    assert "images to train: 64" in plan and "estimated time" in plan
    assert [o.action for o in res.outcomes] == ["planned"] * 4
    assert any(e["event"] == "message" and e["text"] == plan for e in events)
    only = run_suite(suite, results_root=tmp_path / "r", dry_run=True, progress=False, only="*/faulty-tagb/*")
    assert [o.key for o in only.outcomes] == [f"{WORKLOAD}/faulty-tagb/seed0", f"{WORKLOAD}/faulty-tagb/seed1"]


def test_rich_display_and_summary_table(tmp_path, calls, monkeypatch):
    from rich.console import Console

    monkeypatch.setenv("FAULTS", "b:error")
    suite = make_suite(tmp_path, seeds=[0])
    for live in (True, False):
        buf = _io.StringIO()
        console = Console(file=buf, force_terminal=live, width=160)
        run_suite(suite, results_root=tmp_path / f"r{live}", progress=RichReporter(console, live=live),
                  train_fn=logged_train)
        out = buf.getvalue()
        assert "suite rt" in out and "baseline" in out and "failed" in out and "bad thing happened" in out
        assert "proxy_fd" in out  # the summary table's metric column


def test_parallel_worker_processes_and_a_killed_worker(tmp_path, calls, monkeypatch):
    monkeypatch.setenv("FAULTS", "b:kill@3")  # SIGKILL in step 3: the checkpoint at 2 remains
    suite = make_suite(tmp_path, seeds=[0])
    res = run_suite(suite, results_root=tmp_path / "r", jobs=2, progress=False, train_fn=TRAIN_REF)
    by = {o.key.split("/")[1]: o for o in res.outcomes}
    assert by["baseline"].state == "done" and by["baseline"].final["proxy_fd"] > 0
    assert by["faulty-tagb"].state == "failed" and "signal 9" in by["faulty-tagb"].reason
    st = read_status(tmp_path / "r" / "rt" / WORKLOAD / "faulty-tagb" / "seed0")
    assert st["state"] == "failed" and st["step"] == 2 and st["error"] == "oom"


@pytest.mark.slow
def test_submitit_local_executor_runs_the_job_array(tmp_path, calls, monkeypatch):
    pytest.importorskip("submitit")
    # submitit's LocalExecutor starts a fresh Python: it must find bench and this test module.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), str(Path(__file__).parent),
                                                      os.environ.get("PYTHONPATH", "")]))
    suite = make_suite(tmp_path, seeds=[0])
    res = run_suite(suite, executor="submitit-local", results_root=tmp_path / "r", progress=False,
                    train_fn=TRAIN_REF, slurm={"time": 5})
    assert res.ok and [o.state for o in res.outcomes] == ["done", "done"]
    assert sorted(c[0] for c in calls()) == ["baseline/seed0", "faulty-tagb/seed0"]
    assert any((tmp_path / "r" / "rt" / "_submitit").rglob("*_submitted.pkl"))
    again = run_suite(suite, executor="submitit-local", results_root=tmp_path / "r", progress=False,
                      train_fn=TRAIN_REF)
    assert [o.action for o in again.outcomes] == ["skipped", "skipped"] and len(calls()) == 2


def test_a_run_locked_by_another_process_is_left_alone(tmp_path, calls):
    import fcntl

    suite = make_suite(tmp_path, methods=["baseline"], seeds=[0])
    d = tmp_path / "r" / "rt" / WORKLOAD / "baseline" / "seed0"
    d.mkdir(parents=True)
    events = []
    with open(d / ".lock", "a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        res = run_suite(suite, results_root=tmp_path / "r", progress=events.append, train_fn=logged_train)
    assert calls() == [] and res.outcomes[0].action == "skipped"
    assert "another process" in res.outcomes[0].reason
    # This invocation's own work (none) succeeded: the exit status says so, and a line says what was left.
    assert res.ok and res.elsewhere == res.outcomes
    assert any(e["event"] == "message" and "being trained by another process" in e["text"] for e in events)
    assert run_suite(suite, results_root=tmp_path / "r", progress=False, train_fn=logged_train).ok


def test_a_queued_slurm_job_is_not_submitted_twice(tmp_path, monkeypatch):
    from bench.suite.slurm import _queued_slurm_job

    d = tmp_path / "run"
    fileio.write_json(d / "job.json", {"job_id": "123_4", "cluster": "slurm"})
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    squeue = fake_bin / "squeue"
    squeue.write_text("#!/bin/sh\necho RUNNING\n")
    squeue.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    assert _queued_slurm_job(d)
    squeue.write_text("#!/bin/sh\nexit 0\n")  # finished jobs are not listed
    assert not _queued_slurm_job(d)
    assert not _queued_slurm_job(tmp_path / "never-submitted")


def test_slurm_without_a_cluster_is_a_clear_error(tmp_path, calls):
    import shutil

    from bench.errors import ConfigError

    if shutil.which("srun"):
        pytest.skip("this machine is a Slurm node")
    suite = make_suite(tmp_path, seeds=[0])
    with pytest.raises(ConfigError, match="could not submit.*Slurm login node"):
        run_suite(suite, executor="slurm", results_root=tmp_path / "r", progress=False, train_fn=logged_train,
                  slurm={"partition": "gpu", "time": "1:00:00"})
    assert calls() == []


def test_slurm_parameters_from_the_suite_table():
    p = slurm_parameters({"partition": "gpu", "gpus": 1, "time": "48:00:00", "account": "", "cpus_per_task": 10,
                          "mem_gb": 64, "array_parallelism": 18, "additional": {"exclude": "node1"}},
                         "paper-cifar10", "slurm")
    assert p == {"name": "diffbench-paper-cifar10", "timeout_min": 2880, "gpus_per_node": 1, "cpus_per_task": 10,
                 "mem_gb": 64, "slurm_partition": "gpu", "slurm_array_parallelism": 18,
                 "slurm_additional_parameters": {"exclude": "node1"}}
    assert "gpus_per_node" not in slurm_parameters({"gpus": 1}, "x", "local")
    with pytest.raises(ConfigError, match="unknown Slurm setting 'partion'"):
        slurm_parameters({"partion": "gpu"}, "x", "slurm")
    # Overrides from a command line arrive as strings.
    p = slurm_parameters({"gpus": "2", "mem_gb": "32", "time": "90", "setup": "module load cuda"}, "x", "slurm")
    assert (p["gpus_per_node"], p["mem_gb"], p["timeout_min"], p["slurm_setup"]) == (2, 32.0, 90, ["module load cuda"])
    with pytest.raises(ConfigError, match="Slurm settings"):
        slurm_parameters({"gpus": "two"}, "x", "slurm")
    with pytest.raises(ConfigError, match="unknown executor"):
        run_suite("smoke", executor="kubernetes")


# ----------------------------------------------------------------------------------------------
# End to end with the real training loop (seconds on a CPU).

EXPLODE = '''
import torch
from bench.core.spec import Method


class Explode(Method):
    """A test method whose loss weights overflow float32 (finite in float64, so the plugin checks pass):
    training diverges at its first step."""

    name = "explode"
    slots = frozenset({"weighting"})
    source = "tests/test_runner.py"
    weight_scale = "source"  # as written: normalised, a constant weight would be 1

    def loss_weights(self, t, p, schedule, target):
        return torch.full(t.shape, 1e300, dtype=torch.float64)
'''



@pytest.mark.slow
def test_smoke_end_to_end(tmp_path, isolated_registry):
    from bench.report.build import build_report

    results = tmp_path / "results"
    res = run_suite("smoke", results_root=results, progress=False)
    assert res.ok, [(o.key, o.reason) for o in res.outcomes]
    suite_dir = results / "smoke"
    for o in res.outcomes:
        d = Path(o.run_dir)
        for f in ("config.json", "steps.jsonl", "evals.jsonl", "method_trace.json", "status.json", "machine.json"):
            assert (d / f).is_file(), (d, f)
        rows = fileio.read_jsonl(d / "evals.jsonl")
        extended = o.key.split("/")[1] == "baseline"  # [budget] baseline_extend = 2: trains to 16
        assert [r["step"] for r in rows if r["metric"] == "proxy_fd"] == ([4, 8, 12, 16] if extended else [4, 8])
        # noise_sets = 2 at the budget (and everywhere on the extended baseline); the second sampler at 8.
        assert [r["noise_sets"] for r in rows if r["metric"] == "proxy_fd"] == ([2] * 4 if extended else [1, 2])
        assert [(r["step"], r["sampler_steps"]) for r in rows if r["metric"] == "proxy_fd_sampler2"] == [(8, 3)]
    report = build_report(suite_dir)
    text = report.read_text()
    assert "proxy_fd" in text and "Paired speed-up over `baseline`" in text and "## Failed runs" in text
    assert "too few seeds" in text and "### What this report does not show" in text
    assert "Controls: `placebo`" in text and "#### The metric's own noise" in text and "#### Sampler robustness" in text
    assert (report.parent / "tables" / "evaluations.csv").is_file()
    again = run_suite("smoke", results_root=results, progress=False)
    assert [o.action for o in again.outcomes] == ["skipped"] * len(res.outcomes)
    from bench.core.registry import load_plugins

    assert {o.key.split("/")[1].split("-")[0] for o in res.outcomes} == set(load_plugins())  # every registered method

    # A diverging method fails alone; the other run of the suite finishes.
    plugin = tmp_path / "explode.py"
    plugin.write_text(EXPLODE)
    text = (REPO / "suites" / "smoke.toml").read_text()
    text = text.replace('name = "smoke"', 'name = "smoke-explode"')
    text = re.sub(r"methods = \[.*?\]  #", 'methods = ["baseline", "explode"]  #', text, flags=re.S)
    text = text.replace("seeds = [0, 1]", "seeds = [0]")
    text = text.replace("[train]\n", f"[train]\nplugins = [{json.dumps(str(plugin))}]\n")
    path = tmp_path / "smoke-explode.toml"
    path.write_text(text)
    res = run_suite(path, results_root=results, progress=False)
    by = {o.key.split("/")[1]: o for o in res.outcomes}
    assert by["baseline"].state == "done"
    assert by["explode"].state == "failed" and by["explode"].step == 1 and "non-finite" in by["explode"].reason
    text = build_report(results / "smoke-explode").read_text()
    assert "explode/seed0" in text.split("## Failed runs")[1]


PLUGIN_SUITE = """
[suite]
name = "plug"

[grid]
methods = ["baseline", "halfw"]
datasets = ["synthetic"]
archs = ["unet-micro"]
seeds = [0]

[budget]
iters = 2
batch_size = 4

[train]
warmup = 0
ckpt_every = 2

[eval]
every = 2
metrics = ["proxy_fd"]
num_images = 8
sampler_steps = 2
batch_size = 8
"""

HALFW = '''
import torch
from bench.core.spec import Method


class HalfWeight(Method):
    """Every loss weight 0.5: a plugin known only through --plugins."""
    name = "halfw"
    slots = frozenset({"weighting"})

    def loss_weights(self, t, p, schedule, target):
        return torch.full(t.shape, 0.5, dtype=torch.float64)
'''


@pytest.mark.slow
@pytest.mark.parametrize("executor", [["--jobs", "2"], ["--executor", "submitit-local"]], ids=["jobs2", "submitit"])
def test_a_plugin_from_the_command_line_reaches_every_executor(tmp_path, executor):
    """`run SUITE --plugins DIR` with worker processes or submitit jobs, the real train: the plugin's
    runs are trained, not failed with "unknown method" (workers rebuild runs from their config)."""
    import subprocess
    import sys

    if "submitit-local" in executor:
        pytest.importorskip("submitit")
    (tmp_path / "plug").mkdir()
    (tmp_path / "plug" / "halfw.py").write_text(HALFW)
    (tmp_path / "plug.toml").write_text(PLUGIN_SUITE)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "run_bench.py", "--results", str(tmp_path / "r"), "run",
                          str(tmp_path / "plug.toml"), "--plugins", str(tmp_path / "plug"), *executor],
                         cwd=REPO, capture_output=True, text=True, timeout=900, env=env)  # catches a hang only
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    run = tmp_path / "r" / "plug" / "synthetic-16_unet-micro" / "halfw" / "seed0"
    assert read_status(run)["state"] == "done"
    cfg = fileio.read_json(run / "config.json")
    assert cfg["plugins"] == [str((tmp_path / "plug").resolve())] and cfg["method_slots"] == ["weighting"]
    assert [r["step"] for r in fileio.read_jsonl(run / "evals.jsonl")] == [2]
