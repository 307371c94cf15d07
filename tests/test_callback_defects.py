"""User-found defects of the callback's resume and stop logic (issue 20, items 6 and 9), each in a real tiny run.

- Item 6: resuming with a different probe set. The checkpoint stores its probe set's digest; a resume with other
  probes is refused before any step (``ConfigurationError``), or, with ``on_probe_set_change="new_curve"``, starts a
  new curve at the resumed step that never compares with the old probes' peak, also across a later resume.
- Item 9a: ``stopping_threshold`` already crossed at the baseline: the Trainer cannot stop before its first optimizer
  step, so the callback refuses to start (no step trained) instead of saying "stopping at step 0" and training one.
- Item 9b: ``stop_rule="significant_decline"`` with too few probes is refused (it could never stop on one probe); the
  paired t-test no longer calls two probes that moved alike "p = 0" (``tests/test_stop_rules.py``).

Real parts only: the SmolLM2 tokenizer, a tiny random Llama, a real SFTTrainer, checkpoints in ``tmp_path``.
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file

from ctx_callback import ConfigurationError, ContextRelianceCallback, probes_from_records
from ctx_callback import callback as callback_module
from ctx_callback.callback import STATE_KEY
from tests.helpers import PROBES, capital_records, conflict_dataset, make_tiny_llama, make_trainer

CF_PROB = "ctx_reliance/counterfactual_probability"
#: The other probe set of item 6: four probes none of the first run measured.
OTHER_PROBES = capital_records(4, family="capitals_b")
#: Cheap probing: the context variant only (what the peak and the stop rules read), every 2 steps.
OPTIONS = dict(eval_steps=2, variants=("context",), verbose=False)


def train(tokenizer, output_dir, probes, *, max_steps, resume=None, trainer_kwargs=None, **options):
    """A tiny SFT run (14 examples, batch 7); returns the trainer, the callback and the error ``train()`` raised."""
    model = make_tiny_llama(tokenizer)
    trainer = make_trainer(model, tokenizer, output_dir, dataset=conflict_dataset(1, 1), max_steps=max_steps,
                           **(trainer_kwargs or {}))
    callback = ContextRelianceCallback(trainer, probes, **{**OPTIONS, **options})
    trainer.add_callback(callback)
    error = None
    try:
        trainer.train(resume_from_checkpoint=resume)
    except ConfigurationError as err:
        error = err
    return trainer, callback, error


def rows_of(trainer):
    return {r["step"]: r for r in trainer.state.log_history if CF_PROB in r}


def probe_set_digest(records):
    return callback_module.probe_set_digest(probes_from_records(records))


def copy_checkpoint(source, output_dir):
    """A copy of a checkpoint in a fresh output_dir (runs that share a fixture never write into each other)."""
    target = output_dir / source.name
    shutil.copytree(source, target)
    return target


# ----------------------------------------------------------------------------------------------------------------
# Item 6: resuming with a different probe set
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def first_run(tokenizer, tmp_path_factory):
    """Steps 0-4 on the 7 capital probes, probed at 0, 2, 4; checkpoints every 2 steps."""
    out = tmp_path_factory.mktemp("first") / "run"
    trainer, callback, error = train(tokenizer, out, PROBES, max_steps=4, patience=3,
                                     trainer_kwargs=dict(save_strategy="steps", save_steps=2))
    assert error is None and sorted(rows_of(trainer)) == [0, 2, 4]
    return out / "checkpoint-4", trainer, callback


def test_the_checkpoint_stores_the_probe_set(first_run):
    checkpoint, _, _ = first_run
    entry = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"][STATE_KEY][CF_PROB]
    assert entry["probe_set"] == {"num_probes": len(PROBES), "sha1": probe_set_digest(PROBES)}
    assert entry["curve_start_step"] is None


def test_resume_with_other_probes_is_refused_before_any_step(first_run, tokenizer, tmp_path):
    """Before the fix: the resumed run trained and its peak, patience and paired test compared 7 probes with 4,
    silently (no stop rule set)."""
    checkpoint, first, _ = first_run
    resumed = copy_checkpoint(checkpoint, tmp_path)
    trainer, _, error = train(tokenizer, tmp_path, OTHER_PROBES, max_steps=8, patience=3, resume=str(resumed))
    assert isinstance(error, ConfigurationError)
    message = str(error)
    digest_old = probe_set_digest(PROBES)[:12]
    digest_new = probe_set_digest(OTHER_PROBES)[:12]
    for text in ("resuming at step 4", f"{len(PROBES)} probes (probe set sha1 {digest_old})",
                 f"{len(OTHER_PROBES)} probes (probe set sha1 {digest_new})", "on_probe_set_change='new_curve'",
                 "pass the probes the run started with"):
        assert text in message, text
    # Nothing trained, nothing probed: the model holds the checkpoint's weights, the history ends at step 4.
    assert trainer.state.global_step == 4
    assert max(r["step"] for r in trainer.state.log_history) == 4
    saved = load_file(str(resumed / "model.safetensors"))
    state = trainer.model.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in saved.items())


def test_the_probe_set_digest_sees_edited_texts_and_order():
    edited = [dict(PROBES[0], context="The capital of France is Nice."), *PROBES[1:]]
    assert probe_set_digest(PROBES) != probe_set_digest(edited)
    assert probe_set_digest(PROBES) != probe_set_digest(PROBES[::-1])
    assert probe_set_digest(PROBES) == probe_set_digest([dict(r) for r in PROBES])
    with pytest.raises(ConfigurationError, match="on_probe_set_change must be one of"):
        ContextRelianceCallback(None, PROBES, on_probe_set_change="ignore")


@pytest.fixture(scope="module")
def new_curve(first_run, tokenizer, tmp_path_factory):
    """Resumed at step 4 on the other probes with ``on_probe_set_change="new_curve"``, to step 8 (``checkpoint-6``
    and ``-8`` saved)."""
    checkpoint, _, _ = first_run
    out = tmp_path_factory.mktemp("new_curve")
    resumed = copy_checkpoint(checkpoint, out)
    logger = logging.getLogger("ctx_callback.callback")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        trainer, callback, error = train(tokenizer, out, OTHER_PROBES, max_steps=8, patience=3, resume=str(resumed),
                                         on_probe_set_change="new_curve",
                                         trainer_kwargs=dict(save_strategy="steps", save_steps=2))
    finally:
        logger.removeHandler(handler)
    assert error is None
    return out, trainer, callback, [r.getMessage() for r in records if r.levelno >= logging.WARNING]


def test_new_curve_starts_at_the_resumed_step_with_a_warning(new_curve, first_run):
    out, trainer, callback, warnings = new_curve
    _, first, _ = first_run
    (warning,) = [w for w in warnings if "on_probe_set_change='new_curve'" in w]
    assert "Starting a NEW reliance curve at step 4" in warning and "must not be compared" in warning
    rows = rows_of(trainer)
    assert sorted(rows) == [0, 2, 4, 6, 8]
    assert all(rows[s]["ctx_reliance/num_probes"] == len(PROBES) for s in (0, 2, 4))  # the old rows stay
    assert all(rows[s]["ctx_reliance/num_probes"] == len(OTHER_PROBES) for s in (6, 8))
    # The new curve never compares with the old probes: its first event is its own peak, with nothing before it.
    assert rows[6]["ctx_reliance/peak_step"] == 6 and rows[6]["ctx_reliance/decline_from_peak"] == 0.0
    assert rows[6]["ctx_reliance/monitor_smoothed"] == rows[6][CF_PROB]  # smoothing starts over
    assert "ctx_reliance/flips_since_previous" not in rows[6]
    assert callback.peak_tracker.peak_step in (6, 8) and callback.peak_tracker.num_events == 2
    assert [r["step"] for r in callback.history] == [6, 8]
    summary = json.loads((out / "ctx_reliance_summary.json").read_text())["summary"]
    assert summary["curve_start_step"] == 4 and summary["baseline_step"] == 6 and summary["probe_events"] == 2
    assert "a new curve from step 4" in callback.summary_text()
    entry = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["stateful_callbacks"][STATE_KEY]
    assert entry[CF_PROB]["curve_start_step"] == 4
    assert entry[CF_PROB]["probe_set"]["num_probes"] == len(OTHER_PROBES)


def test_a_later_resume_continues_the_new_curve(new_curve, tokenizer, tmp_path):
    """Resumed from the new curve's own checkpoint with its probes (the default ``"error"``): no refusal, and the
    same decisions as the run that went on, never reading the old probes' rows."""
    out, full, full_cb, _ = new_curve
    resumed = copy_checkpoint(out / "checkpoint-6", tmp_path)
    trainer, callback, error = train(tokenizer, tmp_path, OTHER_PROBES, max_steps=8, patience=3, resume=str(resumed))
    assert error is None
    assert callback.curve_start_step == 4
    assert [r["step"] for r in callback.history] == [6, 8]
    assert callback.peak_tracker.peak_step == full_cb.peak_tracker.peak_step
    for key in ("ctx_reliance/peak_step", "ctx_reliance/peak_value", "ctx_reliance/monitor_smoothed",
                "ctx_reliance/decline_from_peak", "ctx_reliance/flips_since_previous"):
        assert rows_of(trainer)[8][key] == pytest.approx(rows_of(full)[8][key], rel=1e-4, abs=1e-5), key


