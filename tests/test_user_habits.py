"""Issue 20's habits of people who train models: `diffbench` on the PATH, `run` ending with its
report, results in pandas (bench.results.load), and the README's notebook example."""

import subprocess
import sys
from pathlib import Path

import pytest

from bench.cli import main

REPO = Path(__file__).resolve().parents[1]
SUITE = """
[suite]
name = "habits"
[grid]
methods = ["baseline", "p2"]
datasets = ["synthetic"]
archs = ["unet-micro"]
seeds = [0]
[budget]
iters = 4
batch_size = 2
baseline_extend = 2.0
[train]
ckpt_every = 2
[eval]
every = 2
metrics = ["proxy_fd"]
num_images = 8
sampler_steps = 2
batch_size = 8
save_samples = true
"""


def test_the_diffbench_command_is_run_bench():
    script = Path(sys.executable).with_name("diffbench")
    assert script.exists(), "no diffbench next to this python: ./setup.sh installs it (pyproject [project.scripts])"
    ours = subprocess.run([str(script), "describe", "p2", "--json"], capture_output=True, text=True, cwd="/")
    theirs = subprocess.run([sys.executable, "run_bench.py", "describe", "p2", "--json"], capture_output=True,
                            text=True, cwd=REPO)
    assert ours.returncode == theirs.returncode == 0 and ours.stdout == theirs.stdout


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("habits")
    (root / "habits.toml").write_text(SUITE)
    assert main(["--results", str(root / "results"), "run", str(root / "habits.toml"), "--jobs", "1"]) == 0
    return root


def test_run_ends_with_the_report_unless_told_not_to(results, tmp_path):
    assert (results / "results" / "habits" / "report.md").is_file()
    assert (results / "results" / "habits" / "tables" / "speedup.csv").is_file()
    assert main(["--results", str(tmp_path), "run", str(results / "habits.toml"), "--jobs", "1", "--no-report"]) == 0
    assert (tmp_path / "habits" / "suite.json").is_file() and not (tmp_path / "habits" / "report.md").exists()


