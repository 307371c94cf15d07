"""The probe scorer: encode probes once, then score any model on them, forward-only.

:class:`ProbeScorer` tokenizes the probes once (:mod:`ctx_callback.encoding`) and orchestrates a probe round: it
picks the rows to score, runs an engine under :func:`probe_mode`, and fills the score table that
:func:`~ctx_callback.metrics.compute_metrics` reads. The engines live in :mod:`ctx_callback.engines`:

- log-likelihood mode (default): a :class:`~ctx_callback.engines.LoglikEngine` from the registry
  :data:`~ctx_callback.engines.LOGLIK_ENGINES` (``"prefix"``, ``"batched"``, ``"simple"``), or ``"auto"`` (the
  prefix cache, falling back to batched; see :mod:`ctx_callback.engines.auto`);
- generation mode: :class:`~ctx_callback.engines.GenerationEngine` (greedy decoding), matched against the answers
  with :mod:`ctx_callback.matching` (the longer answer first when one answer contains the other).

Forward passes run under ``torch.no_grad()`` (not ``inference_mode``: inference tensors cached inside modules
break a later backward), with ``use_cache`` off except for the prefix cache, in ``eval`` mode. :func:`probe_mode`
restores every module's train/eval flag and the Python, NumPy and torch RNG states afterwards.

Precision: by default a round runs in the dtype the training step uses (the model as given; under the Trainer's
mixed precision its forward is already wrapped in autocast). ``probe_dtype="bfloat16"`` (or ``"float16"``, CUDA only)
runs the round under ``torch.autocast`` in that dtype instead, leaving the weights untouched (see
:func:`resolve_probe_dtype`). A round can also score a subset of the encoded variants (``score_raw(...,
variants=("context",))``): the callback's ``controls_every`` scores the control variants on some rounds only.

Faults inside a round (see :meth:`ProbeScorer.score_raw`): an out-of-memory error in a forward pass retries the
round with halved batch budgets, down to one probe item per forward pass; non-finite scores (NaN/inf logits) are
kept in the table and counted (:attr:`ScoreResult.nonfinite_scores`), so that the caller can flag the round.

The parts: :mod:`ctx_callback.precision` (``probe_dtype`` and autocast), :mod:`ctx_callback.isolation`
(:func:`probe_mode`), :mod:`ctx_callback.score_results` (:class:`ScoreResult`, :class:`ScoreReport`) and
:mod:`ctx_callback.memory_backoff` (the out-of-memory retries); their public names are importable from here too.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .encoding import DEFAULT_VARIANTS, EncodedItem, EncodedProbes, check_lengths, encode_probes
from .engines import (
    FALLBACK_ENGINE,
    AutoEngine,
    Batcher,
    GenerationEngine,
    LoglikEngine,
    check_engine_name,
    create_loglik_engine,
)
from .engines.base import device_of
from .errors import ConfigurationError
from .formatting import resolve_prompt_format
from .isolation import probe_mode
from .known_facts import distractor_items, length_matched_distractors
from .matching import answer_hits, normalize_answer
from .memory_backoff import log_recovered_round, run_with_backoff, smaller_budget
from .metrics import ScoreTable, compute_metrics
from .models import config_of, max_positions
from .precision import (
    PROBE_DTYPES,
    check_probe_dtype_device,
    cpu_has_native_bf16,
    probe_autocast,
    resolve_probe_dtype,
)
from .probes import Probe
from .score_results import ScoreReport, ScoreResult

__all__ = [
    "PROBE_DTYPES",
    "ProbeScorer",
    "ScoreReport",
    "ScoreResult",
    "check_probe_dtype_device",
    "cpu_has_native_bf16",
    "normalize_answer",
    "probe_autocast",
    "probe_mode",
    "resolve_probe_dtype",
]

_MODES = ("loglik", "generate")


class ProbeScorer:
    """Encode probes once; score any model on them (or on a shard of them), forward-only.

    Example:
        >>> probes = load_probes("world_facts")
        >>> scorer = ProbeScorer(probes, tokenizer, prompt_format="chat")
        >>> report = scorer.score(model)
        >>> report.metrics["ctx_reliance/counterfactual_accuracy"]

    Args:
        probes: Validated probes (see :func:`ctx_callback.load_probes`).
        tokenizer: The tokenizer the model is trained with.
        prompt_format: ``"chat"`` (the tokenizer's chat template), a preset (``"alpaca"``, ``"tulu"``, ``"plain"``),
            a template string with ``{context}`` and ``{question}``, a callable, or a
            :class:`~ctx_callback.formatting.PromptFormat`.
        mode: ``"loglik"`` (compare the answers' log-likelihoods; default) or ``"generate"`` (greedy decoding and
            answer matching, as in the paper).
        variants: Which rows to score per probe: ``"context"`` (always), ``"closed_book"``, ``"aligned"``,
            ``"irrelevant"`` (another probe's passage: :mod:`ctx_callback.irrelevant`; not in the default).
        engine: Log-likelihood engine: ``"auto"`` (prefix cache, falling back to ``"batched"``) or a name in
            :data:`~ctx_callback.engines.LOGLIK_ENGINES` (``"prefix"``, ``"batched"``, ``"simple"``).
        max_batch_tokens: Padded tokens per forward pass (batch size x length).
        max_batch_size: Upper bound on rows per forward pass.
        max_new_tokens: Generation mode: tokens generated per prompt.
        max_length: Longest allowed prompt + answer; probes beyond it are an error at construction. Whatever it
            is, every model scored is checked against its own ``max_position_embeddings`` (see
            :func:`~ctx_callback.models.max_positions`) before its first forward pass.
        system_prompt: Chat format: an optional system message.
        chat_template_kwargs: Chat format: extra ``apply_chat_template`` arguments (use the training ones).
        per_family: Also report ``ctx_reliance/<family>/<metric>``.
        probe_dtype: Precision of the probe forward passes. ``None`` (default): the dtype the training step uses,
            i.e. the model as given (and, inside a Trainer with ``bf16=True``/``fp16=True``, the Trainer's autocast,
            which wraps the model's forward). ``"bfloat16"``: every round runs under
            ``torch.autocast(<device type>, dtype=torch.bfloat16)``, the weights untouched; about 2x faster on
            hardware with native bf16 (CPUs with AVX-512 BF16 / AMX, recent GPUs) for fp32 models, at a small,
            documented loss of precision (``docs/performance.md``, "bf16 probing and control cadence").
            ``"float16"``: the same in float16, CUDA only. Log-softmax and the sums of answer log-probabilities stay
            in float32/float64.

    Out of memory: when a forward pass of a round raises ``torch.OutOfMemoryError`` (or a ``RuntimeError`` that
    says "out of memory"), the accelerator's cached memory is freed and the whole round is retried with both budgets
    halved, down to ``max_batch_size=1`` (one probe item per forward pass); every retry logs a warning with the
    budget it tried and the one it retries with. The scores equal those of an unconstrained round (batching changes
    the float summation order only). The budget that worked is *remembered* for later rounds (:attr:`batcher`),
    deliberately: memory pressure during training is much the same from step to step, so starting every round from
    the configured budget would repeat the failing forward pass (and fragment the CUDA allocator) each time. The
    configured :attr:`max_batch_tokens` / :attr:`max_batch_size` do not change; :meth:`reset_budget` goes back to
    them. If even one item per forward pass runs out of memory, the round raises the error (the callback logs
    ``ctx_reliance/probe_failed`` and training goes on) and the budget is left as it was before the round. Not
    retried: with :attr:`synced_gpus` (FSDP / ZeRO-3 parameter sharding), where the other ranks are waiting inside
    the failed forward pass's collective and no retry on one rank can bring them back (lower the budgets instead),
    and with the ``"simple"`` engine, which runs one row per forward pass already.

    Raises:
        ConfigurationError: An argument is out of range or names an unknown mode, engine or variant, or
            ``probe_dtype`` is not ``None``/``"bfloat16"``/``"float16"`` (``"float16"`` without CUDA).
        ProbeLengthError: A probe does not fit ``max_length`` (here), or a scored model's maximum positions (when
            scoring).
        ProbeFormatError: An answer tokenizes to nothing.
    """

    def __init__(
        self,
        probes: Sequence[Probe],
        tokenizer: Any,
        prompt_format: Any = "chat",
        *,
        mode: str = "loglik",
        variants: Sequence[str] = DEFAULT_VARIANTS,
        engine: str = "auto",
        max_batch_tokens: int = 8192,
        max_batch_size: int = 64,
        max_new_tokens: int = 24,
        max_length: int | None = None,
        system_prompt: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        per_family: bool = True,
        probe_dtype: str | None = None,
    ) -> None:
        self.probe_dtype = resolve_probe_dtype(probe_dtype)
        if mode not in _MODES:
            raise ConfigurationError(f"mode must be one of {list(_MODES)}, got {mode!r}.")
        check_engine_name(engine)
        if max_batch_tokens < 1 or max_batch_size < 1 or max_new_tokens < 1:
            raise ConfigurationError(
                f"max_batch_tokens, max_batch_size and max_new_tokens must be >= 1, got "
                f"{max_batch_tokens}, {max_batch_size}, {max_new_tokens}."
            )
        if not probes:
            raise ConfigurationError("ProbeScorer needs at least one probe.")
        if tokenizer is None:
            raise ConfigurationError("ProbeScorer needs the training tokenizer (got None).")
        chat_options = {"system_prompt": system_prompt, "chat_template_kwargs": chat_template_kwargs}
        self.prompt_format = resolve_prompt_format(prompt_format, tokenizer, **chat_options)
        self.tokenizer = tokenizer
        self.mode = mode
        self.engine = engine
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.max_new_tokens = max_new_tokens
        self.per_family = per_family
        self.encoded: EncodedProbes = encode_probes(
            list(probes), tokenizer, self.prompt_format, variants=variants, max_length=max_length
        )
        #: Prompt + longer answer of the longest item: a model with at least this many positions fits every probe.
        self._longest_item = max((item.total_length for item in self.encoded.items), default=0)
        #: Multiple choice: the most answers of a probe (0 when every probe has two answers: no option columns), and
        #: each probe's (counterfactual, parametric) answer position (-1: unknown).
        probes_list = self.encoded.probes
        self._option_width = max(len(p.answers) for p in probes_list) if any(p.options for p in probes_list) else 0
        self._roles = [(p.counterfactual_index, -1 if p.parametric_index is None else p.parametric_index)
                       for p in probes_list]
        #: The budgets forward passes are cut with: the configured ones, or smaller ones that an out-of-memory retry
        #: found to work (see "Out of memory" above; :meth:`reset_budget` restores the configured ones).
        self.batcher = Batcher(max_batch_tokens, max_batch_size)
        #: The log-likelihood engine (``AutoEngine`` for ``"auto"``), and the one for calls it does not apply to.
        self.loglik_engine: LoglikEngine = create_loglik_engine(engine, self.encoded, self.batcher)
        self._fallback_engine = create_loglik_engine(FALLBACK_ENGINE, self.encoded, self.batcher)
        self.generation_engine = GenerationEngine(self.encoded, self.batcher, tokenizer, max_new_tokens)
        #: Generation mode: keep decoding until every rank is done (needed with FSDP / ZeRO-3 parameter sharding).
        self.synced_gpus = False

    # -- public API ---------------------------------------------------------------------------------------------
    @property
    def probes(self) -> list[Probe]:
        return self.encoded.probes

    @property
    def variants(self) -> tuple[str, ...]:
        return self.encoded.variants

    @property
    def active_engine(self) -> str:
        """The log-likelihood engine in use: the requested one, or for ``"auto"``: ``"prefix"`` while the probes
        share a preamble and no model class has rejected the prefix cache, else ``"batched"``."""
        if isinstance(self.loglik_engine, AutoEngine):
            return self.loglik_engine.active_name
        return self.engine

    def reset_budget(self) -> None:
        """Cut forward passes with the configured ``max_batch_tokens`` / ``max_batch_size`` again (after an
        out-of-memory retry left a smaller working budget in :attr:`batcher`)."""
        self._set_batcher(Batcher(self.max_batch_tokens, self.max_batch_size))

    def score(self, model: torch.nn.Module, probe_indices: Sequence[int] | None = None, *,
              variants: Sequence[str] | None = None) -> ScoreReport:
        """Score ``model`` on all probes (or ``probe_indices``) and compute the metrics (see :meth:`score_raw` for
        ``variants``)."""
        result = self.score_raw(model, probe_indices, variants=variants)
        return ScoreReport(metrics=self.metrics(result), result=result, probes=self.probes)

    def round_variants(self, variants: Sequence[str] | None) -> tuple[str, ...]:
        """The variants a round scores: ``variants`` validated and put in encoding order (all encoded ones for
        ``None``).

        Raises:
            ConfigurationError: A variant that was not encoded, or a subset without ``"context"``.
        """
        if variants is None:
            return self.variants
        wanted = set(variants)
        unknown = sorted(wanted - set(self.variants))
        if unknown:
            raise ConfigurationError(f"variants {unknown} were not encoded; this scorer has {list(self.variants)}.")
        if "context" not in wanted:
            raise ConfigurationError("a round must score the 'context' variant (it holds the knowledge conflict).")
        return tuple(v for v in self.variants if v in wanted)

    def metrics(self, result: ScoreResult) -> dict[str, float]:
        """Metrics of a (merged) :class:`ScoreResult`: only those its variants can give (a round that scored the
        ``"context"`` variant alone has no ``closed_book_accuracy``, ``aligned_accuracy`` or ``context_lift``)."""
        families = [self.probes[int(i)].family for i in result.probe_indices]
        return compute_metrics(result.scores, families, result.variants, mode=result.mode, per_family=self.per_family,
                               option_scores=result.option_scores, option_roles=result.option_roles)

    @property
    def has_multiple_choice(self) -> bool:
        """Whether any probe carries answer options (then results have :attr:`ScoreResult.option_scores`)."""
        return self._option_width > 0

    def check_model_length(self, model: torch.nn.Module) -> None:
        """Raise :class:`~ctx_callback.errors.ProbeLengthError` when a probe is longer than ``model`` accepts.

        The limit is :func:`~ctx_callback.models.max_positions` of the model's config (of ``model.module`` for
        DDP-style wrappers); a model whose config does not say is not checked. Constant time: the longest item is
        known since encoding, and the items are only walked (for the message) when one does not fit.
        """
        limit = max_positions(config_of(model))
        if limit is not None and limit < self._longest_item:
            check_lengths(self.probes, self.encoded.items, limit)

    def score_raw(self, model: torch.nn.Module, probe_indices: Sequence[int] | None = None, *,
                  variants: Sequence[str] | None = None) -> ScoreResult:
        """Per-probe scores for ``probe_indices`` (all probes by default), without metrics (for sharding).

        Args:
            model: The model to score (called as given; see the class's notes on wrappers).
            probe_indices: Indices into :attr:`probes`; ``None`` for all.
            variants: The encoded variants to score this round (must include ``"context"``); ``None`` for all. The
                items of the other variants are skipped (no forward pass), and the result has columns for the
                scored variants only, so :meth:`metrics` emits no metric of an unscored variant (no NaN rows).
                Every rank of a sharded round must pass the same ``variants``.

        A forward pass that runs out of memory retries the round with smaller batches (see the class's "Out of
        memory"); non-finite scores are kept and counted in :attr:`ScoreResult.nonfinite_scores`.

        Raises:
            ProbeLengthError: A probe is longer than the model's maximum positions (see :meth:`check_model_length`).
            torch.OutOfMemoryError: Even one probe item per forward pass runs out of memory, or out of memory where
                no retry is possible (sharded parameters, the ``"simple"`` engine). Any other error of a forward
                pass is raised as it is, at once.
        """
        round_variants = self.round_variants(variants)
        self.check_model_length(model)
        check_probe_dtype_device(self.probe_dtype, device_of(model))
        start = time.perf_counter()
        if probe_indices is None:
            indices = np.arange(len(self.probes))
        else:
            indices = np.asarray(sorted(set(map(int, probe_indices))), dtype=np.int64)
        items = self.encoded.items_for(indices.tolist())
        if round_variants != self.variants:
            items = [item for item in items if item.variant in round_variants]
        (scores, scored, generations), retries = run_with_backoff(
            lambda: self._score_round(model, indices, items, round_variants), model, self.batcher, self._set_batcher,
            lambda err, budget: smaller_budget(err, budget, synced_gpus=self.synced_gpus,
                                               unbatched_engine=lambda: self._unbatched_engine(items)),
        )
        log_recovered_round(retries, self.batcher, Batcher(self.max_batch_tokens, self.max_batch_size))
        option_scores = option_roles = None
        if self.has_multiple_choice:
            scores, option_scores = scores[..., :2].copy(), scores[..., 2:].copy()
            option_roles = np.array([self._roles[int(i)] for i in indices], dtype=np.int64).reshape(len(indices), 2)
        return ScoreResult(indices, round_variants, scores, generations, self.mode, time.perf_counter() - start,
                           scored=scored, option_scores=option_scores, option_roles=option_roles)

    def _score_round(
        self, model: torch.nn.Module, indices: np.ndarray, items: list[EncodedItem], variants: tuple[str, ...]
    ) -> tuple[np.ndarray, np.ndarray, list[list[str | None]] | None]:
        """One attempt at a round: ``(scores, scored, generations)`` (see :class:`ScoreResult`), with one column per
        scored variant, under :func:`probe_mode` and :func:`probe_autocast`. When the probes include multiple choice,
        ``scores`` is ``[rows, variants, 2 + K]``: the two columns of :attr:`ScoreResult.scores`, then every option's
        score (:meth:`score_raw` splits them)."""
        row_of = {int(p): r for r, p in enumerate(indices)}
        col_of = {v: c for c, v in enumerate(variants)}
        width = self._option_width
        scores = np.full((len(indices), len(variants), 2 + width), np.nan)
        scored = np.zeros((len(indices), len(variants)), dtype=bool)
        generations: list[list[str | None]] | None = None
        with probe_mode(model), probe_autocast(model, self.probe_dtype):
            if self.mode == "loglik":
                for item, values in zip(items, self._loglik(model, items)):
                    r, c = row_of[item.probe_index], col_of[item.variant]
                    scores[r, c] = self._row(item.probe_index, values, width)
                    scored[r, c] = True
            else:
                generations = [[None for _ in variants] for _ in indices]
                texts = self.generation_engine.generate(model, items, synced_gpus=self.synced_gpus)
                for item, text in zip(items, texts):
                    r, c = row_of[item.probe_index], col_of[item.variant]
                    generations[r][c] = text
                    hits = self._hits(item, text)
                    scores[r, c] = self._row(item.probe_index, [float(hit) for hit in hits], width)
                    scored[r, c] = True
        return scores, scored, generations

    def generate(self, model: torch.nn.Module, probe_indices: Sequence[int],
                 variant: str = "context") -> dict[int, str]:
        """Greedy answers to ``variant``'s prompt of the probes ``probe_indices`` (probe index -> output), whatever the
        scorer's mode, under :func:`probe_mode` (the label check of :mod:`ctx_callback.label_check`). With
        :attr:`synced_gpus`, every rank must pass the same number of probes."""
        items = [item for item in self.encoded.items_for(list(probe_indices)) if item.variant == variant]
        with probe_mode(model), probe_autocast(model, self.probe_dtype):
            texts = self.generation_engine.generate(model, items, synced_gpus=self.synced_gpus) if items else []
        return {item.probe_index: text for item, text in zip(items, texts)}

    def _hits(self, item: EncodedItem, text: str) -> list[bool]:
        """Generation mode: which of the item's answers ``text`` names (the irrelevant variant's are the lure and the
        parametric answer)."""
        probe = self.probes[item.probe_index]
        passages = self.encoded.irrelevant
        if item.variant == "irrelevant" and passages is not None and passages[item.probe_index] is not None:
            return passages[item.probe_index].hits(probe, text)  # type: ignore[union-attr]
        return answer_hits(probe, text)

    def _row(self, probe_index: int, values: Sequence[float], width: int) -> np.ndarray:
        """One cell's scores: ``(counterfactual, strongest rival)`` followed by ``width`` option columns (the
        answers' scores, NaN-padded). A two-answer probe's rival is its parametric answer."""
        probe = self.probes[probe_index]
        values = np.asarray(values, dtype=np.float64)
        out = np.full(2 + width, np.nan)
        cf = probe.counterfactual_index
        out[0] = values[cf]
        # max() of the other answers; NaN (non-finite logits) propagates and is counted by nonfinite_scores.
        out[1] = np.max(np.delete(values, cf))
        if width:
            out[2:2 + len(values)] = values
        return out

    def _unbatched_engine(self, items: list[EncodedItem]) -> str | None:
        """The name of the log-likelihood engine for ``items`` when it runs one row per forward pass (no batch an
        out-of-memory retry could shrink), else ``None`` (also in generation mode, which batches)."""
        if self.mode == "loglik" and not self._loglik_engine_for(items).uses_batcher:
            return self._loglik_engine_for(items).name
        return None

    def _set_batcher(self, batcher: Batcher) -> None:
        """Cut every engine's later forward passes with ``batcher``."""
        self.batcher = batcher
        self.loglik_engine.set_batcher(batcher)
        self._fallback_engine.set_batcher(batcher)
        self.generation_engine.set_batcher(batcher)

    def known_probe_indices(self, model: torch.nn.Module,
                            distractors: int = 0) -> tuple[list[int], dict[str, dict[str, int]]]:
        """Knowledge verification: probes whose parametric answer the model prefers closed-book (multiple choice: over
        every other option; a probe whose parametric option is unknown is never kept), and with ``distractors=k``
        also over ``k`` length-matched answers of other probes of its family (:mod:`ctx_callback.known_facts`).

        Returns:
            ``(indices, counts)`` where counts maps each family to ``{"kept": k, "total": n}``, with
            ``"known_without_distractors"`` (the probes that passed the counterfactual comparison) when
            ``distractors > 0``.
        """
        if "closed_book" not in self.variants:
            raise ValueError("knowledge verification needs the 'closed_book' variant.")
        result = self.score_raw(model, variants=("context", "closed_book"))  # what the check reads
        table = ScoreTable(result.scores, {v: c for c, v in enumerate(result.variants)}, result.mode,
                           result.option_scores, result.option_roles)
        if result.mode == "loglik":
            known = table.parametric_wins("closed_book") == 1  # multiple choice: over every other option
        else:
            known = (table.parametric("closed_book") == 1) & (table.counterfactual("closed_book") == 0)
        candidates = [int(index) for row, index in enumerate(result.probe_indices) if known[row]]
        beats = self._beats_distractors(model, distractors, candidates) if distractors else None
        counts: dict[str, dict[str, int]] = {}
        kept = []
        for row, index in enumerate(result.probe_indices):
            family = self.probes[int(index)].family
            entry = counts.setdefault(family, {"kept": 0, "total": 0})
            entry["total"] += 1
            if beats is not None:
                entry["known_without_distractors"] = entry.get("known_without_distractors", 0) + int(known[row])
            if known[row] and (beats is None or beats[int(index)]):
                entry["kept"] += 1
                kept.append(int(index))
        return kept, counts

    def _beats_distractors(self, model: torch.nn.Module, k: int, candidates: Sequence[int]) -> list[bool]:
        """Per probe: the parametric answer scores above each of its ``k`` distractors closed-book (``True`` for a
        probe without distractors). Only the ``candidates`` (the probes that passed the counterfactual comparison)
        are scored; the others are never kept anyway."""
        distractors = length_matched_distractors(self.probes, self.tokenizer, k)
        wanted = set(candidates)
        distractors = [extra if index in wanted else () for index, extra in enumerate(distractors)]
        items = distractor_items(self.probes, distractors, self.tokenizer, self.prompt_format)
        beats = [True] * len(self.probes)
        with probe_mode(model), probe_autocast(model, self.probe_dtype):
            scores = self._fallback_engine.score(model, items) if items else []
        for item, values in zip(items, scores):
            beats[item.probe_index] = bool(values[0] > max(values[1:]))
        return beats

    # -- orchestration --------------------------------------------------------------------------------------------
    def _loglik(self, model: torch.nn.Module, items: list[EncodedItem]) -> list[tuple[float, ...]]:
        """The chosen engine's scores; a call it is not applicable to (``"prefix"`` without a shared preamble) is
        scored by the batched engine."""
        if not items:
            return []
        return self._loglik_engine_for(items).score(model, items)

    def _loglik_engine_for(self, items: list[EncodedItem]) -> LoglikEngine:
        """The chosen engine, or the batched one for items it is not applicable to."""
        if self.loglik_engine.applicable(items):
            return self.loglik_engine
        return self._fallback_engine


