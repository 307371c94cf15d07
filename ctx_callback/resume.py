"""Resuming a run: check that the checkpoint measured the same probes, and replay its rows into the decision state.

A resumed run takes exactly the decisions an uninterrupted one takes: the peak, patience and stop-rule state are
rebuilt by feeding the callback's own rows of ``state.log_history`` (which the Trainer always restores) to the
:class:`~ctx_callback.stopping.StopDecider` again (:func:`replay_rows`), with the per-probe outcomes and preferred
answers of the peak and previous events kept in the checkpoint's :class:`~ctx_callback.resume_state.ResumeState`.
Before that, :func:`check_probe_set` refuses a checkpoint probed with another probe set
(``on_probe_set_change="error"``) or starts a new curve at the resumed step (``"new_curve"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .decisions import ProbeEvent
from .errors import ConfigurationError
from .messages import rank_zero_warn
from .metrics import METRIC_PREFIX, metric_key
from .probe_reports import ProbeReports
from .reliance_row import KEY_NONFINITE, KEY_PEAK_STEP, KEY_SECONDS
from .resume_state import KeptEvent, saved_probe_set, saved_selection_exists
from .stopping import StopDecider

__all__ = ["ProbeSetCheck", "Replayed", "check_probe_set", "logged_before", "replay_rows"]


def logged_before(log_history: list[dict[str, Any]], step: int, key: str) -> Any:
    """The value of ``key`` in the last row up to ``step`` that has it (``None`` if none)."""
    rows = [row for row in log_history if key in row and row.get("step", math.inf) <= step]
    return rows[-1][key] if rows else None


@dataclass(frozen=True)
class ProbeSetCheck:
    """The outcome of :func:`check_probe_set`: where this run's curve starts and whether this resume started it."""

    curve_start_step: int | None
    new_curve: bool = False


def check_probe_set(stateful_callbacks: dict[str, Any] | None, log_history: list[dict[str, Any]], step: int, *,
                    monitor_key: str, num_probes: int, sha1: str, selects: bool,
                    on_change: str) -> ProbeSetCheck:
    """On resume at ``step``: the checkpoint's run must have measured this callback's probe set (``num_probes``
    probes with digest ``sha1``). Otherwise refuse (``on_change="error"``) or start a new curve at ``step``
    (``"new_curve"``, with a warning). ``selects``: this callback selects probes (``known_only`` /
    ``informative_band``), so a logged probe count may differ from ``num_probes``.

    Raises:
        ConfigurationError: Another probe set and ``on_change="error"``.
    """
    saved, start = saved_probe_set(stateful_callbacks, monitor_key)
    if saved is not None:
        if saved.get("sha1") == sha1:
            return ProbeSetCheck(start)
        before = f"{saved.get('num_probes')} probes (probe set sha1 {str(saved.get('sha1'))[:12]})"
    else:
        # A checkpoint that stored no probe set (an older ctx_callback): the probe count its rows logged, which is
        # the probe set's size when no selection (known_only / informative_band) was made, then or now.
        logged = logged_before(log_history, step, metric_key("num_probes"))
        if (logged is None or int(logged) == num_probes or saved_selection_exists(stateful_callbacks)
                or selects):
            return ProbeSetCheck(start)
        before = f"{int(logged)} probes (as its rows logged {metric_key('num_probes')}; it stored no digest)"
    now = f"{num_probes} probes (probe set sha1 {sha1[:12]})"
    peak = logged_before(log_history, step, KEY_PEAK_STEP)
    old_peak = "" if peak is None or math.isnan(float(peak)) else f" (peak at step {int(peak)})"
    if on_change == "error":
        raise ConfigurationError(
            f"on_probe_set_change='error': resuming at step {step} from a checkpoint whose run was probed with "
            f"{before}, but this callback has {now}. The run's peak{old_peak}, patience and paired per-probe "
            "outcomes were measured on its probes; comparing them with values on other probes would mix two "
            "different curves, so nothing was trained. To resume, pass the probes the run started with (the "
            f"same probes= and limit_per_family=); or pass on_probe_set_change='new_curve' to start a new "
            f"reliance curve at step {step} (the old peak and stop-rule state are forgotten)."
        )
    reselect = (" The known_only / informative_band selection is made again, on the current weights."
                if selects else "")
    rank_zero_warn(
        "ctx_callback: on_probe_set_change='new_curve': the checkpoint resumed at step %d was probed with %s; "
        "this callback has %s. Starting a NEW reliance curve at step %d: the old curve's peak%s, smoothing, "
        "patience, stop-rule state and paired per-probe outcomes are forgotten, and the first probe event after "
        "step %d is the new curve's baseline.%s The old rows stay in state.log_history and on your trackers: the "
        "ctx_reliance/* curves before and after step %d measure different probes and must not be compared.",
        step, before, now, step, old_peak, step, reselect, step,
    )
    return ProbeSetCheck(step, new_curve=True)


@dataclass
class Replayed:
    """What :func:`replay_rows` rebuilt besides the decision state."""

    history: list[dict[str, Any]] = field(default_factory=list)
    last_probe_step: int | None = None
    probe_seconds_total: float = 0.0
    probe_events: int = 0


def replay_rows(log_history: list[dict[str, Any]], step: int, curve_start_step: int | None, monitor_key: str,
                kept: dict[int, KeptEvent], decider: StopDecider, reports: ProbeReports) -> Replayed:
    """Reset ``decider`` and ``reports`` and feed them this curve's rows up to ``step`` (resume), with the per-probe
    records ``kept`` by step (the peak and previous events')."""
    decider.reset()
    reports.reset()
    replayed = Replayed()
    # Only this curve's rows: after the step a new curve started at (on_probe_set_change="new_curve"), if any.
    first = -1 if curve_start_step is None else curve_start_step

    def ours(row: dict[str, Any]) -> bool:
        return "step" in row and first < row["step"] <= step

    # The event index (controls_every): every successful round logged probe_seconds; a failed one did not.
    replayed.probe_events = sum(1 for row in log_history if KEY_SECONDS in row and ours(row))
    for row in log_history:
        if monitor_key in row and ours(row):
            # A round with non-finite scores logged its finite metrics but fed NaN to the tracker: replay that.
            value = math.nan if row.get(KEY_NONFINITE) else float(row[monitor_key])
            row_step = int(row["step"])
            record = kept.get(row_step, KeptEvent(row_step))
            decision = decider.update(ProbeEvent(row_step, value, record.outcomes))
            if decision.peak.is_new_peak:
                reports.peak_preferred = record.preferred
            reports.previous_preferred = record.preferred
            replayed.history.append({k: v for k, v in row.items() if k.startswith(METRIC_PREFIX) or k == "step"})
            replayed.last_probe_step = row_step
            replayed.probe_seconds_total += float(row.get(KEY_SECONDS, 0.0))
    return replayed
