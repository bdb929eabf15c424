"""Tuning by rule ([tune], bench/suite/tuning.py and two_phase.py): the choice on synthetic scores, the
checks of the table, the two-phase run (tuning first, then the headline at the chosen learning rates,
tuning.json reused and never silently changed), its dry run, the committed `tuned` suite, and one slow
end-to-end run with real training and the report's tuning table."""

import json
import math
from pathlib import Path

import pytest

from bench import fileio
from bench.errors import DivergenceError
from bench.suite.grid import SUITES_DIR, load_suite
from bench.suite.replicates import shared_seeds
from bench.suite.runner import run_suite
from bench.suite.schema import SuiteError
from bench.suite.tuning import choose, tuning_label
from bench.train.run_folder import write_status

SUITE = """
[suite]
name = "tn"

[grid]
methods = ["baseline", "placebo", "min_snr"]
datasets = ["synthetic"]
archs = ["unet-micro"]
seeds = {seeds}

[tune]
seeds = {tune_seeds}
{tune_extra}

[budget]
iters = {iters}
batch_size = 2
baseline_extend = 2.0

[train]
lr = 1e-3
ckpt_every = 2

[eval]
every = {every}
metrics = ["proxy_fd"]
num_images = 8
sampler_steps = 2
batch_size = 8
"""


def make_suite(tmp_path, seeds=(0, 1), tune_seeds=(100,), tune_extra="", iters=8, every=4):
    p = tmp_path / "tn.toml"
    p.write_text(SUITE.format(seeds=list(seeds), tune_seeds=list(tune_seeds), tune_extra=tune_extra, iters=iters,
                              every=every))
    return load_suite(p)


# -- the rule --------------------------------------------------------------------------------------


def test_the_lowest_mean_over_tuning_seeds_wins():
    best, means = choose({0.5: [3.0, 3.4], 1.0: [3.1, 3.0], 2.0: [2.0, 4.5]})
    assert best == 1.0 and means == pytest.approx({0.5: 3.2, 1.0: 3.05, 2.0: 3.25})


def test_a_diverged_run_loses_its_factor():
    best, means = choose({0.5: [3.0], 1.0: [2.5], 2.0: [None]})
    assert best == 1.0 and math.isinf(means[2.0])


def test_ties_go_to_the_factor_closest_to_one():
    assert choose({0.5: [2.0], 1.0: [2.0], 2.0: [2.0]})[0] == 1.0
    assert choose({0.25: [2.0], 2.0: [2.0], 4.0: [3.0]})[0] == 2.0
    assert choose({0.5: [2.0], 2.0: [2.0]})[0] == 0.5  # equally far in log-scale: the smaller, every time


# -- the table's checks ----------------------------------------------------------------------------


def test_tuning_seeds_shared_with_the_grid_are_refused(tmp_path):
    with pytest.raises(SuiteError) as exc:
        make_suite(tmp_path, seeds=(0, 1), tune_seeds=(1, 100))
    msg = str(exc.value)
    assert "'tune.seeds'" in msg and "[1]" in msg and "held out" in msg and "\n" not in msg


def test_tune_names_labels_of_the_grid_and_defaults(tmp_path):
    with pytest.raises(SuiteError, match=r"tune.methods\[0\]"):
        make_suite(tmp_path, tune_extra='methods = ["p2"]')
    suite = make_suite(tmp_path)
    t = suite.tune
    assert t["lr_factors"] == [0.5, 1.0, 2.0] and t["budget"] == 8
    assert t["methods"] == ["baseline", "min_snr"] and t["follow"] == {"placebo": "baseline"}
    assert json.loads(json.dumps(suite.to_dict()))["tune"]["seeds"] == [100]


# -- the report's reading of the choice --------------------------------------------------------------


