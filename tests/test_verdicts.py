"""The report's verdicts (bench/report/verdicts.py), method comparisons (compare.py) and their place at
the top of report.md (text.py), on synthetic evaluations whose outcomes are known by construction."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bench.report.build import build_report
from bench.report.compare import compare_rows
from bench.report.stats import speedup_rows
from bench.report.verdicts import FASTER, NULL, SLOWER, apply_rule, assess, classify, mde

W = "synthetic-16_unet-tiny"
BUDGET = 400
STEPS = [100, 200, 300, 400]
EXT = [100, 200, 300, 400, 500, 600, 700, 800]  # the baseline, extended to 2x the budget
KW = dict(targets=[0.5], confidence=0.95, n_boot=0, seed=0)


def base_value(step: float, seed: int) -> float:
    """The baseline's curve: linear in log-iterations, so a crossing read on it is exact."""
    return 20.0 - 4.0 * math.log2(step / 100) + seed


def worth(s: float, seed: int) -> float:
    """The value at the budget of a method worth s baseline iterations per iteration."""
    return base_value(s * BUDGET, seed)


def frame(curves: dict, sets: dict | None = None) -> pd.DataFrame:
    """Evaluation rows {label: {seed: {step: value}}}; sets {(label, seed): [per-set values at the budget]}."""
    rows = []
    for label, by_seed in curves.items():
        for seed, points in by_seed.items():
            for step, v in points.items():
                sv = (sets or {}).get((label, seed)) if step == BUDGET else None
                rows.append({"workload": W, "method_label": label, "method": label.split("-")[0], "seed": seed,
                             "step": step, "metric": "proxy_fd", "value": float(np.mean(sv)) if sv else v,
                             "num_gen": 64, "set_values": ",".join(map(repr, sv)) if sv else None})
    return pd.DataFrame(rows)


def baseline(seeds) -> dict:
    return {k: {s: base_value(s, k) for s in EXT} for k in seeds}


def method(speedups: dict) -> dict:
    """A method's curves from its speed-up per seed: its value at the budget is the baseline's at s x budget."""
    return {k: {s: worth(sk, k) + 4.0 * math.log2(BUDGET / s) for s in STEPS} for k, sk in speedups.items()}


SEEDS = range(6)
NULL_EPS = [0.10, -0.10, 0.05, -0.05, 0.08, -0.08]  # mean 0: no effect


def known_outcomes() -> pd.DataFrame:
    jitter = [0.02, -0.02, 0.01, -0.01, 0.0, 0.0]
    return frame({"baseline": baseline(SEEDS),
                  "fast": method({k: 1.5 * math.exp(jitter[k]) for k in SEEDS}),
                  "slow": method({k: 0.7 * math.exp(jitter[k]) for k in SEEDS}),
                  "null": method({k: math.exp(NULL_EPS[k]) for k in SEEDS}),
                  "sat": method({k: 2.5 for k in SEEDS}),  # past the extended baseline's whole curve
                  "placebo": method({k: math.exp(-NULL_EPS[k] / 2) for k in SEEDS})})


def test_verdicts_of_known_outcomes_with_the_null_ones_minimum_detectable_effect():
    evals = known_outcomes()
    labels = ["baseline", "fast", "null", "placebo", "sat", "slow"]
    rows = speedup_rows(evals, "baseline", labels, BUDGET, "proxy_fd", extend=2.0, **KW)
    by = {r["method_label"]: r for r in rows}
    assert classify(by["fast"], True) == (FASTER, "speed-up")
    assert classify(by["slow"], True) == (SLOWER, "speed-up")
    assert classify(by["null"], True) == (NULL, "speed-up")
    # sat is ">= 2x" on every seed: a bound has no test, so its final difference (-4 log2 2.5 on every seed) decides.
    assert by["sat"]["equiv"].lower_bound and classify(by["sat"], True) == (FASTER, "final difference")

    runs = [{"workload": W, "label": "baseline", "status": {"train_seconds": 8.0, "step": 800}, "config": {}}]
    a = assess(W, evals, rows, "baseline", labels, BUDGET, "proxy_fd", 2.0, KW, {"report": {}}, runs)
    assert a.family == 4 and a.rule == "raw"
    # The minimum detectable effect of `null`: its own spread of log s_k, at Holm's strictest level 0.05 / 4.
    d = mde(float(np.std(NULL_EPS, ddof=1)), 6, 0.05 / 4)
    (null_line,) = a.lines[NULL]
    assert f">= {math.exp(d):.2f}x or <= {math.exp(-d):.2f}x (its own spread)" in null_line
    # The saturated cell: each seed's curve extrapolated along its last three evaluations (a line in log-
    # iterations, exact here) needs 2.5x; with the 25% margin, rounded up to a half: 3.5x, 1.5 x 400 = 600 more
    # iterations per seed, 3,600 for 6 seeds, at the runs' measured 0.01 s per iteration: 36 s, "1 min".
    (sat_line,) = a.lines["saturated"]
    assert "extend to 3.5x" in sat_line and "the extrapolated need is 2.50x" in sat_line
    assert "about 600 more baseline iterations per seed, 3,600 for its 6 seeds, about 1 min" in sat_line
    assert "covers 1" in a.lines["control"][0] and "fragile" not in a.lines


