"""Acting on an audit: filter the mixture, add counterfactual examples, or make probes from your own QA data.

The paper's two mitigations (Goyal et al., ICLR 2025, section 6):

- :func:`filter_dataset`: drop the examples an audit flagged as non-context-critical (their "context-critical subset");
  or keep every row and add a weight column. Rows are matched to the audit's records by content (``row_key``): a
  shuffled copy of the audited dataset is filtered right, a dataset with other rows is refused;
- :func:`augment_dataset`: counterfactual augmentation. From your context examples whose answer appears verbatim in
  the context, make copies where that answer span is replaced, in the context and in the target, by another answer of
  the same shape drawn from the data (a capitalised name for a name, a number for a number, a year for a year). The
  model can only get such an example right by reading its context. In conversational data only the scored exchange
  changes (its context and its answer): the system turn and earlier turns are kept as they are.

:func:`probes_from_qa` applies the same substitution to build :class:`~ctx_callback.Probe` s in your own domain: the
context states the substituted answer (``counterfactual_answer``), ``parametric_answer`` is the original one, and the
original context is the aligned control. Everything is deterministic for a given ``seed``. Pure Python (``datasets``
only to rebuild a ``Dataset``).
"""

from __future__ import annotations

import logging
import random
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from ..errors import ConfigurationError
from ..matching import answers_overlap
from .adapters import AUDIT_FORMATS, number_text
from .data import load_audit_data, prepare_examples, row_keys
from .result import AuditResult

__all__ = [
    "MAX_FRACTION",
    "SHAPES",
    "Substitution",
    "answer_shape",
    "augment_dataset",
    "counterfactual_substitutions",
    "filter_dataset",
    "probes_from_qa",
]

logger = logging.getLogger(__name__)

#: The largest ``fraction`` of :func:`augment_dataset` / :func:`counterfactual_substitutions` (copies per row).
MAX_FRACTION = 10.0

#: Answer shapes that can be substituted, checked in this order.
SHAPES: tuple[str, ...] = ("year", "number", "name")
_YEAR = re.compile(r"^(1[0-9]{3}|20[0-9]{2})$")
_NUMBER = re.compile(r"^[-+]?\d{1,3}(,\d{3})*(\.\d+)?$|^[-+]?\d+(\.\d+)?$")
_CONNECTORS = {"of", "de", "da", "del", "der", "di", "du", "la", "le", "van", "von", "the", "and", "y", "bin", "al"}
_NAME_WORD = re.compile(r"^[A-Z\u00C0-\u00DE][\w'\u2019.\-]*$")
_MAX_NAME_WORDS = 5


def _span(answer: str) -> str:
    """The answer span of a target: stripped, without one trailing period (``"Paris."`` -> ``"Paris"``)."""
    text = answer.strip()
    return text[:-1].rstrip() if text.endswith(".") and not text.endswith("..") else text


def answer_shape(answer: str) -> str | None:
    """``"year"``, ``"number"``, ``"name"`` (capitalised words, connectors like "of" allowed inside) or ``None``."""
    text = _span(answer)
    if _YEAR.match(text):
        return "year"
    if _NUMBER.match(text):
        return "number"
    words = text.split()
    if 1 <= len(words) <= _MAX_NAME_WORDS and _NAME_WORD.match(words[0]) and _NAME_WORD.match(words[-1]) and all(
            _NAME_WORD.match(w) or w in _CONNECTORS for w in words) and any(c.isalpha() for c in text):
        return "name"
    return None


def _stem(question: str) -> str:
    """The first three words of a question, lower-cased: "What is the capital of France?" -> "what is the"."""
    return " ".join(question.lower().split()[:3])


def _word_pattern(text: str) -> re.Pattern[str]:
    return re.compile(r"(?<![\w])" + re.escape(text) + r"(?![\w])")


