"""Audit SFT data for the examples that cause the context-parametric inversion, and act on it.

Goyal et al. (ICLR 2025) trace the fall of context reliance during instruction tuning to examples whose context only
repeats what the model already knows (*non-context-critical*): the model can answer them from memory, so it learns
to. This package finds them in your own data and offers the paper's two mitigations:

- :func:`audit_dataset`: score every example with and without its context (forward-only, on the probe engines) and
  categorise it: ``context_critical``, ``non_context_critical`` or ``parametric`` (no context);
- :func:`filter_dataset`: drop the non-context-critical examples (or weight them), keeping every other column; rows
  are matched to the audit by content (:func:`row_keys`), so the audited dataset may come back in another order;
- :func:`augment_dataset`: add counterfactual copies of your context examples (the answer span replaced, in context
  and target, by another answer of the same shape from the data);
- :func:`probes_from_qa`: the same substitution as :class:`~ctx_callback.Probe` s in your own domain, for the callback.

Where the context is in each data format: :mod:`ctx_callback.audit.adapters`; the rules:
:mod:`ctx_callback.audit.rules`; the scoring: :mod:`ctx_callback.audit.scoring`.
"""

from __future__ import annotations

from .adapters import AUDIT_FORMATS, AuditExample, AuditFormat, register_audit_format
from .core import AuditResult, audit_dataset, key_columns, load_audit_data, prepare_examples, row_keys
from .mitigate import (
    MAX_FRACTION,
    Substitution,
    answer_shape,
    augment_dataset,
    counterfactual_substitutions,
    filter_dataset,
    probes_from_qa,
)
from .rules import CATEGORIES, RULES, STATISTICS, AuditRule, categorize, resolve_rule

__all__ = [
    "AUDIT_FORMATS",
    "CATEGORIES",
    "MAX_FRACTION",
    "RULES",
    "STATISTICS",
    "AuditExample",
    "AuditFormat",
    "AuditResult",
    "AuditRule",
    "Substitution",
    "answer_shape",
    "audit_dataset",
    "augment_dataset",
    "categorize",
    "counterfactual_substitutions",
    "filter_dataset",
    "key_columns",
    "load_audit_data",
    "prepare_examples",
    "probes_from_qa",
    "register_audit_format",
    "resolve_rule",
    "row_keys",
]
