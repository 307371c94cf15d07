"""Context-reliance metrics: each defined once, per probe, in one table; and their computation. Pure numpy.

Every metric is a :class:`~ctx_callback.metric_spec.MetricSpec` of :data:`METRICS`: its name, a one-line description,
the modes it exists in, the probe variant it needs, its direction, its short column label, and its definition: a
function giving one value per probe (``per_probe``, NaN where it does not apply) with the kind of that value (hit/miss
or continuous), the logged value being their mean over a probe group; or, for the two metrics that are no mean over
probes (``memorization_ratio``, ``num_probes``), a ``compute`` function of the group.

Everything else reads this table at call time: :func:`compute_metrics` (the logged values), the per-probe outcomes
behind intervals, paired tests and ``significant_decline`` (:func:`ctx_callback.outcomes.metric_outcomes`,
:func:`~ctx_callback.outcomes.uncertainty`), monitor validation and ``greater_is_better``
(:mod:`ctx_callback.monitor`), the command line's columns, the plot's curves and the glossary in ``docs/metrics.md`` (a
test checks that the page matches :func:`glossary_markdown`).

To add a metric, call :func:`register_metric` with one :class:`MetricSpec` (or add it to the table below; see
``docs/extending.md``); :func:`unregister_metric` removes it again.

Keys are namespaced and stable (they end up on dashboards): ``ctx_reliance/<metric>`` over all probes and
``ctx_reliance/<family>/<metric>`` per family.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np

from .errors import ConfigurationError
from .metric_spec import (
    CONTINUOUS,
    HIT,
    METRIC_PREFIX,
    MODES,
    MetricNames,
    MetricRegistry,
    MetricSpec,
)
from .score_table import ScoreTable, better, hit

__all__ = [
    "AMBIGUITY_MARGIN",
    "CONFIDENCE",
    "CONTINUOUS",
    "DERIVED_KEYS",
    "HIT",
    "INTERVAL_METRICS",
    "METRICS",
    "METRIC_DESCRIPTIONS",
    "METRIC_PREFIX",
    "MODES",
    "PARAMETRIC_METRICS",
    "MetricSpec",
    "ScoreTable",
    "compute_metrics",
    "derived_glossary_markdown",
    "glossary_markdown",
    "metric_key",
    "metric_spec",
    "register_metric",
    "unregister_metric",
]

#: Confidence of the logged intervals and of the paired comparison of two probe events.
CONFIDENCE = 0.95


# -- per-probe definitions -------------------------------------------------------------------------------------
# Log-likelihood mode: scores are log-probabilities. Generation mode: scores are 1.0/0.0 hits.


def _counterfactual_wins(t: ScoreTable) -> np.ndarray:
    """The counterfactual answer wins (log-likelihood mode) or is generated (generation mode)."""
    return hit(t.counterfactual()) if t.is_generation else better(t.counterfactual(), t.rival())


def _parametric_wins(t: ScoreTable, variant: str) -> np.ndarray:
    """The parametric answer wins over every other answer (or is generated) under ``variant``."""
    return hit(t.parametric(variant)) if t.is_generation else t.parametric_wins(variant)


def _parametric_wins_under(variant: str) -> Callable[[ScoreTable], np.ndarray]:
    """:func:`_parametric_wins` under ``variant``, as a per-probe function (picklable, like the table's others)."""
    return functools.partial(_parametric_wins, variant=variant)


def _both_generated(t: ScoreTable) -> np.ndarray:
    return _generated(t, 1.0)


def _neither_generated(t: ScoreTable) -> np.ndarray:
    return _generated(t, 0.0)


def _generated(t: ScoreTable, target: float) -> np.ndarray:
    """1.0 where the counterfactual answer and its rival are both ``target`` (1.0: both generated, 0.0: neither)."""
    cf, rival = t.counterfactual(), t.rival()
    out = ((cf == target) & (rival == target)).astype(np.float64)
    out[np.isnan(cf) | np.isnan(rival)] = np.nan
    return out


def _counterfactual_probability(t: ScoreTable) -> np.ndarray:
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-(t.counterfactual() - t.rival())))


def _logprob_margin(t: ScoreTable) -> np.ndarray:
    return t.counterfactual() - t.rival()


