"""The log-likelihood engine interface and the torch helpers the engines share."""

from __future__ import annotations

import functools
import inspect
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from ..encoding import EncodedItem, EncodedProbes
from .batching import Batcher

__all__ = ["LoglikEngine", "is_out_of_memory"]

#: Phrases of out-of-memory errors that are not ``torch.OutOfMemoryError``: older torch and other backends
#: ("CUDA out of memory", "MPS backend out of memory"), and the CPU allocator ("can't allocate memory").
_OOM_PHRASES = ("out of memory", "can't allocate memory")


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an out-of-memory error of a forward pass: a ``torch.OutOfMemoryError``, or a
    ``RuntimeError`` whose message says so (see :data:`_OOM_PHRASES`)."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and any(phrase in str(err).lower() for phrase in _OOM_PHRASES)


class LoglikEngine(ABC):
    """Scores every candidate answer of encoded items by its summed log-probability.

    An engine is built once per :class:`~ctx_callback.scoring.ProbeScorer` and reused for every probe round; it
    does no tokenizer work. :meth:`score` is called inside :func:`~ctx_callback.scoring.probe_mode` (eval mode,
    ``no_grad``), so an engine only runs forward passes.

    Args:
        encoded: The encoded probe set (for ``pad_token_id`` and ``shared_prefix``).
        batcher: The token and row budgets; engines cut their forward passes with it.
    """

    #: The registry name (set by each engine; ``LOGLIK_ENGINES`` maps it to the class).
    name: ClassVar[str] = ""
    #: Whether the engine cuts its forward passes with :attr:`batcher`, so that a smaller budget makes them smaller
    #: (the scorer retries a round that ran out of memory only then).
    uses_batcher: ClassVar[bool] = True

    def __init__(self, encoded: EncodedProbes, batcher: Batcher) -> None:
        self.encoded = encoded
        self.batcher = batcher

    def set_batcher(self, batcher: Batcher) -> None:
        """Cut later forward passes with ``batcher`` (the scorer's out-of-memory retry; engines that hold other
        engines pass it on)."""
        self.batcher = batcher

    def applicable(self, items: list[EncodedItem]) -> bool:
        """Whether this engine can score ``items`` (otherwise the scorer uses the batched engine for the call)."""
        return True

    @abstractmethod
    def score(self, model: torch.nn.Module, items: list[EncodedItem]) -> list[tuple[float, ...]]:
        """Per item, ``log p(answer | prompt)`` summed over the answer's tokens for each of ``item.answer_ids`` (for
        a two-answer probe: ``(counterfactual, parametric)``), in the order of ``items``."""


# ----------------------------------------------------------------------------------------------------------------
# Shared torch helpers
# ----------------------------------------------------------------------------------------------------------------


def device_of(model: torch.nn.Module) -> torch.device:
    """The device inputs go to: ``model.device`` where it is a device, else the first parameter's."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def cache_kwarg(model: torch.nn.Module) -> str:
    """transformers >= 5.24 renamed ``past_key_values`` to ``cache`` (the old name is deprecated)."""
    base = model
    for attr in ("get_base_model",):
        if hasattr(base, attr):
            base = getattr(base, attr)()
    try:
        params = inspect.signature(type(base).forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


@functools.lru_cache(maxsize=1)
def boolean_logits_to_keep() -> bool:
    """Whether this transformers slices ``logits_to_keep`` given as a 2-D boolean mask (``modeling_utils.
    slice_logits_to_keep``, added after 5.16). transformers 5.16 (which axolotl 0.19 pins) indexes
    ``hidden_states[:, logits_to_keep, :]``, an ``IndexError`` for such a mask."""
    from transformers import modeling_utils

    return hasattr(modeling_utils, "slice_logits_to_keep")


def kept_logits_argument(keep: torch.Tensor) -> torch.Tensor | int:
    """The ``logits_to_keep`` to pass for ``keep``, a boolean mask of the positions to score: the mask where
    transformers supports it (:func:`boolean_logits_to_keep`), else ``0`` (logits at every position, which the
    caller selects with the mask, as for a model that ignores the argument)."""
    return keep if boolean_logits_to_keep() else 0


def output_cache(output: Any) -> Any:
    """The KV cache of a model output, under either name."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def answer_logprob_sums(logits: torch.Tensor, targets: list[int], lengths: list[int]) -> list[float]:
    """Sum of log p(target) over each answer's consecutive rows of ``logits`` ([sum(lengths), vocab])."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    tok = torch.tensor(targets, device=logp.device)
    per_token = logp.gather(1, tok[:, None])[:, 0].double().cpu()
    return [float(chunk.sum()) for chunk in torch.split(per_token, lengths)]