def test_results_load_as_dataframes_without_torch(results):
    code = f"""
import sys
from bench.results import load
r = load({str(results / 'results' / 'habits')!r})
assert "torch" not in sys.modules
assert sorted(r.runs.method_label) == ["baseline", "p2"] and set(r.runs.state) == {{"done"}}
assert len(r.steps) == 8 + 4 and list(r.steps.columns[:4]) == ["workload", "method_label", "seed", "step"]
ev = r.evaluations
assert set(ev.metric) == {{"proxy_fd"}} and sorted(ev[ev.method_label == "baseline"].step) == [2, 4, 6, 8]
assert r.speedup is not None and "p2" in set(r.speedup.method_label)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_the_readme_notebook_example_runs(results):
    readme = (REPO / "docs" / "commands.md").read_text()  # the README's example, moved to docs/
    start = readme.index("    from bench.results import load\n")
    lines = []
    for line in readme[start:].splitlines():
        if not line.startswith("    "):
            break
        lines.append(line[4:])
    assert len(lines) == 5, lines
    code = "import matplotlib\nmatplotlib.use('Agg')\n" + "\n".join(lines).replace(
        '"results/mini"', repr(str(results / "results" / "habits")))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]


def test_every_report_shows_the_samples_it_saved(results):
    """Issue 20, item 1: the methods side by side at the budget, and each method over training, from
    the images the evaluations saved (no extra sampling)."""
    suite = results / "results" / "habits"
    text = (suite / "report.md").read_text()
    section = text.split("### Samples")[1].split("###")[0]
    assert "At the budget (4 iterations), one row per method" in section
    assert "![samples at the budget](figures/samples_synthetic-16_unet-micro.png)" in section
    for m in ("baseline", "p2"):
        assert f"![{m} over training](figures/samples_synthetic-16_unet-micro_{m}.png)" in section
        assert (suite / "figures" / f"samples_synthetic-16_unet-micro_{m}.png").is_file()


def test_a_report_without_saved_samples_says_how_to_get_them(tmp_path):
    from test_report import write_run

    from bench.report.build import build_report

    write_run(tmp_path / "demo", "baseline", 0)
    text = build_report(tmp_path / "demo").read_text()
    assert "No run of this workload saved its evaluation samples (`save_samples = true`" in text


# --------------------------------------------------------------------------- live logging (item 2)


def test_a_suite_logged_to_tensorboard_leaves_event_files_with_every_scalar(tmp_path, monkeypatch):
    """The suite's [log] table: each run's training scalars, evaluations and sample grids, read back
    with TensorBoard's own reader, equal to its steps.jsonl and evals.jsonl."""
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from bench.train.live_log import LOG_ENV

    monkeypatch.delenv(LOG_ENV, raising=False)
    (tmp_path / "habits.toml").write_text(SUITE + '[log]\nto = "tensorboard"\n')
    assert main(["--results", str(tmp_path / "r"), "run", str(tmp_path / "habits.toml"), "--jobs", "1",
                 "--no-report"]) == 0
    assert LOG_ENV not in __import__("os").environ  # the suite's setting ends with the suite
    for label, iters in (("baseline", 8), ("p2", 4)):
        run = tmp_path / "r" / "habits" / "synthetic-16_unet-micro" / label / "seed0"
        acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
        acc.Reload()
        steps = [json.loads(x) for x in (run / "steps.jsonl").read_text().splitlines()]
        logged = acc.Scalars("train/loss")
        assert [e.step for e in logged] == list(range(1, iters + 1))
        assert [e.value for e in logged] == pytest.approx([r["loss"] for r in steps], rel=1e-6)
        evals = [json.loads(x) for x in (run / "evals.jsonl").read_text().splitlines()]
        assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in acc.Scalars("eval/proxy_fd")] == \
            [(r["step"], r["value"]) for r in evals]
        assert [e.step for e in acc.Images("samples")] == [r["step"] for r in evals]
        assert {"train/lr", "train/beta1", "train/grad_norm", "train/images_per_s"} <= set(acc.Tags()["scalars"])


def test_wandb_runs_offline_named_after_the_run_folder(tmp_path, monkeypatch):
    """W&B is checked through a stand-in module recording what the logger asks of it (the real
    package is an optional extra, not installed here)."""
    import importlib.util
    import types

    from bench.train.live_log import LOG_ENV
    from bench.train.loop import TrainConfig, train

    calls = []

    class Run:
        def log(self, values, step):
            calls.append(("log", step, values))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or Run()
    fake.Image = lambda array: ("image", array.shape)
    monkeypatch.setitem(__import__("sys").modules, "wandb", fake)
    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "wandb" else real_find(name, *a))
    monkeypatch.setenv(LOG_ENV, "wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "w" / "baseline" / "seed0"
    train(TrainConfig(dataset="synthetic", arch="unet-micro", iters=4, batch_size=4, eval_every=2,
                      eval={"metrics": ["proxy_fd"], "num_images": 8, "sampler_steps": 2, "batch_size": 8,
                            "save_samples": True}), out)
    init = calls[0][1]
    assert init["mode"] == "offline" and init["dir"] == str(out) and init["name"] == "w/baseline/seed0"
    assert init["config"]["method"] == "baseline" and init["resume"] == "allow"
    assert [c[1] for c in calls if c[0] == "log" and "train/loss" in c[2]] == [1, 2, 3, 4]
    assert [c[1] for c in calls if c[0] == "log" and "eval/proxy_fd" in c[2]] == [2, 4]
    assert [c[1] for c in calls if c[0] == "log" and "samples" in c[2]] == [2, 4]
    assert calls[-1] == ("finish",)


def test_a_logger_that_is_not_installed_is_one_line(monkeypatch, capsys):
    import importlib.util

    from bench.train.live_log import LOG_ENV

    monkeypatch.setenv(LOG_ENV, "")  # restored after the test, whatever main sets
    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real_find(name, *a))
    assert main(["--log", "wandb", "list"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --log wandb needs the wandb package, which is not installed: pip install -e '.[wandb]'\n"
