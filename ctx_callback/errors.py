"""The exceptions ctx_callback raises for bad input, under one root.

Catch :class:`CtxCallbackError` to handle every user-input error this package raises. It subclasses
``ValueError``, so code written against earlier versions (which raised plain ``ValueError``) keeps working. Each
subclass says what went wrong; every message names the argument, file, line or probe and how to fix it.

The command line maps every :class:`CtxCallbackError` to exit code 2 (bad input) and prints its message as one line.

Errors that are not the user's input (a bug, an out-of-memory error, a failing forward pass) are not wrapped: they
keep their own types.
"""

from __future__ import annotations

__all__ = [
    "QUOTED_ERROR_LIMIT",
    "AuditDataError",
    "CheckpointMismatchError",
    "ConfigurationError",
    "ConfigurationTypeError",
    "CtxCallbackError",
    "ModelLoadError",
    "ProbeFormatError",
    "ProbeLengthError",
    "ProbeSourceError",
    "TrainerWiringError",
    "UnsafeFileError",
    "UnsupportedTrainerError",
    "UsageError",
    "quote_error",
]

#: The most characters of another error's message that ctx_callback quotes inside its own messages.
QUOTED_ERROR_LIMIT = 300


def quote_error(err: BaseException | str, limit: int = QUOTED_ERROR_LIMIT, first_line: bool = False) -> str:
    """Another error's message, shortened to quote inside one of ours.

    Args:
        err: The exception (or its message).
        limit: The most characters kept; a longer text ends in ``...`` within the limit.
        first_line: Keep only the first line (CUDA's out-of-memory errors and the Hub's run to many lines);
            otherwise every run of whitespace, newlines included, becomes one space.

    Returns:
        The message on one line, at most ``limit`` characters.
    """
    text = str(err).strip()
    if first_line:
        lines = text.splitlines()
        text = lines[0] if lines else ""
    else:
        text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class CtxCallbackError(ValueError):
    """Root of every input error ctx_callback raises (a ``ValueError``)."""


class ConfigurationError(CtxCallbackError):
    """An argument or option has an invalid value (out of range, unknown name, incompatible with another)."""


class ConfigurationTypeError(ConfigurationError, TypeError):
    """An argument has the wrong type (a prompt format that is neither a string nor a callable, ...).

    Also a ``TypeError``, which is what these raised before.
    """


class TrainerWiringError(ConfigurationError, TypeError):
    """The callback is not wired to the trainer that trains (no trainer, another trainer, not a ``Trainer``).

    Also a ``TypeError``, which is what passing a non-``Trainer`` object raised before.
    """


class UnsupportedTrainerError(TrainerWiringError):
    """The trainer, or the model it trains, cannot be probed: a reward trainer, a model without a causal-LM head, a
    value-head wrapper (see :mod:`ctx_callback.trainer_support` and ``docs/trainers.md``). Raised at construction when
    the callback is given the trainer, else at train begin, before the first step."""


class ProbeSourceError(CtxCallbackError):
    """A probe source cannot be found or loaded: unknown suite name, missing file, empty directory, Hub failure."""


class ProbeFormatError(CtxCallbackError):
    """A probe file or record is malformed. The message names the source, the line or probe id and the field."""


class ProbeLengthError(CtxCallbackError):
    """A probe does not fit the model: its prompt plus answer is longer than the model's maximum positions.

    Probes are never truncated (a cut context may lose the counterfactual statement): shorten or drop them.
    """


class CheckpointMismatchError(CtxCallbackError, RuntimeError):
    """Saved weights do not match the model they are loaded into (missing or unexpected parameters).

    Also a ``RuntimeError``, which is what it was before.
    """


class UnsafeFileError(CtxCallbackError):
    """A file would run code when loaded (a pickle that holds more than tensors, dataset or model code): refused.

    ctx_callback loads weights from safetensors first and from ``.bin`` pickles only with ``weights_only=True``, and
    never passes ``trust_remote_code``.
    """


class AuditDataError(CtxCallbackError):
    """A training dataset given to the data audit is unusable: missing or misnamed columns, an empty target, a split
    callable that returns the wrong shape. The message names the example index and the field."""


class ModelLoadError(CtxCallbackError):
    """A model, PEFT adapter or tokenizer to score cannot be loaded: a path or Hub id that is no model, an unreadable
    ``adapter_config.json`` or one that names no base model, a tokenizer that does not load."""


class UsageError(CtxCallbackError):
    """Bad command-line input (a missing directory, no checkpoints, nothing to plot); exit code 2."""
