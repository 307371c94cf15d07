"""Reliability of ContextRelianceCallback on real (tiny) Trainer runs: what must never kill, silently skip or
mislabel a run. Each test is named after the defect it pins down."""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import shutil

import pytest
import torch
from transformers import TrainerCallback

from ctx_callback import ContextRelianceCallback
from ctx_callback.errors import ConfigurationError
from tests.helpers import PROBES, conflict_dataset, make_tiny_llama, make_trainer

CF_ACC = "ctx_reliance/counterfactual_accuracy"
CF_PROB = "ctx_reliance/counterfactual_probability"
SUMMARY = "ctx_reliance_summary.json"


def block_output_dir(tmp_path):
    """``tmp_path/afile/out`` as output_dir, made unwritable *after* the Trainer created it: ``afile`` becomes a
    regular file, so every mkdir/open below it fails with a real OS error (NotADirectoryError), even as root."""
    shutil.rmtree(tmp_path / "afile")
    (tmp_path / "afile").write_text("a file where the output directory's parent should be")


def summary_of(path):
    return json.loads((path / SUMMARY).read_text())


# ----------------------------------------------------------------------------------------------------------------
# 1. A non-writable output_dir
# ----------------------------------------------------------------------------------------------------------------


def test_unwritable_output_dir_does_not_kill_a_finished_run(tokenizer, tmp_path, caplog):
    def run(with_callback):
        root = tmp_path / str(with_callback)
        model = make_tiny_llama(tokenizer)
        trainer = make_trainer(model, tokenizer, root / "afile" / "out", max_steps=2)  # save_strategy="no"
        if with_callback:
            trainer.add_callback(ContextRelianceCallback(trainer, PROBES, eval_steps=1, plot=True, verbose=False))
        block_output_dir(root)
        return trainer.train(), trainer

    without, _ = run(False)  # the Trainer itself writes nothing there with save_strategy="no"
    with caplog.at_level(logging.WARNING, logger="ctx_callback.callback"):
        output, trainer = run(True)
    assert output.global_step == without.global_step == 2
    assert output.training_loss == without.training_loss  # exact: the callback must not change training at all
    assert [r["step"] for r in trainer.state.log_history if CF_ACC in r] == [0, 1, 2]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(SUMMARY in w and "Not a directory" in w for w in warnings), warnings
    if importlib.util.find_spec("matplotlib") is not None:  # plot=True without matplotlib only warns about that
        assert any("ctx_reliance.png" in w and "Not a directory" in w for w in warnings), warnings


def test_unwritable_output_dir_with_save_peak_checkpoint_fails_before_step_one(tokenizer, tmp_path):
    model = make_tiny_llama(tokenizer)
    out = tmp_path / "afile" / "out"
    trainer = make_trainer(model, tokenizer, out, max_steps=4)
    trainer.add_callback(ContextRelianceCallback(trainer, PROBES, eval_steps=2, save_peak_checkpoint=True))
    block_output_dir(tmp_path)
    with pytest.raises(ConfigurationError, match="not writable") as info:
        trainer.train()
    message = str(info.value)
    assert str(out) in message and "output_dir" in message and "save_peak_checkpoint=False" in message
    assert trainer.state.global_step == 0
    assert not [r for r in trainer.state.log_history if CF_ACC in r]  # failed before even the baseline probe


# ----------------------------------------------------------------------------------------------------------------
# 2. restore_peak_at_end when the peak is the baseline (step 0 is never saved as a checkpoint)
# ----------------------------------------------------------------------------------------------------------------


def test_restore_peak_at_end_restores_the_baseline_when_the_baseline_is_the_peak(tokenizer, tmp_path, caplog):
    model = make_tiny_llama(tokenizer)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # Memory phase only: the answer is always the true capital, so reliance on the context only falls.
    trainer = make_trainer(model, tokenizer, tmp_path, dataset=conflict_dataset(0, 15), max_steps=20)
    callback = ContextRelianceCallback(trainer, PROBES, eval_steps=2, monitor="counterfactual_probability",
                                       patience=2, warmup_steps=4, save_peak_checkpoint=True,
                                       restore_peak_at_end=True, variants=("context",), verbose=False)
    trainer.add_callback(callback)
    with caplog.at_level(logging.INFO, logger="ctx_callback.callback"):
        trainer.train()
    assert callback.peak_tracker.peak_step == 0, "the run must only fall for this test to mean anything"
    assert callback.stop_step == trainer.state.global_step == 4

    state = model.state_dict()
    assert state.keys() == initial.keys()
    for name, tensor in initial.items():
        assert torch.equal(state[name], tensor), name
    assert callback.last_restored
    summary = summary_of(tmp_path)["summary"]
    assert summary["restored_peak"] is True
    assert summary["peak_checkpoint"] is None
    assert summary["restored_from"] == "baseline (in memory)"
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "restored the baseline weights" in logged
    assert callback.checkpointer.baseline_weights is None  # freed once restored