def _context_lift(t: ScoreTable) -> np.ndarray:
    return t.counterfactual() - t.counterfactual("closed_book")


#: ``ambiguous_rate``'s margin, in nats: a probe whose two answers' log-likelihoods under the counterfactual context
#: are closer than this has no clear label (1.0, as the replication of Goyal et al. by GIRIAYUSH uses).
AMBIGUITY_MARGIN = 1.0


def _ambiguous(t: ScoreTable) -> np.ndarray:
    """1.0 where |log p(cf) - log p(rival)| < :data:`AMBIGUITY_MARGIN` under the counterfactual context."""
    gap = np.abs(t.counterfactual() - t.rival())
    out = (gap < AMBIGUITY_MARGIN).astype(np.float64)
    out[np.isnan(gap)] = np.nan
    return out


def _ignores_irrelevant(t: ScoreTable) -> np.ndarray:
    """Under another probe's passage: the parametric answer wins over the passage's entity (the lure) and every other
    answer; generation mode: the output names the parametric answer and not the lure."""
    if not t.is_generation:
        return t.parametric_wins("irrelevant")
    par, lure = t.parametric("irrelevant"), t.counterfactual("irrelevant")
    out = ((par == 1) & (lure == 0)).astype(np.float64)
    out[np.isnan(par) | np.isnan(lure)] = np.nan
    return out


def _utilises_context(t: ScoreTable) -> np.ndarray:
    """Right under all three contexts (CUB-style): follows the conflicting one, answers the aligned one with the true
    fact, ignores the irrelevant one. A product of 1.0/0.0 outcomes: NaN where any part is missing."""
    return _counterfactual_wins(t) * _parametric_wins(t, "aligned") * _ignores_irrelevant(t)


# -- group aggregates of the metrics that are no mean over probes ----------------------------------------------


def _memorization_ratio(t: ScoreTable) -> float:
    valid = t.context_valid() & ~np.isnan(t.parametric())
    cf, par = t.counterfactual()[valid], t.parametric()[valid]
    total_hits = cf.sum() + par.sum()
    return float(par.sum() / total_hits) if total_hits > 0 else float("nan")


def _num_probes(t: ScoreTable) -> float:
    return float(t.scores.shape[0])


LOGLIK, GENERATE = MODES
BOTH = MODES

