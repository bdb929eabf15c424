"""Speed-up arithmetic (bench/report/speedup.py, bench/report/curves.py) on hand-made curves; every expected value is worked
out by hand in the comments (t quantiles from a printed table, cross-checked with scipy)."""

import json
import math

import numpy as np
import pytest
from scipy import stats

from bench.report.curves import crossing_step, is_geometric, relative_improvement, value_at, values_at_fractions
from bench.report.speedup import (
    PairedDifference,
    PairedSpeedup,
    aa_split,
    lower_is_better,
    paired_difference,
    paired_speedup,
)
from bench.report.stats import format_difference, format_speedup

STEPS = [100, 200, 300, 400]
BASE = [[10, 8, 6, 5],
        [12, 10, 8, 7]]

T2 = 4.302652729749464   # Student t, 97.5% quantile, 2 degrees of freedom (table value)
T3 = 3.182446305284263   # Student t, 97.5% quantile, 3 degrees of freedom

GRID = np.arange(25, 1001, 25, dtype=float)  # linear grid, budget 1000


def linear_runs(rates):
    """Baseline B_k(s) = 10 - s/100 for every seed and method M_k(s) = B_k(rate_k * s).
    Linear curves, so interpolation is exact: at f = 0.5 the target is 5 (at s = 500) and
    M_k reaches it at 500 / rate_k, so s_k = rate_k (when 500 / rate_k <= 1000)."""
    base = np.array([10 - GRID / 100 for _ in rates])
    meth = np.array([10 - r * GRID / 100 for r in rates])
    return base, meth


def test_t_table_values_match_scipy():
    assert stats.t.ppf(0.975, 2) == pytest.approx(T2) and stats.t.ppf(0.975, 3) == pytest.approx(T3)


def test_crossing_interpolates_between_evaluations():
    # First point <= 6 is step 300 (value 5); the point before is (200, 6.5):
    # 200 + (6.5 - 6) / (6.5 - 5) * 100 = 200 + 100/3.
    assert crossing_step(STEPS, [9, 6.5, 5, 4], 6) == pytest.approx(200 + 100 / 3)
    assert crossing_step(STEPS, [9, 6.5, 5, 4], 5) == pytest.approx(300)
    assert crossing_step(STEPS, [3, 2, 1, 1], 6) == 100   # reached at the first evaluation
    assert crossing_step(STEPS, [9, 8, 7, 6.5], 6) is None
    # Higher is better: the first point >= 0.5 is (300, 0.6), before it (200, 0.4): 250.
    assert crossing_step(STEPS, [0.1, 0.4, 0.6, 0.7], 0.5, lower_is_better=False) == pytest.approx(250)


def test_identical_curves_give_exactly_one():
    rng = np.random.default_rng(3)
    base = np.cumsum(rng.uniform(-1.0, -0.1, size=(3, 40)), axis=1) + 50   # a different curve per seed
    for f in (0.5, 0.75, 1.0):
        s = paired_speedup(GRID, base, GRID, base.copy(), budget=1000, fraction=f)
        assert s.per_seed == [1.0, 1.0, 1.0] and s.speedup == 1.0
        if f < 1:
            assert s.interval == "t" and s.ci_low == pytest.approx(1.0) and s.ci_high == pytest.approx(1.0)
        else:  # at f = 1 a reached seed has s_k >= 1 by construction: no interval
            assert s.interval == "one-sided" and s.ci_low is None
        assert s.target == pytest.approx(np.mean([value_at(GRID, b, f * 1000) for b in base]))


