"""Greedy generation over encoded prompts (``mode="generate"``), left-padded, length-sorted batches."""

from __future__ import annotations

from typing import Any

import torch

from ..encoding import EncodedItem, EncodedProbes
from .base import device_of
from .batching import Batcher

__all__ = ["GenerationEngine", "stop_token_ids"]

#: End-of-turn tokens of common chat templates; generation stops at any of them that the vocabulary has.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


def stop_token_ids(tokenizer: Any) -> list[int]:
    """The tokenizer's EOS id followed by every known end-of-turn token it has, without duplicates."""
    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    for token in END_OF_TURN_TOKENS:
        tid = tokenizer.convert_tokens_to_ids(token) if token in tokenizer.get_vocab() else None
        if tid is not None and tid not in ids:
            ids.append(int(tid))
    return ids


class GenerationEngine:
    """Greedy decoding of ``max_new_tokens`` per prompt; the stop tokens are computed once, here.

    Args:
        encoded: The encoded probe set (for ``pad_token_id``).
        batcher: The token and row budgets (each prompt counts as its length + ``max_new_tokens``).
        tokenizer: Decodes the generated tokens; its EOS and end-of-turn tokens stop generation.
        max_new_tokens: Tokens generated per prompt.
    """

    def __init__(self, encoded: EncodedProbes, batcher: Batcher, tokenizer: Any, max_new_tokens: int) -> None:
        self.encoded = encoded
        self.batcher = batcher
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.stop_ids = stop_token_ids(tokenizer)

    def set_batcher(self, batcher: Batcher) -> None:
        """Cut later ``generate`` calls with ``batcher`` (the scorer's out-of-memory retry)."""
        self.batcher = batcher

    def generate(self, model: torch.nn.Module, items: list[EncodedItem], *, synced_gpus: bool = False) -> list[str]:
        """The stripped greedy continuation of each item's prompt, special tokens removed, in the order of ``items``.

        Args:
            model: A causal LM with ``generate``.
            items: The prompts.
            synced_gpus: Keep decoding until every rank is done (FSDP / ZeRO-3 parameter sharding).
        """
        from transformers import GenerationConfig

        device = device_of(model)
        pad = self.encoded.pad_token_id
        config = GenerationConfig(
            max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad,
            eos_token_id=self.stop_ids or None,
        )
        texts: list[str] = [""] * len(items)
        lengths = [len(item.prompt_ids) + self.max_new_tokens for item in items]
        for batch in self.batcher.batches(lengths):
            width = max(len(items[b].prompt_ids) for b in batch)
            # Left padding, built here: the tokenizer's padding_side is never touched.
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for r, b in enumerate(batch):
                ids = items[b].prompt_ids
                input_ids[r, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                attention[r, width - len(ids):] = 1
            output = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention.to(device), generation_config=config,
                synced_gpus=synced_gpus,
            )
            for r, b in enumerate(batch):
                texts[b] = self.tokenizer.decode(output[r, width:], skip_special_tokens=True).strip()
        return texts
