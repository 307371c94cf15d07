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
    "CONFIDENCE",
    "DERIVED_KEYS",
    "INTERVAL_METRICS",
    "METRICS",
    "METRIC_DESCRIPTIONS",
    "METRIC_PREFIX",
    "MODES",
    "MetricSpec",
    "ScoreTable",
    "compute_metrics",
    "derived_glossary_markdown",
    "glossary_markdown",
    "metric_key",
    "metric_spec",
]

METRIC_PREFIX = "ctx_reliance"
#: Overall metrics that get uncertainty keys besides the monitored one (those a round scored).
INTERVAL_METRICS = ("counterfactual_accuracy", "parametric_accuracy", "closed_book_accuracy")
#: Confidence of the logged intervals and of the paired comparison of two probe events.
CONFIDENCE = 0.95
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

    Two-answer and multiple-choice probes share one layout: ``scores[..., 0]`` is the counterfactual (context-supported)
    answer and ``scores[..., 1]`` its strongest rival (the parametric answer of a two-answer probe, the best other
    option of a multiple-choice one), so ``scores[..., 0] > scores[..., 1]`` means "the counterfactual answer wins"
    for every probe. What needs the parametric answer of a multiple-choice probe reads ``options``.

    Attributes:
        scores: ``[probes, variants, 2]``. Log-likelihood mode: summed answer log-probabilities (``[..., 0]``
            counterfactual, ``[..., 1]`` its strongest rival). Generation mode: 1.0/0.0 hits. NaN = not scored.
        variant_index: Column of each scored variant (``"context"``, ``"closed_book"``, ``"aligned"``).
        mode: ``"loglik"`` or ``"generate"``; metrics that exist in both modes read the scores accordingly.
        options: ``[probes, variants, K]`` score of every answer option (NaN-padded past a probe's own count), or
            ``None`` when every probe has two answers (then ``scores`` says everything).
        option_roles: ``[probes, 2]`` ints with ``options``: the position of the counterfactual and of the parametric
            answer among the options (``-1``: the parametric answer is unknown). A two-answer row is ``(0, 1)``.
    """

    scores: np.ndarray
    variant_index: Mapping[str, int]
    mode: str = "loglik"
    options: np.ndarray | None = None
    option_roles: np.ndarray | None = None

    @property
    def is_generation(self) -> bool:
        """Scores are generation-mode hits (1.0/0.0), not log-probabilities."""
        return self.mode == "generate"

    def counterfactual(self, variant: str = "context") -> np.ndarray:
        """Per-probe score of the counterfactual answer under ``variant``."""
        return self.scores[:, self.variant_index[variant], 0]

    def rival(self, variant: str = "context") -> np.ndarray:
        """Per-probe score of the counterfactual answer's strongest rival under ``variant`` (the parametric answer of
        a two-answer probe; the best other option, or whether any other option was generated, for multiple choice)."""
        return self.scores[:, self.variant_index[variant], 1]

    def parametric(self, variant: str = "context") -> np.ndarray:
        """Per-probe score of the parametric answer under ``variant``; NaN where it is unknown (multiple choice)."""
        if self.options is None or self.option_roles is None:
            return self.rival(variant)
        opts = self.options[:, self.variant_index[variant], :]
        par = self.option_roles[:, 1]
        known = par >= 0
        out = np.full(opts.shape[0], np.nan)
        out[known] = opts[np.flatnonzero(known), par[known]]
        return out

    def parametric_wins(self, variant: str = "context") -> np.ndarray:
        """Log-likelihood mode: 1.0 where the parametric answer scores above every other answer, 0.0 where not, NaN
        where it is unknown or not scored."""
        if self.options is None or self.option_roles is None:
            return _better(self.rival(variant), self.counterfactual(variant))
        opts = self.options[:, self.variant_index[variant], :]
        par = self.option_roles[:, 1]
        rows = np.arange(opts.shape[0])
        column = np.where(par >= 0, par, 0)
        mine = np.where(par >= 0, opts[rows, column], np.nan)
        others = np.where(np.isnan(opts), -np.inf, opts)
        others[rows, column] = -np.inf
        out = (mine > others.max(axis=1)).astype(np.float64)
        out[np.isnan(mine)] = np.nan
        return out

    def context_valid(self) -> np.ndarray:
        """Probes whose counterfactual and rival context-variant scores are both present."""
        return ~(np.isnan(self.counterfactual()) | np.isnan(self.rival()))


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
    margin = t.counterfactual() - t.rival()
    with np.errstate(over="ignore"):
        return _nanmean(1.0 / (1.0 + np.exp(-margin)))


def _logprob_margin(t: ScoreTable) -> float:
    return _nanmean(t.counterfactual() - t.rival())


def _context_lift(t: ScoreTable) -> float:
    return _nanmean(t.counterfactual() - t.counterfactual("closed_book"))


def _counterfactual_accuracy(t: ScoreTable) -> float:
    if t.is_generation:
        return _nanmean(t.counterfactual())
    return _nanmean(_better(t.counterfactual(), t.rival()))


def _parametric_accuracy(t: ScoreTable) -> float:
    if t.is_generation:
        return _nanmean(t.parametric())
    return _nanmean(t.parametric_wins())


def _closed_book_accuracy(t: ScoreTable) -> float:
    if t.is_generation:
        return _nanmean(t.parametric("closed_book"))
    return _nanmean(t.parametric_wins("closed_book"))


def _aligned_accuracy(t: ScoreTable) -> float:
    if t.is_generation:
        return _nanmean(t.parametric("aligned"))
    return _nanmean(t.parametric_wins("aligned"))


def _both_rate(t: ScoreTable) -> float:
    valid = t.context_valid()
    if not valid.any():
        return float("nan")
    cf, rival = t.counterfactual()[valid], t.rival()[valid]
    return float(((cf == 1) & (rival == 1)).mean())


def _neither_rate(t: ScoreTable) -> float:
    valid = t.context_valid()
    if not valid.any():
        return float("nan")
    cf, rival = t.counterfactual()[valid], t.rival()[valid]
    return float(((cf == 0) & (rival == 0)).mean())


def _memorization_ratio(t: ScoreTable) -> float:
    valid = t.context_valid() & ~np.isnan(t.parametric())
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
        "> log p(parametric | context) (multiple choice: above every other option); generation mode, the output "
        "contains the counterfactual answer",
        short="cf", modes=BOTH, compute=_counterfactual_accuracy, in_summary_table=True,
        plot_label="counterfactual accuracy (follows context)",
    ),
    MetricSpec(
        "parametric_accuracy",
        "share of probes where the model answers from memory despite the context (parametric answer preferred, or "
        "contained in the output; multiple choice: over every other option, probes without a known parametric "
        "option skipped)",
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
        "mean of p_cf / (p_cf + p_par) under the counterfactual context (log-likelihood mode; multiple choice: "
        "p_par = the best other option)",
        short="p_cf", modes=(LOGLIK,), compute=_counterfactual_probability,
    ),
    MetricSpec(
        "logprob_margin",
        "mean of log p(counterfactual) - log p(parametric) under the counterfactual context, in nats "
        "(log-likelihood mode; multiple choice: minus the best other option)",
        short="margin", modes=(LOGLIK,), compute=_logprob_margin,
    ),
    MetricSpec(
        "context_lift",
        "mean of log p(cf | counterfactual context) - log p(cf | no context), in nats: how much the context moves "
        "the model (log-likelihood mode)",
        short="lift", modes=(LOGLIK,), compute=_context_lift, requires="closed_book",
    ),
    MetricSpec(
        "both_rate", "share of outputs containing both answers (generation mode; multiple choice: the "
        "counterfactual and another option)",
        short="both", modes=(GENERATE,), compute=_both_rate, greater_is_better=False,
    ),
    MetricSpec(
        "neither_rate", "share of outputs containing neither answer (generation mode; multiple choice: no option)",
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
    option_scores: np.ndarray | None = None,
    option_roles: np.ndarray | None = None,
) -> dict[str, float]:
    """Compute every metric of :data:`METRICS` that exists for ``mode`` and the scored ``variants``.

    Args:
        scores: ``[num_probes, num_variants, 2]`` array. Log-likelihood mode: summed answer log-probabilities
            (``[..., 0]`` counterfactual, ``[..., 1]`` parametric). Generation mode: 1.0/0.0 hits. NaN = missing.
        families: Family of each probe (row).
        variants: Variant name of each column (must include ``"context"``).
        mode: ``"loglik"`` or ``"generate"``.
        per_family: Also emit ``ctx_reliance/<family>/<metric>`` keys.
        option_scores: Multiple choice: ``[num_probes, num_variants, K]`` score of every option (see
            :class:`ScoreTable`); ``None`` when every probe has two answers. ``scores[..., 1]`` must then hold each
            probe's strongest rival of the counterfactual answer.
        option_roles: With ``option_scores``: ``[num_probes, 2]`` position of the counterfactual and the parametric
            option (``-1`` = unknown).

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
    if (option_scores is None) != (option_roles is None):
        raise ConfigurationError("option_scores and option_roles go together: pass both or neither.")
    if option_scores is not None and option_roles is not None:
        option_scores = np.asarray(option_scores, dtype=np.float64)
        option_roles = np.asarray(option_roles, dtype=np.int64)
        if option_scores.ndim != 3 or option_scores.shape[:2] != scores.shape[:2]:
            raise ConfigurationError(
                f"option_scores must have shape [probes, {len(variants)}, K], got {option_scores.shape}."
            )
        if option_roles.shape != (scores.shape[0], 2):
            raise ConfigurationError(f"option_roles must have shape [probes, 2], got {option_roles.shape}.")
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
        table = ScoreTable(scores[mask], variant_index, mode,
                           None if option_scores is None else option_scores[mask],
                           None if option_roles is None else option_roles[mask])
        for spec in specs:
            out[metric_key(spec.name, family)] = float(spec.compute(table))
    return out