def test_equal_up_to_per_seed_shifts_gives_one_with_t_interval_by_hand():
    # Per-seed speeds 1.1, 1/1.1, 1.05, 1/1.05: logs +-a, +-b with a = ln 1.1, b = ln 1.05.
    # Mean log 0 -> speed-up exactly 1. sd = sqrt((2a^2 + 2b^2) / 3); half-width T3 * sd / sqrt(4).
    rates = [1.1, 1 / 1.1, 1.05, 1 / 1.05]
    base, meth = linear_runs(rates)
    s = paired_speedup(GRID, base, GRID, meth, budget=1000, fraction=0.5)
    a, b = math.log(1.1), math.log(1.05)
    half = T3 * math.sqrt((2 * a * a + 2 * b * b) / 3) / 2
    assert s.speedup == pytest.approx(1.0)
    assert s.per_seed == pytest.approx(rates)
    assert s.method_steps == pytest.approx([500 / r for r in rates])
    assert s.baseline_steps == pytest.approx([500] * 4)
    assert s.interval == "t" and s.n_paired == 4 and not s.upper_bound
    assert s.ci_low == pytest.approx(math.exp(-half)) and s.ci_high == pytest.approx(math.exp(half))
    assert s.ci_low < 1 < s.ci_high and s.ci_high - s.ci_low > 0.05


def test_twice_as_fast_in_iterations_gives_exactly_two():
    # B_k is piecewise linear with knots every 200 iterations (so linear interpolation of the
    # 100-step grid is exact); M_k(s) = B_k(2 s) is then linear between multiples of 100: exact too.
    knots = np.arange(0, 2001, 200, dtype=float)
    g = 10 / (1 + np.arange(knots.size))                      # strictly decreasing
    steps = np.arange(100, 1001, 100, dtype=float)
    scale = [(1.0, 0.0), (1.5, 2.0), (0.7, -1.0)]             # a different curve per seed
    base = np.array([c * np.interp(steps, knots, g) + o for c, o in scale])
    meth = np.array([c * np.interp(2 * steps, knots, g) + o for c, o in scale])
    s = paired_speedup(steps, base, steps, meth, budget=1000, fraction=0.5)
    # target_k = B_k(500); B_k first reaches it at 500, M_k at 250: s_k = 2 exactly.
    assert s.baseline_steps == pytest.approx([500] * 3) and s.method_steps == pytest.approx([250] * 3)
    assert s.speedup == pytest.approx(2.0, abs=1e-12)
    assert s.ci_low == pytest.approx(2.0) and s.ci_high == pytest.approx(2.0)
    # F*(0.5) = seed mean of B_k(500) = mean_k (c_k * g(500) + o_k), g(500) = (10/3 + 10/4) / 2.
    g500 = (10 / 3 + 10 / 4) / 2
    assert s.target == pytest.approx(np.mean([c * g500 + o for c, o in scale]))
    assert paired_speedup(steps, base, steps, meth, budget=1000, fraction=1.0).speedup == pytest.approx(2.0)


def test_two_seeds_too_few_for_an_interval():
    base, meth = linear_runs([2.0, 4.0])
    s = paired_speedup(GRID, base, GRID, meth, budget=1000, fraction=0.5)
    assert s.speedup == pytest.approx(math.sqrt(8))           # geometric mean of 2 and 4
    assert s.interval == "too few seeds" and s.ci_low is None and s.ci_high is None
    assert format_speedup(s) == ("2.83x", "too few seeds (n=2)")


def test_three_seeds_t_interval_by_hand():
    # s = 1, 2, 4: logs 0, L, 2L with L = ln 2; mean L (geometric mean 2), sd L,
    # interval exp(L +- T2 * L / sqrt 3) = 2^(1 +- T2 / sqrt 3).
    base, meth = linear_runs([1.0, 2.0, 4.0])
    s = paired_speedup(GRID, base, GRID, meth, budget=1000, fraction=0.5)
    assert s.speedup == pytest.approx(2.0) and s.interval == "t"
    assert s.ci_low == pytest.approx(2 ** (1 - T2 / math.sqrt(3)))    # 0.357
    assert s.ci_high == pytest.approx(2 ** (1 + T2 / math.sqrt(3)))   # 11.19


def test_six_seeds_keep_the_t_interval():
    # Below 20 seeds the percentile bootstrap under-covers, so 6 seeds get the t interval:
    # exp(mean(log s) +- t_5 * sd(log s) / sqrt 6).
    rates = [1.0, 2.0, 4.0, 1.5, 3.0, 1.2]
    base, meth = linear_runs(rates)
    s = paired_speedup(GRID, base, GRID, meth, budget=1000, fraction=0.5, n_boot=3000, seed=7)
    assert s.interval == "t"
    logs = np.log(rates)
    half = stats.t.ppf(0.975, 5) * logs.std(ddof=1) / math.sqrt(6)
    assert s.ci_low == pytest.approx(math.exp(logs.mean() - half))
    assert s.ci_high == pytest.approx(math.exp(logs.mean() + half))


