"""Reading the data to audit: load a dataset, find its format and columns, extract every example, hash every row.

:func:`load_audit_data` reads a ``datasets.Dataset``, a list of dicts, a data file or folder, or a Hub id;
:func:`prepare_examples` finds the format (:mod:`ctx_callback.audit.adapters`) and extracts every example's
``(context, question, answer)``; :func:`row_keys` hashes each row's content in the columns the audit reads
(:func:`key_columns`), so that audit records can be matched to rows by content. No tokenizer, no model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import AuditDataError, ConfigurationError
from .adapters import (
    AUDIT_FORMATS,
    AuditExample,
    detect_audit_format,
    extract_examples,
    number_text,
    resolve_columns,
)

__all__ = ["column_names", "key_columns", "load_audit_data", "prepare_examples", "row_keys"]

# The audit's logger: these records keep the name that users' logging configuration already knows.
logger = logging.getLogger("ctx_callback.audit.core")

_DATA_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_audit_data(source: Any, *, split: str = "train", name: str | None = None) -> Any:
    """The dataset to audit: a ``datasets.Dataset`` or list of dicts as given; a path; or a Hub dataset id.

    Args:
        source: A ``datasets.Dataset`` / list of dicts (returned as is), a ``.json``/``.jsonl``/``.csv``/``.parquet``
            file, a folder ``datasets.load_dataset`` can read, or a Hub dataset id.
        split: The split to read.
        name: The dataset configuration (Hub datasets with several).

    Raises:
        AuditDataError: A path that does not exist, an unreadable or empty file (no rows), a missing split, a Hub
            failure.
    """
    if not isinstance(source, (str, os.PathLike)):
        if isinstance(source, Mapping):
            raise AuditDataError("pass a datasets.Dataset or a list of records, not a dict (a DatasetDict? pick a "
                                 "split: dataset['train']).")
        return source
    import datasets

    path = Path(source).expanduser()
    try:
        if path.is_file():
            builder = _DATA_SUFFIXES.get(path.suffix.lower())
            if builder is None:
                raise AuditDataError(f"{path}: unknown data file type {path.suffix!r}; use one of "
                                     f"{sorted(_DATA_SUFFIXES)} or a dataset folder.")
            if _is_blank(path):
                raise AuditDataError(f"{path}: the file is empty, it has no rows: nothing to audit. Point to your "
                                     "training data file (one record per line for .jsonl).")
            no_rows = AuditDataError(f"{path}: the file has no rows (a header or an empty list only): nothing to "
                                     "audit. Point to your training data file.")
            try:
                data = datasets.load_dataset(builder, data_files=str(path), split="train")
            except ValueError as err:
                if "corresponds to no data" in str(err):  # datasets' words for a file without rows
                    raise no_rows from None
                raise
            if len(data) == 0:
                raise no_rows
            return data
        if path.exists() or str(source).startswith((".", "/", "~")):
            if not path.exists():
                raise AuditDataError(f"no such data file or folder: {path}")
            data = datasets.load_dataset(str(path), name, split=split)
        else:
            data = datasets.load_dataset(str(source), name, split=split)  # a Hub id
        if len(data) == 0:
            raise AuditDataError(f"the dataset {str(source)!r} (split {split!r}) has no rows: nothing to audit. Pick "
                                 "another split (CLI: --split) or dataset.")
        return data
    except AuditDataError:
        raise
    except Exception as err:  # noqa: BLE001 - any loader failure is bad input here
        raise AuditDataError(f"could not load the dataset {str(source)!r} (split {split!r}): "
                             f"{type(err).__name__}: {' '.join(str(err).split())[:400]}") from None


def _is_blank(path: Path) -> bool:
    """Whether a data file holds nothing but whitespace (the loaders fail on it with a bare ``StopIteration``)."""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return False
    return True


def _canonical(value: Any) -> Any:
    """A value as the row key hashes it: numbers as the audit reads them, ``None`` entries of mappings dropped (a
    ``datasets.Dataset`` fills the keys a record lacks with ``None``)."""
    value = number_text(value)
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items() if number_text(v) is not None}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def key_columns(format_name: str, columns: Mapping[str, str], column_names: Iterable[str]) -> list[str]:
    """The columns a row key hashes: those the format reads, every column for the ``"split"`` format.

    Args:
        format_name: The audit format (see :data:`~ctx_callback.audit.adapters.AUDIT_FORMATS`).
        columns: Role -> column, as :func:`prepare_examples` returns them.
        column_names: The dataset's columns (used by the ``"split"`` format, whose callable may read any).

    Returns:
        The column names, sorted.
    """
    return sorted(set(column_names) if format_name == "split" else set(columns.values()))


def row_keys(dataset: Any, columns: Sequence[str]) -> list[str]:
    """One short, stable hash per row of its content in ``columns``: what ``AuditResult.records[i]["row_key"]`` holds.

    The same row gives the same key wherever it sits (a shuffled dataset, a list of dicts or the ``datasets.Dataset``
    made from it: a column a record lacks counts as ``None``, numbers count as the audit reads them), so audit records
    can be matched to rows by content.

    Args:
        dataset: A ``datasets.Dataset`` or a list of dicts.
        columns: The columns to hash (see :func:`key_columns`).

    Returns:
        The keys, in dataset order.
    """
    names = list(columns)
    rows: Iterable[Any]
    if hasattr(dataset, "select_columns") and set(names) <= set(getattr(dataset, "column_names", ())):
        rows = dataset.select_columns(names)  # iterated in batches, only the hashed columns decoded
    else:
        rows = (dataset[i] for i in range(len(dataset)))
    keys = []
    for row in rows:
        values = {name: _canonical(row.get(name)) for name in names} if isinstance(row, Mapping) else _canonical(row)
        payload = json.dumps(values, sort_keys=True, default=str, ensure_ascii=False)
        keys.append(hashlib.sha1(payload.encode()).hexdigest()[:16])
    return keys


def column_names(rows: Any) -> list[str]:
    """The columns of a dataset, or the keys of a list of records in first-seen order."""
    names = getattr(rows, "column_names", None)
    if names is not None:
        return list(names)
    if len(rows) == 0:
        return []
    first = rows[0]
    if not isinstance(first, Mapping):
        raise AuditDataError(f"example 0 is a {type(first).__name__}, not a record (a mapping of columns).")
    keys: dict[str, None] = {}
    for row in rows:
        if isinstance(row, Mapping):
            keys.update(dict.fromkeys(row))
    return list(keys)


def prepare_examples(
    dataset: Any,
    *,
    data_format: str = "auto",
    fields: Mapping[str, str] | None = None,
    split: Callable[[Mapping[str, Any]], Any] | None = None,
    invalid: str = "error",
) -> tuple[list[AuditExample], list[tuple[int, str]], str, dict[str, str]]:
    """Find the format and extract every example's ``(context, question, answer)``; no tokenizer, no model.

    Returns:
        ``(examples, invalid_examples, format_name, columns)``.

    Raises:
        ConfigurationError: Unknown format, bad ``fields``, bad ``invalid``.
        AuditDataError: Empty dataset, missing columns (the message lists the existing ones), wrong types, empty
            targets (with ``invalid="error"``), a split callable returning the wrong shape.
    """
    if invalid not in ("error", "skip"):
        raise ConfigurationError(f"invalid must be 'error' or 'skip', got {invalid!r}.")
    if split is not None:
        if not callable(split):
            raise ConfigurationError(f"split must be a callable example -> (context, question, answer), got "
                                     f"{type(split).__name__}.")
        if data_format not in ("auto", "split"):
            raise ConfigurationError(f"split= is the 'split' format; it cannot be combined with data_format="
                                     f"{data_format!r}.")
        data_format = "split"
    if len(dataset) == 0:
        raise AuditDataError("the dataset is empty: nothing to audit.")
    names = column_names(dataset)
    if data_format == "auto":
        data_format = detect_audit_format(names)
    if data_format not in AUDIT_FORMATS:
        raise ConfigurationError(f"unknown data format {data_format!r}; choose from {list(AUDIT_FORMATS)} or 'auto' "
                                 "(register a new one with ctx_callback.audit.register_audit_format).")
    fmt = AUDIT_FORMATS[data_format]
    columns = resolve_columns(fmt, fields, names)
    examples, problems = extract_examples(dataset, fmt, columns, split=split)
    if problems and invalid == "error":
        listed = "; ".join(message for _, message in problems[:5])
        raise AuditDataError(
            f"{len(problems)} example(s) have an empty target: {listed}{' ...' if len(problems) > 5 else ''}. Fix "
            "or drop them, or pass invalid='skip' (CLI: --skip-invalid) to audit the rest (they are kept, "
            "categorised 'invalid')."
        )
    for _, message in problems:
        logger.warning("ctx_callback audit: skipping %s", message)
    if not examples:
        raise AuditDataError("no example with a non-empty target: nothing to audit.")
    return examples, problems, data_format, columns

