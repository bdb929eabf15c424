"""Issue 19: bad input, broken plugins and full or wrong output paths. Each case gets one `error:` line
naming the problem and the fix, a non-zero exit, and nothing written (in-process `main`, no clock)."""

import json
import os
import textwrap
from pathlib import Path

import pytest

from bench.cli import main

PLUGIN = """
import torch
from bench.core.spec import Method


class Broken(Method):
    name = "broken"
    slots = frozenset({{"timesteps", "weighting"}})
    source = "test"
    weight_scale = {scale!r}

    def timestep_probs(self, p, schedule):
        return {probs}

    def loss_weights(self, t, p, schedule, target):
        return {weights}
"""
GOOD_PROBS = "torch.full((schedule.T,), 1.0 / schedule.T, dtype=torch.float64)"
GOOD_WEIGHTS = "torch.ones(t.shape, dtype=torch.float64)"

# (name, plugin slot, probs, weights, what the error says)
PLUGINS = [
    ("all-zero distribution", "timesteps", "torch.zeros(schedule.T, dtype=torch.float64)", GOOD_WEIGHTS,
     "timestep_probs at progress 0 has no mass (all zero)"),
    ("negative distribution", "timesteps", "torch.full((schedule.T,), -1.0, dtype=torch.float64)", GOOD_WEIGHTS,
     "has negative entries"),
    ("NaN distribution", "timesteps", "torch.full((schedule.T,), float('nan'), dtype=torch.float64)", GOOD_WEIGHTS,
     "is not finite"),
    ("short distribution", "timesteps", "torch.ones(3, dtype=torch.float64)", GOOD_WEIGHTS, "has shape (3,), not (16,)"),
    ("weights of the wrong shape", "weighting", GOOD_PROBS, "torch.ones(3, dtype=torch.float64)",
     "loss_weights at progress 0 has shape (3,) for (16,) timesteps"),
    ("NaN weights", "weighting", GOOD_PROBS, "torch.full(t.shape, float('nan'), dtype=torch.float64)",
     "non-finite or negative weights"),
    ("negative weights", "weighting", GOOD_PROBS, "-torch.ones(t.shape, dtype=torch.float64)",
     "non-finite or negative weights"),
    ("all-zero normalised weights", "weighting", GOOD_PROBS, "torch.zeros(t.shape, dtype=torch.float64)",
     "has mean 0 under the method's own sampling"),
]


def write_plugin(tmp_path, slot, probs, weights, scale="normalised"):
    """A plugin filling both slots; `slot` names the one the case breaks (the other is well-formed)."""
    path = tmp_path / "broken_plugin.py"
    path.write_text(textwrap.dedent(PLUGIN.format(probs=probs, weights=weights, scale=scale)))
    return path


def one_line_error(capsys, argv, needle):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, (argv, err)
    # One error line, the last; only `fid` says before it which Inception weights it loaded.
    lines = err.splitlines()
    assert lines and lines[-1].startswith("error: ") and sum(x.startswith("error: ") for x in lines) == 1, err
    assert len(lines) == 1 or ("fid" in argv and lines[0].startswith("inception weights:") and len(lines) == 2), err
    assert needle in lines[-1], err
    return lines[-1] + "\n"


@pytest.mark.parametrize("name,slot,probs,weights,needle", PLUGINS, ids=[p[0] for p in PLUGINS])
def test_a_broken_plugin_is_refused_before_any_folder_and_by_describe(tmp_path, capsys, name, slot, probs, weights,
                                                                      needle):
    plugin = write_plugin(tmp_path, slot, probs, weights)
    out = tmp_path / "run"
    one_line_error(capsys, ["--plugins", str(plugin), "train", "--method", "broken", "--dataset", "synthetic",
                            "--arch", "unet-micro", "--T", "16", "--schedule", "cosine", "--iters", "2",
                            "--out", str(out)], needle)
    assert not out.exists()
    one_line_error(capsys, ["--plugins", str(plugin), "describe", "broken", "--T", "16", "--schedule", "cosine"],
                   needle.replace("(16,)", "(16,)"))