def test_twenty_seeds_use_a_deterministic_paired_bootstrap():
    rates = [1.0, 2.0, 4.0, 1.5, 3.0, 1.2, 1.1, 1.9, 2.5, 1.3] * 2
    base, meth = linear_runs(rates)
    s = paired_speedup(GRID, base, GRID, meth, budget=1000, fraction=0.5, n_boot=3000, seed=7)
    assert s.interval == "bootstrap"
    assert s.speedup == pytest.approx(math.prod(rates) ** (1 / 20))
    # Independent re-computation of the definition: resample the 20 pairs, percentile interval.
    idx = np.random.default_rng(7).integers(0, 20, size=(3000, 20))
    reps = np.exp(np.log(rates)[idx].mean(axis=1))
    assert s.ci_low == pytest.approx(np.quantile(reps, 0.025))
    assert s.ci_high == pytest.approx(np.quantile(reps, 0.975))
    again = paired_speedup(GRID, base, GRID, meth, budget=1000, fraction=0.5, n_boot=3000, seed=7)
    assert (again.ci_low, again.ci_high) == (s.ci_low, s.ci_high)
    other = paired_speedup(GRID, base, GRID, meth, budget=1000, fraction=0.5, n_boot=3000, seed=8)
    assert (other.ci_low, other.ci_high) != (s.ci_low, s.ci_high)


def test_not_reached_seeds_give_a_flagged_upper_bound():
    # Seed 4 would need 500 / 0.4 = 1250 > budget: counted at 1000, s_4 <= 500/1000 = 0.5.
    # Logs L, L, L, -L: geometric mean 2^(2/4) = sqrt 2, an upper bound. No interval: the capped
    # seed's true s_4 may be far lower, which would widen any interval computed from the cap.
    base, meth = linear_runs([2.0, 2.0, 2.0, 0.4])
    s = paired_speedup(GRID, base, GRID, meth, budget=1000, fraction=0.5)
    assert s.upper_bound and s.n_reached == 3 and s.n_paired == 4
    assert s.method_steps[3] is None and s.per_seed[3] is None
    assert s.per_seed[:3] == pytest.approx([2.0] * 3)
    assert s.speedup == pytest.approx(math.sqrt(2))
    assert s.interval == "censored" and s.ci_low is None and s.ci_high is None and not s.lower_bound
    assert format_speedup(s) == ("<= 1.41x", "1 of 4 seeds not reached")


def test_a_method_at_the_target_by_its_first_evaluation_gives_a_lower_bound():
    # Target at f = 0.5 is the baseline's value at 500; a method 40x faster is there by 12.5, before
    # the first evaluation (25): s_k = 500 / 25 = 20 is only a lower bound on 40.
    base, meth = linear_runs([40.0, 40.0, 40.0])
    s = paired_speedup(GRID, base, GRID, meth, budget=1000, fraction=0.5)
    assert s.lower_bound and s.n_first == 3 and not s.upper_bound and s.interval == "censored"
    assert s.speedup == pytest.approx(500 / GRID[0]) and s.ci_low is None
    assert format_speedup(s) == (f">= {500 / GRID[0]:.2f}x", "3 of 3 seeds at the target by their first evaluation")
    base, meth = linear_runs([40.0, 0.4])
    mixed = paired_speedup(GRID, base, GRID, meth, budget=1000, fraction=0.5)
    assert mixed.lower_bound and mixed.upper_bound and format_speedup(mixed)[0].startswith("~")


def test_no_seed_reached_is_still_a_flagged_bound():
    base, meth = linear_runs([0.4, 0.4, 0.4])
    s = paired_speedup(GRID, base, GRID, meth, budget=1000, fraction=0.5)
    assert s.n_reached == 0 and s.upper_bound
    assert s.speedup == pytest.approx(0.5)                     # 500 / budget for every seed
    assert s.method_steps == [None, None, None]
    assert format_speedup(s) == ("not reached (<= 0.50x)", "3 of 3 seeds not reached")


