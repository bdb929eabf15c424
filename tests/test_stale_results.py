"""Nothing stale without a word: a report counts only the suite's grid, load() reads committed tables
when the run folders are absent, and a run whose method's source file changed is not counted as done."""

import json
import shutil
import warnings
from pathlib import Path

import pandas as pd
import pytest
from test_report import EXT_CURVE, EXT_STEPS, WORKLOAD, write_run

from bench.report.build import build_report
from bench.results import load

REPO = Path(__file__).resolve().parent.parent
SUITE_REPORT = {"metric": "proxy_fd", "baseline": "baseline", "fractions": [0.5, 1.0], "bootstrap": 200,
                "confidence": 0.95, "seed": 0}


def _suite_folder(root: Path, labels: tuple, seeds: tuple, grid_labels: tuple, grid_seeds: tuple) -> Path:
    """Runs of `labels` x `seeds`, and a suite.json whose grid is `grid_labels` x `grid_seeds`."""
    for seed in seeds:
        write_run(root, "baseline", seed, iters=800, budget_iters=400, steps=EXT_STEPS, curve=EXT_CURVE)
        for label in labels:
            write_run(root, label, seed)
    (root / "suite.json").write_text(json.dumps({
        "name": root.name, "report": SUITE_REPORT, "seeds": list(grid_seeds),
        "methods": [{"name": lab, "label": lab} for lab in ("baseline", *grid_labels)],
        "workloads": [{"name": WORKLOAD}]}))
    return root


def test_report_leaves_runs_outside_the_suites_grid_out_of_every_table_and_holm(tmp_path):
    # The suite dropped `slow` and seed 3 after they ran: their folders are still there.
    stale = _suite_folder(tmp_path / "stale" / "demo", ("fast", "slow"), (0, 1, 2, 3), ("fast",), (0, 1, 2))
    clean = _suite_folder(tmp_path / "clean" / "demo", ("fast",), (0, 1, 2), ("fast",), (0, 1, 2))
    reports = {k: build_report(d) for k, d in (("stale", stale), ("clean", clean))}
    tables = {k: pd.read_csv(r.parent / "tables" / "speedup.csv") for k, r in reports.items()}
    # Holm's family is the grid's methods alone: adjusted p-values and intervals equal the clean folder's.
    assert "fast" in set(tables["stale"].method_label) and "slow" not in set(tables["stale"].method_label)
    pd.testing.assert_frame_equal(tables["stale"], tables["clean"])
    evals = pd.read_csv(reports["stale"].parent / "tables" / "evaluations.csv")
    assert "slow" not in set(evals.method_label) and 3 not in set(evals.seed)
    text = reports["stale"].read_text()
    assert "Runs: 6 found" in text and "6 run folder(s) outside the suite's grid are left out" in text
    listed = text.split("## Runs outside the grid")[1].split("## Files")[0]
    assert f"{WORKLOAD}/slow/seed0" in listed and f"{WORKLOAD}/baseline/seed3" in listed
    assert "## Runs outside the grid" not in reports["clean"].read_text()


def test_a_suite_json_without_a_grid_keeps_every_run(tmp_path):
    root = _suite_folder(tmp_path / "old", ("fast",), (0, 1), ("fast",), (0, 1))
    info = json.loads((root / "suite.json").read_text())
    (root / "suite.json").write_text(json.dumps({"name": "old", "report": info["report"]}))  # before grids were saved
    assert "Runs: 4 found" in build_report(root).read_text()


def test_load_reads_the_committed_tables_when_the_run_folders_are_absent(tmp_path):
    committed = REPO / "results" / "mini" / "tables"
    suite = tmp_path / "mini"
    shutil.copytree(committed, suite / "tables")  # what a fresh clone holds: no run folders
    with pytest.warns(UserWarning, match="no run folders: read from its report's tables"):
        r = load(suite)
    expected = pd.read_csv(committed / "evaluations.csv")
    assert r.source == "tables" and len(expected) > 0
    pd.testing.assert_frame_equal(r.evaluations, expected)
    assert len(r.runs) == len(expected.groupby(["workload", "method_label", "seed"]))
    assert r.runs.step.tolist() == expected.groupby(["workload", "method_label", "seed"]).step.max().tolist()
    assert r.steps.empty and r.speedup is not None