def test_the_tuning_table_says_how_firm_each_choice_is(tmp_path):
    from bench.report.tuning import tuning_lines

    def entry(values):  # per factor: the tuning seeds' scores; the choice by the rule
        factor, means = choose({float(k): v for k, v in values.items()})
        return {"factor": factor, "lr": factor * 1e-3, "base_lr": 1e-3,
                "means": {f"{k:g}": (None if math.isinf(m) else m) for k, m in means.items()},
                "values": {k: v for k, v in values.items()}}

    record = {"metric": "proxy_fd", "budget": 8, "lr_factors": [0.5, 1.0, 2.0], "seeds": [100, 101], "methods": {
        # both seeds best at x2, the grid's edge; margin 3.0 - 2.0 = 1.0
        "baseline": entry({"0.5": [5.0, 5.0], "1": [3.0, 3.0], "2": [2.0, 2.0]}),
        # mean best at x1 (2.5 against 2.6) but seed 101 scores x0.5 lower: 1 of 2
        "min_snr": entry({"0.5": [3.2, 2.0], "1": [2.5, 2.5], "2": [9.0, None]})}}
    fileio.write_json(tmp_path / "tuning.json", record)
    text = "\n".join(tuning_lines(tmp_path, {"tune": {"seeds": [100, 101]}, "methods": []}))
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in text.splitlines() if line.startswith("| baseline") or line.startswith("| min_snr")}
    assert rows["baseline"][-2:] == ["1", "2 of 2"] and rows["min_snr"][-2:] == ["0.1", "1 of 2"]
    assert "**2**" in rows["min_snr"] or "**2.5**" in rows["min_snr"]
    edge = text.split("grid's edge")[1].split("\n")[0]
    assert "`baseline`" in edge and "`min_snr`" not in edge
    agree = text.split("Not every tuning seed agrees")[1].split("\n")[0]
    assert "`min_snr`" in agree and "`baseline`" not in agree


# -- the two phases, with a stand-in for training ---------------------------------------------------

#: min_snr is best at half the learning rate, the baseline at twice it; min_snr at 2x diverges
SCORE = {("baseline", 0.5): 5.0, ("baseline", 1.0): 4.0, ("baseline", 2.0): 3.0,
         ("min_snr", 0.5): 2.0, ("min_snr", 1.0): 2.5, ("min_snr", 2.0): None}


def fake_train(resolved, run_dir, events=None):
    """Writes what a run writes for the report's metric: value SCORE[method, lr factor] at every
    evaluation; logs the call, in order, beside the results."""
    cfg = resolved.config
    run_dir = Path(run_dir)
    with open(run_dir.parents[3 if "@" in run_dir.parent.name else 2] / "calls.log", "a") as f:
        f.write(f"{run_dir.parent.name} {run_dir.name} {cfg.lr:g}\n")
    factor = round(cfg.lr / 1e-3, 6)
    value = SCORE.get((cfg.method, factor), 1.0) if cfg.method != "placebo" else 9.0
    if value is None:
        write_status(run_dir, "failed", 2, "loss is non-finite at step 2", error="divergence")
        raise DivergenceError(2, "loss is non-finite at step 2")
    fileio.write_json(run_dir / "probe.json", {"lr": cfg.lr})
    fileio.append_jsonl(run_dir / "evals.jsonl", [{"step": s, "metric": "proxy_fd", "value": value}
                                                  for s in range(cfg.eval_every, cfg.iters + 1, cfg.eval_every)])
    write_status(run_dir, "done", cfg.iters)


def calls(root: Path) -> list[list[str]]:
    log = root / "tn" / "calls.log"
    return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


