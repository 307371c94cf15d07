"""Probe record formats: how a record in a public layout becomes a native probe record.

A format is one entry of :data:`PROBE_FORMATS` (a :class:`~ctx_callback.registry.Registry`), registered with
:func:`register_probe_format`: a name (what users pass as ``format=``), a converter from the dataset's record to the
native fields (``context``, ``question``, ``counterfactual_answer``, ``parametric_answer`` and optional ones, see
:class:`~ctx_callback.Probe`), and optionally a field test used to detect the format when the user passes none.
Detection tries the formats in registration order.

To add a format, add one decorated converter at the end of this file (see ``docs/extending.md``)::

    @register_probe_format("my_format", detect=lambda keys: {"passage", "fake", "true"} <= keys,
                           description="passage, q, fake, true")
    def _from_my_format(record, where, mapping):
        return {"context": record["passage"], "question": record["q"],
                "counterfactual_answer": record["fake"], "parametric_answer": record["true"]}

The native record is validated afterwards (missing or empty fields, identical answers; for a multiple-choice record
with ``options``: empty or duplicate options, an answer that is not an option), so a converter only maps fields and
raises :class:`~ctx_callback.errors.ProbeFormatError` (with ``where`` in the message) for what only it can check. Pure
Python, no torch.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ProbeFormatError
from .matching import normalize_answer
from .registry import Registry

__all__ = ["PROBE_FORMATS", "ProbeRecordFormat", "convert_record", "detect_format", "register_probe_format"]

#: ``fn(record, where, column_mapping) -> native record``; ``where`` names the source/line for error messages.
Converter = Callable[[Mapping[str, Any], str, Mapping[str, str]], Mapping[str, Any]]


@dataclass(frozen=True)
class ProbeRecordFormat:
    """One probe record format.

    Attributes:
        name: What users pass as ``load_probes(..., format=name)``.
        convert: ``fn(record, where, column_mapping) -> native record``.
        detect: ``fn(set_of_field_names) -> bool``: whether a record is in this format; ``None`` = never detected.
        needs_column_mapping: The format is driven by the user's ``column_mapping`` (``"columns"``).
        description: One line for documentation and error messages.
    """

    name: str
    convert: Converter
    detect: Callable[[set[str]], bool] | None = None
    needs_column_mapping: bool = False
    description: str = ""


#: Registered formats by name, in detection order.
PROBE_FORMATS: Registry[ProbeRecordFormat] = Registry(
    "probe format",
    unknown_message=lambda name, formats: (
        f"Unknown probe format {name!r}; expected one of {list(formats)} or None (auto-detect)."
    ),
)


def register_probe_format(
    name: str,
    *,
    detect: Callable[[set[str]], bool] | None = None,
    needs_column_mapping: bool = False,
    description: str = "",
) -> Callable[[Converter], Converter]:
    """Decorator: register ``fn(record, where, column_mapping) -> native record`` as the format ``name``.

    Raises:
        ConfigurationError: ``name`` is already registered.
    """
    return PROBE_FORMATS.decorator(
        name, lambda convert: ProbeRecordFormat(name, convert, detect, needs_column_mapping, description)
    )


def detect_format(record: Mapping[str, Any]) -> str:
    """The name of the first registered format whose field test accepts ``record``.

    Raises:
        ProbeFormatError: No format matches; the message lists the formats and how to map columns.
    """
    keys = set(record)
    for fmt in PROBE_FORMATS.values():
        if fmt.detect is not None and fmt.detect(keys):
            return fmt.name
    raise ProbeFormatError(
        f"cannot detect the probe format from fields {sorted(keys)}. Pass format= one of {list(PROBE_FORMATS)}, "
        "or format='columns' with column_mapping={'context': ..., 'question': ..., "
        "'counterfactual_answer': ..., 'parametric_answer': ...}."
    )


def convert_record(record: Any, fmt: str, where: str, column_mapping: Mapping[str, str] | None) -> Mapping[str, Any]:
    """Convert one record in format ``fmt`` into a native record (not yet validated)."""
    if not isinstance(record, Mapping):
        raise ProbeFormatError(f"{where}: expected a JSON object, got {type(record).__name__}.")
    return PROBE_FORMATS[fmt].convert(record, where, column_mapping or {})


# --------------------------------------------------------------------------------------------------------------
# The formats (detection order = registration order)
# --------------------------------------------------------------------------------------------------------------


@register_probe_format(
    "ctx_callback",
    detect=lambda keys: "counterfactual_answer" in keys and bool({"parametric_answer", "options"} & keys),
    description="native: id, family, context, question, counterfactual_answer, parametric_answer, options, ...",
)
def _from_native(record: Mapping[str, Any], where: str, mapping: Mapping[str, str]) -> Mapping[str, Any]:
    return record


def _split_answers(value: Any, key: str, where: str) -> tuple[Any, list[str]]:
    """NQ-Swap style answers may be a string or a list (first = answer, rest = aliases)."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ProbeFormatError(f"{where}: field {key!r} is an empty list.")
        return value[0], [v for v in value[1:] if isinstance(v, str)]
    return value, []


