"""Stop rules (ctx_callback.decisions) on scripted metric sequences: the exact stop step of each rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ctx_callback.decisions import (
    DEFAULT_ALPHA,
    DEFAULT_MIN_DECLINE,
    DivergenceRule,
    PatienceRule,
    ProbeEvent,
    SignificantDeclineRule,
    StopDecision,
    StoppingThresholdRule,
    compare_events,
    first_stop,
    make_stop_rules,
)
from ctx_callback.errors import ConfigurationError
from ctx_callback.peak import PeakTracker


def stop_step(rules, events):
    for event in events:
        decision, _ = first_stop(rules, event)
        if decision is not None:
            return event.step, decision
    return None, None


def events_of(values, outcomes=None, every=10):
    outcomes = outcomes or [None] * len(values)
    return [ProbeEvent(i * every, float(v), o) for i, (v, o) in enumerate(zip(values, outcomes))]


def hits(n: int, hit: int, lose: tuple[int, ...] = ()) -> np.ndarray:
    """n probes, the first ``hit`` of them a hit, minus the indices in ``lose``."""
    out = np.zeros(n, dtype=bool)
    out[:hit] = True
    out[list(lose)] = False
    return out


def test_default_options_build_no_rule_and_never_stop():
    rules = make_stop_rules()
    assert rules == []
    assert stop_step(rules, events_of([0.9, 0.1, 0.0, 0.0])) == (None, None)


@pytest.mark.parametrize("smoothing", ["none", "ema", "mean"])
def test_patience_rule_equals_the_peak_tracker(smoothing):
    values = [0.5, 0.6, 0.7, 0.65, 0.72, 0.6, 0.55, 0.5, 0.4, 0.3]
    tracker = PeakTracker(smoothing=smoothing, patience=3, warmup_steps=40)
    expected = next(i * 10 for i, v in enumerate(values) if tracker.update(i * 10, v).should_stop)
    rules = make_stop_rules(patience=3, smoothing=smoothing, warmup=40)
    assert [r.name for r in rules] == ["patience"] and isinstance(rules[0], PatienceRule)
    step, decision = stop_step(rules, events_of(values))
    assert step == expected
    assert decision.rule == "patience" and "no improvement of the smoothed metric" in decision.message


def test_patience_exact_step_without_smoothing():
    # peak 0.7 at step 20; 0.65 (1), 0.6 (2): stop at step 40
    step, _ = stop_step(make_stop_rules(patience=2, smoothing="none"), events_of([0.5, 0.6, 0.7, 0.65, 0.6, 0.55]))
    assert step == 40


def significant_events(n=100):
    """Peak at step 10 (90 hits); small dip at 20 (2 lost, p = 0.5); at 30, 12 lost and none gained."""
    peak = hits(n, 90)
    values = [hits(n, 80), peak, hits(n, 90, lose=(0, 1)), hits(n, 90, lose=tuple(range(12)))]
    return events_of([v.mean() for v in values], values)


def test_significant_decline_stops_at_the_exact_step_with_decline_interval_and_p_value():
    rules = make_stop_rules(stop_rule="significant_decline", sustained_events=1, smoothing="none")
    step, decision = stop_step(rules, significant_events())
    assert step == 30
    assert decision.rule == "significant_decline"
    assert decision.decline == pytest.approx(0.12)
    assert decision.p_value == pytest.approx(2 / 2 ** 12)  # exact McNemar, b = 12, c = 0
    low, high = decision.interval
    assert 0 < low < 0.12 < high
    for text in ("0.1200", "step 10", "step 30", "exact McNemar", "p = 0.000488", "12 probes worse"):
        assert text in decision.message


def test_significant_decline_needs_min_decline_and_significance():
    # 12 lost is significant, but min_decline 0.15 is not reached: no stop.
    rules = make_stop_rules(stop_rule="significant_decline", sustained_events=1, smoothing="none", min_decline=0.15)
    assert stop_step(rules, significant_events()) == (None, None)
    # A large decline on 3 probes is never significant (p >= 0.25): no stop.
    few = [hits(3, 3), hits(3, 3), hits(3, 0)]
    rules = make_stop_rules(stop_rule="significant_decline", sustained_events=1, smoothing="none")
    assert stop_step(rules, events_of([v.mean() for v in few], few)) == (None, None)
    # The same decline without per-probe outcomes (events replayed from logs only) never stops either.
    rules = make_stop_rules(stop_rule="significant_decline", sustained_events=1, smoothing="none")
    assert stop_step(rules, events_of([e.value for e in significant_events()])) == (None, None)


def test_significant_decline_correction_for_the_number_of_events():
    # 7 lost of 7 discordant: p = 2/128 = 0.0156 < 0.05, but the 4th event's corrected level is 0.05 / 6 (pairs).
    n = 50
    values = [hits(n, 40), hits(n, 40), hits(n, 40), hits(n, 40, lose=tuple(range(7)))]
    events = events_of([v.mean() for v in values], values)
    rules = make_stop_rules(stop_rule="significant_decline", sustained_events=1, smoothing="none")
    assert stop_step(rules, events) == (None, None)
    step, decision = stop_step(make_stop_rules(stop_rule="significant_decline", sustained_events=1, smoothing="none",
                                               correction="none"), events)
    assert step == 30 and decision.p_value == pytest.approx(2 / 128)
    rule = SignificantDeclineRule(smoothing="none")
    for event in events:
        rule.update(event)
    assert rule.level() == pytest.approx(DEFAULT_ALPHA / 6)


def test_significant_decline_respects_warmup_and_direction():
    rules = make_stop_rules(stop_rule="significant_decline", sustained_events=1, smoothing="none", warmup=40)
    events = significant_events()
    more = events + [ProbeEvent(40, events[-1].value, events[-1].outcomes)]
    step, _ = stop_step(rules, more)
    assert step == 40  # significant at 30 already, but not before the warm-up
    # Lower is better (e.g. parametric_accuracy): a *rise* of misses is the decline.
    n = 100
    par = [hits(n, 20), hits(n, 10), hits(n, 10), hits(n, 30)]
    rules = make_stop_rules(stop_rule="significant_decline", sustained_events=1, smoothing="none",
                            greater_is_better=False)
    step, decision = stop_step(rules, events_of([v.mean() for v in par], par))
    assert step == 30 and decision.decline == pytest.approx(0.2)


def test_significant_decline_on_probabilities_uses_the_paired_t_test():
    from scipy import stats as scipy_stats

    rng = np.random.default_rng(0)
    base = rng.uniform(0.3, 0.9, size=40)
    seq = [base - 0.05, base, base - rng.uniform(-0.01, 0.01, 40), base - rng.uniform(0.02, 0.2, 40)]
    rules = make_stop_rules(stop_rule="significant_decline", sustained_events=1, smoothing="none")
    step, decision = stop_step(rules, events_of([v.mean() for v in seq], seq))
    assert step == 30
    assert "t-test" in decision.message
    assert decision.p_value == pytest.approx(scipy_stats.ttest_rel(seq[3], seq[1]).pvalue, rel=1e-9)


def test_a_decline_carried_by_few_probes_is_caught_where_the_sign_test_is_blind():
    """Seen on a real run: most probes rise a little while some fall far. The mean falls 6 points; the sign test
    (counts only) sees 22 up / 18 down, p = 0.64; the t-test weighs the sizes and stops."""
    from ctx_callback.stats import sign_test

    base = np.full(40, 0.8)
    fallen = base.copy()
    fallen[:22] += 0.01
    fallen[22:] -= np.linspace(0.1, 0.2, 18)
    seq = [base - 0.05, base, base, fallen]
    assert sign_test(seq[1], seq[3]) > 0.5
    rules = make_stop_rules(stop_rule="significant_decline", sustained_events=1, smoothing="none")
    step, decision = stop_step(rules, events_of([v.mean() for v in seq], seq))
    assert step == 30 and decision.decline == pytest.approx(base.mean() - fallen.mean(), abs=1e-12)
    assert decision.decline > 0.06 and decision.interval[0] > 0


def test_divergence_threshold_exact_step():
    rules = make_stop_rules(divergence_threshold=0.05, smoothing="none")
    step, decision = stop_step(rules, events_of([0.8, 0.9, 0.87, 0.84, 0.7]))
    assert step == 30 and decision.rule == "divergence_threshold"
    assert decision.decline == pytest.approx(0.06) and isinstance(rules[0], DivergenceRule)


def test_stopping_threshold_exact_step_both_directions():
    step, decision = stop_step(make_stop_rules(stopping_threshold=0.7), events_of([0.8, 0.75, 0.69, 0.5]))
    assert step == 20 and decision.rule == "stopping_threshold" and "below the floor" in decision.message
    rules = make_stop_rules(stopping_threshold=0.3, greater_is_better=False)
    assert isinstance(rules[0], StoppingThresholdRule)
    assert stop_step(rules, events_of([0.1, 0.2, 0.31]))[0] == 20


def test_nan_events_change_nothing_and_never_stop():
    values = [0.8, 0.9, math.nan, math.nan, 0.84]
    for rules in (make_stop_rules(divergence_threshold=0.05, smoothing="none"),
                  make_stop_rules(patience=1, smoothing="none"), make_stop_rules(stopping_threshold=0.99)):
        step, _ = stop_step(rules, events_of(values))
        assert step == (0 if rules[0].name == "stopping_threshold" else 40)


def test_several_rules_the_first_that_stops_is_reported_and_every_rule_sees_every_event():
    rules = make_stop_rules(patience=5, divergence_threshold=0.05, stopping_threshold=0.5, smoothing="none")
    assert [r.name for r in rules] == ["patience", "divergence_threshold", "stopping_threshold"]
    decision, decisions = first_stop(rules, ProbeEvent(0, 0.9))
    assert decision is None and len(decisions) == 3 and all(isinstance(d, StopDecision) for d in decisions)
    decision, _ = first_stop(rules, ProbeEvent(10, 0.4))
    assert decision.rule == "divergence_threshold"


def test_reset_and_replay_rebuild_the_paired_state():
    """What a resume does: reset, replay the logged values with the kept outcomes of the peak event only."""
    events = significant_events()
    rule = make_stop_rules(stop_rule="significant_decline", sustained_events=1, smoothing="none")[0]
    uninterrupted = [rule.update(e) for e in events]
    rule.reset()
    for e in events[:3]:  # replayed from logs: outcomes only where kept (the peak, step 10)
        rule.update(ProbeEvent(e.step, e.value, e.outcomes if e.step == 10 else None))
    resumed = rule.update(events[3])
    assert resumed == uninterrupted[3] and resumed.stop


def test_compare_events_without_outcomes_or_with_other_probes():
    c = compare_events(ProbeEvent(0, 0.9), ProbeEvent(10, 0.8))
    assert c.decline == pytest.approx(0.1) and c.p_value is None and c.interval is None
    c = compare_events(ProbeEvent(0, 1.0, hits(3, 3)), ProbeEvent(10, 0.5, hits(4, 2)))
    assert c.p_value is None


@pytest.mark.parametrize("kwargs,match", [
    (dict(stop_rule="significant"), "stop_rule must be None or one of \\['significant_decline'\\], got 'significant'"),
    (dict(alpha=0.0), "alpha must be a number in \\(0, 1\\)"),
    (dict(alpha=1.5), "alpha must be"),
    (dict(alpha=True), "alpha must be"),
    (dict(min_decline=-0.01), "min_decline must be a finite number >= 0"),
    (dict(min_decline=math.inf), "min_decline must be"),
    (dict(divergence_threshold=0), "divergence_threshold must be None or a finite number > 0"),
    (dict(stopping_threshold=math.nan), "stopping_threshold must be None or a finite number"),
    (dict(stopping_threshold="0.5"), "stopping_threshold must be"),
    (dict(correction="holm"), "correction must be one of \\['pairs', 'none'\\]"),
    (dict(patience=0), "patience must be an integer >= 1"),
    (dict(ema=0.0), "ema_alpha must be in"),
    (dict(greater_is_better="yes"), "greater_is_better must be True or False"),
])
def test_bad_configuration_is_an_error_naming_the_argument(kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        make_stop_rules(**kwargs)


def test_defaults_are_documented_values():
    assert DEFAULT_MIN_DECLINE == 0.02 and DEFAULT_ALPHA == 0.05


# -- issue 20, item 9b: a decline on two probes that moved alike is not "p = 0" ---------------------------------------


def test_two_probes_that_moved_alike_are_not_a_certain_decline():
    """Before the fix: the same change on every probe returned p = 0.0 from the paired t-test whatever the number of
    probes, so two probes stopped the run. No spread means an infinite t statistic, not certainty: the signs are all
    the evidence, the exact sign test, p = 2^(1 - n)."""
    from ctx_callback.stats import paired_t_test, sign_test

    peak, now = np.array([0.9, 0.8]), np.array([0.5, 0.4])  # both fell by 0.4 (up to rounding)
    assert paired_t_test(peak, now) == pytest.approx(0.5) == pytest.approx(sign_test(peak, now))
    seq = [np.array([0.5, 0.5]), peak, now]
    rules = make_stop_rules(stop_rule="significant_decline", sustained_events=1, smoothing="none")
    assert stop_step(rules, events_of([v.mean() for v in seq], seq)) == (None, None)
    # Twenty probes moving alike is strong evidence, and still stops.
    base = np.linspace(0.5, 0.9, 20)
    assert paired_t_test(base, base - 0.3) == pytest.approx(2.0 ** -19)
    seq = [base - 0.05, base, base - 0.3]
    step, decision = stop_step(make_stop_rules(stop_rule="significant_decline", sustained_events=1, smoothing="none"),
                               events_of([v.mean() for v in seq], seq))
    assert step == 20 and decision.p_value == pytest.approx(2.0 ** -19)


def test_min_probes_for_significance_is_where_every_probe_declining_can_be_significant():
    from ctx_callback.decisions import min_probes_for_significance
    from ctx_callback.stats import mcnemar_exact

    assert min_probes_for_significance(0.05) == 6 and min_probes_for_significance(0.01) == 8
    for alpha in (0.2, 0.05, 0.03125, 0.01, 0.001):
        n = min_probes_for_significance(alpha)
        # McNemar with every probe lost: the smallest p-value n probes can give.
        assert mcnemar_exact(np.ones(n), np.zeros(n)).p_value < alpha
        assert mcnemar_exact(np.ones(n - 1), np.zeros(n - 1)).p_value >= alpha
    with pytest.raises(ValueError, match="alpha must be in"):
        min_probes_for_significance(0.0)
