"""The gain's statistics against cases computable by hand: exact McNemar, paired bootstrap, per class."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from spkd.models.results import stats


@pytest.mark.parametrize(
    ("b_only", "a_only", "want"),
    [
        (1, 9, 22 / 1024),  # n = 10: 2 * (C(10,0) + C(10,1)) / 2^10
        (9, 1, 22 / 1024),  # symmetric
        (0, 6, 2 / 64),  # 2 * (1/2)^6
        (5, 5, 1.0),  # 2 * 638/1024 > 1: capped
        (0, 0, 1.0),  # no discordant image: nothing to test
        (3, 12, 2 * (1 + 15 + 105 + 455) / 2**15),  # 0.03515625
    ],
)
def test_mcnemar_exact_by_hand(b_only, a_only, want):
    assert stats.mcnemar_exact(b_only, a_only) == pytest.approx(want, rel=1e-15)


def test_mcnemar_large_counts_stay_exact_and_in_range():
    p = stats.mcnemar_exact(480, 520)
    assert 0.0 < p < 1.0
    # normal approximation with continuity correction is close for n = 1000
    z = (abs(480 - 520) - 1) / math.sqrt(1000)
    assert p == pytest.approx(math.erfc(z / math.sqrt(2)), rel=0.05)
    with pytest.raises(ValueError):
        stats.mcnemar_exact(-1, 3)


def test_bootstrap_degenerate_cases_are_exact():
    n = 50
    right, wrong = np.ones(n, bool), np.zeros(n, bool)
    assert stats.paired_bootstrap_ci(wrong, right) == (100.0, 100.0)
    assert stats.paired_bootstrap_ci(right, wrong) == (-100.0, -100.0)
    mixed = np.arange(n) % 3 == 0
    # paired: identical predictions give exactly zero whatever the resample
    assert stats.paired_bootstrap_ci(mixed, mixed.copy()) == (0.0, 0.0)


def test_bootstrap_interval_width_matches_the_binomial_spread_and_is_seeded():
    n = 400
    a = np.zeros(n, bool)
    b = np.zeros(n, bool)
    b[:40] = True  # B wins 40 images, A none: gain 10 points, per-image diff ~ Bernoulli(0.1)
    low, high = stats.paired_bootstrap_ci(a, b, seed=3)
    se = 100 * math.sqrt(0.1 * 0.9 / n)  # 1.5 points
    assert low == pytest.approx(10 - 1.96 * se, abs=0.6)
    assert high == pytest.approx(10 + 1.96 * se, abs=0.6)
    assert stats.paired_bootstrap_ci(a, b, seed=3) == (low, high)


def test_compare_per_class_confusion_and_verdict():
    labels = [0, 0, 0, 1, 1, 2]
    base = [0, 1, 1, 1, 0, 2]  # right: 0, 3, 5 -> 3/6
    dist = [0, 0, 1, 1, 1, 0]  # right: 0, 1, 3, 4 -> 4/6
    out = stats.compare(labels, base, dist, ["a", "b", "c"], seed=0)
    assert out["n"] == 6
    assert out["gain_points"] == pytest.approx(100 / 6, abs=1e-3)
    assert out["mcnemar"] == {"distilled_only_right": 2, "baseline_only_right": 1, "p_value": 1.0}
    assert out["verdict"] == "no detectable difference"
    assert out["per_class"]["a"] == {
        "n": 3,
        "baseline": 1 / 3,
        "distilled": 2 / 3,
        "gain": pytest.approx(33.3333),
    }
    assert out["per_class"]["c"]["gain"] == pytest.approx(-100.0)
    assert out["confusion"]["baseline"] == [[1, 2, 0], [1, 1, 0], [0, 0, 1]]
    assert out["confusion"]["distilled"] == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]
    low, high = out["ci95_points"]
    assert low <= out["gain_points"] <= high
    json.dumps(out, allow_nan=False)  # strict JSON
    line = stats.summary_line(out)
    assert "+16.7 points" in line and "no detectable difference" in line and "n = 6" in line


def test_verdicts():
    labels = [0] * 30
    assert stats.compare(labels, [1] * 30, [0] * 30, ["x", "y"])["verdict"] == "better"
    assert stats.compare(labels, [0] * 30, [1] * 30, ["x", "y"])["verdict"] == "worse"
    empty_class = stats.compare(labels, [0] * 30, [0] * 30, ["x", "y"])
    assert empty_class["per_class"]["y"] == {"n": 0, "baseline": None, "distilled": None, "gain": None}
    json.dumps(empty_class, allow_nan=False)
