"""Which trainers and models the callback can probe, checked before the first training step.

The callback scores the model the Trainer trains (``trainer.model``, the one every callback event receives): for
TRL's preference and RL trainers that is the policy, never DPO's or KTO's frozen reference model, GRPO's reference
or a distillation teacher. Scoring needs next-token log-probabilities over the vocabulary, so the model must be a
causal language model. Two cases cannot work and are refused with an
:class:`~ctx_callback.errors.UnsupportedTrainerError` naming the trainer or model, why, and what to do instead:

- a trainer listed in :data:`UNSUPPORTED_TRAINERS` (TRL's ``RewardTrainer`` trains a sequence-classification
  reward model: a score, no language-model head);
- a model without a causal-LM head (``get_output_embeddings()`` is ``None``: a ``*ForSequenceClassification`` or
  bare ``*Model`` backbone), or one wrapped with a value head (a ``v_head`` module, as TRL's former
  ``AutoModelForCausalLMWithValueHead`` for PPO had).

Everything else that trains through the ``transformers.Trainer`` loop works: the table of trainers, what was tested
and with which versions is in ``docs/trainers.md``. A module with no torch import (only duck typing on the model).

Where a change goes: a trainer that cannot work gets one entry in :data:`UNSUPPORTED_TRAINERS`, and a row in
``docs/trainers.md``.
"""

from __future__ import annotations

from typing import Any

from .errors import UnsupportedTrainerError

__all__ = [
    "LM_CLASS_SUFFIXES",
    "TRAINER_PACKAGES",
    "UNSUPPORTED_TRAINERS",
    "check_model_head",
    "check_trainer_support",
    "unsupported_reason",
]

#: The packages whose trainer classes :data:`UNSUPPORTED_TRAINERS` names (a user's own class of the same name is not
#: matched; a subclass of one of these is).
TRAINER_PACKAGES = ("trl", "transformers")

#: Endings of model class names that are language models whatever ``get_output_embeddings()`` says (remote-code
#: models may name their head otherwise, so that the generic lookup of ``lm_head`` finds nothing).
LM_CLASS_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")

#: Trainer class name (as TRL spells it) -> why the callback cannot probe what it trains, and what to do instead.
UNSUPPORTED_TRAINERS: dict[str, str] = {
    "RewardTrainer": (
        "it trains a reward model (AutoModelForSequenceClassification: one score per sequence, no language-model "
        "head), so there are no answer log-probabilities to compare. Probe the policy you train with that reward "
        "instead (add the callback to its GRPOTrainer / RLOOTrainer / DPOTrainer), or score language-model "
        "checkpoints afterwards with `ctx-callback scan OUTPUT_DIR`"
    ),
}


def unsupported_reason(trainer: Any) -> str | None:
    """Why ``trainer``'s class (or a TRL / transformers class it derives from) is in :data:`UNSUPPORTED_TRAINERS`.

    Args:
        trainer: A trainer instance.

    Returns:
        The reason, or ``None`` for a trainer the callback supports.
    """
    for cls in type(trainer).__mro__:
        if cls.__module__.split(".")[0] in TRAINER_PACKAGES and cls.__name__ in UNSUPPORTED_TRAINERS:
            return UNSUPPORTED_TRAINERS[cls.__name__]
    return None


def check_model_head(model: Any, trainer_name: str = "the trainer") -> None:
    """Refuse a model the scorer cannot read answer log-probabilities from.

    A PEFT model is looked through (its ``get_output_embeddings`` and class name are the base model's). Only what is
    known not to be a causal language model is refused: a value-head wrapper, or a model whose
    ``get_output_embeddings()`` is ``None`` and whose class name does not end in one of :data:`LM_CLASS_SUFFIXES`.
    A custom ``nn.Module`` without ``get_output_embeddings`` is let through.

    Args:
        model: The model the trainer trains.
        trainer_name: The trainer's class name, for the message.

    Raises:
        UnsupportedTrainerError: A value-head wrapper, or a model whose ``get_output_embeddings()`` is ``None``.
    """
    if model is None:
        return
    kind = type(model).__name__
    if hasattr(model, "v_head"):
        raise UnsupportedTrainerError(
            f"ContextRelianceCallback cannot probe the model {trainer_name} trains: {kind} is wrapped with a value "
            "head (v_head; PPO-style), and its forward returns (logits, loss, values) instead of a causal-LM output. "
            "Probe the language model inside it with ProbeScorer (docs/probes.md, 'Using the scorer without a "
            "Trainer'), or save checkpoints of the language model and score them with `ctx-callback scan OUTPUT_DIR`."
        )
    get_base = getattr(model, "get_base_model", None)
    base_kind = type(get_base() if callable(get_base) else model).__name__
    get_head = getattr(model, "get_output_embeddings", None)
    if callable(get_head) and get_head() is None and not base_kind.endswith(LM_CLASS_SUFFIXES):
        raise UnsupportedTrainerError(
            f"ContextRelianceCallback cannot probe the model {trainer_name} trains: {kind} has no causal "
            "language-model head (get_output_embeddings() is None: a sequence-classification, reward or bare "
            "backbone model), so it gives no next-token log-probabilities for the probes' answers. Load the model "
            "with AutoModelForCausalLM, or leave the callback out of this run and probe the causal LM it serves."
        )


def check_trainer_support(trainer: Any) -> None:
    """Refuse a trainer in :data:`UNSUPPORTED_TRAINERS`, then a model :func:`check_model_head` refuses.

    Called at construction (when the callback is given the trainer) and again at train begin.

    Args:
        trainer: The trainer the callback was given (``None`` is let through: the wiring check reports it).

    Raises:
        UnsupportedTrainerError: What cannot be probed, why, and what to do instead.
    """
    if trainer is None:
        return
    name = type(trainer).__name__
    reason = unsupported_reason(trainer)
    if reason is not None:
        raise UnsupportedTrainerError(f"ContextRelianceCallback does not support {name}: {reason}.")
    check_model_head(getattr(trainer, "model", None), name)
