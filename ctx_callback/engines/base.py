"""The log-likelihood engine interface and the torch helpers the engines share."""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from transformers import modeling_utils

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


#: Whether this transformers' models take a 2-D boolean ``logits_to_keep`` (one mask row per sequence, output
#: flattened to the kept positions): the releases with ``modeling_utils.slice_logits_to_keep``. Earlier 5.x releases
#: (5.6, which LLaMA-Factory 0.9.5 pins, for one) index ``hidden_states[:, logits_to_keep, :]``, where a 2-D mask
#: raises ``IndexError``; they take a 1-D tensor of positions.
BOOLEAN_LOGITS_TO_KEEP = hasattr(modeling_utils, "slice_logits_to_keep")


def logits_to_keep_for(keep: torch.Tensor) -> torch.Tensor:
    """The ``logits_to_keep`` argument that computes logits at (at least) the ``True`` positions of ``keep``.

    The mask itself where the installed transformers takes one (:data:`BOOLEAN_LOGITS_TO_KEEP`); otherwise the 1-D
    positions kept in any row (the vocabulary projection then also runs at the other rows' positions).
    """
    if BOOLEAN_LOGITS_TO_KEEP:
        return keep
    return keep.any(0).nonzero().squeeze(1)


def kept_logits(logits: torch.Tensor, keep: torch.Tensor, argument: torch.Tensor) -> torch.Tensor:
    """The logits at the ``True`` positions of ``keep``, flattened in row-major order, whatever the model did with
    ``argument`` (:func:`logits_to_keep_for`): applied the mask (already flat), kept the 1-D positions, or ignored it
    (a model with its own forward): full-width logits."""
    if logits.dim() == 2:
        return logits
    mask = keep if logits.shape[1] == keep.shape[1] else keep[:, argument]
    return logits[mask.to(logits.device)]
