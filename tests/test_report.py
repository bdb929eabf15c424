"""The report (bench/report/build.py) on a hand-made results folder in bench.train.loop's format."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from bench.report.build import build_report
from bench.report.tables import evaluations_table, find_runs

REPO = Path(__file__).resolve().parent.parent
WORKLOAD = "synthetic-16_unet-tiny"
STEPS = [100, 200, 300, 400]
# Seed-mean curves (the seeds add -1, 0, +1; seed k of every method has the same offset):
#   baseline [11, 9, 7, 6] -> seed k's target at 100% is its own last value (5, 6, 7), reached at 400
#   fast     [9, 6, 5, 4]  -> seed k reaches that target exactly at step 200: paired speed-up 2 per seed
#   slow     [12, 11, 10, 9] -> never reaches it: "not reached", an upper bound of 400 / 400
CURVES = {"baseline": [11, 9, 7, 6], "fast": [9, 6, 5, 4], "slow": [12, 11, 10, 9]}
# The baseline is extended to 2x the budget (baseline_extend = 2): it goes on to 800 iterations.
# fast ends at 4 + offset, the baseline seed's value at 700: worth 700 / 400 = 1.75 iterations per
# iteration; slow ends at 9 + offset, the baseline's at 200: 0.5.
EXT_STEPS = [100, 200, 300, 400, 500, 600, 700, 800]
EXT_CURVE = [11, 9, 7, 6, 5, 4.5, 4, 3.5]
OFFSETS = {0: -1.0, 1: 0.0, 2: 1.0}
PARAMS = {"baseline": ("baseline", {}, []), "fast": ("clts", {"mu": 0.3, "sigma": 0.25}, ["timesteps"]),
          "slow": ("mdlrc", {"beta1_end": 0.5, "compensation": "variance"}, ["optimizer"]),
          "baseline-lr0.003": ("baseline", {}, [])}


def write_run(root: Path, label: str, seed: int, iters: int = 400, state: str = "done", curve=None, T: int = 10,
              steps=STEPS, budget_iters: int = 0):
    d = root / WORKLOAD / label / f"seed{seed}"
    d.mkdir(parents=True)
    method, params, slots = PARAMS[label]
    cfg = {"method": method, "method_params": {}, "dataset": "synthetic", "resolution": None, "arch": "unet-tiny",
           "iters": iters, "budget_iters": budget_iters, "batch_size": 8, "lr": 1e-3, "warmup": 0, "grad_clip": 0.5, "ema_decay": 0.99,
           "ema_warmup": True, "schedule": "linear", "T": T, "target": "eps",
           "seed": seed, "eval_every": 100, "eval": {"metrics": ["proxy_fd"]}, "method_label": label,
           "method_slots": slots, "method_resolved_params": params, "method_source": f"source of {method}"}
    (d / "config.json").write_text(json.dumps(cfg))
    curve = CURVES[label] if curve is None else curve
    last = iters if state == "done" else 200
    evals = []
    for step, v in zip(steps, curve):
        if step > last:
            break
        evals.append({"step": step, "metric": "proxy_fd", "value": v + OFFSETS.get(seed, 0.0),
                      "feature_extractor": "pixels-pca64", "num_gen": 64, "ref_split": "test", "num_ref": 256,
                      "sampler": "ddim", "sampler_steps": 4, "eta": 0.0, "eval_seconds": 0.1,
                      "timestep_spacing": "linspace", "timesteps": "9,6,3,0", "noise_floor": 0.5,
                      "noise_floor_source": "64 real train images"})
    (d / "evals.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    rows = []
    for step in range(1, last + 1):
        beta1 = 0.9 - 0.4 * step / iters if method == "mdlrc" else 0.9
        lr_scale = 1 - 0.5 * step / iters if method == "mdlrc" else 1.0
        rows.append({"step": step, "p": (step - 1) / iters, "loss": 1.0 / step,
                     "lr": 1e-3 * lr_scale, "lr_scale": lr_scale, "beta1": beta1,
                     "grad_norm": 1.0 if step % 4 == 0 else 0.1,  # one step in four above grad_clip 0.5
                     # MSE per timestep quartile; null when the batch had no t in that quartile
                     **{f"loss_q{k}": None if (k == 2 and step % 7 == 0) else
                        (k + 1) * 0.1 * (1 + 100 / step) + 0.01 * seed for k in range(4)},
                     "images_per_s": 100.0, "train_seconds": step * 0.01})
    (d / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4')  # torn last line
    ps = [i / 10 for i in range(11)]
    probs = [[1 / T] * T if method != "clts" else [(1 - p) / T + p * (1.0 if t == 3 else 0.0) for t in range(T)]
             for p in ps]
    (d / "method_trace.json").write_text(json.dumps({
        "label": label, "progress": ps, "timestep_probs": probs, "loss_weights": [[1.0] * T for _ in ps],
        "lr_scale": [1.0] * 11, "beta1": [0.9] * 11, "beta2": [0.999] * 11, "ema_decay": [0.99] * 11}))
    status = {"state": state, "step": last, "reason": None, "train_seconds": 1.0, "eval_seconds": 0.5}
    if state == "failed":
        status["reason"] = "non-finite loss (nan) at step 200"
    (d / "status.json").write_text(json.dumps(status))
    (d / "machine.json").write_text(json.dumps({"platform": "Linux-test", "processor": "x86_64", "cpu_count": 2,
                                                "torch": "2.x", "torch_threads": 2}))
    return d


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("results") / "demo"
    for seed in (0, 1, 2):
        write_run(root, "baseline", seed, iters=800, budget_iters=400, steps=EXT_STEPS, curve=EXT_CURVE)
    for label in ("fast", "slow"):
        for seed in (0, 1, 2):
            write_run(root, label, seed)
    # A fourth seed of `slow` diverged at step 200.
    write_run(root, "slow", 3, state="failed")
    (root / "suite.json").write_text(json.dumps({
        "name": "demo", "description": "A hand-made suite.", "file": "suites/demo.toml",
        "report": {"metric": "proxy_fd", "baseline": "baseline", "fractions": [0.25, 0.5, 1.0], "bootstrap": 500,
                   "confidence": 0.95, "seed": 0}}))
    report = build_report(root)
    return root, report


def test_tidy_evaluation_table(results):
    root, report = results
    df = pd.read_csv(report.parent / "tables" / "evaluations.csv")
    assert len(df) == 3 * 8 + 2 * 3 * 4 + 2  # the extended baseline's 8, two methods x 3 seeds x 4, the failed seed's 2
    for col in ("workload", "method_label", "method", "seed", "step", "images_seen", "fraction", "metric", "value",
                "feature_extractor", "num_gen", "sampler", "sampler_steps"):
        assert col in df.columns
    row = df[(df.method_label == "fast") & (df.seed == 2) & (df.step == 300)].iloc[0]
    assert row.value == 6.0 and row.images_seen == 2400 and row.fraction == 0.75 and row.method == "clts"


def _at(sp, label, fraction):
    early = sp[sp.statistic == "early_rate"]
    return early[(early.method_label == label) & (early.fraction == fraction)].iloc[0]


def test_paired_speedup_numbers(results):
    root, report = results
    sp = pd.read_csv(report.parent / "tables" / "speedup.csv")
    # The headline: baseline-equivalent iterations at the budget, read on the extended baseline.
    eq = sp[sp.statistic == "baseline_equivalent"].set_index("method_label")
    assert eq.loc["baseline", "speedup"] == 1.0 and eq.loc["baseline", "interval"] == "none"
    fast, slow = eq.loc["fast"], eq.loc["slow"]
    assert fast.speedup == pytest.approx(1.75) and fast.interval == "t" and fast.n_paired == 3
    assert (fast.ci_low, fast.ci_high) == pytest.approx((1.75, 1.75)) and fast.p_value == 0.0
    assert json.loads(fast.baseline_steps) == pytest.approx([700, 700, 700])
    # slow's fourth seed failed and has no baseline partner: 3 pairs, each worth 200 / 400.
    assert slow.speedup == pytest.approx(0.5) and slow.n_paired == 3 and slow.n_dropped == 0
    assert fast.baseline_extend == 2.0 and fast.budget_iters == 400
    # Holm over the two methods (the A/A row is a control): both p = 0, adjusted 0.
    assert fast.p_holm == 0.0 and slow.p_holm == 0.0 and fast.holm_level == pytest.approx(0.975)
    # The early-training rate: fast reaches its own baseline seed's 75% target (6 / 7 / 8) at
    # 100 + (8 - 6) / (8 - 5) * 100 = 166.7 for seed 0: 300 / 166.7 = 1.8.
    row = _at(sp, "fast", 0.75)
    assert row.speedup == pytest.approx(1.8) and row.n_paired == 3 and row.n_reached == 3 and not row.upper_bound
    assert row.interval == "t" and row.ci_low == pytest.approx(1.8) and row.ci_high == pytest.approx(1.8)
    # f = 0.5: at the target by the first evaluation, so 2 is only a lower bound. No f = 1 column.
    row = _at(sp, "fast", 0.5)
    assert row.speedup == pytest.approx(2.0) and row.lower_bound and row.n_first == 3 and row.interval == "censored"
    assert set(sp[sp.statistic == "early_rate"].fraction) == {0.5, 0.75}
    # Paired final difference: fast ends 2 below the baseline on every seed.
    assert fast.final_diff_mean == pytest.approx(-2.0)
    # slow never reaches the 75% target: counted at its last evaluation (400), an upper bound.
    assert _at(sp, "slow", 0.75).upper_bound and _at(sp, "slow", 0.75).n_reached == 0
    # A/A: 3 baseline seeds give one pair (seed 0 vs seed 2; seed 1 is left out): too few seeds.
    aa = _at(sp, "A/A: baseline vs baseline", 0.5)
    assert aa.n_paired == 1 and aa.interval == "too few seeds" and math.isnan(aa.ci_low)
    md = (report.parent / "tables" / "speedup.md").read_text()
    for text in ("1.75x [1.75, 1.75]", "0.50x [0.50, 0.50]", ">= 2.00x", "1.80x [1.80, 1.80]", "not reached (<= ",
                 "too few seeds", "1 (reference)", "baseline-equivalent", "Holm-adjusted"):
        assert text in md, text
    tex = (report.parent / "tables" / "speedup.tex").read_text()
    assert r"\begin{tabular}" in tex and r"\toprule" in tex and "Fréchet distance (proxy features)" in tex
    text = report.read_text()
    assert "trains on to 800 iterations (2x the budget" in text and "trained on to 2x the budget (800 iterations)" in text


def test_report_states_its_limits(results):
    root, report = results
    text = report.read_text()
    limits = text.split("### What this report does not show")[1]
    # Baseline seed mean: 6.8 at 320 iterations, 6 at 400: (6.8 - 6) / 6.8 = 11.8% in the last 20%.
    assert "improved by 11.8% over the last 20% of the budget" in limits
    assert "visits t = 9, 6, 3, 0" in limits and "including t = 0" in limits
    assert "is 0.5: what a perfect generator would score at N = 64" in limits
    assert "not tuned per method" in limits and "lr_sweep" in limits
    # EMA with warm-up over 400 iterations: 400 / 409 = 0.9780 at the last step, about 45 steps.
    assert "at the last step it is 0.9780 (the warm-up term, not the configured decay)" in limits
    assert "about 45 steps" in limits
    facts = pd.read_csv(report.parent / "tables" / "training.csv").set_index("method")
    # slow: seeds 0-2 log steps 1..400 (factor 1 - s / 800, sum 299.75 each), the failed seed 3 steps 1..200
    # (sum 174.875): (3 x 299.75 + 174.875) / 1400.
    assert facts.loc["slow", "lr_factor_mean"] == pytest.approx((3 * 299.75 + 174.875) / 1400)
    assert facts.loc["slow", "optimizer_slot"]
    assert facts.loc["baseline", "steps"] == 3 * 400  # the extended baseline's facts stop at the budget
    assert facts.loc["slow", "lr_factor_min"] == pytest.approx(0.5)
    assert facts.loc["fast", "clipped_fraction"] == pytest.approx(0.25) and not facts.loc["fast", "optimizer_slot"]
    assert "| 0.767 " in limits and "25.0% (clip 0.5)" in limits and "1 (no optimizer slot)" in limits


def test_fractions_and_curves(results):
    root, report = results
    fr = pd.read_csv(report.parent / "tables" / "fractions.csv")
    b = fr[(fr.method_label == "baseline")].set_index("fraction")
    assert b.loc[0.25, "mean"] == pytest.approx(11) and b.loc[0.5, "mean"] == pytest.approx(9)
    assert b.loc[0.5, "std"] == pytest.approx(1.0)  # seeds 8, 9, 10
    assert b.loc[1.0, "mean"] == pytest.approx(6)
    cv = pd.read_csv(report.parent / "tables" / "curves.csv")
    assert set(cv[cv.method_label == "slow"].step) == {100, 200}
    assert max(cv[cv.method_label == "baseline"].step) == 800  # the extended baseline's whole curve


def test_report_md_says_what_every_number_is(results):
    root, report = results
    assert report == root / "report.md"
    text = report.read_text()
    assert "A hand-made suite." in text
    # The metric's protocol: feature extractor, N, reference, sampler.
    assert "pixels-pca64" in text and "N = 64" in text and "256 reference images" in text
    assert "ddim with 4 steps" in text
    # Every label's hyperparameters, and the machine.
    assert "beta1_end=0.5, compensation=variance" in text and "mu=0.3, sigma=0.25" in text
    assert "Linux-test" in text and "2 CPUs" in text and "this report was built on" in text
    # The failed run with its step and reason.
    assert "## Failed runs" in text and "slow/seed3" in text and "non-finite loss" in text
    # Every linked figure exists, as PNG and PDF.
    figs = [line.split("](")[1].split(")")[0] for line in text.splitlines() if line.startswith("![")]
    assert len(figs) == 4
    for f in figs:
        assert (report.parent / f).is_file()
        assert (report.parent / f.replace(".png", ".pdf")).is_file()
    names = " ".join(figs)
    for kind in ("curves_", "timesteps_", "optimizer_", "loss_over_t_"):
        assert kind in names


def test_find_runs_skips_report_and_torn_lines(results):
    root, _ = results
    runs = find_runs(root)
    assert len(runs) == 10 and all(r["workload"] == WORKLOAD for r in runs)
    assert len(evaluations_table(root, runs)) == 50


def test_an_unreadable_evaluation_row_is_never_data_and_is_named(tmp_path):
    """A finished run's evals.jsonl cut short (its final value lost) or holding garbage: the run is
    left out of every table and listed with the line, not read with its last value missing (D12)."""
    root = tmp_path / "demo"
    for seed in (0, 1):
        write_run(root, "baseline", seed)
        write_run(root, "fast", seed)
    cut = root / WORKLOAD / "fast" / "seed1" / "evals.jsonl"
    cut.write_text(cut.read_text()[:-30])  # the final row torn
    junk = root / WORKLOAD / "baseline" / "seed0" / "evals.jsonl"
    lines = junk.read_text().splitlines(keepends=True)
    junk.write_text("".join(lines[:1] + ["\x00garbage\n"] + lines[1:]))
    runs = {(r["label"], r["seed"]): r for r in find_runs(root)}
    assert runs[("fast", 1)]["status"]["state"] == "failed"
    assert "evals.jsonl line 4 is unreadable (cut short)" in runs[("fast", 1)]["status"]["reason"]
    assert "evals.jsonl line 2 is unreadable (not JSON)" in runs[("baseline", 0)]["status"]["reason"]
    table = evaluations_table(root)
    assert set(zip(table.method_label, table.seed)) == {("fast", 0), ("baseline", 1)}
    text = build_report(root).read_text()
    assert "## Failed runs" in text and "evals.jsonl line 4 is unreadable" in text


def test_report_of_an_empty_or_unfinished_suite(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    text = build_report(root).read_text()
    assert "no evaluations recorded yet" in text
    write_run(tmp_path / "partial", "baseline", 0, state="running")
    text = build_report(tmp_path / "partial").read_text()
    assert "## Unfinished runs" in text and "running" in text


def test_report_never_imports_torch(results, tmp_path):
    root, _ = results
    code = ("import sys; from bench.report.build import build_report; import bench.report.speedup; "
            f"build_report({str(root)!r}, {str(tmp_path)!r}); "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]; "
            "assert not bad, bad; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=900)  # catches a hang only
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_lr_sweep_reports_the_best_tuned_baseline(tmp_path):
    root = tmp_path / "sweep"
    for seed in (0, 1, 2):
        write_run(root, "baseline", seed)
        write_run(root, "baseline-lr0.003", seed, curve=CURVES["fast"])  # the better learning rate
        write_run(root, "fast", seed)
    (root / "suite.json").write_text(json.dumps({
        "name": "sweep", "lr_sweep": {"baseline": 1e-3, "baseline-lr0.003": 3e-3},
        "report": {"metric": "proxy_fd", "baseline": "baseline", "bootstrap": 0}}))
    text = build_report(root).read_text()
    sweep = text.split("#### Learning-rate sweep of `baseline` (proxy_fd)")[1].split("### ")[0]
    assert "| baseline-lr0.003 | 0.003 |" in sweep and "Against the best-tuned baseline `baseline-lr0.003`" in sweep
    # fast has exactly the tuned baseline's curves: 1.00x against it, where it was 2x against the shared lr.
    assert "| fast " in sweep and "1.00x" in sweep
    main = text.split("### Paired speed-up over `baseline`")[1].split("####")[0]
    assert "1.80x" in main and "baseline-lr0.003" not in main  # sweep runs stay out of the main table


def test_the_noise_floor_line_says_why_a_floor_is_missing():
    import pandas as pd

    from bench.report.stats import _floor_lines

    base = pd.DataFrame({"seed": [0], "step": [4], "value": [3.0]})
    skipped = pd.DataFrame({"metric": ["fid"], "noise_floor": [None], "num_gen": [8],
                            "noise_floor_source": ["not computed: external reference statistics"]})
    assert _floor_lines(skipped, base) == ["- **Noise floor**: not computed: external reference statistics."]
    old = pd.DataFrame({"metric": ["fid"], "num_gen": [8]})
    assert _floor_lines(old, base) == ["- **Noise floor**: not recorded (runs from before it was measured)."]
    measured = skipped.assign(noise_floor=[0.5], noise_floor_source=["8 real test images"])
    assert "is 0.5" in _floor_lines(measured, base)[0] and "6.0x the floor" in _floor_lines(measured, base)[0]


def test_the_noise_floor_line_reads_an_extended_baseline_at_the_budget():
    """The baseline trained on to 2x the budget: the floor line compares the floor with its value at the
    budget (where the methods are compared), not with the end of its extension."""
    import pandas as pd

    from bench.report.stats import limits_lines

    evals = pd.DataFrame({"metric": "proxy_fd", "method_label": "baseline", "seed": [0, 0, 1, 1],
                          "step": [4, 8, 4, 8], "value": [3.0, 1.0, 5.0, 1.0], "noise_floor": 0.5,
                          "noise_floor_source": "8 real test images", "num_gen": 8})
    floor = [line for line in limits_lines(evals, [], "baseline", "proxy_fd", 4, {}) if "Noise floor" in line]
    assert len(floor) == 1 and "ends the budget at 4, 8.0x the floor" in floor[0]


def test_scores_across_workloads_appear_with_two_workloads(results, tmp_path):
    """A one-workload report has no score section; with the same workload twice, every method's ratio is
    the same on both, the best method scores 1, and the profile figure is written."""
    import shutil

    root, report = results
    assert "Scores across workloads" not in report.read_text()
    two = tmp_path / "two"
    shutil.copytree(root, two)
    shutil.copytree(two / WORKLOAD, two / "copy-16_unet-tiny")
    text = build_report(two).read_text()
    assert "## Scores across workloads (AlgoPerf's rules)" in text and "figures/performance_profiles.png" in text
    table = pd.read_csv(two / "tables" / "scores.csv")
    ratio_cols = [c for c in table.columns if c.startswith("r: ")]
    assert len(ratio_cols) == 2 and (table[ratio_cols[0]].astype(str) == table[ratio_cols[1]].astype(str)).all()
    assert table.score.max() == 1.0 and set(table.method) == {"baseline", "fast", "slow"}
    assert (two / "figures" / "performance_profiles.png").is_file()
