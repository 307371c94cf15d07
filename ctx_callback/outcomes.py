"""Per-probe outcomes: what each probe did at each probe event, the ``ctx_reliance_probes.jsonl`` log, and flips.

Pure numpy (no torch), so the command line reads the log fast. Three parts:

- :func:`metric_outcomes`: the per-probe outcomes behind a metric of :data:`~ctx_callback.metrics.METRICS` (hit/miss
  for the accuracies and rates, a float per probe for ``counterfactual_probability``, ``logprob_margin`` and
  ``context_lift``), from a score table (``[probes, variants, 2]``; ``scores[r, c, 0] > scores[r, c, 1]`` means the
  counterfactual, i.e. the context's, answer wins). Their NaN-mean is the metric (tested), which is what makes the
  paired tests of :mod:`ctx_callback.decisions` tests *of the logged metric*.
- :class:`ProbeLog`: ``OUTPUT_DIR/ctx_reliance_probes.jsonl``, one compact JSON row per probe per event, appended
  by the main process; :meth:`ProbeLog.truncate_after` drops the rows a resumed run will write again.
- :func:`compute_flips`: the probes whose preferred answer changed between two events, for the trackers' tables and
  ``ctx-callback flips``.

A row of the log (keys in this order; absent keys are omitted)::

    {"step": 20, "id": "world_facts/france-capital", "family": "world_facts", "cf": -1.73, "par": -4.02,
     "preferred": "context", "known": true, "generation": "Lyon"}

``cf``/``par``: the counterfactual and parametric answers' summed log-probabilities under the counterfactual context
(log-likelihood mode; rounded to 5 decimals) or 1/0 hits (generation mode). ``preferred``: ``"context"`` (the
counterfactual answer wins), ``"memory"`` (the parametric answer wins), ``"tie"``; generation mode also ``"both"``
and ``"neither"``; ``"other"`` when a multiple-choice probe's winner is neither of the two; ``null`` when not scored.
Multiple choice: ``par`` is the parametric option's score (``null`` when unknown), and every outcome is read with the
option scores (``ScoreResult.option_scores``), exactly as the metrics read them. ``known``: whether the model
prefers the parametric answer closed-book (the knowledge check of ``known_only``), only on events that scored the
``closed_book`` variant.
``generation``: the generated text under the counterfactual context (generation mode only).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import metrics
from .metric_spec import MetricSpec, OutcomeKinds
from .score_table import ScoreTable

__all__ = [
    "PER_PROBE_METRICS",
    "PREFERRED_LABELS",
    "PROBES_FILE",
    "SUMMARY_FILE",
    "Flip",
    "FlipReport",
    "ProbeLog",
    "compute_flips",
    "event_steps",
    "known_vector",
    "metric_outcomes",
    "preferred_vector",
    "probe_rows",
    "read_probe_rows",
    "uncertainty",
]

#: The per-probe log's file name, in the trainer's ``output_dir``.
PROBES_FILE = "ctx_reliance_probes.jsonl"
#: The run summary's file name, in the trainer's ``output_dir`` (written by the callback at train end; read by the
#: command line's ``flips`` and ``plot``).
SUMMARY_FILE = "ctx_reliance_summary.json"

CONTEXT, MEMORY, OTHER = "context", "memory", "other"
#: Every value :func:`preferred_vector` returns besides ``None``: ``"context"`` (the counterfactual answer wins),
#: ``"memory"`` (the parametric answer wins), ``"tie"``, generation mode's ``"both"`` / ``"neither"``, and ``"other"``
#: (a multiple-choice probe whose winner is neither of the two, e.g. any winning rival of a probe without a parametric
#: option). Code that keys on these (the callback's resume state, flip counts) must handle all of them.
PREFERRED_LABELS: tuple[str, ...] = (CONTEXT, MEMORY, "tie", "both", "neither", OTHER)


def _table(scores: np.ndarray, variants: Sequence[str], mode: str, options: np.ndarray | None,
           option_roles: np.ndarray | None) -> ScoreTable:
    """The metrics' view of the scores, so that a per-probe outcome is exactly what the metric averages (multiple
    choice included: the parametric option is read from ``options`` / ``option_roles``)."""
    return ScoreTable(np.asarray(scores, dtype=np.float64), {v: i for i, v in enumerate(variants)}, mode,
                      options=None if options is None else np.asarray(options, dtype=np.float64),
                      option_roles=option_roles)


#: ``{metric: is hit/miss}`` for the metrics of :data:`~ctx_callback.metrics.METRICS` with per-probe outcomes (whose
#: mean over probes is the metric): the ones a paired test, an interval from the outcomes and
#: ``stop_rule="significant_decline"`` can use. ``memorization_ratio`` (a ratio of sums) and ``num_probes`` have none.
#: Hit/miss ones get Wilson intervals and McNemar tests. A live view of the metric table (it follows
#: :func:`~ctx_callback.metrics.register_metric`).
PER_PROBE_METRICS: Mapping[str, bool] = OutcomeKinds(lambda: metrics.METRICS)


def _spec_with_outcomes(metric: str) -> MetricSpec | None:
    """The spec of ``metric`` if it has per-probe outcomes (``None`` for an unknown name, as for a ratio or count)."""
    spec = next((spec for spec in metrics.METRICS if spec.name == metric), None)
    return spec if spec is not None and spec.per_probe is not None else None


def metric_outcomes(scores: np.ndarray, variants: Sequence[str], mode: str, metric: str, *,
                    options: np.ndarray | None = None, option_roles: np.ndarray | None = None) -> np.ndarray | None:
    """Per-probe outcomes of ``metric`` (one per row of ``scores``), or ``None`` when it has none in ``mode``.

    They are the metric's own definition (``MetricSpec.per_probe``), whose NaN-mean is the logged value.

    Args:
        scores: ``[probes, variants, 2]`` scores (``ScoreResult.scores``): log-probabilities or 1/0 hits.
        variants: Column names of ``scores``.
        mode: ``"loglik"`` or ``"generate"``.
        metric: A metric name of :data:`~ctx_callback.metrics.METRICS` (without prefix or family).
        options: Multiple choice: ``ScoreResult.option_scores`` of the same rows (the parametric option's outcomes
            need it); ``None`` when every probe has two answers.
        option_roles: With ``options``: ``ScoreResult.option_roles`` of the same rows.

    Returns:
        For a hit/miss metric of :data:`PER_PROBE_METRICS`: a ``bool`` array when every probe has an outcome, else
        floats 1.0/0.0/NaN (NaN = not scored). For the others: floats (NaN = not scored). ``None`` for a metric
        without per-probe outcomes, or that does not exist in ``mode`` or whose variant was not scored.
    """
    spec = _spec_with_outcomes(metric)
    if spec is None:
        return None
    out = spec.outcomes(_table(scores, variants, mode, options, option_roles))
    if out is None:
        return None
    if spec.is_hit and not np.isnan(out).any():
        return out.astype(bool)
    return out


def preferred_vector(scores: np.ndarray, variants: Sequence[str], mode: str, *, options: np.ndarray | None = None,
                     option_roles: np.ndarray | None = None) -> list[str | None]:
    """Which answer each probe prefers under the counterfactual context (see the module docstring).

    ``"context"`` (the counterfactual answer wins), ``"memory"`` (the parametric answer wins), ``"tie"``; generation
    mode also ``"both"`` / ``"neither"``; a multiple-choice probe whose winner is another option: ``"other"``.
    """
    table = _table(scores, variants, mode, options, option_roles)
    cf, rival, par = table.counterfactual(), table.rival(), table.parametric()
    par_wins = par if mode == "generate" else table.parametric_wins()
    out: list[str | None] = []
    for a, b, p in zip(cf.tolist(), rival.tolist(), par_wins.tolist()):
        if math.isnan(a) or math.isnan(b):
            out.append(None)
        elif mode == "generate":
            label = {(1.0, 0.0): CONTEXT, (0.0, 1.0): MEMORY, (1.0, 1.0): "both"}.get((a, b), "neither")
            out.append(OTHER if label == MEMORY and p != 1.0 else label)
        elif a > b:
            out.append(CONTEXT)
        elif b > a:
            out.append(MEMORY if p == 1.0 else OTHER)
        else:
            out.append("tie")
    return out


def known_vector(scores: np.ndarray, variants: Sequence[str], mode: str, *, options: np.ndarray | None = None,
                 option_roles: np.ndarray | None = None) -> list[bool | None] | None:
    """Closed-book knowledge per probe (parametric answer preferred, or alone generated, without context); ``None``
    when the ``closed_book`` variant was not scored (an entry is ``None`` where its probe was not, or where its
    parametric answer is unknown)."""
    if "closed_book" not in variants:
        return None
    table = _table(scores, variants, mode, options, option_roles)
    rival = table.rival("closed_book")
    if mode == "generate":
        known = np.where(np.isnan(table.parametric("closed_book")) | np.isnan(rival), np.nan,
                         (table.parametric("closed_book") == 1) & (table.counterfactual("closed_book") == 0))
    else:
        known = table.parametric_wins("closed_book")
    return [None if math.isnan(k) else bool(k) for k in known.tolist()]


def _number(x: float, mode: str) -> float | int | None:
    if math.isnan(x):
        return None
    if mode == "generate":
        return int(x)
    return round(x, 5) if math.isfinite(x) else None


def probe_rows(step: int, ids: Sequence[str], families: Sequence[str], scores: np.ndarray,
               variants: Sequence[str], mode: str,
               generations: Sequence[Sequence[str | None]] | None = None, *, options: np.ndarray | None = None,
               option_roles: np.ndarray | None = None) -> list[dict[str, Any]]:
    """The log rows of one probe event: one per probe (row of ``scores``), in row order.

    ``cf`` and ``par`` are the counterfactual and the parametric answer's scores under the counterfactual context
    (``par`` is ``None`` for a multiple-choice probe without a known parametric option)."""
    scores = np.asarray(scores, dtype=np.float64)
    table = _table(scores, variants, mode, options, option_roles)
    cf, par = table.counterfactual(), table.parametric()
    preferred = preferred_vector(scores, variants, mode, options=options, option_roles=option_roles)
    known = known_vector(scores, variants, mode, options=options, option_roles=option_roles)
    context_col = list(variants).index("context")
    rows: list[dict[str, Any]] = []
    for r, (probe_id, family) in enumerate(zip(ids, families)):
        row: dict[str, Any] = {"step": int(step), "id": probe_id, "family": family,
                               "cf": _number(float(cf[r]), mode), "par": _number(float(par[r]), mode),
                               "preferred": preferred[r]}
        if known is not None and known[r] is not None:
            row["known"] = known[r]
        if generations is not None and mode == "generate":
            row["generation"] = generations[r][context_col]
        rows.append(row)
    return rows


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

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: steps, counts per direction and family, and every flip."""
        families: dict[str, dict[str, int]] = {}
        for f in self.flips:
            entry = families.setdefault(f.family, {"to_memory": 0, "to_context": 0, "other": 0})
            entry[f.direction] += 1
        return {
            "from_step": self.from_step, "to_step": self.to_step, "num_probes": self.num_probes,
            "to_memory": len(self.by_direction("to_memory")), "to_context": len(self.by_direction("to_context")),
            "other": len(self.by_direction("other")), "families": dict(sorted(families.items())),
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
                          par_before=b.get("par"), cf_after=a.get("cf"), par_after=a.get("par")))
    return FlipReport(from_step=from_step, to_step=to_step, num_probes=len(set(before) & set(after)), flips=flips)


