"""Statistics for decisions on noisy probe metrics: intervals and paired tests. Pure numpy + scipy.

Nothing here is hand-rolled where scipy has it: Wilson intervals come from
``scipy.stats.binomtest(k, n).proportion_ci(method="wilson")``, the exact McNemar test is the exact binomial test of
the discordant pairs (``binomtest(b, b + c, 0.5)``), the sign test the same on the signs of the paired differences,
the paired t-test is ``scipy.stats.ttest_rel``, and the mean interval is Student's t (``scipy.stats.t``).

Every function accepts what a probe round produces: per-probe outcomes as numpy arrays, ``bool`` for hit/miss
outcomes (accuracies) and ``float`` otherwise, with NaN for a probe that was not scored (such probes are dropped,
pairwise in the paired tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as _scipy_stats

__all__ = [
    "McNemarResult",
    "mcnemar_exact",
    "mean_interval",
    "paired_outcomes",
    "paired_t_test",
    "proportion_standard_error",
    "sign_test",
    "standard_error",
    "wilson_interval",
]


def _check_confidence(confidence: float) -> float:
    if not (isinstance(confidence, (int, float)) and 0.0 < float(confidence) < 1.0):
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}.")
    return float(confidence)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``successes / n``.

    Args:
        successes: Number of successes (``0 <= successes <= n``).
        n: Number of trials; ``0`` gives ``(nan, nan)`` (nothing measured).
        confidence: Coverage of the interval, in (0, 1).

    Returns:
        ``(low, high)``, within [0, 1].

    Raises:
        ValueError: ``successes`` outside ``[0, n]``, a negative ``n`` or a bad ``confidence``.
    """
    confidence = _check_confidence(confidence)
    successes, n = int(successes), int(n)
    if n < 0 or not 0 <= successes <= max(n, 0):
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}.")
    if n == 0:
        return (math.nan, math.nan)
    ci = _scipy_stats.binomtest(successes, n).proportion_ci(confidence_level=confidence, method="wilson")
    return (float(ci.low), float(ci.high))


def _finite(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64).ravel()
    return values[~np.isnan(values)]


