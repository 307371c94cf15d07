"""Where probes come from: one loader per kind of source, chosen by a table.

:func:`read_probe_source` reads what :func:`ctx_callback.probes.load_probes` is given. The kinds of source, tried in
the order of :data:`SOURCE_KINDS` (the first whose test accepts the request loads it):

1. records: a ``datasets.Dataset``, a list of dicts or of :class:`~ctx_callback.probe_schema.Probe`;
2. a Hub dataset, with ``from_hub=True`` (also for local dataset folders and dataset scripts);
3. built-in suites and presets: names such as ``"world_facts"``, ``"all"``, ``"nq_swap"``, ``"+"``-joined, when no
   file or folder of that name exists;
4. a local folder of ``.json``/``.jsonl`` files (or a Hub snapshot without them: through ``datasets.load_dataset``);
5. a local ``.json`` or ``.jsonl`` file;
6. a path that does not exist (a ``.json``/``.jsonl`` name, or one starting with ``.``, ``/`` or ``~``): an error;
7. a Hub dataset id (a name with a ``/``);
8. anything else: an error listing the suites and presets.

Each loader ends in :func:`~ctx_callback.probe_records.probes_from_records`. To add a kind of source, write its
loader and add a :class:`SourceKind` to the table where its test should be tried. Pure Python, no torch (``datasets``
is imported only to load a dataset).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import ConfigurationError, ProbeFormatError, ProbeSourceError, quote_error
from .presets import PRESET_DIR_ENV, PROBE_PRESETS, preset_location
from .probe_records import probes_from_records
from .probe_schema import Probe

__all__ = [
    "BUILTIN_SUITES",
    "EXTRA_SUITES",
    "SOURCE_KINDS",
    "SUITE_GROUPS",
    "ProbeRequest",
    "SourceKind",
    "read_json_file",
    "read_probe_source",
    "source_kind",
]

#: Names of the suites shipped inside the package (``ctx_callback/data/<name>.jsonl``).
BUILTIN_SUITES: tuple[str, ...] = ("world_facts", "biographies", "quotes")
#: Suites shipped inside the package but not part of ``"all"``: ``conflicts_hard`` (harder conflicts: strongly known
#: facts, distractor sentences, one-step inference; see "Which monitor?" in ``docs/stopping.md``). ``"all"`` stays
#: the three suites above, so numbers published on it do not move.
EXTRA_SUITES: tuple[str, ...] = ("conflicts_hard",)
#: Aliases that expand to several built-in suites.
SUITE_GROUPS: Mapping[str, tuple[str, ...]] = {"all": BUILTIN_SUITES, "default": BUILTIN_SUITES}
_SHIPPED = BUILTIN_SUITES + EXTRA_SUITES


@dataclass(frozen=True)
class ProbeRequest:
    """What :func:`~ctx_callback.probes.load_probes` was asked to read, with the options the loaders use.

    Attributes:
        source: A name, a path, a Hub id (``str`` or ``os.PathLike``), or records.
        format: The probe format to read records with (``None``: detect it).
        column_mapping: ``{native_field: column}`` for the ``"columns"`` format.
        split: The dataset split (Hub datasets and presets).
        config: The dataset configuration (Hub datasets and presets).
        from_hub: Load ``source`` with ``datasets.load_dataset`` whatever it looks like.
        load_dataset_kwargs: More keyword arguments for ``datasets.load_dataset``.
    """

    source: Any
    format: str | None = None
    column_mapping: Mapping[str, str] | None = None
    split: str | None = None
    config: str | None = None
    from_hub: bool = False
    load_dataset_kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_text(self) -> bool:
        """Whether the source is a name, a path or a Hub id (not records)."""
        return isinstance(self.source, (str, os.PathLike))

    @property
    def text(self) -> str:
        """The source as a string (only for :attr:`is_text` sources)."""
        return os.fspath(self.source)

    @property
    def path(self) -> Path:
        """The source as a local path (``~`` expanded)."""
        return Path(self.text).expanduser()

    @property
    def names(self) -> tuple[str, ...]:
        """The ``"+"``-separated names of the source, groups (``"all"``) expanded, each once, in order."""
        return tuple(dict.fromkeys(n for part in self.text.split("+") for n in SUITE_GROUPS.get(part, (part,))))


@dataclass(frozen=True)
class SourceKind:
    """One kind of probe source.

    Attributes:
        name: What it is (documentation).
        accepts: ``fn(request) -> bool``: whether the request is of this kind.
        load: ``fn(request) -> probes`` (or an error saying why the source cannot be read).
    """

    name: str
    accepts: Callable[[ProbeRequest], bool]
    load: Callable[[ProbeRequest], list[Probe]]


def source_kind(request: ProbeRequest) -> SourceKind:
    """The first kind in :data:`SOURCE_KINDS` that accepts ``request`` (the last one accepts everything)."""
    return next(kind for kind in SOURCE_KINDS if kind.accepts(request))


def read_probe_source(request: ProbeRequest) -> list[Probe]:
    """The probes of ``request.source``, read by its :func:`source_kind`.

    Raises:
        ProbeFormatError: A record is invalid.
        ProbeSourceError: The source does not exist or cannot be loaded.
        ConfigurationError: ``format``/``column_mapping`` for suites and presets; an unknown format or a bad mapping.
    """
    return source_kind(request).load(request)


# --------------------------------------------------------------------------------------------------------------
# The loaders, one per kind
# --------------------------------------------------------------------------------------------------------------


def _load_records(request: ProbeRequest) -> list[Probe]:
    """A ``datasets.Dataset``, or any iterable of dicts or probes."""
    rows: Any = request.source
    if hasattr(rows, "column_names") and hasattr(rows, "__getitem__"):  # datasets.Dataset
        items: list[Any] = [dict(row) for row in rows]
    else:
        items = list(rows)
    return probes_from_records(items, format=request.format, column_mapping=request.column_mapping)


def _names_suites_or_presets(request: ProbeRequest) -> bool:
    return all(name in _SHIPPED or name in PROBE_PRESETS for name in request.names) and not request.path.exists()


def _load_suites_and_presets(request: ProbeRequest) -> list[Probe]:
    """Built-in suites and presets, in the order named (ids unique across them)."""
    if request.format is not None or request.column_mapping is not None:
        raise ConfigurationError(
            f"{request.text!r} names built-in suites or presets, which know their own format; drop format= and "
            "column_mapping= (they are for files and Hub ids)."
        )
    probes: list[Probe] = []
    for name in request.names:
        if name in _SHIPPED:
            probes.extend(_load_builtin(name))
        else:
            probes.extend(_load_preset(name, request.split, request.config, request.load_dataset_kwargs))
    _check_unique(probes, request.text)
    return probes


def _load_folder(request: ProbeRequest) -> list[Probe]:
    """Every ``.jsonl`` then ``.json`` file of a folder, by name; a folder without them is read as a dataset."""
    path = request.path
    files = sorted([*path.glob("*.jsonl"), *path.glob("*.json")])
    probes: list[Probe] = []
    if not files and _is_dataset_folder(path):  # a Hub snapshot (Parquet, CSV, a README with configs)
        probes = _load_hub_dataset(request)
    elif not files:
        raise ProbeSourceError(f"Probe directory {path} contains no .json or .jsonl files (nor a dataset snapshot: "
                               "README.md, .parquet, .csv or .arrow files).")
    for file in files:
        records, lines = read_json_file(file)
        probes.extend(
            probes_from_records(records, format=request.format, column_mapping=request.column_mapping,
                                source=str(file), line_numbers=lines)
        )
    _check_unique(probes, str(path))
    return probes


def _load_file(request: ProbeRequest) -> list[Probe]:
    """One ``.json`` (array) or ``.jsonl`` file."""
    path = request.path
    records, lines = read_json_file(path)
    return probes_from_records(
        records, format=request.format, column_mapping=request.column_mapping, source=str(path), line_numbers=lines
    )


def _looks_like_a_path(request: ProbeRequest) -> bool:
    return request.path.suffix in (".json", ".jsonl") or request.text.startswith((".", "/", "~"))


def _refuse_missing_file(request: ProbeRequest) -> list[Probe]:
    raise ProbeSourceError(f"Probe file {request.text!r} does not exist.")


def _load_hub_dataset(request: ProbeRequest) -> list[Probe]:
    """A dataset ``datasets.load_dataset`` reads (a Hub id, a local dataset folder), ids prefixed by its last part."""
    text = request.text
    try:
        records, name = _load_hub(text, split=request.split, config=request.config, **request.load_dataset_kwargs)
    except Exception as err:  # noqa: BLE001 - re-raised with the options spelled out
        raise ProbeSourceError(
            f"Could not load probes {text!r} as a dataset with datasets.load_dataset ({type(err).__name__}: "
            f"{err}). Built-in suites: {list(BUILTIN_SUITES)} (or 'all'); local files: .json/.jsonl paths."
        ) from err
    prefix = text.rstrip("/").split("/")[-1]
    return probes_from_records(records, format=request.format, column_mapping=request.column_mapping, source=name,
                               id_prefix=prefix)


def _refuse_unknown_name(request: ProbeRequest) -> list[Probe]:
    raise ProbeSourceError(
        f"Unknown probe suite {request.text!r}. Built-in suites: {list(_SHIPPED)} ('all' = {list(BUILTIN_SUITES)}); "
        f"presets of public "
        f"datasets: {list(PROBE_PRESETS)}; or pass a path to a .json/.jsonl file, or a Hub dataset id such as "
        "'org/name'."
    )


#: The kinds of source, in the order they are tried (see the module docstring).
SOURCE_KINDS: tuple[SourceKind, ...] = (
    SourceKind("records", lambda request: not request.is_text, _load_records),
    SourceKind("Hub dataset (from_hub=True)", lambda request: request.from_hub, _load_hub_dataset),
    SourceKind("built-in suites and presets", _names_suites_or_presets, _load_suites_and_presets),
    SourceKind("local folder", lambda request: request.path.is_dir(), _load_folder),
    SourceKind("local file", lambda request: request.path.is_file(), _load_file),
    SourceKind("missing file", _looks_like_a_path, _refuse_missing_file),
    SourceKind("Hub dataset id", lambda request: "/" in request.text, _load_hub_dataset),
    SourceKind("unknown name", lambda request: True, _refuse_unknown_name),
)


# --------------------------------------------------------------------------------------------------------------
# Reading files, built-in suites, presets and Hub datasets
# --------------------------------------------------------------------------------------------------------------


def read_json_file(path: Path) -> tuple[list[Any], list[int] | None]:
    """The records of a ``.json`` file (an array, or an object wrapping one under ``probes``/``data``/``examples``)
    or a JSON Lines file, with each record's line number for JSON Lines (``None`` for JSON).

    Raises:
        ProbeFormatError: Malformed JSON (the message names the file and line), or JSON that is not an array.
    """
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
    return any(next(path.rglob(f"*.{ext}"), None) is not None for ext in ("parquet", "csv", "arrow"))


def _builtin_path(name: str) -> Path:
    return Path(str(resources.files("ctx_callback") / "data" / f"{name}.jsonl"))


def _load_builtin(name: str) -> list[Probe]:
    path = _builtin_path(name)
    records, lines = read_json_file(path)
    return probes_from_records(records, format="ctx_callback", source=str(path), line_numbers=lines)


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


def _check_unique(probes: Sequence[Probe], source: str) -> None:
    seen: set[str] = set()
    for probe in probes:
        if probe.id in seen:
            raise ProbeFormatError(f"{source}: duplicate probe id {probe.id!r} across files.")
        seen.add(probe.id)
