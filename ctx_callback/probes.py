"""Counterfactual probes: :func:`load_probes`, the one entry point that reads, validates and selects them.

A probe is one knowledge conflict (a context that contradicts a known fact, a question, the counterfactual and the
parametric answer, optionally multiple-choice options): :class:`~ctx_callback.probe_schema.Probe` says what each
field means.

Everything that can be wrong with a probe is checked when it is loaded, so a bad file fails before any
training starts, with the file, the line (or probe id) and the field in the message.

The parts, in the order data flows through them (each name below is importable from here too):

- :mod:`ctx_callback.probe_sources`: where probes come from (suites, presets, files, folders, Hub datasets, records),
  one loader per kind of source, chosen by a table;
- :mod:`ctx_callback.probe_formats`: how a record in a public layout becomes a native record;
- :mod:`ctx_callback.probe_records`: :func:`probes_from_records`, records converted and validated into probes;
- :mod:`ctx_callback.probe_schema`: the :class:`Probe` dataclass and the validation of a native record;
- this module: :func:`load_probes` (the above, then ``families``, ``limit_per_family`` and the overlapping-answers
  warning).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import ConfigurationError, ProbeFormatError, ProbeSourceError
from .matching import answers_overlap
from .probe_records import probes_from_records
from .probe_schema import OPTION_LABELS, Probe
from .probe_sources import BUILTIN_SUITES, EXTRA_SUITES, ProbeRequest, read_probe_source

__all__ = [
    "BUILTIN_SUITES",
    "EXTRA_SUITES",
    "OPTION_LABELS",
    "Probe",
    "ProbeFormatError",
    "family_rings",
    "load_probes",
    "probes_from_records",
]


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
    request = ProbeRequest(source, format, column_mapping, split, config, from_hub, load_dataset_kwargs)
    probes = read_probe_source(request)
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


def family_rings(probes: Sequence[Probe]) -> list[list[int]]:
    """For each probe, the indices of the other probes of its family, starting after it in probe order and wrapping
    around (the order in which the irrelevant passages and the known_only distractors are looked for)."""
    by_family: dict[str, list[int]] = {}
    for index, probe in enumerate(probes):
        by_family.setdefault(probe.family, []).append(index)
    rings: list[list[int]] = [[] for _ in probes]
    for family in by_family.values():
        for at, index in enumerate(family):
            rings[index] = family[at + 1:] + family[:at]
    return rings


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
