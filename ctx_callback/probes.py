"""Counterfactual probes: the schema, validation, and loaders for built-in suites and public formats.

A probe is one knowledge conflict: a ``context`` that contradicts a fact the model is expected to know,
a ``question`` about that fact, the ``counterfactual_answer`` the context states and the
``parametric_answer`` the model knows. Each probe also yields two controls: a *closed-book* variant
(no context: does the model know the fact?) and an *aligned* variant (the context states the true fact).

A *multiple-choice* probe also carries ``options`` (two or more answer texts, FaithEval and ConflictBank style): the
counterfactual (context-supported) answer is one of them, the parametric answer is another one or unknown (``None``).
Every option's text is scored as the answer (by default the options are not shown in the prompt; ``list_options``
lists them under the question, see :attr:`Probe.prompt_question`); see "Multiple-choice probes" in the README.

Everything that can be wrong with a probe is checked when it is loaded, so a bad file fails before any
training starts, with the file, the line (or probe id) and the field in the message.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import ConfigurationError, ProbeFormatError, ProbeSourceError, quote_error
from .matching import answers_overlap, normalize_answer
from .presets import PRESET_DIR_ENV, PROBE_PRESETS, preset_location
from .probe_formats import PROBE_FORMATS, convert_record, detect_format

__all__ = [
    "BUILTIN_SUITES",
    "EXTRA_SUITES",
    "OPTION_LABELS",
    "Probe",
    "ProbeFormatError",
    "load_probes",
    "probes_from_records",
]

#: Names of the suites shipped inside the package (``ctx_callback/data/<name>.jsonl``).
BUILTIN_SUITES: tuple[str, ...] = ("world_facts", "biographies", "quotes")
#: Suites shipped inside the package but not part of ``"all"``: ``conflicts_hard`` (harder conflicts: strongly known
#: facts, distractor sentences, one-step inference; see the README's "Which monitor?"). ``"all"`` stays the three
#: suites above, so numbers published on it do not move.
EXTRA_SUITES: tuple[str, ...] = ("conflicts_hard",)
#: Aliases that expand to several built-in suites.
_SUITE_GROUPS = {"all": BUILTIN_SUITES, "default": BUILTIN_SUITES}
_SHIPPED = BUILTIN_SUITES + EXTRA_SUITES

_REQUIRED_FIELDS = ("context", "question", "counterfactual_answer", "parametric_answer")

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


def _where(source: str, line: int | None, probe_id: str | None) -> str:
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


def _validated_probe(record: Mapping[str, Any], *, source: str, line: int | None, default_id: str) -> Probe:
    if not isinstance(record, Mapping):
        raise ProbeFormatError(f"{_where(source, line, None)}: expected a JSON object, got {type(record).__name__}.")
    raw_id = record.get("id", default_id)
    if raw_id is None:
        raw_id = default_id
    if not isinstance(raw_id, (str, int)):
        raise ProbeFormatError(f"{_where(source, line, None)}: field 'id' must be a string, got {raw_id!r}.")
    probe_id = str(raw_id)
    where = _where(source, line, probe_id)
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


def probes_from_records(
    records: Iterable[Any],
    *,
    format: str | None = None,
    column_mapping: Mapping[str, str] | None = None,
    source: str = "<records>",
    line_numbers: Sequence[int] | None = None,
    id_prefix: str | None = None,
) -> list[Probe]:
    """Validate dict records (native or a public format) into :class:`Probe` objects.

    Args:
        records: Iterable of mappings (or :class:`Probe` objects, passed through).
        format: One of ``"ctx_callback"``, ``"paper"``, ``"nq_swap"``, ``"memotrap"``, ``"columns"``;
            ``None`` detects it from the first record's fields.
        column_mapping: For ``format="columns"``: ``{native_field: column}``, e.g.
            ``{"context": "passage", "question": "q", "counterfactual_answer": "new", "parametric_answer": "old"}``.
        source: Name used in error messages (a file path, a dataset id).
        line_numbers: Line number of each record in ``source`` (for JSONL files), used in error messages.
        id_prefix: Prefix for generated ids of records without an ``id`` (defaults to ``source``'s stem).

    Raises:
        ProbeFormatError: On the first invalid record, naming the source, line/probe id and field.
    """
    if format is not None and format not in PROBE_FORMATS:
        raise ConfigurationError(
            f"Unknown probe format {format!r}; expected one of {list(PROBE_FORMATS)} or None (auto-detect)."
        )
    if (format is not None and PROBE_FORMATS[format].needs_column_mapping) or column_mapping is not None:
        if not column_mapping:
            raise ConfigurationError("format='columns' needs column_mapping={native_field: column_name}.")
        unknown = set(column_mapping) - {
            "id", "family", "context", "question", "counterfactual_answer", "parametric_answer", "aligned_context",
            "counterfactual_aliases", "parametric_aliases", "options", "list_options",
        }
        if unknown:
            raise ConfigurationError(f"column_mapping has unknown target fields {sorted(unknown)}.")
        required = [key for key in _REQUIRED_FIELDS if key != "parametric_answer" or "options" not in column_mapping]
        missing = [key for key in required if key not in column_mapping]
        if missing:
            raise ConfigurationError(f"column_mapping must map the required fields {missing}.")
        format = "columns"
    prefix = id_prefix or Path(source).stem or "probe"
    probes: list[Probe] = []
    seen: dict[str, str] = {}
    fmt = format
    for index, record in enumerate(records):
        line = line_numbers[index] if line_numbers is not None else None
        if isinstance(record, Probe):
            probe = record
        else:
            record_id = str(record.get("id")) if isinstance(record, Mapping) and "id" in record else None
            where = _where(source, line, record_id)
            if not isinstance(record, Mapping):
                raise ProbeFormatError(f"{where}: expected a JSON object, got {type(record).__name__}.")
            if fmt is None:
                try:
                    fmt = detect_format(record)
                except ProbeFormatError as err:
                    raise ProbeFormatError(f"{where}: {err}") from None
            native = dict(convert_record(record, fmt, where, column_mapping))
            probe = _validated_probe(native, source=source, line=line, default_id=f"{prefix}/{index}")
        if probe.id in seen:
            raise ProbeFormatError(
                f"{_where(source, line, probe.id)}: duplicate probe id (first seen at {seen[probe.id]})."
            )
        seen[probe.id] = f"line {line}" if line is not None else f"record {index}"
        probes.append(probe)
    return probes


# --------------------------------------------------------------------------------------------------------------
# Files, built-in suites, Hub datasets
# --------------------------------------------------------------------------------------------------------------


def _read_json_file(path: Path) -> tuple[list[Any], list[int] | None]:
    text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not part of the JSON
    stripped = text.lstrip()
    if path.suffix == ".json" or stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ProbeFormatError(f"{path}, line {err.lineno}: malformed JSON: {err.msg}.") from None
        if isinstance(data, Mapping):
            # {"data": [...]} or {"probes": [...]} wrappers
            for key in ("probes", "data", "examples"):
                if isinstance(data.get(key), list):
                    data = data[key]
                    break
        if not isinstance(data, list):
            raise ProbeFormatError(f"{path}: expected a JSON array of probe objects (or JSON Lines).")
        return data, None
    records, lines = [], []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            records.append(json.loads(raw))
        except json.JSONDecodeError as err:
            raise ProbeFormatError(
                f"{path}, line {number}: malformed JSON line: {err.msg} (column {err.colno})."
            ) from None
        lines.append(number)
    return records, lines


def _is_dataset_folder(path: Path) -> bool:
    """Whether a folder without JSON files holds a dataset ``datasets.load_dataset`` reads (a Hub snapshot)."""
    if (path / "README.md").is_file():
        return True
    return any(path.rglob(f"*.{ext}") for ext in ("parquet", "csv", "arrow"))


def _builtin_path(name: str) -> Path:
    return Path(str(resources.files("ctx_callback") / "data" / f"{name}.jsonl"))


def _load_builtin(name: str) -> list[Probe]:
    path = _builtin_path(name)
    records, lines = _read_json_file(path)
    return probes_from_records(records, format="ctx_callback", source=str(path), line_numbers=lines)


def _hub_probes(text: str, format: str | None, column_mapping: Mapping[str, str] | None, split: str | None,
                config: str | None, kwargs: Mapping[str, Any]) -> list[Probe]:
    try:
        records, name = _load_hub(text, split=split, config=config, **kwargs)
    except Exception as err:  # noqa: BLE001 - re-raised with the options spelled out
        raise ProbeSourceError(
            f"Could not load probes {text!r} as a dataset with datasets.load_dataset ({type(err).__name__}: "
            f"{err}). Built-in suites: {list(BUILTIN_SUITES)} (or 'all'); local files: .json/.jsonl paths."
        ) from err
    prefix = text.rstrip("/").split("/")[-1]
    return probes_from_records(records, format=format, column_mapping=column_mapping, source=name, id_prefix=prefix)



def _load_preset(name: str, split: str | None, config: str | None, kwargs: Mapping[str, Any]) -> list[Probe]:
    """The probes of the preset ``name`` (see :mod:`ctx_callback.presets`), through ``datasets.load_dataset``."""
    preset = PROBE_PRESETS[name]
    location = preset_location(preset)
    split = split or preset.split
    config = config if config is not None else preset.config
    try:
        records, _ = _load_hub(location, split=split, config=config, **kwargs)
    except Exception as err:  # noqa: BLE001 - one line saying what failed and how to go on without the Hub
        raise ProbeSourceError(
            f"Probe preset {name!r} needs the Hugging Face Hub: datasets.load_dataset({location!r}, split={split!r}) "
            f"failed ({type(err).__name__}: {quote_error(err, first_line=True)}). Without Hub access, download it "
            "elsewhere and use "
            f"load_probes(PATH, format={preset.format!r}, split={split!r}) on the snapshot folder, or put the snapshot "
            f"at ${PRESET_DIR_ENV}/{preset.hub_id}."
        ) from err
    return probes_from_records(records, format=preset.format, column_mapping=preset.column_mapping,
                               source=f"{name} ({preset.hub_id}[{split}])", id_prefix=name)


def _load_hub(dataset_id: str, *, split: str | None, config: str | None, **kwargs: Any) -> tuple[list[Any], str]:
    """Load a dataset from the Hugging Face Hub (or any ``datasets.load_dataset`` source)."""
    import datasets

    dataset = datasets.load_dataset(dataset_id, config, split=split or "train", **kwargs)
    return [dict(row) for row in dataset], f"{dataset_id}[{split or 'train'}]"


def load_probes(
    source: str | os.PathLike | Sequence[Any] | Any = "default",
    *,
    format: str | None = None,
    column_mapping: Mapping[str, str] | None = None,
    families: Sequence[str] | None = None,
    limit_per_family: int | None = None,
    split: str | None = None,
    config: str | None = None,
    from_hub: bool = False,
    **load_dataset_kwargs: Any,
) -> list[Probe]:
    """Load and validate counterfactual probes.

    Args:
        source: What to load:

            - a built-in suite name (``"world_facts"``, ``"biographies"``, ``"quotes"``), ``"all"``/``"default"``
              for these three, ``"conflicts_hard"`` (harder, shipped, not in ``"all"``), a preset of a public
              benchmark (``"nq_swap"``, ``"memotrap"``, ``"faitheval_counterfactual"``, ``"conflictbank"``, ...
              :data:`~ctx_callback.presets.PROBE_PRESETS`:
              loaded from the Hub with its own id, split and format; ``split``/``config`` override its defaults), or a
              ``"+"``-joined list such as ``"world_facts+quotes"`` or ``"nq_swap+all"``;
            - a path to a ``.json`` (array) or ``.jsonl`` file, in the native format or a public one
              (the paper's released files, NQ-Swap, MemoTrap), or a directory of such files;
            - a Hub dataset id (anything ``datasets.load_dataset`` accepts), loaded with ``split``
              (default ``"train"``);
            - a ``datasets.Dataset``, a list of dicts, or a list of :class:`Probe`.
        format: Force a format (``"ctx_callback"``, ``"paper"``, ``"nq_swap"``, ``"memotrap"``, ``"columns"``);
            by default it is detected from the first record.
        column_mapping: ``{native_field: column}`` for datasets in another layout (implies ``format="columns"``).
        families: Keep only these families.
        limit_per_family: Keep at most this many probes per family, spread evenly over the family (deterministic).
        split: Dataset split for Hub datasets.
        config: Dataset configuration name for Hub datasets.
        from_hub: Always load ``source`` with ``datasets.load_dataset`` (also for local dataset folders and
            dataset scripts); by default only strings that are neither suites nor existing paths go there.
        **load_dataset_kwargs: Passed to ``datasets.load_dataset`` (e.g. ``revision=``); ``trust_remote_code`` is
            refused: probe data never executes code.

    Returns:
        The validated probes, in source order.

    Warns:
        UserWarning: Once per call, listing the probes whose counterfactual and parametric answers (or aliases)
            contain each other after normalization ("York" / "New York"); they load and score, see
            :func:`ctx_callback.matching.match_answers`. Filter it with ``warnings.filterwarnings``.

    Raises:
        ProbeFormatError: A record is invalid (the message names the file, line or probe id, and field).
        ProbeSourceError: ``source`` is not a suite name, an existing path or a loadable dataset; a preset that
            cannot be loaded (offline: the message says how to use a local copy).
        ConfigurationError: An unknown ``format``, a bad ``column_mapping``, unknown ``families``.
    """
    if "trust_remote_code" in load_dataset_kwargs:
        raise ConfigurationError(
            "load_probes never runs code from a dataset: remove trust_remote_code= (probe datasets must be plain "
            "data files: JSON, JSON Lines, CSV or Parquet)."
        )
    probes: list[Probe]
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        path = Path(text).expanduser()
        names = tuple(dict.fromkeys(n for part in text.split("+") for n in _SUITE_GROUPS.get(part, (part,))))
        if from_hub:
            probes = _hub_probes(text, format, column_mapping, split, config, load_dataset_kwargs)
        elif all(name in _SHIPPED or name in PROBE_PRESETS for name in names) and not path.exists():
            if format is not None or column_mapping is not None:
                raise ConfigurationError(
                    f"{text!r} names built-in suites or presets, which know their own format; drop format= and "
                    "column_mapping= (they are for files and Hub ids)."
                )
            probes = []
            for name in names:
                if name in _SHIPPED:
                    probes.extend(_load_builtin(name))
                else:
                    probes.extend(_load_preset(name, split, config, load_dataset_kwargs))
            _check_unique(probes, text)
        elif path.is_dir():
            files = sorted([*path.glob("*.jsonl"), *path.glob("*.json")])
            if not files and _is_dataset_folder(path):  # a Hub snapshot (Parquet, CSV, a README with configs)
                probes = _hub_probes(text, format, column_mapping, split, config, load_dataset_kwargs)
            elif not files:
                raise ProbeSourceError(f"Probe directory {path} contains no .json or .jsonl files.")
            else:
                probes = []
            for file in files:
                records, lines = _read_json_file(file)
                probes.extend(
                    probes_from_records(records, format=format, column_mapping=column_mapping, source=str(file),
                                        line_numbers=lines)
                )
            _check_unique(probes, str(path))
        elif path.is_file():
            records, lines = _read_json_file(path)
            probes = probes_from_records(
                records, format=format, column_mapping=column_mapping, source=str(path), line_numbers=lines
            )
        elif path.suffix in (".json", ".jsonl") or text.startswith((".", "/", "~")):
            raise ProbeSourceError(f"Probe file {text!r} does not exist.")
        elif "/" in text:
            probes = _hub_probes(text, format, column_mapping, split, config, load_dataset_kwargs)
        else:
            raise ProbeSourceError(
                f"Unknown probe suite {text!r}. Built-in suites: {list(_SHIPPED)} ('all' = {list(BUILTIN_SUITES)}); "
                f"presets of public "
                f"datasets: {list(PROBE_PRESETS)}; or pass a path to a .json/.jsonl file, or a Hub dataset id such as "
                "'org/name'."
            )
    else:
        rows: Any = source
        if hasattr(rows, "column_names") and hasattr(rows, "__getitem__"):  # datasets.Dataset
            items: list[Any] = [dict(row) for row in rows]
        else:
            items = list(rows)
        probes = probes_from_records(items, format=format, column_mapping=column_mapping)

    if families is not None:
        wanted = set(families)
        available = {p.family for p in probes}
        unknown = wanted - available
        if unknown:
            raise ConfigurationError(f"families {sorted(unknown)} not found; available families: {sorted(available)}.")
        probes = [p for p in probes if p.family in wanted]
    if limit_per_family is not None:
        probes = _spread_per_family(probes, limit_per_family)
    if not probes:
        raise ProbeSourceError(f"No probes loaded from {source!r}.")
    _warn_overlapping_answers(probes, source)
    return probes


#: How many probe ids the overlapping-answers warning lists before "... and N more".
_MAX_LISTED_IDS = 10


def _warn_overlapping_answers(probes: Sequence[Probe], source: Any) -> None:
    """One ``UserWarning`` naming the probes whose two answers contain each other after normalization.

    Such a pair ("York" / "New York") is still scored: log-likelihood mode compares the answers' tokens as they are,
    and generation mode matches the longer answer first and does not count its words for the shorter one
    (:func:`ctx_callback.matching.match_answers`). But an output that names the longer answer can never count for
    the shorter one there, so the probe measures less than it seems: the warning lets the author check it.
    """
    ids = [p.id for p in probes if _answers_overlap(p)]
    if not ids:
        return
    listed = ", ".join(repr(i) for i in ids[:_MAX_LISTED_IDS])
    more = f" and {len(ids) - _MAX_LISTED_IDS} more" if len(ids) > _MAX_LISTED_IDS else ""
    where = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "the given records"
    warnings.warn(
        f"{len(ids)} probe(s) from {where} have a "
        f"counterfactual and a parametric answer (or alias) that contain each other after normalization: "
        f"{listed}{more}. Generation mode matches the longer answer first and does not count its words for the "
        "shorter one (an output 'New York' is no hit for 'York'); reword the answers if that is not what you mean.",
        UserWarning,
        stacklevel=3,
    )


def _answers_overlap(probe: Probe) -> bool:
    """Whether two of the probe's answer groups contain each other (for multiple choice: any two options)."""
    if probe.options:
        groups: list[tuple[str, ...]] = [(option,) for option in probe.options]
        groups[probe.counterfactual_index] += probe.counterfactual_aliases
        if probe.parametric_index is not None:
            groups[probe.parametric_index] += probe.parametric_aliases
    else:
        groups = [(probe.counterfactual_answer, *probe.counterfactual_aliases),
                  (probe.parametric_answer or "", *probe.parametric_aliases)]
    return any(answers_overlap(groups[i], groups[j]) for i in range(len(groups)) for j in range(i + 1, len(groups)))


def _check_unique(probes: Sequence[Probe], source: str) -> None:
    seen: set[str] = set()
    for probe in probes:
        if probe.id in seen:
            raise ProbeFormatError(f"{source}: duplicate probe id {probe.id!r} across files.")
        seen.add(probe.id)


def _spread_per_family(probes: Sequence[Probe], limit: int) -> list[Probe]:
    """Keep at most ``limit`` probes per family, evenly spread over the family (deterministic, source order)."""
    if limit < 1:
        raise ConfigurationError(f"limit_per_family must be >= 1, got {limit}.")
    by_family: dict[str, list[int]] = {}
    for index, probe in enumerate(probes):
        by_family.setdefault(probe.family, []).append(index)
    keep: set[int] = set()
    for indices in by_family.values():
        n = len(indices)
        if n <= limit:
            keep.update(indices)
        else:
            keep.update(indices[(i * n) // limit] for i in range(limit))
    return [probe for index, probe in enumerate(probes) if index in keep]
