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

This module is the audit loop; its parts: :mod:`~ctx_callback.audit.data` (loading, formats, row keys),
:mod:`~ctx_callback.audit.scoring` (encoding and scoring examples), :mod:`~ctx_callback.audit.resume` (the resume
file), :mod:`~ctx_callback.audit.result` (:class:`AuditResult`) and :mod:`~ctx_callback.audit.plot` (its histogram).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from ..encoding import pad_token_id_of
from ..errors import ConfigurationError
from ..formatting import PromptFormat, resolve_prompt_format
from .adapters import AUDIT_FORMATS, AuditExample
from .data import column_names, key_columns, load_audit_data, prepare_examples, row_keys
from .result import AuditResult, apply_rule, example_record, rule_cutoff
from .resume import AUDIT_SCORES_FORMAT, model_signature, read_resume, score_key, start_resume
from .rules import AuditRule, resolve_rule
from .scoring import EncodedExample, encode_example, score_encoded

__all__ = ["AUDIT_SCORES_FORMAT", "AuditResult", "audit_dataset", "key_columns", "load_audit_data", "prepare_examples",
           "row_keys"]

logger = logging.getLogger(__name__)

#: A chunk of the audit: ``(example, resume-file key)`` pairs, scored in one engine call.
Chunk = list[tuple[AuditExample, str]]


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
    from ..models import max_positions

    the_rule, probe_dtype = _check_options(model, max_target_tokens, chunk_size, engine, probe_dtype,
                                           rule=rule, statistic=statistic, quantile=quantile, threshold=threshold)
    rows = load_audit_data(dataset)
    examples, problems, format_name, columns = prepare_examples(
        rows, data_format=data_format, fields=fields, split=split, invalid=invalid)
    if prompt_format is None:
        prompt_format = AUDIT_FORMATS[format_name].prompt_format
    fmt = _resolve_format(prompt_format, tokenizer, system_prompt, chat_template_kwargs)
    if max_length is None:
        max_length = max_positions(getattr(model, "config", None))
    settings: dict[str, Any] = {
        "data_format": format_name, "columns": dict(columns),
        "prompt_format": prompt_format if isinstance(prompt_format, str) else fmt.kind,
        "system_prompt": system_prompt, "max_target_tokens": max_target_tokens, "max_length": max_length,
        "probe_dtype": probe_dtype, "engine": engine,
        "model": str(getattr(getattr(model, "config", None), "_name_or_path", type(model).__name__)),
    }
    settings["fingerprint"] = fingerprint = _fingerprint(settings, fmt, model, tokenizer)
    settings["key_columns"] = key_columns(format_name, columns, column_names(rows))
    settings["examples_with_system_turn"] = sum(1 for example in examples if example.system is not None)

    resume_path = Path(resume_file) if resume_file is not None else None
    cached = read_resume(resume_path, fingerprint) if resume_path is not None else {}
    keys = [score_key(example) for example in examples]
    chunks, cached = _plan_chunks(examples, keys, {key: cached[key] for key in keys if key in cached}, chunk_size)
    todo = [example for chunk in chunks for example, _ in chunk]
    encoded, too_long = _encode_examples(todo, tokenizer, fmt, max_target_tokens, max_length)
    _warn_too_long(too_long + [row["index"] for row in cached.values() if row.get("too_long")], max_length,
                   max_target_tokens)
    records_by_index: dict[int, dict[str, Any]] = {}
    for example, key in zip(examples, keys):
        if key in cached:
            records_by_index[example.index] = example_record(example, key, None, cached[key],
                                                             bool(cached[key].get("too_long")))
    handle = start_resume(resume_path, fingerprint, cached) if resume_path is not None else None
    score = partial(score_encoded, model, pad_token_id=pad_token_id_of(tokenizer), engine=engine,
                    max_batch_tokens=max_batch_tokens, max_batch_size=max_batch_size, probe_dtype=probe_dtype)
    seconds = _score_chunks(chunks, score, encoded, set(too_long), records_by_index, handle,
                            len(todo) if progress else None)

    records: list[dict[str, Any]] = []
    invalid_at = {index for index, _ in problems}
    for index in range(len(rows)):
        if index in invalid_at:
            records.append({"index": index, "category": "invalid", "has_context": None, "too_long": False})
        else:
            records.append(records_by_index[index])
    for record, key in zip(records, row_keys(rows, settings["key_columns"])):
        record["row_key"] = key
    apply_rule(records, the_rule)
    return AuditResult(records, the_rule, rule_cutoff(records, the_rule), settings, seconds, len(todo))


def _check_options(model: Any, max_target_tokens: Any, chunk_size: Any, engine: str, probe_dtype: Any, *,
                   rule: str | AuditRule, statistic: str | None, quantile: float | None,
                   threshold: float | None) -> tuple[AuditRule, str | None]:
    """Refuse bad options before the data is read: ``(the rule, the canonical probe dtype)``.

    Raises:
        ConfigurationError: ``max_target_tokens`` or ``chunk_size`` not a positive integer, an unknown engine or
            rule, a ``probe_dtype`` that is unknown or cannot run on the model's device.
    """
    from ..engines import check_engine_name
    from ..precision import check_probe_dtype_device, resolve_probe_dtype

    if not isinstance(max_target_tokens, int) or max_target_tokens < 1:
        raise ConfigurationError(f"max_target_tokens must be a positive integer, got {max_target_tokens!r}.")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ConfigurationError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
    check_engine_name(engine)
    the_rule = resolve_rule(rule, statistic=statistic, quantile=quantile, threshold=threshold)
    probe_dtype = resolve_probe_dtype(probe_dtype)
    if probe_dtype is not None:
        from ..engines.base import device_of

        check_probe_dtype_device(probe_dtype, device_of(model))
    return the_rule, probe_dtype


