"""The out-of-memory back-off of a probe round: retry it with halved batch budgets, down to one item per forward pass.

:func:`run_with_backoff` runs one attempt at a round; when a forward pass runs out of memory (see
:func:`~ctx_callback.engines.is_out_of_memory`) it frees the accelerator's cached memory and runs the attempt again
with both budgets halved (:func:`smaller_budget`), until it succeeds or no retry can help: sharded parameters (the
other ranks wait inside the failed forward pass's collective), an engine that does not batch, or one item per forward
pass already. Every step is logged as a warning; the scorer's class docstring ("Out of memory") says why the budget
that worked is kept for later rounds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import torch

from .engines import Batcher, is_out_of_memory
from .engines.base import device_of
from .errors import quote_error

__all__ = ["free_cached_memory", "log_recovered_round", "run_with_backoff", "smaller_budget"]

# The scorer's logger: these records keep the name that users' logging configuration already knows.
logger = logging.getLogger("ctx_callback.scoring")

T = TypeVar("T")


def smaller_budget(err: BaseException, budget: Batcher, *, synced_gpus: bool,
                   unbatched_engine: Callable[[], str | None]) -> Batcher | None:
    """The budget to retry a round that ran out of memory with, or ``None`` (after a warning) when no retry can help.

    Args:
        err: The out-of-memory error of the failed forward pass.
        budget: The budget the failed attempt ran with.
        synced_gpus: Whether parameters are sharded (FSDP / ZeRO-3): then no retry is possible.
        unbatched_engine: Returns the name of the engine in use when it runs one row per forward pass (no batch to
            shrink), else ``None``; called only when parameters are not sharded.

    Returns:
        Both budgets halved (at least 1), or ``None``.
    """
    reason = f"{type(err).__name__}: {quote_error(err, first_line=True)}"
    if synced_gpus:
        logger.warning(
            "ctx_callback: out of memory in a probe forward pass (%s) under sharded parameters (FSDP / ZeRO-3): "
            "not retried, since the other ranks wait inside that forward pass's collective. Lower "
            "max_batch_tokens / max_batch_size (now %d / %d).", reason, budget.max_batch_tokens,
            budget.max_batch_size,
        )
        return None
    engine = unbatched_engine()
    if engine is not None:
        logger.warning(
            "ctx_callback: out of memory in a probe forward pass (%s); the %r engine runs one row per forward pass "
            "and does not batch, so there is no smaller batch to retry with.", reason, engine,
        )
        return None
    if budget.max_batch_size <= 1:
        logger.warning(
            "ctx_callback: out of memory in a probe forward pass even with one probe item per forward pass "
            "(max_batch_tokens=%d, max_batch_size=1) (%s): the round fails. Use shorter or fewer probes or "
            "variants, or probe while less memory is in use.", budget.max_batch_tokens, reason,
        )
        return None
    smaller = Batcher(max(1, budget.max_batch_tokens // 2), max(1, budget.max_batch_size // 2))
    logger.warning(
        "ctx_callback: out of memory in a probe forward pass with max_batch_tokens=%d, max_batch_size=%d (%s); "
        "retrying the round with max_batch_tokens=%d, max_batch_size=%d.", budget.max_batch_tokens,
        budget.max_batch_size, reason, smaller.max_batch_tokens, smaller.max_batch_size,
    )
    return smaller


def run_with_backoff(attempt: Callable[[], T], model: torch.nn.Module, budget: Batcher,
                     set_budget: Callable[[Batcher], None],
                     next_budget: Callable[[BaseException, Batcher], Batcher | None]) -> tuple[T, int]:
    """Run ``attempt`` until it does not run out of memory, halving the budget between tries.

    Args:
        attempt: One try at the round, run with the budget last passed to ``set_budget``.
        model: The model scored (its device's cached memory is freed before a retry).
        budget: The budget the round starts with.
        set_budget: Makes the next attempt use a budget.
        next_budget: ``(error, budget) -> smaller budget or None`` (see :func:`smaller_budget`).

    Returns:
        ``(what attempt returned, number of retries)``.

    Raises:
        Exception: Any error of ``attempt`` that is not out of memory, at once; an out-of-memory error no retry can
            help (then the round's starting budget is set back first).
    """
    round_budget = current = budget
    retries = 0
    while True:
        try:
            return attempt(), retries
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            smaller = next_budget(err, current)
            if smaller is None:
                set_budget(round_budget)
                raise
        # Outside the except block: the failed forward's traceback (and the tensors it holds) is released.
        free_cached_memory(model)
        set_budget(smaller)
        current = smaller
        retries += 1


def log_recovered_round(retries: int, budget: Batcher, configured: Batcher) -> None:
    """Warn that a round completed after ``retries`` out-of-memory retries (nothing when there were none)."""
    if not retries:
        return
    logger.warning(
        "ctx_callback: the probe round completed after %d out-of-memory retr%s with max_batch_tokens=%d, "
        "max_batch_size=%d (configured: %d, %d); later rounds start from this budget "
        "(ProbeScorer.reset_budget() restores the configured one).", retries, "y" if retries == 1 else "ies",
        budget.max_batch_tokens, budget.max_batch_size, configured.max_batch_tokens, configured.max_batch_size,
    )


def free_cached_memory(model: torch.nn.Module) -> None:
    """Return the accelerator's cached blocks (``torch.cuda.empty_cache()`` and its kin) before a retry."""
    device = device_of(model)
    backend = getattr(torch, device.type, None)
    empty_cache = getattr(backend, "empty_cache", None)
    if device.type == "cuda" and not torch.cuda.is_initialized():
        return
    if callable(empty_cache):
        empty_cache()
