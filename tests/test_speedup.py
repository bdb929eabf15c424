"""Speed-up arithmetic (bench/speedup.py) on hand-made curves; every expected value is worked
out by hand in the comments."""

import math

import numpy as np
import pytest

from bench.speedup import compute_speedup, crossing_step, lower_is_better, value_at, values_at_fractions

STEPS = [100, 200, 300, 400]
# Baseline seeds A and B; seed mean [11, 9, 7, 6]: F* = 6, first reached at step 400.
BASE = [[10, 8, 6, 5],
        [12, 10, 8, 7]]
# Method seeds A and B; seed mean [9, 6.5, 5, 4].
METHOD = [[9, 6, 5, 4],
          [9, 7, 5, 4]]


def test_crossing_interpolates_between_evaluations():
    # First point <= 6 is step 300 (value 5); the point before is (200, 6.5):
    # 200 + (6.5 - 6) / (6.5 - 5) * 100 = 200 + 100/3.
    assert crossing_step(STEPS, [9, 6.5, 5, 4], 6) == pytest.approx(200 + 100 / 3)
    # Exactly on an evaluation: that evaluation's step.
    assert crossing_step(STEPS, [9, 6.5, 5, 4], 5) == pytest.approx(300)
    # Already reached at the first evaluation: no earlier point to interpolate from.
    assert crossing_step(STEPS, [3, 2, 1, 1], 6) == 100
    # Never reached.
    assert crossing_step(STEPS, [9, 8, 7, 6.5], 6) is None
    # Higher is better: the first point >= 0.5 is (300, 0.6), before it (200, 0.4): 250.
    assert crossing_step(STEPS, [0.1, 0.4, 0.6, 0.7], 0.5, lower_is_better=False) == pytest.approx(250)


def test_speedup_point_estimate_and_bootstrap_interval_by_hand():
    s = compute_speedup(STEPS, BASE, STEPS, METHOD, budget=400, n_boot=4000, seed=0)
    assert s.target == pytest.approx(6.0)
    assert s.baseline_steps == pytest.approx(400)
    assert s.method_steps == pytest.approx(700 / 3)          # 233.33
    assert s.speedup == pytest.approx(400 / (700 / 3))        # 12/7 = 1.714
    assert s.method_best == pytest.approx(4.0) and s.method_final == pytest.approx(4.0)
    # Bootstrap by hand. Resampling 2 seeds gives the seed sets AA, AB, BB (prob 1/4, 1/2, 1/4).
    # Baseline: AA -> F* 5, AB -> 6, BB -> 7, always first reached at 400 (monotone curves).
    # Method curves: AA [9,6,5,4], AB [9,6.5,5,4], BB [9,7,5,4]. Crossings and ratios 400 / x:
    #   F* 5: 300, 300, 300          -> 4/3 for every method resample (total prob 1/4)
    #   F* 6: 200, 233.3, 250        -> 2, 1.714, 1.6
    #   F* 7: 166.7, 180, 200        -> 2.4, 2.222, 2
    # Smallest ratio 4/3 holds 25% of the mass and the largest, 2.4 (baseline BB with method AA),
    # 1/16 = 6.25% of it, both more than 2.5%: the 95% interval is exactly [4/3, 2.4].
    assert s.ci_low == pytest.approx(4 / 3)
    assert s.ci_high == pytest.approx(2.4)
    assert s.reached_fraction == 1.0
    # Fixed RNG: the same numbers again.
    again = compute_speedup(STEPS, BASE, STEPS, METHOD, budget=400, n_boot=4000, seed=0)
    assert (again.ci_low, again.ci_high) == (s.ci_low, s.ci_high)


def test_not_reached_is_never_a_number():
    slow = [[20, 15, 12, 11], [20, 15, 12, 11]]
    s = compute_speedup(STEPS, BASE, STEPS, slow, n_boot=500)
    assert s.speedup is None and s.method_steps is None and not s.reached
    # Every resample misses F* too: the interval is [0, 0] ("not reached" in the report).
    assert s.reached_fraction == 0.0
    assert s.ci_low == 0.0 and s.ci_high == 0.0


