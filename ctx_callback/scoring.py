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
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .encoding import ALL_VARIANTS, EncodedItem, EncodedProbes, check_lengths, encode_probes
from .engines import (
    FALLBACK_ENGINE,
    AutoEngine,
    Batcher,
    GenerationEngine,
    LoglikEngine,
    create_loglik_engine,
    engine_names,
)
from .errors import ConfigurationError
from .formatting import resolve_prompt_format
from .matching import match_answers, normalize_answer
from .metrics import compute_metrics
from .models import max_positions
from .probes import Probe

__all__ = ["ProbeScorer", "ScoreReport", "ScoreResult", "normalize_answer", "probe_mode"]

_MODES = ("loglik", "generate")


# ----------------------------------------------------------------------------------------------------------------
# Hygiene: a probe leaves the model and the RNGs exactly as it found them
# ----------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def probe_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode + ``no_grad`` for a probe; restore each module's mode and all RNG states afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    py_state = random.getstate()
    np_state = np.random.get_state()
    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, was_training in modes:
            module.training = was_training
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


# ----------------------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ScoreResult:
    """Raw per-probe scores for a subset (shard) of probes; merge shards with :meth:`merge`.

    Attributes:
        probe_indices: Indices into the scorer's probe list, one per row.
        variants: Column names (``"context"``, ``"closed_book"``, ``"aligned"``).
        scores: ``[rows, variants, 2]`` float64. Log-likelihood mode: summed log-probability of the
            counterfactual (``0``) and parametric (``1``) answer; generation mode: 1.0/0.0 hits. NaN = not scored.
        generations: Generation mode: ``[rows][variants]`` generated texts (``None`` where not scored).
        mode: ``"loglik"`` or ``"generate"``.
        seconds: Wall time spent scoring.
    """

    probe_indices: np.ndarray
    variants: tuple[str, ...]
    scores: np.ndarray
    generations: list[list[str | None]] | None = None
    mode: str = "loglik"
    seconds: float = 0.0

    @classmethod
    def merge(cls, results: Sequence[ScoreResult]) -> ScoreResult:
        """Concatenate shards (sorted by probe index; a probe scored twice keeps its first score)."""
        if not results:
            raise ValueError("nothing to merge")
        indices = np.concatenate([r.probe_indices for r in results])
        _, first = np.unique(indices, return_index=True)
        order = first[np.argsort(indices[first], kind="stable")]
        gens = None
        if all(r.generations is not None for r in results):
            flat = [g for r in results for g in r.generations]  # type: ignore[union-attr]
            gens = [flat[i] for i in order]
        return cls(
            probe_indices=indices[order],
            variants=results[0].variants,
            scores=np.concatenate([r.scores for r in results])[order],
            generations=gens,
            mode=results[0].mode,
            seconds=max(r.seconds for r in results),
        )


@dataclass
class ScoreReport:
    """What :meth:`ProbeScorer.score` returns: metrics plus per-probe records."""

    metrics: dict[str, float]
    result: ScoreResult
    probes: list[Probe] = field(repr=False)

    @property
    def records(self) -> list[dict[str, Any]]:
        """One dict per scored probe: id, family, answers, and the score of each (variant, answer)."""
        rows = []
        for row, index in enumerate(self.result.probe_indices):
            probe = self.probes[int(index)]
            record: dict[str, Any] = {
                "id": probe.id,
                "family": probe.family,
                "counterfactual_answer": probe.counterfactual_answer,
                "parametric_answer": probe.parametric_answer,
            }
            for col, variant in enumerate(self.result.variants):
                cf, par = self.result.scores[row, col]
                kind = "logprob" if self.result.mode == "loglik" else "hit"
                record[f"{variant}_counterfactual_{kind}"] = None if np.isnan(cf) else float(cf)
                record[f"{variant}_parametric_{kind}"] = None if np.isnan(par) else float(par)
                if self.result.generations is not None:
                    record[f"{variant}_generation"] = self.result.generations[row][col]
            rows.append(record)
        return rows


# ----------------------------------------------------------------------------------------------------------------
# The scorer
# ----------------------------------------------------------------------------------------------------------------


