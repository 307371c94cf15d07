"""The probe schema: the :class:`Probe` dataclass and the validation of a native probe record.

A probe is one knowledge conflict: a ``context`` that contradicts a fact the model is expected to know,
a ``question`` about that fact, the ``counterfactual_answer`` the context states and the
``parametric_answer`` the model knows. Each probe also yields two controls: a *closed-book* variant
(no context: does the model know the fact?) and an *aligned* variant (the context states the true fact).

A *multiple-choice* probe also carries ``options`` (two or more answer texts, FaithEval and ConflictBank style): the
counterfactual (context-supported) answer is one of them, the parametric answer is another one or unknown (``None``).
Every option's text is scored as the answer (by default the options are not shown in the prompt; ``list_options``
lists them under the question, see :attr:`Probe.prompt_question`); see "Multiple-choice probes" in ``docs/probes.md``.

:func:`validated_probe` checks everything that can be wrong with a native record (missing or empty fields, identical
answers, bad options) and names the source, the line (or probe id) and the field in its message. Records in public
layouts are converted to native ones by :mod:`ctx_callback.probe_formats` first (see
:func:`ctx_callback.probes.probes_from_records`). Pure Python, no torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import ProbeFormatError
from .matching import normalize_answer

__all__ = ["OPTION_LABELS", "REQUIRED_FIELDS", "Probe", "record_location", "validated_probe"]

#: The fields every native record needs (``parametric_answer`` may be ``None`` for multiple choice).
REQUIRED_FIELDS = ("context", "question", "counterfactual_answer", "parametric_answer")

#: Labels of multiple-choice options in the prompt, by position (a probe has at most this many options).
OPTION_LABELS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

@dataclass(frozen=True)
class Probe:
    """One counterfactual probe: two answers, or N-way multiple choice.

    Attributes:
        id: Unique identifier within a probe set.
        family: Group used for per-family metrics (``world_facts``, ``biographies``, ``quotes``, ...).
        context: Passage (or instruction) that states the counterfactual answer.
        question: The question, or the text the model must continue.
        counterfactual_answer: The answer stated by ``context`` (for a multiple-choice probe: one of ``options``).
        parametric_answer: The answer the model knows from pre-training. For a multiple-choice probe: one of
            ``options``, or ``None`` when the dataset does not say which option is the true fact (FaithEval); then the
            metrics that need it (``parametric_accuracy``, ``closed_book_accuracy``, ``aligned_accuracy``,
            ``memorization_ratio``) skip the probe. Always a string for a two-answer probe.
        counterfactual_aliases: Other surface forms of the counterfactual answer (generation mode matching).
        parametric_aliases: Other surface forms of the parametric answer.
        aligned_context: The context rewritten to state the true fact. When ``None`` it is derived by replacing
            the counterfactual answer with the parametric one in ``context``; when that is impossible the aligned
            control is skipped for this probe.
        metadata: Free-form, JSON-serializable metadata.
        options: Multiple choice: every answer option, in the dataset's order (two or more, distinct after
            :func:`~ctx_callback.matching.normalize_answer`, the normalization generation mode matches answers with:
            ``oxygen`` and ``oxygen.`` are refused as one answer twice); empty for a two-answer probe. Each option's
            text is scored as the answer; ``counterfactual_answer`` / ``parametric_answer`` name an option under the
            same normalization.
        list_options: Multiple choice: show the options in the prompt, one lettered line each under the question
            (``A. ...``, ``B. ...``); ``False`` (default): the prompt is the question alone, as for two answers (see
            :attr:`prompt_question` for why).
    """

    id: str
    family: str
    context: str
    question: str
    counterfactual_answer: str
    parametric_answer: str | None
    counterfactual_aliases: tuple[str, ...] = ()
    parametric_aliases: tuple[str, ...] = ()
    aligned_context: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    options: tuple[str, ...] = ()
    list_options: bool = False

    @property
    def is_multiple_choice(self) -> bool:
        """Whether the probe carries answer options."""
        return bool(self.options)

    @property
    def answers(self) -> tuple[str, ...]:
        """The answers that are scored, in score order: the options, or ``(counterfactual, parametric)``."""
        if self.options:
            return self.options
        assert self.parametric_answer is not None  # validated: a two-answer probe has both answers
        return (self.counterfactual_answer, self.parametric_answer)

    @property
    def counterfactual_index(self) -> int:
        """Position of the counterfactual answer in :attr:`answers` (0 for a two-answer probe)."""
        return self.options.index(self.counterfactual_answer) if self.options else 0

    @property
    def parametric_index(self) -> int | None:
        """Position of the parametric answer in :attr:`answers` (1 for a two-answer probe), ``None`` when unknown."""
        if not self.options:
            return 1
        if self.parametric_answer is None:
            return None
        return self.options.index(self.parametric_answer)

    @property
    def prompt_question(self) -> str:
        """The question as the prompt shows it: :attr:`question`, followed by one lettered line per option when
        :attr:`list_options` is set (``"Which gas do plants absorb?\nA. oxygen\nB. carbon dioxide"``).

        Either way each option's *text* (never its letter) is scored as the answer. Not listing them is the default
        because a model that sees lettered options expects to answer with a letter, and the likelihood of the texts
        turns into noise for small models: on the ConflictBank fixture (tests/test_presets.py) SmolLM2-135M-Instruct
        preferred the true option closed-book for 4 of 5 questions unlisted, 1 of 5 listed (chance: 1.25).
        """
        if not self.options or not self.list_options:
            return self.question
        lines = [f"{OPTION_LABELS[i]}. {option}" for i, option in enumerate(self.options)]
        return "\n".join([self.question, *lines])

    @property
    def surface_forms(self) -> tuple[str, ...]:
        """Every answer text of the probe: its answers (or options) and both answers' aliases."""
        return (*self.answers, *self.counterfactual_aliases, *self.parametric_aliases)

    @property
    def relation(self) -> str | None:
        """``metadata["relation"]`` as a string (``"capital"``), or ``None`` when the metadata names none."""
        relation = self.metadata.get("relation") if self.metadata else None
        return None if relation in (None, "") else str(relation)

    def aligned(self) -> str | None:
        """The context stating the true fact, or ``None`` if it cannot be built (also when the parametric answer is
        unknown)."""
        if self.aligned_context is not None:
            return self.aligned_context
        if self.parametric_answer is None:
            return None
        if self.counterfactual_answer in self.context:
            return self.context.replace(self.counterfactual_answer, self.parametric_answer)
        return None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict in the native ``ctx_callback`` format (``options`` only for multiple choice)."""
        record = asdict(self)
        record["counterfactual_aliases"] = list(self.counterfactual_aliases)
        record["parametric_aliases"] = list(self.parametric_aliases)
        record["metadata"] = dict(self.metadata)
        if self.options:
            record["options"] = list(self.options)
        else:
            del record["options"]
            del record["list_options"]
        return record


# --------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------


def record_location(source: str, line: int | None, probe_id: str | None) -> str:
    """Where a record is, for error messages: ``"probes.jsonl, line 3, probe 'q1'"`` (the parts that are known)."""
    parts = [source]
    if line is not None:
        parts.append(f"line {line}")
    if probe_id is not None:
        parts.append(f"probe {probe_id!r}")
    return ", ".join(parts)


def _require_str(record: Mapping[str, Any], key: str, where: str, *, allow_empty: bool = False) -> str:
    if key not in record or record[key] is None:
        raise ProbeFormatError(f"{where}: missing required field {key!r} (fields present: {sorted(record)}).")
    value = record[key]
    if not isinstance(value, str):
        raise ProbeFormatError(
            f"{where}: field {key!r} must be a string, got {type(value).__name__} ({value!r})."
        )
    value = value.strip()
    if not value and not allow_empty:
        raise ProbeFormatError(f"{where}: field {key!r} is empty.")
    return value


def _aliases(record: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = record.get(key) or []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ProbeFormatError(f"{where}: field {key!r} must be a list of strings, got {type(value).__name__}.")
    out = []
    for alias in value:
        if not isinstance(alias, str):
            raise ProbeFormatError(f"{where}: field {key!r} must contain strings only, got {alias!r}.")
        if alias.strip():
            out.append(alias.strip())
    return tuple(out)


def _normalize(text: str) -> str:
    return " ".join(text.lower().split())


def _options(record: Mapping[str, Any], where: str) -> tuple[str, ...]:
    """The validated ``options`` of a multiple-choice record; ``()`` when the field is absent or ``None``."""
    value = record.get("options")
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ProbeFormatError(
            f"{where}: field 'options' must be a list of answer strings, got {type(value).__name__} ({value!r})."
        )
    if len(value) == 0:
        raise ProbeFormatError(
            f"{where}: field 'options' is empty; list the answer options (two or more, the counterfactual answer "
            "among them), or drop the field for a two-answer probe."
        )
    options = []
    for position, option in enumerate(value):
        if not isinstance(option, str) or not option.strip():
            raise ProbeFormatError(
                f"{where}: field 'options' must hold non-empty strings; option {position} is {option!r}."
            )
        options.append(option.strip())
    if len(options) < 2:
        raise ProbeFormatError(
            f"{where}: field 'options' has one option ({options[0]!r}); a multiple-choice probe needs two or more."
        )
    if len(options) > len(OPTION_LABELS):
        raise ProbeFormatError(f"{where}: field 'options' has {len(options)} options; at most {len(OPTION_LABELS)}.")
    seen: dict[str, int] = {}
    for position, option in enumerate(options):
        key = normalize_answer(option)  # the normalization generation mode matches answers with
        if key in seen:
            earlier = options[seen[key]]
            raise ProbeFormatError(
                f"{where}: field 'options' repeats {option!r} (options {seen[key]} and {position} are identical "
                f"after answer normalization: {earlier!r} and {option!r} both read as {key!r}, because case, accents, "
                "punctuation and articles are ignored when answers are matched); each option must be a different "
                "answer: remove one of them, or reword it."
            )
        seen[key] = position
    return tuple(options)


def _list_options(record: Mapping[str, Any], options: Sequence[str], where: str) -> bool:
    value = record.get("list_options", False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ProbeFormatError(f"{where}: field 'list_options' must be true or false, got {value!r}.")
    if value and not options:
        raise ProbeFormatError(f"{where}: field 'list_options' is true but the probe has no 'options' to list.")
    return value


def _option_named(options: Sequence[str], answer: str, key: str, where: str) -> str:
    """The option that ``answer`` names, as the option is written: the one equal to it with case and spacing ignored,
    else the one equal to it after :func:`~ctx_callback.matching.normalize_answer` (``"Oxygen."`` names ``oxygen``;
    the options are distinct under it, see :func:`_options`)."""
    for option in options:
        if _normalize(option) == _normalize(answer):
            return option
    normalized = normalize_answer(answer)
    for option in options:
        if normalized and normalize_answer(option) == normalized:
            return option
    raise ProbeFormatError(
        f"{where}: field {key!r} ({answer!r}) is not one of the options {list(options)}; a multiple-choice probe's "
        "answers must be options (fix the answer or the options)."
    )


def validated_probe(record: Mapping[str, Any], *, source: str, line: int | None, default_id: str) -> Probe:
    """The :class:`Probe` a native record describes, every field checked.

    Args:
        record: A native record (after conversion from its format).
        source: The file or dataset it comes from (error messages).
        line: Its line in ``source``, if known (error messages).
        default_id: Its id when the record has none.

    Raises:
        ProbeFormatError: A field is missing, empty or of the wrong type, the two answers are identical, or the
            options are invalid; the message names the source, line or probe id, and the field.
    """
    if not isinstance(record, Mapping):
        raise ProbeFormatError(
            f"{record_location(source, line, None)}: expected a JSON object, got {type(record).__name__}."
        )
    raw_id = record.get("id", default_id)
    if raw_id is None:
        raw_id = default_id
    if not isinstance(raw_id, (str, int)):
        raise ProbeFormatError(f"{record_location(source, line, None)}: field 'id' must be a string, got {raw_id!r}.")
    probe_id = str(raw_id)
    where = record_location(source, line, probe_id)
    family = record.get("family") or "default"
    if not isinstance(family, str):
        raise ProbeFormatError(f"{where}: field 'family' must be a string, got {family!r}.")
    context = _require_str(record, "context", where)
    question = _require_str(record, "question", where)
    cf = _require_str(record, "counterfactual_answer", where)
    options = _options(record, where)
    par: str | None
    if options and record.get("parametric_answer") is None:
        par = None  # multiple choice without a known true option (FaithEval)
    else:
        par = _require_str(record, "parametric_answer", where)
    if par is not None and _normalize(cf) == _normalize(par):
        raise ProbeFormatError(
            f"{where}: 'counterfactual_answer' and 'parametric_answer' are identical ({cf!r}); "
            "a probe needs two different answers to measure a conflict."
        )
    if options:
        named_cf = _option_named(options, cf, "counterfactual_answer", where)
        named_par = None if par is None else _option_named(options, par, "parametric_answer", where)
        if named_par is not None and named_cf == named_par:
            raise ProbeFormatError(
                f"{where}: 'counterfactual_answer' ({cf!r}) and 'parametric_answer' ({par!r}) name the same option "
                f"{named_cf!r} (answers are matched to options with case, accents, punctuation and articles "
                "ignored); a probe needs two different answers to measure a conflict."
            )
        cf, par = named_cf, named_par
    aligned = record.get("aligned_context")
    if aligned is not None:
        aligned = _require_str(record, "aligned_context", where)
    metadata = record.get("metadata") or {}
    if not isinstance(metadata, Mapping):
        raise ProbeFormatError(f"{where}: field 'metadata' must be an object, got {type(metadata).__name__}.")
    return Probe(
        id=probe_id,
        family=family.strip() or "default",
        context=context,
        question=question,
        counterfactual_answer=cf,
        parametric_answer=par,
        counterfactual_aliases=_aliases(record, "counterfactual_aliases", where),
        parametric_aliases=_aliases(record, "parametric_aliases", where),
        aligned_context=aligned,
        metadata=dict(metadata),
        options=options,
        list_options=_list_options(record, options, where),
    )