def test_load_reads_run_folders_first_and_says_nothing(tmp_path):
    root = _suite_folder(tmp_path / "demo", ("fast",), (0,), ("fast",), (0,))
    (root / "tables").mkdir()
    (root / "tables" / "evaluations.csv").write_text("workload,method_label,seed,step\nx,y,0,1\n")  # stale table
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = load(root)
    assert r.source == "runs" and set(r.evaluations.method_label) == {"baseline", "fast"}


PLUGIN = '''import torch

from bench.core.spec import Method


class StaleCheck(Method):
    """Uniform timesteps, written out (a test plugin whose code the test then changes)."""

    name = "stale_check_uniform"
    slots = frozenset({"timesteps"})
    source = "tests/test_stale_results.py"

    def timestep_probs(self, p, schedule):
        return torch.full((schedule.T,), 1.0 / schedule.T, dtype=torch.float64)
'''

SUITE = """[suite]
name = "stale"
[grid]
methods = ["stale_check_uniform"]
datasets = [{ name = "synthetic", resolution = 16 }]
archs = ["unet-tiny"]
seeds = [0]
[budget]
iters = 2
batch_size = 4
[train]
plugins = ["plugin.py"]
[eval]
every = 2
metrics = ["proxy_fd"]
num_images = 8
"""


def test_a_finished_run_whose_method_code_changed_is_refused_not_counted_as_done(tmp_path, capsys):
    from bench.cli import main
    from bench.suite.grid import load_suite
    from bench.train.run_folder import expected_record

    plugin, toml, results = tmp_path / "plugin.py", tmp_path / "stale.toml", tmp_path / "results"
    plugin.write_text(PLUGIN)
    toml.write_text(SUITE)
    run = load_suite(toml).runs()[0]
    # A finished run of that code, as bench.train.loop leaves it.
    run_dir = run.run_dir(results)
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({**expected_record(run.config), "runtime": []}))
    (run_dir / "status.json").write_text(json.dumps({"state": "done", "step": 2}))
    dry_run = ["--results", str(results), "run", str(toml), "--dry-run"]
    assert main(dry_run) == 0  # the same code: done, nothing to refuse

    plugin.write_text(PLUGIN.replace("1.0 / schedule.T", "1 / schedule.T"))  # the code, not a hyperparameter
    assert main(dry_run) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert "the source file of method 'stale_check_uniform' changed since this run" in err[0]
    assert "delete the run folder to train it again" in err[0]

    # A run recorded before config.json kept the hash cannot be judged: it stays done.
    record = json.loads((run_dir / "config.json").read_text())
    del record["method_sha256"]
    (run_dir / "config.json").write_text(json.dumps(record))
    assert main(dry_run) == 0


def test_train_refuses_to_resume_or_finish_a_run_whose_method_code_changed(tmp_path):
    from bench.errors import ConfigError
    from bench.train.resolve import resolve_run
    from bench.train.run_folder import open_run_folder

    plugin = tmp_path / "plugin.py"
    plugin.write_text(PLUGIN)
    config = {"method": "stale_check_uniform", "plugins": [str(plugin)], "dataset": "synthetic", "resolution": 16,
              "iters": 2, "batch_size": 4}
    out, rank0 = tmp_path / "run", type("Runtime", (), {"rank": 0})()
    out.mkdir()
    run = resolve_run(config)
    (out / "status.json").write_text(json.dumps({"state": "done", "step": 2}))
    assert open_run_folder(run.config, out, run.record, rank0)["state"] == "done"  # writes config.json
    plugin.write_text(PLUGIN + "\n# a changed file\n")
    run = resolve_run(config)
    with pytest.raises(ConfigError, match="source file of method 'stale_check_uniform' changed since this run"):
        open_run_folder(run.config, out, run.record, rank0)
