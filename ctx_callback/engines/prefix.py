"""``"prefix"``: a shared-prefix KV cache; the default through ``"auto"``.

The prompt preamble that every probe shares (the chat template's system prompt) runs once per call; each probe's
own prompt tokens run once per batch (the *tail pass*), and all its candidate answers continue from that KV cache
side by side (the *answer pass*); the vocabulary projection runs only at answer positions. Needs a model that
accepts a ``DynamicCache`` and ``position_ids`` (every decoder-only model in transformers does).

Budget: the :class:`~ctx_callback.engines.Batcher` cuts items with ``rows_per_unit`` = the item's number of answers
(2 for a two-answer probe), a unit's length being its prompt tail plus its longest answer. A batch of ``B`` items
with ``R`` answers in all (``R = 2B`` for two-answer probes) then runs

- the tail pass: ``B`` rows x at most (unit length - 1) tokens, so ``B x width <= max_batch_tokens`` and
  ``R <= max_batch_size``;
- the answer pass: ``R`` rows x the longest answer, so ``R x width <= max_batch_tokens``;

except a batch of one item that alone exceeds the budget. The preamble pass is one row of the shared preamble
(shorter than every prompt), once per call. Not counted in the budget: the KV cache the two passes attend to
(preamble + tail, ``R`` rows in the answer pass).
"""

from __future__ import annotations

import torch

from ..encoding import EncodedItem
from .base import LoglikEngine, answer_logprob_sums, cache_kwarg, device_of, kept_logits_argument, output_cache

__all__ = ["PrefixCacheEngine"]


class PrefixCacheEngine(LoglikEngine):
    """Preamble once, each prompt once, every answer from the prompt's cache.

    Applicable when the items share a preamble of at least one token (see :meth:`prefix_length`).
    """

    name = "prefix"

    def prefix_length(self, items: list[EncodedItem]) -> int:
        """Shared preamble length, leaving at least one prompt token per item for the tail pass."""
        shortest = min(len(item.prompt_ids) for item in items)
        return min(len(self.encoded.shared_prefix), shortest - 1)

    def applicable(self, items: list[EncodedItem]) -> bool:
        return bool(items) and self.prefix_length(items) >= 1

    def score(self, model: torch.nn.Module, items: list[EncodedItem]) -> list[tuple[float, ...]]:
        from transformers import DynamicCache

        device = device_of(model)
        pad = self.encoded.pad_token_id
        cache_kw = cache_kwarg(model)
        config = getattr(model, "config", None)
        p0 = self.prefix_length(items)
        preamble = torch.tensor([self.encoded.shared_prefix[:p0]], device=device)
        out = model(input_ids=preamble, use_cache=True, logits_to_keep=1)
        base_cache = [(layer[0], layer[1]) for layer in output_cache(out)]
        results = [[0.0] * len(item.answer_ids) for item in items]
        # Budget: the tail pass holds B x tail tokens; the answer pass R x answer tokens over a cache of p0 + tail.
        lengths = [len(item.prompt_ids) - p0 + max(len(ids) for ids in item.answer_ids) for item in items]
        for batch in self.batcher.batches(lengths, rows_per_unit=[len(item.answer_ids) for item in items]):
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
                cache = output_cache(out)
            # Every item's cache row is repeated once per answer (one repeat count per item).
            repeats = torch.tensor([len(items[b].answer_ids) for b in batch])
            if bool((repeats == 2).all()):
                cache.batch_repeat_interleave(2)
            else:
                _repeat_cache_rows(cache, repeats)
            # Answer pass: [last prompt token] + answer[:-1] predicts answer[0..n-1], for every answer of each item.
            answers = [(row, items[b].prompt_ids[-1:], ans, k) for row, b in enumerate(batch)
                       for k, ans in enumerate(items[b].answer_ids)]
            n_rows = len(answers)
            a_width = max(len(ans) for _, _, ans, _ in answers)
            ans_ids = torch.full((n_rows, a_width), pad, dtype=torch.long)
            ans_mask = torch.zeros((n_rows, a_width), dtype=torch.long)
            positions = torch.zeros((n_rows, a_width), dtype=torch.long)
            targets: list[int] = []
            for r, (row, last, ans, _) in enumerate(answers):
                seq = list(last) + list(ans[:-1])
                ans_ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                ans_mask[r, : len(seq)] = 1
                start = p0 + len(tails[row])
                positions[r] = start + torch.arange(a_width)
                targets.extend(ans)
            attention = torch.cat(
                [prefix_mask.repeat_interleave(repeats, 0), tail_mask.repeat_interleave(repeats, 0), ans_mask], 1
            )
            keep = ans_mask.bool()
            logits = model(
                input_ids=ans_ids.to(device),
                attention_mask=attention.to(device),
                position_ids=positions.to(device),
                use_cache=True,
                logits_to_keep=kept_logits_argument(keep.to(device)),
                **{cache_kw: cache},
            ).logits
            if logits.dim() == 3:
                logits = logits[keep.to(logits.device)]
            sums = answer_logprob_sums(logits, targets, [len(ans) for _, _, ans, _ in answers])
            for (row, _, _, k), value in zip(answers, sums):
                results[batch[row]][k] = value
        return [tuple(values) for values in results]


def _repeat_cache_rows(cache: object, repeats: torch.Tensor) -> None:
    """Repeat each batch row of a ``DynamicCache`` ``repeats[row]`` times, in place (``batch_repeat_interleave``
    takes one count for all rows)."""
    for layer in cache.layers:  # type: ignore[attr-defined]
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            index = repeats.to(layer.keys.device)
            layer.keys = layer.keys.repeat_interleave(index, dim=0)
            layer.values = layer.values.repeat_interleave(index, dim=0)
