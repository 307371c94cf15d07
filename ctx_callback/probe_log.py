"""The per-probe log ``ctx_reliance_probes.jsonl`` on disk, and the flips between two of its events. Pure Python.

- :class:`ProbeLog`: ``OUTPUT_DIR/ctx_reliance_probes.jsonl``, one compact JSON row per probe per event (the rows of
  :func:`ctx_callback.outcomes.probe_rows`, whose docstring describes a row), appended by the main process;
  :meth:`ProbeLog.truncate_after` drops the rows a resumed run will write again. :func:`read_probe_rows` reads it.
- :func:`compute_flips`: the probes whose preferred answer changed between two events, for the trackers' tables and
  ``ctx-callback flips``.

Every name here is also importable from :mod:`ctx_callback.outcomes`, where it lived before.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .decline_share import group_shares

__all__ = [
    "CONTEXT",
    "MEMORY",
    "OTHER",
    "PROBES_FILE",
    "SUMMARY_FILE",
    "Flip",
    "FlipReport",
    "ProbeLog",
    "compute_flips",
    "event_steps",
    "read_probe_rows",
]

#: The per-probe log's file name, in the trainer's ``output_dir``.
PROBES_FILE = "ctx_reliance_probes.jsonl"
#: The run summary's file name, in the trainer's ``output_dir`` (written by the callback at train end; read by the
#: command line's ``flips`` and ``plot``).
SUMMARY_FILE = "ctx_reliance_summary.json"
#: Preferred answers (a row's ``"preferred"``) that a flip's direction is read from; the full list is
#: :data:`ctx_callback.outcomes.PREFERRED_LABELS`.
CONTEXT, MEMORY, OTHER = "context", "memory", "other"


class ProbeLog:
    """``ctx_reliance_probes.jsonl``: append-only, one row per probe per event (write it from the main process).

    Args:
        path: The file (created on the first append, with its folder).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def append(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Append ``rows`` (one compact JSON line each) and flush."""
        text = "".join(json.dumps(dict(row), separators=(",", ":")) + "\n" for row in rows)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)

    def truncate_after(self, step: int | None) -> int:
        """Keep only the rows with ``step <= step`` (all rows removed when ``step`` is ``None``): what a run resumed
        at ``step`` (or started afresh) must not duplicate. The file is replaced atomically.

        Returns:
            The number of rows removed.
        """
        if not self.path.exists():
            return 0
        kept: list[str] = []
        removed = 0
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    row_step = json.loads(line).get("step")
                except json.JSONDecodeError:  # a line cut short by a killed process: never kept
                    removed += 1
                    continue
                if step is not None and isinstance(row_step, int) and row_step <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
                else:
                    removed += 1
        if removed == 0:
            return 0
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".ctx_reliance_probes.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)
        return removed


def read_probe_rows(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every row of a probe log (a truncated last line, from a killed process, is skipped)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return rows


@dataclass(frozen=True)
class Flip:
    """One probe whose preferred answer changed between two events.

    Attributes:
        id: Probe id.
        family: Probe family.
        before: Preferred answer at the first event (``"context"``, ``"memory"``, ...).
        after: Preferred answer at the second event.
        known: Closed-book knowledge at the latest event up to the second one that measured it (``None``: never).
        cf_before, par_before, cf_after, par_after: The scores (log-probabilities or hits), when logged.
        relation: The probe's ``metadata["relation"]``, when the log has it.
    """

    id: str
    family: str
    before: str | None
    after: str | None
    known: bool | None = None
    cf_before: float | None = None
    par_before: float | None = None
    cf_after: float | None = None
    par_after: float | None = None
    relation: str | None = None

    @property
    def direction(self) -> str:
        """``"to_memory"`` (context's answer before, memorised after), ``"to_context"``, or ``"other"``."""
        if self.before == CONTEXT and self.after == MEMORY:
            return "to_memory"
        if self.before == MEMORY and self.after == CONTEXT:
            return "to_context"
        return "other"


@dataclass
class FlipReport:
    """The flips between event ``from_step`` and event ``to_step`` (:func:`compute_flips`)."""

    from_step: int
    to_step: int
    num_probes: int
    flips: list[Flip] = field(default_factory=list)

    def by_direction(self, direction: str) -> list[Flip]:
        """The flips of one direction (:attr:`Flip.direction`), sorted by family and id."""
        return sorted((f for f in self.flips if f.direction == direction), key=lambda f: (f.family, f.id))

    def decline_shares(self) -> dict[str, float]:
        """Each family's and ``family/relation``'s share of the counterfactual accuracy's decline between the two
        events: its net flips to memory (to memory minus to context) over all net flips (empty when the net is not
        positive; :mod:`ctx_callback.decline_share`)."""
        flips = self.flips
        steps = np.array([{"to_memory": 1.0, "to_context": -1.0}.get(flip.direction, 0.0) for flip in flips])
        relations = [None if flip.relation is None else f"{flip.family}/{flip.relation}" for flip in flips]
        return group_shares(steps, [flip.family for flip in flips], relations)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: steps, counts per direction and family, the decline shares, and every flip."""
        families: dict[str, dict[str, int]] = {}
        for f in self.flips:
            entry = families.setdefault(f.family, {"to_memory": 0, "to_context": 0, "other": 0})
            entry[f.direction] += 1
        return {
            "from_step": self.from_step, "to_step": self.to_step, "num_probes": self.num_probes,
            "to_memory": len(self.by_direction("to_memory")), "to_context": len(self.by_direction("to_context")),
            "other": len(self.by_direction("other")), "families": dict(sorted(families.items())),
            "decline_shares": self.decline_shares(),
            "flips": [{**f.__dict__, "direction": f.direction}
                      for f in sorted(self.flips, key=lambda f: (f.direction, f.family, f.id))],
        }


def event_steps(rows: Iterable[Mapping[str, Any]]) -> list[int]:
    """The steps the log has rows for, ascending."""
    return sorted({int(row["step"]) for row in rows if isinstance(row.get("step"), int)})


def compute_flips(rows: Sequence[Mapping[str, Any]], from_step: int, to_step: int) -> FlipReport:
    """The probes whose preferred answer differs between the events at ``from_step`` and ``to_step``.

    Args:
        rows: Probe log rows (:func:`read_probe_rows`).
        from_step: The earlier event's step (must be in the log).
        to_step: The later event's step (must be in the log).

    Raises:
        KeyError: A step with no rows in the log (the message lists the logged steps).
    """
    steps = event_steps(rows)
    for step in (from_step, to_step):
        if step not in steps:
            raise KeyError(f"no probe event at step {step} in the log; logged steps: {steps}")
    before = {r["id"]: r for r in rows if r.get("step") == from_step}
    after = {r["id"]: r for r in rows if r.get("step") == to_step}
    known: dict[str, bool] = {}
    for r in sorted((r for r in rows if isinstance(r.get("step"), int) and r["step"] <= to_step),
                    key=lambda r: r["step"]):
        if isinstance(r.get("known"), bool):
            known[r["id"]] = r["known"]
    flips = []
    for probe_id, b in before.items():
        a = after.get(probe_id)
        if a is None or a.get("preferred") == b.get("preferred"):
            continue
        flips.append(Flip(id=probe_id, family=str(a.get("family", b.get("family", ""))), before=b.get("preferred"),
                          after=a.get("preferred"), known=known.get(probe_id), cf_before=b.get("cf"),
                          par_before=b.get("par"), cf_after=a.get("cf"), par_after=a.get("par"),
                          relation=a.get("relation", b.get("relation"))))
    return FlipReport(from_step=from_step, to_step=to_step, num_probes=len(set(before) & set(after)), flips=flips)