def test_huge_source_scale_weights_stop_the_run_as_diverged(tmp_path):
    """Weights of 1e30 (kept at the source's scale): a finite loss in float64 once, but a non-finite
    gradient norm, on which Adam would never move; recorded as diverged at step 1 (D15)."""
    from bench import fileio
    from bench.core.registry import load_plugins
    from bench.errors import DivergenceError
    from bench.train.loop import TrainConfig, train

    plugin = write_plugin(tmp_path, "weighting", GOOD_PROBS, "torch.full(t.shape, 1e30, dtype=torch.float64)",
                          scale="source")
    load_plugins([str(plugin)])
    cfg = TrainConfig(method="broken", plugins=[str(plugin)], dataset="synthetic", arch="unet-micro", iters=4,
                      batch_size=4, ckpt_every=2)
    with pytest.raises(DivergenceError, match=r"training diverged: non-finite grad_norm \(inf\) at step 1") as info:
        train(cfg, tmp_path / "run")
    assert info.value.step == 1
    status = fileio.read_json(tmp_path / "run" / "status.json")
    assert status["state"] == "failed" and status["error"] == "divergence" and status["step"] == 1


BAD_ARGS = [
    (["train", "--method", "nope"], "unknown method 'nope'"),
    (["train", "--method", "p2", "--set", "gamma=-3"], "gamma=-3 is out of range"),
    (["train", "--set", "gamma"], "is not KEY=VALUE"),
    (["train", "--dataset", "imagenet-1k"], "unknown dataset"),
    (["train", "--arch", "unet-huge"], "unknown architecture 'unet-huge'"),
    (["train", "--arch", "dit-s/4", "--resolution", "18"], "divisible by its patch size 4; got 18"),
    (["train", "--iters", "0"], "iters=0 must be >= 1"),
    (["train", "--lr", "-1"], "lr=-1.0 must be > 0"),
    (["train", "--T", "10"], "T"),
    (["train", "--schedule", "sigmoid"], "schedule='sigmoid' is not one of linear, cosine"),
    (["train", "--precision", "fp16"], "precision='fp16' is not one of auto, fp32, bf16"),
    (["train", "--device", "tpu"], "device='tpu' is not auto, cpu, cuda or cuda:K"),
    (["train", "--p-uncond", "0.1"], "class_cond"),
    (["describe", "clts", "--progress", "2"], "outside [0, 1]"),
    (["describe", "all", "--set", "gamma=3"], "describe all takes no --set"),
    (["describe", "nope"], "unknown method 'nope'"),
    (["run", "nosuch"], "unknown suite 'nosuch'"),
    (["run", "smoke", "--jobs", "0"], "jobs=0 must be >= 1"),
    (["run", "smoke", "--only", "nomatch/*"], "nomatch"),
    (["report", "nosuch"], "no results for 'nosuch'"),
    (["fid", "{tmp}/nowhere", "{tmp}/nowhere"], "neither a folder nor a dataset statistic"),
    (["ref-stats", "nosuch"], "neither a suite"),
    (["posthoc-ema", "{tmp}", "--sigma-rel", "0.5"], "outside (0, 0.289)"),
    (["consistency", "{tmp}/nowhere", "{tmp}/nowhere2"], "neither a run folder nor a suite"),
    (["prepare", "nosuch", "{tmp}"], "unknown prepare kind 'nosuch'"),
    (["prepare", "folder:{tmp}/empty", "--out", "{tmp}/results", "--resolution", "8"], "no images in"),
    (["prepare", "folder:{tmp}/junk", "--out", "{tmp}/results", "--resolution", "8"], "could be decoded"),
    (["fid", "{tmp}/junk", "{tmp}/junk"], "a.png is not a readable image"),
    (["train", "--device", "cuda"], "asks for a CUDA GPU, but torch"),
    (["--plugins", "{tmp}/none.py", "list"], "is not a .py file or a folder"),
]


