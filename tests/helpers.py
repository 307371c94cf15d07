"""Helpers for end-to-end Trainer tests: tiny SFT runs whose context reliance is made to rise, then fall."""

from __future__ import annotations

from typing import Any

from tests.conftest import CAPITALS, capital_records


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
                    {"role": "user", "content": f"The capital of {country} is {fake}.\n\nWhat is the capital of {country}?"},
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
