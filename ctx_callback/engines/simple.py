"""``"simple"``: the reference engine, one unbatched forward pass per (prompt, answer).

Slow (every prompt runs once per answer, the vocabulary projection runs at every position), and deliberately plain: the
other engines are tested against it.
"""

from __future__ import annotations

import torch

from ..encoding import EncodedItem
from .base import LoglikEngine, device_of

__all__ = ["SimpleEngine"]


class SimpleEngine(LoglikEngine):
    """One forward pass per (prompt, answer), no batching, no cache (the batcher is not used)."""

    name = "simple"
    uses_batcher = False

    def score(self, model: torch.nn.Module, items: list[EncodedItem]) -> list[tuple[float, ...]]:
        device = device_of(model)
        out = []
        for item in items:
            values = []
            for answer in item.answer_ids:
                ids = torch.tensor([list(item.prompt_ids) + list(answer)], device=device)
                logits = model(input_ids=ids, use_cache=False).logits[0].float()
                p = len(item.prompt_ids)
                logp = torch.log_softmax(logits[p - 1 : p - 1 + len(answer)], dim=-1)
                values.append(float(logp.gather(1, torch.tensor(answer, device=device)[:, None]).sum()))
            out.append(tuple(values))
        return out