def test_minimum_detectable_effect_matches_the_normal_approximation_for_many_seeds():
    """At n = 4000 the noncentral t's answer is the normal one, (z_{1-a/2} + z_power) sd / sqrt(n)."""
    sd, n, alpha = 0.3, 4000, 0.05 / 3
    normal = (stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(0.8)) * sd / math.sqrt(n)
    assert mde(sd, n, alpha) == pytest.approx(normal, rel=2e-3)
    assert mde(sd, 6, alpha) > mde(sd, 12, alpha) > mde(sd, 24, alpha)  # more seeds detect smaller effects
    assert mde(sd, 2, alpha) is None and mde(0.0, 6, alpha) is None


def spiked() -> tuple[pd.DataFrame, dict]:
    """Three seeds of a method worth 1.5x on each; baseline seed 0's evaluation at 300 dips to the method's
    value (an outlier): read raw, that seed's crossing is at 300 (0.75x) and the verdict is "not separated";
    on the monotone fit the dip is pooled with 400, and every seed's crossing is at 600 (1.5x)."""
    seeds = range(3)
    base = baseline(seeds)
    base[0][300] = worth(1.5, 0)
    return frame({"baseline": base, "m": method({k: 1.5 for k in seeds})}), base


def test_the_monotone_rule_is_an_isotonic_fit_of_each_baseline_seed():
    evals, base = spiked()
    fit = apply_rule(evals, "baseline", "monotone")
    seed0 = fit[(fit.method_label == "baseline") & (fit.seed == 0)].sort_values("step").value.to_numpy()
    pooled = (base[0][300] + base[0][400]) / 2  # pool-adjacent-violators by hand: 300 < 400 violates, 500 does not
    assert pooled > base[0][500]
    assert seed0 == pytest.approx([base[0][100], base[0][200], pooled, pooled, base[0][500], base[0][600], base[0][700],
                                   base[0][800]], rel=1e-12)
    assert apply_rule(evals, "baseline", "raw") is evals
    untouched = fit[fit.method_label == "m"].value.to_numpy()
    assert untouched == pytest.approx(evals[evals.method_label == "m"].value.to_numpy(), rel=0)


@pytest.mark.parametrize("rule,main,other", [("raw", NULL, FASTER), ("monotone", FASTER, NULL)])
def test_a_verdict_that_changes_with_the_baseline_curve_rule_is_fragile(rule, main, other):
    evals, _ = spiked()
    labels = ["baseline", "m"]
    rows = speedup_rows(apply_rule(evals, "baseline", rule), "baseline", labels, BUDGET, "proxy_fd", extend=2.0, **KW)
    a = assess(W, evals, rows, "baseline", labels, BUDGET, "proxy_fd", 2.0, KW, {"report": {"baseline_curve": rule}}, [])
    (row,) = a.table
    assert row["verdict"] == main and row["fragile"] == "fragile"
    other_rule = "monotone" if rule == "raw" else "raw"
    assert row[f"with baseline_curve = {other_rule}"] == other
    assert a.lines["fragile"] == [f"m ({main} -> {other} with baseline_curve = {other_rule})"]


def test_a_verdict_that_one_noise_set_flips_is_fragile():
    """Method m is worth 1.5x on every seed on the mean of 3 noise sets; set 1 alone puts seed 0 at 0.75x."""
    seeds = range(3)
    sets = {("m", 0): [worth(0.75, 0)] + [(3 * worth(1.5, 0) - worth(0.75, 0)) / 2] * 2}
    sets.update({("m", k): [worth(1.5, k)] * 3 for k in (1, 2)})
    evals = frame({"baseline": baseline(seeds), "m": method({k: 1.5 for k in seeds})}, sets)
    labels = ["baseline", "m"]
    rows = speedup_rows(evals, "baseline", labels, BUDGET, "proxy_fd", extend=2.0, **KW)
    a = assess(W, evals, rows, "baseline", labels, BUDGET, "proxy_fd", 2.0, KW, {"report": {}}, [])
    (row,) = a.table
    assert a.n_sets == 3 and row["verdict"] == FASTER and row["fragile"] == "fragile"
    assert row["single noise sets"] == f"{NULL}, {FASTER}, {FASTER}"
    assert a.lines["fragile"] == [f"m ({FASTER} -> {NULL} with noise set 1 alone)"]


