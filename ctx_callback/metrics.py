"""Context-reliance metrics from per-probe scores: one table of metric specs, and the computation. Pure numpy.

:data:`METRICS` is the single source of truth for every metric: its name, a one-line description, the modes it
exists in, the probe variant it needs, its direction, its short column label, and the function that computes it.
Everything else reads this table: :func:`compute_metrics` (which metrics a round emits), monitor validation and
``greater_is_better`` (:mod:`ctx_callback.monitor`), the command line's columns, the plot's curves and the README's
glossary (a test checks that the README matches :func:`glossary_markdown`).

To add a metric, add one :class:`MetricSpec` to :data:`METRICS` (see "Extending ctx_callback" in the README).

Keys are namespaced and stable (they end up on dashboards): ``ctx_reliance/<metric>`` over all probes and
``ctx_reliance/<family>/<metric>`` per family.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import ConfigurationError

__all__ = [
    "METRICS",
    "METRIC_DESCRIPTIONS",
    "METRIC_PREFIX",
    "MODES",
    "MetricSpec",
    "ScoreTable",
    "compute_metrics",
    "glossary_markdown",
    "metric_key",
    "metric_spec",
]

METRIC_PREFIX = "ctx_reliance"
#: Scoring modes: compare the two answers' log-likelihoods, or generate greedily and match answers in the output.
MODES: tuple[str, ...] = ("loglik", "generate")


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def _better(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1.0 where a > b, 0.0 where not, NaN where either is missing."""
    out = (a > b).astype(np.float64)
    out[np.isnan(a) | np.isnan(b)] = np.nan
    return out


@dataclass(frozen=True)
class ScoreTable:
    """The scores of one group of probes, as metric functions read them.

    Attributes:
        scores: ``[probes, variants, 2]``. Log-likelihood mode: summed answer log-probabilities (``[..., 0]``
            counterfactual, ``[..., 1]`` parametric). Generation mode: 1.0/0.0 hits. NaN = not scored.
        variant_index: Column of each scored variant (``"context"``, ``"closed_book"``, ``"aligned"``).
        mode: ``"loglik"`` or ``"generate"``; metrics that exist in both modes read the scores accordingly.
    """

    scores: np.ndarray
    variant_index: Mapping[str, int]
    mode: str = "loglik"

    @property
    def is_generation(self) -> bool:
        """Scores are generation-mode hits (1.0/0.0), not log-probabilities."""
        return self.mode == "generate"

    def counterfactual(self, variant: str = "context") -> np.ndarray:
        """Per-probe score of the counterfactual answer under ``variant``."""
        return self.scores[:, self.variant_index[variant], 0]

    def parametric(self, variant: str = "context") -> np.ndarray:
        """Per-probe score of the parametric answer under ``variant``."""
        return self.scores[:, self.variant_index[variant], 1]

    def context_valid(self) -> np.ndarray:
        """Probes whose two context-variant scores are both present."""
        return ~(np.isnan(self.counterfactual()) | np.isnan(self.parametric()))


@dataclass(frozen=True)
class MetricSpec:
    """Everything about one metric, in one place.

    Attributes:
        name: The metric's key suffix (``ctx_reliance/<name>``); stable, it ends up on dashboards.
        description: One line for the README glossary (Markdown; ``|`` is escaped when rendered).
        short: Column label in the command line's tables (at most 7 characters).
        modes: Modes in which the metric exists (``"loglik"``, ``"generate"``).
        compute: ``fn(table) -> float`` computing it from a :class:`ScoreTable` of one probe group.
        requires: The probe variant it needs besides ``"context"`` (``"closed_book"``, ``"aligned"``), or ``None``.
        greater_is_better: Direction when the metric is monitored (the peak is a maximum, or a minimum).
        monitorable: Whether ``monitor=`` may name it (``num_probes`` is a count, not a measurement).
        in_summary_table: Shown by default in ``ctx-callback scan``'s table.
        plot_label: Drawn by ``ctx-callback plot`` / ``plot=True`` with this legend label; ``None`` = not drawn.
    """

    name: str
    description: str
    short: str
    modes: tuple[str, ...]
    compute: Callable[[ScoreTable], float]
    requires: str | None = None
    greater_is_better: bool = True
    monitorable: bool = True
    in_summary_table: bool = False
    plot_label: str | None = None

    @property
    def key(self) -> str:
        """The overall logged key, ``ctx_reliance/<name>``."""
        return metric_key(self.name)


# -- metric functions ------------------------------------------------------------------------------------------
# Log-likelihood mode: scores are log-probabilities. Generation mode: scores are 1.0/0.0 hits.


