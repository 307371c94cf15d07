"""Where the context is: adapters from a training example to ``(context, question, answer)``.

An audit format is one entry of :data:`AUDIT_FORMATS` (a :class:`~ctx_callback.registry.Registry`), registered with
:func:`register_audit_format` (as probe formats are with :func:`~ctx_callback.probe_formats.register_probe_format`): a
name (what users pass as ``data_format=``), the columns it reads by *role* with their default names, a function
``split(example, columns) -> (context, question, answer)`` (``context`` is ``None`` for an example without one), the
prompt format its data is usually trained with, and a column test for auto-detection (formats are tried in
registration order). ``AUDIT_FORMATS.lookup(name)`` raises the "unknown data format" error with the known names.

Built-in formats:

- ``"alpaca"``: ``instruction`` (question), ``input`` (context; empty = no context), ``output`` (answer); rendered
  with the ``"alpaca"`` prompt preset by default (the Alpaca template, with its no-input variant);
- ``"qa"``: ``question``, ``answer`` and a ``context`` column (rename any of them with ``fields``);
- ``"prompt_completion"``: ``prompt``, ``completion`` and a ``context`` column; plain strings or TRL's conversational
  lists of messages. When the prompt contains the context verbatim, the question is the prompt without it;
- ``"messages"``: a conversational ``messages`` column (the last user turn and the assistant reply after it: the
  *scored exchange*). With a ``context`` column the question is the user turn without the context. Without one, the
  user turn is split at its *last* blank line: ``"passage\\n\\nquestion"`` gives ``("passage", "question")``, a user
  turn without a blank line is a question without context. A system turn at the start of the conversation is kept
  (:attr:`AuditExample.system`) and rendered in place of the chat template's default system prompt. Pass ``split=``
  when your turns are built differently;
- ``"split"``: a user callable ``split(example) -> (context_or_None, question, answer)`` (``split=`` argument).

Values: every role must be a string; numbers (``int`` and ``float``, not ``bool``) are accepted and converted with
``str``, an integral float without its ``.0`` (``1969.0`` -> ``"1969"``: CSV readers turn an integer column with a
gap into floats), a float NaN counts as missing (``None``).

Counterfactual augmentation (:func:`~ctx_callback.audit.augment_dataset`) rewrites a copy of a row with the format's
``rewrite`` function when it has one: ``"messages"`` and ``"prompt_completion"`` change only the context and the
answer of the scored exchange (the system turn, earlier turns and the question stay as they are). Formats without one
get the answer span replaced in every column they read.

To add a format, write one decorated function::

    @register_audit_format("my_format", columns={"context": "passage", "question": "q", "answer": "a"},
                           detect=lambda cols: {"passage", "q", "a"} <= cols)
    def _my_format(example, columns):
        return example[columns["context"]] or None, example[columns["question"]], example[columns["answer"]]

Pure Python, no torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import AuditDataError, ConfigurationError
from ..registry import Registry

__all__ = [
    "AUDIT_FORMATS",
    "AuditExample",
    "AuditFormat",
    "detect_audit_format",
    "extract_examples",
    "number_text",
    "register_audit_format",
    "resolve_columns",
]

#: ``split(example, columns) -> (context_or_None, question, answer)``; ``columns`` maps each role to a column name.
#: A registered format may return a fourth item, the example's own system prompt (or ``None``).
Splitter = Callable[[Mapping[str, Any], Mapping[str, str]], tuple[Any, ...]]

#: ``rewrite(example, columns, substitute) -> new row``: a copy of ``example`` with ``substitute(text)`` (the answer
#: span replaced, whole words) applied to the context and the answer the format reads, and nowhere else.
Rewriter = Callable[[Mapping[str, Any], Mapping[str, str], Callable[[str], str]], dict[str, Any]]


@dataclass(frozen=True)
class AuditExample:
    """One training example, reduced to what the audit scores.

    Attributes:
        index: Position in the dataset.
        context: The passage the answer may come from, or ``None`` (a parametric example).
        question: The instruction or question.
        answer: The training target (the assistant reply / ``output``).
        system: The example's own system prompt (the system turn of conversational data), rendered by the chat
            prompt format instead of the default one; ``None`` = the data has none for this example.
    """

    index: int
    context: str | None
    question: str
    answer: str
    system: str | None = None


@dataclass(frozen=True)
class AuditFormat:
    """One training-data layout.

    Attributes:
        name: What users pass as ``data_format=``.
        split: ``fn(example, columns) -> (context_or_None, question, answer)``.
        columns: Role -> default column name (``fields=`` overrides them).
        optional: Roles whose column may be absent from the dataset.
        detect: ``fn(set_of_column_names) -> bool`` for auto-detection; ``None`` = never detected.
        prompt_format: The prompt format this data is usually trained with (the default of ``prompt_format=None``).
        description: One line for documentation and error messages.
        rewrite: ``fn(example, columns, substitute) -> row`` for counterfactual augmentation (see :data:`Rewriter`);
            ``None`` = the answer span is replaced in every column the format reads.
    """

    name: str
    split: Splitter
    columns: Mapping[str, str] = field(default_factory=dict)
    optional: tuple[str, ...] = ()
    detect: Callable[[set[str]], bool] | None = None
    prompt_format: str = "chat"
    description: str = ""
    rewrite: Rewriter | None = None


#: Registered formats by name, in detection order.
AUDIT_FORMATS: Registry[AuditFormat] = Registry(
    "audit format",
    unknown_message=lambda name, formats: (
        f"unknown data format {name!r}; choose from {list(formats)} or 'auto' (register a new one with "
        "ctx_callback.audit.register_audit_format)."
    ),
)


def register_audit_format(
    name: str,
    *,
    columns: Mapping[str, str] | None = None,
    optional: Sequence[str] = (),
    detect: Callable[[set[str]], bool] | None = None,
    prompt_format: str = "chat",
    description: str = "",
    rewrite: Rewriter | None = None,
) -> Callable[[Splitter], Splitter]:
    """Decorator: register ``fn(example, columns) -> (context, question, answer)`` as the audit format ``name``.

    ``fn`` may return a fourth item, the example's own system prompt (``None`` for none).

    Args:
        name: What users pass as ``data_format=``.
        columns: Role -> default column name.
        optional: Roles whose column may be absent.
        detect: ``fn(set_of_column_names) -> bool`` for auto-detection.
        prompt_format: The prompt format this data is usually trained with.
        description: One line for documentation and error messages.
        rewrite: How counterfactual augmentation rewrites a row (see :data:`Rewriter`); default: the answer span is
            replaced in every column the format reads.

    Raises:
        ConfigurationError: ``name`` is already registered.
    """

    return AUDIT_FORMATS.decorator(name, lambda fn: AuditFormat(name, fn, dict(columns or {}), tuple(optional), detect,
                                                                prompt_format, description, rewrite))


def detect_audit_format(column_names: Iterable[str]) -> str:
    """The first registered format whose column test accepts ``column_names``.

    Raises:
        AuditDataError: No format matches; the message lists the columns and the formats.
    """
    cols = set(column_names)
    for fmt in AUDIT_FORMATS.values():
        if fmt.detect is not None and fmt.detect(cols):
            return fmt.name
    raise AuditDataError(
        f"cannot tell where the context is from the columns {sorted(cols)}. Pass data_format= one of "
        f"{list(AUDIT_FORMATS)} (CLI: --format) with fields={{role: column}} for renamed columns, e.g. "
        "data_format='qa', fields={'context': 'passage', 'question': 'query', 'answer': 'target'}; or pass "
        "split=fn(example) -> (context, question, answer)."
    )


def resolve_columns(fmt: AuditFormat, fields: Mapping[str, str] | None, column_names: Sequence[str]) -> dict[str, str]:
    """The column of each role: the format's defaults overridden by ``fields``, checked against the dataset.

    Raises:
        ConfigurationError: ``fields`` names a role the format does not have.
        AuditDataError: A required column is missing; the message lists the columns that exist.
    """
    fields = dict(fields or {})
    unknown = sorted(set(fields) - set(fmt.columns))
    if unknown and fmt.name != "split":
        raise ConfigurationError(
            f"fields= names role(s) {unknown} that format {fmt.name!r} does not have; its roles are "
            f"{sorted(fmt.columns)} (map each role to one of your columns, e.g. fields={{'context': 'passage'}})."
        )
    columns = {**fmt.columns, **fields}
    present = set(column_names)
    missing = [(role, col) for role, col in columns.items() if col not in present and role not in fmt.optional]
    if missing and fmt.name != "split":
        named = ", ".join(f"{role} -> {col!r}" for role, col in missing)
        raise AuditDataError(
            f"format {fmt.name!r}: column(s) not in the dataset: {named}. The dataset has the columns "
            f"{sorted(present)}. Map each role to an existing column with fields={{role: column}} (CLI: --field "
            "role=column), or pick another --format."
        )
    return {role: col for role, col in columns.items() if col in present or role not in fmt.optional}


# ----------------------------------------------------------------------------------------------------------------
# Extraction and validation
# ----------------------------------------------------------------------------------------------------------------


def _text(value: Any, index: int, role: str, column: str | None, *, allow_none: bool) -> str | None:
    where = (f"example {index}, field {column!r} ({role})" if column
             else f"example {index}, the {role} the split callable returned")
    value = number_text(value)
    if value is None:
        if allow_none:
            return None
        raise AuditDataError(f"{where} is missing (None); every example needs a {role}.")
    if not isinstance(value, str):
        raise AuditDataError(
            f"{where} must be a string or a number, got {type(value).__name__} ({str(value)[:60]!r}); fix the data "
            "or map the role to another column with fields={role: column}."
        )
    return value


def number_text(value: Any) -> Any:
    """A number as the audit reads it: ``int`` -> ``str(value)``, an integral float without ``.0``, NaN -> ``None``.

    Args:
        value: Any field value.

    Returns:
        The text of an ``int`` or ``float`` (never of a ``bool``); any other value unchanged.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value.is_integer():
            return str(int(value))
    return str(value)


