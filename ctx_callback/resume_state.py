"""The callback's resume state: what ``state.log_history`` cannot rebuild, as one object with one save/load pair.

The peak/patience state is rebuilt on resume by replaying the callback's own rows in ``state.log_history`` (which the
Trainer always restores). What the rows cannot rebuild is a :class:`ResumeState`: the probe set the run measures (a
resume with other probes is refused or starts a new curve), where its curve began, the ``known_only`` /
``informative_band`` selection made at the run's start, the peak checkpoint's path or why it could not be saved, and
the per-probe outcomes and preferred answers at the peak and previous events (:class:`PairedEvents`, for the paired
test and the flips). :meth:`ResumeState.to_dict` / :meth:`ResumeState.from_dict` are its save/load pair (as HF's
``ExportableState.state()/from_state()``); :func:`write_state` / :func:`read_state` put it into / take it from
``state.stateful_callbacks`` under :data:`STATE_KEY`, one entry per monitored key.

Why not ``ExportableState`` itself: the Trainer restores exportable callbacks by rebuilding them from JSON
arguments, which would drop the trainer handle and the encoded probes. The Trainer writes
``state.stateful_callbacks`` into every checkpoint's ``trainer_state.json`` (whoever triggers the save) and loads it
back on every resume. The key is dotted, so it never equals a class name and the Trainer's
``restore_callback_states_from_checkpoint`` never rebuilds a callback from it.

The layout (``version`` 2) is kept byte for byte; :meth:`ResumeState.from_dict` also reads what older versions
wrote (missing fields read as ``None``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "PREFERRED_CODES",
    "STATE_KEY",
    "STATE_VERSION",
    "TRAINER_STATE_FILE",
    "KeptEvent",
    "PairedEvents",
    "ResumeState",
    "read_state",
    "saved_probe_set",
    "saved_selection_exists",
    "write_state",
]

#: Where the callback's resume state lives: an entry of ``TrainerState.stateful_callbacks`` (``trainer_state.json`` in
#: every checkpoint). A dotted name, which no class name can equal, so the Trainer never rebuilds a callback from it.
STATE_KEY = "ctx_callback.ContextRelianceCallback"
#: The checkpoint's Trainer state file (``transformers.trainer.TRAINER_STATE_NAME``).
TRAINER_STATE_FILE = "trainer_state.json"
#: The layout version :meth:`ResumeState.to_dict` writes.
STATE_VERSION = 2
#: One character per probe for the preferred answers kept in the resume state: every label of
#: :data:`~ctx_callback.outcomes.PREFERRED_LABELS` (``"other"`` included: a multiple-choice probe whose winner is
#: neither the counterfactual nor the parametric option), and ``None`` (not scored) as ``"-"``.
PREFERRED_CODES: dict[str | None, str] = {
    "context": "c", "memory": "m", "tie": "t", "both": "b", "neither": "n", "other": "o", None: "-",
}
PREFERRED_NAMES = {code: name for name, code in PREFERRED_CODES.items()}


@dataclass(frozen=True)
class KeptEvent:
    """One probe event's per-probe record: the monitored metric's outcomes and every probe's preferred answer.

    Attributes:
        step: Global step of the event.
        outcomes: Per-probe outcomes (NaN: not scored), or ``None`` when unknown.
        preferred: Per-probe preferred answer label (``None``: not scored), or ``None`` when unknown.
    """

    step: int
    outcomes: np.ndarray | None = None
    preferred: list[str | None] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON layout: outcomes as numbers (``null`` for NaN), preferred answers as one character each."""
        outcomes = None
        if self.outcomes is not None:
            outcomes = [None if math.isnan(x) else x for x in np.asarray(self.outcomes, np.float64).tolist()]
        return {"step": int(self.step), "outcomes": outcomes,
                # A label without a code (none today: a test covers PREFERRED_LABELS) is kept as "not scored"
                # rather than failing the export, which runs outside the guard of the probe round.
                "preferred": None if self.preferred is None else "".join(PREFERRED_CODES.get(p, "-")
                                                                         for p in self.preferred)}

    @classmethod
    def from_dict(cls, entry: Any, binary: bool = False) -> KeptEvent | None:
        """Read :meth:`to_dict`'s layout (``None`` when malformed); ``binary``: outcomes without NaN become bool."""
        if not isinstance(entry, dict) or not isinstance(entry.get("step"), int):
            return None
        values = entry.get("outcomes")
        outcomes = None
        if isinstance(values, list):
            outcomes = np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)
            if binary and not np.isnan(outcomes).any():
                outcomes = outcomes.astype(bool)
        codes = entry.get("preferred")
        preferred = [PREFERRED_NAMES.get(c) for c in codes] if isinstance(codes, str) else None
        return cls(int(entry["step"]), outcomes, preferred)


