"""``"batched"``: one row per (prompt, answer), length-sorted batches with right padding.

The vocabulary projection runs only at answer positions (``logits_to_keep`` with a boolean mask). Works with any
causal LM; the fallback of ``"auto"`` and of ``"prefix"`` where no shared preamble exists.
"""

from __future__ import annotations

import torch

from ..encoding import EncodedItem
from .base import LoglikEngine, answer_logprob_sums, device_of, kept_logits_argument

__all__ = ["BatchedEngine"]


class BatchedEngine(LoglikEngine):
    """Every answer of every item as a separate right-padded row, batched by total length."""

    name = "batched"

    def score(self, model: torch.nn.Module, items: list[EncodedItem]) -> list[tuple[float, ...]]:
        device = device_of(model)
        pad = self.encoded.pad_token_id
        rows = [(i, k, item.prompt_ids, ans) for i, item in enumerate(items)
                for k, ans in enumerate(item.answer_ids)]
        results = [[0.0] * len(item.answer_ids) for item in items]
        for batch in self.batcher.batches([len(r[2]) + len(r[3]) for r in rows]):
            width = max(len(rows[b][2]) + len(rows[b][3]) for b in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            keep = torch.zeros((len(batch), width), dtype=torch.bool)
            targets: list[int] = []
            for r, b in enumerate(batch):
                _, _, prompt, answer = rows[b]
                seq = list(prompt) + list(answer)
                input_ids[r, : len(seq)] = torch.tensor(seq)
                attention[r, : len(seq)] = 1
                keep[r, len(prompt) - 1 : len(seq) - 1] = True
                targets.extend(answer)
            logits = model(
                input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False,
                logits_to_keep=kept_logits_argument(keep.to(device)),
            ).logits
            if logits.dim() == 3:  # a model that ignored the boolean logits_to_keep, or transformers 5.16
                logits = logits[keep.to(logits.device)]
            sums = answer_logprob_sums(logits, targets, [len(rows[b][3]) for b in batch])
            for b, value in zip(batch, sums):
                results[rows[b][0]][rows[b][1]] = value
        return [tuple(values) for values in results]