def test_tuning_runs_first_then_the_headline_at_the_chosen_rates(tmp_path):
    suite, root = make_suite(tmp_path), tmp_path / "r"
    res = run_suite(suite, results_root=root, progress=False, train_fn=fake_train)
    assert res.ok  # min_snr's diverged tuning run is a tuning result, not a failure
    order = calls(root)
    tuning = [c for c in order if "@" in c[0]]
    assert len(tuning) == 6 and order[:6] == tuning  # every tuning run before any headline run
    assert {c[0] for c in tuning} == {tuning_label(m, f) for m in ("baseline", "min_snr") for f in (0.5, 1.0, 2.0)}
    assert (root / "tn" / "tuning" / "synthetic-16_unet-micro" / "baseline@lr2x" / "seed100").is_dir()
    record = json.loads((root / "tn" / "tuning.json").read_text())
    assert record["methods"]["baseline"]["factor"] == 2.0 and record["methods"]["min_snr"]["factor"] == 0.5
    assert record["methods"]["min_snr"]["means"]["2"] is None  # diverged
    lrs = {(label, seed): json.loads((root / "tn" / "synthetic-16_unet-micro" / label / seed / "probe.json").read_text())["lr"]
           for label in ("baseline", "placebo", "min_snr") for seed in ("seed0", "seed1")}
    assert lrs[("baseline", "seed0")] == pytest.approx(2e-3) and lrs[("min_snr", "seed1")] == pytest.approx(5e-4)
    assert lrs[("placebo", "seed0")] == pytest.approx(2e-3)  # the baseline's control, at the baseline's choice
    assert json.loads((root / "tn" / "suite.json").read_text())["lr_chosen"]["min_snr"] == pytest.approx(5e-4)

    # Again: nothing runs, the recorded choice stands.
    before = (root / "tn" / "tuning.json").read_bytes()
    run_suite(suite, results_root=root, progress=False, train_fn=fake_train)
    assert len(calls(root)) == len(order) and (root / "tn" / "tuning.json").read_bytes() == before


def test_the_report_of_a_tuned_suite_reads_its_methods_not_a_baseline_sweep(tmp_path):
    # Tuned methods train at learning rates of their own: that is no [grid] lr_sweep of the baseline, whose
    # section once took every tuned method for a baseline run (and the headline table lost them).
    from bench.report.build import _lr_sweep, build_report

    suite, root = make_suite(tmp_path), tmp_path / "r"
    assert run_suite(suite, results_root=root, progress=False, train_fn=fake_train).ok
    for probe in (root / "tn").glob("synthetic-16_unet-micro/*/seed*/probe.json"):  # the settings the report reads
        fileio.write_json(probe.parent / "config.json", {**json.loads(probe.read_text()), "iters": 8, "batch_size": 2})
    info = json.loads((root / "tn" / "suite.json").read_text())
    assert info["lr_sweep"] == {} and info["lr_chosen"]["min_snr"] == pytest.approx(5e-4)
    text = build_report(root / "tn").read_text()
    assert "Learning-rate sweep" not in text and "best-tuned baseline" not in text
    paired = text.split("### Paired speed-up")[1].split("####")[0]
    assert "| min_snr " in paired and "| placebo " in paired
    assert "as its tuning chose (baseline 0.002, min_snr 0.0005, placebo 0.002)" in text
    assert "chosen per method by the suite's tuning" in text and "it was not tuned per method" not in text
    # A suite.json written before the fix listed every tuned label as a sweep entry: read as no sweep.
    assert _lr_sweep({**info, "lr_sweep": {"baseline": 2e-3, "placebo": 2e-3, "min_snr": 5e-4}}) == {}
    both = {**info, "lr_sweep": {"baseline": 2e-3, "baseline-lr0.01": 1e-2, "min_snr": 5e-4}}
    assert _lr_sweep(both) == {"baseline": 2e-3, "baseline-lr0.01": 1e-2}


def test_a_changed_tuning_result_is_said_and_changes_nothing(tmp_path):
    suite, root = make_suite(tmp_path), tmp_path / "r"
    run_suite(suite, results_root=root, progress=False, train_fn=fake_train)
    before = (root / "tn" / "tuning.json").read_bytes()
    evals = root / "tn" / "tuning" / "synthetic-16_unet-micro" / "baseline@lr1x" / "seed100" / "evals.jsonl"
    rows = fileio.read_jsonl(evals)
    evals.write_text("".join(json.dumps({**r, "value": 0.5}) + "\n" for r in rows))  # 1x now wins
    events = []
    res = run_suite(suite, results_root=root, progress=events.append, train_fn=fake_train)
    said = " ".join(e.get("text", "") for e in events if e["event"] == "message")
    assert "baseline now give lr x1" in said and "recorded lr x2" in said and "keeps" in said
    assert (root / "tn" / "tuning.json").read_bytes() == before and res.ok