@dataclass(frozen=True)
class Substitution:
    """One counterfactual copy of an example.

    Attributes:
        index: The source example's dataset index.
        shape: ``"year"``, ``"number"`` or ``"name"``.
        original: The answer span in the source example.
        replacement: The span that replaces it (drawn from the data's answers of the same shape).
        context: The source context with the span replaced.
        question: The question (unchanged).
        answer: The target with the span replaced.
        original_context: The source context (the aligned control of a probe).
    """

    index: int
    shape: str
    original: str
    replacement: str
    context: str
    question: str
    answer: str
    original_context: str


def counterfactual_substitutions(
    dataset: Any,
    *,
    fraction: float | None = None,
    limit: int | None = None,
    seed: int = 0,
    data_format: str = "auto",
    fields: Mapping[str, str] | None = None,
    split: Callable[[Mapping[str, Any]], Any] | None = None,
) -> list[Substitution]:
    """Draw counterfactual substitutions from a dataset's context examples (see the module docstring).

    Eligible: an example with a context whose target (stripped, without a trailing period) has a shape
    (:func:`answer_shape`) and occurs in the context as whole words. The replacement is another answer of the same
    shape from any example of the dataset, not overlapping the original and absent from the context; preferred, in
    this order: an answer to a question with the same first three words and as many words as the original, one to a
    question with the same first three words, one with as many words, any.

    Args:
        dataset: As :func:`~ctx_callback.audit.audit_dataset` takes it.
        fraction: How many to make, as a share of the dataset's rows (``round(fraction * rows)``); ``None`` with
            ``limit=None``: every eligible example once.
        limit: At most this many (after ``fraction``).
        seed: Seeds the choice of sources and replacements.
        data_format: ``"auto"`` or a key of :data:`~ctx_callback.audit.adapters.AUDIT_FORMATS`, as
            :func:`~ctx_callback.audit.audit_dataset` takes it.
        fields: ``{role: column}`` for renamed columns, as :func:`~ctx_callback.audit.audit_dataset` takes it.
        split: ``fn(example) -> (context_or_None, question, answer)``: the ``"split"`` format.

    Returns:
        The substitutions, in dataset order of their sources (each source used at most once).
    """
    if fraction is not None and not (isinstance(fraction, (int, float)) and 0 <= fraction <= MAX_FRACTION):
        raise ConfigurationError(f"fraction must be a share of the dataset between 0 and {MAX_FRACTION:g}, got "
                                 f"{fraction!r}.")
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ConfigurationError(f"limit must be a non-negative integer, got {limit!r}.")
    rows = load_audit_data(dataset)
    examples, _, _, _ = prepare_examples(rows, data_format=data_format, fields=fields, split=split, invalid="skip")
    pools: dict[str, set[str]] = {shape: set() for shape in SHAPES}
    stems: dict[str, set[str]] = {}  # question stem -> answers: the same kind of question gives the same kind of name
    eligible = []
    for example in examples:
        span = _span(example.answer)
        shape = answer_shape(span)
        if shape is None:
            continue
        pools[shape].add(span)
        stems.setdefault(_stem(example.question), set()).add(span)
        if example.context is not None and _word_pattern(span).search(example.context):
            eligible.append((example, span, shape))
    wanted = len(eligible)
    if fraction is not None:
        wanted = int(round(fraction * len(rows)))
    if limit is not None:
        wanted = min(wanted, limit)
    rng = random.Random(seed)
    order = list(range(len(eligible)))
    rng.shuffle(order)
    sorted_pools = {shape: sorted(values) for shape, values in pools.items()}
    out: list[Substitution] = []
    for position in order:
        if len(out) >= wanted:
            break
        example, span, shape = eligible[position]
        assert example.context is not None
        context_lower = example.context.lower()
        candidates = [c for c in sorted_pools[shape] if c != span and not answers_overlap([c], [span])
                      and c.lower() not in context_lower]
        same_stem = stems.get(_stem(example.question), set())
        words = len(span.split())
        tiers = ([c for c in candidates if c in same_stem and len(c.split()) == words],
                 [c for c in candidates if c in same_stem],
                 [c for c in candidates if len(c.split()) == words], candidates)
        pick_from = next((tier for tier in tiers if tier), [])
        if not pick_from:
            continue
        new = rng.choice(pick_from)
        pattern = _word_pattern(span)
        out.append(Substitution(
            index=example.index, shape=shape, original=span, replacement=new,
            context=_substitute(pattern, new, example.context), question=example.question,
            answer=_substitute(pattern, new, example.answer), original_context=example.context,
        ))
    return sorted(out, key=lambda s: s.index)