def test_partly_reached_interval_keeps_misses_as_zero():
    # Method seeds [7,6,6,6] and [7,7,7,7]: mean [7, 6.5, 6.5, 6.5] never reaches F* = 6
    # (not reached), but resamples AA of the method reach F*=6 (at 200: ratio 2) and F*=7.
    m = [[7, 6, 6, 6], [7, 7, 7, 7]]
    s = compute_speedup(STEPS, BASE, STEPS, m, n_boot=4000, seed=1)
    assert s.speedup is None
    assert 0 < s.reached_fraction < 1
    assert s.ci_low == 0.0  # misses count as 0, not dropped
    # Largest ratio: baseline BB (F* 7) and any method resample: reached at the first point, 400/100.
    assert s.ci_high == pytest.approx(4.0)


def test_first_evaluation_already_better_and_baseline_row():
    fast = [[5, 4, 3, 2], [5, 4, 3, 2]]
    s = compute_speedup(STEPS, BASE, STEPS, fast, n_boot=0)
    assert s.method_steps == 100 and s.speedup == pytest.approx(4.0)
    assert s.ci_low is None  # no bootstrap asked
    b = compute_speedup(STEPS, BASE, STEPS, BASE, is_baseline=True)
    assert b.speedup == 1.0 and b.method_steps == 400 and b.ci_low is None


def test_budget_and_missing_points():
    # A better baseline point after the budget does not count: F* stays 6 (at 400), not 1.
    steps = STEPS + [500]
    base = [row + [1] for row in BASE]
    s = compute_speedup(steps, base, STEPS, METHOD, budget=400, n_boot=0)
    assert s.target == pytest.approx(6) and s.baseline_steps == 400
    # A point where one seed has no value is dropped for every seed (seed-mean curve):
    # method mean without step 300 is [9, 6.5, -, 4]: crossing of 6 between (200, 6.5) and
    # (400, 4): 200 + 0.5 / 2.5 * 200 = 240.
    m = [[9, 6, 5, 4], [9, 7, float("nan"), 4]]
    s = compute_speedup(STEPS, BASE, STEPS, m, n_boot=0)
    assert s.method_steps == pytest.approx(240)
    assert s.speedup == pytest.approx(400 / 240)


def test_higher_is_better_metric():
    steps = [1, 2, 3, 4]
    base = [[0.1, 0.2, 0.3, 0.4]]
    meth = [[0.2, 0.4, 0.5, 0.5]]
    # F* = 0.4 at step 4; method reaches 0.4 at step 2: speed-up 2.
    s = compute_speedup(steps, base, steps, meth, lower_is_better=False, n_boot=10)
    assert s.target == pytest.approx(0.4) and s.speedup == pytest.approx(2.0)
    assert s.method_best == pytest.approx(0.5)
    assert lower_is_better("fid") and lower_is_better("proxy_fd") and not lower_is_better("inception_score")


def test_metric_at_fractions_of_the_budget():
    rows = values_at_fractions(STEPS, BASE, 400, fractions=(0.1, 0.25, 0.5, 0.625, 1.0))
    by = {r["fraction"]: r for r in rows}
    assert math.isnan(by[0.1]["mean"]) and by[0.1]["n_seeds"] == 0   # before the first evaluation
    assert by[0.25]["mean"] == pytest.approx(11)
    assert by[0.5]["mean"] == pytest.approx(9)
    assert by[0.5]["std"] == pytest.approx(math.sqrt(2))           # seeds 8 and 10, ddof 1
    assert by[0.625]["mean"] == pytest.approx(8)                   # halfway between 9 and 7
    assert by[0.625]["step"] == pytest.approx(250)
    assert by[1.0]["mean"] == pytest.approx(6)
    assert value_at(STEPS, [11, 9, 7, 6], 450) != value_at(STEPS, [11, 9, 7, 6], 450)  # NaN after the last


def test_shapes_are_checked():
    with pytest.raises(ValueError):
        compute_speedup([1, 2], [[1, 2, 3]], [1, 2], [[1, 2]])
    with pytest.raises(ValueError):
        compute_speedup([2, 1], [[1, 2]], [1, 2], [[1, 2]])
    assert np.isnan(value_at([], [], 1))
