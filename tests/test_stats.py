"""Intervals and paired tests (ctx_callback.stats) against known binomial cases and hand-computed tables."""

from __future__ import annotations

import math
from math import comb

import numpy as np
import pytest

from ctx_callback.stats import (
    McNemarResult,
    mcnemar_exact,
    mean_interval,
    proportion_standard_error,
    sign_test,
    standard_error,
    wilson_interval,
)

Z95 = 1.959963984540054  # the 97.5% standard normal quantile


def wilson_by_hand(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's closed form (Wilson 1927), written out independently of scipy."""
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return center - half, center + half


@pytest.mark.parametrize("k,n", [(0, 10), (10, 10), (8, 10), (81, 90), (45, 90), (380, 400), (1, 1)])
def test_wilson_interval_equals_the_closed_form(k, n):
    low, high = wilson_interval(k, n)
    exp_low, exp_high = wilson_by_hand(k, n)
    assert low == pytest.approx(max(0.0, exp_low), abs=1e-12)
    assert high == pytest.approx(min(1.0, exp_high), abs=1e-12)
    assert 0.0 <= low <= k / n <= high <= 1.0


def test_wilson_interval_known_published_values():
    # 0 successes in 10: the Wilson upper bound 0.2775 (Agresti & Coull 1998, Table 1 region; by hand 0.27753).
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    # 81/263 (Wikipedia's Wilson example uses 95%): 0.2553 .. 0.3662.
    assert wilson_interval(81, 263) == pytest.approx((0.25528, 0.36623), abs=1e-4)
    # A 0.9 accuracy on 90 probes: about +/- 6 points, which is what the README says the issue is about.
    low, high = wilson_interval(81, 90)
    assert 0.05 < high - low < 0.14


def test_wilson_interval_edge_cases_and_errors():
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    narrower = wilson_interval(45, 90, confidence=0.8)
    wider = wilson_interval(45, 90, confidence=0.99)
    assert wider[0] < narrower[0] < 0.5 < narrower[1] < wider[1]
    with pytest.raises(ValueError, match="successes <= n"):
        wilson_interval(11, 10)
    with pytest.raises(ValueError, match="confidence"):
        wilson_interval(1, 10, confidence=1.0)


def test_mean_interval_student_t_by_hand():
    # mean 3, sd sqrt(2.5), se 0.70711, t(0.975, 4) = 2.776445
    low, high = mean_interval(np.array([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert (low, high) == pytest.approx((3 - 2.776445 * 0.7071068, 3 + 2.776445 * 0.7071068), abs=1e-5)
    assert standard_error(np.array([1.0, 2.0, 3.0, 4.0, 5.0])) == pytest.approx(0.7071068, abs=1e-7)
    # NaN (unscored probes) dropped; constant values; too few values
    assert mean_interval(np.array([1.0, np.nan, 2.0, 3.0, 4.0, 5.0])) == pytest.approx((low, high))
    assert mean_interval(np.array([0.5, 0.5, 0.5])) == (0.5, 0.5)
    assert all(math.isnan(x) for x in mean_interval(np.array([1.0])))


def test_proportion_standard_error():
    assert proportion_standard_error(81, 90) == pytest.approx(math.sqrt(0.9 * 0.1 / 90))
    assert math.isnan(proportion_standard_error(0, 0))


def binomial_two_sided(b: int, c: int) -> float:
    """Exact McNemar by hand: 2 * P(X <= min(b, c)) for X ~ Bin(b + c, 1/2), capped at 1."""
    n, k = b + c, min(b, c)
    return min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2 ** n)


@pytest.mark.parametrize("b,c,expected", [
    (7, 1, 18 / 256),   # 2 * (1 + 8) / 2^8
    (0, 5, 2 / 32),
    (10, 0, 2 / 1024),
    (3, 3, 1.0),
    (0, 0, 1.0),
    (12, 4, None),
])
def test_mcnemar_exact_on_hand_computed_tables(b, c, expected):
    # A 2x2 table with a = 20 both-hit and d = 5 both-miss pairs, which the test must ignore.
    before = np.array([1] * 20 + [1] * b + [0] * c + [0] * 5, dtype=bool)
    after = np.array([1] * 20 + [0] * b + [1] * c + [0] * 5, dtype=bool)
    rng = np.random.default_rng(0)
    order = rng.permutation(before.size)
    result = mcnemar_exact(before[order], after[order])
    assert isinstance(result, McNemarResult)
    assert (result.b, result.c) == (b, c)
    want = binomial_two_sided(b, c) if expected is None else expected
    assert result.p_value == pytest.approx(want, rel=1e-12)
    assert sign_test(before[order].astype(float), after[order].astype(float)) == pytest.approx(want, rel=1e-12)


def test_mcnemar_drops_unscored_pairs_and_rejects_non_binary():
    before = np.array([1.0, 1.0, 1.0, np.nan, 0.0])
    after = np.array([0.0, 0.0, np.nan, 1.0, 0.0])
    result = mcnemar_exact(before, after)
    assert (result.b, result.c) == (2, 0) and result.p_value == pytest.approx(0.5)
    with pytest.raises(ValueError, match="binary"):
        mcnemar_exact(np.array([0.3, 1.0]), np.array([1.0, 0.0]))
    with pytest.raises(ValueError, match="same length"):
        mcnemar_exact(np.array([True]), np.array([True, False]))


def test_sign_test_on_margins():
    before = np.array([2.0, 1.5, 3.0, 0.2, 1.0, 0.7, 2.2, 1.1])
    after = before - np.array([0.5, 0.1, 1.0, 0.3, 0.0, 0.2, 0.4, -0.2])  # 6 down, 1 up, 1 tie
    assert sign_test(before, after) == pytest.approx(binomial_two_sided(6, 1))
    assert sign_test(before, before) == 1.0


def test_paired_t_test_matches_scipy_and_agrees_with_the_interval():
    from scipy import stats as scipy_stats

    from ctx_callback.stats import mean_interval, paired_t_test

    rng = np.random.default_rng(4)
    before = rng.uniform(0.2, 0.9, 50)
    after = before - rng.normal(0.03, 0.08, 50)
    after[[3, 7]] = np.nan  # unscored probes are dropped pairwise
    keep = ~np.isnan(after)
    want = scipy_stats.ttest_rel(after[keep], before[keep]).pvalue
    assert paired_t_test(before, after) == pytest.approx(want, rel=1e-12)
    low, high = mean_interval((before - after)[keep], 0.95)
    assert (paired_t_test(before, after) < 0.05) == (low > 0 or high < 0)
    assert paired_t_test(before, before) == 1.0
    # the same change on every probe: the exact sign test's p-value, not "p = 0"
    assert paired_t_test(before, before - 0.1) == pytest.approx(2.0 ** -49, rel=1e-9)
    assert np.isnan(paired_t_test(before[:1], after[:1]))