def _substitute(pattern: re.Pattern[str], new: str, text: str) -> str:
    """``text`` with every whole-word match of ``pattern`` replaced by ``new`` taken literally (no backslash
    escapes)."""
    return pattern.sub(lambda _match: new, text)


def _replace_deep(value: Any, pattern: re.Pattern[str], new: str) -> Any:
    if isinstance(value, str):
        return _substitute(pattern, new, value)
    if isinstance(value, Mapping):
        return {k: _replace_deep(v, pattern, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_deep(v, pattern, new) for v in value]
    text = number_text(value)
    if isinstance(text, str):  # a number the audit read as text (a year answer): replaced, and kept a number
        return _as_number(_substitute(pattern, new, text), value)
    return value


def _as_number(text: str, like: int | float) -> Any:
    """``text`` as a number of the type of ``like`` (``"1930"`` -> ``1930``); the text itself when it is none."""
    plain = text.replace(",", "")
    for kind in ((int, float) if isinstance(like, int) else (float,)):
        try:
            return kind(plain)
        except ValueError:
            continue
    return text


def _rebuild(dataset: Any, rows: list[dict[str, Any]]) -> Any:
    features = getattr(dataset, "features", None)
    if features is None:
        return rows
    import datasets

    return datasets.Dataset.from_list(rows, features=features)


def augment_dataset(
    dataset: Any,
    *,
    fraction: float = 0.1,
    seed: int = 0,
    placement: str = "spread",
    data_format: str = "auto",
    fields: Mapping[str, str] | None = None,
    split: Callable[[Mapping[str, Any]], Any] | None = None,
) -> Any:
    """The dataset plus counterfactual copies of some of its context examples (same columns, same format).

    Each copy is its source row with the answer span replaced (whole words) in the context and the answer, so every
    other column is kept as it is. Where exactly depends on the format (its ``rewrite``): for ``messages`` data only
    the scored exchange changes (the context part of the last user turn, or the ``context`` column and its copy in
    that turn, and the assistant reply after it), never the system turn or earlier turns; for conversational
    ``prompt_completion`` data the context column, its copy in the prompt's last user turn and the completion; for the
    other formats every column the format reads (context, question, answer; every column for a ``split`` callable).
    A numeric answer (a year) stays a number. See :func:`counterfactual_substitutions` for which examples qualify and
    how the replacement is drawn; fewer copies than asked are made (with a warning) when fewer examples qualify.

    Args:
        dataset: A ``datasets.Dataset`` (returned as one, same features) or a list of dicts (returned as a list).
        fraction: Copies to add, as a share of the rows (0.1 = 10% more rows).
        seed: Seeds the choices; the same seed gives the same dataset.
        placement: ``"spread"`` (copies interleaved evenly, for sequential training) or ``"end"`` (appended).
        data_format: ``"auto"`` or a key of :data:`~ctx_callback.audit.adapters.AUDIT_FORMATS`, as
            :func:`~ctx_callback.audit.audit_dataset` takes it.
        fields: ``{role: column}`` for renamed columns, as :func:`~ctx_callback.audit.audit_dataset` takes it.
        split: ``fn(example) -> (context_or_None, question, answer)``: the ``"split"`` format.

    Raises:
        ConfigurationError: Bad ``fraction`` or ``placement``.
    """
    if placement not in ("spread", "end"):
        raise ConfigurationError(f"placement must be 'spread' or 'end', got {placement!r}.")
    rows = load_audit_data(dataset)
    subs = counterfactual_substitutions(rows, fraction=fraction, seed=seed, data_format=data_format, fields=fields,
                                        split=split)
    wanted = int(round(fraction * len(rows)))
    if len(subs) < wanted:
        logger.warning(
            "ctx_callback augment: only %d of the %d requested counterfactual examples could be made (context examples "
            "whose answer is a name, number or year found verbatim in the context).", len(subs), wanted)
    _, _, format_name, columns = prepare_examples(rows, data_format=data_format, fields=fields, split=split,
                                                  invalid="skip")
    role_columns = set(columns.values()) if format_name != "split" else None
    rewrite = AUDIT_FORMATS[format_name].rewrite
    originals = [dict(rows[i]) for i in range(len(rows))]
    copies = []
    for sub in subs:
        source = originals[sub.index]
        pattern = _word_pattern(sub.original)
        if rewrite is not None:
            copies.append(rewrite(source, columns, partial(_substitute, pattern, sub.replacement)))
            continue
        copies.append({k: (_replace_deep(v, pattern, sub.replacement) if role_columns is None or k in role_columns
                           else v) for k, v in source.items()})
    if placement == "end" or not copies:
        merged = originals + copies
    else:
        merged = []
        step = len(originals) / (len(copies) + 1)
        slots = [int(round(step * (j + 1))) for j in range(len(copies))]
        j = 0
        for i, row in enumerate(originals):
            merged.append(row)
            while j < len(copies) and slots[j] <= i + 1:
                merged.append(copies[j])
                j += 1
        merged.extend(copies[j:])
    return _rebuild(rows, merged)


def filter_dataset(
    dataset: Any,
    result: AuditResult,
    *,
    drop: Sequence[str] = ("non_context_critical",),
    weight_column: str | None = None,
    weights: Mapping[str, float] | None = None,
) -> Any:
    """The dataset without the rows whose audit category is in ``drop`` (every column kept), or with a weight column.

    Rows are matched to the audit's records by content: each record's ``row_key`` hashes the columns the audit read
    (:func:`~ctx_callback.audit.row_keys`), so the audited dataset in another order (``dataset.shuffle()``) is
    filtered right, each row by its own category; identical rows are matched in order. A dataset whose rows are not
    those audited (an edited, added or removed row) is refused. A result whose records have no ``row_key`` (made
    before it existed, or by hand) is matched by position, as before: the same length is all that can be checked.

    Args:
        dataset: The audited dataset (the same rows, in any order).
        result: Its :class:`~ctx_callback.audit.AuditResult`.
        drop: Categories to remove (default: the non-context-critical examples, the paper's filter).
        weight_column: Keep every row and add this column instead: ``weights[category]`` (default 0.0 for the
            ``drop`` categories, 1.0 for the rest), for a weighted loss.
        weights: Per-category weights for ``weight_column``.

    Raises:
        ConfigurationError: The result does not belong to this dataset (another length, or rows the audit did not
            see; the message names the first), or an unknown category.
    """
    from .rules import CATEGORIES

    rows = load_audit_data(dataset)
    unknown = sorted(set(drop) - set(CATEGORIES))
    if unknown:
        raise ConfigurationError(f"unknown categories {unknown} in drop=; choose from {list(CATEGORIES)}.")
    categories = _categories_of_rows(rows, result)
    if weight_column is not None:
        table = {c: (0.0 if c in drop else 1.0) for c in CATEGORIES}
        table.update(weights or {})
        values = [float(table[c]) for c in categories]
        if hasattr(rows, "add_column"):
            return rows.add_column(weight_column, values)
        return [{**dict(rows[i]), weight_column: values[i]} for i in range(len(rows))]
    keep = [i for i, c in enumerate(categories) if c not in drop]
    if hasattr(rows, "select"):
        return rows.select(keep)
    return [rows[i] for i in keep]


def _categories_of_rows(rows: Any, result: AuditResult) -> list[str]:
    """The audit category of each row of ``rows``, matched by ``row_key`` (see :func:`filter_dataset`)."""
    records = result.records
    if len(records) != len(rows):
        raise ConfigurationError(f"the audit result has {len(records)} rows but the dataset {len(rows)}: pass "
                                 "the dataset that was audited (in any order), or audit this one.")
    recorded: list[Any] = [record.get("row_key") for record in records]
    columns = result.settings.get("key_columns")
    if columns is None or any(key is None for key in recorded):
        logger.warning("ctx_callback filter: the audit result has no row keys (made by an older version?); rows are "
                       "matched by position, so the dataset must be in the order it was audited in.")
        return result.categories
    keys = row_keys(rows, columns)
    if keys == recorded:
        return result.categories
    surplus, missing = Counter(keys) - Counter(recorded), Counter(recorded) - Counter(keys)
    if surplus or missing:
        first_new = next(i for i, key in enumerate(keys) if key in surplus)
        first_gone = next(record["index"] for record, key in zip(records, recorded) if key in missing)
        raise ConfigurationError(
            f"the dataset does not match the audit result: {sum(surplus.values())} of its {len(rows)} rows were not "
            f"audited (the first is row {first_new}) and {sum(missing.values())} audited rows are not in it (the "
            f"first was row {first_gone} when audited). Rows are matched by their content in the columns {columns}, "
            "so a shuffled copy of the audited dataset is fine, an edited, added or removed row is not: pass the "
            "dataset that was audited, or audit this one."
        )
    by_key: dict[str, list[str]] = {}
    for key, record in zip(reversed(recorded), reversed(records)):
        by_key.setdefault(key, []).append(record["category"])
    logger.info("ctx_callback filter: the dataset is in another order than when audited; rows matched by content.")
    return [by_key[key].pop() for key in keys]


def probes_from_qa(
    dataset: Any,
    *,
    family: str = "custom",
    limit: int | None = None,
    seed: int = 0,
    data_format: str = "auto",
    fields: Mapping[str, str] | None = None,
    split: Callable[[Mapping[str, Any]], Any] | None = None,
) -> list[Any]:
    """Counterfactual :class:`~ctx_callback.Probe` s in your own domain, from QA examples with a context.

    Each eligible example (see :func:`counterfactual_substitutions`) gives one probe: ``context`` = its context with the
    answer replaced, ``counterfactual_answer`` = the replacement, ``parametric_answer`` = the original answer,
    ``aligned_context`` = the original context. Pass them to ``ContextRelianceCallback(trainer, probes=...)`` (hold
    these examples out of training: a probe on a trained example measures memorisation).

    Args:
        dataset: As :func:`~ctx_callback.audit.audit_dataset` takes it.
        family: The probes' family (a metric group).
        limit: At most this many probes.
        seed: Seeds the replacements.
        data_format: ``"auto"`` or a key of :data:`~ctx_callback.audit.adapters.AUDIT_FORMATS`, as
            :func:`~ctx_callback.audit.audit_dataset` takes it.
        fields: ``{role: column}`` for renamed columns.
        split: ``fn(example) -> (context_or_None, question, answer)``: the ``"split"`` format.

    Raises:
        AuditDataError: No example qualifies (the message says what qualifies).
    """
    from ..errors import AuditDataError
    from ..probes import probes_from_records

    if data_format != "auto" and data_format not in AUDIT_FORMATS:
        raise ConfigurationError(f"unknown data format {data_format!r}; choose from {list(AUDIT_FORMATS)}.")
    subs = counterfactual_substitutions(dataset, limit=limit, seed=seed, data_format=data_format, fields=fields,
                                        split=split)
    if not subs:
        raise AuditDataError(
            "no example can become a probe: a probe needs an example with a context whose answer is a name, a number "
            "or a year that occurs verbatim in the context, and another answer of the same shape in the data."
        )
    records = [{
        "id": f"{family}/{sub.index}", "family": family, "context": sub.context, "question": sub.question,
        "counterfactual_answer": sub.replacement, "parametric_answer": sub.original,
        "aligned_context": sub.original_context, "metadata": {"source_index": sub.index, "shape": sub.shape},
    } for sub in subs]
    return probes_from_records(records, format="ctx_callback", source=f"probes_from_qa({family})")
