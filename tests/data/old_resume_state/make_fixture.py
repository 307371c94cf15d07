"""Write the old-resume-state fixture: a checkpoint's ``trainer_state.json`` written by ctx_callback before issue 19.

Run with the OLD code (commit 598d62b) on the path, from a checkout of it::

    PYTHONPATH=/tmp/ctx_before OMP_NUM_THREADS=1 python tests/data/old_resume_state/make_fixture.py OUT_DIR

It trains the rise-and-fall run of ``tests/test_callback.py`` (a tiny Llama, patience 2, plus
``stop_rule="significant_decline"`` so that the paired state matters) and interrupts it at step 24 (after the peak,
before the stop), where the Trainer saves ``checkpoint-24``. It writes ``OUT_DIR/trainer_state.json`` (that
checkpoint's Trainer state, with the old callback's resume state in ``stateful_callbacks``) and
``OUT_DIR/expected.json``: what the old callback held at that step (its peak tracker, its rows, its paired
peak/previous events, and its decision on a scripted next event). ``tests/test_old_resume_state.py`` resumes the
new code from the state file and compares.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

from transformers import AutoTokenizer

from ctx_callback import ContextRelianceCallback
from ctx_callback.models import smollm2_path
from tests.helpers import PROBES, StopAt, make_tiny_llama, make_trainer

#: The callback's options (the rise-and-fall run's, with significant_decline).
OPTIONS = dict(eval_steps=2, monitor="counterfactual_probability", patience=2, warmup_steps=4,
               save_peak_checkpoint=True, restore_peak_at_end=False, variants=("context", "closed_book"),
               stop_rule="significant_decline", verbose=False)
INTERRUPT_AT = 24


def _number(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def next_event(callback) -> dict:
    """The old code's decision on a scripted next event (every probe 0.3 below the peak event): what the resumed
    run would decide and log at step 26."""
    from ctx_callback.callback import KEY_DECLINE, KEY_DECLINE_HIGH, KEY_DECLINE_LOW, KEY_DECLINE_P
    from ctx_callback.decisions import ProbeEvent, first_stop

    outcomes = [max(0.0, v - 0.3) for v in callback._peak_event.outcomes.tolist()]
    event = ProbeEvent(INTERRUPT_AT + 2, sum(outcomes) / len(outcomes), __import__("numpy").array(outcomes))
    peak = callback.peak_tracker.update(event.step, event.value)
    stop, _ = first_stop(callback.stop_rules, event)
    row = callback._paired_row(event, callback._previous_preferred, peak.is_new_peak, None)
    return {"outcomes": outcomes, "value": event.value, "smoothed": peak.smoothed, "is_new_peak": peak.is_new_peak,
            "stop": stop is not None, "reason": None if stop is None else stop.message,
            "rule": None if stop is None else stop.rule,
            "row": {k: row.get(k) for k in (KEY_DECLINE, KEY_DECLINE_LOW, KEY_DECLINE_HIGH, KEY_DECLINE_P)}}


def main(out: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    work = Path(tempfile.mkdtemp())
    try:
        trainer = make_trainer(make_tiny_llama(tokenizer), tokenizer, work, max_steps=30, save_strategy="steps",
                               save_steps=5)
        callback = ContextRelianceCallback(trainer, PROBES, **OPTIONS)
        trainer.add_callback(callback)
        trainer.add_callback(StopAt(INTERRUPT_AT))
        trainer.train()
        assert trainer.state.global_step == INTERRUPT_AT, trainer.state.global_step
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(work / f"checkpoint-{INTERRUPT_AT}" / "trainer_state.json", out / "trainer_state.json")
        tracker = callback.peak_tracker
        peak, previous = callback._peak_event, callback._previous_event
        expected = {
            "options": {k: list(v) if isinstance(v, tuple) else v for k, v in OPTIONS.items()},
            "step": INTERRUPT_AT,
            "tracker": {"peak_step": tracker.peak_step, "peak_value": _number(tracker.peak_value),
                        "smoothed": _number(tracker.smoothed), "events_since_peak": tracker.events_since_peak,
                        "num_events": tracker.num_events},
            "num_valid_events": [getattr(rule, "num_valid_events", None) for rule in callback.stop_rules],
            "peak_event": {"step": peak.step, "value": peak.value,
                           "outcomes": [_number(v) for v in peak.outcomes.tolist()]},
            "previous_event": {"step": previous.step, "value": previous.value},
            "peak_preferred": callback._peak_preferred,
            "previous_preferred": callback._previous_preferred,
            "history": callback.history,
            "probe_events": callback.probe_events,
            "last_probe_step": callback.last_probe_step,
            "next_event": next_event(callback),
        }
        (out / "expected.json").write_text(json.dumps(expected, indent=1, default=float) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
