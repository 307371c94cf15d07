"""Per-probe outcomes: what each probe did at each probe event, read from the metric definitions. Pure numpy.

No torch, so the command line reads the log fast. Three parts:

- :func:`metric_outcomes`: the per-probe outcomes behind a metric of :data:`~ctx_callback.metrics.METRICS`: the
  metric's own per-probe definition (``MetricSpec.per_probe``; hit/miss for the accuracies and rates, a float per
  probe for ``counterfactual_probability``, ``logprob_margin`` and ``context_lift``), from a score table (``[probes,
  variants, 2]``; ``scores[r, c, 0] > scores[r, c, 1]`` means the counterfactual, i.e. the context's, answer wins).
  Their NaN-mean is the metric (tested), which is what makes the paired tests of :mod:`ctx_callback.decisions` tests
  *of the logged metric*; :func:`uncertainty` gives their intervals (Wilson or t, by the metric's outcome kind).
- :func:`preferred_vector` / :func:`known_vector`: which answer each probe prefers in context, and closed-book.
- :func:`probe_rows`: the rows of ``ctx_reliance_probes.jsonl`` for one event. The file itself (:class:`ProbeLog`)
  and the flips between two events (:func:`compute_flips`) are in :mod:`ctx_callback.probe_log` (re-exported here).

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

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import metrics
from .metric_spec import MetricSpec, OutcomeKinds
from .probe_log import (
    CONTEXT,
    MEMORY,
    OTHER,
    PROBES_FILE,
    SUMMARY_FILE,
    Flip,
    FlipReport,
    ProbeLog,
    compute_flips,
    event_steps,
    read_probe_rows,
)
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
               option_roles: np.ndarray | None = None,
               relations: Sequence[str | None] | None = None) -> list[dict[str, Any]]:
    """The log rows of one probe event: one per probe (row of ``scores``), in row order.

    ``cf`` and ``par`` are the counterfactual and the parametric answer's scores under the counterfactual context
    (``par`` is ``None`` for a multiple-choice probe without a known parametric option). With the ``"irrelevant"``
    variant scored, ``robust`` is the probe's ``irrelevant_robustness`` outcome (1/0; ``None`` where it has none).
    ``relation`` is the probe's ``metadata["relation"]`` where ``relations`` gives one."""
    scores = np.asarray(scores, dtype=np.float64)
    table = _table(scores, variants, mode, options, option_roles)
    cf, par = table.counterfactual(), table.parametric()
    preferred = preferred_vector(scores, variants, mode, options=options, option_roles=option_roles)
    known = known_vector(scores, variants, mode, options=options, option_roles=option_roles)
    context_col = list(variants).index("context")
    robust = (metric_outcomes(scores, variants, mode, "irrelevant_robustness", options=options,
                              option_roles=option_roles) if "irrelevant" in variants else None)
    rows: list[dict[str, Any]] = []
    for r, (probe_id, family) in enumerate(zip(ids, families)):
        row: dict[str, Any] = {"step": int(step), "id": probe_id, "family": family,
                               "cf": _number(float(cf[r]), mode), "par": _number(float(par[r]), mode),
                               "preferred": preferred[r]}
        if known is not None and known[r] is not None:
            row["known"] = known[r]
        if robust is not None:
            row["robust"] = None if math.isnan(robust[r]) else int(robust[r])
        if relations is not None and relations[r] is not None:
            row["relation"] = relations[r]
        if generations is not None and mode == "generate":
            row["generation"] = generations[r][context_col]
        rows.append(row)
    return rows


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
