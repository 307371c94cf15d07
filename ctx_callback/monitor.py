"""Which metric defines the peak: name parsing, direction and validation (shared by the callback and the CLI).

Everything it knows about metrics comes from the metric table (:data:`ctx_callback.metrics.METRICS`). Kept free of
torch and transformers so that the command line's ``--help`` and argument errors stay fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from . import metrics as _metrics
from .errors import ConfigurationError
from .metrics import METRIC_PREFIX, MODES, PARAMETRIC_METRICS, MetricSpec, metric_key

__all__ = [
    "DEFAULT_MONITORS",
    "NEEDS_PARAMETRIC",
    "Monitor",
    "default_monitor",
    "monitorable_metrics",
    "parse_monitor",
]

#: The monitor used when none is given, per scoring mode. Log-likelihood mode: ``counterfactual_probability``, chosen by
#: measurement (``docs/stopping.md``, "Which monitor?"): against a held-out generation reference it ranked the example's
#: checkpoints better than ``counterfactual_accuracy`` (Spearman 0.89 vs 0.67), does not saturate at the ceiling, and
#: its paired test gave ``stop_rule="significant_decline"`` far more power at 50-100 probes than McNemar on accuracy at
#: the same false-stop rate (``docs/stopping.md``, "How many probes do I need?"). Generation mode has no probabilities:
#: ``counterfactual_accuracy`` (the paper's metric).
DEFAULT_MONITORS: dict[str, str] = {"loglik": "counterfactual_probability", "generate": "counterfactual_accuracy"}

#: Metrics that read the parametric answer (the true fact): a probe without one (a multiple-choice probe whose dataset
#: does not say which option is true, FaithEval) is skipped by them, so over such probes alone they are NaN at every
#: event (see :class:`~ctx_callback.probes.Probe`, ``parametric_answer``). A live view of the metric definitions'
#: ``needs_parametric`` flags (:data:`ctx_callback.metrics.PARAMETRIC_METRICS`), registered metrics included.
NEEDS_PARAMETRIC: Sequence[str] = PARAMETRIC_METRICS


@dataclass(frozen=True)
class Monitor:
    """A parsed monitor: the logged key, the metric name, the family (``None`` = overall) and its direction."""

    key: str
    metric: str
    family: str | None
    greater_is_better: bool


def monitorable_metrics(mode: str | None = None) -> list[MetricSpec]:
    """Metrics ``monitor=`` may name in ``mode`` (any mode when ``None``), in table order."""
    return [spec for spec in _metrics.METRICS if spec.monitorable and (mode is None or mode in spec.modes)]


def default_monitor(mode: str | None) -> str:
    """The monitor used when none is given: :data:`DEFAULT_MONITORS` for ``mode``; ``counterfactual_accuracy`` (it
    exists in both modes) for ``None``.

    Raises:
        ConfigurationError: Unknown mode.
    """
    if mode is None:
        return "counterfactual_accuracy"
    if mode not in DEFAULT_MONITORS:
        raise ConfigurationError(f"mode must be one of {list(MODES)}, got {mode!r}.")
    return DEFAULT_MONITORS[mode]


def parse_monitor(monitor: str | None, mode: str | None = None, variants: Sequence[str] | None = None) -> Monitor:
    """Parse ``"counterfactual_accuracy"``, ``"world_facts/counterfactual_accuracy"`` or a full logged key.

    Args:
        monitor: The user's name for the metric; ``eval_`` and ``ctx_reliance/`` prefixes are accepted. ``None``:
            :func:`default_monitor` of ``mode``.
        mode: The scoring mode the metric must exist in; ``None`` accepts a metric of either mode.
        variants: The probe variants being scored; ``None`` skips the check that the metric's variant is scored.

    Raises:
        ConfigurationError: Malformed name, unknown metric for ``mode``, or a metric that needs a variant not scored.
    """
    if mode is not None and mode not in MODES:
        raise ConfigurationError(f"mode must be one of {list(MODES)}, got {mode!r}.")
    if monitor is None:
        monitor = default_monitor(mode)
    if not isinstance(monitor, str):
        raise ConfigurationError(f"monitor must be a metric name (str) or None, got {type(monitor).__name__}.")
    name = monitor
    for prefix in ("eval_", f"{METRIC_PREFIX}/"):
        if name.startswith(prefix):
            name = name[len(prefix):]
    parts = name.split("/")
    if len(parts) > 2 or not all(parts):
        raise ConfigurationError(
            f"monitor {monitor!r} must look like 'counterfactual_accuracy' or 'world_facts/counterfactual_accuracy'."
        )
    metric = parts[-1]
    allowed = {spec.name: spec for spec in monitorable_metrics(mode)}
    if metric not in allowed:
        where = f" for mode={mode!r}" if mode is not None else ""
        raise ConfigurationError(f"Unknown monitor metric {metric!r}{where}; choose one of {list(allowed)}.")
    spec = allowed[metric]
    missing = [v for v in spec.required_variants if variants is not None and v not in variants]
    if missing:
        raise ConfigurationError(f"monitor {metric!r} needs the {' and '.join(map(repr, missing))} variant(s); add "
                                 "them to variants.")
    family = parts[0] if len(parts) == 2 else None
    return Monitor(key=metric_key(metric, family), metric=metric, family=family,
                   greater_is_better=spec.greater_is_better)