def test_compare_is_a_paired_difference_adjusted_over_the_pairs_alone():
    evals = known_outcomes()
    labels = ["baseline", "fast", "null", "placebo", "sat", "slow"]
    rows = speedup_rows(evals, "baseline", labels, BUDGET, "proxy_fd", extend=2.0, **KW)
    pairs = [["fast", "null"], ["slow", "null"]]
    out = compare_rows(evals, pairs, rows, BUDGET, "proxy_fd", KW)
    fast_null = out[0]
    # By hand: d_k = fast_k - null_k at the budget, a t-interval over the 6 seeds.
    at = evals[evals.step == BUDGET].pivot_table(index="seed", columns="method_label", values="value")
    d = (at["fast"] - at["null"]).to_numpy()
    half = stats.t.ppf(0.975, 5) * d.std(ddof=1) / math.sqrt(6)
    assert fast_null["final_diff"].mean == pytest.approx(d.mean(), rel=1e-12)
    assert (fast_null["final_diff"].ci_low, fast_null["final_diff"].ci_high) == pytest.approx(
        (d.mean() - half, d.mean() + half), rel=1e-9)
    # The ratio per seed is s_fast,k / s_null,k; Holm over the 2 pairs: the smaller p doubled.
    ratio = np.log(np.array(rows[1]["equiv"].per_seed) / np.array(rows[2]["equiv"].per_seed))
    p = [2 * stats.t.sf(abs(x.mean() / (x.std(ddof=1) / math.sqrt(6))), 5) for x in (ratio, -ratio)]
    p_slow = out[1]["equiv"].p_value
    assert fast_null["equiv_holm"]["p_adj"] == pytest.approx(min(1, 2 * min(p[0], p_slow)), rel=1e-9)
    assert fast_null["equiv_holm"]["m"] == 2  # the comparisons' own family, not the 4 methods against the baseline
    assert fast_null["verdict"] == "fast better" and out[1]["verdict"] == "null better"


# ----------------------------------------------------------------------------------------------
# The report: the verdicts at the top, the clipped flag, REPA's teacher, the comparison table.


def write_run(root: Path, label: str, method_name: str, seed: int, points: dict, clip_every: int = 0,
              extra: dict | None = None, budget_iters: int = 0):
    d = root / W / label / f"seed{seed}"
    d.mkdir(parents=True)
    iters = max(points)
    cfg = {"method": method_name, "dataset": "synthetic", "arch": "unet-tiny", "iters": iters, "batch_size": 8,
           "budget_iters": budget_iters, "lr": 1e-3, "grad_clip": 1.0, "seed": seed, "method_label": label,
           "method_slots": [], "method_resolved_params": {}, **(extra or {})}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "evals.jsonl").write_text("".join(json.dumps({"step": s, "metric": "proxy_fd", "value": v, "num_gen": 64,
                                                       "feature_extractor": "fmnist-cnn-v1-r12"}) + "\n"
                                           for s, v in points.items()))
    (d / "steps.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0, "lr": 1e-3, "lr_scale": 1.0,
                                                       "clipped": bool(clip_every) and s % clip_every == 0}) + "\n"
                                           for s in range(1, min(iters, BUDGET) + 1)))
    (d / "status.json").write_text(json.dumps({"state": "done", "step": iters, "train_seconds": iters / 100}))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("verdicts") / "demo"
    speed = {"fast": 1.5, "slow": 0.7, "repa": 1.0}
    for k in range(3):
        write_run(root, "baseline", "baseline", k, baseline(range(3))[k], clip_every=20, budget_iters=BUDGET)
        for label, s in speed.items():
            jitter = 1 + 0.02 * (k - 1)
            write_run(root, label, label if label == "repa" else "edm", k, method({k: s * jitter})[k],
                      clip_every={"fast": 8, "slow": 10}.get(label, 20))
    (root / "suite.json").write_text(json.dumps({"name": "demo", "report": {
        "metric": "proxy_fd", "baseline": "baseline", "bootstrap": 0, "compare": [["fast", "slow"]]}}))
    return root, build_report(root).read_text()


def test_the_report_opens_with_the_verdicts_and_writes_their_tables(report):
    root, text = report
    assert text.index("## Verdicts") < text.index("## What the numbers are")
    top = text.split("## Verdicts")[1].split("## What the numbers are")[0]
    assert re.search(r"- \*\*faster\*\*: fast \(1\.50x", top) and re.search(r"- \*\*slower\*\*: slow \(0\.70x", top)
    assert "- **not separated**: repa" in top
    assert "compared** (Holm over the 1 comparison, their own family): fast vs slow: fast better" in top
    table = pd.read_csv(root / "tables" / "verdicts.csv")
    assert dict(zip(table.method, table.verdict)) == {"fast": FASTER, "repa": NULL, "slow": SLOWER}
    comp = pd.read_csv(root / "tables" / "compare.csv")
    assert list(comp.a) == ["fast"] and list(comp.b) == ["slow"] and comp.holm_family_size.iloc[0] == 1
    assert "#### Methods compared with each other ([report] compare)" in text


