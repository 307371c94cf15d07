"""The row a probe event logs: its extra keys and the values computed from the round's result and the decision.

A probe event logs one row through the Trainer: the metrics of :mod:`ctx_callback.metrics`, then what this module
adds: the uncertainty of the monitored metric and the overall accuracies (:func:`uncertainty_row`), the paired
comparison with the peak event (:func:`decline_row`), the flips (:mod:`ctx_callback.flips`), and the decision's
bookkeeping keys (:func:`decision_row`). The keys it writes are defined here (``KEY_*``, documented in the
derived-key glossary of ``docs/metrics.md``, :data:`ctx_callback.metrics.DERIVED_KEYS`).

Where a change goes: a new per-event key is a ``KEY_*`` constant here and a line in the function that writes it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .decisions import Comparison
from .decline_share import decline_shares, group_labels
from .metrics import CONFIDENCE, INTERVAL_METRICS, METRIC_PREFIX, metric_key
from .monitor import Monitor
from .outcomes import metric_outcomes, preferred_vector, uncertainty
from .probes import Probe
from .scoring import ScoreResult
from .stopping import RoundDecision

__all__ = [
    "CI_HIGH_SUFFIX",
    "CI_LOW_SUFFIX",
    "KEY_DECLINE",
    "KEY_DECLINE_HIGH",
    "KEY_DECLINE_LOW",
    "KEY_DECLINE_P",
    "KEY_FAILED",
    "KEY_FLIPS_SINCE_PREVIOUS",
    "KEY_FLIPS_TO_CONTEXT",
    "KEY_FLIPS_TO_MEMORY",
    "KEY_NONFINITE",
    "KEY_PEAK_STEP",
    "KEY_PEAK_VALUE",
    "KEY_SECONDS",
    "KEY_SMOOTHED",
    "KEY_STOPPED",
    "SE_SUFFIX",
    "decision_row",
    "decline_row",
    "option_kwargs",
    "round_outcomes",
    "uncertainty_row",
]

#: Extra keys the callback logs next to the metrics.
KEY_SMOOTHED = f"{METRIC_PREFIX}/monitor_smoothed"
KEY_PEAK_VALUE = f"{METRIC_PREFIX}/peak_value"
KEY_PEAK_STEP = f"{METRIC_PREFIX}/peak_step"
KEY_SECONDS = f"{METRIC_PREFIX}/probe_seconds"
KEY_FAILED = f"{METRIC_PREFIX}/probe_failed"
KEY_STOPPED = f"{METRIC_PREFIX}/early_stop"
#: The count of non-finite scores (such a round is fed to the peak tracker as NaN).
KEY_NONFINITE = f"{METRIC_PREFIX}/nonfinite_scores"
#: The paired comparison with the peak event, and flips (documented in the derived-key glossary of ``docs/metrics.md``,
#: :data:`ctx_callback.metrics.DERIVED_KEYS`).
KEY_DECLINE = metric_key("decline_from_peak")
KEY_DECLINE_LOW = metric_key("decline_ci_low")
KEY_DECLINE_HIGH = metric_key("decline_ci_high")
KEY_DECLINE_P = metric_key("decline_p_value")
KEY_FLIPS_TO_MEMORY = metric_key("flips_to_memory")
KEY_FLIPS_TO_CONTEXT = metric_key("flips_to_context")
KEY_FLIPS_SINCE_PREVIOUS = metric_key("flips_since_previous")
#: Suffixes of the uncertainty keys of a metric key: ``<key>_se``, ``<key>_ci_low``, ``<key>_ci_high``.
SE_SUFFIX, CI_LOW_SUFFIX, CI_HIGH_SUFFIX = "_se", "_ci_low", "_ci_high"


def option_kwargs(result: ScoreResult, mask: np.ndarray | None = None) -> dict[str, Any]:
    """``options=`` / ``option_roles=`` of a round's multiple-choice scores (rows selected by ``mask``), for the
    per-probe outcome functions of :mod:`ctx_callback.outcomes`."""
    options, roles = result.option_scores, result.option_roles
    if options is None or roles is None:
        return {}
    if mask is not None:
        options, roles = options[mask], roles[mask]
    return {"options": options, "option_roles": roles}


def round_outcomes(result: ScoreResult, probes: Sequence[Probe],
                   monitor: Monitor) -> tuple[np.ndarray | None, list[str | None]]:
    """The monitored metric's per-probe outcomes and every probe's preferred answer, in the result's probe order."""
    if monitor.family is None:
        mask = np.ones(len(result.probe_indices), dtype=bool)
    else:
        mask = np.array([probes[int(i)].family == monitor.family for i in result.probe_indices], dtype=bool)
    outcomes = metric_outcomes(result.scores[mask], result.variants, result.mode, monitor.metric,
                               **option_kwargs(result, mask))
    return outcomes, preferred_vector(result.scores, result.variants, result.mode, **option_kwargs(result))


def uncertainty_row(result: ScoreResult, probes: Sequence[Probe], monitor: Monitor) -> dict[str, float]:
    """Standard error and 95% interval of the monitored metric and the overall accuracies: Wilson for hit/miss
    outcomes, Student's t for means (keys ``<key>_se``, ``<key>_ci_low``, ``<key>_ci_high``)."""
    targets = [(monitor.key, monitor.metric, monitor.family)]
    targets += [(metric_key(m), m, None) for m in INTERVAL_METRICS if metric_key(m) != monitor.key]
    families = [probes[int(i)].family for i in result.probe_indices]
    return uncertainty(result.scores, families, result.variants, result.mode, targets, CONFIDENCE,
                       **option_kwargs(result))


def decline_row(comparison: Comparison | None) -> dict[str, float]:
    """The decline from the peak event, its interval and paired p-value (empty for an event without a value)."""
    out: dict[str, float] = {}
    if comparison is None:
        return out
    out[KEY_DECLINE] = float(comparison.decline)
    if comparison.interval is not None:
        out[KEY_DECLINE_LOW], out[KEY_DECLINE_HIGH] = map(float, comparison.interval)
    if comparison.p_value is not None:
        out[KEY_DECLINE_P] = float(comparison.p_value)
    return out


def decline_share_row(comparison: Comparison | None, result: ScoreResult, probes: Sequence[Probe],
                      monitor: Monitor) -> dict[str, float]:
    """Each family's and relation's share of the decline from the peak (:mod:`ctx_callback.decline_share`)."""
    if comparison is None or comparison.per_probe is None:
        return {}
    monitored = [probes[int(i)] for i in result.probe_indices
                 if monitor.family is None or probes[int(i)].family == monitor.family]
    if len(monitored) != len(comparison.per_probe):
        return {}
    families, relations = group_labels(monitored)
    return decline_shares(comparison.per_probe, families, relations)


def decision_row(decision: RoundDecision, seconds: float, nonfinite: int) -> dict[str, float]:
    """The smoothed monitor, the peak, the round's time and its non-finite score count."""
    peak = decision.peak
    return {
        KEY_SMOOTHED: float(peak.smoothed),
        KEY_PEAK_VALUE: float(peak.peak_value),
        KEY_PEAK_STEP: float(peak.peak_step) if peak.peak_step is not None else math.nan,
        KEY_SECONDS: float(seconds),
        KEY_NONFINITE: float(nonfinite),
    }