#: The metric table, in display order: a :class:`~ctx_callback.metric_spec.MetricRegistry` (a read-only sequence of
#: :class:`MetricSpec`). Add a metric here or with :func:`register_metric`, and nowhere else.
METRICS: MetricRegistry = MetricRegistry((
    MetricSpec(
        "counterfactual_accuracy",
        "share of probes where the model follows the context: log-likelihood mode, log p(counterfactual | context) "
        "> log p(parametric | context) (multiple choice: above every other option); generation mode, the output "
        "contains the counterfactual answer",
        short="cf", modes=BOTH, per_probe=_counterfactual_wins, outcome=HIT, interval=True, in_summary_table=True,
        plot_label="counterfactual accuracy (follows context)",
    ),
    MetricSpec(
        "parametric_accuracy",
        "share of probes where the model answers from memory despite the context (parametric answer preferred, or "
        "contained in the output; multiple choice: over every other option, probes without a known parametric "
        "option skipped)",
        short="par", modes=BOTH, per_probe=_parametric_wins_under("context"), outcome=HIT, interval=True,
        needs_parametric=True, greater_is_better=False, in_summary_table=True,
        plot_label="parametric accuracy (answers from memory)",
    ),
    MetricSpec(
        "closed_book_accuracy",
        "share of probes whose parametric answer the model prefers (or generates) with no context: does it know "
        "the fact?",
        short="cb", modes=BOTH, per_probe=_parametric_wins_under("closed_book"), outcome=HIT, interval=True,
        needs_parametric=True, requires="closed_book", in_summary_table=True,
        plot_label="closed-book accuracy (knows the fact)",
    ),
    MetricSpec(
        "aligned_accuracy",
        "share of probes answered with the true fact when the context states it (aligned control)",
        short="al", modes=BOTH, per_probe=_parametric_wins_under("aligned"), outcome=HIT, requires="aligned",
        needs_parametric=True, in_summary_table=True,
    ),
    MetricSpec(
        "counterfactual_probability",
        "mean of p_cf / (p_cf + p_par) under the counterfactual context (log-likelihood mode; multiple choice: "
        "p_par = the best other option)",
        short="p_cf", modes=(LOGLIK,), per_probe=_counterfactual_probability, outcome=CONTINUOUS, bounds=(0.0, 1.0),
    ),
    MetricSpec(
        "logprob_margin",
        "mean of log p(counterfactual) - log p(parametric) under the counterfactual context, in nats "
        "(log-likelihood mode; multiple choice: minus the best other option)",
        short="margin", modes=(LOGLIK,), per_probe=_logprob_margin, outcome=CONTINUOUS,
    ),
    MetricSpec(
        "context_lift",
        "mean of log p(cf | counterfactual context) - log p(cf | no context), in nats: how much the context moves "
        "the model (log-likelihood mode)",
        short="lift", modes=(LOGLIK,), per_probe=_context_lift, outcome=CONTINUOUS, requires="closed_book",
    ),
    MetricSpec(
        "irrelevant_robustness",
        "share of probes answered from memory after an irrelevant passage of the same family (another probe's): the "
        "parametric answer beats the passage's entity (generation: named, and the entity not)",
        short="irr", modes=BOTH, per_probe=_ignores_irrelevant, outcome=HIT, requires="irrelevant",
        needs_parametric=True, in_summary_table=True,
    ),
    MetricSpec(
        "utilisation",
        "share of probes handled right under all three contexts: follows the conflicting one, answers the aligned one "
        "with the true fact, ignores the irrelevant one (CUB-style; its parts: counterfactual_accuracy, "
        "aligned_accuracy, irrelevant_robustness)",
        short="util", modes=BOTH, per_probe=_utilises_context, outcome=HIT, requires=("aligned", "irrelevant"),
        needs_parametric=True,
    ),
    MetricSpec(
        "ambiguous_rate",
        "share of probes whose two answers' log-likelihoods under the counterfactual context differ by less than "
        "1.0 nat (AMBIGUITY_MARGIN): their log-likelihood label is not clear-cut (log-likelihood mode)",
        short="ambig", modes=(LOGLIK,), per_probe=_ambiguous, outcome=HIT, greater_is_better=False,
    ),
    MetricSpec(
        "both_rate", "share of outputs containing both answers (generation mode; multiple choice: the "
        "counterfactual and another option)",
        short="both", modes=(GENERATE,), per_probe=_both_generated, outcome=HIT, greater_is_better=False,
    ),
    MetricSpec(
        "neither_rate", "share of outputs containing neither answer (generation mode; multiple choice: no option)",
        short="neither", modes=(GENERATE,), per_probe=_neither_generated, outcome=HIT, greater_is_better=False,
    ),
    MetricSpec(
        "memorization_ratio",
        "parametric hits / (parametric + counterfactual hits) over outputs (generation mode)",
        short="mem", modes=(GENERATE,), compute=_memorization_ratio, greater_is_better=False,
        needs_parametric=True,
    ),
    MetricSpec(
        "num_probes", "number of probes the metrics are computed on",
        short="probes", modes=BOTH, compute=_num_probes, monitorable=False,
    ),
))

#: Overall metrics that get uncertainty keys besides the monitored one (those a round scored): the metrics of
#: :data:`METRICS` flagged ``interval=True``, a live view that follows :func:`register_metric`.
INTERVAL_METRICS: Sequence[str] = MetricNames(lambda: METRICS, lambda spec: spec.interval)

#: Metrics that read the parametric answer (the true fact; ``needs_parametric=True``): NaN over probes without one. A
#: live view of :data:`METRICS`.
PARAMETRIC_METRICS: Sequence[str] = MetricNames(lambda: METRICS, lambda spec: spec.needs_parametric)


