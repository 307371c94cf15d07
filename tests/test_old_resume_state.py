"""A checkpoint written before issue 19's redesign still resumes, with the same peak, decision state and values.

``tests/data/old_resume_state/trainer_state.json`` is the ``trainer_state.json`` of a checkpoint that ctx_callback
wrote before the redesign (commit 598d62b), and ``expected.json`` what that callback held at the checkpoint's step
(and decided on a scripted next event); ``make_fixture.py`` beside them says how both were made. No training runs
here: the new callback is resumed on that state (``on_train_begin`` at the checkpoint's step) and compared.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from transformers import TrainerControl, TrainerState

from ctx_callback import ContextRelianceCallback
from ctx_callback.decisions import ProbeEvent
from ctx_callback.reliance_row import KEY_DECLINE, KEY_DECLINE_HIGH, KEY_DECLINE_LOW, KEY_DECLINE_P
from ctx_callback.resume_state import STATE_KEY
from tests.helpers import PROBES, make_tiny_llama, make_trainer

DATA = Path(__file__).parent / "data" / "old_resume_state"


@pytest.fixture
def resumed(tokenizer, tmp_path, caplog):
    """The new callback resumed on the old checkpoint's Trainer state."""
    expected = json.loads((DATA / "expected.json").read_text())
    state = TrainerState.load_from_json(str(DATA / "trainer_state.json"))
    original = copy.deepcopy(state.stateful_callbacks)
    # sustained_events=1: the rule the old run had (the option did not exist; it now defaults to 2, whose resume
    # state also keeps the latest events' outcomes, a field the old layout lacks).
    options = dict(expected["options"], variants=tuple(expected["options"]["variants"]), sustained_events=1)
    trainer = make_trainer(make_tiny_llama(tokenizer), tokenizer, tmp_path, max_steps=30, save_strategy="steps",
                           save_steps=5, save_total_limit=1)
    callback = ContextRelianceCallback(trainer, PROBES, **options)
    # The run's peak checkpoint, where a resume in this output_dir looks for it (the state names the old folder).
    (tmp_path / f"checkpoint-{expected['tracker']['peak_step']}").mkdir()
    trainer.state = state
    caplog.clear()  # the construction's warning about few probes is not the resume's
    with caplog.at_level(logging.WARNING, logger="ctx_callback"):
        callback.on_train_begin(trainer.args, state, TrainerControl(), model=trainer.model,
                                processing_class=tokenizer)
    return callback, state, original, expected, tmp_path, list(caplog.records)


def test_old_state_resumes_with_the_same_peak_and_decision_state(resumed):
    callback, state, _, expected, tmp_path, warnings = resumed
    assert state.global_step == expected["step"]
    resume_warnings = [r.getMessage() for r in warnings if "resume" in r.getMessage() or "checkpoint" in r.getMessage()]
    assert not resume_warnings, resume_warnings  # the old per-probe outcomes and probe set were read
    tracker = callback.peak_tracker
    assert {"peak_step": tracker.peak_step, "peak_value": tracker.peak_value, "smoothed": tracker.smoothed,
            "events_since_peak": tracker.events_since_peak, "num_events": tracker.num_events} == expected["tracker"]
    assert callback.decider.num_valid_events == expected["num_valid_events"][-1]  # significant_decline's count
    peak, previous = callback.decider.peak_event, callback.decider.previous_event
    assert (peak.step, peak.value) == (expected["peak_event"]["step"], expected["peak_event"]["value"])
    assert peak.outcomes.tolist() == expected["peak_event"]["outcomes"]
    assert (previous.step, previous.value) == (expected["previous_event"]["step"], expected["previous_event"]["value"])
    assert callback.reports.peak_preferred == expected["peak_preferred"]
    assert callback.reports.previous_preferred == expected["previous_preferred"]
    # The same rows (trainer_state.json stores them with sorted keys: the order is the file's, as before).
    assert json.dumps(callback.history, sort_keys=True) == json.dumps(expected["history"], sort_keys=True)
    assert (callback.probe_events, callback.last_probe_step) == (expected["probe_events"], expected["last_probe_step"])
    assert callback.peak_checkpoint == str(tmp_path / f"checkpoint-{tracker.peak_step}")


def test_old_state_is_written_back_in_the_same_layout(resumed):
    callback, state, original, *_ = resumed
    key = callback.monitor_key
    before, after = original[STATE_KEY][key], state.stateful_callbacks[STATE_KEY][key]
    assert list(after) == ["version", "probe_set", "curve_start_step", "known_only_probe_ids", "known_counts",
                           "informative_band", "peak_checkpoint", "peak_save_error", "paired"]
    assert {k: v for k, v in after.items() if k != "peak_checkpoint"} == \
        {k: v for k, v in before.items() if k != "peak_checkpoint"}
    assert after["peak_checkpoint"] == callback.peak_checkpoint  # this output_dir's copy of the peak folder


def test_old_state_takes_the_same_next_decision_and_logs_the_same_values(resumed):
    callback, _, _, expected, *_ = resumed
    nxt = expected["next_event"]
    decision = callback.decider.update(ProbeEvent(expected["step"] + 2, nxt["value"], np.array(nxt["outcomes"])))
    assert (decision.peak.smoothed, decision.peak.is_new_peak) == (nxt["smoothed"], nxt["is_new_peak"])
    assert (decision.stop, decision.reason, decision.rule) == (nxt["stop"], nxt["reason"], nxt["rule"])
    comparison = decision.comparison
    logged = {KEY_DECLINE: comparison.decline, KEY_DECLINE_P: comparison.p_value,
              KEY_DECLINE_LOW: None if comparison.interval is None else comparison.interval[0],
              KEY_DECLINE_HIGH: None if comparison.interval is None else comparison.interval[1]}
    assert logged == nxt["row"]
