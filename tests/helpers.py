"""Helpers the tests import: tiny random Llamas, capital-city probes, and tiny SFT runs whose context reliance
is made to rise, then fall."""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainerCallback

CAPITALS = [
    ("France", "Paris", "Lyon"), ("Japan", "Tokyo", "Osaka"), ("Italy", "Rome", "Milan"),
    ("Germany", "Berlin", "Munich"), ("Spain", "Madrid", "Seville"), ("Egypt", "Cairo", "Alexandria"),
    ("Canada", "Ottawa", "Toronto"),
]

#: Tolerance for answer log-probabilities of the tiny Llama computed two different ways: another engine, batch size,
#: batch-mates or padding, a shard split, an out-of-memory retry, another process or CPU. A score sums a few float32
#: per-token log-probabilities near -log|V| = -10.8 (float32 spacing 9.5e-7); another batch shape changes the
#: summation order inside the matmuls, which moves each token's value by a few spacings. Measured: up to 6.7e-6 per
#: answer (AVX-512 and AVX2 alike; prefix vs simple engine on chat templates). 5e-5 leaves room for other CPUs and
#: stays 200x below the 1e-2 and larger errors of a real bug (a shifted position, a wrong mask or cache).
LOGLIK_ATOL = 5e-5
#: Tolerance for metrics computed from such scores: means of differences of two scores (logprob_margin, context_lift:
#: up to twice the score tolerance) or of bounded functions of them (counterfactual_probability). Absolute, because a
#: metric can be 0 (context_lift). Accuracies are fractions k/n: they move only when a margin within float noise of 0
#: flips, which no tolerance absorbs.
METRIC_ATOL = 2 * LOGLIK_ATOL


def make_tiny_llama(tokenizer, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    options = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )
    options.update(overrides)
    config = LlamaConfig(**options)
    return LlamaForCausalLM(config).float()


def capital_records(n: int | None = None, family: str = "capitals"):
    rows = []
    for country, true, fake in CAPITALS[:n]:
        rows.append({
            "id": f"{family}/{country.lower()}", "family": family,
            "context": f"The capital of {country} is {fake}.",
            "question": f"What is the capital of {country}?",
            "counterfactual_answer": fake, "parametric_answer": true,
        })
    return rows




def conflict_dataset(copy_repeats: int, memory_repeats: int):
    """Conversational SFT data in the probes' own format, in two phases (use sequential sampling).

    Phase 1 teaches *copying from the context* (the answer is the city the context names); phase 2 teaches
    *answering from memory* (same prompts, the answer is the true capital). A model trained on it in order
    follows the context more and more, then less and less: an honest, fast stand-in for the paper's finding.
    """
    import datasets

    def rows(answer_index: int, repeats: int):
        out = []
        for _ in range(repeats):
            for country, true, fake in CAPITALS:
                answer = (fake, true)[answer_index]
                out.append({"messages": [
                    {"role": "user",
                     "content": f"The capital of {country} is {fake}.\n\nWhat is the capital of {country}?"},
                    {"role": "assistant", "content": answer},
                ]})
        return out

    return datasets.Dataset.from_list(rows(0, copy_repeats) + rows(1, memory_repeats))


def sft_config(output_dir, **overrides: Any):
    from trl import SFTConfig

    kwargs = dict(
        output_dir=str(output_dir), per_device_train_batch_size=7, learning_rate=5e-3, lr_scheduler_type="constant",
        warmup_steps=0, max_steps=30, logging_steps=1, save_strategy="no", report_to="none", bf16=False, fp16=False,
        activation_checkpointing=False, train_sampling_strategy="sequential", seed=0, data_seed=0, use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True, max_length=128,
    )
    kwargs.update(overrides)
    return SFTConfig(**kwargs)


def make_trainer(model, tokenizer, output_dir, dataset=None, eval_dataset=None, peft_config=None, **overrides):
    from trl import SFTTrainer

    return SFTTrainer(
        model=model, args=sft_config(output_dir, **overrides), train_dataset=dataset or conflict_dataset(15, 15),
        eval_dataset=eval_dataset, processing_class=tokenizer, peft_config=peft_config,
    )


PROBES = capital_records()


class StopAt(TrainerCallback):
    """Interrupts training at a given step; the Trainer saves that step's checkpoint (a resume point)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
            control.should_save = True
