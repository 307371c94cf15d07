"""Integration test on the real pretrained SmolLM2-135M-Instruct (converted once per session, offline)."""

from __future__ import annotations

import math

import pytest
import torch

from ctx_callback import ContextRelianceCallback
from tests.helpers import conflict_dataset, sft_config

PREFIX = "ctx_reliance/world_facts/"


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)


def test_sft_with_the_callback_on_smollm2_logs_sane_metrics(smollm2, tokenizer, tmp_path):
    from trl import SFTTrainer

    args = sft_config(tmp_path, max_steps=3, per_device_train_batch_size=4, learning_rate=2e-5)
    trainer = SFTTrainer(model=smollm2, args=args, train_dataset=conflict_dataset(2, 0), processing_class=tokenizer)
    callback = ContextRelianceCallback(trainer, "world_facts", limit_per_family=40, eval_steps=3,
                                       variants=("context", "closed_book"))
    trainer.add_callback(callback)
    trainer.train()

    rows = [row for row in trainer.state.log_history if PREFIX + "counterfactual_accuracy" in row]
    assert [row["step"] for row in rows] == [0, 3]
    baseline = rows[0]
    assert baseline[PREFIX + "num_probes"] == 40
    # The pretrained model knows the facts (closed-book) and, at the baseline, follows a conflicting context.
    assert baseline[PREFIX + "closed_book_accuracy"] >= 0.8
    assert baseline[PREFIX + "counterfactual_accuracy"] >= 0.7
    # Sanity of the other metrics: finite, in range, consistent with each other.
    for row in rows:
        assert 0.0 <= row[PREFIX + "counterfactual_probability"] <= 1.0
        assert row[PREFIX + "context_lift"] > 0  # the context makes the counterfactual answer more likely
        assert all(math.isfinite(v) for k, v in row.items() if k.startswith("ctx_reliance/"))
    assert len([row for row in trainer.state.log_history if "loss" in row]) == 3