def _resolve_format(prompt_format: Any, tokenizer: Any, system_prompt: str | None,
                    chat_template_kwargs: Mapping[str, Any] | None) -> PromptFormat:
    """The prompt format examples are rendered with (the system prompt and chat arguments only when given)."""
    chat_options: dict[str, Any] = {}
    if system_prompt is not None:
        chat_options["system_prompt"] = system_prompt
    if chat_template_kwargs:
        chat_options["chat_template_kwargs"] = dict(chat_template_kwargs)
    return resolve_prompt_format(prompt_format, tokenizer, **chat_options)


def _fingerprint(settings: Mapping[str, Any], fmt: PromptFormat, model: Any, tokenizer: Any) -> str:
    """What a resume file's scores depend on: the rendering, the target cut, the precision, the weights, the
    tokenizer."""
    return hashlib.sha1(json.dumps(
        [settings["prompt_format"], fmt.kind, fmt.template, fmt.system_prompt, dict(fmt.chat_template_kwargs),
         fmt.user_template, settings["max_target_tokens"], settings["probe_dtype"], model_signature(model),
         getattr(tokenizer, "name_or_path", ""), len(tokenizer)], default=str).encode()).hexdigest()[:16]


def _plan_chunks(examples: Sequence[AuditExample], keys: Sequence[str], cached: dict[str, dict[str, Any]],
                 chunk_size: int) -> tuple[list[Chunk], dict[str, dict[str, Any]]]:
    """The chunks to score and the cached rows still used: ``(chunks, cached)``.

    Chunks are fixed by position: a chunk with any example missing from the cache is scored again in full (its
    cached rows dropped), so every example is scored with the same batch-mates as in an uninterrupted run (see the
    module docstring).
    """
    chunks = [list(zip(examples[begin:begin + chunk_size], keys[begin:begin + chunk_size]))
              for begin in range(0, len(examples), chunk_size)]
    chunks = [chunk for chunk in chunks if any(key not in cached for _, key in chunk)]
    for chunk in chunks:
        for _, key in chunk:
            cached.pop(key, None)
    return chunks, cached


def _encode_examples(examples: Sequence[AuditExample], tokenizer: Any, fmt: PromptFormat, max_target_tokens: int,
                     max_length: int | None) -> tuple[dict[int, EncodedExample], list[int]]:
    """Tokenize every example to score (bad inputs are reported before any forward pass): ``(encoded by index,
    indices of the examples longer than max_length)``.

    An example with its own system turn is rendered with it (a chat format), as training renders it.
    """
    own_system: dict[str, PromptFormat] = {}

    def format_of(example: AuditExample) -> PromptFormat:
        if example.system is None or fmt.kind != "chat":
            return fmt
        if example.system not in own_system:
            own_system[example.system] = replace(fmt, system_prompt=example.system)
        return own_system[example.system]

    encoded: dict[int, EncodedExample] = {}
    too_long: list[int] = []
    for example in examples:
        enc = encode_example(example, tokenizer, format_of(example), max_target_tokens)
        encoded[example.index] = enc
        if max_length is not None and enc.longest > max_length:
            too_long.append(example.index)
    return encoded, too_long


def _warn_too_long(indices: list[int], max_length: int | None, max_target_tokens: int) -> None:
    """Warn about the examples (scored now or cached) that do not fit the model."""
    if indices:
        logger.warning(
            "ctx_callback audit: %d example(s) are longer than the model's %s tokens even with the target cut to "
            "%d tokens; they are not scored, categorised 'too_long' and kept by filter_dataset. First: %s",
            len(indices), max_length, max_target_tokens, sorted(indices)[:10],
        )


def _score_chunks(chunks: list[Chunk], score: Callable[[list[EncodedExample]], list[dict[str, Any]]],
                  encoded: Mapping[int, EncodedExample], too_long: set[int],
                  records_by_index: dict[int, dict[str, Any]], handle: Any, progress_total: int | None) -> float:
    """Score the chunks in order, putting each example's record into ``records_by_index`` and its raw scores into
    the resume file ``handle`` (flushed after every chunk); returns the wall time.

    Args:
        chunks: The chunks to score (see :func:`_plan_chunks`).
        score: Scores a list of encoded examples (:func:`~ctx_callback.audit.scoring.score_encoded`, bound).
        encoded: Every example to score, encoded, by index.
        too_long: Indices of the examples that do not fit the model: recorded, not scored.
        records_by_index: Filled in place.
        handle: The open resume file, or ``None``.
        progress_total: Show a tqdm bar over this many examples; ``None``: no bar.
    """
    bar = None
    if progress_total is not None:
        from tqdm.auto import tqdm

        bar = tqdm(total=progress_total, desc="auditing", unit="ex", initial=0)
    start = time.perf_counter()
    try:
        for pairs in chunks:
            fitting = [example for example, _ in pairs if example.index not in too_long]
            by_index = {e.index: s for e, s in zip(fitting, score([encoded[e.index] for e in fitting]))}
            for example, key in pairs:
                enc = encoded[example.index]
                is_long = example.index not in by_index
                record = example_record(example, key, enc, by_index.get(example.index), is_long)
                records_by_index[example.index] = record
                if handle is not None:
                    raw = {"key": record["key"], "index": example.index, "too_long": is_long,
                           "target_tokens": enc.target_tokens, "truncated": enc.truncated,
                           "prompt_tokens": record.get("prompt_tokens"),
                           **(by_index.get(example.index) or {})}
                    handle.write(json.dumps(raw) + "\n")
            if handle is not None:
                handle.flush()
            if bar is not None:
                bar.update(len(pairs))
    finally:
        if bar is not None:
            bar.close()
        if handle is not None:
            handle.close()
    return time.perf_counter() - start
