"""The callback under TRL's preference and RL trainers, with LoRA adapters, and the trainers it refuses
(docs/trainers.md holds the table these tests back).

Real runs of a tiny random Llama with the real SmolLM2 tokenizer: DPO (peak checkpoint, restore, TensorBoard), GRPO
(generation in the loop, restore of the baseline from memory), KTO and RLOO (logging), LoRA under SFT
(``ctx-callback scan`` of the adapter-only checkpoints equals the logged rows), and RewardTrainer (refused). What the
callback scores is checked against a separate :class:`~ctx_callback.ProbeScorer` scoring of the policy's weights at
that step, and against the frozen reference model, so probing the wrong model fails.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import re
from pathlib import Path

import datasets
import pytest
import torch
import trl
from transformers import LlamaForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

from ctx_callback import ContextRelianceCallback, ProbeScorer, UnsupportedTrainerError, probes_from_records
from ctx_callback.cli import SCAN_JSON, main
from ctx_callback.trainer_support import UNSUPPORTED_TRAINERS, check_model_head, unsupported_reason
from tests.helpers import CAPITALS, METRIC_ATOL, PROBES, conflict_dataset, make_tiny_llama, make_trainer

CF_PROB = "ctx_reliance/counterfactual_probability"
MARGIN = "ctx_reliance/logprob_margin"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "trainers.md"
#: TrainingArguments every run here shares: CPU, fp32, no checkpoint unless asked, sequential data, seeded.
COMMON = dict(lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none", bf16=False,
              use_cpu=True, seed=0, disable_tqdm=True, activation_checkpointing=False, dataloader_num_workers=0)


class WeightsAtEachStep(TrainerCallback):
    """Keeps a copy of the trained weights after every optimizer step (added after the callback under test)."""

    def __init__(self):
        self.weights = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = {k: v.detach().clone() for k, v in model.state_dict().items()}


def probe_rows(trainer, key=CF_PROB) -> dict[int, dict]:
    return {row["step"]: row for row in trainer.state.log_history if key in row}


def prompt(country: str, fake: str) -> list[dict]:
    return [{"role": "user", "content": f"The capital of {country} is {fake}.\n\nWhat is the capital of {country}?"}]


def score(tokenizer, weights: dict, variants=("context",)) -> dict[str, float]:
    """The probes' metrics of a fresh tiny Llama holding ``weights``, scored without a Trainer."""
    model = make_tiny_llama(tokenizer)
    model.load_state_dict(weights)
    return ProbeScorer(probes_from_records(PROBES), tokenizer, variants=variants).score(model.eval()).metrics


def assert_close(logged: dict, scored: dict) -> None:
    keys = [k for k in scored if k.startswith("ctx_reliance/")]
    assert keys
    for key in keys:
        assert abs(logged[key] - scored[key]) <= METRIC_ATOL, (key, logged[key], scored[key])


def length_reward(completions, **kwargs) -> list[float]:
    """A reward that differs between the completions of a prompt, so the policy gradient is not zero."""
    return [float(len(completion[0]["content"])) for completion in completions]


# ----------------------------------------------------------------------------------------------------------------
# DPO: the policy is probed (not the reference model), rows reach TensorBoard, stop, peak checkpoint, restore
# ----------------------------------------------------------------------------------------------------------------


def preference_rows(prefer_context: bool, repeats: int) -> list[dict]:
    """Pairs whose chosen answer is the context's city (``prefer_context``) or the true capital."""
    rows = []
    for _ in range(repeats):
        for country, true, fake in CAPITALS:
            chosen, rejected = (fake, true) if prefer_context else (true, fake)
            rows.append({"prompt": prompt(country, fake), "chosen": [{"role": "assistant", "content": chosen}],
                         "rejected": [{"role": "assistant", "content": rejected}]})
    return rows


@pytest.fixture(scope="module")
def dpo_run(tokenizer, tmp_path_factory):
    """DPO on pairs preferring the context, then pairs preferring memory (sequential): reliance rises at step 1,
    then falls; a high learning rate makes the policy leave the reference model at once."""
    pytest.importorskip("tensorboard")
    out = tmp_path_factory.mktemp("dpo")
    data = datasets.Dataset.from_list(preference_rows(True, 1) + preference_rows(False, 4))
    model, reference = make_tiny_llama(tokenizer), make_tiny_llama(tokenizer)  # same seed: the same weights
    args = trl.DPOConfig(output_dir=str(out), per_device_train_batch_size=4, learning_rate=5e-2, max_steps=6,
                         max_length=128, train_sampling_strategy="sequential",
                         **{**COMMON, "report_to": ["tensorboard"]})
    trainer = trl.DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=data,
                             processing_class=tokenizer)
    callback = ContextRelianceCallback(trainer, PROBES, eval_steps=1, monitor="counterfactual_probability",
                                       smoothing="none", patience=2, variants=("context",),
                                       save_peak_checkpoint=True, restore_peak_at_end=True, verbose=False)
    weights = WeightsAtEachStep()
    trainer.add_callback(callback)
    trainer.add_callback(weights)
    trainer.train()
    return trainer, callback, weights, out


