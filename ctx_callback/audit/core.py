"""``audit_dataset``: score every training example with and without its context and categorise it.

Order of work: load the data, find the format and the columns, extract ``(context, question, answer)`` from every
example, render and tokenize every example (so every bad input, and every example too long for the model, is reported
*before* the first forward pass), then score in chunks with the probe engines, then apply the rule. With
``resume_file`` every scored chunk is appended to a JSONL file, and a later call with the same settings scores only
the chunks not complete in it (an interrupted audit of 50k examples continues where it stopped).

Chunks are fixed by position (examples ``[0, chunk_size)``, ``[chunk_size, 2 * chunk_size)``, ...), whatever is
cached: an example's score depends on the rows it shares a forward pass with (padding, batch shape and the CPU's
vector width move float sums in their last digits), so a chunk that is only partly in the resume file is scored again
in full, with the same batch-mates as in an uninterrupted run. A resumed audit therefore equals an uninterrupted one
exactly, on the same machine and with the same batch settings (``chunk_size``, ``max_batch_tokens``,
``max_batch_size``); with other batch settings cached scores agree to float rounding (about 1e-6 relative).

Every record carries ``row_key``: a hash of the row's content in the columns the audit reads (:func:`row_keys`), so
that :func:`~ctx_callback.audit.filter_dataset` can match rows by content (a shuffled copy of the audited dataset is
filtered right; a dataset with other rows is refused). Resume files keep their per-example ``key`` (index and texts,
plus the example's own system prompt when it has one), so resume files written before ``row_key`` existed are still
reused: ``row_key`` is computed from the data, never read from the resume file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..encoding import pad_token_id_of
from ..errors import AuditDataError, ConfigurationError
from ..formatting import PromptFormat, resolve_prompt_format
from .adapters import (
    AUDIT_FORMATS,
    AuditExample,
    detect_audit_format,
    extract_examples,
    number_text,
    resolve_columns,
)
from .rules import CATEGORIES, AuditRule, categorize, resolve_rule
from .scoring import EncodedExample, encode_example, example_key, score_encoded

__all__ = ["AUDIT_SCORES_FORMAT", "AuditResult", "audit_dataset", "key_columns", "load_audit_data", "prepare_examples",
           "row_keys"]

logger = logging.getLogger(__name__)

#: Format tag of the resume file's header line.
AUDIT_SCORES_FORMAT = "ctx_callback.audit_scores/1"
_DATA_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


# ----------------------------------------------------------------------------------------------------------------
# Data loading
# ----------------------------------------------------------------------------------------------------------------


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


def _column_names(rows: Any) -> list[str]:
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
    names = _column_names(dataset)
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


# ----------------------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class AuditResult:
    """Per-example records, the rule and its cut-off, and the settings of an audit.

    Attributes:
        records: One dict per dataset row, in dataset order: ``index``, ``category``, ``has_context``,
            ``nll_with_context`` / ``nll_without_context`` (mean per scored target token), ``context_gain``
            (without - with, per token), the summed ``nll_with_context_sum`` / ``nll_without_context_sum``,
            ``target_tokens`` (full target), ``scored_tokens`` (at most ``max_target_tokens``), ``truncated``,
            ``too_long``, ``row_key`` (a hash of the row's content in the columns the audit read, see
            :func:`row_keys`). Rows that could not be audited (empty target with ``invalid='skip'``) have category
            ``"invalid"`` and no scores.
        rule: The rule that assigned the categories.
        cutoff: The statistic's cut-off value (the largest flagged value for a quantile rule, the threshold for a
            threshold rule; ``None`` when nothing was flagged).
        settings: Format, columns, ``key_columns`` (those the row keys hash), prompt format, ``max_target_tokens``,
            precision, engine, model.
        seconds: Scoring wall time of this call (cached examples excluded).
        scored_now: Examples scored by this call (the others came from ``resume_file``; a chunk only partly in it is
            scored again in full).
    """

    records: list[dict[str, Any]]
    rule: AuditRule
    cutoff: float | None
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    scored_now: int = 0

    @property
    def categories(self) -> list[str]:
        """The category of each dataset row."""
        return [record["category"] for record in self.records]

    def indices(self, category: str) -> list[int]:
        """Dataset indices of the rows in ``category``."""
        return [record["index"] for record in self.records if record["category"] == category]

    def counts(self) -> dict[str, int]:
        """Rows per category (every category of :data:`~ctx_callback.audit.rules.CATEGORIES`, zeros included)."""
        counts = dict.fromkeys(CATEGORIES, 0)
        for record in self.records:
            counts[record["category"]] = counts.get(record["category"], 0) + 1
        return counts

    def recategorize(self, rule: str | AuditRule = "default", **overrides: Any) -> AuditResult:
        """The same scores under another rule (no forward pass): ``result.recategorize("paper")``."""
        new_rule = resolve_rule(rule, **overrides)
        records = [dict(record) for record in self.records]
        _apply_rule(records, new_rule)
        cutoff = _cutoff(records, new_rule)
        return AuditResult(records, new_rule, cutoff, dict(self.settings), self.seconds, self.scored_now)

    @property
    def summary(self) -> dict[str, Any]:
        """Counts and shares per category, the rule, its cut-off, the target cut, truncated and too-long rows."""
        counts = self.counts()
        total = len(self.records)
        too_long = self.indices("too_long")
        return {
            "rows": total,
            "counts": counts,
            "shares": {k: (v / total if total else 0.0) for k, v in counts.items()},
            "rule": self.rule.to_dict(),
            "rule_description": self.rule.description,
            "cutoff": self.cutoff,
            "max_target_tokens": self.settings.get("max_target_tokens"),
            "truncated_targets": sum(1 for r in self.records if r.get("truncated")),
            "too_long": len(too_long),
            "too_long_indices": too_long[:20],
            "invalid": counts.get("invalid", 0),
            "settings": self.settings,
            "seconds": self.seconds,
            "scored_now": self.scored_now,
        }

    def table(self) -> str:
        """The summary as a small text table (what the CLI prints)."""
        counts = self.counts()
        total = max(len(self.records), 1)
        lines = [f"{'category':<22} {'examples':>9} {'share':>7}", "-" * 40]
        for category, count in counts.items():
            if count or category in CATEGORIES[:3]:
                lines.append(f"{category:<22} {count:>9} {count / total:>7.1%}")
        lines.append("-" * 40)
        lines.append(f"{'total':<22} {len(self.records):>9}")
        cut = "none flagged" if self.cutoff is None else f"{self.cutoff:.4g}"
        lines.append(f"rule {self.rule.description}; cut-off {cut}")
        truncated = sum(1 for r in self.records if r.get("truncated"))
        lines.append(f"targets scored on their first {self.settings.get('max_target_tokens')} tokens "
                     f"({truncated} truncated)")
        return "\n".join(lines)

    def to_jsonl(self, path: str | os.PathLike) -> str:
        """Write one JSON line per row (atomically); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w") as f:
            for record in self.records:
                f.write(json.dumps({k: v for k, v in record.items() if k != "key"}) + "\n")
        os.replace(tmp, path)
        return os.fspath(path)

    def plot_histogram(self, path: str | os.PathLike, *, bins: int = 40) -> str:
        """Histogram of the rule's statistic by category, the cut-off marked (needs matplotlib)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from .rules import statistic_value

        stat = self.rule.statistic
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        groups: dict[str, list[float]] = {}
        for category in ("context_critical", "non_context_critical"):
            found = [statistic_value(r, stat) for r in self.records if r["category"] == category]
            groups[category] = [v for v in found if v is not None and math.isfinite(v)]
        parametric = [r["nll_without_context_sum" if stat.endswith("_sum") else "nll_without_context"]
                      for r in self.records if r["category"] == "parametric"]
        if not stat.startswith("context_gain"):
            groups["parametric (no context)"] = [float(v) for v in parametric if v is not None]
        every = [v for values in groups.values() for v in values]
        if every:
            lo, hi = min(every), max(every)
            edges = [lo + (hi - lo) * i / bins for i in range(bins + 1)] if hi > lo else bins
            for label, group in groups.items():
                if group:
                    ax.hist(group, bins=edges, alpha=0.55, label=f"{label} ({len(group)})")
        if self.cutoff is not None:
            ax.axvline(self.cutoff, color="black", linestyle="--", label=f"cut-off {self.cutoff:.3g}")
        ax.set_xlabel(f"{stat} (nats; first {self.settings.get('max_target_tokens')} target tokens)")
        ax.set_ylabel("examples")
        ax.set_title(f"Data audit: {self.rule.description}", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return os.fspath(path)


def _apply_rule(records: list[dict[str, Any]], rule: AuditRule) -> None:
    judged = [r for r in records if r["category"] != "invalid"]
    categories, _ = categorize(judged, rule)
    for record, category in zip(judged, categories):
        record["category"] = category


def _cutoff(records: list[dict[str, Any]], rule: AuditRule) -> float | None:
    _, cutoff = categorize([r for r in records if r["category"] != "invalid"], rule)
    return cutoff


def _score_key(example: AuditExample) -> str:
    """The resume-file key of an example: :func:`~ctx_callback.audit.scoring.example_key`, with the example's own
    system prompt folded in when it has one (the key of an example without one is the same as before)."""
    key = example_key(example)
    if example.system is None:
        return key
    return hashlib.sha1(json.dumps([key, example.system]).encode()).hexdigest()[:16]


def _record(example: AuditExample, enc: EncodedExample | None, scores: Mapping[str, Any] | None,
            too_long: bool) -> dict[str, Any]:
    record: dict[str, Any] = {
        "index": example.index, "key": _score_key(example), "category": "", "has_context": example.context
        is not None, "too_long": too_long,
    }
    lw = scores.get("logprob_with") if scores else None
    lo = scores.get("logprob_without") if scores else None
    tw = scores.get("tokens_with", 0) if scores else 0
    to = scores.get("tokens_without", 0) if scores else 0
    record.update(
        logprob_with=lw, logprob_without=lo, scored_tokens=to,
        nll_with_context=None if lw is None else -lw / tw,
        nll_without_context=None if lo is None else -lo / to,
        nll_with_context_sum=None if lw is None else -lw,
        nll_without_context_sum=None if lo is None else -lo,
    )
    record["context_gain"] = (None if lw is None or lo is None
                              else record["nll_without_context"] - record["nll_with_context"])
    if enc is not None:
        record.update(target_tokens=enc.target_tokens, truncated=enc.truncated, prompt_tokens=enc.longest - to)
    elif scores is not None:
        record.update(target_tokens=scores.get("target_tokens"), truncated=scores.get("truncated", False),
                      prompt_tokens=scores.get("prompt_tokens"))
    return record


# ----------------------------------------------------------------------------------------------------------------
# Resume file
# ----------------------------------------------------------------------------------------------------------------


def _model_signature(model: Any) -> str:
    """A cheap digest of the weights (a few values of every parameter) and the model's name and dtype."""
    import torch

    digest = hashlib.sha1()
    config = getattr(model, "config", None)
    digest.update(str(getattr(config, "_name_or_path", type(model).__name__)).encode())
    with torch.no_grad():
        for name, param in model.named_parameters():
            flat = param.detach().reshape(-1)
            digest.update(name.encode())
            digest.update(f"{param.dtype}{tuple(param.shape)}{float(flat[:64].double().sum()):.10e}"
                          f"{float(flat[-64:].double().sum()):.10e}".encode())
    return digest.hexdigest()[:16]


