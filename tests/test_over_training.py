"""Speed-up over training (bench/report/over_training.py) against a hand computation, the censored
cells' flags and their resolving extension (bench/report/censoring.py), and the replicates' check
(bench/suite/replicates.py). Synthetic evaluations: no training, no torch."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bench.report.censoring import censored_cells, censoring_lines, needed_step
from bench.report.over_training import over_training_lines, speedup_over_training
from bench.suite.replicates import replicate_lines, shared_seeds

W = "synthetic-16_unet-micro"
BUDGET = 400
B_STEPS = [100, 200, 300, 400, 500, 600, 700, 800]  # the baseline extended to 2x the budget
M_STEPS = [100, 200, 300, 400]
A = {0: 30.0, 1: 31.0, 2: 29.5, 3: 30.5}           # per-seed offsets of the baseline's curve
SLOPE = 4.0


def baseline_curve(seed: int, n: float) -> float:
    """Exactly linear in log-iterations, the speed-up's own interpolation: crossings are exact."""
    return A[seed] - SLOPE * math.log(n)


def evals(methods: dict[str, dict[int, float]]) -> pd.DataFrame:
    """The baseline, and each method m whose seed k is the baseline's seed k at c_k x the iterations."""
    rows = [{"workload": W, "metric": "proxy_fd", "method_label": "baseline", "method": "baseline", "seed": k,
             "step": s, "value": baseline_curve(k, s)} for k in A for s in B_STEPS]
    rows += [{"workload": W, "metric": "proxy_fd", "method_label": m, "method": m, "seed": k, "step": s,
              "value": baseline_curve(k, c[k] * s)} for m, c in methods.items() for k in A for s in M_STEPS]
    return pd.DataFrame(rows)


FAST = {0: 1.5, 1: 1.8, 2: 1.2, 3: 1.6}   # per-seed speed-ups, within the extended baseline at every N'
FAR = {0: 3.0, 1: 3.0, 2: 3.0, 3: 3.0}    # 3x: beyond the baseline's 800 iterations once N' > 266


def test_speed_up_at_every_step_matches_a_hand_computation():
    t = speedup_over_training(evals({"fast": FAST}), W, "proxy_fd", "baseline", ["fast"], BUDGET, confidence=0.95)
    assert list(t.step) == M_STEPS
    logs = np.log(list(FAST.values()))
    n = len(logs)
    half = stats.t.ppf(0.975, n - 1) * logs.std(ddof=1) / math.sqrt(n)
    # float64 log-interpolation of values ~30 built from logs: relative error ~1e-15 x a few terms
    for _, row in t.iterrows():
        assert row.speedup == pytest.approx(math.exp(logs.mean()), rel=1e-9)
        assert (row.ci_low, row.ci_high) == pytest.approx((math.exp(logs.mean() - half), math.exp(logs.mean() + half)),
                                                          rel=1e-9)
        assert row.bound == "" and row.interval == "t" and row.n_paired == 4


def test_beyond_the_extended_baseline_is_a_bound_not_a_value():
    t = speedup_over_training(evals({"far": FAR}), W, "proxy_fd", "baseline", ["far"], BUDGET).set_index("step")
    assert t.loc[100].speedup == pytest.approx(3.0, rel=1e-9) and t.loc[200].speedup == pytest.approx(3.0, rel=1e-9)
    for step in (300, 400):  # needs 900 and 1200 > 800 baseline iterations
        assert t.loc[step].bound == ">=" and t.loc[step].speedup == pytest.approx(800 / step)
        assert math.isnan(t.loc[step].ci_low) and t.loc[step].n_beyond == 4


def test_budget_dependent_methods_are_marked_and_left_out(tmp_path):
    info = {"methods": [{"label": "baseline", "budget_dependent": False}, {"label": "fast", "budget_dependent": False},
                        {"label": "clts", "budget_dependent": True}, {"label": "old"}]}
    ev = evals({"fast": FAST, "clts": FAST, "old": FAST})
    lines = over_training_lines(ev, info, "baseline", "proxy_fd", {W: BUDGET}, ["baseline", "fast", "clts", "old"],
                                tmp_path / "tables", tmp_path / "figures", {"confidence": 0.95})
    table = pd.read_csv(tmp_path / "tables" / "over_training.csv")
    assert set(table.method_label) == {"fast"}
    text = "\n".join(lines)
    assert "depends on the budget" in text and "`clts`" in text and "not recorded" in text and "`old`" in text
    assert (tmp_path / "figures" / f"over_training_{W}_proxy_fd.png").is_file()


def test_censored_cells_name_their_extension_and_what_resolves_it():
    cells = censored_cells(evals({"fast": FAST, "far": FAR}), "proxy_fd", "baseline", ["baseline", "fast", "far"],
                           {W: BUDGET}, {W: 2.0})
    by = {c["method_label"]: c for c in cells}
    assert by["fast"]["bound"] == "" and by["far"]["bound"] == ">="
    # the baseline's curve is log-linear, so extending its last two evaluations is exact: 3 x 400
    assert by["far"]["last_step"] == 800 and by["far"]["needed_step"] == pytest.approx(1200, rel=1e-9)
    lines = censoring_lines(cells)
    assert lines[0] == "censored: 1 of 2 headline cells are bounds"
    far = next(line for line in lines if "`far`" in line)
    assert "baseline_extend = 2` stopped at step 800" in far and "`baseline_extend` >= 3" in far and "+400" in far


def test_no_censored_cell_says_so():
    lines = censoring_lines(censored_cells(evals({"fast": FAST}), "proxy_fd", "baseline", ["fast"], {W: BUDGET},
                                           {W: 2.0}))
    assert lines[0] == "censored: 0 of 1 headline cells are bounds"


def test_a_flat_baseline_gives_no_extension_estimate():
    steps = np.array([100.0, 200.0, 400.0])
    assert needed_step(steps, np.array([5.0, 4.0, 4.0]), 3.0) is None
    assert needed_step(steps, np.array([5.0, 4.0, 3.0]), 2.0) == pytest.approx(800.0)


SUITE = """[suite]
name = "{name}"
[grid]
methods = ["baseline"]
datasets = [{{ name = "fashion-mnist", resolution = {res} }}]
archs = ["unet-micro"]
seeds = {seeds}
"""


def test_shared_seeds_are_named_and_only_none_is_beyond_this_run(tmp_path):
    (tmp_path / "old.toml").write_text(SUITE.format(name="old", res=12, seeds=[0, 1, 2]))
    (tmp_path / "other-res.toml").write_text(SUITE.format(name="other-res", res=16, seeds=[5]))
    (tmp_path / "tuning-seeds.toml").write_text(SUITE.format(name="tuning-seeds", res=12, seeds=[9]) + "[tune]\nseeds = [5]\n")
    w = [{"name": "fashion-mnist-12_unet-micro", "dataset": "fashion-mnist", "resolution": 12, "arch": "unet-micro"}]
    assert shared_seeds("new", w, [2, 5, 7], tmp_path) == [("old", w[0]["name"], [2]), ("tuning-seeds", w[0]["name"], [5])]
    shared = " ".join(replicate_lines("new", w, [2, 5, 7], tmp_path))
    assert "`old`" in shared and "`tuning-seeds`" in shared and "beyond this run" not in shared
    alone = " ".join(replicate_lines("new", w, [7, 8], tmp_path))
    assert "supported beyond this run" in alone and "7, 8" in alone
    assert shared_seeds("old", w, [0, 1], tmp_path) == []  # a suite is not its own replicate
