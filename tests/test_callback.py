"""End-to-end tests of ContextRelianceCallback on real SFTTrainer / Trainer runs with a tiny Llama."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback

from ctx_callback import ContextRelianceCallback, ProbeScorer, probes_from_records
from tests.helpers import PROBES, StopAt, conflict_dataset, make_tiny_llama, make_trainer

CF_ACC = "ctx_reliance/counterfactual_accuracy"
CF_PROB = "ctx_reliance/counterfactual_probability"


def probe_rows(trainer, key=CF_ACC):
    return [row for row in trainer.state.log_history if key in row]


def loss_steps(trainer):
    return [row["step"] for row in trainer.state.log_history if "loss" in row]


class WeightsAtEachStep(TrainerCallback):
    """Keeps a copy of the weights after every optimizer step (added after the callback under test)."""

    def __init__(self):
        self.weights = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------------
# Scheduling and logging
# ----------------------------------------------------------------------------------------------------------------


def test_probes_every_eval_steps_and_keeps_the_trainers_own_rows(tokenizer, tmp_path):
    model = make_tiny_llama(tokenizer)
    trainer = make_trainer(model, tokenizer, tmp_path, max_steps=7)
    callback = ContextRelianceCallback(trainer, PROBES, eval_steps=3)
    trainer.add_callback(callback)
    trainer.train()

    rows = probe_rows(trainer)
    # Baseline at 0, every 3 optimizer steps, and once at the last step (7 is not a multiple of 3).
    assert [row["step"] for row in rows] == [0, 3, 6, 7]
    # The Trainer's own loss row survives at every step, including the probe steps.
    assert loss_steps(trainer) == list(range(1, 8))
    for row in rows:
        assert row["ctx_reliance/num_probes"] == len(PROBES)
        assert 0.0 <= row[CF_ACC] <= 1.0
        assert 0.0 <= row[CF_PROB] <= 1.0
        assert row[CF_ACC] + row["ctx_reliance/parametric_accuracy"] == pytest.approx(1.0)
        assert "ctx_reliance/capitals/counterfactual_accuracy" in row
        assert all(isinstance(v, float) for k, v in row.items() if k.startswith("ctx_reliance/"))
        # SFTTrainer's running averages are not folded into the callback's rows.
        assert "mean_token_accuracy" not in row and "entropy" not in row
    # The metrics also reach trainer_state.json (written at each save; here: the final state).
    trainer.state.save_to_json(str(tmp_path / "state.json"))
    saved = json.loads((tmp_path / "state.json").read_text())
    assert [r["step"] for r in saved["log_history"] if CF_ACC in r] == [0, 3, 6, 7]
    summary = json.loads((tmp_path / "ctx_reliance_summary.json").read_text())
    assert summary["summary"]["baseline_step"] == 0 and summary["summary"]["final_step"] == 7


def test_gradient_accumulation_counts_optimizer_steps(tokenizer, tmp_path):
    model = make_tiny_llama(tokenizer)
    trainer = make_trainer(model, tokenizer, tmp_path, max_steps=4, gradient_accumulation_steps=3,
                           per_device_train_batch_size=2)
    trainer.add_callback(ContextRelianceCallback(trainer, PROBES, eval_steps=2, probe_at_start=False))
    trainer.train()
    assert [row["step"] for row in probe_rows(trainer)] == [2, 4]
    assert loss_steps(trainer) == [1, 2, 3, 4]


def test_observer_leaves_weights_and_losses_bit_identical(tokenizer, tmp_path):
    """With stopping and saving off, the callback must not change training at all (dropout makes RNG matter)."""

    def run(with_callback):
        model = make_tiny_llama(tokenizer, attention_dropout=0.2)
        trainer = make_trainer(model, tokenizer, tmp_path / str(with_callback), max_steps=8)
        if with_callback:
            trainer.add_callback(ContextRelianceCallback(trainer, PROBES, eval_steps=1, mode="loglik"))
        trainer.train()
        losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
        return model, losses, trainer

    model_a, losses_a, _ = run(False)
    model_b, losses_b, trainer_b = run(True)
    assert len(probe_rows(trainer_b)) == 9  # it did probe, at 0..8
    # Exact on purpose: a promise of the library (probing touches no weight, gradient or RNG state), and both runs
    # make the same training computations in the same process.
    assert losses_a == losses_b
    for (name, a), (_, b) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert torch.equal(a, b), name
    assert model_b.training  # train mode restored
    assert model_b.config.use_cache == model_a.config.use_cache


def test_generation_mode_logs_both_and_neither_rates(tokenizer, tmp_path):
    model = make_tiny_llama(tokenizer)
    trainer = make_trainer(model, tokenizer, tmp_path, max_steps=2)
    trainer.add_callback(ContextRelianceCallback(trainer, PROBES[:3], eval_steps=2, mode="generate",
                                                 max_new_tokens=4, monitor="neither_rate"))
    trainer.train()
    rows = probe_rows(trainer, "ctx_reliance/neither_rate")
    assert [row["step"] for row in rows] == [0, 2]
    for row in rows:
        total = row[CF_ACC] + row["ctx_reliance/parametric_accuracy"] + row["ctx_reliance/neither_rate"]
        assert total - row["ctx_reliance/both_rate"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------------------------
# Early stopping, peak checkpoint, restore
# ----------------------------------------------------------------------------------------------------------------


def rise_and_fall_run(tokenizer, output_dir, *, extra_callbacks=(), max_steps=30, **callback_kwargs):
    model = make_tiny_llama(tokenizer)
    trainer = make_trainer(model, tokenizer, output_dir, max_steps=max_steps,
                           save_strategy="steps", save_steps=5, save_total_limit=1)
    kwargs = dict(eval_steps=2, monitor="counterfactual_probability", patience=2, warmup_steps=4,
                  save_peak_checkpoint=True, restore_peak_at_end=True, variants=("context", "closed_book"))
    kwargs.update(callback_kwargs)
    callback = ContextRelianceCallback(trainer, PROBES, **kwargs)
    trainer.add_callback(callback)
    for extra in extra_callbacks:
        trainer.add_callback(extra)
    return model, trainer, callback


@pytest.fixture(scope="module")
def rise_and_fall(tokenizer, tmp_path_factory):
    """One uninterrupted rise-and-fall run (stop, peak checkpoint, restore), shared by the tests that read it."""
    tmp_path = tmp_path_factory.mktemp("rise_and_fall")
    weights = WeightsAtEachStep()
    model, trainer, callback = rise_and_fall_run(tokenizer, tmp_path, extra_callbacks=[weights])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        trainer.train()
    return model, trainer, callback, weights, printed.getvalue(), tmp_path


def test_rise_then_fall_stops_after_patience_and_restores_the_peak_weights(rise_and_fall):
    model, trainer, callback, weights, printed, tmp_path = rise_and_fall
    # verbose=True (the default) prints the stop line and the summary
    assert f"ctx_callback: stopping training at step {callback.stop_step}" in printed
    assert "ctx_callback summary (ctx_reliance/counterfactual_probability):" in printed

    rows = probe_rows(trainer, CF_PROB)
    by_step = {row["step"]: row for row in rows}
    peak_step, stop_step = callback.peak_tracker.peak_step, callback.stop_step
    # The reliance curve rose (copy phase), then fell (memory phase), and training stopped early.
    assert stop_step is not None and stop_step < 30
    assert by_step[peak_step][CF_PROB] > by_step[0][CF_PROB] + 0.1
    assert by_step[stop_step][CF_PROB] < by_step[peak_step][CF_PROB] - 0.02
    # Patience counts probe events: exactly `patience` non-improving events after the peak.
    assert stop_step == peak_step + 2 * 2
    assert trainer.state.global_step == stop_step
    assert by_step[stop_step]["ctx_reliance/early_stop"] == 1.0
    assert by_step[stop_step]["ctx_reliance/peak_step"] == peak_step

    # The peak checkpoint was saved, recorded in the state, and survived save_total_limit=1 rotation.
    peak_dir = tmp_path / f"checkpoint-{peak_step}"
    assert peak_dir.is_dir()
    assert trainer.state.best_global_step == peak_step
    assert trainer.state.best_model_checkpoint == str(peak_dir)
    assert callback.peak_checkpoint == str(peak_dir)

    # The model now holds the peak weights, not the final ones.
    saved = load_file(str(peak_dir / "model.safetensors"))
    state = model.state_dict()
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name
    assert any(not torch.equal(state[k], weights.weights[stop_step][k]) for k in saved)
    for name in saved:
        assert torch.equal(weights.weights[peak_step][name], state[name]), name

    # Re-probing the restored model reproduces the metric logged at the peak.
    rescored = callback.scorer.score(model).metrics
    assert rescored[CF_PROB] == pytest.approx(by_step[peak_step][CF_PROB], abs=1e-5)

    summary = json.loads((tmp_path / "ctx_reliance_summary.json").read_text())["summary"]
    assert summary["stop_step"] == stop_step and summary["peak_step"] == peak_step
    assert summary["restored_peak"] is True and summary["peak_checkpoint"] == str(peak_dir)


def test_resumed_run_takes_the_same_decisions(tokenizer, tmp_path, rise_and_fall):
    # The uninterrupted reference (restoring the peak at its end changes no logged row and no decision).
    _, full, full_cb, *_ = rise_and_fall

    interrupt_at = 14
    _, first, _ = rise_and_fall_run(tokenizer, tmp_path / "resumed", extra_callbacks=[StopAt(interrupt_at)],
                                    restore_peak_at_end=False)
    first.train()
    assert first.state.global_step == interrupt_at

    _, second, second_cb = rise_and_fall_run(tokenizer, tmp_path / "resumed", restore_peak_at_end=False)
    second.train(resume_from_checkpoint=str(tmp_path / "resumed" / f"checkpoint-{interrupt_at}"))

    assert second_cb.stop_step == full_cb.stop_step
    assert second_cb.peak_tracker.peak_step == full_cb.peak_tracker.peak_step
    assert second_cb.peak_tracker.peak_value == pytest.approx(full_cb.peak_tracker.peak_value, abs=1e-6)
    full_curve = {r["step"]: r[CF_PROB] for r in probe_rows(full, CF_PROB)}
    resumed_curve = {r["step"]: r[CF_PROB] for r in probe_rows(second, CF_PROB)}
    assert full_curve.keys() == resumed_curve.keys()
    for step, value in full_curve.items():
        assert resumed_curve[step] == pytest.approx(value, abs=1e-5), step


def test_failed_probe_is_logged_and_training_continues(tokenizer, tmp_path):
    model = make_tiny_llama(tokenizer)

    def fail_in_eval(module, args):  # a real failure inside the probe's forward pass (as an OOM would be)
        if not module.training:
            raise RuntimeError("simulated out of memory")

    model.model.register_forward_pre_hook(fail_in_eval)
    trainer = make_trainer(model, tokenizer, tmp_path, max_steps=4)
    trainer.add_callback(ContextRelianceCallback(trainer, PROBES, eval_steps=2, engine="batched"))
    trainer.train()
    assert trainer.state.global_step == 4
    failed = [row["step"] for row in trainer.state.log_history if row.get("ctx_reliance/probe_failed") == 1.0]
    assert failed == [0, 2, 4]
    assert model.training


def test_strict_mode_reraises_a_failed_probe(tokenizer, tmp_path):
    model = make_tiny_llama(tokenizer)

    def fail_in_eval(module, args):
        if not module.training:
            raise RuntimeError("boom")

    model.model.register_forward_pre_hook(fail_in_eval)
    trainer = make_trainer(model, tokenizer, tmp_path, max_steps=2)
    trainer.add_callback(ContextRelianceCallback(trainer, PROBES, eval_steps=1, strict=True, engine="batched"))
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()


# ----------------------------------------------------------------------------------------------------------------
# Compatibility
# ----------------------------------------------------------------------------------------------------------------


def test_trainer_best_model_selection_on_reliance(tokenizer, tmp_path):
    """probe_on='evaluate' + metric_for_best_model: the Trainer's own best-checkpoint machinery selects on reliance."""
    model = make_tiny_llama(tokenizer)
    data = conflict_dataset(15, 15)
    trainer = make_trainer(
        model, tokenizer, tmp_path, dataset=data, eval_dataset=data.select(range(7)), max_steps=18,
        eval_strategy="steps", eval_steps=6,
        save_strategy="steps", save_steps=6, per_device_eval_batch_size=7, load_best_model_at_end=True,
        metric_for_best_model="ctx_reliance/counterfactual_probability", greater_is_better=True,
    )
    callback = ContextRelianceCallback(trainer, PROBES, probe_on="evaluate", probe_at_start=False,
                                       probe_at_end=False)
    trainer.add_callback(callback)
    trainer.train()
    rows = probe_rows(trainer, CF_PROB)
    assert [r["step"] for r in rows] == [6, 12, 18]
    best = max(rows, key=lambda r: r[CF_PROB])
    assert trainer.state.best_global_step == best["step"]
    assert trainer.state.best_metric == pytest.approx(best[CF_PROB])
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best['step']}")


