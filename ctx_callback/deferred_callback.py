"""The callback for frameworks that build the ``Trainer`` themselves and only take a list of callbacks.

:class:`~ctx_callback.ContextRelianceCallback` takes the trainer in its constructor, because the trackers only see
rows logged through ``Trainer.log`` and callback events do not receive the trainer (see
:class:`~ctx_callback.probe_round.RowLogger`). Some frameworks build the trainer inside their own entry point and
accept callbacks as objects created beforehand: LLaMA-Factory's ``run_exp(args, callbacks=[...])`` is one. There is
no trainer to pass yet.

:class:`DeferredContextRelianceCallback` is the same callback, created without the trainer. When the Trainer that
holds it finishes its ``__init__`` (``on_init_end``), or at the latest at train begin, it finds that Trainer and binds
to it: the Trainer is the caller of the callback handler that is running the event (a ``transformers.Trainer`` a few
frames up the stack whose ``callback_handler`` contains this very callback). Nothing is patched; if the Trainer cannot
be found (a framework that drives the callbacks some other way), train begin fails with
:class:`~ctx_callback.errors.TrainerWiringError`, as the plain callback does without a trainer.

Example (LLaMA-Factory; the whole file is ``examples/llamafactory_sft.py``)::

    from llamafactory.train.tuner import run_exp
    from ctx_callback import DeferredContextRelianceCallback

    run_exp(args, callbacks=[DeferredContextRelianceCallback(probes="all", eval_steps=50)])
"""

from __future__ import annotations

import inspect
from typing import Any

from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments

from .callback import ContextRelianceCallback

__all__ = ["DeferredContextRelianceCallback", "find_trainer_holding"]

#: How many frames up from the callback's event method the Trainer may be. transformers calls events as
#: ``Trainer`` -> ``CallbackHandler.on_<event>`` -> ``CallbackHandler.call_event`` -> the callback: three frames.
MAX_FRAMES = 8


def find_trainer_holding(callback: Any, max_frames: int = MAX_FRAMES) -> Trainer | None:
    """The ``transformers.Trainer`` whose callback handler holds ``callback`` and is running one of its events.

    Looks at most ``max_frames`` frames up the current call stack for a method of a ``Trainer`` (its ``self``) whose
    ``callback_handler.callbacks`` contains ``callback`` (by identity).

    Returns:
        The trainer, or ``None`` when no such trainer is on the stack.
    """
    frame = inspect.currentframe()
    try:
        for _ in range(max_frames + 1):
            if frame is None:
                return None
            candidate = frame.f_locals.get("self")
            handler = getattr(candidate, "callback_handler", None)
            if isinstance(candidate, Trainer) and any(cb is callback for cb in getattr(handler, "callbacks", ())):
                return candidate
            frame = frame.f_back
        return None
    finally:
        del frame  # frames hold references to their locals: do not keep the stack alive


class DeferredContextRelianceCallback(ContextRelianceCallback):
    """:class:`~ctx_callback.ContextRelianceCallback` for a Trainer that does not exist yet (module docstring).

    Takes every keyword argument of :class:`~ctx_callback.ContextRelianceCallback` except ``trainer``; the tokenizer
    defaults to the trainer's ``processing_class`` as there. Behaves exactly as the plain callback once bound.

    Args:
        probes: As :class:`~ctx_callback.ContextRelianceCallback`'s ``probes``.
        **kwargs: Any other argument of :class:`~ctx_callback.ContextRelianceCallback` (all keyword-only).

    Raises:
        TypeError: ``trainer`` was passed (use :class:`~ctx_callback.ContextRelianceCallback` then).
    """

    def __init__(self, probes: Any = "default", **kwargs: Any) -> None:
        if "trainer" in kwargs:
            raise TypeError(
                "DeferredContextRelianceCallback finds its trainer by itself; when you have the trainer, use "
                "`trainer.add_callback(ContextRelianceCallback(trainer, probes=...))` instead."
            )
        super().__init__(None, probes, **kwargs)

    def bind(self, trainer: Trainer) -> None:
        """Attach to ``trainer``: its ``Trainer.log`` for the rows, its checkpoints, its ``processing_class``."""
        self.trainer = trainer
        self.checkpointer.trainer = trainer
        self.row_logger.trainer = trainer

    def _bind_if_needed(self) -> None:
        if self.trainer is None:
            trainer = find_trainer_holding(self)
            if trainer is not None:
                self.bind(trainer)

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        """Bind to the Trainer that has just been built with this callback."""
        self._bind_if_needed()
        return control

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        """Bind if not bound yet (added with ``trainer.add_callback`` after ``__init__``), then start as the parent."""
        self._bind_if_needed()
        return super().on_train_begin(args, state, control, **kwargs)