def test_unfinished_tuning_keeps_the_headline_waiting(tmp_path):
    suite, root = make_suite(tmp_path), tmp_path / "r"
    res = run_suite(suite, results_root=root, progress=False, train_fn=fake_train, only="*@lr*/seed*")
    assert res.ok and not [c for c in calls(root) if "@" not in c[0]]  # --only: the tuning runs alone
    (root / "tn" / "tuning.json").unlink()
    (root / "tn" / "tuning" / "synthetic-16_unet-micro" / "min_snr@lr1x" / "seed100" / "status.json").unlink()
    res = run_suite(suite, results_root=root, progress=False, train_fn=fake_train, only="synthetic-16_unet-micro/baseline/*")
    waiting = [o for o in res.outcomes if o.action == "waiting for tuning"]
    assert not res.ok and {o.key.split("/")[1] for o in waiting} == {"min_snr"}
    assert set(json.loads((root / "tn" / "tuning.json").read_text())["methods"]) == {"baseline"}


def test_dry_run_prices_both_phases_and_runs_nothing(tmp_path):
    suite, root = make_suite(tmp_path), tmp_path / "r"
    res = run_suite(suite, results_root=root, dry_run=True, progress=False, train_fn=fake_train)
    assert not root.exists()
    assert "phase 1 of 2, tuning: 2 methods x 3 learning rates" in res.plan and "phase 2 of 2, headline" in res.plan
    assert "min_snr@lr0.5x/seed100" in res.plan and "both phases (tuning first, then the headline)" in res.plan


# -- the committed study ---------------------------------------------------------------------------


def test_the_tuned_suite_is_the_protocol_it_says():
    suite = load_suite("tuned")
    names = {m.name for m in suite.methods}
    assert {"baseline", "placebo", "logit_normal", "speed", "clts", "min_snr", "p2", "edm", "mdlrc"} <= names
    flags = {m.label: m.budget_dependent for m in suite.methods}  # the methods' class attribute, in suite.json
    assert flags["clts"] and flags["mdlrc"] and not flags["logit_normal"] and not flags["baseline"]
    assert len(suite.seeds) >= 8 and suite.iters >= 2000 and suite.tune and suite.tune["lr_factors"] == [0.5, 1.0, 2.0]
    flat = [{"name": w.name, "dataset": w.dataset, "resolution": w.resolution, "arch": w.arch} for w in suite.workloads]
    assert shared_seeds("tuned", flat, suite.seeds + suite.tune["seeds"], SUITES_DIR) == []  # held out everywhere
    plan = run_suite(suite, results_root="/nonexistent-results", jobs=suite.jobs, dry_run=True, progress=False).plan
    minutes = float(plan.split("both phases")[1].split("about ")[1].split(" min")[0])
    assert minutes <= 120  # the dry run's own estimate, with the suite's 2 jobs


# -- end to end (trains) ---------------------------------------------------------------------------


@pytest.mark.slow
def test_tuned_suite_end_to_end_with_its_report(tmp_path):
    from bench.report.build import build_report

    suite, root = make_suite(tmp_path, tune_extra="lr_factors = [0.5, 2.0]"), tmp_path / "r"
    res = run_suite(suite, results_root=root, progress=False)
    assert res.ok
    record = json.loads((root / "tn" / "tuning.json").read_text())
    assert set(record["methods"]) == {"baseline", "min_snr"} and all(
        m["means"][f"{m['factor']:g}"] == min(v for v in m["means"].values() if v is not None)
        for m in record["methods"].values())
    text = build_report(root / "tn").read_text()
    assert "## Tuning" in text and "**" in text.split("## Tuning")[1].split("##")[0]
    assert "censored: " in text and "## Speed-up over training" in text
    assert not any("@" in p.parent.name for p in (root / "tn").glob("*/*/seed*"))  # never beside the headline
