"""Records to probes: each record converted from its format (:mod:`ctx_callback.probe_formats`) and validated
(:mod:`ctx_callback.probe_schema`), with probe ids unique.

Every source :func:`ctx_callback.probes.load_probes` reads (a file, a suite, a preset, a Hub dataset, a list of dicts)
ends here, in :func:`probes_from_records`. Pure Python, no torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigurationError, ProbeFormatError
from .probe_formats import PROBE_FORMATS, convert_record, detect_format
from .probe_schema import REQUIRED_FIELDS, Probe, record_location, validated_probe

__all__ = ["probes_from_records"]

#: The native fields a ``column_mapping`` may map a column to.
MAPPABLE_FIELDS = frozenset({
    "id", "family", "context", "question", "counterfactual_answer", "parametric_answer", "aligned_context",
    "counterfactual_aliases", "parametric_aliases", "options", "list_options",
})


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
        format: A name in :data:`~ctx_callback.probe_formats.PROBE_FORMATS` (``"ctx_callback"``, ``"paper"``,
            ``"nq_swap"``, ``"memotrap"``, ``"columns"``, ...); ``None`` detects it from the first record's fields.
        column_mapping: For ``format="columns"``: ``{native_field: column}``, e.g.
            ``{"context": "passage", "question": "q", "counterfactual_answer": "new", "parametric_answer": "old"}``.
        source: Name used in error messages (a file path, a dataset id).
        line_numbers: Line number of each record in ``source`` (for JSONL files), used in error messages.
        id_prefix: Prefix for generated ids of records without an ``id`` (defaults to ``source``'s stem).

    Raises:
        ProbeFormatError: On the first invalid record, naming the source, line/probe id and field.
        ConfigurationError: An unknown ``format``, a bad ``column_mapping``.
    """
    fmt = _resolved_format(format, column_mapping)
    prefix = id_prefix or Path(source).stem or "probe"
    probes: list[Probe] = []
    seen: dict[str, str] = {}
    for index, record in enumerate(records):
        line = line_numbers[index] if line_numbers is not None else None
        if isinstance(record, Probe):
            probe = record
        else:
            record_id = str(record.get("id")) if isinstance(record, Mapping) and "id" in record else None
            where = record_location(source, line, record_id)
            if not isinstance(record, Mapping):
                raise ProbeFormatError(f"{where}: expected a JSON object, got {type(record).__name__}.")
            if fmt is None:
                try:
                    fmt = detect_format(record)
                except ProbeFormatError as err:
                    raise ProbeFormatError(f"{where}: {err}") from None
            native = dict(convert_record(record, fmt, where, column_mapping))
            probe = validated_probe(native, source=source, line=line, default_id=f"{prefix}/{index}")
        if probe.id in seen:
            raise ProbeFormatError(
                f"{record_location(source, line, probe.id)}: duplicate probe id (first seen at {seen[probe.id]})."
            )
        seen[probe.id] = f"line {line}" if line is not None else f"record {index}"
        probes.append(probe)
    return probes


def _resolved_format(format: str | None, column_mapping: Mapping[str, str] | None) -> str | None:
    """The format to convert records with: ``format`` (``None``: detect it per source), or ``"columns"`` when a
    ``column_mapping`` is given or the format needs one; the mapping checked against the native fields.

    Raises:
        ConfigurationError: An unknown format, a missing or empty mapping where one is needed, a mapping to an unknown
            field or one that leaves a required field unmapped.
    """
    needs_mapping = format is not None and PROBE_FORMATS.lookup(format).needs_column_mapping
    if needs_mapping or column_mapping is not None:
        if not column_mapping:
            raise ConfigurationError("format='columns' needs column_mapping={native_field: column_name}.")
        unknown = set(column_mapping) - MAPPABLE_FIELDS
        if unknown:
            raise ConfigurationError(f"column_mapping has unknown target fields {sorted(unknown)}.")
        required = [key for key in REQUIRED_FIELDS if key != "parametric_answer" or "options" not in column_mapping]
        missing = [key for key in required if key not in column_mapping]
        if missing:
            raise ConfigurationError(f"column_mapping must map the required fields {missing}.")
        return "columns"
    return format