@pytest.mark.parametrize("argv,needle", BAD_ARGS, ids=[" ".join(a[:3]) for a, _ in BAD_ARGS])
def test_bad_arguments_are_one_line_and_write_nothing(tmp_path, capsys, argv, needle):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "junk" / name).write_bytes(b"not an image")
    results = tmp_path / "results"
    if argv[0] == "train":
        argv += ["--out", str(tmp_path / "run")] + ([] if "--dataset" in argv else ["--dataset", "synthetic"])
    one_line_error(capsys, ["--results", str(results)] + argv if argv[0] != "--plugins" else argv, needle)
    assert not (tmp_path / "run").exists() and not results.exists()


def test_a_plugin_that_fails_to_import_is_one_line(tmp_path, capsys):
    bad = tmp_path / "broken.py"
    bad.write_text("x = (\n")
    one_line_error(capsys, ["--plugins", str(bad), "list"], "failed to import: SyntaxError")


def test_an_output_path_through_a_file_is_refused_before_anything(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    one_line_error(capsys, ["--results", str(blocker), "run", "smoke"], f"{blocker} is a file, not a folder")
    one_line_error(capsys, ["train", "--dataset", "synthetic", "--out", str(blocker / "run")],
                   f"--out {blocker / 'run'}: {blocker} is a file, not a folder")
    assert blocker.read_text() == "not a folder"


def test_an_unwritable_or_read_only_output_folder_is_refused(tmp_path, capsys, monkeypatch):
    """As root every folder is writable: the permission answer is simulated, the message is real."""
    from bench import fileio

    real_access = os.access  # the results folder alone is refused (the cache is checked on its own)
    monkeypatch.setattr(fileio.os, "access", lambda path, mode: real_access(path, mode) and tmp_path not in
                        (Path(path), *Path(path).parents))
    one_line_error(capsys, ["--results", str(tmp_path), "run", "smoke"], "is not writable by this user")
    monkeypatch.setattr(fileio, "_read_only", lambda path: True)
    one_line_error(capsys, ["--results", str(tmp_path), "run", "smoke"], "is on a read-only file system")
    assert os.listdir(tmp_path) == []


def test_a_report_on_a_full_disk_is_one_line_and_keeps_the_previous_one(tmp_path, capsys, monkeypatch):
    """A figure that cannot be written (ENOSPC) half-way through a report: one line saying so, the
    previous report and its tables exactly as they were, nothing staged left (D14)."""
    import errno

    from test_report import write_run

    from bench.report import figures

    root = tmp_path / "demo"
    for seed in (0, 1, 2):
        write_run(root, "baseline", seed)
        write_run(root, "fast", seed)
    assert main(["--results", str(tmp_path), "report", "demo"]) == 0
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and "seed" not in p.parent.name}
    write_run(root, "slow", 0)  # new results: the next report would differ everywhere
    real = figures.atomic_write

    def full(path, write):
        if str(path).endswith(".pdf"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, write)

    monkeypatch.setattr(figures, "atomic_write", full)
    capsys.readouterr()
    err = one_line_error(capsys, ["--results", str(tmp_path), "report", "demo"], "No space left on device")
    assert "run the same command again" in err
    after = {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and "seed" not in p.parent.name}
    assert after == before and not list(root.glob(".report-staging*"))


TRAIN = ["train", "--dataset", "synthetic", "--arch", "unet-micro", "--iters", "2", "--batch-size", "4"]


def test_two_trainings_into_one_folder_are_refused_not_run_twice(tmp_path, capsys):
    """A second `train` into a folder another process trains is one line (D9); the claim is the
    runner's lock, so `run` and `train` exclude each other too."""
    from bench.train.run_folder import try_lock

    out = tmp_path / "run"
    out.mkdir()
    held = try_lock(out)  # another process's claim (flock: a second open file excludes even in one process)
    try:
        one_line_error(capsys, [*TRAIN, "--out", str(out)], "is being trained by another process")
    finally:
        held.close()
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing trained
    assert main([*TRAIN, "--out", str(out)]) == 0
    assert len((out / "steps.jsonl").read_text().splitlines()) == 2