# ----------------------------------------------------------------------------------------------------------------
# Item 9a: stopping_threshold above the baseline
# ----------------------------------------------------------------------------------------------------------------


def test_stopping_threshold_crossed_at_the_baseline_refuses_to_start(tokenizer, tmp_path):
    """Before the fix: "stopping training at step 0", then one unprobed optimizer step (global_step 1)."""
    model = make_tiny_llama(tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = make_trainer(model, tokenizer, tmp_path, dataset=conflict_dataset(1, 1), max_steps=4)
    trainer.add_callback(ContextRelianceCallback(trainer, PROBES, stopping_threshold=0.99, **OPTIONS))
    with pytest.raises(ConfigurationError) as info:
        trainer.train()
    message = str(info.value)
    for text in ("stopping_threshold fired on the baseline", "below the floor stopping_threshold 0.99",
                 "cannot stop before its first optimizer step", "warmup_steps"):
        assert text in message, text
    assert trainer.state.global_step == 0
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # no optimizer step
    assert [r["step"] for r in trainer.state.log_history] == [0]  # the baseline row, no loss row
    assert trainer.state.log_history[0][CF_PROB] < 0.99


# ----------------------------------------------------------------------------------------------------------------
# Item 9b: significant_decline with too few probes
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 5])
def test_significant_decline_with_too_few_probes_is_refused_at_construction(count):
    """Before the fix: accepted; with 1 probe the rule can never stop, with 2 it stopped at "p = 0.0"."""
    with pytest.raises(ConfigurationError, match=rf"needs at least 6 monitored probes at alpha=0.05, got {count}"):
        ContextRelianceCallback(None, PROBES[:count], stop_rule="significant_decline")
    # alpha=0.01 needs 8: the smallest n with 2^(1 - n) < alpha
    with pytest.raises(ConfigurationError, match="needs at least 8 monitored probes at alpha=0.01, got 7"):
        ContextRelianceCallback(None, PROBES, stop_rule="significant_decline", alpha=0.01)