def register_metric(spec: MetricSpec) -> MetricSpec:
    """Add a metric to :data:`METRICS`, after the others: from then on it is computed and logged at every probe event,
    can be monitored (with intervals and the paired test of ``significant_decline`` when it has per-probe values),
    has a column in the command line's tables (``in_summary_table`` for ``scan``'s default) and a glossary row.

    Args:
        spec: The metric. Give ``per_probe=fn(table) -> one value per probe`` and ``outcome`` (``"hit"`` or
            ``"continuous"``) so that it gets intervals and paired tests; ``compute`` alone for a metric that is no
            mean over probes.

    Returns:
        ``spec``.

    Raises:
        ConfigurationError: A malformed spec, or a name or short label already taken.
    """
    return METRICS.register(spec)


def unregister_metric(name: str) -> MetricSpec:
    """Remove the metric called ``name`` from :data:`METRICS` (e.g. one a test registered) and return it.

    Raises:
        ConfigurationError: No metric has that name.
    """
    return METRICS.unregister(name)


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
    """The metric glossary table of ``docs/metrics.md``, rendered from :data:`METRICS`."""
    lines = ["| metric | column | modes | needs | better | meaning |", "|---|---|---|---|---|---|"]
    for spec in METRICS:
        modes = "both" if set(spec.modes) == set(MODES) else ", ".join(spec.modes)
        needs = ", ".join(f"`{variant}`" for variant in spec.required_variants)
        direction = "" if not spec.monitorable else ("higher" if spec.greater_is_better else "lower")
        meaning = spec.description.replace("|", "&#124;")
        lines.append(f"| `{spec.name}` | `{spec.short}` | {modes} | {needs} | {direction} | {meaning} |")
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
    specs = [spec for spec in METRICS if spec.exists_for(mode, variant_index)]
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
#: ``closed_book_accuracy`` overall. Rendered into ``docs/metrics.md`` by :func:`derived_glossary_markdown`
#: (test-enforced).
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
    ("decline_share/<family>", "that family's share of the monitored metric's decline from the peak event: the sum "
                               "of its probes' declines over the sum of all (the families sum to 1; negative: it "
                               "improved); logged only while the metric is below its peak event (ctx_callback."
                               "decline_share)"),
    ("decline_share/<family>/<relation>", "the same share for the probes of one relation (metadata['relation'], "
                                          "e.g. world_facts/capital)"),
    ("flips_to_memory", "probes that preferred the context's answer at the peak event and prefer the memorised one "
                        "now"),
    ("flips_to_context", "probes that preferred the memorised answer at the peak event and prefer the context's now"),
    ("flips_since_previous", "probes whose preferred answer changed since the previous probe event"),
    ("label_check/agreement", "with label_check_every: share of the sampled probes whose greedy answer names the "
                              "answer their log-likelihood prefers under the counterfactual context (an output naming "
                              "none or several answers disagrees; ctx_callback.label_check)"),
    ("label_check/agreement_ci_low", "lower end of its 95% Wilson interval"),
    ("label_check/agreement_ci_high", "upper end of that interval"),
    ("label_check/undecided_rate", "share of the sampled outputs naming none or several of the answers"),
    ("label_check/probes", "the sample's size (diagnostic_probes, at most the monitored probes)"),
    ("label_check/seconds", "what the label check cost at this event"),
    ("attention/context_share", "with attention_every: attention from the answer position (the last prompt token) to "
                                "the context's tokens, summed over them, averaged over heads, layers and the sampled "
                                "probes (ctx_callback.attention)"),
    ("attention/layer_<NN>", "the same share in layer NN (00 = the first), averaged over heads and probes"),
    ("attention/uniform_share", "the context's share of the prompt's tokens: what uniform attention would give"),
    ("attention/probes", "probes measured (the sample, less any whose context tokens could not be located)"),
    ("attention/seconds", "what the attention measurement cost at this event"),
    ("consumed/examples", "with audit=: training examples the optimizer steps since the previous probe event consumed "
                          "(where the sampler can be followed: ctx_callback.consumed)"),
    ("consumed/<category>_share", "with audit=: share of those examples in the audit category context_critical, "
                                  "non_context_critical or parametric"),
)


def derived_glossary_markdown() -> str:
    """The table of derived keys in ``docs/metrics.md`` (:data:`DERIVED_KEYS`)."""
    lines = ["| key | meaning |", "|---|---|"]
    lines += [f"| `{METRIC_PREFIX}/{key}` | {meaning.replace('|', '&#124;')} |" for key, meaning in DERIVED_KEYS]
    return "\n".join(lines)