def test_a_run_refused_inside_training_leaves_no_folder(tmp_path, capsys):
    """The network is built against the data inside training, after the folder was claimed: the claim
    takes its folder back with it."""
    out = tmp_path / "deep" / "run"
    one_line_error(capsys, [*TRAIN, "--arch", "dit-s/4", "--resolution", "18", "--out", str(out)],
                   "divisible by its patch size 4")
    assert not out.exists()


@pytest.mark.parametrize("name,fix", [("status.json", "delete it: the run resumes from its checkpoint"),
                                      ("config.json", "restore it, or delete the run folder")])
def test_a_corrupt_run_record_is_one_line_naming_file_and_fix(tmp_path, capsys, name, fix):
    out = tmp_path / "run"
    assert main([*TRAIN, "--iters", "2", "--out", str(out)]) == 0
    capsys.readouterr()
    (out / name).write_bytes(b'{"state": "do\xff')
    err = one_line_error(capsys, [*TRAIN, "--iters", "2", "--out", str(out)], f"{out / name} is corrupt")
    assert fix in err


def test_a_hole_in_the_logs_before_the_checkpoint_refuses_the_resume(tmp_path, capsys):
    """A garbage line among the rows the checkpoint already holds cannot be redone: the resume is
    refused naming file and line; a torn last line (a write cut short) is dropped and redone (D12)."""
    out = tmp_path / "run"
    argv = [*TRAIN, "--iters", "4", "--ckpt-every", "2", "--out", str(out)]
    from conftest import train_until

    from bench.train.loop import TrainConfig

    cfg = TrainConfig(dataset="synthetic", arch="unet-micro", iters=4, batch_size=4, ckpt_every=2)
    train_until(cfg, out, 3)  # checkpoint at 2, rows of step 3 never written
    steps = out / "steps.jsonl"
    clean = steps.read_text()
    steps.write_text(clean + '{"step": 3, "lo')  # a write cut short after the checkpoint: redone
    assert main(argv) == 0
    assert [json.loads(x)["step"] for x in steps.read_text().splitlines()] == [1, 2, 3, 4]
    capsys.readouterr()

    lines = steps.read_text().splitlines(keepends=True)
    steps.write_text(lines[0] + "garbage\n" + "".join(lines[1:]))
    (out / "status.json").write_text(json.dumps({"state": "running", "step": 4}))
    one_line_error(capsys, argv, f"{steps} line 2 is unreadable (not a torn last line)")
    steps.write_text("".join(lines[:1] + lines[2:]))  # step 2's row gone
    one_line_error(capsys, argv, f"{steps} has no row for step 2 (1 missing)")


def test_a_checkpoint_of_another_run_is_refused_by_name(tmp_path):
    """A checkpoint.pt copied in from another run is named and refused, not resumed as this run's (D13)."""
    from conftest import train_until

    from bench.errors import CheckpointError
    from bench.train.loop import TrainConfig, train

    small = dict(dataset="synthetic", arch="unet-micro", iters=4, batch_size=4, ckpt_every=2)
    train(TrainConfig(seed=0, **small), tmp_path / "a")
    train_until(TrainConfig(seed=1, **small), tmp_path / "b", 3)
    mine = {n: (tmp_path / "b" / n).read_bytes() for n in ("checkpoint.pt", "checkpoint.sha256")}
    for name in mine:  # the other run's checkpoint with its own digest: whole, but not this run's
        (tmp_path / "b" / name).write_bytes((tmp_path / "a" / name).read_bytes())
    with pytest.raises(CheckpointError, match=r"checkpoint .*b/checkpoint\.pt belongs to another run \(it differs in "
                                              r"seed\); put back this run's checkpoint"):
        train(TrainConfig(seed=1, **small), tmp_path / "b")
    for name, data in mine.items():
        (tmp_path / "b" / name).write_bytes(data)
    assert train(TrainConfig(seed=1, **small), tmp_path / "b")["state"] == "done"