def mean_interval(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Student's t interval of the mean of ``values`` (NaN entries dropped).

    Returns:
        ``(low, high)``; ``(nan, nan)`` with fewer than two values; ``(mean, mean)`` when all values are equal.
    """
    confidence = _check_confidence(confidence)
    x = _finite(values)
    if x.size < 2:
        return (math.nan, math.nan)
    mean = float(x.mean())
    se = float(x.std(ddof=1) / math.sqrt(x.size))
    if se == 0.0:
        return (mean, mean)
    half = float(_scipy_stats.t.ppf(0.5 + confidence / 2.0, df=x.size - 1)) * se
    return (mean - half, mean + half)


def standard_error(values: np.ndarray) -> float:
    """Standard error of the mean of ``values`` (sample standard deviation / sqrt(n); NaN dropped; NaN if n < 2)."""
    x = _finite(values)
    if x.size < 2:
        return math.nan
    return float(x.std(ddof=1) / math.sqrt(x.size))


def proportion_standard_error(successes: int, n: int) -> float:
    """``sqrt(p (1 - p) / n)`` with ``p = successes / n``; NaN when ``n == 0``."""
    if n <= 0:
        return math.nan
    p = successes / n
    return math.sqrt(p * (1.0 - p) / n)


@dataclass(frozen=True)
class McNemarResult:
    """Exact McNemar test of two paired binary outcomes.

    Attributes:
        b: Pairs where only ``before`` is true (lost: e.g. followed the context at the peak, not now).
        c: Pairs where only ``after`` is true (gained).
        p_value: Two-sided exact p-value (``binomtest(b, b + c, 0.5)``); 1.0 without discordant pairs.
    """

    b: int
    c: int
    p_value: float


def paired_outcomes(before: np.ndarray, after: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``before`` and ``after`` as float arrays with the pairs that have a NaN on either side dropped.

    Raises:
        ValueError: The arrays have different lengths (they are not paired).
    """
    a = np.asarray(before, dtype=np.float64).ravel()
    b = np.asarray(after, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes must have the same length, got {a.size} and {b.size}.")
    keep = ~(np.isnan(a) | np.isnan(b))
    return a[keep], b[keep]


def mcnemar_exact(before: np.ndarray, after: np.ndarray) -> McNemarResult:
    """Exact (binomial) McNemar test of paired binary outcomes on the same probes.

    Args:
        before: Per-probe outcomes at the first event (bool, or 0/1 floats with NaN for unscored probes).
        after: Per-probe outcomes at the second event, in the same probe order.

    Returns:
        The discordant counts and the two-sided exact p-value.

    Raises:
        ValueError: Different lengths, or values other than 0/1 (NaN aside).
    """
    a, b = paired_outcomes(before, after)
    if not (np.isin(a, (0.0, 1.0)).all() and np.isin(b, (0.0, 1.0)).all()):
        raise ValueError("mcnemar_exact needs binary outcomes (bool or 0/1).")
    lost = int(np.count_nonzero((a == 1.0) & (b == 0.0)))
    gained = int(np.count_nonzero((a == 0.0) & (b == 1.0)))
    if lost + gained == 0:
        return McNemarResult(b=lost, c=gained, p_value=1.0)
    p = float(_scipy_stats.binomtest(lost, lost + gained, 0.5).pvalue)
    return McNemarResult(b=lost, c=gained, p_value=min(1.0, p))


def paired_t_test(before: np.ndarray, after: np.ndarray) -> float:
    """Two-sided paired t-test of per-probe values (``scipy.stats.ttest_rel``; NaN pairs dropped).

    The test of ``stop_rule="significant_decline"`` for probabilities and margins. Unlike the sign test it weighs the
    size of each probe's change, so a decline carried by some probes falling far while many others rise a little is
    detected (the sign test sees only the counts); its p-value is below ``1 - confidence`` exactly when
    :func:`mean_interval` of the differences excludes zero, so the logged interval and p-value agree (except for
    differences without spread, below, whose interval has zero width).

    When every probe changed by the same amount (up to rounding) the differences have no spread: the t statistic is
    infinite and ``ttest_rel`` undefined (scipy warns of precision loss). That is not certainty: two probes that moved
    alike would be "significant at p = 0". What such data shows is that all ``n`` probes moved the same way, so the
    exact sign test's p-value is returned, ``2^(1 - n)`` (0.5 for two probes, 2e-6 for twenty).

    Returns:
        The p-value; 1.0 when every difference is zero; :func:`sign_test`'s when every difference is the same
        non-zero value; NaN with fewer than two pairs.
    """
    a, b = paired_outcomes(before, after)
    diff = b - a
    if diff.size < 2:
        return float("nan")
    if not np.any(diff != 0):
        return 1.0
    if np.ptp(diff) <= 1e-12 * float(np.abs(diff).max()):  # the same change on every probe (up to rounding)
        return sign_test(a, b)
    return float(_scipy_stats.ttest_rel(b, a).pvalue)


def sign_test(before: np.ndarray, after: np.ndarray) -> float:
    """Two-sided exact sign test of paired outcomes (ties and NaN pairs dropped).

    On binary outcomes it equals :func:`mcnemar_exact`'s p-value (the non-tied pairs are the discordant ones).

    Returns:
        The p-value; 1.0 when every pair is tied.
    """
    a, b = paired_outcomes(before, after)
    diff = b - a
    up = int(np.count_nonzero(diff > 0))
    down = int(np.count_nonzero(diff < 0))
    if up + down == 0:
        return 1.0
    return min(1.0, float(_scipy_stats.binomtest(up, up + down, 0.5).pvalue))