def uncertainty(scores: np.ndarray, families: Sequence[str], variants: Sequence[str], mode: str,
                targets: Sequence[tuple[str, str, str | None]], confidence: float = 0.95, *,
                options: np.ndarray | None = None, option_roles: np.ndarray | None = None) -> dict[str, float]:
    """Standard error and interval of metrics from their per-probe outcomes.

    Args:
        scores: ``[probes, variants, 2]`` scores.
        families: Family of each row.
        variants: Column names of ``scores``.
        mode: ``"loglik"`` or ``"generate"``.
        targets: ``(key, metric, family)`` triples: the logged key, the metric's name, and the family whose probes
            it is computed on (``None`` = all).
        confidence: Coverage of the intervals.
        options: Multiple choice: ``ScoreResult.option_scores`` (see :func:`metric_outcomes`).
        option_roles: With ``options``: ``ScoreResult.option_roles``.

    Returns:
        ``{key + "_se": ..., key + "_ci_low": ..., key + "_ci_high": ...}`` for every target with per-probe outcomes:
        Wilson interval and ``sqrt(p (1 - p) / n)`` for hit/miss metrics, Student's t and ``s / sqrt(n)`` for means
        (clipped to the metric's ``bounds``: [0, 1] for ``counterfactual_probability``).
    """
    from .stats import mean_interval, proportion_standard_error, standard_error, wilson_interval

    scores = np.asarray(scores, dtype=np.float64)
    fam = np.asarray(list(families), dtype=object)
    out: dict[str, float] = {}
    for key, metric, family in targets:
        mask = np.ones(len(fam), dtype=bool) if family is None else fam == family
        values = metric_outcomes(scores[mask], variants, mode, metric,
                                 options=None if options is None else np.asarray(options)[mask],
                                 option_roles=None if option_roles is None else np.asarray(option_roles)[mask])
        spec = _spec_with_outcomes(metric)
        if values is None or spec is None:
            continue
        valid = np.asarray(values, dtype=np.float64)
        valid = valid[np.isfinite(valid)]
        if spec.is_hit:
            hits = int(valid.sum())
            low, high = wilson_interval(hits, valid.size, confidence)
            se = proportion_standard_error(hits, valid.size)
        else:
            low, high = mean_interval(valid, confidence)
            if spec.bounds is not None:  # a t interval can reach past a bounded metric's range
                low, high = max(spec.bounds[0], low), min(spec.bounds[1], high)
            se = standard_error(valid)
        out[key + "_se"] = float(se)
        out[key + "_ci_low"] = float(low)
        out[key + "_ci_high"] = float(high)
    return out