def test_a_clipped_share_above_twice_the_baselines_is_flagged(report):
    """Clipped steps: baseline 1 in 20 (5%), fast 1 in 8 (12.5%: flagged), slow 1 in 10 (10%: exactly twice, not)."""
    root, text = report
    top = text.split("## Verdicts")[1].split("## What the numbers are")[0]
    (line,) = [x for x in top.splitlines() if x.startswith("- **clipped**")]
    assert "fast clipped on 12.5% of steps (baseline 5.0%)" in line and "slow" not in line
    table = pd.read_csv(root / "tables" / "verdicts.csv").fillna("")
    assert dict(zip(table.method, table["flags"]))["fast"].startswith("clipped on 12.5%")


def test_repa_names_its_teacher_and_flags_the_metric_network(report, tmp_path):
    _, text = report
    # A run that recorded no teacher (before methods/repa.py named one) scored by proxy_fd: the metric's network.
    assert ("- **REPA's teacher** (repa): not recorded (a run from before the teacher was): the dataset's proxy "
            "classifier: **teacher = metric network**") in text
    from bench.report.text import repa_lines

    evals = pd.DataFrame({"metric": ["proxy_fd"], "feature_extractor": ["fmnist-cnn-v1-r12"],
                          "weights_sha256": ["aa" * 32]})

    def run(record: dict | None, params: dict) -> list[dict]:
        d = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        if record is not None:
            (d / "method_trace.json").write_text(json.dumps({"aux": {"teacher": record}}))
        return [{"label": "repa", "seed": 0, "dir": d, "config": {"method": "repa", "method_resolved_params": params}}]

    own = {"role": "separate", "name": "fmnist-cnn-v1-r12-teacher", "seed": 1000, "weights_sha256": "bb" * 32}
    assert repa_lines(run(own, {"teacher": "separate"}), evals, "proxy_fd") == [
        f"- **REPA's teacher** (repa): role = separate, name = fmnist-cnn-v1-r12-teacher, seed = 1000, "
        f"weights_sha256 = {'bb' * 32}; not the network of the metric (proxy_fd)"]
    metric_weights = {**own, "role": "separate", "weights_sha256": "aa" * 32}  # the metric's own weights
    metric_role = {**own, "role": "metric"}
    for rec, params in ((metric_weights, {}), (metric_role, {}), (None, {"teacher": "metric"})):
        (line,) = repa_lines(run(rec, params), evals, "proxy_fd")
        assert "**teacher = metric network**" in line, line


# ----------------------------------------------------------------------------------------------
# [report] compare, labels and style at suite load.

SUITE = """
[grid]
methods = ["baseline", {name = "min_snr", gamma = 3}, "p2"]
datasets = ["synthetic"]
archs = ["unet-tiny"]
seeds = [0, 1]

[budget]
iters = 10
batch_size = 4

[eval]
every = 5
metrics = ["proxy_fd"]
num_images = 16

[report]
"""


@pytest.mark.parametrize("line,key,reason", [
    ('compare = [["min_snr", "p2"]]', "report.compare", "'min_snr' is not a method label of the grid"),
    ('compare = [["p2"]]', "report.compare", "must be pairs of two different method labels"),
    ('compare = [["p2", "p2"]]', "report.compare", "must be pairs of two different method labels"),
    ('baseline_curve = "smooth"', "report.baseline_curve", 'must be "raw" or "monotone"'),
    ('labels = { p2 = 3 }', "report.labels", "must map method labels to display names"),
    ('labels = { p3 = "P3" }', "report.labels", "'p3' is not a method label of the grid"),
    ('style = "fancy"', "report.style", 'must be "paper" or "default"'),
])
def test_report_keys_are_checked_at_suite_load(tmp_path, line, key, reason):
    from bench.suite.grid import load_suite
    from bench.suite.schema import SuiteError

    path = tmp_path / "s.toml"
    path.write_text(SUITE + line + "\n")
    with pytest.raises(SuiteError) as info:
        load_suite(path)
    msg = str(info.value)
    assert f"key '{key}'" in msg and reason in msg and "\n" not in msg


def test_report_keys_load_with_their_defaults(tmp_path):
    from bench.suite.grid import load_suite

    path = tmp_path / "s.toml"
    path.write_text(SUITE + 'compare = [["min_snr-gamma3", "p2"]]\nlabels = { p2 = "P2 (ours)" }\n')
    rep = load_suite(path).report
    assert rep["compare"] == [["min_snr-gamma3", "p2"]] and rep["labels"] == {"p2": "P2 (ours)"}
    assert rep["baseline_curve"] == "raw" and rep["style"] == "paper"
