"""The callback's messages: one logger, information at INFO, warnings where the user should act, main process only.

Every part of the callback logs through :data:`logger` (``ctx_callback.callback``), so one logger configures them
all. As Lightning's ``rank_zero_warn`` / ``rank_zero_info``: a fact that is the same on every rank (a selection's
result, restored weights, a configuration warning) is logged by the main process only
(:func:`rank_zero_info`, :func:`rank_zero_warn`); a fact about one rank (a probe round or a save that failed there, a
file it could not write) is logged where it happened (:func:`warn`). The logger's name says where a message comes
from, so messages carry no hand-written prefix; what ``verbose=True`` prints (the stop message and the train-end
summary, :func:`announce`) keeps its ``ctx_callback`` prefix, since it is read without a logger's name.
"""

from __future__ import annotations

import logging
from typing import Any

from .distributed import world

__all__ = ["announce", "logger", "is_main_process", "rank_zero_info", "rank_zero_warn", "warn"]

#: The logger of the callback and its parts.
logger = logging.getLogger("ctx_callback.callback")


def is_main_process() -> bool:
    """Whether this process is rank 0 of the default process group (``True`` without one)."""
    return world()[0] == 0


def warn(message: str, *args: Any) -> None:
    """A warning about this process (logged on whichever rank it happened)."""
    logger.warning(message, *args)


def rank_zero_warn(message: str, *args: Any) -> None:
    """A warning that is the same on every rank: logged by the main process only."""
    if is_main_process():
        logger.warning(message, *args)


def rank_zero_info(message: str, *args: Any) -> None:
    """Information that is the same on every rank (a selection's result, restored weights): logged at INFO by the
    main process only."""
    if is_main_process():
        logger.info(message, *args)


def announce(message: str, show: bool) -> None:
    """Log ``message`` at INFO; when ``show`` (``verbose=True`` on the main process), also print it."""
    logger.info(message)
    if show:
        print(message, flush=True)