def _counterfactual_probability(t: ScoreTable) -> float:
    margin = t.counterfactual() - t.parametric()
    with np.errstate(over="ignore"):
        return _nanmean(1.0 / (1.0 + np.exp(-margin)))


def _logprob_margin(t: ScoreTable) -> float:
    return _nanmean(t.counterfactual() - t.parametric())


def _context_lift(t: ScoreTable) -> float:
    return _nanmean(t.counterfactual() - t.counterfactual("closed_book"))


def _counterfactual_accuracy(t: ScoreTable) -> float:
    if t.is_generation:
        return _nanmean(t.counterfactual())
    return _nanmean(_better(t.counterfactual(), t.parametric()))


def _parametric_accuracy(t: ScoreTable) -> float:
    if t.is_generation:
        return _nanmean(t.parametric())
    return _nanmean(_better(t.parametric(), t.counterfactual()))


def _closed_book_accuracy(t: ScoreTable) -> float:
    if t.is_generation:
        return _nanmean(t.parametric("closed_book"))
    return _nanmean(_better(t.parametric("closed_book"), t.counterfactual("closed_book")))


def _aligned_accuracy(t: ScoreTable) -> float:
    if t.is_generation:
        return _nanmean(t.parametric("aligned"))
    return _nanmean(_better(t.parametric("aligned"), t.counterfactual("aligned")))


def _both_rate(t: ScoreTable) -> float:
    valid = t.context_valid()
    if not valid.any():
        return float("nan")
    cf, par = t.counterfactual()[valid], t.parametric()[valid]
    return float(((cf == 1) & (par == 1)).mean())


def _neither_rate(t: ScoreTable) -> float:
    valid = t.context_valid()
    if not valid.any():
        return float("nan")
    cf, par = t.counterfactual()[valid], t.parametric()[valid]
    return float(((cf == 0) & (par == 0)).mean())


def _memorization_ratio(t: ScoreTable) -> float:
    valid = t.context_valid()
    cf, par = t.counterfactual()[valid], t.parametric()[valid]
    total_hits = cf.sum() + par.sum()
    return float(par.sum() / total_hits) if total_hits > 0 else float("nan")


def _num_probes(t: ScoreTable) -> float:
    return float(t.scores.shape[0])


LOGLIK, GENERATE = MODES
BOTH = MODES

#: The metric table, in display order. Add a metric here and nowhere else.
METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "counterfactual_accuracy",
        "share of probes where the model follows the context: log-likelihood mode, log p(counterfactual | context) "
        "> log p(parametric | context); generation mode, the output contains the counterfactual answer",
        short="cf", modes=BOTH, compute=_counterfactual_accuracy, in_summary_table=True,
        plot_label="counterfactual accuracy (follows context)",
    ),
    MetricSpec(
        "parametric_accuracy",
        "share of probes where the model answers from memory despite the context (parametric answer preferred, or "
        "contained in the output)",
        short="par", modes=BOTH, compute=_parametric_accuracy, greater_is_better=False, in_summary_table=True,
        plot_label="parametric accuracy (answers from memory)",
    ),
    MetricSpec(
        "closed_book_accuracy",
        "share of probes whose parametric answer the model prefers (or generates) with no context: does it know "
        "the fact?",
        short="cb", modes=BOTH, compute=_closed_book_accuracy, requires="closed_book", in_summary_table=True,
        plot_label="closed-book accuracy (knows the fact)",
    ),
    MetricSpec(
        "aligned_accuracy",
        "share of probes answered with the true fact when the context states it (aligned control)",
        short="al", modes=BOTH, compute=_aligned_accuracy, requires="aligned", in_summary_table=True,
    ),
    MetricSpec(
        "counterfactual_probability",
        "mean of p_cf / (p_cf + p_par) under the counterfactual context (log-likelihood mode)",
        short="p_cf", modes=(LOGLIK,), compute=_counterfactual_probability,
    ),
    MetricSpec(
        "logprob_margin",
        "mean of log p(counterfactual) - log p(parametric) under the counterfactual context, in nats "
        "(log-likelihood mode)",
        short="margin", modes=(LOGLIK,), compute=_logprob_margin,
    ),
    MetricSpec(
        "context_lift",
        "mean of log p(cf | counterfactual context) - log p(cf | no context), in nats: how much the context moves "
        "the model (log-likelihood mode)",
        short="lift", modes=(LOGLIK,), compute=_context_lift, requires="closed_book",
    ),
    MetricSpec(
        "both_rate", "share of outputs containing both answers (generation mode)",
        short="both", modes=(GENERATE,), compute=_both_rate, greater_is_better=False,
    ),
    MetricSpec(
        "neither_rate", "share of outputs containing neither answer (generation mode)",
        short="neither", modes=(GENERATE,), compute=_neither_rate, greater_is_better=False,
    ),
    MetricSpec(
        "memorization_ratio",
        "parametric hits / (parametric + counterfactual hits) over outputs (generation mode)",
        short="mem", modes=(GENERATE,), compute=_memorization_ratio, greater_is_better=False,
    ),
    MetricSpec(
        "num_probes", "number of probes the metrics are computed on",
        short="probes", modes=BOTH, compute=_num_probes, monitorable=False,
    ),
)


