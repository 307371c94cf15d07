"""Stop rules: when has context reliance declined enough, and surely enough, to stop training? Pure (numpy, scipy).

A run is a sequence of probe events (:class:`ProbeEvent`): the global step, the monitored metric's value and,
when available, the per-probe outcomes behind it (``bool`` hit/miss per probe for accuracies, a ``float`` per probe
for probabilities and margins), always in the same probe order. A :class:`StopRule` is fed the events in order and
answers each with a :class:`StopDecision`. A rule is one criterion and keeps no state: the peak, the peak and
previous events and the comparison with the peak are computed once per event by
:class:`~ctx_callback.stopping.StopDecider`, which feeds them to every rule (:class:`RuleInput`) and returns one
decision; feeding it the same events again (a resume replaying ``state.log_history`` plus the stored per-probe
outcomes of the peak) rebuilds its state exactly. A rule fed on its own (:meth:`StopRule.update`) gets a decider of
its own.

The rules (:func:`make_stop_rules` builds them from the callback's options):

- ``patience`` (:class:`PatienceRule`): today's rule, unchanged: stop after ``patience`` events without a new peak
  of the smoothed metric (:class:`~ctx_callback.peak.PeakTracker`).
- ``significant_decline`` (:class:`SignificantDeclineRule`): stop when the metric is at least ``min_decline``
  below its value at the peak event *and* a paired test on the same probes (exact McNemar for binary outcomes, the
  paired t-test otherwise) rejects "no change" at level ``alpha``, corrected for the number of events compared
  (:data:`CORRECTIONS`); with ``sustained_events=k``, only once that has held at k consecutive events (a dip that
  recovers does not stop; every stop is still a stop of the ``k = 1`` rule, so its false-stop control is kept).
- ``divergence_threshold`` (:class:`DivergenceRule`): stop once the metric is this far below its peak value.
- ``stopping_threshold`` (:class:`StoppingThresholdRule`): stop once the metric is below this absolute floor
  (above it for metrics where lower is better).

Shared conventions: the peak is the peak of the *smoothed* metric (the decider's one
:class:`~ctx_callback.peak.PeakTracker`, so the peak a rule compares against is the checkpoint the callback saves and
restores); the decline is measured on the *raw* values, peak event minus current event, in the metric's own units
(0.05 = 5 points of accuracy), positive when the metric got worse (direction-aware: for ``greater_is_better=False`` a
rise is a decline). No rule stops before global step ``warmup``. An event whose value is NaN (a failed or flagged
probe round) changes no peak and never stops.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from .comparison import Comparison, ProbeEvent, compare_events
from .errors import ConfigurationError
from .peak import PeakDecision, check_peak_options

__all__ = [
    "CORRECTIONS",
    "DEFAULT_ALPHA",
    "DEFAULT_MIN_DECLINE",
    "DEFAULT_SUSTAINED_EVENTS",
    "STOP_RULES",
    "Comparison",
    "DivergenceRule",
    "PatienceRule",
    "ProbeEvent",
    "RECOMMENDED_PROBES",
    "RuleInput",
    "SignificantDeclineRule",
    "StopDecision",
    "StopRule",
    "StoppingThresholdRule",
    "compare_events",
    "first_stop",
    "make_stop_rules",
    "min_probes_for_significance",
]

#: Values ``stop_rule=`` accepts besides ``None``.
STOP_RULES: tuple[str, ...] = ("significant_decline",)
#: Default smallest decline (metric units) ``significant_decline`` stops for. Why 0.02 (2 points of accuracy): the
#: paired test is what guards against noise; this threshold guards against declines that are real but too small to
#: be worth stopping a run for, which a test on many probes (400+) would call significant. It sits below one
#: standard error of an accuracy near 0.9 at 90 probes (3 points), so at the usual probe counts the test decides, and
#: far below the falls the paper and our example show (10-30 points).
DEFAULT_MIN_DECLINE = 0.02
#: Default significance level of ``significant_decline``, for the whole run, not per look: the conventional 0.05.
#: It is meant as the rate of false stops on a run whose reliance does not decline, which is why the per-look level
#: is corrected (:data:`CORRECTIONS`): without a correction, comparing each event with a peak *selected* as the best
#: of the events so far, again at every event, stopped 20-48% of flat simulated runs at a nominal 0.05.
DEFAULT_ALPHA = 0.05
#: Default ``sustained_events`` of ``significant_decline``: consecutive events at which the decline must qualify. Why 2,
#: measured (``docs/mixtures.md``, ``benchmarks/stop_rule_simulation.py``, probability monitor, 100-400 probes): false
#: stops on flat runs fell from 2.8-3.8% (1 event) to 0.2-0.6%, and no dip that recovered after one event stopped a run
#: (1 event: 24-100% of them did, by depth), for one event more of delay on lasting 10- and 20-point falls. A dip that
#: lasts two events still stops it (86-100%); 3 events waits one event longer again.
DEFAULT_SUSTAINED_EVENTS = 2
#: Multiple-comparison corrections of ``significant_decline``. ``"pairs"`` (default): at the t-th valid event the
#: test's p-value is compared with ``alpha / (t (t - 1) / 2)``, a Bonferroni correction over every pair of the events
#: so far (the peak is one of the t - 1 earlier events, chosen because it was high, and the rule looks once per
#: event). ``"none"``: ``alpha`` at every look (for comparisons; its false-stop rate exceeds ``alpha``).
CORRECTIONS: tuple[str, ...] = ("pairs", "none")
#: Probe counts from which ``significant_decline`` catches most real falls, by paired test (``"t"``: the paired t-test
#: on probabilities and margins; ``"mcnemar"``: exact McNemar on accuracies). From the simulation in
#: ``docs/stopping.md`` ("How many probes do I need?", ``benchmarks/stop_rule_simulation.py``): on probabilities it
#: missed 23% of 10-point falls at 50 probes and caught them at the first declined event from 100 probes on; on
#: accuracies it missed 95% of 10-point falls at 50 probes, 34% at 100 and under 1% at 200. Fewer probes are allowed,
#: with a warning.
RECOMMENDED_PROBES: dict[str, int] = {"t": 100, "mcnemar": 200}


def min_probes_for_significance(alpha: float) -> int:
    """The fewest paired probes whose directions alone can be significant at ``alpha``: the smallest ``n`` with
    ``2^(1 - n) < alpha``.

    ``2^(1 - n)`` is the two-sided p-value of the exact sign test when all ``n`` probes decline, which on hit/miss
    outcomes is the exact McNemar test with every probe discordant: the smallest p-value McNemar can give on ``n``
    probes. ``significant_decline`` compares its first pair of events at ``alpha`` (later ones at a smaller level),
    so with fewer probes it can never stop on an accuracy, and on probabilities only by trusting the normality of a
    handful of per-probe differences (a paired t-test with 1-4 degrees of freedom). 6 at ``alpha=0.05``, 8 at 0.01.

    Raises:
        ValueError: ``alpha`` outside (0, 1).
    """
    if not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}.")
    return math.floor(1.0 - math.log2(float(alpha))) + 1


@dataclass(frozen=True)
class StopDecision:
    """A rule's answer to one event.

    Attributes:
        stop: Whether the rule advises stopping now.
        rule: The rule's name (``"patience"``, ``"significant_decline"``, ``"divergence_threshold"``,
            ``"stopping_threshold"``).
        message: Why (or why not); the stop message when ``stop``.
        decline: Decline from the peak event in metric units (positive = worse), when the rule measures one.
        interval: Confidence interval of the decline (paired, over probes), when per-probe outcomes allow it.
        p_value: Two-sided p-value of the paired test "now vs peak", when per-probe outcomes allow it.
    """

    stop: bool
    rule: str
    message: str
    decline: float | None = None
    interval: tuple[float, float] | None = None
    p_value: float | None = None



@dataclass(frozen=True)
class RuleInput:
    """What a stop rule reads at one event; computed once, by :class:`~ctx_callback.stopping.StopDecider`.

    Attributes:
        event: The event being decided.
        peak: The shared peak tracker's answer to ``event`` (smoothed value, peak, events since the peak, and the
            ``patience`` verdict).
        peak_event: The event at the peak of the smoothed metric (``None`` before the first valid event).
        comparison: ``event`` compared with ``peak_event`` (:func:`compare_events`); ``None`` for a NaN event.
        num_valid_events: Events with a value since the last reset, this one included.
        since_peak: The valid events after the peak event and before this one, oldest first (at most the
            :attr:`StopRule.events_needed` of the rules, minus one): each as ``(comparison with the peak event,
            num_valid_events then)``. Empty at a new peak.
    """

    event: ProbeEvent
    peak: PeakDecision
    peak_event: ProbeEvent | None
    comparison: Comparison | None
    num_valid_events: int
    since_peak: tuple[tuple[Comparison, int], ...] = ()


class StopRule(ABC):
    """A stop rule: one criterion, read at each event (see the module docstring).

    A rule keeps no state of its own: :meth:`check` reads the peak, the comparison with the peak event and the
    event count that :class:`~ctx_callback.stopping.StopDecider` computed once for all rules. :meth:`update` and
    :meth:`reset` feed a rule on its own (a decider of this rule alone), as before.

    Attributes:
        name: The rule's name, as :attr:`StopDecision.rule`.
    """

    name: str = "rule"

    def __init__(self, *, greater_is_better: bool = True, smoothing: str = "ema", ema: float = 0.5, window: int = 3,
                 min_delta: float = 0.0, warmup: int = 0, metric: str = "the monitored metric",
                 confidence: float = 0.95) -> None:
        self.greater_is_better = bool(greater_is_better)
        self.warmup = int(warmup)
        self.metric = metric
        self.confidence = float(confidence)
        #: Peak smoothing options (the :class:`~ctx_callback.peak.PeakTracker` of a rule used on its own).
        self.smoothing, self.ema, self.window, self.min_delta = smoothing, ema, window, min_delta
        self._alone: Any = None

    @abstractmethod
    def check(self, seen: RuleInput) -> StopDecision:
        """The decision for ``seen.event``."""

    def own_patience(self) -> int | None:
        """The patience of the peak tracker this rule needs when used on its own (``None``: it never stops by it)."""
        return None

    @property
    def events_needed(self) -> int:
        """How many of the latest valid events (this one included) the rule reads: the decider keeps the comparisons
        of that many (:attr:`RuleInput.since_peak`) and, for a resume, their per-probe outcomes."""
        return 1

    def reset(self) -> None:
        """Forget every event fed through :meth:`update` (a fresh run, or before replaying events on resume)."""
        self._alone = None

    def update(self, event: ProbeEvent) -> StopDecision:
        """Feed the next event to this rule on its own; the decision for it."""
        if self._alone is None:
            from .stopping import StopDecider  # noqa: PLC0415 - the decider imports this module

            self._alone = StopDecider([self], greater_is_better=self.greater_is_better, smoothing=self.smoothing,
                                      ema_alpha=self.ema, window=self.window, min_delta=self.min_delta,
                                      patience=self.own_patience(), warmup=self.warmup, confidence=self.confidence)
        return self._alone.update(event).decisions[0]

    @property
    def num_valid_events(self) -> int:
        """Events with a value fed through :meth:`update` since the last reset."""
        return 0 if self._alone is None else self._alone.num_valid_events


class _PeakRule(StopRule):
    """A rule that compares each event with the peak event of the smoothed metric."""

    def check(self, seen: RuleInput) -> StopDecision:
        event, comparison = seen.event, seen.comparison
        if comparison is None:
            return StopDecision(False, self.name, f"step {event.step}: no value (failed or flagged probe round)")
        assert seen.peak_event is not None
        decision = self._decide(seen, comparison)
        if decision.stop and event.step < self.warmup:
            return StopDecision(False, self.name, f"{decision.message} (not stopping before warmup step "
                                f"{self.warmup})", comparison.decline, comparison.interval, comparison.p_value)
        return decision

    def _head(self, seen: RuleInput, comparison: Comparison) -> str:
        peak, event = seen.peak_event, seen.event
        assert peak is not None
        return (f"{self.metric} declined {comparison.decline:.4f} from the peak event at step {peak.step} "
                f"({peak.value:.4f} -> {event.value:.4f} at step {event.step})")

    @abstractmethod
    def _decide(self, seen: RuleInput, comparison: Comparison) -> StopDecision:
        """The decision for ``seen.event`` given its comparison with the peak event."""


def _interval_text(comparison: Comparison, confidence: float) -> str:
    if comparison.interval is None:
        return ""
    low, high = comparison.interval
    return f"; {confidence:.0%} interval of the decline [{low:.4f}, {high:.4f}]"


class SignificantDeclineRule(_PeakRule):
    """Stop when the decline from the peak event is at least ``min_decline`` and significant at ``alpha``.

    The test is paired, on the same probes: exact McNemar on binary outcomes (accuracies), the paired t-test
    otherwise;
    it is two-sided, and a stop also needs the decline to be positive (the metric got worse). Events without
    per-probe outcomes (or whose outcomes are not paired with the peak's: another probe count) never stop.

    Args:
        min_decline: Smallest decline, in the metric's units, that may stop (default :data:`DEFAULT_MIN_DECLINE`).
        alpha: Significance level of the two-sided paired test over the run (default :data:`DEFAULT_ALPHA`).
        correction: ``"pairs"`` (default) or ``"none"``, see :data:`CORRECTIONS`.
        sustained_events: Consecutive valid events after the peak event at which the decline must qualify
            (:meth:`qualifies`) before the rule stops (default :data:`DEFAULT_SUSTAINED_EVENTS`). A stop at k > 1 is
            also a stop of the k = 1 rule (at this event or earlier), so the false-stop rate can only fall.
        **kwargs: Smoothing of the peak and ``warmup``, as :func:`make_stop_rules`.
    """

    name = "significant_decline"

    def __init__(self, *, min_decline: float = DEFAULT_MIN_DECLINE, alpha: float = DEFAULT_ALPHA,
                 correction: str = "pairs", sustained_events: int = DEFAULT_SUSTAINED_EVENTS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.min_decline = float(min_decline)
        self.alpha = float(alpha)
        self.correction = correction
        self.sustained_events = int(sustained_events)

    @property
    def events_needed(self) -> int:
        return self.sustained_events

    def qualifies(self, comparison: Comparison, num_valid_events: int) -> bool:
        """Whether one comparison with the peak event is a decline of at least ``min_decline`` that the paired test
        finds significant at the level of the ``num_valid_events``-th event."""
        p = comparison.p_value
        return (p is not None and comparison.decline >= self.min_decline and comparison.decline > 0
                and p < self.level(num_valid_events))

    def level(self, num_valid_events: int | None = None) -> float:
        """The per-look significance level at the ``num_valid_events``-th valid event (``alpha`` after the
        correction); default: the events fed through :meth:`update`."""
        t = self.num_valid_events if num_valid_events is None else num_valid_events
        if self.correction == "none" or t < 2:
            return self.alpha
        return self.alpha / (t * (t - 1) / 2)

    def _decide(self, seen: RuleInput, comparison: Comparison) -> StopDecision:
        head = self._head(seen, comparison)
        p = comparison.p_value
        if p is None:
            return StopDecision(False, self.name, f"{head}; no paired per-probe outcomes to test",
                                comparison.decline, None, None)
        test = "exact McNemar" if comparison.test == "mcnemar" else "t-test"
        detail = (f"{_interval_text(comparison, self.confidence)}; paired {test} p = {p:.3g} "
                  f"({comparison.lost} probes worse, {comparison.gained} better)")
        level = self.level(seen.num_valid_events)
        qualifies = self.qualifies(comparison, seen.num_valid_events)
        corrected = ("" if level == self.alpha
                     else f" (alpha {self.alpha:g} corrected for {seen.num_valid_events} events)")
        verdict = (f": at least min_decline {self.min_decline:g} and p < {level:.3g}{corrected}" if qualifies
                   else f"; stops at a decline >= {self.min_decline:g} with p < {level:.3g}{corrected}")
        stop = qualifies
        if qualifies and self.sustained_events > 1:
            streak = 1  # this event, then the earlier ones since the peak, newest first, while they qualify
            for earlier, count in reversed(seen.since_peak):
                if streak == self.sustained_events or not self.qualifies(earlier, count):
                    break
                streak += 1
            stop = streak >= self.sustained_events
            verdict += (f", at {streak} consecutive events (sustained_events={self.sustained_events})" if stop else
                        f", at {streak} of the sustained_events={self.sustained_events} consecutive events needed")
        return StopDecision(stop, self.name, head + detail + verdict, comparison.decline, comparison.interval, p)


class DivergenceRule(_PeakRule):
    """Stop once the metric is at least ``threshold`` (metric units) worse than at the peak event."""

    name = "divergence_threshold"

    def __init__(self, *, threshold: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.threshold = float(threshold)

    def _decide(self, seen: RuleInput, comparison: Comparison) -> StopDecision:
        stop = comparison.decline >= self.threshold
        message = (self._head(seen, comparison) + _interval_text(comparison, self.confidence)
                   + (f", at least divergence_threshold {self.threshold:g}" if stop else ""))
        return StopDecision(stop, self.name, message, comparison.decline, comparison.interval, comparison.p_value)


class StoppingThresholdRule(_PeakRule):
    """Stop once the metric's raw value is below ``threshold`` (above it when lower is better): an absolute floor."""

    name = "stopping_threshold"

    def __init__(self, *, threshold: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.threshold = float(threshold)

    def _decide(self, seen: RuleInput, comparison: Comparison) -> StopDecision:
        value = float(seen.event.value)
        stop = value < self.threshold if self.greater_is_better else value > self.threshold
        side = "below the floor" if self.greater_is_better else "above the ceiling"
        message = (f"{self.metric} is {value:.4f} at step {seen.event.step}, "
                   f"{side if stop else 'within the bound'} stopping_threshold {self.threshold:g}")
        return StopDecision(stop, self.name, message, comparison.decline, comparison.interval, comparison.p_value)


class PatienceRule(StopRule):
    """Today's rule: stop after ``patience`` events without a new peak of the smoothed metric (after ``warmup``).

    It reads the verdict of the shared :class:`~ctx_callback.peak.PeakTracker` (built with this ``patience``); its
    stop message is the tracker's reason, unchanged.
    """

    name = "patience"

    def __init__(self, *, patience: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.patience = patience

    def own_patience(self) -> int | None:
        return self.patience

    def check(self, seen: RuleInput) -> StopDecision:
        decision = seen.peak
        sign = 1.0 if self.greater_is_better else -1.0
        decline = None if math.isnan(decision.peak_value) else sign * (decision.peak_value - decision.smoothed)
        if decision.should_stop:
            return StopDecision(True, self.name, decision.reason or "", decline)
        return StopDecision(False, self.name, f"{decision.events_since_peak} events since the peak", decline)


def _check_number(name: str, value: object, *, low: float | None = None, high: float | None = None,
                  low_open: bool = False, high_open: bool = False, allowed: str) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
    if ok:
        v = float(value)  # type: ignore[arg-type]
        if low is not None and (v < low or (low_open and v == low)):
            ok = False
        if high is not None and (v > high or (high_open and v == high)):
            ok = False
    if not ok:
        raise ConfigurationError(f"{name} must be {allowed}, got {value!r}.")
    return float(value)  # type: ignore[arg-type]


def make_stop_rules(
    *,
    patience: int | None = None,
    ema: float = 0.5,
    min_delta: float = 0.0,
    warmup: int = 0,
    stop_rule: str | None = None,
    min_decline: float = DEFAULT_MIN_DECLINE,
    alpha: float = DEFAULT_ALPHA,
    correction: str = "pairs",
    sustained_events: int = DEFAULT_SUSTAINED_EVENTS,
    divergence_threshold: float | None = None,
    stopping_threshold: float | None = None,
    greater_is_better: bool = True,
    smoothing: str = "ema",
    window: int = 3,
    metric: str = "the monitored metric",
    confidence: float = 0.95,
) -> list[StopRule]:
    """Build the stop rules the options ask for (an empty list never stops: the default).

    Args:
        patience: Events without a new smoothed peak before stopping (:class:`PatienceRule`); ``None``: no such rule.
        ema: EMA weight of the newest value (``smoothing="ema"``), in (0, 1].
        min_delta: Smallest smoothed improvement that counts as a new peak (>= 0).
        warmup: No rule stops before this global step.
        stop_rule: ``None`` or ``"significant_decline"`` (:class:`SignificantDeclineRule`).
        min_decline: ``significant_decline``: smallest decline that may stop, metric units, >= 0.
        alpha: ``significant_decline``: level of the two-sided paired test over the run, in (0, 1).
        correction: ``significant_decline``: ``"pairs"`` (default) or ``"none"`` (:data:`CORRECTIONS`).
        sustained_events: ``significant_decline``: stop only when the decline qualified (at least ``min_decline``,
            significant at that event's corrected level) at this many consecutive valid events after the peak event
            (an integer >= 1; 1: the first qualifying event stops).
        divergence_threshold: Stop once this far (metric units, > 0) below the peak event (:class:`DivergenceRule`).
        stopping_threshold: Stop once below this absolute value, above it when lower is better
            (:class:`StoppingThresholdRule`).
        greater_is_better: Direction of the metric.
        smoothing: ``"ema"``, ``"mean"`` or ``"none"``: smoothing of the peak.
        window: Moving-average window (``smoothing="mean"``).
        metric: The metric's name in stop messages.
        confidence: Coverage of the decline intervals in messages, in (0, 1).

    Returns:
        The rules, in this order: patience, significant_decline, divergence_threshold, stopping_threshold. When
        several stop at one event, :func:`first_stop` reports the first.

    Raises:
        ConfigurationError: A bad value, naming the argument, the value and what is allowed.
    """
    if stop_rule is not None and stop_rule not in STOP_RULES:
        raise ConfigurationError(f"stop_rule must be None or one of {list(STOP_RULES)}, got {stop_rule!r}.")
    if correction not in CORRECTIONS:
        raise ConfigurationError(f"correction must be one of {list(CORRECTIONS)}, got {correction!r}.")
    if isinstance(sustained_events, bool) or not isinstance(sustained_events, int) or sustained_events < 1:
        raise ConfigurationError(
            f"sustained_events must be an integer >= 1 (consecutive probe events at which a significant decline "
            f"must hold before significant_decline stops; 1 = the first one), got {sustained_events!r}.")
    min_decline = _check_number("min_decline", min_decline, low=0.0, allowed="a finite number >= 0 (metric units)")
    alpha = _check_number("alpha", alpha, low=0.0, high=1.0, low_open=True, high_open=True,
                          allowed="a number in (0, 1) (the significance level of the paired test)")
    confidence = _check_number("confidence", confidence, low=0.0, high=1.0, low_open=True, high_open=True,
                               allowed="a number in (0, 1)")
    if divergence_threshold is not None:
        divergence_threshold = _check_number(
            "divergence_threshold", divergence_threshold, low=0.0, low_open=True,
            allowed="None or a finite number > 0 (how far below the peak, in metric units, training stops)")
    if stopping_threshold is not None:
        stopping_threshold = _check_number("stopping_threshold", stopping_threshold,
                                           allowed="None or a finite number (an absolute floor of the metric)")
    if not isinstance(greater_is_better, bool):
        raise ConfigurationError(f"greater_is_better must be True or False, got {greater_is_better!r}.")
    check_peak_options(smoothing=smoothing, ema_alpha=ema, window=window, min_delta=min_delta, patience=patience,
                       warmup_steps=warmup)
    extra: dict[str, Any] = dict(greater_is_better=greater_is_better, smoothing=smoothing, ema=ema, window=window,
                                 min_delta=min_delta, warmup=warmup, metric=metric, confidence=confidence)
    rules: list[StopRule] = []
    if patience is not None:
        rules.append(PatienceRule(patience=patience, **extra))
    if stop_rule == "significant_decline":
        rules.append(SignificantDeclineRule(min_decline=min_decline, alpha=alpha, correction=correction,
                                            sustained_events=sustained_events, **extra))
    if divergence_threshold is not None:
        rules.append(DivergenceRule(threshold=divergence_threshold, **extra))
    if stopping_threshold is not None:
        rules.append(StoppingThresholdRule(threshold=stopping_threshold, **extra))
    return rules


def first_stop(rules: list[StopRule], event: ProbeEvent) -> tuple[StopDecision | None, list[StopDecision]]:
    """Feed ``event`` to every rule on its own (each must see every event); the first stopping decision (or ``None``)
    and all. :class:`~ctx_callback.stopping.StopDecider` does the same for rules that share one peak."""
    decisions = [rule.update(event) for rule in rules]
    return next((d for d in decisions if d.stop), None), decisions
