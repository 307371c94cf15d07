"""Which metric defines the peak: name parsing, direction and validation (shared by the callback and the CLI).

Kept free of torch and transformers so that the command line's ``--help`` and argument errors stay fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .metrics import METRIC_DESCRIPTIONS, METRIC_PREFIX

__all__ = ["GENERATE_ONLY", "LOGLIK_ONLY", "LOWER_IS_BETTER", "Monitor", "parse_monitor"]

#: Metrics that exist only in log-likelihood mode.
LOGLIK_ONLY = frozenset({"counterfactual_probability", "logprob_margin", "context_lift"})
#: Metrics that exist only in generation mode.
GENERATE_ONLY = frozenset({"both_rate", "neither_rate", "memorization_ratio"})
#: Metrics whose peak is a minimum (less reliance on memory is better).
LOWER_IS_BETTER = frozenset({"parametric_accuracy", "memorization_ratio", "neither_rate", "both_rate"})
_NEEDS_VARIANT = {"closed_book_accuracy": "closed_book", "context_lift": "closed_book", "aligned_accuracy": "aligned"}


@dataclass(frozen=True)
class Monitor:
    """A parsed monitor: the logged key, the metric name, the family (``None`` = overall) and its direction."""

    key: str
    metric: str
    family: str | None
    greater_is_better: bool


def parse_monitor(monitor: str, mode: str, variants: Sequence[str]) -> Monitor:
    """Parse ``"counterfactual_accuracy"``, ``"world_facts/counterfactual_accuracy"`` or a full logged key.

    Raises:
        ValueError: Malformed name, unknown metric for ``mode``, or a metric that needs a variant not scored.
    """
    name = monitor
    for prefix in ("eval_", f"{METRIC_PREFIX}/"):
        if name.startswith(prefix):
            name = name[len(prefix):]
    parts = name.split("/")
    if len(parts) > 2 or not all(parts):
        raise ValueError(
            f"monitor {monitor!r} must look like 'counterfactual_accuracy' or 'world_facts/counterfactual_accuracy'."
        )
    metric = parts[-1]
    allowed = [m for m in METRIC_DESCRIPTIONS if m != "num_probes"
               and not (mode == "loglik" and m in GENERATE_ONLY) and not (mode == "generate" and m in LOGLIK_ONLY)]
    if metric not in allowed:
        raise ValueError(f"Unknown monitor metric {metric!r} for mode={mode!r}; choose one of {allowed}.")
    needed = _NEEDS_VARIANT.get(metric)
    if needed is not None and needed not in variants:
        raise ValueError(f"monitor {metric!r} needs the {needed!r} variant; add it to variants.")
    return Monitor(key=f"{METRIC_PREFIX}/{name}", metric=metric, family=parts[0] if len(parts) == 2 else None,
                   greater_is_better=metric not in LOWER_IS_BETTER)