def test_not_reached_counts_the_last_evaluation_when_a_curve_stops_early():
    # Seed 2's method curve stops at 800 (NaN after) without reaching 5: it may still reach it
    # between 800 and 1000, so the bound uses 800: s_2 <= 500 / 800.
    base, meth = linear_runs([2.0, 0.4])
    meth[1, GRID > 800] = np.nan
    s = paired_speedup(GRID, base, GRID, meth, budget=1000, fraction=0.5)
    assert s.upper_bound and s.n_reached == 1
    assert s.speedup == pytest.approx(math.sqrt(2 * 500 / 800))


def test_seeds_without_data_are_dropped_and_ids_kept():
    base, meth = linear_runs([2.0, 4.0, 1.0, 2.0])
    meth[1] = np.nan                         # no method point: dropped
    base[3, GRID <= 500] = np.nan            # baseline starts after f * budget: target undefined
    s = paired_speedup(GRID, base, GRID, meth, budget=1000, fraction=0.5, seeds=[11, 12, 13, 14])
    assert s.seeds == [11, 13] and s.n_dropped == 2 and s.n_paired == 2
    assert s.per_seed == pytest.approx([2.0, 1.0])
    empty = paired_speedup(GRID, base[:2] * np.nan, GRID, meth[:2], budget=1000)
    assert empty.speedup is None and empty.interval == "no data" and empty.n_dropped == 2
    assert format_speedup(empty) == ("no data", "")


def test_budget_and_higher_is_better():
    # A better baseline point after the budget does not count: target at f = 1 is B(400).
    steps = STEPS + [500]
    base = [row + [1] for row in BASE]
    meth = [[9, 6, 5, 4, 0], [9, 7, 5, 4, 0]]
    s = paired_speedup(steps, base, steps, meth, budget=400)
    # targets 5 and 7; method seed 1 reaches 5 at 300, seed 2 reaches 7 at 200: s = 400/300, 400/200.
    assert s.target == pytest.approx(6) and s.per_seed == pytest.approx([4 / 3, 2.0])
    # Higher is better: the same curves negated give the same speed-ups and the target in units.
    neg = paired_speedup(steps, -np.array(base, float), steps, -np.array(meth, float), budget=400,
                         lower_is_better=False)
    assert neg.target == pytest.approx(-6) and neg.per_seed == pytest.approx([4 / 3, 2.0])
    assert lower_is_better("fid") and lower_is_better("proxy_fd") and not lower_is_better("inception_score")


def test_geometric_grid_interpolates_in_log_iterations():
    steps = [100, 200, 400, 800]
    base = [[4, 3, 2, 1]]
    meth = [[3, 2, 0.5, 0]]
    # f = 1: target 1, reached by B at 800. M crosses 1 at 2/3 of the way from (200, 2) to
    # (400, 0.5): log interpolation 200 * 2^(2/3) = 317.48 (linear would give 333.33).
    s = paired_speedup(steps, base, steps, meth, budget=800)
    assert s.method_steps[0] == pytest.approx(200 * 2 ** (2 / 3))
    assert s.speedup == pytest.approx(2 ** (4 / 3))           # 800 / (200 * 2^(2/3)) = 2.52
    # The same method values on a linear grid: linear interpolation, 200 + 2/3 * 200; 800 / 333.3 = 2.4.
    lin = paired_speedup(steps, base, [100, 200, 400, 600, 800], [[3, 2, 0.5, 0.2, 0]], budget=800)
    assert lin.method_steps[0] == pytest.approx(1000 / 3) and lin.speedup == pytest.approx(2.4)
    # f = 0.75: target = B(600) linearly = 1.5; B crosses 1.5 halfway from (400, 2) to (800, 1)
    # in log-iterations: 400 * sqrt 2 = 565.7 (before 600: the log curve lies below the chord).
    s75 = paired_speedup(steps, base, steps, meth, budget=800, fraction=0.75)
    assert s75.target == pytest.approx(1.5) and s75.baseline_steps[0] == pytest.approx(400 * math.sqrt(2))
    # A grid that is almost geometric (last ratio 2.00025, not 2 within 1e-6): linear, 333.33.
    almost = [100, 200, 400, 800.1]
    lin2 = paired_speedup(almost, base, almost, meth, budget=800.1)
    assert lin2.method_steps[0] == pytest.approx(1000 / 3)
    # Fewer than 3 points, or a constant ratio not above 1.0001: not geometric.
    assert is_geometric(np.array([100.0, 200.0, 400.0]))
    assert not is_geometric(np.array([100.0, 200.0]))
    assert not is_geometric(1000 * 1.00005 ** np.arange(5.0))
    assert is_geometric(1000 * 1.0002 ** np.arange(5.0))