#: ``{name: description}`` for every metric (kept for compatibility; derived from :data:`METRICS`).
METRIC_DESCRIPTIONS: dict[str, str] = {spec.name: spec.description for spec in METRICS}


def metric_spec(name: str) -> MetricSpec:
    """The :class:`MetricSpec` called ``name``.

    Raises:
        ConfigurationError: Unknown metric; the message lists the known ones.
    """
    for spec in METRICS:
        if spec.name == name:
            return spec
    raise ConfigurationError(f"unknown metric {name!r}; known metrics: {[spec.name for spec in METRICS]}.")


def metric_key(metric: str, family: str | None = None) -> str:
    """``ctx_reliance/<metric>`` or ``ctx_reliance/<family>/<metric>``."""
    return f"{METRIC_PREFIX}/{metric}" if family is None else f"{METRIC_PREFIX}/{family}/{metric}"


def glossary_markdown() -> str:
    """The README's metric glossary table, rendered from :data:`METRICS`."""
    lines = ["| metric | column | modes | needs | better | meaning |", "|---|---|---|---|---|---|"]
    for spec in METRICS:
        modes = "both" if set(spec.modes) == set(MODES) else ", ".join(spec.modes)
        needs = f"`{spec.requires}`" if spec.requires else ""
        better = "" if not spec.monitorable else ("higher" if spec.greater_is_better else "lower")
        meaning = spec.description.replace("|", "&#124;")
        lines.append(f"| `{spec.name}` | `{spec.short}` | {modes} | {needs} | {better} | {meaning} |")
    return "\n".join(lines)


def compute_metrics(
    scores: np.ndarray,
    families: Sequence[str],
    variants: Sequence[str],
    *,
    mode: str = "loglik",
    per_family: bool = True,
) -> dict[str, float]:
    """Compute every metric of :data:`METRICS` that exists for ``mode`` and the scored ``variants``.

    Args:
        scores: ``[num_probes, num_variants, 2]`` array. Log-likelihood mode: summed answer log-probabilities
            (``[..., 0]`` counterfactual, ``[..., 1]`` parametric). Generation mode: 1.0/0.0 hits. NaN = missing.
        families: Family of each probe (row).
        variants: Variant name of each column (must include ``"context"``).
        mode: ``"loglik"`` or ``"generate"``.
        per_family: Also emit ``ctx_reliance/<family>/<metric>`` keys.

    Returns:
        A flat dict of plain Python floats, in :data:`METRICS` order within each group.

    Raises:
        ConfigurationError: Wrong shapes, no ``"context"`` variant, or an unknown mode.
    """
    if mode not in MODES:
        raise ConfigurationError(f"mode must be one of {list(MODES)}, got {mode!r}.")
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 3 or scores.shape[2] != 2 or scores.shape[1] != len(variants):
        raise ConfigurationError(f"scores must have shape [probes, {len(variants)}, 2], got {scores.shape}.")
    if len(families) != scores.shape[0]:
        raise ConfigurationError(f"got {len(families)} families for {scores.shape[0]} probes.")
    variant_index = {name: i for i, name in enumerate(variants)}
    if "context" not in variant_index:
        raise ConfigurationError("the 'context' variant is required.")
    specs = [s for s in METRICS if mode in s.modes and (s.requires is None or s.requires in variant_index)]
    families_arr = np.asarray(list(families), dtype=object)
    groups: list[tuple[str | None, np.ndarray]] = [(None, np.ones(len(families_arr), dtype=bool))]
    if per_family:
        groups += [(family, families_arr == family) for family in sorted(set(families_arr.tolist()))]
    out: dict[str, float] = {}
    for family, mask in groups:
        if not mask.any():
            continue
        table = ScoreTable(scores[mask], variant_index, mode)
        for spec in specs:
            out[metric_key(spec.name, family)] = float(spec.compute(table))
    return out