def _read_resume(path: Path, fingerprint: str) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    cached: dict[str, dict[str, Any]] = {}
    with open(path) as f:
        header = f.readline()
        try:
            meta = json.loads(header)
        except json.JSONDecodeError:
            return {}
        if not isinstance(meta, dict) or meta.get("format") != AUDIT_SCORES_FORMAT:
            return {}
        if meta.get("fingerprint") != fingerprint:
            logger.warning("ctx_callback audit: %s holds scores of other settings (model, prompt format, target "
                           "cut or precision); scoring everything again.", path)
            return {}
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut off when the audit was killed: that example is scored again
            if isinstance(row, dict) and "key" in row:
                cached[row["key"]] = row
    return cached


def _start_resume(path: Path, fingerprint: str, cached: Mapping[str, Mapping[str, Any]]) -> Any:
    """Rewrite the resume file with only the cached rows still valid (dropping a torn last line), open it to append."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps({"format": AUDIT_SCORES_FORMAT, "fingerprint": fingerprint}) + "\n")
        for row in cached.values():
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
    return open(path, "a")


# ----------------------------------------------------------------------------------------------------------------
# The audit
# ----------------------------------------------------------------------------------------------------------------


def audit_dataset(
    dataset: Any,
    model: Any,
    tokenizer: Any,
    *,
    data_format: str = "auto",
    fields: Mapping[str, str] | None = None,
    split: Callable[[Mapping[str, Any]], Any] | None = None,
    prompt_format: str | PromptFormat | Callable[..., str] | None = None,
    system_prompt: str | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    rule: str | AuditRule = "default",
    statistic: str | None = None,
    quantile: float | None = None,
    threshold: float | None = None,
    max_target_tokens: int = 64,
    max_length: int | None = None,
    probe_dtype: str | None = None,
    engine: str = "auto",
    max_batch_tokens: int = 8192,
    max_batch_size: int = 64,
    chunk_size: int = 256,
    invalid: str = "error",
    resume_file: str | os.PathLike | None = None,
    progress: bool = False,
) -> AuditResult:
    """Score every example forward-only with and without its context, and categorise it.

    Example:
        >>> result = audit_dataset(train_ds, model, tokenizer)             # auto-detected format, chat template
        >>> print(result.table())
        >>> clean = filter_dataset(train_ds, result)                       # drop the non-context-critical ones

    Args:
        dataset: A ``datasets.Dataset``, a list of dicts, a data file or folder, or a Hub id (see
            :func:`load_audit_data`).
        model: The causal LM to audit with (the model you are about to fine-tune).
        tokenizer: Its tokenizer.
        data_format: ``"auto"`` (detected from the columns) or a key of
            :data:`~ctx_callback.audit.adapters.AUDIT_FORMATS` (``"alpaca"``, ``"messages"``,
            ``"prompt_completion"``, ``"qa"``, ``"split"``).
        fields: ``{role: column}`` for renamed columns, e.g. ``{"context": "passage"}``.
        split: ``fn(example) -> (context_or_None, question, answer)``: the ``"split"`` format.
        prompt_format: How prompts are rendered, as in training: ``"chat"``, ``"alpaca"``, ``"tulu"``, ``"plain"``, a
            template string, a callable or a :class:`~ctx_callback.formatting.PromptFormat`; ``None`` = the format's
            usual one (``"alpaca"`` for Alpaca data, else ``"chat"``). A chat prompt's user turn is
            ``"{context}\\n\\n{question}"`` (pass a ``PromptFormat.chat(tokenizer, user_template=...)`` otherwise).
        system_prompt: Chat format: the system message of the examples that have none of their own. An example
            with its own system turn (``messages`` data, a conversational prompt) is rendered with that turn, as
            training renders it; without either, the chat template's default (if it has one) is rendered.
        chat_template_kwargs: Chat format: your training ``apply_chat_template`` arguments.
        rule: ``"default"``, ``"paper"`` or an :class:`~ctx_callback.audit.rules.AuditRule`.
        statistic: Override the rule's statistic (see :data:`~ctx_callback.audit.rules.STATISTICS`).
        quantile: Override the rule's quantile (share of context examples flagged).
        threshold: Flag context examples whose statistic is at most this value instead of a quantile.
        max_target_tokens: Score only the first N tokens of each target (long free-text replies).
        max_length: Longest prompt + scored target in tokens; default: the model's maximum positions. Longer
            examples are counted, warned about and categorised ``"too_long"`` (never silently dropped).
        probe_dtype: ``None`` (the model as given) or ``"bfloat16"`` / ``"float16"`` autocast.
        engine: Log-likelihood engine (``"auto"``, ``"prefix"``, ``"batched"``, ``"simple"``).
        max_batch_tokens: Padded tokens per forward pass.
        max_batch_size: Rows per forward pass.
        chunk_size: Examples per engine call (and per resume-file flush).
        invalid: ``"error"`` (default): an example with an empty target is an error; ``"skip"``: warn, keep it
            uncategorised (``"invalid"``).
        resume_file: JSONL file keeping the raw scores; a later call with the same model, data and settings scores
            only the chunks not complete in it, and gives exactly the uninterrupted result (see the module docstring).
        progress: Show a tqdm progress bar.

    Returns:
        An :class:`AuditResult`.

    Raises:
        AuditDataError: Bad data (see :func:`prepare_examples`), before any forward pass.
        ConfigurationError: Bad options (unknown rule, statistic or engine, ``max_target_tokens < 1``, ...).
    """
    from ..engines import engine_names
    from ..models import max_positions
    from ..scoring import check_probe_dtype_device, resolve_probe_dtype

    if not isinstance(max_target_tokens, int) or max_target_tokens < 1:
        raise ConfigurationError(f"max_target_tokens must be a positive integer, got {max_target_tokens!r}.")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ConfigurationError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
    if engine not in engine_names():
        raise ConfigurationError(f"engine must be one of {list(engine_names())}, got {engine!r}.")
    the_rule = resolve_rule(rule, statistic=statistic, quantile=quantile, threshold=threshold)
    probe_dtype = resolve_probe_dtype(probe_dtype)
    if probe_dtype is not None:
        from ..engines.base import device_of

        check_probe_dtype_device(probe_dtype, device_of(model))
    rows = load_audit_data(dataset)
    examples, problems, format_name, columns = prepare_examples(
        rows, data_format=data_format, fields=fields, split=split, invalid=invalid)
    if prompt_format is None:
        prompt_format = AUDIT_FORMATS[format_name].prompt_format
    chat_options: dict[str, Any] = {}
    if system_prompt is not None:
        chat_options["system_prompt"] = system_prompt
    if chat_template_kwargs:
        chat_options["chat_template_kwargs"] = dict(chat_template_kwargs)
    fmt = resolve_prompt_format(prompt_format, tokenizer, **chat_options)
    if max_length is None:
        max_length = max_positions(getattr(model, "config", None))
    settings: dict[str, Any] = {
        "data_format": format_name, "columns": dict(columns),
        "prompt_format": prompt_format if isinstance(prompt_format, str) else fmt.kind,
        "system_prompt": system_prompt, "max_target_tokens": max_target_tokens, "max_length": max_length,
        "probe_dtype": probe_dtype, "engine": engine,
        "model": str(getattr(getattr(model, "config", None), "_name_or_path", type(model).__name__)),
    }
    fingerprint = hashlib.sha1(json.dumps(
        [settings["prompt_format"], fmt.kind, fmt.template, fmt.system_prompt, dict(fmt.chat_template_kwargs),
         fmt.user_template, max_target_tokens, probe_dtype, _model_signature(model),
         getattr(tokenizer, "name_or_path", ""), len(tokenizer)], default=str).encode()).hexdigest()[:16]
    settings["fingerprint"] = fingerprint
    settings["key_columns"] = key_columns(format_name, columns, _column_names(rows))
    settings["examples_with_system_turn"] = sum(1 for example in examples if example.system is not None)

    # An example with its own system turn is rendered with it (a chat format), as training renders it.
    own_system: dict[str, PromptFormat] = {}

    def format_of(example: AuditExample) -> PromptFormat:
        if example.system is None or fmt.kind != "chat":
            return fmt
        if example.system not in own_system:
            own_system[example.system] = replace(fmt, system_prompt=example.system)
        return own_system[example.system]

    resume_path = Path(resume_file) if resume_file is not None else None
    cached = _read_resume(resume_path, fingerprint) if resume_path is not None else {}
    keys = [_score_key(example) for example in examples]
    cached = {key: cached[key] for key in keys if key in cached}

    # Fixed chunks by position: a chunk with any example missing from the cache is scored again in full, so every
    # example is scored with the same batch-mates as in an uninterrupted run (see the module docstring).
    chunks = [list(zip(examples[begin:begin + chunk_size], keys[begin:begin + chunk_size]))
              for begin in range(0, len(examples), chunk_size)]
    chunks = [chunk for chunk in chunks if any(key not in cached for _, key in chunk)]
    todo = [pair for chunk in chunks for pair in chunk]
    for _, key in todo:
        cached.pop(key, None)

    # Tokenize everything not cached first: bad or too-long examples are reported before any forward pass.
    encoded: dict[int, EncodedExample] = {}
    too_long: list[int] = []
    for example, _ in todo:
        enc = encode_example(example, tokenizer, format_of(example), max_target_tokens)
        encoded[example.index] = enc
        if max_length is not None and enc.longest > max_length:
            too_long.append(example.index)
    cached_too_long = [row["index"] for row in cached.values() if row.get("too_long")]
    all_too_long = sorted(too_long + cached_too_long)
    if all_too_long:
        logger.warning(
            "ctx_callback audit: %d example(s) are longer than the model's %s tokens even with the target cut to "
            "%d tokens; they are not scored, categorised 'too_long' and kept by filter_dataset. First: %s",
            len(all_too_long), max_length, max_target_tokens, all_too_long[:10],
        )
    pad = pad_token_id_of(tokenizer)

    scored_records: dict[int, dict[str, Any]] = {}
    for example, key in zip(examples, keys):
        if key in cached:
            row = cached[key]
            scored_records[example.index] = _record(example, None, row, bool(row.get("too_long")))
    handle = _start_resume(resume_path, fingerprint, cached) if resume_path is not None else None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="auditing", unit="ex", initial=0)
    start = time.perf_counter()
    long_set = set(too_long)
    try:
        for pairs in chunks:
            chunk = [example for example, _ in pairs]
            fitting = [e for e in chunk if e.index not in long_set]
            scores = score_encoded(model, [encoded[e.index] for e in fitting], pad_token_id=pad, engine=engine,
                                   max_batch_tokens=max_batch_tokens, max_batch_size=max_batch_size,
                                   probe_dtype=probe_dtype)
            by_index = {e.index: s for e, s in zip(fitting, scores)}
            for example in chunk:
                enc = encoded[example.index]
                is_long = example.index not in by_index
                record = _record(example, enc, by_index.get(example.index), is_long)
                scored_records[example.index] = record
                if handle is not None:
                    raw = {"key": record["key"], "index": example.index, "too_long": is_long,
                           "target_tokens": enc.target_tokens, "truncated": enc.truncated,
                           "prompt_tokens": record.get("prompt_tokens"),
                           **(by_index.get(example.index) or {})}
                    handle.write(json.dumps(raw) + "\n")
            if handle is not None:
                handle.flush()
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
        if handle is not None:
            handle.close()
    seconds = time.perf_counter() - start

    records: list[dict[str, Any]] = []
    invalid_at = {index for index, _ in problems}
    for index in range(len(rows)):
        if index in invalid_at:
            records.append({"index": index, "category": "invalid", "has_context": None, "too_long": False})
        else:
            records.append(scored_records[index])
    for record, key in zip(records, row_keys(rows, settings["key_columns"])):
        record["row_key"] = key
    _apply_rule(records, the_rule)
    return AuditResult(records, the_rule, _cutoff(records, the_rule), settings, seconds, len(todo))