def test_significant_decline_counts_the_monitored_family_and_warns_below_the_recommendation(caplog):
    mixed = PROBES + capital_records(4, family="capitals_b")
    with pytest.raises(ConfigurationError, match="got 4 .*monitor ctx_reliance/capitals_b/counterfactual_probability"):
        ContextRelianceCallback(None, mixed, stop_rule="significant_decline",
                                monitor="capitals_b/counterfactual_probability")
    with caplog.at_level(logging.WARNING, logger="ctx_callback.callback"):
        ContextRelianceCallback(None, mixed, stop_rule="significant_decline")
        ContextRelianceCallback(None, mixed, patience=2)  # other rules: no warning
    (message,) = [r.getMessage() for r in caplog.records if "significant_decline" in r.getMessage()]
    assert "on 11 monitored probes (paired t-test)" in message and "at least 100 probes" in message


def test_significant_decline_left_with_too_few_probes_after_the_selection_fails_before_step_one(tokenizer, tmp_path):
    """``informative_band`` keeps 3 of 7 probes: refused at train begin, before any optimizer step. The 4 dropped
    probes have a 20-word counterfactual answer, hundreds of nats below the parametric one on any model."""
    far = [dict(r, id=r["id"] + "-far", counterfactual_answer=" ".join(["Lyon"] * 20),
                context=f"The capital is {' '.join(['Lyon'] * 20)}.") for r in capital_records(4, family="far")]
    probes = capital_records(3) + far
    trainer, callback, error = train(tokenizer, tmp_path, probes, max_steps=2, stop_rule="significant_decline",
                                     informative_band=(1e-20, 1.0))
    assert isinstance(error, ConfigurationError), error
    assert "needs at least 6 monitored probes at alpha=0.05, got 3 (at train begin after the known_only" in str(error)
    assert len(callback.active_indices) == 3 and trainer.state.global_step == 0
