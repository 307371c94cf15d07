"""``DeferredContextRelianceCallback``: the callback for frameworks that build the Trainer themselves
(LLaMA-Factory's ``run_exp(args, callbacks=[...])``; docs/integrations.md).

A real ``SFTTrainer`` built with ``callbacks=[...]`` (as such a framework does), a tiny Llama, a real TensorBoard
event file read back: the deferred callback logs exactly the rows the plain callback logs, through the trainer.
"""

from __future__ import annotations

import glob

import pytest
from transformers import TrainerCallback

from ctx_callback import ContextRelianceCallback, DeferredContextRelianceCallback, TrainerWiringError
from ctx_callback.deferred_callback import find_trainer_holding
from tests.helpers import PROBES, conflict_dataset, make_tiny_llama, sft_config

KEY = "ctx_reliance/counterfactual_probability"


def build_trainer(tokenizer, output_dir, callbacks, **overrides):
    from trl import SFTTrainer

    return SFTTrainer(model=make_tiny_llama(tokenizer), args=sft_config(output_dir, **overrides),
                      train_dataset=conflict_dataset(2, 2), processing_class=tokenizer, callbacks=callbacks)


def reliance_rows(trainer):
    return {row["step"]: {k: v for k, v in row.items() if k.startswith("ctx_reliance/") and "seconds" not in k}
            for row in trainer.state.log_history if KEY in row}


def test_deferred_callback_binds_at_init_and_logs_what_the_plain_callback_logs(tokenizer, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    deferred = DeferredContextRelianceCallback(PROBES, eval_steps=2)
    trainer = build_trainer(tokenizer, tmp_path / "deferred", [deferred], max_steps=4, report_to="tensorboard")
    assert deferred.trainer is trainer  # bound when the Trainer finished building, before train()
    trainer.train()

    plain_trainer = build_trainer(tokenizer, tmp_path / "plain", None, max_steps=4)
    plain_trainer.add_callback(ContextRelianceCallback(plain_trainer, PROBES, eval_steps=2))
    plain_trainer.train()

    rows, expected = reliance_rows(trainer), reliance_rows(plain_trainer)
    assert sorted(rows) == [0, 2, 4] and rows == expected  # same process, same batches: equal by construction
    assert [r["loss"] for r in trainer.state.log_history if "loss" in r] == \
        [r["loss"] for r in plain_trainer.state.log_history if "loss" in r]

    files = glob.glob(str(tmp_path / "deferred" / "runs" / "**" / "events.out.tfevents.*"), recursive=True)
    assert len(files) == 1, files
    acc = EventAccumulator(files[0])
    acc.Reload()
    logged = {e.step: e.value for e in acc.Scalars(f"train/{KEY}")}  # reached the tracker through Trainer.log
    assert logged == pytest.approx({step: row[KEY] for step, row in rows.items()}, rel=1e-6, abs=1e-6)


def test_deferred_callback_added_after_init_binds_at_train_begin(tokenizer, tmp_path):
    trainer = build_trainer(tokenizer, tmp_path, None, max_steps=2)
    deferred = DeferredContextRelianceCallback(PROBES, eval_steps=2)
    trainer.add_callback(deferred)
    assert deferred.trainer is None
    trainer.train()
    assert deferred.trainer is trainer and sorted(reliance_rows(trainer)) == [0, 2]


def test_deferred_callback_without_a_trainer_on_the_stack_fails_at_train_begin(tokenizer, tmp_path):
    from transformers import TrainerControl, TrainerState

    deferred = DeferredContextRelianceCallback(PROBES, eval_steps=2, tokenizer=tokenizer)
    args = sft_config(tmp_path)
    with pytest.raises(TrainerWiringError, match="needs the trainer"):
        deferred.on_train_begin(args, TrainerState(), TrainerControl(), model=make_tiny_llama(tokenizer))
    assert find_trainer_holding(deferred) is None


def test_deferred_callback_refuses_a_trainer_argument(tokenizer, tmp_path):
    trainer = build_trainer(tokenizer, tmp_path, None, max_steps=1)
    with pytest.raises(TypeError, match="ContextRelianceCallback\\(trainer"):
        DeferredContextRelianceCallback(PROBES, trainer=trainer)


def test_another_trainer_on_the_stack_is_not_taken(tokenizer, tmp_path):
    """A Trainer that does not hold the callback (a framework's outer trainer, say) is not bound to."""
    other = build_trainer(tokenizer, tmp_path / "other", None, max_steps=1)
    deferred = DeferredContextRelianceCallback(PROBES)

    class Probe(TrainerCallback):
        found = "unset"

        def on_init_end(self, args, state, control, **kwargs):
            Probe.found = find_trainer_holding(deferred)

    other.callback_handler.add_callback(Probe())
    other.callback_handler.on_init_end(other.args, other.state, other.control)
    assert Probe.found is None