def test_restore_peak_at_end_baseline_copy_holds_only_the_peft_adapter(tokenizer, tmp_path):
    peft = pytest.importorskip("peft")
    trainer = make_trainer(make_tiny_llama(tokenizer), tokenizer, tmp_path, max_steps=1,
                           peft_config=peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    callback = ContextRelianceCallback(trainer, PROBES, eval_steps=5, save_peak_checkpoint=True,
                                       restore_peak_at_end=True, variants=("context",), verbose=False)
    seen = {}

    class AtFirstStep(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 0:
                seen["copy"] = dict(callback.checkpointer.baseline_weights)
                seen["trainable"] = {n for n, p in model.named_parameters() if p.requires_grad}

    trainer.add_callback(callback)
    trainer.add_callback(AtFirstStep())
    trainer.train()
    assert set(seen["copy"]) == seen["trainable"] and seen["trainable"]
    assert all("lora_" in name for name in seen["copy"])  # the frozen base model is not copied
    assert all(t.device.type == "cpu" for t in seen["copy"].values())


# ----------------------------------------------------------------------------------------------------------------
# 3. A second trainer.train() with the same callback
# ----------------------------------------------------------------------------------------------------------------


def test_second_train_call_starts_from_a_fresh_state(tokenizer, tmp_path):
    model = make_tiny_llama(tokenizer)
    trainer = make_trainer(model, tokenizer, tmp_path, max_steps=4)
    callback = ContextRelianceCallback(trainer, PROBES, eval_steps=2, verbose=False)
    trainer.add_callback(callback)

    trainer.train()
    first = summary_of(tmp_path)
    trainer.train()  # a fresh run (global step 0 again), continuing from the trained weights
    second = summary_of(tmp_path)

    for run in (first, second):
        steps = [row["step"] for row in run["history"]]
        assert steps == [0, 2, 4]
        assert run["summary"]["baseline_step"] == 0 and run["summary"]["final_step"] == 4
        assert run["summary"]["probe_events"] == 3
    assert second["summary"].keys() == first["summary"].keys()
    assert [r["step"] for r in trainer.state.log_history if CF_ACC in r] == [0, 2, 4]  # the second run's rows
    assert callback.peak_tracker.num_events == 3
    # The second baseline measures the weights the first run ended with.
    assert second["summary"]["baseline"] == pytest.approx(first["summary"]["final"], abs=1e-6)
    assert second["history"][0]["ctx_reliance/peak_step"] == 0
    assert first["summary"]["trained_steps"] == second["summary"]["trained_steps"] == 4


# ----------------------------------------------------------------------------------------------------------------
# 4. A chat template that refuses a system message
# ----------------------------------------------------------------------------------------------------------------

NO_SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_chat_template_refusing_a_system_message_is_a_configuration_error(tokenizer, tmp_path):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = NO_SYSTEM_TEMPLATE
    trainer = make_trainer(make_tiny_llama(tok), tok, tmp_path, max_steps=1)
    with pytest.raises(ConfigurationError, match="system_prompt") as info:
        ContextRelianceCallback(trainer, PROBES, system_prompt="Be brief.")
    message = str(info.value)
    assert "System role not supported" in message  # the template's own words
    assert "system_prompt=None" in message and "user turn" in message
    ContextRelianceCallback(trainer, PROBES)  # without a system prompt the same template works


def test_chat_template_error_without_system_prompt_is_a_configuration_error(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% if add_generation_prompt %}{{ raise_exception('no generation prompt here') }}{% endif %}"
                         "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(ConfigurationError, match="chat template") as info:
        ContextRelianceCallback(None, PROBES, tokenizer=tok)
    assert "no generation prompt here" in str(info.value)


# ----------------------------------------------------------------------------------------------------------------
# 5. Smaller
# ----------------------------------------------------------------------------------------------------------------


def test_probe_on_evaluate_without_evaluation_warns_at_train_begin(tokenizer, tmp_path, caplog):
    trainer = make_trainer(make_tiny_llama(tokenizer), tokenizer, tmp_path, max_steps=1)
    assert trainer.args.eval_strategy == "no"
    trainer.add_callback(ContextRelianceCallback(trainer, PROBES, probe_on="evaluate", verbose=False))
    with caplog.at_level(logging.WARNING, logger="ctx_callback.callback"):
        trainer.train()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("eval_strategy" in w and 'probe_on="steps"' in w for w in warnings), warnings


def test_max_steps_zero_summary_final_is_measured_after_training(tokenizer, tmp_path):
    """transformers runs one optimizer step with max_steps=0; the final value must be measured after it."""
    trainer = make_trainer(make_tiny_llama(tokenizer), tokenizer, tmp_path, max_steps=0)
    callback = ContextRelianceCallback(trainer, PROBES, eval_steps=5, verbose=False)
    trainer.add_callback(callback)
    trainer.train()
    ran = trainer.state.global_step
    summary = summary_of(tmp_path)["summary"]
    assert summary["final_step"] == ran  # not the stale baseline when a step ran
    assert summary["trained_steps"] == ran
    if ran == 0:
        assert summary["final_step"] == summary["baseline_step"]


def test_zero_training_steps_summary_claims_no_final_measurement(tokenizer, tmp_path):
    trainer = make_trainer(make_tiny_llama(tokenizer), tokenizer, tmp_path, max_steps=-1, num_train_epochs=0)
    callback = ContextRelianceCallback(trainer, PROBES, eval_steps=5, verbose=False)
    trainer.add_callback(callback)
    trainer.train()
    assert trainer.state.global_step == 0
    summary = summary_of(tmp_path)["summary"]
    text = callback.summary_text()
    final_line = next(line for line in text.splitlines() if line.strip().startswith("final"))
    assert "no training step ran" in final_line, text
    assert f"{summary['baseline']:.3f}" not in final_line  # it does not present the baseline as a final value
    assert summary["final_step"] == summary["baseline_step"] == 0
    assert summary["trained_steps"] == 0
