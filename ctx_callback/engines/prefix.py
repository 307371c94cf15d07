"""``"prefix"``: a shared-prefix KV cache; the default through ``"auto"``.

The prompt preamble that every probe shares (the chat template's system prompt) runs once per call; each probe's
own prompt tokens run once per batch (the *tail pass*), and both candidate answers continue from that KV cache
side by side (the *answer pass*); the vocabulary projection runs only at answer positions. Needs a model that
accepts a ``DynamicCache`` and ``position_ids`` (every decoder-only model in transformers does).

Budget: the :class:`~ctx_callback.engines.Batcher` cuts items with ``rows_per_unit=2``, a unit's length being its
prompt tail plus its longer answer. A batch of ``B`` items then runs

- the tail pass: ``B`` rows x at most (unit length - 1) tokens, so ``B x width <= max_batch_tokens / 2`` and
  ``2B <= max_batch_size``;
- the answer pass: ``2B`` rows x the longest answer, so ``2B x width <= max_batch_tokens``;

except a batch of one item that alone exceeds the budget. The preamble pass is one row of the shared preamble
(shorter than every prompt), once per call. Not counted in the budget: the KV cache the two passes attend to
(preamble + tail, ``2B`` rows in the answer pass).
"""

from __future__ import annotations

import numpy as np
import torch

from ..encoding import EncodedItem
from .base import LoglikEngine, _answer_logprob_sums, _cache_kwarg, _device_of, _output_cache

__all__ = ["PrefixCacheEngine"]


class PrefixCacheEngine(LoglikEngine):
    """Preamble once, each prompt once, both answers from the prompt's cache.

    Applicable when the items share a preamble of at least one token (see :meth:`prefix_length`).
    """

    name = "prefix"

    def prefix_length(self, items: list[EncodedItem]) -> int:
        """Shared preamble length, leaving at least one prompt token per item for the tail pass."""
        shortest = min(len(item.prompt_ids) for item in items)
        return min(len(self.encoded.shared_prefix), shortest - 1)

    def applicable(self, items: list[EncodedItem]) -> bool:
        return bool(items) and self.prefix_length(items) >= 1

    def score(self, model: torch.nn.Module, items: list[EncodedItem]) -> list[tuple[float, float]]:
        from transformers import DynamicCache

        device = _device_of(model)
        pad = self.encoded.pad_token_id
        cache_kw = _cache_kwarg(model)
        config = getattr(model, "config", None)
        p0 = self.prefix_length(items)
        preamble = torch.tensor([self.encoded.shared_prefix[:p0]], device=device)
        out = model(input_ids=preamble, use_cache=True, logits_to_keep=1)
        base_cache = [(layer[0], layer[1]) for layer in _output_cache(out)]
        results = np.zeros((len(items), 2))
        # Budget: the tail pass holds B x tail tokens; the answer pass 2B x answer tokens over a cache of p0 + tail.
        lengths = [len(item.prompt_ids) - p0 + max(len(item.counterfactual_ids), len(item.parametric_ids))
                   for item in items]
        for batch in self.batcher.batches(lengths, rows_per_unit=2):
            bsz = len(batch)
            tails = [items[b].prompt_ids[p0:-1] for b in batch]  # all but the last prompt token
            t_width = max(len(t) for t in tails)
            cache = DynamicCache(
                ddp_cache_data=[(k.expand(bsz, -1, -1, -1), v.expand(bsz, -1, -1, -1)) for k, v in base_cache],
                config=config,
            )
            prefix_mask = torch.ones((bsz, p0), dtype=torch.long)
            tail_mask = torch.zeros((bsz, t_width), dtype=torch.long)
            if t_width > 0:
                tail_ids = torch.full((bsz, t_width), pad, dtype=torch.long)
                for r, tail in enumerate(tails):
                    tail_ids[r, : len(tail)] = torch.tensor(tail, dtype=torch.long)
                    tail_mask[r, : len(tail)] = 1
                positions = (p0 + torch.arange(t_width)).expand(bsz, -1)
                out = model(
                    input_ids=tail_ids.to(device),
                    attention_mask=torch.cat([prefix_mask, tail_mask], 1).to(device),
                    position_ids=positions.to(device),
                    use_cache=True,
                    logits_to_keep=1,
                    **{cache_kw: cache},
                )
                cache = _output_cache(out)
            cache.batch_repeat_interleave(2)
            # Answer pass: [last prompt token] + answer[:-1] predicts answer[0..n-1], for cf and par of each item.
            answers = [(items[b].prompt_ids[-1:], ans) for b in batch
                       for ans in (items[b].counterfactual_ids, items[b].parametric_ids)]
            a_width = max(len(ans) for _, ans in answers)
            ans_ids = torch.full((2 * bsz, a_width), pad, dtype=torch.long)
            ans_mask = torch.zeros((2 * bsz, a_width), dtype=torch.long)
            positions = torch.zeros((2 * bsz, a_width), dtype=torch.long)
            targets: list[int] = []
            for r, (last, ans) in enumerate(answers):
                seq = list(last) + list(ans[:-1])
                ans_ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                ans_mask[r, : len(seq)] = 1
                start = p0 + len(tails[r // 2])
                positions[r] = start + torch.arange(a_width)
                targets.extend(ans)
            attention = torch.cat(
                [prefix_mask.repeat_interleave(2, 0), tail_mask.repeat_interleave(2, 0), ans_mask], 1
            )
            keep = ans_mask.bool()
            logits = model(
                input_ids=ans_ids.to(device),
                attention_mask=attention.to(device),
                position_ids=positions.to(device),
                use_cache=True,
                logits_to_keep=keep.to(device),
                **{cache_kw: cache},
            ).logits
            if logits.dim() == 3:
                logits = logits[keep.to(logits.device)]
            sums = _answer_logprob_sums(logits, targets, [len(ans) for _, ans in answers])
            for r, value in enumerate(sums):
                results[batch[r // 2], r % 2] = value
        return [(float(cf), float(par)) for cf, par in results]
