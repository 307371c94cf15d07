"""ctx_callback: watch context reliance during supervised fine-tuning.

Goyal, Baek, Kolter and Raghunathan (ICLR 2025, "Context-Parametric Inversion") showed that during instruction
fine-tuning a model's reliance on its context, under knowledge conflicts, first rises and then falls. This package
measures it while you train: counterfactual probes, a fast forward-only scorer, and a ``TrainerCallback`` that logs
the metrics to your tracker, stops at the peak and keeps the peak checkpoint.
"""

from .encoding import ALL_VARIANTS, EncodedProbes, encode_probes
from .formatting import PROMPT_PRESETS, PromptFormat
from .metrics import METRIC_DESCRIPTIONS, compute_metrics, metric_key
from .peak import PeakDecision, PeakTracker
from .probes import BUILTIN_SUITES, Probe, ProbeFormatError, load_probes, probes_from_records
from .scoring import ProbeScorer, ScoreReport, ScoreResult

__version__ = "0.1.0"

__all__ = [
    "ALL_VARIANTS",
    "BUILTIN_SUITES",
    "METRIC_DESCRIPTIONS",
    "PROMPT_PRESETS",
    "ContextRelianceCallback",
    "EncodedProbes",
    "PeakDecision",
    "PeakTracker",
    "Probe",
    "ProbeFormatError",
    "ProbeScorer",
    "PromptFormat",
    "ScoreReport",
    "ScoreResult",
    "compute_metrics",
    "encode_probes",
    "load_probes",
    "metric_key",
    "probes_from_records",
]


def __getattr__(name: str):
    # The callback imports transformers' Trainer (slow); load it on first use.
    if name == "ContextRelianceCallback":
        from .callback import ContextRelianceCallback

        return ContextRelianceCallback
    raise AttributeError(f"module 'ctx_callback' has no attribute {name!r}")
