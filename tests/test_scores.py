"""AlgoPerf-style scores across workloads (METHODS.md, "Scoring across workloads") on hand-worked tables."""

import math

import pandas as pd
import pytest

from bench.report.scores import performance_ratios, profiles, scores, times_to_target

INF = math.inf
# Three methods on three workloads. Best per workload: w1 B (0.5), w2 A and B tied (0.5), w3 B (1.0).
TIMES = pd.DataFrame({"w1": [1.0, 0.5, 2.5], "w2": [0.5, 0.5, 1.0], "w3": [INF, 1.0, 2.0]}, index=["A", "B", "C"])


def test_ratios_by_hand_with_a_tie_an_infinite_entry_and_the_cap():
    r = performance_ratios(TIMES)
    assert r.loc["A"].tolist() == [2.0, 1.0, INF]  # not reached on w3: infinite
    assert r.loc["B"].tolist() == [1.0, 1.0, 1.0]  # the tie on w2: both at 1
    assert r.loc["C"].tolist() == [INF, 2.0, 2.0]  # 2.5 / 0.5 = 5 > 4: counts as infinite


def test_profiles_and_scores_by_hand():
    tau, rho = profiles(performance_ratios(TIMES))
    assert tau[0] == 1.0 and tau[-1] == 4.0 and len(tau) == 100
    at = {x: i for i, x in enumerate(tau)}
    first, last = at[tau[0]], at[tau[-1]]
    assert rho["A"].iloc[first] == pytest.approx(1 / 3) and rho["A"].iloc[last] == pytest.approx(2 / 3)
    assert rho["B"].eq(1.0).all()
    assert rho["C"].iloc[first] == 0 and rho["C"].iloc[last] == pytest.approx(2 / 3)
    s = scores(performance_ratios(TIMES))
    # Areas under the step profiles over [1, 4] divided by 3: A = (1/3 x 1 + 2/3 x 2) / 3 = 5/9,
    # B = 1, C = (2/3 x 2) / 3 = 4/9. The trapezoid rule on 100 points (tau = 2 is the 34th) counts a
    # step's interval [tau_32, tau_33 = 2] at the mean of its ends: + jump / 2 x (3/99) / 3.
    assert s["B"] == pytest.approx(1.0)
    assert float(s["A"]) == pytest.approx(5 / 9 + (1 / 3) / 2 * (3 / 99) / 3, rel=1e-9)
    assert float(s["C"]) == pytest.approx(4 / 9 + (2 / 3) / 2 * (3 / 99) / 3, rel=1e-9)
    assert list(s.index) == ["B", "A", "C"]


def test_a_workload_no_method_reached_counts_for_no_one():
    r = performance_ratios(pd.DataFrame({"w1": [1.0, 2.0], "w2": [INF, INF]}, index=["A", "B"]))
    assert r["w2"].tolist() == [INF, INF]
    s = scores(r)  # w2 counts as infinite for both: A's profile is 1/2; B (ratio 2 on w1) 0 until tau = 2
    assert float(s["A"]) == pytest.approx(0.5) and float(s["B"]) == pytest.approx(0.5 * 2 / 3 + 0.5 / 2 * (3 / 99) / 3)


def test_times_from_the_speedup_table():
    """1 / speed-up; '>= x' at its bound; '<= x' (never reached) and a missing workload infinite; controls out."""
    rows = [
        dict(method_label="baseline", workload="w1", speedup=1.0, upper_bound=False, lower_bound=False),
        dict(method_label="fast", workload="w1", speedup=2.0, upper_bound=False, lower_bound=True),
        dict(method_label="slow", workload="w1", speedup=0.25, upper_bound=True, lower_bound=False),
        dict(method_label="placebo", workload="w1", speedup=1.1, upper_bound=False, lower_bound=False, is_control=True),
        dict(method_label="baseline", workload="w2", speedup=1.0, upper_bound=False, lower_bound=False),
        dict(method_label="slow", workload="w2", speedup=0.8, upper_bound=False, lower_bound=False),
    ]
    frame = pd.DataFrame([{"is_control": False, "statistic": "baseline_equivalent", "metric": "m", **r} for r in rows]
                         + [{"is_control": False, "statistic": "early_rate", "metric": "m", "method_label": "fast",
                             "workload": "w2", "speedup": 9.0, "upper_bound": False, "lower_bound": False}])
    t = times_to_target(frame, "m")
    assert list(t.index) == ["baseline", "fast", "slow"] and list(t.columns) == ["w1", "w2"]
    assert t.loc["fast"].tolist() == [0.5, INF]  # no headline row on w2 (its early rate does not count)
    assert t.loc["slow"].tolist() == [INF, 1.25]
    assert t.loc["baseline"].tolist() == [1.0, 1.0]