def extract_examples(
    rows: Sequence[Mapping[str, Any]] | Any,
    fmt: AuditFormat,
    columns: Mapping[str, str],
    *,
    split: Callable[[Mapping[str, Any]], Any] | None = None,
) -> tuple[list[AuditExample], list[tuple[int, str]]]:
    """Apply a format to every row, validating as it goes (no tokenizer, no model).

    Args:
        rows: The dataset (anything indexable that yields mappings, e.g. a ``datasets.Dataset``).
        fmt: The format.
        columns: Role -> column (see :func:`resolve_columns`).
        split: The user callable of the ``"split"`` format.

    Returns:
        ``(examples, problems)``: every example that has a non-empty answer, and ``(index, message)`` for each that
        has an empty target (the caller raises or skips them).

    Raises:
        AuditDataError: A row is not a mapping, a field has the wrong type, or ``split`` returns something other
            than a ``(context, question, answer)`` tuple of strings (``context`` may be ``None``); the message names
            the example index and the field.
    """
    examples: list[AuditExample] = []
    problems: list[tuple[int, str]] = []
    for index in range(len(rows)):
        example = rows[index]
        if not isinstance(example, Mapping):
            raise AuditDataError(f"example {index} is a {type(example).__name__}, not a record (a mapping of columns).")
        if fmt.name == "split":
            if split is None:
                raise ConfigurationError("data_format='split' needs split=fn(example) -> (context, question, answer).")
            try:
                parts = split(example)
            except Exception as err:  # noqa: BLE001 - name the example; the user's code failed on it
                raise AuditDataError(
                    f"example {index}: the split callable raised {type(err).__name__}: {err}"
                ) from err
            if not isinstance(parts, (tuple, list)) or len(parts) != 3:
                shape = f"a {type(parts).__name__}" + (f" of length {len(parts)}" if isinstance(parts, (tuple, list))
                                                        else "")
                raise AuditDataError(
                    f"example {index}: the split callable returned {shape}; it must return a tuple "
                    "(context_or_None, question, answer) of strings."
                )
            raw = parts
            cols: tuple[str | None, ...] = (None, None, None)
        else:
            raw = fmt.split(example, columns)
            cols = (columns.get("context"), columns.get("question"), columns.get("answer"))
        context = _text(raw[0], index, "context", cols[0], allow_none=True)
        question = _text(raw[1], index, "question", cols[1], allow_none=False)
        answer = _text(raw[2], index, "answer", cols[2], allow_none=False)
        system = (_text(raw[3], index, "system prompt", columns.get("messages") or columns.get("question"),
                        allow_none=True) if len(raw) > 3 else None)
        assert question is not None and answer is not None  # allow_none=False
        if context is not None and not context.strip():
            context = None
        if not answer.strip():
            problems.append((index, f"example {index}: empty target (field {cols[2] or 'answer'!r})"))
            continue
        examples.append(AuditExample(index, context, question, answer, system))
    return examples, problems