@register_probe_format(
    "nq_swap",
    detect=lambda keys: {"sub_context", "sub_answer"} <= keys,
    description="NQ-Swap: question, sub_context, sub_answer, org_answer, org_context (answers may be lists)",
)
def _from_nq_swap(record: Mapping[str, Any], where: str, mapping: Mapping[str, str]) -> dict[str, Any]:
    for key in ("question", "sub_context", "sub_answer", "org_answer"):
        if key not in record:
            raise ProbeFormatError(
                f"{where}: missing required NQ-Swap field {key!r} (fields present: {sorted(record)})."
            )
    cf, cf_alias = _split_answers(record["sub_answer"], "sub_answer", where)
    par, par_alias = _split_answers(record["org_answer"], "org_answer", where)
    return {
        "id": record.get("id"),
        "family": "nq_swap",
        "context": record["sub_context"],
        "aligned_context": record.get("org_context"),
        "question": record["question"],
        "counterfactual_answer": cf,
        "parametric_answer": par,
        "counterfactual_aliases": cf_alias,
        "parametric_aliases": par_alias,
    }


_MEMOTRAP_SPLIT = re.compile(r"^(.*?:)\s*(.+)$", re.DOTALL)


@register_probe_format(
    "memotrap",
    detect=lambda keys: {"prompt", "classes", "answer_index"} <= keys,
    description="MemoTrap: prompt (instruction: text to continue), classes (two endings), answer_index",
)
def _from_memotrap(record: Mapping[str, Any], where: str, mapping: Mapping[str, str]) -> dict[str, Any]:
    for key in ("prompt", "classes", "answer_index"):
        if key not in record:
            raise ProbeFormatError(
                f"{where}: missing required MemoTrap field {key!r} (fields present: {sorted(record)})."
            )
    classes, index = record["classes"], record["answer_index"]
    if isinstance(classes, str):
        try:
            classes = json.loads(classes.replace("'", '"'))
        except json.JSONDecodeError as err:
            raise ProbeFormatError(f"{where}: field 'classes' is not a list: {classes!r}.") from err
    if not isinstance(classes, (list, tuple)) or len(classes) != 2:
        raise ProbeFormatError(f"{where}: field 'classes' must be a list of two continuations, got {classes!r}.")
    if not isinstance(index, int) or index not in (0, 1):
        raise ProbeFormatError(f"{where}: field 'answer_index' must be 0 or 1, got {index!r}.")
    prompt = record["prompt"]
    if not isinstance(prompt, str):
        raise ProbeFormatError(f"{where}: field 'prompt' must be a string, got {type(prompt).__name__}.")
    match = _MEMOTRAP_SPLIT.match(prompt.strip())
    if match is None:
        raise ProbeFormatError(
            f"{where}: MemoTrap prompt {prompt!r} has no ':' separating the instruction from the text to continue."
        )

    def clean(answer: Any) -> Any:
        return answer.strip().rstrip(".!?,;") if isinstance(answer, str) else answer

    return {
        "id": record.get("id"),
        "family": "memotrap",
        "context": match.group(1),
        "question": match.group(2).strip(),
        "counterfactual_answer": clean(classes[index]),
        "parametric_answer": clean(classes[1 - index]),
        # An instruction about the answer applies to any question: never lent as an irrelevant passage.
        "metadata": {"context_kind": "instruction"},
    }


