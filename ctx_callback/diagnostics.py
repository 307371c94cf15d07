"""The slower checks of a probe event: labels against generation and attention to the context, on a sample.

:class:`Diagnostics` runs, at events 0, K, 2K, ... counted like ``controls_every`` (from the run's first probe event,
the baseline; on resume from the logged rows), the label check of :mod:`ctx_callback.label_check`
(``label_check_every``) and the attention share of :mod:`ctx_callback.attention` (``attention_every``) on
``diagnostic_probes`` monitored probes spread evenly over them (the same sample at every event). Their keys join the
event's row. A check that fails logs a warning and the row goes on without it (``strict=True`` re-raises), as a
failed probe round does.
"""

from __future__ import annotations

from typing import Any

from .attention import ContextSpans, attention_row
from .distributed import ProbePlan
from .errors import ConfigurationError
from .label_check import label_row, sample_indices
from .messages import warn
from .score_results import ScoreResult

__all__ = ["DEFAULT_DIAGNOSTIC_PROBES", "Diagnostics", "check_diagnostics"]

#: Probes a label check or an attention measurement looks at unless told otherwise.
DEFAULT_DIAGNOSTIC_PROBES = 32


def _every(name: str, value: Any) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigurationError(f"{name} must be None (off) or an integer >= 1 (run it at probe events 0, K, 2K, "
                                 f"...), got {value!r}.")
    return value


def check_diagnostics(label_check_every: Any, attention_every: Any, diagnostic_probes: Any, mode: str) -> None:
    """Validate the three arguments.

    Raises:
        ConfigurationError: A cadence that is not ``None`` or an integer >= 1, a sample size that is not an integer
            >= 1, or ``label_check_every`` in generation mode (there is no log-likelihood label to check).
    """
    _every("label_check_every", label_check_every)
    _every("attention_every", attention_every)
    if isinstance(diagnostic_probes, bool) or not isinstance(diagnostic_probes, int) or diagnostic_probes < 1:
        raise ConfigurationError(f"diagnostic_probes must be an integer >= 1 (the sample the label check and the "
                                 f"attention share look at), got {diagnostic_probes!r}.")
    if label_check_every is not None and mode != "loglik":
        raise ConfigurationError("label_check_every checks log-likelihood labels against generation: it needs "
                                 f"mode='loglik', got mode={mode!r} (generation mode reads the output already).")


class Diagnostics:
    """The label check and the attention share, on their cadences (module docstring).

    Args:
        label_check_every: Run the label check at every this many probe events, or ``None``.
        attention_every: Measure the attention share at every this many probe events, or ``None``.
        sample_size: Probes in the sample.
        strict: Re-raise a failing check.
    """

    def __init__(self, label_check_every: int | None, attention_every: int | None, sample_size: int,
                 strict: bool = False) -> None:
        self.label_check_every, self.attention_every = label_check_every, attention_every
        self.sample_size, self.strict = sample_size, strict
        #: The context tokens of the sample's probes, and the sample they were located for.
        self.spans: ContextSpans | None = None
        self.spans_sample: list[int] | None = None

    @staticmethod
    def _due(every: int | None, event: int) -> bool:
        return every is not None and event % every == 0

    def row(self, scorer: Any, model: Any, plan: ProbePlan, monitored: Any, result: ScoreResult,
            event: int) -> dict[str, float]:
        """The keys of the checks due at event index ``event`` (0 = the run's first), over a sample of
        ``monitored`` (probe indices); ``{}`` when none is due."""
        label, attention = self._due(self.label_check_every, event), self._due(self.attention_every, event)
        if not (label or attention):
            return {}
        sample = sample_indices(monitored, self.sample_size)
        row: dict[str, float] = {}
        for due, name, run in ((label, "label check", lambda: label_row(scorer, model, plan, sample, result)),
                               (attention, "attention share", lambda: self._attention(scorer, model, plan, sample))):
            if not due:
                continue
            try:
                row.update(run())
            except ConfigurationError:
                raise
            except Exception as err:  # noqa: BLE001 - a diagnostic must not kill a long run unless strict
                if self.strict:
                    raise
                warn("the %s at this probe event failed (%s: %s); training continues.", name, type(err).__name__, err)
        return row

    def _attention(self, scorer: Any, model: Any, plan: ProbePlan, sample: list[int]) -> dict[str, float]:
        if self.spans is None or self.spans_sample != sample:  # the sample's probes only, located once
            items = scorer.encoded.items_for(sample)
            self.spans = ContextSpans(items, scorer.probes, scorer.tokenizer, scorer.prompt_format.adds_special_tokens)
            self.spans_sample = sample
        return attention_row(model, self.spans, plan, sample)
