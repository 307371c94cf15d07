"""The stop decision, kept once: one peak, one peak event, one comparison per event, one answer. Pure (numpy, scipy).

:class:`StopDecider` owns the :class:`~ctx_callback.peak.PeakTracker` of the monitored metric, the event at its peak
and the previous event, and the stop rules of :mod:`ctx_callback.decisions` (stateless criteria). Each probe event
goes through :meth:`StopDecider.update`, which updates the peak, compares the event with the peak event once
(:func:`~ctx_callback.decisions.compare_events`), asks every rule, and returns one :class:`RoundDecision`: stop or
not, why, by which rule, the new peak, and the comparison the callback logs. As Lightning's ``EarlyStopping``
(hook -> check -> ``(stop, reason)``), and like it the state is rebuilt on resume: :meth:`StopDecider.reset`, then
the logged events fed again in order (with the kept per-probe outcomes of the peak and previous events).

Decisions that know about noise (see ``docs/stopping.md``, "How sure is the stop?"): every probe event also logs the
standard error and 95% interval of the monitored metric and the overall accuracies (Wilson / Student's t), and
compares itself with the peak event on the same probes (``decline_from_peak``, its interval and a paired
p-value: exact McNemar or paired t-test, from :mod:`ctx_callback.stats`). The stop rules (``patience``,
``stop_rule``, ``divergence_threshold``, ``stopping_threshold``) live in :mod:`ctx_callback.decisions`; the
per-probe outcomes of the peak and previous events are kept in the checkpoints' Trainer state (``paired``), so
a resumed run takes the same decisions, and are those of the merged result under DDP, identical on every rank.

Stopping at the baseline: the Trainer takes its first optimizer step whatever a callback decides before it, so a
stop rule that fires on the baseline (only ``stopping_threshold`` can: the value is already past the floor before
any training) cannot stop training "at step 0". The callback then refuses to start instead: a
:class:`~ctx_callback.errors.ConfigurationError` from ``trainer.train()`` after the baseline row is logged, before
any optimizer step (the model is untouched), naming the value and the floor. Lower the floor, or set
``warmup_steps`` so that it applies later.

Where a change goes: a new stop criterion is a :class:`~ctx_callback.decisions.StopRule` (and an option of
:func:`~ctx_callback.decisions.make_stop_rules`); how the peak is smoothed is :mod:`ctx_callback.peak`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from .comparison import Comparison, ProbeEvent, compare_events
from .decisions import RuleInput, StopDecision, StopRule, make_stop_rules
from .errors import ConfigurationError
from .peak import PeakDecision, PeakTracker

__all__ = ["RoundDecision", "StopDecider", "baseline_stop_error"]


@dataclass(frozen=True)
class RoundDecision:
    """The answer to one probe event.

    Attributes:
        peak: The peak tracker's view of the event; ``should_stop`` and ``reason`` are the rules' verdict (the first
            rule that stops, in :func:`~ctx_callback.decisions.make_stop_rules` order).
        rule: The name of the rule that stops, or ``None``.
        comparison: The event compared with the peak event (``None`` for an event without a value).
        decisions: Every rule's decision, in rule order.
    """

    peak: PeakDecision
    rule: str | None = None
    comparison: Comparison | None = None
    decisions: tuple[StopDecision, ...] = ()

    @property
    def stop(self) -> bool:
        """Whether training should stop now."""
        return self.peak.should_stop

    @property
    def reason(self) -> str | None:
        """Why training stops (``None`` when it does not)."""
        return self.peak.reason


class StopDecider:
    """One owner of the peak, the peak and previous events and the comparison; asks the stop rules once per event.

    Args:
        rules: The stop rules (:func:`~ctx_callback.decisions.make_stop_rules`); none: never stops.
        greater_is_better: Direction of the monitored metric.
        smoothing: ``"ema"``, ``"mean"`` or ``"none"`` (:class:`~ctx_callback.peak.PeakTracker`).
        ema_alpha: EMA weight of the newest value.
        window: Moving-average window.
        min_delta: Smallest smoothed improvement that counts as a new peak.
        patience: The ``patience`` rule's count, for the tracker's verdict (``None``: no such rule).
        warmup: No stop before this global step.
        confidence: Coverage of the decline's interval.
    """

    def __init__(self, rules: Sequence[StopRule] = (), *, greater_is_better: bool = True, smoothing: str = "ema",
                 ema_alpha: float = 0.5, window: int = 3, min_delta: float = 0.0, patience: int | None = None,
                 warmup: int = 0, confidence: float = 0.95) -> None:
        self.rules = list(rules)
        self.greater_is_better = bool(greater_is_better)
        self.confidence = float(confidence)
        self.tracker = PeakTracker(mode="max" if greater_is_better else "min", smoothing=smoothing,
                                   ema_alpha=ema_alpha, window=window, min_delta=min_delta, patience=patience,
                                   warmup_steps=warmup)
        #: How many of the latest valid events the rules read (:attr:`~ctx_callback.decisions.StopRule.events_needed`).
        self.events_needed = max((rule.events_needed for rule in self.rules), default=1)
        self.reset()

    @classmethod
    def from_options(cls, *, patience: int | None = None, ema_alpha: float = 0.5, min_delta: float = 0.0,
                     warmup: int = 0, greater_is_better: bool = True, smoothing: str = "ema", window: int = 3,
                     confidence: float = 0.95, **rule_options: Any) -> StopDecider:
        """The decider of the callback's options: the rules :func:`~ctx_callback.decisions.make_stop_rules` builds
        (``rule_options``: ``stop_rule``, ``min_decline``, ``alpha``, ``sustained_events``,
        ``divergence_threshold``, ``stopping_threshold``, ``metric``), sharing one peak tracker.

        Raises:
            ConfigurationError: A bad value, naming the argument, the value and what is allowed.
        """
        rules = make_stop_rules(patience=patience, ema=ema_alpha, min_delta=min_delta, warmup=warmup,
                                greater_is_better=greater_is_better, smoothing=smoothing, window=window,
                                confidence=confidence, **rule_options)
        return cls(rules, greater_is_better=greater_is_better, smoothing=smoothing, ema_alpha=ema_alpha,
                   window=window, min_delta=min_delta, patience=patience, warmup=warmup, confidence=confidence)

    def reset(self) -> None:
        """Forget every event (a fresh run, a new curve, or before replaying the logged events on resume)."""
        self.tracker.reset()
        #: The event at the peak of the smoothed metric, and the last event with a value.
        self.peak_event: ProbeEvent | None = None
        self.previous_event: ProbeEvent | None = None
        #: The latest valid events (at most :attr:`events_needed`, oldest first; the last is ``previous_event``), and
        #: the comparisons with the peak event of those after it, each with its valid-event count.
        self.recent_events: deque[ProbeEvent] = deque(maxlen=self.events_needed)
        self.since_peak: deque[tuple[Comparison, int]] = deque(maxlen=max(self.events_needed - 1, 0))
        #: Events with a value (NaN events excluded) since the last reset.
        self.num_valid_events = 0

    def update(self, event: ProbeEvent) -> RoundDecision:
        """Feed the next event; the decision for it.

        An event whose value is NaN (a failed or flagged round) is counted by the tracker but changes no peak, is
        compared with nothing and never stops.
        """
        peak = self.tracker.update(int(event.step), float(event.value))
        comparison = None
        if not math.isnan(float(event.value)):
            self.num_valid_events += 1
            if peak.is_new_peak:
                self.peak_event = event
            assert self.peak_event is not None
            comparison = compare_events(self.peak_event, event, self.greater_is_better, self.confidence)
            if peak.is_new_peak:
                self.since_peak.clear()
        seen = RuleInput(event, peak, self.peak_event, comparison, self.num_valid_events, tuple(self.since_peak))
        decisions = tuple(rule.check(seen) for rule in self.rules)
        if comparison is not None:
            self.previous_event = event
            self.recent_events.append(event)
            if not peak.is_new_peak and self.since_peak.maxlen:
                self.since_peak.append((comparison, self.num_valid_events))
        stop = next((d for d in decisions if d.stop), None)
        verdict = replace(peak, should_stop=stop is not None, reason=None if stop is None else stop.message)
        return RoundDecision(verdict, None if stop is None else stop.rule, comparison, decisions)

    @property
    def peak_step(self) -> int | None:
        """Step of the peak of the smoothed metric (``None`` before the first valid event)."""
        return self.tracker.peak_step


def baseline_stop_error(decision: RoundDecision) -> ConfigurationError:
    """The error for a stop rule that fires on the baseline (module docstring: the run refuses to start)."""
    return ConfigurationError(
        f"{decision.rule or 'a stop rule'} fired on the baseline, before any training: "
        f"{decision.reason}. The Trainer cannot stop before its first optimizer step, so rather than train an "
        "unprobed step and report a stop at step 0, ctx_callback refuses to start (the model is untouched). "
        "The floor is already crossed by the model you start from: lower stopping_threshold below the "
        "baseline value, set warmup_steps=N so that it applies from step N on, or remove it."
    )