def test_a_failed_run_says_where_it_resumes(tmp_path):
    from bench.train.run_folder import read_status, write_failed, write_status

    write_status(tmp_path, "running", 4)  # after the checkpoint at step 4
    write_failed(tmp_path, 8, "could not write checkpoint.pt at step 8", "exception")
    status = read_status(tmp_path)
    assert status["state"] == "failed" and status["step"] == 8 and status["resumes_from"] == 4


def blocking_train(run, out_dir, events=None):
    """A worker's training that announces itself and waits for a signal (no clock)."""
    import signal
    from pathlib import Path

    Path(os.environ["DIFFBENCH_TEST_PIDS"], f"{os.getpid()}.pid").write_text(str(os.getpid()))
    while True:
        signal.pause()


RUNNER = """
import sys
from bench.suite.runner import run_suite
run_suite(sys.argv[1], jobs=2, results_root=sys.argv[2], progress=False, train_fn="test_reliability:blocking_train")
"""

SUITE = """
[suite]
name = "orphans"
[grid]
methods = ["baseline"]
datasets = ["synthetic"]
archs = ["unet-micro"]
seeds = [0, 1]
[budget]
iters = 2
batch_size = 2
[eval]
every = 2
metrics = ["proxy_fd"]
num_images = 8
sampler_steps = 2
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_workers_never_outlive_their_runner(tmp_path, sig):
    """`run --jobs 2`, its runner killed while both workers train: the workers end too (D8)."""
    import select
    import signal
    import subprocess
    import sys
    from pathlib import Path

    pids = tmp_path / "pids"
    pids.mkdir()
    (tmp_path / "orphans.toml").write_text(SUITE)
    env = {**os.environ, "DIFFBENCH_TEST_PIDS": str(pids),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    runner = subprocess.Popen([sys.executable, "-c", RUNNER, str(tmp_path / "orphans.toml"), str(tmp_path / "r")],
                              env=env, cwd=Path(__file__).parents[1])
    # Both workers announce themselves; inotify-free: each wait is on the runner too, bounded to catch a hang.
    fd = os.pidfd_open(runner.pid)
    while len(list(pids.iterdir())) < 2:
        assert runner.poll() is None, "the runner ended before its workers started"
        select.select([fd], [], [], 0.5)
    workers = [int(p.read_text()) for p in pids.iterdir()]
    runner.send_signal(getattr(signal, sig))
    runner.wait(timeout=120)
    for pid in workers:
        try:
            wfd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        readable, _, _ = select.select([wfd], [], [], 120)
        os.close(wfd)
        assert readable, f"worker {pid} trains on after its runner got {sig}"
    os.close(fd)


def test_a_cpu_resume_under_another_thread_count_is_refused(tmp_path):
    """--jobs 1 and --jobs 2 give a run 2 and 1 threads, which order sums differently: a run begun
    under one count and resumed under another would mix the two in silence, so it is refused."""
    import torch
    from conftest import train_until

    from bench.errors import ConfigError
    from bench.train.loop import TrainConfig, train

    cfg = TrainConfig(dataset="synthetic", arch="unet-micro", iters=4, batch_size=4, ckpt_every=2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        train_until(cfg, tmp_path / "run", 3)
        torch.set_num_threads(2)
        with pytest.raises(ConfigError, match=r"trained to step 2 with 1 CPU thread\(s\) and this process has 2"):
            train(cfg, tmp_path / "run")
        torch.set_num_threads(1)
        assert train(cfg, tmp_path / "run")["state"] == "done"
    finally:
        torch.set_num_threads(threads)


KILL_SUITE = """
[suite]
name = "killed"
[grid]
methods = ["baseline", "p2"]
datasets = ["synthetic"]
archs = ["unet-micro"]
seeds = [0]
[budget]
iters = 8
batch_size = 2
[train]
ckpt_every = 2
[eval]
every = 4
metrics = ["proxy_fd"]
num_images = 8
sampler_steps = 2
batch_size = 8
"""


def _logged(run_dir, name):
    """A log's rows without the clock's fields (the only ones a rerun may change)."""
    rows = [json.loads(x) for x in (run_dir / name).read_text().splitlines()]
    return [{k: v for k, v in r.items() if not (k.endswith("seconds") or k.endswith("per_s"))} for r in rows]


def _bench(args, env_extra=None, cwd=None):
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "DIFFBENCH_FAULT"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "run_bench.py", *args], cwd=cwd or Path(__file__).parents[1], env=env,
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    (root / "killed.toml").write_text(KILL_SUITE)
    out = _bench(["--results", str(root / "clean"), "run", str(root / "killed.toml"), "--jobs", "1"])
    assert out.returncode == 0, out.stderr[-2000:]
    return root


@pytest.mark.slow
@pytest.mark.parametrize("point", ["train_step@5", "write:checkpoint.next.pt@2", "checkpoint:rotated@1",
                                   "checkpoint:renamed@2", "append:steps.jsonl@2",
                                   "append:evals.jsonl@1", "write:status.json@3"])
def test_a_runner_killed_anywhere_resumes_to_the_uninterrupted_results(uninterrupted, tmp_path, point):
    """SIGKILL at a named point (DIFFBENCH_FAULT: no clock), then the same command again: every log row
    equals an uninterrupted run's, none twice or missing, and no temporary file is left (item 1)."""
    import signal

    suite = uninterrupted / "killed.toml"
    killed = _bench(["--results", str(tmp_path), "run", str(suite), "--jobs", "1"], {"DIFFBENCH_FAULT": point})
    assert killed.returncode == -signal.SIGKILL, (point, killed.stderr[-2000:])
    again = _bench(["--results", str(tmp_path), "run", str(suite), "--jobs", "1"])
    assert again.returncode == 0, again.stderr[-2000:]
    for label in ("baseline", "p2"):
        clean = uninterrupted / "clean" / "killed" / "synthetic-16_unet-micro" / label / "seed0"
        resumed = tmp_path / "killed" / "synthetic-16_unet-micro" / label / "seed0"
        for log in ("steps.jsonl", "evals.jsonl"):
            assert _logged(resumed, log) == _logged(clean, log), (point, label, log)
        assert [r["step"] for r in _logged(resumed, "steps.jsonl")] == list(range(1, 9))
        assert not list(resumed.glob(".*.tmp"))


