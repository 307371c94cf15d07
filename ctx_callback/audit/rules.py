"""Categorisation rules: which context examples are *non-context-critical*.

Every example gets one category:

- ``"parametric"``: no context at all;
- ``"non_context_critical"``: it has a context, and by the rule its target is predictable without it;
- ``"context_critical"``: it has a context, and the rule does not flag it;
- ``"too_long"``: it does not fit the model (reported, never scored, kept by
  :func:`~ctx_callback.audit.filter_dataset`);
- ``"invalid"``: an empty target skipped with ``invalid="skip"`` (not scored, kept by ``filter_dataset``).

A rule is a *statistic* computed per context example and a *cut*: the lowest ``quantile`` of the statistic among
the context examples (the paper's rule), or every value at most ``threshold``. Statistics (lower = more predictable
without the context):

- ``"nll_without_mean"``: mean per-token NLL of the target without the context (log-perplexity; the paper's);
- ``"nll_without_sum"``: the summed NLL of the (first ``max_target_tokens``) target tokens without the context;
- ``"context_gain_mean"`` / ``"context_gain_sum"``: NLL without minus NLL with the context (how much the context
  helps), per token / summed.

Named rules: ``"paper"`` (lowest 25% of ``nll_without_mean``, the paper's perplexity rule) and ``"default"`` (lowest
25% of ``nll_without_sum``; why summed and not per token: see ``docs/audit.md``, "Why is reliance falling? Audit your
data", measured on SmolLM2: per-token means let the predictable tails of multi-token answers hide unknown first
tokens). Pure Python + math, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from ..errors import ConfigurationError

__all__ = ["CATEGORIES", "RULES", "STATISTICS", "AuditRule", "categorize", "resolve_rule", "statistic_value"]

#: Every category, in table order.
CATEGORIES: tuple[str, ...] = ("context_critical", "non_context_critical", "parametric", "too_long", "invalid")

#: Statistic name -> description (lower = more predictable without the context).
STATISTICS: dict[str, str] = {
    "nll_without_sum": "summed NLL of the target without the context",
    "nll_without_mean": "mean per-token NLL of the target without the context (log-perplexity)",
    "context_gain_sum": "summed NLL without minus with the context",
    "context_gain_mean": "mean per-token NLL without minus with the context",
}


@dataclass(frozen=True)
class AuditRule:
    """How context examples are split into context-critical and non-context-critical.

    Attributes:
        statistic: A key of :data:`STATISTICS`.
        quantile: Flag the lowest ``quantile`` share of the context examples (used when ``threshold`` is ``None``).
        threshold: Flag every context example whose statistic is at most this value (overrides ``quantile``).
        name: A label for the summary (``"paper"``, ``"default"`` or ``"custom"``).
    """

    statistic: str = "nll_without_sum"
    quantile: float = 0.25
    threshold: float | None = None
    name: str = "custom"

    def __post_init__(self) -> None:
        if self.statistic not in STATISTICS:
            raise ConfigurationError(f"statistic must be one of {list(STATISTICS)}, got {self.statistic!r}.")
        if self.threshold is None and not 0.0 <= self.quantile <= 1.0:
            raise ConfigurationError(f"quantile must be between 0 and 1 (a share of the context examples), got "
                                     f"{self.quantile!r}.")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise ConfigurationError(f"threshold must be a finite number, got {self.threshold!r}.")

    @property
    def description(self) -> str:
        """One line: the statistic and the cut."""
        cut = (f"{self.statistic} <= {self.threshold:g}" if self.threshold is not None
               else f"lowest {self.quantile:.0%} of {self.statistic} among context examples")
        return f"{self.name}: {cut}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: The named rules.
RULES: dict[str, AuditRule] = {
    "default": AuditRule("nll_without_sum", 0.25, None, "default"),
    "paper": AuditRule("nll_without_mean", 0.25, None, "paper"),
}


def resolve_rule(
    rule: str | AuditRule | None = "default",
    *,
    statistic: str | None = None,
    quantile: float | None = None,
    threshold: float | None = None,
) -> AuditRule:
    """A rule by name (or as given), with any of its fields overridden.

    Raises:
        ConfigurationError: Unknown rule name or statistic, a quantile outside [0, 1], both quantile and threshold.
    """
    if quantile is not None and threshold is not None:
        raise ConfigurationError("give either quantile= or threshold=, not both (a rule cuts one way).")
    if rule is None:
        rule = "default"
    if isinstance(rule, str):
        if rule not in RULES:
            raise ConfigurationError(f"rule must be one of {list(RULES)} or an AuditRule, got {rule!r}.")
        base = RULES[rule]
    elif isinstance(rule, AuditRule):
        base = rule
    else:
        raise ConfigurationError(f"rule must be a name ({list(RULES)}) or an AuditRule, got {type(rule).__name__}.")
    changes: dict[str, Any] = {}
    if statistic is not None:
        changes["statistic"] = statistic
    if quantile is not None:
        changes.update(quantile=float(quantile), threshold=None)
    if threshold is not None:
        changes["threshold"] = float(threshold)
    if changes:
        changes.setdefault("name", "custom" if base.name not in RULES else base.name + "+custom")
        return replace(base, **changes)
    return base


def statistic_value(record: Mapping[str, Any], statistic: str) -> float | None:
    """The statistic of one audit record (``None`` for an example without context or not scored)."""
    if record.get("logprob_with") is None or record.get("logprob_without") is None:
        return None
    if statistic == "nll_without_sum":
        return float(record["nll_without_context_sum"])
    if statistic == "nll_without_mean":
        return float(record["nll_without_context"])
    if statistic == "context_gain_sum":
        return float(record["nll_without_context_sum"] - record["nll_with_context_sum"])
    if statistic == "context_gain_mean":
        return float(record["context_gain"])
    raise ConfigurationError(f"statistic must be one of {list(STATISTICS)}, got {statistic!r}.")


def categorize(records: Sequence[Mapping[str, Any]], rule: AuditRule) -> tuple[list[str], float | None]:
    """The category of each record, and the cut-off value of the statistic.

    Quantile rule: the ``round(quantile * n)`` context examples with the lowest statistic (ties by dataset order) are
    non-context-critical; the cut-off is the largest flagged value (``None`` when none is flagged).

    Returns:
        ``(categories, cutoff)``.
    """
    categories: list[str] = []
    values: list[tuple[float, int]] = []
    for position, record in enumerate(records):
        if record.get("too_long"):
            categories.append("too_long")
        elif not record.get("has_context"):
            categories.append("parametric")
        else:
            categories.append("context_critical")
            value = statistic_value(record, rule.statistic)
            if value is not None and math.isfinite(value):
                values.append((value, position))
    cutoff: float | None
    if rule.threshold is not None:
        cutoff = rule.threshold
        flagged = [position for value, position in values if value <= rule.threshold]
    else:
        k = int(math.floor(rule.quantile * len(values) + 0.5))
        ranked = sorted(values)[:k]
        flagged = [position for _, position in ranked]
        cutoff = ranked[-1][0] if ranked else None
    for position in flagged:
        categories[position] = "non_context_critical"
    return categories, cutoff