def test_peft_lora_adapter_peak_is_restored(tokenizer, tmp_path):
    peft = pytest.importorskip("peft")
    model = make_tiny_llama(tokenizer)
    trainer = make_trainer(
        model, tokenizer, tmp_path, max_steps=30, learning_rate=3e-2,
        peft_config=peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]),
    )
    weights = WeightsAtEachStep()
    callback = ContextRelianceCallback(trainer, PROBES, eval_steps=2, monitor="counterfactual_probability",
                                       patience=2, warmup_steps=4, save_peak_checkpoint=True,
                                       restore_peak_at_end=True, variants=("context",))
    trainer.add_callback(callback)
    trainer.add_callback(weights)
    trainer.train()
    peak = callback.peak_tracker.peak_step
    final = trainer.state.global_step
    assert peak not in (None, 0) and peak != final, "the LoRA run must rise and fall for this test to mean anything"
    peak_dir = tmp_path / f"checkpoint-{peak}"
    adapter = load_file(str(peak_dir / "adapter_model.safetensors"))
    state = trainer.model.state_dict()
    lora_keys = [k for k in state if "lora_" in k]
    assert lora_keys
    for key in lora_keys:
        assert torch.equal(state[key], weights.weights[peak][key]), key
    assert any(not torch.equal(state[k], weights.weights[final][k]) for k in lora_keys)
    assert len(adapter) == len(lora_keys)


