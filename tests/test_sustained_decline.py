"""``significant_decline`` with ``sustained_events``: a dip that recovers does not stop; resume; ``keep_best``.

The rule's arithmetic on hand-built events (a qualifying dip, a recovery, a sustained fall), its relation to the
one-event rule (every sustained stop is a stop of the one-event rule, so the false-stop control is inherited), a
real tiny run interrupted inside a streak and resumed (the streak is rebuilt from the kept per-probe outcomes, and
without them the stop comes later: the test can fail), and ``keep_best`` as one argument.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from ctx_callback import ContextRelianceCallback
from ctx_callback.decisions import ProbeEvent, make_stop_rules
from ctx_callback.errors import ConfigurationError
from ctx_callback.resume_state import STATE_KEY
from ctx_callback.stopping import StopDecider
from tests.helpers import StopAt, make_tiny_llama, make_trainer
from tests.test_stop_rules_training import CF_PROB, PHRASED_PROBES, RULE_OPTIONS, probe_rows_of, run

N = 120


def events(*shifts, seed=0):
    """Probe events whose per-probe outcomes (probabilities, clipped to [0, 1]) are a fixed base plus ``shift``
    each, with small per-probe noise: every shift of 0.1 or more is a decline a paired t-test finds significant."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.5, 0.9, N)
    out = []
    for i, shift in enumerate(shifts):
        outcomes = np.clip(base + shift + rng.normal(0, 0.01, N), 0, 1)
        out.append(ProbeEvent(10 * i, float(outcomes.mean()), outcomes))
    return out


def stop_step(sequence, **options):
    decider = StopDecider.from_options(stop_rule="significant_decline", smoothing="none", **options)
    for event in sequence:
        decision = decider.update(event)
        if decision.stop:
            return event.step, decision
    return None, None


# peak at step 10, a one-event dip at 30 that recovers at 40, then a fall from step 60 on
DIP_THEN_FALL = (0.0, 0.1, 0.09, -0.1, 0.1, 0.095, -0.15, -0.15, -0.15)


def test_a_dip_that_recovers_stops_only_the_one_event_rule():
    sequence = events(*DIP_THEN_FALL)
    assert stop_step(sequence, sustained_events=1)[0] == 30  # the dip is significant: the one-event rule stops there
    assert stop_step(sequence)[0] == 70  # the default, 2 events
    step, decision = stop_step(sequence, sustained_events=2)
    assert step == 70
    assert "at 2 consecutive events (sustained_events=2)" in decision.reason
    assert stop_step(sequence, sustained_events=3)[0] == 80
    assert stop_step(sequence, sustained_events=4)[0] is None


def test_the_streak_message_and_a_new_peak_resets_it():
    # qualifying at 20, then a new peak at 30 (higher than 10), then qualifying at 40 and 50
    sequence = events(0.0, 0.1, -0.1, 0.15, -0.1, -0.1)
    decider = StopDecider.from_options(stop_rule="significant_decline", smoothing="none", sustained_events=2)
    messages = [decider.update(event).decisions[0].message for event in sequence]
    assert "at 1 of the sustained_events=2 consecutive events needed" in messages[2]
    assert decider.peak_step == 30
    assert "at 1 of the sustained_events=2" in messages[4]  # the streak before the new peak does not count
    assert "at 2 consecutive events" in messages[5]


def test_warmup_still_applies_to_a_sustained_stop():
    sequence = events(*DIP_THEN_FALL)
    assert stop_step(sequence, sustained_events=2, warmup=75)[0] == 80


def test_every_sustained_stop_is_a_stop_of_the_one_event_rule_at_or_before_it():
    rng = np.random.default_rng(1)
    checked = 0
    for run_index in range(60):
        shifts = np.cumsum(rng.normal(0, 0.05, 10))
        sequence = events(*shifts, seed=run_index)
        one, _ = stop_step(sequence, sustained_events=1)
        for k in (2, 3):
            sustained, _ = stop_step(sequence, sustained_events=k)
            if sustained is not None:
                checked += 1
                assert one is not None and one <= sustained
    assert checked > 5, "the random walks must give some sustained stops for the property to be checked"


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2", None])
def test_sustained_events_must_be_a_positive_integer(bad):
    with pytest.raises(ConfigurationError, match="sustained_events must be an integer >= 1"):
        make_stop_rules(stop_rule="significant_decline", sustained_events=bad)


