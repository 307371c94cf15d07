"""Where attention goes: the share of attention from the answer position to the context tokens.

Goyal et al. show the inversion's mechanism as attention to the context tokens falling while it sets in, and Lookback
Lens (Chuang et al., EMNLP 2024) finds that the per-head share of attention on the context predicts
context-unfaithful output. This part measures that share during training, at a slower cadence, on a sample of probes.

For each sampled probe, one forward pass over its counterfactual prompt returns every layer's attention weights. At
the **answer position** (the last prompt token, whose output predicts the answer's first token), the share of
attention on the tokens of the context passage is summed over those tokens and averaged over heads, per layer::

    share[layer] = mean over heads of  sum over context tokens t of  attention[layer, head, answer_position, t]

Logged (:func:`attention_row`): ``attention/context_share`` (mean over probes and layers),
``attention/layer_<NN>`` (per layer, mean over probes), ``attention/uniform_share`` (the context's share of the
prompt's tokens: what uniform attention would give, for scale), ``attention/probes`` and ``attention/seconds``.

The model is not changed for training. Attention weights exist only with the ``"eager"`` implementation, so
:func:`eager_attention` switches every config of the model to it for the probe forward passes and restores each
config's own value afterwards, also when a forward pass raises; the forward passes run under
:func:`~ctx_callback.isolation.probe_mode` (eval mode, no grad, RNG states restored). Training with the check is
bit-identical to training without it (tested).

The context tokens are found from the tokenizer's character offsets (a fast tokenizer is needed; probes whose prompt
does not tokenize to the scored prompt tokens, or whose context cannot be located in the prompt, are skipped).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from .distributed import ProbePlan, run_round
from .encoding import EncodedItem
from .engines.base import device_of
from .errors import ConfigurationError
from .isolation import probe_mode
from .metric_spec import METRIC_PREFIX

__all__ = ["KEY_PREFIX", "ContextSpans", "attention_row", "context_shares", "eager_attention"]

#: Prefix of the logged keys: ``ctx_reliance/attention/<name>``.
KEY_PREFIX = f"{METRIC_PREFIX}/attention"


@contextlib.contextmanager
def eager_attention(model: torch.nn.Module) -> Iterator[None]:
    """Run the body with every config of ``model`` set to eager attention; each config's own value is put back."""
    configs: dict[int, Any] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation_internal"):
            configs.setdefault(id(config), config)
    saved = {key: config._attn_implementation_internal for key, config in configs.items()}
    try:
        for config in configs.values():
            config._attn_implementation_internal = "eager"
        yield
    finally:
        for key, config in configs.items():
            config._attn_implementation_internal = saved[key]


class ContextSpans:
    """The context tokens of each probe's counterfactual prompt, found once from the tokenizer's offsets.

    Args:
        items: Encoded items (their ``"context"`` ones are located; give those of the probes to be measured).
        probes: The probes the items point into.
        tokenizer: A fast tokenizer (with ``return_offsets_mapping``).
        add_special_tokens: Whether the prompt format tokenizes with special tokens.

    Raises:
        ConfigurationError: The tokenizer gives no character offsets (a slow tokenizer).
    """

    def __init__(self, items: Sequence[EncodedItem], probes: Sequence[Any], tokenizer: Any,
                 add_special_tokens: bool) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigurationError("attention_every needs a fast tokenizer (its character offsets locate the context "
                                     "tokens); load the tokenizer with use_fast=True.")
        self.items: dict[int, EncodedItem] = {}
        self.positions: dict[int, np.ndarray] = {}
        for item in items:
            if item.variant != "context":
                continue
            start = item.prompt_text.find(probes[item.probe_index].context)
            if start < 0:
                continue
            end = start + len(probes[item.probe_index].context)
            encoded = tokenizer(item.prompt_text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
            ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
            if tuple(ids[:len(item.prompt_ids)]) != item.prompt_ids:
                continue
            inside = [t for t, (a, b) in enumerate(offsets[:len(item.prompt_ids)]) if a < end and b > start and b > a]
            if inside:
                self.items[item.probe_index] = item
                self.positions[item.probe_index] = np.asarray(inside)


def context_shares(model: torch.nn.Module, spans: ContextSpans, probe_indices: Sequence[int]) -> dict[int, np.ndarray]:
    """Per probe (of ``probe_indices`` with a span): the attention share on its context tokens, one value per layer."""
    out: dict[int, np.ndarray] = {}
    device = device_of(model)
    with probe_mode(model), eager_attention(model):
        for index in probe_indices:
            item = spans.items.get(int(index))
            if item is None:
                continue
            ids = torch.tensor([item.prompt_ids], dtype=torch.long, device=device)
            attentions = model(input_ids=ids, output_attentions=True, use_cache=False).attentions
            if not attentions or attentions[0] is None:
                raise ConfigurationError("the model returned no attention weights with eager attention; "
                                         "attention_every needs a model that does (a transformers causal LM).")
            columns = torch.as_tensor(spans.positions[int(index)], device=device)
            last = len(item.prompt_ids) - 1
            out[int(index)] = np.array([float(layer[0, :, last, :].float().index_select(-1, columns).sum(-1).mean())
                                        for layer in attentions])
    return out


def attention_row(model: torch.nn.Module, spans: ContextSpans, plan: ProbePlan,
                  sample: Sequence[int]) -> dict[str, float]:
    """The attention keys over ``sample`` (this rank's share; the ranks' sums are added)."""
    start = time.perf_counter()
    wanted = set(int(i) for i in sample)

    def measure(mine: list[int]) -> tuple[np.ndarray | None, int, float]:
        shares = context_shares(model, spans, [i for i in mine if i in wanted])
        uniform = sum(len(spans.positions[i]) / len(spans.items[i].prompt_ids) for i in shares)
        total = np.sum(list(shares.values()), axis=0) if shares else None
        return total, len(shares), uniform

    def merge(parts: list[tuple[np.ndarray | None, int, float]]) -> tuple[np.ndarray | None, int, float]:
        sums = [p[0] for p in parts if p[0] is not None]
        return (np.sum(sums, axis=0) if sums else None), sum(p[1] for p in parts), sum(p[2] for p in parts)

    total, n, uniform = run_round(measure, merge, plan)
    if total is None or n == 0:
        return {}
    per_layer = total / n
    row = {f"{KEY_PREFIX}/context_share": float(per_layer.mean())}
    row.update({f"{KEY_PREFIX}/layer_{layer:02d}": float(value) for layer, value in enumerate(per_layer)})
    row.update({f"{KEY_PREFIX}/uniform_share": uniform / n, f"{KEY_PREFIX}/probes": float(n),
                f"{KEY_PREFIX}/seconds": time.perf_counter() - start})
    return row