def test_aa_split_and_identical_halves():
    assert aa_split(4) == ([0, 1], [2, 3])
    assert aa_split(5) == ([0, 1], [3, 4])                    # the middle seed 2 is left out
    h1, h2 = aa_split(7)
    assert not set(h1) & set(h2) and len(h1) == len(h2) == 3
    rng = np.random.default_rng(0)
    half = np.cumsum(rng.uniform(-1.0, -0.1, size=(2, 40)), axis=1) + 50
    base = np.vstack([half, half])                            # seeds 2, 3 repeat seeds 0, 1
    h1, h2 = aa_split(4)
    s = paired_speedup(GRID, base[h1], GRID, base[h2], budget=1000, fraction=0.5)
    assert s.speedup == 1.0 and s.interval == "too few seeds"  # 2 pairs: the honest answer
    d = paired_difference(GRID, base[h1], GRID, base[h2], budget=1000)
    assert d.mean == 0.0 and d.interval == "too few seeds"


def test_baseline_row():
    base, _ = linear_runs([1, 1, 1])
    b = paired_speedup(GRID, base, GRID, base, budget=1000, fraction=0.5, is_baseline=True)
    assert b.speedup == 1.0 and b.ci_low is None and b.interval == "none"
    assert b.baseline_steps == b.method_steps == pytest.approx([500] * 3)
    assert format_speedup(b) == ("1 (reference)", "")


def test_paired_difference_by_hand():
    base = [[10, 8, 6, 5], [12, 10, 8, 7], [11, 9, 7, 6]]
    meth = [[9, 6, 5, 4], [9, 7, 5, 4.5], [9, 7, 6, 6]]
    # d = 4 - 5, 4.5 - 7, 6 - 6 = -1, -2.5, 0: mean -3.5/3 = -7/6; deviations 1/6, -4/3, 7/6:
    # sum of squares (1 + 64 + 49) / 36 = 114/36, var 57/36, sd sqrt(57)/6; half T2 * sd / sqrt 3.
    d = paired_difference(STEPS, base, STEPS, meth, budget=400)
    half = T2 * math.sqrt(57) / 6 / math.sqrt(3)
    assert d.per_seed == pytest.approx([-1, -2.5, 0]) and d.mean == pytest.approx(-7 / 6)
    assert d.ci_low == pytest.approx(-7 / 6 - half) and d.ci_high == pytest.approx(-7 / 6 + half)
    assert d.relative_mean == pytest.approx((-1 / 5 - 2.5 / 7 + 0) / 3)
    assert d.interval == "t" and d.n == 3 and d.step == 400
    assert format_difference(d, 3) == f"-1.17 [{-7 / 6 - half:.3g}, {-7 / 6 + half:.3g}]"
    # Method grid stops at 300: both compared at 300 (the last complete point within the budget
    # of both groups); the baseline is NaN for seed 1 at 400, which removes 400 for every seed.
    two = paired_difference(STEPS, [[10, 8, 6, np.nan], [12, 10, 8, 7]], [100, 300], [[9, 5], [9, 5]],
                            budget=400)
    assert two.step == 300 and two.per_seed == pytest.approx([-1, -3]) and two.interval == "too few seeds"
    assert two.ci_low is None and format_difference(two) == "-2 (too few seeds)"
    # Different grids: the method's last point is 350, the baseline is interpolated there.
    mid = paired_difference(STEPS, [[10, 8, 6, 5]], [350], [[4]], budget=400)
    assert mid.step == 350 and mid.per_seed == pytest.approx([4 - 5.5])