def test_dpo_logs_the_policys_scores_not_the_reference_models(dpo_run, tokenizer):
    trainer, callback, weights, _ = dpo_run
    rows = probe_rows(trainer)
    assert sorted(rows) == list(range(trainer.state.global_step + 1))  # eval_steps=1: the baseline and every step
    for step in (callback.peak_tracker.peak_step, trainer.state.global_step):
        assert_close(rows[step], score(tokenizer, weights.weights[step]))
    # The frozen reference model scores what the policy scored at the baseline, and not what it logs later: a
    # callback that probed trainer.ref_model would log the baseline at every step.
    reference = ProbeScorer(probes_from_records(PROBES), tokenizer, variants=("context",)).score(trainer.ref_model)
    assert_close(rows[0], reference.metrics)
    for step in range(1, trainer.state.global_step + 1):
        assert max(abs(rows[step][k] - reference.metrics[k]) for k in (CF_PROB, MARGIN)) > 0.02, step


def test_dpo_rows_reach_the_tensorboard_event_file(dpo_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer, _, _, out = dpo_run
    files = glob.glob(str(out / "runs" / "**" / "events.out.tfevents.*"), recursive=True)
    assert len(files) == 1, files
    events = EventAccumulator(files[0])
    events.Reload()
    logged = {step: row[CF_PROB] for step, row in probe_rows(trainer).items()}
    written = {e.step: e.value for e in events.Scalars(f"train/{CF_PROB}")}  # float32 on disk
    assert written == pytest.approx(logged, rel=1e-6, abs=1e-6)
    assert "train/rewards/margins" in events.Tags()["scalars"]  # DPO's own rows are still there


def test_dpo_stops_after_the_peak_and_restores_the_peak_checkpoint_exactly(dpo_run):
    trainer, callback, weights, out = dpo_run
    peak, stop = callback.peak_tracker.peak_step, callback.stop_step
    assert 0 < peak < stop == trainer.state.global_step < trainer.args.max_steps, (peak, stop)
    assert (out / f"checkpoint-{peak}" / "model.safetensors").is_file()
    assert callback.restored_from is not None and callback.restored_from.endswith(f"checkpoint-{peak}")
    restored = trainer.model.state_dict()
    assert all(torch.equal(restored[k], weights.weights[peak][k]) for k in restored)
    assert any(not torch.equal(restored[k], weights.weights[stop][k]) for k in restored)


# ----------------------------------------------------------------------------------------------------------------
# GRPO: generation inside the training step; a stop, and the baseline restored from memory
# ----------------------------------------------------------------------------------------------------------------


def grpo_trainer(tokenizer, output_dir, max_steps: int):
    data = datasets.Dataset.from_list([{"prompt": prompt(country, fake)} for country, _, fake in CAPITALS])
    args = trl.GRPOConfig(output_dir=str(output_dir), per_device_train_batch_size=4, num_generations=2,
                          max_completion_length=4, learning_rate=5e-2, max_steps=max_steps, **COMMON)
    return trl.GRPOTrainer(model=make_tiny_llama(tokenizer), reward_funcs=length_reward, args=args,
                           train_dataset=data, processing_class=tokenizer)


@pytest.fixture(scope="module")
def grpo_run(tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo")
    trainer = grpo_trainer(tokenizer, out, max_steps=6)
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    # min_delta=1.0: no probability can beat the baseline by 1, so the baseline is the peak by construction and the
    # first event after it (step 2) exhausts patience=1.
    callback = ContextRelianceCallback(trainer, PROBES, eval_steps=2, monitor="counterfactual_probability",
                                       patience=1, min_delta=1.0, variants=("context",), save_peak_checkpoint=True,
                                       restore_peak_at_end=True, verbose=False)
    weights = WeightsAtEachStep()
    trainer.add_callback(callback)
    trainer.add_callback(weights)
    trainer.train()
    return trainer, callback, weights, initial, out


def test_grpo_logs_stops_and_restores_the_baseline_from_memory(grpo_run, tokenizer):
    trainer, callback, weights, initial, out = grpo_run
    rows = probe_rows(trainer)
    assert sorted(rows) == [0, 2] and callback.stop_step == trainer.state.global_step == 2
    assert_close(rows[2], score(tokenizer, weights.weights[2]))  # the policy after two GRPO steps
    assert not list(out.glob("checkpoint-*"))  # the peak is the baseline: kept in memory, never saved
    restored = trainer.model.state_dict()
    assert any(not torch.equal(weights.weights[2][k], initial[k]) for k in initial)  # GRPO did train
    assert all(torch.equal(restored[k], initial[k]) for k in initial)
    assert callback.last_restored


def test_grpo_trains_the_same_with_and_without_the_callback(grpo_run, tokenizer, tmp_path):
    """GRPO samples its completions from the torch RNG: a probe round that consumed random numbers, or left the
    model in eval mode, would change the completions, the rewards and the update of the next step."""
    with_callback, _, weights, _, _ = grpo_run
    trainer = grpo_trainer(tokenizer, tmp_path, max_steps=2)
    trainer.train()

    def rewards(run):
        return [(row["step"], row["reward"], row["completions/mean_length"]) for row in run.state.log_history
                if "reward" in row]

    assert rewards(trainer) == rewards(with_callback)  # exact: the same computations in the same process
    final = trainer.model.state_dict()
    assert all(torch.equal(final[k], weights.weights[2][k]) for k in final)


# ----------------------------------------------------------------------------------------------------------------
# KTO and RLOO: the policy is probed at every event
# ----------------------------------------------------------------------------------------------------------------


def kto_trainer(tokenizer, output_dir):
    rows = [{"prompt": prompt(country, fake), "completion": [{"role": "assistant", "content": answer}],
             "label": answer == fake} for country, true, fake in CAPITALS for answer in (true, fake)]
    args = trl.KTOConfig(output_dir=str(output_dir), per_device_train_batch_size=4, learning_rate=5e-2, max_steps=1,
                         max_length=128, **COMMON)
    return trl.KTOTrainer(model=make_tiny_llama(tokenizer), ref_model=make_tiny_llama(tokenizer), args=args,
                          train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer)


def rloo_trainer(tokenizer, output_dir):
    data = datasets.Dataset.from_list([{"prompt": prompt(country, fake)} for country, _, fake in CAPITALS])
    # beta=0: no reference model (RLOO would load one from the policy's config path, which a random model lacks).
    args = trl.RLOOConfig(output_dir=str(output_dir), per_device_train_batch_size=4, num_generations=2,
                          max_completion_length=4, beta=0.0, learning_rate=5e-2, max_steps=1, **COMMON)
    return trl.RLOOTrainer(model=make_tiny_llama(tokenizer), reward_funcs=length_reward, args=args,
                           train_dataset=data, processing_class=tokenizer)


@pytest.mark.parametrize("make", [kto_trainer, rloo_trainer], ids=["KTOTrainer", "RLOOTrainer"])
def test_kto_and_rloo_log_the_policys_scores(make, tokenizer, tmp_path):
    trainer = make(tokenizer, tmp_path)
    weights = WeightsAtEachStep()
    trainer.add_callback(ContextRelianceCallback(trainer, PROBES, eval_steps=1, variants=("context",),
                                                 verbose=False))
    trainer.add_callback(weights)
    trainer.train()
    rows = probe_rows(trainer)
    assert sorted(rows) == [0, 1]
    assert_close(rows[1], score(tokenizer, weights.weights[1]))
    assert abs(rows[1][MARGIN] - rows[0][MARGIN]) > 1e-3  # it trained: the logged scores moved


# ----------------------------------------------------------------------------------------------------------------
# LoRA: `ctx-callback scan` of the adapter-only checkpoints reproduces the logged rows
# ----------------------------------------------------------------------------------------------------------------


def test_scan_of_lora_adapter_checkpoints_equals_the_logged_rows(tokenizer, tmp_path, probes_file):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base_dir, out = tmp_path / "base", tmp_path / "out"
    make_tiny_llama(tokenizer, seed=1).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir)  # so the adapters record base_dir as their base model
    trainer = make_trainer(model, tokenizer, out, dataset=conflict_dataset(1, 1), per_device_train_batch_size=2,
                           max_steps=4, save_strategy="steps", save_steps=2, learning_rate=5e-2,
                           peft_config=peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainer.add_callback(ContextRelianceCallback(trainer, PROBES, eval_steps=2, variants=("context",), verbose=False))
    trainer.train()
    for step in (2, 4):
        assert not (out / f"checkpoint-{step}" / "model.safetensors").exists()  # the adapter only
        assert (out / f"checkpoint-{step}" / "adapter_model.safetensors").is_file()

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["scan", str(out), "--probes", str(probes_file), "--device", "cpu", "--variants", "context"]) == 0
    scanned = {row["step"]: row for row in json.loads((out / SCAN_JSON).read_text())["rows"]}
    logged = probe_rows(trainer)
    assert sorted(scanned) == [2, 4] and all(row["kind"] == "peft" for row in scanned.values())
    for step in (2, 4):
        assert_close(logged[step], scanned[step]["metrics"])
    assert abs(logged[4][MARGIN] - logged[0][MARGIN]) > 1e-3  # the adapter moved the scores


# ----------------------------------------------------------------------------------------------------------------
# Refused: what cannot be probed fails before any step, saying why and what to do
# ----------------------------------------------------------------------------------------------------------------


def test_reward_trainer_is_refused_at_construction(tokenizer, tmp_path):
    config = make_tiny_llama(tokenizer).config
    config.num_labels = 1
    reward_model = LlamaForSequenceClassification(config)
    rows = [{"prompt": prompt(country, fake), "chosen": [{"role": "assistant", "content": true}],
             "rejected": [{"role": "assistant", "content": fake}]} for country, true, fake in CAPITALS]
    trainer = trl.RewardTrainer(model=reward_model, processing_class=tokenizer,
                                train_dataset=datasets.Dataset.from_list(rows),
                                args=trl.RewardConfig(output_dir=str(tmp_path), max_steps=1, max_length=128, **COMMON))
    with pytest.raises(UnsupportedTrainerError, match=r"does not support RewardTrainer: .*no language-model head"
                                                      r".*GRPOTrainer.*ctx-callback scan"):
        ContextRelianceCallback(trainer, PROBES)


def test_models_without_a_causal_lm_head_are_refused(tokenizer, tmp_path):
    config = make_tiny_llama(tokenizer).config
    classifier = LlamaForSequenceClassification(config)
    trainer = Trainer(model=classifier, args=TrainingArguments(output_dir=str(tmp_path), **COMMON),
                      processing_class=tokenizer)
    with pytest.raises(UnsupportedTrainerError, match="LlamaForSequenceClassification has no causal language-model "
                                                      r"head \(get_output_embeddings\(\) is None"):
        ContextRelianceCallback(trainer, PROBES)

    # Built like TRL's former AutoModelForCausalLMWithValueHead (PPO): the language model and a scalar value head.
    class CausalLMWithValueHead(torch.nn.Module):
        def __init__(self, language_model):
            super().__init__()
            self.pretrained_model = language_model
            self.v_head = torch.nn.Linear(language_model.config.hidden_size, 1)

    with pytest.raises(UnsupportedTrainerError, match="wrapped with a value head"):
        check_model_head(CausalLMWithValueHead(make_tiny_llama(tokenizer)), "PPOTrainer")
    check_model_head(make_tiny_llama(tokenizer))  # a causal LM passes


def test_model_replaced_after_construction_is_refused_at_train_begin(tokenizer, tmp_path):
    trainer = make_trainer(make_tiny_llama(tokenizer), tokenizer, tmp_path, dataset=conflict_dataset(1, 0), max_steps=1)
    trainer.add_callback(ContextRelianceCallback(trainer, PROBES, verbose=False))
    trainer.model = LlamaForSequenceClassification(trainer.model.config)
    with pytest.raises(UnsupportedTrainerError, match="no causal language-model head"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_only_trl_and_transformers_classes_are_matched_by_name(tokenizer, tmp_path):
    own = type("RewardTrainer", (Trainer,), {})  # a user's class that happens to share TRL's name
    trainer = own(model=make_tiny_llama(tokenizer), args=TrainingArguments(output_dir=str(tmp_path), **COMMON))
    assert unsupported_reason(trainer) is None
    subclass = type("MyRewardTrainer", (trl.RewardTrainer,), {})
    assert unsupported_reason(object.__new__(subclass)) == UNSUPPORTED_TRAINERS["RewardTrainer"]


def test_docs_table_lists_every_trl_trainer():
    """docs/trainers.md says, for each trainer class TRL exports, whether the callback works with it."""
    table = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)` \| ([^|]+?) \|", DOCS.read_text(), re.M)}
    exported = sorted(name for name in dir(trl) if name.endswith("Trainer"))
    assert exported and not [name for name in exported if name not in table], exported
    for name in UNSUPPORTED_TRAINERS:
        assert table[name].startswith("refused"), name
    for name in ("SFTTrainer", "DPOTrainer", "GRPOTrainer", "KTOTrainer", "RLOOTrainer"):
        assert table[name].startswith("yes"), name
