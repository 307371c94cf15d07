"""Public knowledge-conflict benchmarks as one-word probe presets: one registry entry per dataset.

``load_probes("nq_swap")`` (or ``"memotrap"``, ``"faitheval_counterfactual"``, ``"conflictbank"``, ...; ``"+"``-joined
with each other and with the built-in suites) loads the public dataset through ``datasets.load_dataset`` with the
entry's Hub id, configuration, split, probe format and column mapping. Everything about a preset is in its
:class:`ProbePreset`; to add one, add one :func:`register_probe_preset` call at the end of this file (the preset
table of ``docs/probes.md`` is rendered from the registry by :func:`presets_markdown`, and a test keeps the two equal).

Offline: a preset needs the Hugging Face Hub. Point it at a local copy in one of two ways:

- ``load_probes(PATH, format=preset.format)`` on the downloaded files (a folder of Parquet/JSON Lines files, or a
  ``huggingface-cli download --repo-type dataset`` snapshot, with ``from_hub=True`` for a folder);
- set ``CTX_CALLBACK_PRESET_DIR`` (:data:`PRESET_DIR_ENV`) to a folder of snapshots laid out by Hub id
  (``$CTX_CALLBACK_PRESET_DIR/pminervini/NQ-Swap/...``, the README with its ``configs:`` included, since that is what
  names the splits): every preset whose folder exists there loads from it, through the same ``load_dataset`` call.

Pure Python, no torch, no ``datasets`` import (the loading itself is in :mod:`ctx_callback.probe_sources`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigurationError
from .registry import Registry

__all__ = [
    "PRESET_DIR_ENV",
    "PROBE_PRESETS",
    "ProbePreset",
    "preset_location",
    "presets_markdown",
    "register_probe_preset",
]

#: Environment variable naming a local mirror of the presets' Hub datasets, laid out by Hub id.
PRESET_DIR_ENV = "CTX_CALLBACK_PRESET_DIR"


@dataclass(frozen=True)
class ProbePreset:
    """One public benchmark, as ``load_probes(name)`` loads it.

    Attributes:
        name: What users pass to ``load_probes`` (also the probes' family, unless the format sets another).
        hub_id: The dataset's Hub id, passed to ``datasets.load_dataset``.
        split: The split loaded by default (``load_probes(name, split=...)`` overrides it, slices included:
            ``split="train[:2000]"``).
        format: The probe record format (:data:`~ctx_callback.probe_formats.PROBE_FORMATS`) of its rows.
        config: The dataset configuration, if it has several.
        column_mapping: For ``format="columns"``: ``{native_field: column}``.
        size: Its size, as the source says it (documentation).
        counterfactual: What the counterfactual (context-supported) answer is (documentation).
        parametric: What the parametric answer is (documentation).
        license: The license as stated by the dataset, or what is known about it (documentation).
        source: Where the facts above were taken from (documentation).
        description: One line about the dataset (documentation).
    """

    name: str
    hub_id: str
    split: str
    format: str
    config: str | None = None
    column_mapping: Mapping[str, str] | None = field(default=None)
    size: str = ""
    counterfactual: str = ""
    parametric: str = ""
    license: str = ""
    source: str = ""
    description: str = ""


def _check_preset_name(name: str) -> None:
    """Refuse a preset name with ``"+"`` or ``"/"``: those separate suites and Hub ids in ``load_probes``."""
    if "+" in name or "/" in name:
        raise ConfigurationError(f"probe preset name {name!r} may not contain '+' or '/'.")


#: Registered presets by name, in documentation order.
PROBE_PRESETS: Registry[ProbePreset] = Registry("probe preset", check_name=_check_preset_name)


def register_probe_preset(preset: ProbePreset) -> ProbePreset:
    """Add ``preset`` to :data:`PROBE_PRESETS` (its name must be new).

    Raises:
        ConfigurationError: The name is taken, or contains ``"+"`` or ``"/"`` (those separate suites and Hub ids).
    """
    return PROBE_PRESETS.register(preset.name, preset)


def preset_location(preset: ProbePreset) -> str:
    """What ``datasets.load_dataset`` is given for ``preset``: ``$CTX_CALLBACK_PRESET_DIR/<hub_id>`` when that folder
    exists, else the Hub id."""
    mirror = os.environ.get(PRESET_DIR_ENV)
    if mirror:
        folder = Path(mirror).expanduser() / preset.hub_id
        if folder.is_dir():
            return str(folder)
    return preset.hub_id


def presets_markdown() -> str:
    """The preset table of ``docs/probes.md``, rendered from :data:`PROBE_PRESETS`."""
    lines = [
        "| preset | Hub id | split | size | counterfactual answer | parametric answer | license (as stated) |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in PROBE_PRESETS.values():
        config = f" (config `{p.config}`)" if p.config else ""
        cells = [f"`{p.name}`", f"`{p.hub_id}`{config}", f"`{p.split}`", p.size, p.counterfactual, p.parametric,
                 p.license]
        lines.append("| " + " | ".join(cell.replace("|", "&#124;") for cell in cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# The presets. Facts from the issue that asked for them (ctx_callback issue 14) and the Hub pages as crawled
# (listed in ``source``); the Hub cards could not be re-checked offline: check them before publishing numbers.
# --------------------------------------------------------------------------------------------------------------

register_probe_preset(ProbePreset(
    name="nq_swap",
    hub_id="pminervini/NQ-Swap",
    split="dev",
    format="nq_swap",
    size="1K-10K rows (Hub size class)",
    counterfactual="`sub_answer`: the entity substituted into the Natural Questions passage (`sub_context`)",
    parametric="`org_answer`: the original NQ answer (the aligned control uses `org_context`)",
    license="MIT (Hub page)",
    source="Hub pages of pminervini/NQ-Swap (license badge, size class, files dev/original/substituted)",
    description="Natural Questions passages whose answer entity was swapped (Longpre et al., 2021)",
))

register_probe_preset(ProbePreset(
    name="memotrap",
    hub_id="Albertmade/memo-trap",
    split="train",
    format="memotrap",
    size="<1K rows (Hub size class; the original MemoTrap has 936 prompts)",
    counterfactual="the ending the instruction asks for (`classes[answer_index]`)",
    parametric="the famous ending of the quote or proverb (the other class)",
    license="not stated on the Hub pages we could read (other copies of MemoTrap are tagged Apache-2.0 and "
            "CC-BY-4.0): check the card",
    source="Hub pages of Albertmade/memo-trap (size class, train parquet file) and pminervini/inverse-scaling "
           "(memo-trap config: 936 rows)",
    description="Inverse Scaling Prize: write a quote or proverb with an unusual ending (Liu and Liu, 2023)",
))

register_probe_preset(ProbePreset(
    name="faitheval_counterfactual",
    hub_id="Salesforce/FaithEval-counterfactual-v1.0",
    split="test",
    format="faitheval",
    size="1,000 rows (Hub viewer)",
    counterfactual="the option `answerKey` names: the one the counterfactual `context` supports (multiple choice, "
                   "`choices`)",
    parametric="unknown (no column says which option is true): parametric, closed-book and aligned metrics skip it",
    license="not stated on the Hub pages we could read: check the card",
    source="Hub pages of Salesforce/FaithEval-counterfactual-v1.0 (test split, 1k rows, parquet); FaithEval, "
           "arXiv:2410.03727",
    description="ARC-style science questions with a counterfactual supporting passage (Ming et al., 2024)",
))

_CB_SOURCE = ("Hub pages of Warrieryes/CB_qa (train split, 513k rows, JSON); ConflictBank README "
              "(github.com/zhaochen0110/conflictbank); the evidence column names were not checked")
_CB_COUNTERFACTUAL = "`replaced_option`: the substituted object the conflicting evidence states (multiple choice, " \
                     "`options`)"

#: The three ConflictBank presets differ only in the evidence kind that becomes the context:
#: (name suffix, evidence kind, size, parametric, license, description).
_CB_VARIANTS = (
    ("", "misinformation", "513k rows (Hub viewer); slice with `split=\"train[:N]\"`",
     "`correct_option`: the Wikidata fact", "not stated on the Hub pages we could read: check the card",
     "ConflictBank QA with misinformation conflicts (Su et al., 2024)"),
    ("_temporal", "temporal", "as `conflictbank`", "`correct_option`", "as `conflictbank`",
     "ConflictBank QA with temporal conflicts"),
    ("_semantic", "semantic", "as `conflictbank`", "`correct_option`", "as `conflictbank`",
     "ConflictBank QA with semantic conflicts"),
)
for _suffix, _evidence, _size, _parametric, _license, _description in _CB_VARIANTS:
    register_probe_preset(ProbePreset(
        name=f"conflictbank{_suffix}",
        hub_id="Warrieryes/CB_qa",
        split="train",
        format=f"conflictbank{_suffix}",
        size=_size,
        counterfactual=f"{_CB_COUNTERFACTUAL}; context: the {_evidence}-conflict evidence",
        parametric=_parametric,
        license=_license,
        source=_CB_SOURCE,
        description=_description,
    ))