# ----------------------------------------------------------------------------------------------------------------
# Built-in formats (detection order: the most specific first)
# ----------------------------------------------------------------------------------------------------------------


def _without(text: str, context: str) -> str:
    """``text`` with ``context`` removed and the separators around it trimmed (a prompt that embeds its context)."""
    if context and context in text:
        return re.sub(r"\n{3,}", "\n\n", text.replace(context, "", 1)).strip()
    return text


def _last_turn(messages: Any, role: str, where: str) -> tuple[int, str]:
    if not isinstance(messages, Sequence) or isinstance(messages, str):
        raise AuditDataError(f"{where} must be a list of messages ({{'role': ..., 'content': ...}}), got "
                             f"{type(messages).__name__}.")
    for position in range(len(messages) - 1, -1, -1):
        message = messages[position]
        if isinstance(message, Mapping) and message.get("role") == role:
            return position, message.get("content")  # type: ignore[return-value]
    roles = [m.get("role") for m in messages if isinstance(m, Mapping)]
    raise AuditDataError(f"{where} has no {role!r} turn (roles: {roles}).")


def _system_turn(messages: Sequence[Any]) -> Any:
    """The content of the conversation's system turn (its first message, as chat templates read it), or ``None``."""
    if len(messages) and isinstance(messages[0], Mapping) and messages[0].get("role") == "system":
        return messages[0].get("content")
    return None


