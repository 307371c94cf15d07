"""``"auto"`` (the default): the prefix-cache engine where it applies and the model accepts it, else batched.

Per call:

1. no shared preamble of at least one token among the items (:meth:`PrefixCacheEngine.applicable` is false):
   the batched engine scores the call;
2. the model's class is recorded as rejecting the prefix cache: the batched engine;
3. otherwise the prefix-cache engine. If it raises an out-of-memory error, the error propagates (the scorer
   retries the round with smaller batches; memory says nothing about the model's support for the cache). If it
   raises anything else, a warning is logged, the model's class is recorded in
   :attr:`AutoEngine.prefix_failures`, and the batched engine scores the whole call. Later calls with a model of
   that class go straight to the batched engine (rule 2), so the warning appears once per model class.

The record is this engine's own state: the scorer's requested engine never changes. An explicit
``engine="prefix"`` does not use this class and re-raises the error.
"""

from __future__ import annotations

import logging

import torch

from ..encoding import EncodedItem, EncodedProbes
from .base import LoglikEngine, is_out_of_memory
from .batched import BatchedEngine
from .batching import Batcher
from .prefix import PrefixCacheEngine

__all__ = ["AutoEngine"]

logger = logging.getLogger(__name__)


class AutoEngine(LoglikEngine):
    """The prefix-cache engine, falling back to the batched engine per call or per model class (see module doc).

    Args:
        encoded: The encoded probe set.
        batcher: The token and row budgets, shared by both engines.

    Attributes:
        prefix_failures: Model classes whose forward pass rejected the prefix cache, each mapped to the error
            (``"TypeError: ..."``). Models of these classes are scored by the batched engine.
    """

    name = "auto"

    def __init__(self, encoded: EncodedProbes, batcher: Batcher) -> None:
        super().__init__(encoded, batcher)
        self.prefix = PrefixCacheEngine(encoded, batcher)
        self.batched = BatchedEngine(encoded, batcher)
        self.prefix_failures: dict[type, str] = {}

    def set_batcher(self, batcher: Batcher) -> None:
        super().set_batcher(batcher)
        self.prefix.set_batcher(batcher)
        self.batched.set_batcher(batcher)

    def engine_for(self, model_class: type, items: list[EncodedItem]) -> LoglikEngine:
        """The engine a call with a model of ``model_class`` on ``items`` starts with."""
        if model_class in self.prefix_failures or not self.prefix.applicable(items):
            return self.batched
        return self.prefix

    @property
    def active_name(self) -> str:
        """``"prefix"`` while the probe set shares a preamble and no model class has rejected it, else
        ``"batched"``."""
        if self.prefix_failures or not self.prefix.applicable(self.encoded.items):
            return self.batched.name
        return self.prefix.name

    def score(self, model: torch.nn.Module, items: list[EncodedItem]) -> list[tuple[float, ...]]:
        if self.engine_for(type(model), items) is self.prefix:
            try:
                return self.prefix.score(model, items)
            except Exception as err:  # noqa: BLE001 - "auto" degrades gracefully; explicit "prefix" re-raises
                if is_out_of_memory(err):
                    raise  # not a property of the model class: the scorer retries with smaller batches
                logger.warning(
                    "ctx_callback: the prefix-cache engine failed on %s (%s: %s); using the batched engine.",
                    type(model).__name__, type(err).__name__, err,
                )
                self.prefix_failures[type(model)] = f"{type(err).__name__}: {err}"
        return self.batched.score(model, items)
