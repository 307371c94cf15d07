"""The run's report: the summary (dict and text), ``ctx_reliance_summary.json`` and the reliance plot.

Pure functions of what the run measured (:class:`RunFacts`: its rows, peak, stop and checkpoint), so that a report can
be read, tested and changed without the callback. The summary file and the plot never fail a finished run: an OS
error is a warning naming the file and the error.

The summary (:meth:`summary`) reports ``trained_steps``, the optimizer steps this ``train()`` call ran; ``final``
is the last probe event. When no step ran, ``final_step`` equals the baseline step and :meth:`summary_text` says
that nothing was measured after training instead of presenting the baseline as a final value. The last step is
always probed with ``probe_at_end`` (also when transformers runs a step for ``max_steps=0``).

Where a change goes: a new summary field is a line in :func:`summarize` (and, to show it, :func:`summary_text`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .decline_share import KEY_DECLINE_SHARE
from .messages import warn
from .outcomes import SUMMARY_FILE
from .peak_checkpoint import RESTORED_FROM_BASELINE
from .reliance_row import CI_HIGH_SUFFIX, CI_LOW_SUFFIX, KEY_DECLINE, KEY_DECLINE_HIGH, KEY_DECLINE_LOW, KEY_DECLINE_P

__all__ = ["PLOT_FILE", "RunFacts", "run_facts", "summarize", "summary_text", "write_plot", "write_summary"]

#: The reliance plot's file name, in the trainer's ``output_dir``.
PLOT_FILE = "ctx_reliance.png"


@dataclass(frozen=True)
class RunFacts:
    """What a run measured and decided, as the summary reports it.

    Attributes:
        monitor_key: The monitored metric's logged key.
        history: The run's probe rows (each with ``"step"``).
        peak_step: Step of the smoothed peak (``None`` before any valid event).
        peak_value: The smoothed peak value (NaN before any valid event).
        probe_events: Probe events fed to the peak tracker.
        stop_step: Step training stopped at, or ``None``.
        stop_reason: Why, or ``None``.
        stop_rule: The rule that stopped, or ``None``.
        peak_checkpoint: The peak checkpoint's folder, or ``None``.
        peak_save_error: Why the peak has no checkpoint, or ``None``.
        restored_from: Where restored weights came from, or ``None``.
        end_step: Global step training ended (or is) at, ``None`` before training.
        train_start_step: Global step the last ``train()`` call began at, ``None`` before training.
        probe_seconds_total: Seconds spent probing.
        known_counts: The probe selection's per-family counts, or ``None``.
        curve_start_step: Step a new curve began at (``on_probe_set_change="new_curve"``), or ``None``.
    """

    monitor_key: str
    history: list[dict[str, Any]]
    peak_step: int | None
    peak_value: float
    probe_events: int
    stop_step: int | None
    stop_reason: str | None
    stop_rule: str | None
    peak_checkpoint: str | None
    peak_save_error: str | None
    restored_from: str | None
    end_step: int | None
    train_start_step: int | None
    probe_seconds_total: float
    known_counts: dict[str, dict[str, int]] | None
    curve_start_step: int | None


def run_facts(callback: Any) -> RunFacts:
    """The :class:`RunFacts` of a :class:`~ctx_callback.ContextRelianceCallback` as it is now."""
    tracker, checkpointer, trainer = callback.decider.tracker, callback.checkpointer, callback.trainer
    started = trainer is not None and callback.train_start_step is not None
    end_step = int(trainer.state.global_step) if started else None
    return RunFacts(
        callback.monitor_key, callback.history, tracker.peak_step, tracker.peak_value, tracker.num_events,
        callback.stop_step, callback.stop_reason, callback.stop_rule_name, checkpointer.peak_checkpoint,
        checkpointer.peak_save_error, checkpointer.restored_from, end_step, callback.train_start_step,
        callback.probe_seconds_total, callback.selection.known_counts, callback.curve_start_step)


def summarize(facts: RunFacts, restored: bool = False) -> dict[str, Any]:
    """The summary dict of :meth:`~ctx_callback.ContextRelianceCallback.summary`.

    Baseline, peak and final values of the monitored metric, the stop step and the peak checkpoint. ``final`` is the
    last probe event (``final_step`` its step); ``trained_steps`` the optimizer steps the last ``train()`` call ran
    (``None`` before training) and ``end_step`` the global step training ended (or is) at. With ``trained_steps == 0``
    no measurement was taken after training: ``final_step`` is the baseline step. ``restored_from`` says where
    restored weights came from: the checkpoint's path, ``"baseline (in memory)"`` (then ``peak_checkpoint`` is
    ``None``), or ``None`` when nothing was restored. ``peak_save_error`` says why the current peak has no checkpoint
    when saving it failed (then ``peak_checkpoint`` is ``None``). ``curve_start_step``: the step a new reliance curve
    began at after a resume with another probe set (``on_probe_set_change="new_curve"``; ``baseline`` is then the new
    curve's first event), else ``None``. ``final_decline_shares``: each family's and relation's share of the final
    decline from the peak (:mod:`ctx_callback.decline_share`; ``{}`` without a decline).
    """
    key = facts.monitor_key
    values = [(row["step"], row.get(key)) for row in facts.history if key in row]
    rows = {row["step"]: row for row in facts.history if key in row}

    def interval(step: Any, low: str, high: str) -> list[float] | None:
        row = rows.get(step, {})
        return [row[low], row[high]] if low in row and high in row else None

    peak_step, final_step = facts.peak_step, values[-1][0] if values else None
    final_row = rows.get(final_step, {})
    end_step = facts.end_step
    return {
        "monitor": key,
        "baseline": values[0][1] if values else None,
        "baseline_step": values[0][0] if values else None,
        "final": values[-1][1] if values else None,
        "final_step": values[-1][0] if values else None,
        "peak_smoothed": None if math.isnan(facts.peak_value) else facts.peak_value,
        "peak_step": peak_step,
        "peak_raw": next((v for s, v in values if s == peak_step), None),
        "stop_step": facts.stop_step,
        "stop_reason": facts.stop_reason,
        "stop_rule": facts.stop_rule,
        "peak_interval": interval(peak_step, key + CI_LOW_SUFFIX, key + CI_HIGH_SUFFIX),
        "final_interval": interval(final_step, key + CI_LOW_SUFFIX, key + CI_HIGH_SUFFIX),
        "final_decline_from_peak": final_row.get(KEY_DECLINE),
        "final_decline_interval": interval(final_step, KEY_DECLINE_LOW, KEY_DECLINE_HIGH),
        "final_decline_p_value": final_row.get(KEY_DECLINE_P),
        "final_decline_shares": {k[len(KEY_DECLINE_SHARE) + 1:]: v for k, v in final_row.items()
                                 if k.startswith(KEY_DECLINE_SHARE + "/")},
        "peak_checkpoint": facts.peak_checkpoint,
        "peak_save_error": facts.peak_save_error,
        "restored_peak": restored,
        "restored_from": facts.restored_from if restored else None,
        "trained_steps": None if end_step is None else end_step - int(facts.train_start_step or 0),
        "end_step": end_step,
        "probe_events": facts.probe_events,
        "probe_seconds_total": facts.probe_seconds_total,
        "known_counts": facts.known_counts,
        "curve_start_step": facts.curve_start_step,
    }


def summary_text(s: dict[str, Any], restored: bool = False) -> str:
    """The summary ``s`` (:func:`summarize`) as the lines printed at train end."""

    def fmt(v: Any) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    lines = [
        f"ctx_callback summary ({s['monitor']}):",
        f"  baseline {fmt(s['baseline'])} at step {s['baseline_step']}",
        f"  peak     {fmt(s['peak_raw'])} (smoothed {fmt(s['peak_smoothed'])}) at step {s['peak_step']}",
        _final_line(s, fmt),
        f"  stopped early at step {s['stop_step']}" if s["stop_step"] is not None else "  no early stop",
        "  peak checkpoint: None (the peak is the baseline; restored from its in-memory copy)"
        if s["restored_from"] == RESTORED_FROM_BASELINE
        else f"  peak checkpoint: not saved ({s['peak_save_error']})" if s["peak_save_error"]
        else f"  peak checkpoint: {s['peak_checkpoint']}" + (" (restored)" if restored else ""),
        f"  probing took {s['probe_seconds_total']:.1f}s over {s['probe_events']} events",
    ]
    shares = s.get("final_decline_shares") or {}
    families = {group: share for group, share in shares.items() if "/" not in group}
    if families:
        lines.insert(4, "  share of the decline: " + ", ".join(f"{group} {share:+.0%}" for group, share in
                                                              sorted(families.items(), key=lambda kv: -kv[1])))
    if s["curve_start_step"] is not None:
        lines.insert(1, f"  a new curve from step {s['curve_start_step']} (resumed with another probe set; the "
                        "rows before it measured other probes)")
    return "\n".join(lines)


def _final_line(s: dict[str, Any], fmt: Callable[[Any], str]) -> str:
    """The summary's "final" line, which never presents a measurement not taken after training as final."""
    if s["final_step"] is None:
        return "  final    n/a (no probe succeeded)"
    if s["trained_steps"] == 0 and s["final_step"] == s["baseline_step"]:
        return (f"  final    n/a: no training step ran (trained_steps 0); the only measurement is the baseline "
                f"at step {s['baseline_step']}")
    line = f"  final    {fmt(s['final'])} at step {s['final_step']}"
    if s["end_step"] is not None and s["final_step"] < s["end_step"]:
        line += f" (the last probe; training ended at step {s['end_step']})"
    return line


def write_summary(output_dir: str, summary: dict[str, Any], history: list[dict[str, Any]]) -> None:
    """Write ``ctx_reliance_summary.json``; an OS error is a warning, never a failed run."""
    if not output_dir:
        return
    path = os.path.join(output_dir, SUMMARY_FILE)
    payload = {"summary": summary, "history": history}
    try:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            json.dump(payload, f, indent=2, default=float)
    except OSError as err:
        warn("could not write %s (%s: %s); training is unaffected, and the summary is still in "
             "callback.summary() and the metrics in trainer.state.log_history.", path, type(err).__name__, err)


def write_plot(output_dir: str, log_history: list[dict[str, Any]], monitor_key: str, stop_step: int | None) -> None:
    """Write ``ctx_reliance.png`` (needs matplotlib); a missing matplotlib or an OS error is a warning."""
    try:
        from .plotting import plot_reliance
    except ImportError as err:  # pragma: no cover - matplotlib missing
        warn("plot=True needs matplotlib (%s).", err)
        return
    path = os.path.join(output_dir, PLOT_FILE)
    try:
        plot_reliance(log_history, path, monitor_key=monitor_key, stop_step=stop_step)
    except OSError as err:
        warn("could not write the plot %s (%s: %s); training is unaffected.", path,
             type(err).__name__, err)