def _scored_exchange(messages: Any, where: str) -> tuple[int, int]:
    """Positions of the scored exchange: the last assistant turn and the last user turn before it."""
    answer_at, _ = _last_turn(messages, "assistant", where)
    user_at, _ = _last_turn(list(messages)[:answer_at], "user", where)
    return user_at, answer_at


def _with_content(messages: Sequence[Any], position: int, content: Any) -> list[Any]:
    """A copy of ``messages`` (each turn a new dict) with the content of turn ``position`` replaced."""
    out = [dict(m) if isinstance(m, Mapping) else m for m in messages]
    out[position]["content"] = content
    return out


@register_audit_format(
    "alpaca", columns={"question": "instruction", "context": "input", "answer": "output"},
    detect=lambda cols: {"instruction", "output"} <= cols, prompt_format="alpaca", optional=("context",),
    description="instruction, input (the context; empty = none), output",
)
def _alpaca(example: Mapping[str, Any], columns: Mapping[str, str]) -> tuple[Any, Any, Any]:
    context = example.get(columns["context"]) if "context" in columns else None
    return context or None, example[columns["question"]], example[columns["answer"]]


def _rewrite_messages(example: Mapping[str, Any], columns: Mapping[str, str],
                      substitute: Callable[[str], str]) -> dict[str, Any]:
    """Only the scored exchange changes: the context (its column, or the user turn before its last blank line) and
    the assistant reply; the system turn, earlier turns and the question stay as they are."""
    row = dict(example)
    messages = example[columns["messages"]]
    user_at, answer_at = _scored_exchange(messages, f"field {columns['messages']!r}")
    user, answer = messages[user_at].get("content"), messages[answer_at].get("content")
    new_user = user
    context = example.get(columns["context"]) if "context" in columns else None
    if isinstance(context, str) and context.strip():
        new_context = substitute(context)
        row[columns["context"]] = new_context
        if isinstance(user, str):
            new_user = user.replace(context, new_context, 1)  # the user turn's copy of the context, if it has one
    elif isinstance(user, str):
        head, sep, tail = user.rpartition("\n\n")
        if sep and head.strip() and tail.strip():
            new_user = substitute(head) + sep + tail
    messages = _with_content(messages, user_at, new_user)
    row[columns["messages"]] = _with_content(messages, answer_at, substitute(answer) if isinstance(answer, str)
                                             else answer)
    return row


