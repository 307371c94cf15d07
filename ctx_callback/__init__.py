"""ctx_callback: watch context reliance during supervised fine-tuning.

Goyal, Baek, Kolter and Raghunathan (ICLR 2025, "Context-Parametric Inversion") showed that during instruction
fine-tuning a model's reliance on its context, under knowledge conflicts, first rises and then falls. This package
measures it while you train: counterfactual probes, a fast forward-only scorer, and a ``TrainerCallback`` that logs
the metrics to your tracker, stops at the peak and keeps the peak checkpoint.

Names are imported lazily, so ``import ctx_callback`` (and the command line's ``--help``) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> the module that defines it (imported on first access).
_EXPORTS = {
    "AuditResult": "audit",
    "audit_dataset": "audit",
    "augment_dataset": "audit",
    "filter_dataset": "audit",
    "probes_from_qa": "audit",
    "ContextRelianceCallback": "callback",
    "DeferredContextRelianceCallback": "deferred_callback",
    "ProbeEvent": "decisions",
    "StopDecision": "decisions",
    "StopRule": "decisions",
    "make_stop_rules": "decisions",
    "ALL_VARIANTS": "encoding",
    "DEFAULT_VARIANTS": "encoding",
    "EncodedProbes": "encoding",
    "encode_probes": "encoding",
    "AuditDataError": "errors",
    "CheckpointMismatchError": "errors",
    "ConfigurationError": "errors",
    "ConfigurationTypeError": "errors",
    "CtxCallbackError": "errors",
    "ModelLoadError": "errors",
    "ProbeFormatError": "errors",
    "ProbeLengthError": "errors",
    "ProbeSourceError": "errors",
    "TrainerWiringError": "errors",
    "UnsafeFileError": "errors",
    "UnsupportedTrainerError": "errors",
    "PROMPT_PRESETS": "formatting",
    "PromptFormat": "formatting",
    "METRICS": "metrics",
    "METRIC_DESCRIPTIONS": "metrics",
    "MetricSpec": "metrics",
    "compute_metrics": "metrics",
    "metric_key": "metrics",
    "register_metric": "metrics",
    "unregister_metric": "metrics",
    "ProbeLog": "outcomes",
    "compute_flips": "outcomes",
    "metric_outcomes": "outcomes",
    "PeakDecision": "peak",
    "PeakTracker": "peak",
    "PROBE_FORMATS": "probe_formats",
    "register_probe_format": "probe_formats",
    "PROBE_PRESETS": "presets",
    "ProbePreset": "presets",
    "register_probe_preset": "presets",
    "StopRequestCallback": "remote_stop",
    "BUILTIN_SUITES": "probes",
    "Probe": "probes",
    "load_probes": "probes",
    "probes_from_records": "probes",
    "ProbeScorer": "scoring",
    "ScoreReport": "scoring",
    "ScoreResult": "scoring",
}

__all__ = [
    "ALL_VARIANTS",
    "AuditDataError",
    "AuditResult",
    "BUILTIN_SUITES",
    "CheckpointMismatchError",
    "ConfigurationError",
    "ConfigurationTypeError",
    "ContextRelianceCallback",
    "CtxCallbackError",
    "DEFAULT_VARIANTS",
    "DeferredContextRelianceCallback",
    "EncodedProbes",
    "METRICS",
    "METRIC_DESCRIPTIONS",
    "MetricSpec",
    "ModelLoadError",
    "PROBE_FORMATS",
    "PROBE_PRESETS",
    "PROMPT_PRESETS",
    "PeakDecision",
    "PeakTracker",
    "Probe",
    "ProbeEvent",
    "ProbeFormatError",
    "ProbeLengthError",
    "ProbeLog",
    "ProbePreset",
    "ProbeScorer",
    "ProbeSourceError",
    "PromptFormat",
    "ScoreReport",
    "ScoreResult",
    "StopDecision",
    "StopRequestCallback",
    "StopRule",
    "TrainerWiringError",
    "UnsafeFileError",
    "UnsupportedTrainerError",
    "audit_dataset",
    "augment_dataset",
    "compute_flips",
    "compute_metrics",
    "encode_probes",
    "filter_dataset",
    "load_probes",
    "make_stop_rules",
    "metric_key",
    "metric_outcomes",
    "probes_from_qa",
    "probes_from_records",
    "register_metric",
    "register_probe_format",
    "register_probe_preset",
    "unregister_metric",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from .audit import AuditResult, audit_dataset, augment_dataset, filter_dataset, probes_from_qa
    from .callback import ContextRelianceCallback
    from .decisions import ProbeEvent, StopDecision, StopRule, make_stop_rules
    from .deferred_callback import DeferredContextRelianceCallback
    from .encoding import ALL_VARIANTS, DEFAULT_VARIANTS, EncodedProbes, encode_probes
    from .errors import (
        AuditDataError,
        CheckpointMismatchError,
        ConfigurationError,
        ConfigurationTypeError,
        CtxCallbackError,
        ModelLoadError,
        ProbeFormatError,
        ProbeLengthError,
        ProbeSourceError,
        TrainerWiringError,
        UnsafeFileError,
        UnsupportedTrainerError,
    )
    from .formatting import PROMPT_PRESETS, PromptFormat
    from .metrics import (
        METRIC_DESCRIPTIONS,
        METRICS,
        MetricSpec,
        compute_metrics,
        metric_key,
        register_metric,
        unregister_metric,
    )
    from .outcomes import ProbeLog, compute_flips, metric_outcomes
    from .peak import PeakDecision, PeakTracker
    from .presets import PROBE_PRESETS, ProbePreset, register_probe_preset
    from .probe_formats import PROBE_FORMATS, register_probe_format
    from .probes import BUILTIN_SUITES, Probe, load_probes, probes_from_records
    from .remote_stop import StopRequestCallback
    from .scoring import ProbeScorer, ScoreReport, ScoreResult


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ctx_callback' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