@register_probe_format(
    "paper",
    detect=lambda keys: "answer" in keys and ("memory_answer" in keys or "parametric_answer" in keys),
    description="the paper's released files: context, question, answer, memory_answer (or parametric_answer)",
)
def _from_paper(record: Mapping[str, Any], where: str, mapping: Mapping[str, str]) -> dict[str, Any]:
    par_key = "memory_answer" if "memory_answer" in record else "parametric_answer"
    if par_key not in record:
        raise ProbeFormatError(f"{where}: missing required field 'memory_answer' (or 'parametric_answer').")
    cf, cf_alias = _split_answers(record.get("answer"), "answer", where)
    par, par_alias = _split_answers(record.get(par_key), par_key, where)
    if "answer" not in record:
        raise ProbeFormatError(f"{where}: missing required field 'answer'.")
    return {
        "id": record.get("id"),
        "family": record.get("family") or record.get("source") or "paper",
        "context": record.get("context"),
        "question": record.get("question"),
        "counterfactual_answer": cf,
        "parametric_answer": par,
        "counterfactual_aliases": cf_alias,
        "parametric_aliases": par_alias,
    }


@register_probe_format(
    "columns",
    needs_column_mapping=True,
    description="any layout, with column_mapping={native_field: column}",
)
def _from_columns(record: Mapping[str, Any], where: str, mapping: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for target, column in mapping.items():
        if column not in record:
            raise ProbeFormatError(
                f"{where}: column {column!r} (mapped to {target!r}) is missing; columns present: {sorted(record)}."
            )
        value = record[column]
        if target in ("counterfactual_answer", "parametric_answer"):
            value, aliases = _split_answers(value, column, where)
            alias_key = target.replace("_answer", "_aliases")
            out.setdefault(alias_key, aliases)
        out[target] = value
    for key in ("id", "family"):
        if key not in out and key in record:
            out[key] = record[key]
    return out


# -- multiple choice -----------------------------------------------------------------------------------------------


def _require_fields(record: Mapping[str, Any], keys: tuple[str, ...], dataset: str, where: str) -> None:
    for key in keys:
        if key not in record or record[key] is None:
            raise ProbeFormatError(
                f"{where}: missing required {dataset} field {key!r} (fields present: {sorted(record)})."
            )


def _json_value(value: Any, key: str, where: str) -> Any:
    """A list/dict column that a CSV or JSON export stored as a JSON string."""
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError as err:
            raise ProbeFormatError(f"{where}: field {key!r} is not valid JSON: {value!r}.") from err
    return value


@register_probe_format(
    "faitheval",
    detect=lambda keys: {"choices", "answerKey", "context", "question"} <= keys,
    description="FaithEval: id, question, context, choices {label, text}, answerKey (multiple choice, no parametric "
                "answer)",
)
def _from_faitheval(record: Mapping[str, Any], where: str, mapping: Mapping[str, str]) -> dict[str, Any]:
    _require_fields(record, ("question", "context", "choices", "answerKey"), "FaithEval", where)
    choices = _json_value(record["choices"], "choices", where)
    if not isinstance(choices, Mapping) or "label" not in choices or "text" not in choices:
        raise ProbeFormatError(
            f"{where}: field 'choices' must be an object with 'label' and 'text' lists, got {choices!r}."
        )
    labels, texts = list(choices["label"] or []), list(choices["text"] or [])
    if not texts:
        raise ProbeFormatError(f"{where}: field 'choices' has no options (empty 'text' list).")
    if len(labels) != len(texts):
        raise ProbeFormatError(
            f"{where}: field 'choices' has {len(labels)} labels for {len(texts)} texts; they must pair up."
        )
    key = str(record["answerKey"]).strip()
    labels = [str(label).strip() for label in labels]
    if key not in labels:
        raise ProbeFormatError(f"{where}: 'answerKey' {key!r} is not one of the choice labels {labels}.")
    return {
        "id": record.get("id"),
        "family": "faitheval_counterfactual",
        "context": record["context"],
        "question": record["question"],
        "counterfactual_answer": texts[labels.index(key)],
        "parametric_answer": None,
        "options": texts,
        "metadata": {"answerKey": key, "labels": labels},
    }


_OPTION_PREFIX = re.compile(r"^\(?([A-Z])[.):]\s+")


def _strip_option_labels(options: list[Any]) -> list[Any]:
    """``["A. Paris", "B. Lyon"]`` -> ``["Paris", "Lyon"]`` when every option carries its own letter, in order."""
    matches = [_OPTION_PREFIX.match(o) if isinstance(o, str) else None for o in options]
    if all(m is not None and m.group(1) == chr(ord("A") + i) for i, m in enumerate(matches)):
        return [o[m.end():] for o, m in zip(options, matches) if m is not None]
    return options


def _pick_option(value: Any, options: list[str], key: str, where: str) -> str:
    """An option named by an index, a letter (``"B"``, ``"B."``, ``"(B)"``), a labelled text or the text itself (case
    and spacing ignored, else equal after :func:`~ctx_callback.matching.normalize_answer`, as probes match answers to
    options)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value < len(options):
            return options[value]
    elif isinstance(value, str):
        text = value.strip()
        letter = text.strip("().: ")
        if len(letter) == 1 and "A" <= letter.upper() < chr(ord("A") + len(options)):
            return options[ord(letter.upper()) - ord("A")]
        match = _OPTION_PREFIX.match(text)
        if match is not None:
            text = text[match.end():]
        for option in options:
            if isinstance(option, str) and " ".join(option.lower().split()) == " ".join(text.lower().split()):
                return option
        normalized = normalize_answer(text)
        for option in options:
            if normalized and isinstance(option, str) and normalize_answer(option) == normalized:
                return option
    raise ProbeFormatError(
        f"{where}: field {key!r} ({value!r}) names none of the options {options} (expected an index, a letter or an "
        "option's text)."
    )


def _evidence(record: Mapping[str, Any], kind: str, where: str) -> Any:
    """The ``<kind>_conflict_*`` evidence column (one whose name contains ``evidence`` preferred)."""
    prefix = f"{kind}_conflict"
    columns = [key for key in record if str(key).startswith(prefix)]
    preferred = [key for key in columns if "evidence" in str(key)] or columns
    if not preferred:
        raise ProbeFormatError(
            f"{where}: no {kind}-conflict evidence column ({prefix}_*) among {sorted(record)}; pick the evidence kind "
            "with format='conflictbank' (misinformation), 'conflictbank_temporal' or 'conflictbank_semantic'."
        )
    value = _json_value(record[preferred[0]], preferred[0], where)
    if isinstance(value, (list, tuple)):
        value = "\n\n".join(str(v) for v in value if v)
    return value


def _from_conflictbank(record: Mapping[str, Any], where: str, kind: str, family: str) -> dict[str, Any]:
    _require_fields(record, ("question", "options", "correct_option", "replaced_option"), "ConflictBank", where)
    options = _json_value(record["options"], "options", where)
    if isinstance(options, Mapping):
        options = [options[k] for k in sorted(options)]
    if not isinstance(options, (list, tuple)):
        raise ProbeFormatError(f"{where}: field 'options' must be a list of answer strings, got {options!r}.")
    if not options:
        raise ProbeFormatError(f"{where}: field 'options' is empty.")
    options = _strip_option_labels(list(options))
    return {
        "id": record.get("id"),
        "family": family,
        "context": _evidence(record, kind, where),
        "question": record["question"],
        "counterfactual_answer": _pick_option(record["replaced_option"], options, "replaced_option", where),
        "parametric_answer": _pick_option(record["correct_option"], options, "correct_option", where),
        "options": options,
        "metadata": {"conflict": kind},
    }


_CB_KEYS = {"question", "options", "correct_option", "replaced_option"}


@register_probe_format(
    "conflictbank",
    detect=lambda keys: _CB_KEYS <= keys,
    description="ConflictBank QA: question, options, correct_option, replaced_option; context = the "
                "misinformation_conflict_* evidence (multiple choice)",
)
def _from_conflictbank_misinformation(record: Mapping[str, Any], where: str,
                                      mapping: Mapping[str, str]) -> dict[str, Any]:
    return _from_conflictbank(record, where, "misinformation", "conflictbank")


@register_probe_format(
    "conflictbank_temporal",
    description="ConflictBank QA with the temporal_conflict_* evidence as context",
)
def _from_conflictbank_temporal(record: Mapping[str, Any], where: str, mapping: Mapping[str, str]) -> dict[str, Any]:
    return _from_conflictbank(record, where, "temporal", "conflictbank_temporal")


@register_probe_format(
    "conflictbank_semantic",
    description="ConflictBank QA with the semantic_conflict_* evidence as context",
)
def _from_conflictbank_semantic(record: Mapping[str, Any], where: str, mapping: Mapping[str, str]) -> dict[str, Any]:
    return _from_conflictbank(record, where, "semantic", "conflictbank_semantic")