def _model_config(model: Any) -> Any:
    """``model.config``, else that of a DDP-style ``model.module``; ``None`` when neither has one."""
    for candidate in (model, getattr(model, "module", None)):
        config = getattr(candidate, "config", None)
        if config is not None:
            return config
    return None


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
        variants: Which rows to score per probe: ``"context"`` (always), ``"closed_book"``, ``"aligned"``.
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

    Raises:
        ConfigurationError: An argument is out of range or names an unknown mode, engine or variant.
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
        variants: Sequence[str] = ALL_VARIANTS,
        engine: str = "auto",
        max_batch_tokens: int = 8192,
        max_batch_size: int = 64,
        max_new_tokens: int = 24,
        max_length: int | None = None,
        system_prompt: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        per_family: bool = True,
    ) -> None:
        if mode not in _MODES:
            raise ConfigurationError(f"mode must be one of {list(_MODES)}, got {mode!r}.")
        if engine not in engine_names():
            raise ConfigurationError(f"engine must be one of {list(engine_names())}, got {engine!r}.")
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

    def score(self, model: torch.nn.Module, probe_indices: Sequence[int] | None = None) -> ScoreReport:
        """Score ``model`` on all probes (or ``probe_indices``) and compute the metrics."""
        result = self.score_raw(model, probe_indices)
        return ScoreReport(metrics=self.metrics(result), result=result, probes=self.probes)

    def metrics(self, result: ScoreResult) -> dict[str, float]:
        """Metrics of a (merged) :class:`ScoreResult`."""
        families = [self.probes[int(i)].family for i in result.probe_indices]
        return compute_metrics(result.scores, families, result.variants, mode=result.mode, per_family=self.per_family)

    def check_model_length(self, model: torch.nn.Module) -> None:
        """Raise :class:`~ctx_callback.errors.ProbeLengthError` when a probe is longer than ``model`` accepts.

        The limit is :func:`~ctx_callback.models.max_positions` of the model's config (of ``model.module`` for
        DDP-style wrappers); a model whose config does not say is not checked. Constant time: the longest item is
        known since encoding, and the items are only walked (for the message) when one does not fit.
        """
        limit = max_positions(_model_config(model))
        if limit is not None and limit < self._longest_item:
            check_lengths(self.probes, self.encoded.items, limit)

    def score_raw(self, model: torch.nn.Module, probe_indices: Sequence[int] | None = None) -> ScoreResult:
        """Per-probe scores for ``probe_indices`` (all probes by default), without metrics (for sharding).

        Raises:
            ProbeLengthError: A probe is longer than the model's maximum positions (see :meth:`check_model_length`).
        """
        self.check_model_length(model)
        start = time.perf_counter()
        if probe_indices is None:
            indices = np.arange(len(self.probes))
        else:
            indices = np.asarray(sorted(set(map(int, probe_indices))), dtype=np.int64)
        row_of = {int(p): r for r, p in enumerate(indices)}
        col_of = {v: c for c, v in enumerate(self.variants)}
        scores = np.full((len(indices), len(self.variants), 2), np.nan)
        items = self.encoded.items_for(indices.tolist())
        generations: list[list[str | None]] | None = None
        with probe_mode(model):
            if self.mode == "loglik":
                for item, values in zip(items, self._loglik(model, items)):
                    scores[row_of[item.probe_index], col_of[item.variant]] = values
            else:
                generations = [[None for _ in self.variants] for _ in indices]
                texts = self.generation_engine.generate(model, items, synced_gpus=self.synced_gpus)
                for item, text in zip(items, texts):
                    r, c = row_of[item.probe_index], col_of[item.variant]
                    probe = self.probes[item.probe_index]
                    generations[r][c] = text
                    # The longer answer first: "New York" is no hit for "York" (see ctx_callback.matching).
                    cf_hit, par_hit = match_answers(text, [
                        (probe.counterfactual_answer, *probe.counterfactual_aliases),
                        (probe.parametric_answer, *probe.parametric_aliases),
                    ])
                    scores[r, c, 0] = float(cf_hit)
                    scores[r, c, 1] = float(par_hit)
        return ScoreResult(indices, self.variants, scores, generations, self.mode, time.perf_counter() - start)

    def known_probe_indices(self, model: torch.nn.Module) -> tuple[list[int], dict[str, dict[str, int]]]:
        """Knowledge verification: probes whose parametric answer the model prefers closed-book.

        Returns:
            ``(indices, counts)`` where counts maps each family to ``{"kept": k, "total": n}``.
        """
        if "closed_book" not in self.variants:
            raise ValueError("knowledge verification needs the 'closed_book' variant.")
        result = self.score_raw(model)
        col = self.variants.index("closed_book")
        if result.mode == "loglik":
            known = result.scores[:, col, 1] > result.scores[:, col, 0]
        else:
            known = (result.scores[:, col, 1] == 1) & (result.scores[:, col, 0] == 0)
        counts: dict[str, dict[str, int]] = {}
        kept = []
        for row, index in enumerate(result.probe_indices):
            family = self.probes[int(index)].family
            entry = counts.setdefault(family, {"kept": 0, "total": 0})
            entry["total"] += 1
            if known[row]:
                entry["kept"] += 1
                kept.append(int(index))
        return kept, counts

    # -- orchestration --------------------------------------------------------------------------------------------
    def _loglik(self, model: torch.nn.Module, items: list[EncodedItem]) -> list[tuple[float, float]]:
        """The chosen engine's scores; a call it is not applicable to (``"prefix"`` without a shared preamble) is
        scored by the batched engine."""
        if not items:
            return []
        engine = self.loglik_engine
        if not engine.applicable(items):
            engine = self._fallback_engine
        return engine.score(model, items)