def test_relative_improvement_by_hand():
    steps = [100, 200, 300, 400, 500]
    vals = [[10, 8, 6, 5, 4], [12, 10, 8, 7, 6]]             # seed mean 11, 9, 7, 6, 5
    # last 20% of 500: from 400 (mean 6) to 500 (mean 5): (6 - 5) / 6.
    assert relative_improvement(steps, vals, 500) == pytest.approx(1 / 6)
    # last 30%: from 350 (mean 6.5) to 500: 1.5 / 6.5.
    assert relative_improvement(steps, vals, 500, last=0.3) == pytest.approx(1.5 / 6.5)
    # higher is better: (end - start) / |start|: (5 - 6) / 6 for the same curve (it got worse).
    assert relative_improvement(steps, vals, 500, lower_is_better=False) == pytest.approx(-1 / 6)
    # curve stops at 300 < 0.8 * 500: not covered.
    assert relative_improvement(steps[:3], [v[:3] for v in vals], 500) is None


def test_format_strings():
    base = dict(fraction=1.0, target=5.0, seeds=[0, 1, 2, 3], per_seed=[1.0] * 4, n_paired=4, n_reached=4,
                n_dropped=0, confidence=0.95, baseline_steps=[1.0] * 4, method_steps=[1.0] * 4, upper_bound=False)
    s = PairedSpeedup(speedup=1.1612, ci_low=1.0499, ci_high=1.2801, interval="t", **base)
    assert format_speedup(s) == ("1.16x", "[1.05, 1.28] (t, n=4)")
    s = PairedSpeedup(speedup=0.8123, ci_low=0.5, ci_high=1.3, interval="t", **(base | dict(
        upper_bound=True, n_reached=1)))
    assert format_speedup(s) == ("not reached (<= 0.81x)", "3 of 4 seeds not reached")
    s = PairedSpeedup(speedup=0.95, ci_low=None, ci_high=None, interval="censored", **(base | dict(
        upper_bound=True, n_reached=3)))
    assert format_speedup(s) == ("<= 0.95x", "1 of 4 seeds not reached")
    s1 = PairedSpeedup(speedup=1.1, ci_low=None, ci_high=None, interval="one-sided", **base)
    assert format_speedup(s1) == ("1.10x", "one-sided at f = 1, no interval")
    d = PairedDifference(mean=-2.3101, ci_low=-3.9, ci_high=-0.7, relative_mean=-0.1, n=4, interval="t",
                         confidence=0.95, per_seed=[])
    assert format_difference(d) == "-2.31 [-3.9, -0.7]"
    assert format_difference(PairedDifference(mean=None, ci_low=None, ci_high=None, relative_mean=None, n=0,
                                               interval="no data", confidence=0.95, per_seed=[])) == "no data"
    assert json.loads(json.dumps(s.as_dict()))["speedup"] == 0.95           # JSON-ready
    assert json.loads(json.dumps(d.as_dict()))["mean"] == -2.3101


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
    assert math.isnan(value_at(STEPS, [11, 9, 7, 6], 450))         # NaN after the last


def test_inputs_are_checked():
    with pytest.raises(ValueError, match=r"^steps has shape \(2,\) but values has shape \(1, 3\); values must be "):
        paired_speedup([1, 2], [[1, 2, 3]], [1, 2], [[1, 2]], budget=2)
    with pytest.raises(ValueError, match=r"^evaluation steps must be strictly increasing$"):
        paired_speedup([2, 1], [[1, 2]], [1, 2], [[1, 2]], budget=2)
    with pytest.raises(ValueError, match=r"^paired seeds: baseline has 2 seeds, method 1$"):  # not the same seeds
        paired_speedup([1, 2], [[1, 2], [1, 2]], [1, 2], [[1, 2]], budget=2)
    with pytest.raises(ValueError, match=r"^fraction must be in \(0, 1\], got 0$"):
        paired_speedup([1, 2], [[1, 2]], [1, 2], [[1, 2]], budget=2, fraction=0)
    assert np.isnan(value_at([], [], 1))
