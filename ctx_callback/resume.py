"""Resuming a run: check that the checkpoint measured the same probes, and replay its rows into the decision state.

A resumed run takes exactly the decisions an uninterrupted one takes: the peak, patience and stop-rule state are
rebuilt by feeding the callback's own rows of ``state.log_history`` (which the Trainer always restores) to the
:class:`~ctx_callback.stopping.StopDecider` again (:func:`replay_rows`), with the per-probe outcomes and preferred
answers of the peak and previous events kept in the checkpoint's :class:`~ctx_callback.resume_state.ResumeState`.
Before that, :func:`check_probe_set` refuses a checkpoint probed with another probe set
(``on_probe_set_change="error"``) or starts a new curve at the resumed step (``"new_curve"``).
Each ``trainer.train()`` that starts at step 0 is a fresh run: the baseline is probed again and the peak,
patience, history, stop information and (with ``known_only``) the probe selection start over. A run resumed from
a checkpoint instead rebuilds them from ``state.log_history``, and takes the ``known_only`` selection made at the
run's start from the checkpoint's Trainer state (never a new selection on the fine-tuned weights, which can
differ). A checkpoint without that state (an older ctx_callback) gets a warning, then a recomputed selection.


A new curve (``on_probe_set_change="new_curve"``): the old peak, smoothing, patience, stop-rule and paired state are
forgotten (the old rows stay in ``state.log_history`` and on the trackers, but no decision reads them), the first
probe event after the resumed step is the new curve's first (its baseline), ``known_only`` / ``informative_band``
select again on the current weights, and the summary's ``curve_start_step`` says where the curve began. Later resumes
of that run with the new probes continue the new curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .decisions import ProbeEvent
from .errors import ConfigurationError
from .messages import rank_zero_info, rank_zero_warn
from .metrics import METRIC_PREFIX, metric_key
from .peak_checkpoint import PeakCheckpointer
from .probe_reports import ProbeReports
from .probe_selection import ProbeSelection
from .reliance_row import KEY_NONFINITE, KEY_PEAK_STEP, KEY_SECONDS
from .resume_state import (
    TRAINER_STATE_FILE,
    KeptEvent,
    PairedEvents,
    ResumeState,
    read_state,
    saved_probe_set,
    saved_selection_exists,
)
from .stopping import StopDecider

__all__ = [
    "ProbeSetCheck",
    "Replayed",
    "check_probe_set",
    "current_state",
    "logged_before",
    "rebuild",
    "replay_rows",
]


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
        "on_probe_set_change='new_curve': the checkpoint resumed at step %d was probed with %s; "
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


def current_state(*, num_probes: int, sha1: str, curve_start_step: int | None, selection: ProbeSelection,
                  decider: StopDecider, reports: ProbeReports, checkpointer: PeakCheckpointer) -> ResumeState:
    """What a resume from a checkpoint saved now needs, gathered from the parts that hold it."""
    peak, previous = decider.peak_event, decider.previous_event
    paired = None if peak is None else PairedEvents(
        selection.ids_digest(), KeptEvent(peak.step, peak.outcomes, reports.peak_preferred),
        None if previous is None else KeptEvent(previous.step, previous.outcomes, reports.previous_preferred),
        tuple(KeptEvent(e.step, e.outcomes) for e in decider.recent_events) if decider.events_needed > 1 else ())
    band = selection.informative_band
    return ResumeState(
        num_probes=num_probes, probe_set_sha1=sha1, curve_start_step=curve_start_step,
        selected_ids=selection.saved_ids(), known_counts=selection.known_counts if selection.selects else None,
        informative_band=None if band is None else list(band), peak_checkpoint=checkpointer.peak_checkpoint,
        peak_save_error=checkpointer.peak_save_error, paired=paired)


def rebuild(state: Any, *, monitor_key: str, binary: bool, num_probes: int, sha1: str, on_change: str,
            selection: ProbeSelection, decider: StopDecider, reports: ProbeReports, checkpointer: PeakCheckpointer,
            output_dir: str) -> tuple[ProbeSetCheck, Replayed]:
    """Resume at ``state.global_step``: check the probe set (refuse, or start a new curve), restore the probe
    selection, replay this curve's rows into ``decider`` and ``reports``, and find the peak checkpoint.

    Args:
        state: The resumed ``TrainerState``.
        monitor_key: The monitored metric's key (whose resume state is read).
        binary: Its per-probe outcomes are hit/miss.
        num_probes: Size of this callback's probe set.
        sha1: Its digest.
        on_change: ``on_probe_set_change``.
        selection: The probe selection (restored).
        decider: The stop decider (rebuilt).
        reports: The per-probe reports (their peak and previous answers rebuilt).
        checkpointer: The peak checkpointer (its peak checkpoint found).
        output_dir: The trainer's output folder (where ``checkpoint-{peak}`` is looked for).

    Raises:
        ConfigurationError: Another probe set and ``on_change="error"``.
    """
    step = state.global_step
    check = check_probe_set(state.stateful_callbacks, state.log_history, step, monitor_key=monitor_key,
                            num_probes=num_probes, sha1=sha1, selects=selection.selects, on_change=on_change)
    saved = read_state(state.stateful_callbacks, monitor_key, binary)
    selection.resume(saved, step, check.new_curve)  # first: the kept records are for the selected probes
    kept = saved.paired.by_step(selection.ids_digest()) if saved and saved.paired else {}
    replayed = replay_rows(state.log_history, step, check.curve_start_step, monitor_key, kept, decider, reports)
    checkpointer.resume(decider.peak_step, output_dir, saved.peak_checkpoint if saved else None,
                        saved.peak_save_error if saved else None)
    peak = decider.peak_event
    if peak is not None and peak.outcomes is None and decider.rules:
        rank_zero_warn(
            "the checkpoint's %s holds no per-probe outcomes of the peak event (step %s; saved by "
            "an older ctx_callback, or with another probe selection): the paired comparison with the peak (and "
            "stop_rule='significant_decline') resumes at the next new peak.", TRAINER_STATE_FILE, peak.step)
    tracker = decider.tracker
    if tracker.num_events:
        rank_zero_info("resumed with %d probe events, peak %.4f at step %s.", tracker.num_events,
                       tracker.peak_value, tracker.peak_step)
    return check, replayed