@pytest.mark.slow
def test_a_report_killed_half_way_is_rewritten_whole(uninterrupted, tmp_path):
    import shutil
    import signal

    results = tmp_path / "results"
    shutil.copytree(uninterrupted / "clean", results)
    assert _bench(["--results", str(results), "report", "killed"]).returncode == 0
    before = {p: p.read_bytes() for p in (results / "killed").rglob("*")  # the lock names its last holder
              if p.is_file() and "seed" not in str(p) and p.name != ".report.lock"}
    killed = _bench(["--results", str(results), "report", "killed"], {"DIFFBENCH_FAULT": "write:curves.csv"})
    assert killed.returncode == -signal.SIGKILL
    assert list((results / "killed").glob(".report-staging-*/**/.*.tmp"))  # what the kill left, set apart
    assert all(p.read_bytes() == data for p, data in before.items())  # the previous report as it was
    assert _bench(["--results", str(results), "report", "killed"]).returncode == 0
    assert not list((results / "killed").glob(".report-staging*"))
    assert not list((results / "killed").rglob(".*.tmp"))
    assert _bench(["--results", str(uninterrupted / "clean"), "report", "killed"]).returncode == 0
    for name in ("tables/evaluations.csv", "tables/curves.csv", "tables/speedup.csv"):
        assert (results / "killed" / name).read_text() == (uninterrupted / "clean" / "killed" / name).read_text()