@dataclass(frozen=True)
class PairedEvents:
    """The peak and previous events' per-probe records, for the probes whose ids hash to ``probes_sha1``; with
    ``significant_decline(sustained_events=k)``, k > 1, also the outcomes of the latest k valid events (``recent``,
    oldest first; written only then, so the default layout is unchanged), from which a resume recomputes the streak."""

    probes_sha1: str
    peak: KeptEvent | None
    previous: KeptEvent | None
    recent: tuple[KeptEvent, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out = {"probes_sha1": self.probes_sha1, "peak": None if self.peak is None else self.peak.to_dict(),
               "previous": None if self.previous is None else self.previous.to_dict()}
        if self.recent:
            out["recent"] = [event.to_dict() for event in self.recent]
        return out

    @classmethod
    def from_dict(cls, entry: Any, binary: bool = False) -> PairedEvents | None:
        if not isinstance(entry, dict):
            return None
        recent = [KeptEvent.from_dict(item, binary) for item in entry.get("recent") or ()]
        return cls(str(entry.get("probes_sha1")), KeptEvent.from_dict(entry.get("peak"), binary),
                   KeptEvent.from_dict(entry.get("previous"), binary),
                   tuple(event for event in recent if event is not None))

    def by_step(self, probes_sha1: str) -> dict[int, KeptEvent]:
        """The kept events by step, when they were kept for the probes ``probes_sha1`` (else empty). The peak wins
        over the previous event, which wins over a recent one, when they are the same step."""
        if self.probes_sha1 != probes_sha1:
            return {}
        return {event.step: event for event in (*self.recent, self.previous, self.peak) if event is not None}


@dataclass(frozen=True)
class ResumeState:
    """Everything a resumed run needs that ``state.log_history`` cannot rebuild (see the module docstring).

    Attributes:
        num_probes: Size of the probe set the run measures (``None`` when an older version did not say).
        probe_set_sha1: Its digest (:func:`~ctx_callback.callback.probe_set_digest`).
        curve_start_step: The step a new reliance curve began at (``on_probe_set_change="new_curve"``), or ``None``.
        selected_ids: The probe ids ``known_only`` / ``informative_band`` kept at the run's start, or ``None``.
        known_counts: Kept/total probes per family of that selection, or ``None``.
        informative_band: ``[low, high]`` of ``informative_band``, or ``None``.
        peak_checkpoint: The peak checkpoint's path, or ``None``.
        peak_save_error: Why the peak checkpoint could not be saved, or ``None``.
        paired: The peak and previous events' per-probe records, or ``None`` before the first peak.
    """

    num_probes: int | None = None
    probe_set_sha1: str | None = None
    curve_start_step: int | None = None
    selected_ids: list[str] | None = None
    known_counts: dict[str, dict[str, int]] | None = None
    informative_band: list[float] | None = None
    peak_checkpoint: str | None = None
    peak_save_error: str | None = None
    paired: PairedEvents | None = None
    #: Whether the entry named its probe set (``version`` 2 does; older ones did not).
    has_probe_set: bool = True

    def to_dict(self) -> dict[str, Any]:
        """The JSON entry written into ``trainer_state.json`` (layout ``version`` 2, key order included)."""
        return {
            "version": STATE_VERSION,
            # The probe set this run measures (on_probe_set_change compares it on resume) and where its curve began.
            "probe_set": {"num_probes": self.num_probes, "sha1": self.probe_set_sha1},
            "curve_start_step": self.curve_start_step,
            "known_only_probe_ids": self.selected_ids,
            "known_counts": self.known_counts,
            "informative_band": self.informative_band,
            "peak_checkpoint": self.peak_checkpoint,
            "peak_save_error": self.peak_save_error,
            "paired": None if self.paired is None else self.paired.to_dict(),
        }

    @classmethod
    def from_dict(cls, entry: dict[str, Any], binary: bool = False) -> ResumeState:
        """Read an entry :meth:`to_dict` (or an older version) wrote; malformed fields read as ``None``.

        Args:
            entry: The JSON entry.
            binary: The monitored metric's per-probe outcomes are hit/miss (restored as bool when none is NaN).
        """
        probe_set = entry.get("probe_set")
        has_probe_set = isinstance(probe_set, dict)
        probe_set = probe_set if isinstance(probe_set, dict) else {}
        start = entry.get("curve_start_step")
        ids = entry.get("known_only_probe_ids")
        checkpoint, error = entry.get("peak_checkpoint"), entry.get("peak_save_error")
        return cls(
            num_probes=probe_set.get("num_probes"),
            probe_set_sha1=probe_set.get("sha1"),
            curve_start_step=start if isinstance(start, int) else None,
            selected_ids=list(ids) if isinstance(ids, list) else None,
            known_counts=entry.get("known_counts"),
            informative_band=entry.get("informative_band"),
            peak_checkpoint=checkpoint if isinstance(checkpoint, str) else None,
            peak_save_error=error if isinstance(error, str) else None,
            paired=PairedEvents.from_dict(entry.get("paired"), binary),
            has_probe_set=has_probe_set,
        )


def _entries(stateful_callbacks: dict[str, Any] | None) -> dict[str, Any]:
    entries = (stateful_callbacks or {}).get(STATE_KEY)
    return entries if isinstance(entries, dict) else {}


def write_state(stateful_callbacks: dict[str, Any], monitor_key: str, resume_state: ResumeState) -> None:
    """Store ``resume_state`` as ``monitor_key``'s entry (every checkpoint saved from now on carries it)."""
    stateful_callbacks.setdefault(STATE_KEY, {})[monitor_key] = resume_state.to_dict()


def read_state(stateful_callbacks: dict[str, Any] | None, monitor_key: str,
               binary: bool = False) -> ResumeState | None:
    """``monitor_key``'s entry in a resumed Trainer state (``None`` when the checkpoint has none)."""
    entry = _entries(stateful_callbacks).get(monitor_key)
    return ResumeState.from_dict(entry, binary) if isinstance(entry, dict) else None


def saved_probe_set(stateful_callbacks: dict[str, Any] | None,
                    monitor_key: str) -> tuple[dict[str, Any] | None, int | None]:
    """The probe set a resumed checkpoint's run measured (from any monitor's entry, ``monitor_key``'s first) and the
    step its curve began at; ``(None, None)`` when the checkpoint does not say (an older ctx_callback, or none)."""
    entries = _entries(stateful_callbacks)
    ordered = [entries.get(monitor_key)] + [v for k, v in entries.items() if k != monitor_key]
    for entry in ordered:
        if isinstance(entry, dict) and isinstance(entry.get("probe_set"), dict):
            start = entry.get("curve_start_step")
            return entry["probe_set"], start if isinstance(start, int) else None
    return None, None


def saved_selection_exists(stateful_callbacks: dict[str, Any] | None) -> bool:
    """Whether any monitor's entry kept a ``known_only`` / ``informative_band`` selection."""
    return any(isinstance(e, dict) and e.get("known_only_probe_ids") is not None
               for e in _entries(stateful_callbacks).values())