def test_resume_inside_a_streak_stops_where_the_uninterrupted_run_stops(tokenizer, tmp_path):
    options = dict(sustained_events=3)
    full, full_cb = run(tokenizer, tmp_path / "full", **options)
    stop = full_cb.stop_step
    assert stop is not None and full_cb.stop_rule_name == "significant_decline", "the run must stop"
    assert "at 3 consecutive events" in full_cb.stop_reason
    rows = {r["step"]: r for r in probe_rows_of(full)}
    # The two events before the stop qualified too (a streak of three), so a resume after them is inside it.
    for step in (stop - 2, stop - 4):
        assert rows[step]["ctx_reliance/decline_from_peak"] >= RULE_OPTIONS["min_decline"]
    out = tmp_path / "resumed"
    first, _ = run(tokenizer, out, extra_callbacks=[StopAt(stop - 2)], **options)
    checkpoint = out / f"checkpoint-{stop - 2}"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    paired = state["stateful_callbacks"][STATE_KEY][CF_PROB]["paired"]
    assert [e["step"] for e in paired["recent"]] == [stop - 6, stop - 4, stop - 2]
    second, second_cb = run(tokenizer, out, resume=str(checkpoint), **options)
    assert second_cb.stop_step == stop and "at 3 consecutive events" in second_cb.stop_reason
    # The same decision, compared as test_stop_rules_training's resume test does (floats with a tolerance: a resumed
    # run's scores may differ from the uninterrupted run's in the last digits on another CPU).
    resumed_rows = {r["step"]: r for r in probe_rows_of(second)}
    for key in ("ctx_reliance/decline_from_peak", "ctx_reliance/decline_p_value"):
        assert resumed_rows[stop][key] == pytest.approx(rows[stop][key], rel=1e-4), key

    # Without the kept outcomes of the recent events, the streak starts over: the stop comes later (or never).
    bare = tmp_path / "bare"
    shutil.copytree(checkpoint, bare / checkpoint.name)
    del paired["recent"]
    (bare / checkpoint.name / "trainer_state.json").write_text(json.dumps(state))
    third, third_cb = run(tokenizer, bare, resume=str(bare / checkpoint.name), **options)
    assert third_cb.stop_step is None or third_cb.stop_step > stop


def test_the_one_event_rule_keeps_the_resume_state_layout(tokenizer, tmp_path):
    trainer, _ = run(tokenizer, tmp_path / "out", max_steps=6, extra_callbacks=[StopAt(6)])
    state = json.loads((tmp_path / "out" / "checkpoint-6" / "trainer_state.json").read_text())
    assert set(state["stateful_callbacks"][STATE_KEY][CF_PROB]["paired"]) == {"probes_sha1", "peak", "previous"}


def test_keep_best_never_stops_saves_each_peak_and_restores_the_best(tokenizer, tmp_path):
    def train(output_dir, **options):
        model = make_tiny_llama(tokenizer)
        trainer = make_trainer(model, tokenizer, output_dir, max_steps=30)
        callback = ContextRelianceCallback(trainer, PHRASED_PROBES, eval_steps=2, variants=("context",),
                                           verbose=False, **options)
        trainer.add_callback(callback)
        trainer.train()
        return trainer, callback

    kept, kept_cb = train(tmp_path / "keep", keep_best=True)
    assert kept_cb.save_peak_checkpoint and kept_cb.restore_peak_at_end
    assert kept.state.global_step == 30 and kept_cb.stop_step is None  # never stops
    peak = kept_cb.peak_tracker.peak_step
    assert 0 < peak < 30, "the curve must peak inside the run for this test to mean much"
    assert kept_cb.last_restored and kept_cb.restored_from.endswith(f"checkpoint-{peak}")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "keep" / f"checkpoint-{peak}" / "model.safetensors"))
    final = kept.model.state_dict()
    assert all(final[name].equal(tensor) for name, tensor in saved.items())  # the peak's weights, not step 30's


@pytest.mark.parametrize("rule", [dict(patience=3), dict(stop_rule="significant_decline"),
                                  dict(divergence_threshold=0.1), dict(stopping_threshold=0.2)])
def test_keep_best_with_a_stop_rule_is_refused(tokenizer, tmp_path, rule):
    trainer = make_trainer(make_tiny_llama(tokenizer), tokenizer, tmp_path, max_steps=2)
    name = next(iter(rule))
    with pytest.raises(ConfigurationError, match=f"keep_best=True means: never stop.*{name}="):
        ContextRelianceCallback(trainer, PHRASED_PROBES, keep_best=True, **rule)


def test_keep_best_must_be_a_bool(tokenizer, tmp_path):
    trainer = make_trainer(make_tiny_llama(tokenizer), tokenizer, tmp_path, max_steps=2)
    with pytest.raises(ConfigurationError, match="keep_best must be True or False, got 'yes'"):
        ContextRelianceCallback(trainer, PHRASED_PROBES, keep_best="yes")
