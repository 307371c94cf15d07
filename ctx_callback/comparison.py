"""Comparing two probe events on the same probes: the decline, its interval and a paired test. Pure (numpy, scipy).

A :class:`ProbeEvent` is one probe event as the stop decisions see it; :func:`compare_events` compares an event with
the peak event (:class:`Comparison`): the decline in the metric's units, and, from the per-probe outcomes, an exact
McNemar test (binary outcomes) or a paired t-test and the decline's interval. Computed once per event by
:class:`~ctx_callback.stopping.StopDecider`; both names stay importable from :mod:`ctx_callback.decisions`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .stats import mcnemar_exact, mean_interval, paired_t_test

__all__ = ["Comparison", "ProbeEvent", "compare_events"]


@dataclass(frozen=True)
class ProbeEvent:
    """One probe event, as the stop rules see it.

    Attributes:
        step: Global optimizer step of the event.
        value: The monitored metric (NaN for a failed or flagged round).
        outcomes: Per-probe outcomes behind ``value`` in a fixed probe order (``bool`` for accuracies, ``float``
            otherwise; NaN = probe not scored), or ``None`` when unknown (events replayed from logs).
    """

    step: int
    value: float
    outcomes: np.ndarray | None = None



@dataclass(frozen=True)
class Comparison:
    """The paired comparison of an event with the peak event (:func:`compare_events`).

    Attributes:
        decline: ``peak.value - now.value`` (negated when lower is better): positive when the metric got worse.
        interval: t interval of the mean per-probe decline (``None`` without paired outcomes).
        p_value: Two-sided exact McNemar (binary outcomes) or paired t-test (otherwise) p-value, ``None`` without
            paired outcomes.
        test: ``"mcnemar"``, ``"t"`` or ``None``.
        lost: Probes that were a hit at the peak and are not now (binary outcomes), or that got worse (otherwise).
        gained: The reverse.
        per_probe: Each probe's decline, ``peak_i - now_i`` (negated when lower is better; NaN where a probe was not
            scored at both events), ``None`` without paired outcomes (what :mod:`ctx_callback.decline_share` splits).
    """

    decline: float
    interval: tuple[float, float] | None
    p_value: float | None
    test: str | None
    lost: int | None = None
    gained: int | None = None
    per_probe: np.ndarray | None = field(default=None, compare=False, repr=False)


def _is_binary(outcomes: np.ndarray) -> bool:
    if outcomes.dtype == np.bool_:
        return True
    finite = outcomes[~np.isnan(outcomes)]
    return bool(np.isin(finite, (0.0, 1.0)).all())


def compare_events(peak: ProbeEvent, now: ProbeEvent, greater_is_better: bool = True,
                   confidence: float = 0.95) -> Comparison:
    """Compare ``now`` with ``peak`` on the same probes.

    The decline is the difference of the two events' values. When both events carry per-probe outcomes of the
    same length, the paired test and the decline's interval come from them: an exact McNemar test when both are
    binary (bool, or 0/1 with NaN for unscored probes), a paired t-test otherwise, and a t interval of the
    per-probe differences. Probes unscored at either event are dropped pairwise.
    """
    sign = 1.0 if greater_is_better else -1.0
    decline = sign * (float(peak.value) - float(now.value))
    a, b = peak.outcomes, now.outcomes
    if a is None or b is None or np.asarray(a).shape != np.asarray(b).shape or np.asarray(a).size == 0:
        return Comparison(decline=decline, interval=None, p_value=None, test=None)
    a_f = np.asarray(a, dtype=np.float64)
    b_f = np.asarray(b, dtype=np.float64)
    low, high = mean_interval(sign * (a_f - b_f), confidence)
    interval = None if math.isnan(low) else (low, high)
    diff = sign * (b_f - a_f)
    valid = ~np.isnan(diff)
    lost = int(np.count_nonzero(diff[valid] < 0))
    gained = int(np.count_nonzero(diff[valid] > 0))
    if _is_binary(np.asarray(a)) and _is_binary(np.asarray(b)):
        if greater_is_better:
            result = mcnemar_exact(a_f, b_f)
        else:
            result = mcnemar_exact(1.0 - a_f, 1.0 - b_f)
        return Comparison(decline=decline, interval=interval, p_value=result.p_value, test="mcnemar",
                          lost=result.b, gained=result.c, per_probe=-diff)
    p_value = paired_t_test(a_f, b_f)
    return Comparison(decline=decline, interval=interval, p_value=None if math.isnan(p_value) else p_value, test="t",
                      lost=lost, gained=gained, per_probe=-diff)
