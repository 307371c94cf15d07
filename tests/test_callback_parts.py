"""The callback's parts on their own (issue 19): each can be read, tested and replaced without the callback.

The stop decider (one peak, one comparison, one decision), the resume state's save/load pair, the probe selection,
the per-probe reports, the summary, the peak checkpointer's baseline copy, the argument checks and the messages.
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch

from ctx_callback.callback_options import check_significant_probe_count, probe_set_digest, validate_arguments
from ctx_callback.comparison import compare_events
from ctx_callback.decisions import ProbeEvent, first_stop, make_stop_rules
from ctx_callback.errors import ConfigurationError
from ctx_callback.messages import rank_zero_info, rank_zero_warn
from ctx_callback.monitor import parse_monitor
from ctx_callback.peak_checkpoint import RESTORED_FROM_BASELINE, PeakCheckpointer
from ctx_callback.probe_reports import ProbeReports
from ctx_callback.probe_selection import ProbeSelection, check_band
from ctx_callback.probes import probes_from_records
from ctx_callback.reliance_row import KEY_FLIPS_SINCE_PREVIOUS, KEY_FLIPS_TO_CONTEXT, KEY_FLIPS_TO_MEMORY
from ctx_callback.reporting import RunFacts, summarize, summary_text
from ctx_callback.resume_state import (
    STATE_KEY,
    KeptEvent,
    PairedEvents,
    ResumeState,
    read_state,
    saved_probe_set,
    write_state,
)
from ctx_callback.stopping import StopDecider
from tests.helpers import PROBES, make_tiny_llama

RULES = dict(patience=3, stop_rule="significant_decline", divergence_threshold=0.1, stopping_threshold=0.2)


def scripted_events(seed: int = 0, n: int = 12, probes: int = 40) -> list[ProbeEvent]:
    """A rise then a fall, with per-probe probabilities, and one failed (NaN) round in the middle."""
    rng = np.random.default_rng(seed)
    means = [0.5, 0.6, 0.7, 0.75, math.nan, 0.7, 0.6, 0.5, 0.45, 0.4, 0.35, 0.3][:n]
    events = []
    for i, mean in enumerate(means):
        outcomes = None if math.isnan(mean) else np.clip(rng.normal(mean, 0.1, probes), 0, 1)
        events.append(ProbeEvent(i * 10, mean if outcomes is None else float(outcomes.mean()), outcomes))
    return events


def test_decider_takes_the_decisions_of_the_rules_fed_on_their_own():
    """One decider (one tracker, one comparison per event) decides exactly as every rule with its own state did."""
    events = scripted_events()
    decider = StopDecider.from_options(smoothing="none", warmup=20, **RULES)
    alone = make_stop_rules(smoothing="none", warmup=20, **RULES)
    for event in events:
        decision = decider.update(event)
        stop, each = first_stop(alone, event)
        assert list(decision.decisions) == each
        assert decision.stop == (stop is not None)
        assert decision.reason == (None if stop is None else stop.message)
        assert decision.rule == (None if stop is None else stop.rule)
        if math.isnan(event.value):
            assert decision.comparison is None and not decision.peak.is_new_peak
        else:
            assert decision.comparison == compare_events(decider.peak_event, event, True, 0.95)
    assert [r.name for r in decider.rules] == ["patience", "significant_decline", "divergence_threshold",
                                              "stopping_threshold"]


def test_decider_replay_rebuilds_the_same_state():
    """Resume: reset, then the same events again (the peak's outcomes kept) give the same peak and next decision."""
    events = scripted_events()
    decider = StopDecider.from_options(smoothing="ema", **RULES)
    for event in events[:8]:
        decider.update(event)
    kept = {decider.peak_event.step} | {event.step for event in decider.recent_events}  # what the resume state keeps
    assert len(decider.recent_events) == 2  # sustained_events=2 (the default) reads the latest two events
    reference = decider.update(events[8])
    peak = decider.peak_event
    decider.reset()
    for event in events[:8]:  # replayed from the logs: only the peak's and the latest events' outcomes were kept
        decider.update(ProbeEvent(event.step, event.value, event.outcomes if event.step in kept else None))
    assert decider.peak_event.step == peak.step
    resumed = decider.update(events[8])
    assert resumed.peak == reference.peak and resumed.comparison == reference.comparison
    assert resumed.decisions == reference.decisions


def test_decider_counts_failed_rounds_as_events_but_never_as_peaks():
    decider = StopDecider(greater_is_better=False)
    decider.update(ProbeEvent(0, 0.5))
    decision = decider.update(ProbeEvent(2, math.nan))
    assert not decision.stop and decision.comparison is None and decider.tracker.num_events == 2
    assert decider.num_valid_events == 1 and decider.previous_event.step == 0
    assert decider.update(ProbeEvent(4, 0.4)).peak.is_new_peak  # lower is better
    assert decider.peak_step == 4


def test_resume_state_round_trips_with_the_layout_of_version_2():
    paired = PairedEvents("abc", KeptEvent(4, np.array([1.0, 0.0, math.nan]), ["context", "memory", None]),
                          KeptEvent(6, np.array([0.0, 0.0, 1.0]), ["memory", "memory", "context"]))
    state = ResumeState(num_probes=3, probe_set_sha1="f00", curve_start_step=None, selected_ids=["a", "c"],
                        known_counts={"x": {"kept": 2, "total": 3}}, informative_band=[0.1, 0.9],
                        peak_checkpoint="/out/checkpoint-4", peak_save_error=None, paired=paired)
    entry = state.to_dict()
    assert list(entry) == ["version", "probe_set", "curve_start_step", "known_only_probe_ids", "known_counts",
                           "informative_band", "peak_checkpoint", "peak_save_error", "paired"]
    assert entry["version"] == 2 and entry["paired"]["peak"] == {"step": 4, "outcomes": [1.0, 0.0, None],
                                                                 "preferred": "cm-"}
    stateful: dict = {}
    write_state(stateful, "ctx_reliance/counterfactual_accuracy", state)
    stateful = json.loads(json.dumps(stateful))  # as trainer_state.json stores it
    back = read_state(stateful, "ctx_reliance/counterfactual_accuracy", binary=True)
    assert back.to_dict() == entry
    kept = back.paired.by_step("abc")
    assert kept[6].outcomes.dtype == bool and kept[4].outcomes.dtype == np.float64  # NaN stays a float
    assert kept[4].preferred == ["context", "memory", None]
    assert back.paired.by_step("another selection") == {}
    assert saved_probe_set(stateful, "ctx_reliance/other") == ({"num_probes": 3, "sha1": "f00"}, None)


def test_resume_state_reads_an_older_entry_without_a_probe_set():
    old = {STATE_KEY: {"ctx_reliance/counterfactual_accuracy": {"version": 1, "known_only_probe_ids": ["a"],
                                                               "peak_checkpoint": 3}}}
    back = read_state(old, "ctx_reliance/counterfactual_accuracy")
    assert not back.has_probe_set and back.selected_ids == ["a"] and back.peak_checkpoint is None
    assert back.paired is None and saved_probe_set(old, "ctx_reliance/counterfactual_accuracy") == (None, None)
    assert read_state({}, "ctx_reliance/counterfactual_accuracy") is None


def test_probe_reports_count_flips_since_the_peak_and_the_previous_event():
    reports = ProbeReports()
    assert reports.flip_counts(["context", "context", "memory"], new_peak=True) == {  # no previous event yet
        KEY_FLIPS_TO_MEMORY: 0.0, KEY_FLIPS_TO_CONTEXT: 0.0}
    counts = reports.flip_counts(["memory", "context", "context"], new_peak=False)
    assert counts == {KEY_FLIPS_TO_MEMORY: 1.0, KEY_FLIPS_TO_CONTEXT: 1.0, KEY_FLIPS_SINCE_PREVIOUS: 2.0}
    assert reports.flip_counts(["memory"], new_peak=False) == {}  # another probe count: not comparable


def test_selection_resumes_the_saved_probe_ids_and_warns_when_it_cannot(caplog):
    probes = probes_from_records(PROBES)
    selection = ProbeSelection(probes, known_only=True)
    ids = [probes[2].id, probes[0].id]
    saved = ResumeState(selected_ids=ids, known_counts={"capitals": {"kept": 2, "total": len(probes)}})
    selection.resume(saved, step=10, new_curve=False)
    assert selection.active_indices == [2, 0] and selection.saved_ids() == ids
    assert selection.monitored_count(None, selection.active_indices) == 2
    with caplog.at_level(logging.WARNING, logger="ctx_callback"):
        selection.resume(ResumeState(selected_ids=["nope"]), step=10, new_curve=False)
    assert selection.active_indices is None and "cannot be restored" in caplog.text


def test_check_band_and_the_significance_count_name_the_argument():
    assert check_band([0.1, 0.9], "loglik") == (0.1, 0.9)
    with pytest.raises(ConfigurationError, match="informative_band must be None"):
        check_band((0.9, 0.1), "loglik")
    with pytest.raises(ConfigurationError, match="needs mode='loglik'"):
        check_band((0.1, 0.9), "generate")
    monitor = parse_monitor("counterfactual_accuracy", "loglik")
    with pytest.raises(ConfigurationError, match="needs at least 6 monitored probes"):
        check_significant_probe_count(5, "here", monitor, 0.05)


def test_validate_arguments_resolves_the_monitor_and_builds_one_decider():
    import inspect

    from ctx_callback import ContextRelianceCallback

    defaults = {name: p.default for name, p in inspect.signature(ContextRelianceCallback).parameters.items()}
    arguments = dict(defaults, trainer=None, probes=PROBES, monitor="parametric_accuracy", patience=2)
    options = validate_arguments(arguments)
    assert options.monitor.greater_is_better is False and options.decider.tracker.mode == "min"
    assert options.probe_set_sha1 == probe_set_digest(options.probes)
    assert [rule.name for rule in options.decider.rules] == ["patience"]
    with pytest.raises(ConfigurationError, match="eval_steps must be an integer"):
        validate_arguments(dict(arguments, eval_steps=0))


def summary_facts(**overrides) -> RunFacts:
    history = [{"step": 0, "k": 0.5, "k_ci_low": 0.4, "k_ci_high": 0.6}, {"step": 2, "k": 0.7},
               {"step": 4, "k": 0.6, "ctx_reliance/decline_from_peak": 0.1}]
    facts = dict(monitor_key="k", history=history, peak_step=2, peak_value=0.65, probe_events=3, stop_step=4,
                 stop_reason="why", stop_rule="patience", peak_checkpoint=None, peak_save_error=None,
                 restored_from=RESTORED_FROM_BASELINE, end_step=4, train_start_step=0, probe_seconds_total=1.25,
                 known_counts=None, curve_start_step=None)
    facts.update(overrides)
    return RunFacts(**facts)


def test_summary_reports_baseline_peak_final_and_the_restore():
    s = summarize(summary_facts(), restored=True)
    assert (s["baseline"], s["peak_raw"], s["final"], s["final_decline_from_peak"]) == (0.5, 0.7, 0.6, 0.1)
    assert s["trained_steps"] == 4 and s["restored_from"] == RESTORED_FROM_BASELINE and s["stop_rule"] == "patience"
    text = summary_text(s, restored=True)
    assert "peak checkpoint: None (the peak is the baseline" in text and "over 3 events" in text
    assert summary_text(summarize(summary_facts(history=[], peak_step=None, peak_value=math.nan))).splitlines()[3] \
        == "  final    n/a (no probe succeeded)"


def test_peak_checkpointer_keeps_and_restores_the_baseline(tokenizer):
    model = make_tiny_llama(tokenizer)
    checkpointer = PeakCheckpointer(trainer=None)
    checkpointer.keep_baseline(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert checkpointer.restore_at_end(model, peak_step=0, end_step=6)
    assert checkpointer.restored_from == RESTORED_FROM_BASELINE and checkpointer.baseline_weights is None
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name
    checkpointer.peak_save_error = "disk full"
    assert not checkpointer.restore_at_end(model, peak_step=4, end_step=6)  # a warning, the final weights kept
    assert checkpointer.note() == " The peak checkpoint was not saved (disk full)."


def test_rank_zero_messages_reach_the_callbacks_logger(caplog):
    with caplog.at_level(logging.INFO, logger="ctx_callback"):
        rank_zero_info("fact %d", 1)
        rank_zero_warn("act %d", 2)
    records = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
    assert ("ctx_callback.callback", "WARNING", "act 2") in records
    assert any(message == "fact 1" for _, _, message in records)