def test_plain_trainer_with_a_prompt_template(tokenizer, tmp_path):
    """A plain Trainer on Alpaca-formatted data, probed with the same template."""
    from transformers import DataCollatorForLanguageModeling, TrainingArguments

    from ctx_callback.formatting import resolve_prompt_format

    fmt = resolve_prompt_format("alpaca", tokenizer)
    texts = [fmt.prompt(r["context"], r["question"]) + r["counterfactual_answer"] + tokenizer.eos_token
             for r in PROBES] * 4
    import datasets

    data = datasets.Dataset.from_dict({"text": texts}).map(
        lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"])
    model = make_tiny_llama(tokenizer)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, logging_steps=1,
                             report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
                             learning_rate=1e-3)
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    callback = ContextRelianceCallback(trainer, PROBES, tokenizer=tokenizer, prompt_format="alpaca", eval_steps=2)
    trainer.add_callback(callback)
    trainer.train()
    assert [r["step"] for r in probe_rows(trainer)] == [0, 2, 4]
    prompt = callback.scorer.encoded.items[0].prompt_text
    assert prompt.startswith("Below is an instruction") and "### Response:" in prompt


def test_bf16_autocast_and_gradient_checkpointing(tokenizer, tmp_path):
    model = make_tiny_llama(tokenizer)
    probe_dtypes, train_dtypes = set(), set()

    def record_dtype(module, args, output):  # what precision the matmuls actually ran in
        (train_dtypes if module.training else probe_dtypes).add(output.dtype)

    model.model.layers[0].self_attn.q_proj.register_forward_hook(record_dtype)
    trainer = make_trainer(model, tokenizer, tmp_path, max_steps=2, bf16=True, activation_checkpointing=True)
    trainer.add_callback(ContextRelianceCallback(trainer, PROBES, eval_steps=1))
    trainer.train()
    # The probe runs under the same autocast as training (accelerate patches the model's forward).
    assert train_dtypes == {torch.bfloat16}
    assert probe_dtypes == {torch.bfloat16}
    rows = probe_rows(trainer)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(math.isfinite(r[CF_PROB]) for r in rows)
    assert model.is_activation_checkpointing
    assert model.training