@register_audit_format(
    "messages", columns={"messages": "messages", "context": "context"}, optional=("context",),
    detect=lambda cols: "messages" in cols,
    description="messages (last user turn + the assistant reply after it), optional context column; without one "
                "the user turn splits at its last blank line",
    rewrite=_rewrite_messages,
)
def _messages(example: Mapping[str, Any], columns: Mapping[str, str]) -> tuple[Any, Any, Any, Any]:
    where = f"field {columns['messages']!r}"
    messages = example[columns["messages"]]
    user_at, answer_at = _scored_exchange(messages, where)
    user, answer = messages[user_at].get("content"), messages[answer_at].get("content")
    system = _system_turn(messages)
    if not isinstance(user, str):
        return None, user, answer, system  # reported as a wrong type by the caller
    if "context" in columns:
        context = example.get(columns["context"])
        if isinstance(context, str) and context.strip():
            return context, _without(user, context), answer, system
        return None, user, answer, system
    head, sep, tail = user.rpartition("\n\n")
    if sep and head.strip() and tail.strip():
        return head.strip(), tail.strip(), answer, system
    return None, user, answer, system


def _content(value: Any, role: str) -> Any:
    """A prompt/completion value: a string, or TRL's conversational list (the last ``role`` turn's content)."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return _last_turn(value, role, f"conversational {'prompt' if role == 'user' else 'completion'}")[1]
    return value


def _rewrite_last(value: Any, role: str, fn: Callable[[str], str]) -> Any:
    """``fn`` applied to a string, or to the content of the last ``role`` turn of a conversational list."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, Sequence):
        position, content = _last_turn(value, role, f"conversational {role} turns")
        return _with_content(value, position, fn(content) if isinstance(content, str) else content)
    return value


def _rewrite_prompt_completion(example: Mapping[str, Any], columns: Mapping[str, str],
                               substitute: Callable[[str], str]) -> dict[str, Any]:
    """The context column, the prompt's copy of it (in its last user turn) and the completion change; the system
    turn and the question stay as they are."""
    row = dict(example)
    context = example.get(columns["context"])
    if not (isinstance(context, str) and context.strip()):
        return row
    new_context = substitute(context)
    row[columns["context"]] = new_context
    row[columns["question"]] = _rewrite_last(example[columns["question"]], "user",
                                             lambda text: text.replace(context, new_context, 1))
    row[columns["answer"]] = _rewrite_last(example[columns["answer"]], "assistant", substitute)
    return row


@register_audit_format(
    "prompt_completion", columns={"question": "prompt", "answer": "completion", "context": "context"},
    detect=lambda cols: {"prompt", "completion", "context"} <= cols,
    description="prompt, completion (strings or TRL conversational lists) and a context column",
    rewrite=_rewrite_prompt_completion,
)
def _prompt_completion(example: Mapping[str, Any], columns: Mapping[str, str]) -> tuple[Any, Any, Any, Any]:
    raw_prompt = example[columns["question"]]
    prompt = _content(raw_prompt, "user")
    completion = _content(example[columns["answer"]], "assistant")
    context = example.get(columns["context"])
    system = _system_turn(raw_prompt) if isinstance(raw_prompt, Sequence) and not isinstance(raw_prompt, str) else None
    if isinstance(context, str) and context.strip() and isinstance(prompt, str):
        return context, _without(prompt, context), completion, system
    return context, prompt, completion, system


@register_audit_format(
    "qa", columns={"context": "context", "question": "question", "answer": "answer"},
    detect=lambda cols: {"question", "answer", "context"} <= cols,
    description="question, answer and a context column",
)
def _qa(example: Mapping[str, Any], columns: Mapping[str, str]) -> tuple[Any, Any, Any]:
    return example.get(columns["context"]), example[columns["question"]], example[columns["answer"]]


@register_audit_format("split", description="a user callable split(example) -> (context_or_None, question, answer)")
def _split(example: Mapping[str, Any], columns: Mapping[str, str]) -> tuple[Any, Any, Any]:  # pragma: no cover
    raise AssertionError("the 'split' format is applied by extract_examples with the user's callable")
