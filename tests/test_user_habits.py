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
    readme = (REPO / "README.md").read_text()
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