#: Keys the callback derives at each probe event from the per-probe outcomes (:mod:`ctx_callback.outcomes`): the
#: uncertainty of a metric, the paired comparison with the peak event and the flips. ``(key, meaning)``;
#: ``<metric>`` is the monitored metric's key and each of ``counterfactual_accuracy``, ``parametric_accuracy`` and
#: ``closed_book_accuracy`` overall. Rendered into the README by :func:`derived_glossary_markdown` (test-enforced).
DERIVED_KEYS: tuple[tuple[str, str], ...] = (
    ("<metric>_se", "standard error of the metric over probes: sqrt(p(1-p)/n) for hit/miss metrics, s/sqrt(n) for "
                    "means"),
    ("<metric>_ci_low", "lower end of its 95% interval: Wilson for hit/miss metrics (accuracies, rates), Student's t "
                        "for means (probability, margin, lift)"),
    ("<metric>_ci_high", "upper end of that interval"),
    ("decline_from_peak", "raw monitored value at the peak event (where the smoothed metric peaked) minus now, in "
                          "the metric's units (0.05 = 5 points), positive = worse (sign flipped for metrics where "
                          "lower is better)"),
    ("decline_ci_low", "lower end of the 95% t interval of the per-probe decline, paired on the same probes"),
    ("decline_ci_high", "upper end of that interval"),
    ("decline_p_value", "two-sided p-value of the paired test now vs the peak event: exact McNemar for hit/miss "
                        "metrics, paired t-test otherwise (not corrected for repeated looks)"),
    ("flips_to_memory", "probes that preferred the context's answer at the peak event and prefer the memorised one "
                        "now"),
    ("flips_to_context", "probes that preferred the memorised answer at the peak event and prefer the context's now"),
    ("flips_since_previous", "probes whose preferred answer changed since the previous probe event"),
)


def derived_glossary_markdown() -> str:
    """The README's table of derived keys (:data:`DERIVED_KEYS`)."""
    lines = ["| key | meaning |", "|---|---|"]
    lines += [f"| `{METRIC_PREFIX}/{key}` | {meaning.replace('|', '&#124;')} |" for key, meaning in DERIVED_KEYS]
    return "\n".join(lines)
