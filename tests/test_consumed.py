"""The share of each audit category among the training examples consumed between probe events (``audit=``).

A real audit (``audit_dataset`` on the tiny model, written with ``to_jsonl`` as ``ctx-callback audit --out`` does) of
a dataset whose rows are all distinct, a real SFTTrainer run, and a recording data collator that sees which rows the
Trainer really fed (random and sequential sampling, gradient accumulation, several epochs): the logged shares must be
those of the recorded rows.
"""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch

from ctx_callback import ContextRelianceCallback
from ctx_callback.audit import audit_dataset
from ctx_callback.consumed import CONSUMED_CATEGORIES, CONSUMED_KEYS, read_audit_categories
from ctx_callback.errors import ConfigurationError
from tests.helpers import CAPITALS, PROBES, make_tiny_llama, make_trainer

ROWS = 40


def distinct_rows():
    rows = []
    for i in range(ROWS):
        country, true, fake = CAPITALS[i % len(CAPITALS)]
        context = f"Note {i}: the capital of {country} is {fake if i % 2 else true}." if i % 5 else None
        question = f"Question {i}: what is the capital of {country}?"
        user = f"{context}\n\n{question}" if context else question
        rows.append({"messages": [{"role": "user", "content": user},
                                  {"role": "assistant", "content": fake if i % 2 else true}]})
    return datasets.Dataset.from_list(rows)


@pytest.fixture(scope="module")
def audit_file(tokenizer, tmp_path_factory):
    result = audit_dataset(distinct_rows(), make_tiny_llama(tokenizer), tokenizer)
    path = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    result.to_jsonl(path)
    categories = read_audit_categories(path)
    assert len(set(categories) & set(CONSUMED_CATEGORIES)) >= 2, "a mix of categories makes the shares mean much"
    return path, categories


def train_recording(tokenizer, tmp_path, audit, **config):
    trainer = make_trainer(make_tiny_llama(tokenizer), tokenizer, tmp_path, dataset=distinct_rows(), **config)
    row_of = {tuple(trainer.train_dataset[i]["input_ids"]): i for i in range(len(trainer.train_dataset))}
    assert len(row_of) == ROWS
    fed: list[list[int]] = []
    collate = trainer.data_collator

    def recording(examples):
        fed.append([row_of[tuple(example["input_ids"])] for example in examples])
        return collate(examples)

    trainer.data_collator = recording
    callback = ContextRelianceCallback(trainer, PROBES, eval_steps=3, variants=("context",), audit=audit,
                                       verbose=False)
    trainer.add_callback(callback)
    trainer.train()
    return trainer, callback, fed


@pytest.mark.parametrize("config", [
    dict(train_sampling_strategy="random", per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=12),
    dict(train_sampling_strategy="sequential", per_device_train_batch_size=3, gradient_accumulation_steps=1,
         max_steps=16),
], ids=["random-accumulated-3-epochs", "sequential-partial-batches"])
def test_logged_shares_are_those_of_the_rows_the_trainer_fed(tokenizer, tmp_path, audit_file, config):
    path, categories = audit_file
    trainer, callback, fed = train_recording(tokenizer, tmp_path, str(path), **config)
    accumulation = config["gradient_accumulation_steps"]
    batches_per_epoch = -(-ROWS // config["per_device_train_batch_size"])
    steps_per_epoch = -(-batches_per_epoch // accumulation)
    # The batches of each optimizer step, in the order the collator saw them (it may run one batch ahead).
    per_step, cursor = [], 0
    for step in range(1, config["max_steps"] + 1):
        update = (step - 1) % steps_per_epoch
        count = min(accumulation, batches_per_epoch - update * accumulation)
        per_step.append([row for batch in fed[cursor:cursor + count] for row in batch])
        cursor += count
    rows = [r for r in trainer.state.log_history if CONSUMED_KEYS["examples"] in r]
    events = [r["step"] for r in trainer.state.log_history if "ctx_reliance/counterfactual_probability" in r]
    assert [r["step"] for r in rows] == events[1:]  # every event but the baseline
    previous = 0
    labels = np.array(categories, dtype=object)
    for row in rows:
        consumed = labels[[i for s in range(previous, row["step"]) for i in per_step[s]]]
        assert row[CONSUMED_KEYS["examples"]] == len(consumed)
        for category in CONSUMED_CATEGORIES:
            assert row[CONSUMED_KEYS[category]] == pytest.approx(np.mean(consumed == category), abs=1e-12), category
        previous = row["step"]
    # Following the sampler draws nothing from the global RNG (the callback stays an observer).
    state = torch.get_rng_state()
    callback.consumed.indices(0, config["max_steps"])
    assert torch.equal(state, torch.get_rng_state())


def test_a_dataset_that_is_not_the_audited_one_is_skipped_with_a_warning(tokenizer, tmp_path, audit_file, caplog):
    path, categories = audit_file
    short = tmp_path / "short.jsonl"
    short.write_text("".join(json.dumps({"index": i, "category": c}) + "\n" for i, c in enumerate(categories[:30])))
    with caplog.at_level("WARNING"):
        trainer, callback, _ = train_recording(tokenizer, tmp_path / "run", str(short), max_steps=3)
    assert "training dataset has 40 rows and the audit 30" in callback.consumed.skip_reason
    assert "consumed training examples are not logged" in caplog.text
    assert not any(CONSUMED_KEYS["examples"] in r for r in trainer.state.log_history)
    assert any("ctx_reliance/counterfactual_probability" in r for r in trainer.state.log_history[1:])


@pytest.mark.parametrize("content, match", [
    ("not json\n", "cannot be read as the JSONL"),
    ('{"index": 0}\n', "record 1 has no integer 'index' and string 'category'"),
    ('{"index": 0, "category": "parametric"}\n{"index": 2, "category": "parametric"}\n',
     "do not cover the indices 0..1 exactly once"),
])
def test_a_bad_audit_file_is_refused_at_construction(tokenizer, tmp_path, content, match):
    path = tmp_path / "audit.jsonl"
    path.write_text(content)
    trainer = make_trainer(make_tiny_llama(tokenizer), tokenizer, tmp_path, max_steps=2)
    with pytest.raises(ConfigurationError, match=match):
        ContextRelianceCallback(trainer, PROBES, audit=str(path))
    with pytest.raises(ConfigurationError, match="cannot be read"):
        ContextRelianceCallback(trainer, PROBES, audit=str(tmp_path / "missing.jsonl"))