@pytest.mark.parametrize("damage", ["altered", "truncated", "foreign", "missing digest"])
def test_a_bad_checkpoint_is_named_and_the_previous_one_used(tmp_path, capsys, damage):
    """The last two checkpoints are kept with their SHA-256: a damaged newest one is named, set aside,
    and the run resumes from the one before, to the same numbers as an uninterrupted run (item 3)."""
    from conftest import train_until

    from bench.train.loop import TrainConfig, train

    small = dict(dataset="synthetic", arch="unet-micro", iters=8, batch_size=4, ckpt_every=2)
    train(TrainConfig(**small), tmp_path / "clean")
    run = tmp_path / "run"
    train_until(TrainConfig(**small), run, 7)  # checkpoints at 6 (checkpoint.pt) and 4 (checkpoint.prev.pt)
    assert {p.name for p in run.glob("checkpoint*")} == {"checkpoint.pt", "checkpoint.prev.pt", "checkpoint.sha256",
                                                        "checkpoint.prev.sha256"}
    ckpt = run / "checkpoint.pt"
    data = bytearray(ckpt.read_bytes())
    if damage == "altered":
        data[len(data) // 2] ^= 0xFF
    elif damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "foreign":
        train(TrainConfig(seed=5, **small), tmp_path / "other")
        data = (tmp_path / "other" / "checkpoint.pt").read_bytes()
        json_digest = json.loads((tmp_path / "other" / "checkpoint.sha256").read_text())
        (run / "checkpoint.sha256").write_text(json.dumps(json_digest))  # even with a matching digest
    else:
        (run / "checkpoint.sha256").unlink()
    ckpt.write_bytes(bytes(data))
    capsys.readouterr()
    assert train(TrainConfig(**small), run)["state"] == "done"
    err = capsys.readouterr().err
    assert "moved to checkpoint.rejected.pt, resuming from checkpoint.prev.pt" in err
    assert (run / "checkpoint.rejected.pt").read_bytes() == bytes(data)
    assert _logged(run, "steps.jsonl") == _logged(tmp_path / "clean", "steps.jsonl")
    # Both kept checkpoints carry their own digest again, so a later fault still finds one to resume.
    from bench.train.checkpoint import sha256_file

    for name in ("checkpoint", "checkpoint.prev"):
        assert json.loads((run / f"{name}.sha256").read_text())["sha256"] == sha256_file(run / f"{name}.pt")


def test_report_takes_the_suite_file_run_took(tmp_path, capsys):
    """`run PATH.toml` writes <results>/<its name>; `report PATH.toml` reads the same folder."""
    suite = tmp_path / "my-suite.toml"
    suite.write_text(SUITE)  # [suite] name = "orphans"
    (tmp_path / "results" / "orphans").mkdir(parents=True)
    assert main(["--results", str(tmp_path / "results"), "report", str(suite)]) == 0
    assert (tmp_path / "results" / "orphans" / "report.md").is_file()
    one_line_error(capsys, ["--results", str(tmp_path / "nowhere"), "report", str(suite)],
                   "looked for " + str(tmp_path / "nowhere" / "orphans"))


def test_emulated_bf16_is_said_before_it_costs(capsys):
    from bench.core.runtime import make_runtime
    from bench.train.loop import TrainConfig

    rt = make_runtime(TrainConfig(dataset="synthetic", device="cpu", precision="bf16"))
    assert rt.precision == "bf16" and "warning: bf16 on cpu is emulated" in capsys.readouterr().err
    make_runtime(TrainConfig(dataset="synthetic", device="cpu"))
    assert capsys.readouterr().err == ""


def test_a_claim_left_by_a_killed_process_is_recovered(tmp_path):
    """The claim is an flock: the kernel releases it when its holder dies, however it dies."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "run"
    holder = subprocess.run([sys.executable, "-c", "import os, signal, sys; from bench.train.run_folder import try_lock; "
                             "from pathlib import Path; p = Path(sys.argv[1]); p.mkdir(); lock = try_lock(p); "
                             "assert lock is not None; os.kill(os.getpid(), signal.SIGKILL)", str(out)],
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    assert holder.returncode == -signal.SIGKILL and (out / ".lock").exists()
    assert main([*TRAIN, "--out", str(out)]) == 0