# ----------------------------------------------------------------------------------------------------------------
# Bad configuration: errors before training, with what to do
def test_verbose_false_prints_nothing_and_logs_everything(tokenizer, tmp_path, capsys, caplog):
    # A stop independent of the training dynamics (no event can improve by 10), so four steps suffice.
    _, trainer, callback = rise_and_fall_run(tokenizer, tmp_path, verbose=False, restore_peak_at_end=False,
                                             save_peak_checkpoint=False, max_steps=8, patience=1, min_delta=10.0,
                                             warmup_steps=2)
    with caplog.at_level(logging.INFO, logger="ctx_callback.callback"):
        trainer.train()
    assert callback.stop_step is not None
    assert "ctx_callback" not in capsys.readouterr().out
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name == "ctx_callback.callback")
    assert f"stopping training at step {callback.stop_step}" in logged
    assert "ctx_callback summary" in logged


# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(eval_steps=0), "eval_steps must be an integer >= 1"),
        (dict(patience=0), "patience"),
        (dict(monitor="accuracy_of_everything"), "Unknown monitor metric"),
        (dict(monitor="nope/counterfactual_accuracy"), "which the probes lack"),
        (dict(monitor="both_rate"), "Unknown monitor metric"),  # generation-only metric in loglik mode
        (dict(mode="sample"), "mode must be"),
        (dict(probe_on="epoch"), "probe_on must be"),
        (dict(restore_peak_at_end=True), "save_peak_checkpoint"),
        (dict(known_only=True, variants=("context",)), "closed_book"),
        (dict(smoothing="median"), "smoothing"),
        (dict(verbose="yes"), "verbose must be True or False"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ContextRelianceCallback(None, PROBES, **kwargs)


def test_unknown_suite_fails_at_construction():
    with pytest.raises(ValueError, match="Unknown probe suite"):
        ContextRelianceCallback(None, "no_such_suite_or_file")


def test_trainer_of_the_wrong_type_is_refused():
    with pytest.raises(TypeError, match="add_callback"):
        ContextRelianceCallback("trainer", PROBES)


def test_missing_trainer_fails_at_train_begin_with_instructions(tokenizer, tmp_path):
    trainer = make_trainer(make_tiny_llama(tokenizer), tokenizer, tmp_path, max_steps=1)
    trainer.add_callback(ContextRelianceCallback(probes=PROBES, tokenizer=tokenizer))
    with pytest.raises(ValueError, match=r"trainer.add_callback\(ContextRelianceCallback\(trainer"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_missing_tokenizer_fails_at_train_begin(tokenizer, tmp_path):
    from transformers import TrainingArguments

    data = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}] * 4
    trainer = Trainer(model=make_tiny_llama(tokenizer), train_dataset=data,
                      args=TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to="none", use_cpu=True))
    trainer.add_callback(ContextRelianceCallback(trainer, PROBES))
    with pytest.raises(ValueError, match="no tokenizer"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_probes_longer_than_the_model_fail_at_construction(tokenizer, tmp_path):
    model = make_tiny_llama(tokenizer, max_position_embeddings=48)
    trainer = make_trainer(model, tokenizer, tmp_path, max_steps=1, max_length=32)
    long = dict(PROBES[0], id="long", context="The capital of France is Lyon. " * 20)
    with pytest.raises(ValueError, match="long"):
        ContextRelianceCallback(trainer, [long])


def test_scorer_reports_the_same_metrics_as_the_callback_logs(tokenizer, tmp_path):
    model = make_tiny_llama(tokenizer)
    trainer = make_trainer(model, tokenizer, tmp_path, max_steps=1)
    trainer.add_callback(ContextRelianceCallback(trainer, PROBES, eval_steps=1, probe_at_start=False))
    trainer.train()
    logged = probe_rows(trainer)[-1]
    fresh = ProbeScorer(probes_from_records(PROBES), tokenizer).score(model).metrics
    for key, value in fresh.items():
        assert logged[key] == pytest.approx(value, abs=1e-5), key


def test_known_only_keeps_the_probes_the_model_knows_closed_book(tokenizer, tmp_path):
    model = make_tiny_llama(tokenizer, seed=3)
    scorer = ProbeScorer(probes_from_records(PROBES), tokenizer, variants=("context", "closed_book"))
    raw = scorer.score_raw(model)
    expected = [i for i in range(len(PROBES)) if raw.scores[i, 1, 1] > raw.scores[i, 1, 0]]
    assert 0 < len(expected) < len(PROBES), "pick a seed where the random model knows some probes but not all"

    trainer = make_trainer(model, tokenizer, tmp_path, max_steps=2)
    # The counterfactual comparison alone (the distractors: tests/test_two_sided.py).
    callback = ContextRelianceCallback(trainer, PROBES, eval_steps=2, known_only=True, known_distractors=0,
                                       variants=("context", "closed_book"))
    trainer.add_callback(callback)
    trainer.train()
    assert callback.active_indices == expected
    assert callback.known_counts == {"capitals": {"kept": len(expected), "total": len(PROBES)}}
    rows = probe_rows(trainer)
    assert all(row["ctx_reliance/num_probes"] == len(expected) for row in rows)
    # At the baseline, every kept probe prefers its parametric answer closed-book, by construction.
    assert rows[0]["ctx_reliance/closed_book_accuracy"] == 1.0
    summary = json.loads((tmp_path / "ctx_reliance_summary.json").read_text())["summary"]
    assert summary["known_counts"]["capitals"]["kept"] == len(expected)
