"""The scoring engine: forward-only log-likelihood (default) or greedy generation over encoded probes.

Log-likelihood engines (all compute the same numbers; tests check they agree with the unbatched reference to 1e-5
in fp32):

- ``"prefix"`` (default through ``"auto"``): a prefix cache. The prompt preamble that every probe shares (the chat
  template's system prompt) is run once per round; each probe's prompt is run once, and both candidate answers
  continue from its KV cache; the vocabulary projection is computed only at answer positions. Needs a model
  that accepts a ``DynamicCache`` and ``position_ids`` (every decoder-only model in transformers does); ``"auto"``
  falls back to ``"batched"`` with a warning if the model rejects it.
- ``"batched"``: one row per (prompt, answer), length-sorted batches with right padding, projection only at answer
  positions (``logits_to_keep`` with a boolean mask).
- ``"simple"``: the reference, one unbatched forward per (prompt, answer) pair. Slow; for tests and benchmarks.

Forward passes run under ``torch.no_grad()`` (not ``inference_mode``: inference tensors cached inside modules
break a later backward), with ``use_cache`` off except for the prefix cache, in ``eval`` mode. :func:`probe_mode`
restores every module's train/eval flag and the Python, NumPy and torch RNG states afterwards.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import random
import re
import time
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .encoding import ALL_VARIANTS, EncodedItem, EncodedProbes, encode_probes
from .formatting import resolve_prompt_format
from .metrics import compute_metrics
from .probes import Probe

__all__ = ["ProbeScorer", "ScoreReport", "ScoreResult", "normalize_answer", "probe_mode"]

logger = logging.getLogger(__name__)

_ENGINES = ("auto", "prefix", "batched", "simple")
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


def _device_of(model: torch.nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def _cache_kwarg(model: torch.nn.Module) -> str:
    """transformers >= 5.24 renamed ``past_key_values`` to ``cache`` (the old name is deprecated)."""
    base = model
    for attr in ("get_base_model",):
        if hasattr(base, attr):
            base = getattr(base, attr)()
    try:
        params = inspect.signature(type(base).forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _output_cache(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


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
        num_tokens: ``[rows, variants, 2]`` answer lengths in tokens (log-likelihood mode).
        generations: Generation mode: ``[rows][variants]`` generated texts (``None`` where not scored).
        mode: ``"loglik"`` or ``"generate"``.
        seconds: Wall time spent scoring.
    """

    probe_indices: np.ndarray
    variants: tuple[str, ...]
    scores: np.ndarray
    num_tokens: np.ndarray
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
            num_tokens=np.concatenate([r.num_tokens for r in results])[order],
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
# Answer matching for generation mode
# ----------------------------------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = re.compile(r"[^\w\s]")


def normalize_answer(text: str) -> str:
    """Lower-case, strip accents, punctuation and articles, collapse whitespace (SQuAD-style normalization)."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).lower()
    text = _PUNCT.sub(" ", text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _contains(output: str, answers: Sequence[str]) -> bool:
    haystack = f" {normalize_answer(output)} "
    return any(f" {normalize_answer(a)} " in haystack for a in answers if normalize_answer(a))


# ----------------------------------------------------------------------------------------------------------------
# The scorer
# ----------------------------------------------------------------------------------------------------------------


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
        engine: Log-likelihood engine: ``"auto"`` (prefix cache, falling back to ``"batched"``), ``"prefix"``,
            ``"batched"``, ``"simple"``.
        max_batch_tokens: Padded tokens per forward pass (batch size x length).
        max_batch_size: Upper bound on rows per forward pass.
        max_new_tokens: Generation mode: tokens generated per prompt.
        max_length: Longest allowed prompt + answer; probes beyond it are an error at construction.
        system_prompt: Chat format: an optional system message.
        chat_template_kwargs: Chat format: extra ``apply_chat_template`` arguments (use the training ones).
        per_family: Also report ``ctx_reliance/<family>/<metric>``.
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
            raise ValueError(f"mode must be one of {list(_MODES)}, got {mode!r}.")
        if engine not in _ENGINES:
            raise ValueError(f"engine must be one of {list(_ENGINES)}, got {engine!r}.")
        if max_batch_tokens < 1 or max_batch_size < 1 or max_new_tokens < 1:
            raise ValueError(
                f"max_batch_tokens, max_batch_size and max_new_tokens must be >= 1, got "
                f"{max_batch_tokens}, {max_batch_size}, {max_new_tokens}."
            )
        if not probes:
            raise ValueError("ProbeScorer needs at least one probe.")
        if tokenizer is None:
            raise ValueError("ProbeScorer needs the training tokenizer (got None).")
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
        self._resolved_engine: str | None = None if engine == "auto" else engine
        self._eos_ids = self._stop_token_ids(tokenizer)
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
        """The log-likelihood engine in use: the requested one, or what ``"auto"`` resolved to so far."""
        if self._resolved_engine is not None:
            return self._resolved_engine
        return "prefix" if self.encoded.shared_prefix else "batched"

    def score(self, model: torch.nn.Module, probe_indices: Sequence[int] | None = None) -> ScoreReport:
        """Score ``model`` on all probes (or ``probe_indices``) and compute the metrics."""
        result = self.score_raw(model, probe_indices)
        return ScoreReport(metrics=self.metrics(result), result=result, probes=self.probes)

    def metrics(self, result: ScoreResult) -> dict[str, float]:
        """Metrics of a (merged) :class:`ScoreResult`."""
        families = [self.probes[int(i)].family for i in result.probe_indices]
        return compute_metrics(result.scores, families, result.variants, mode=result.mode, per_family=self.per_family)

    def score_raw(self, model: torch.nn.Module, probe_indices: Sequence[int] | None = None) -> ScoreResult:
        """Per-probe scores for ``probe_indices`` (all probes by default), without metrics (for sharding)."""
        start = time.perf_counter()
        indices = np.arange(len(self.probes)) if probe_indices is None else np.asarray(sorted(set(map(int, probe_indices))), dtype=np.int64)
        row_of = {int(p): r for r, p in enumerate(indices)}
        col_of = {v: c for c, v in enumerate(self.variants)}
        scores = np.full((len(indices), len(self.variants), 2), np.nan)
        num_tokens = np.zeros((len(indices), len(self.variants), 2), dtype=np.int64)
        items = self.encoded.items_for(indices.tolist())
        generations = None
        with probe_mode(model):
            if self.mode == "loglik":
                for item, values in zip(items, self._loglik(model, items)):
                    r, c = row_of[item.probe_index], col_of[item.variant]
                    scores[r, c] = values
                    num_tokens[r, c] = (len(item.counterfactual_ids), len(item.parametric_ids))
            else:
                generations = [[None] * len(self.variants) for _ in indices]
                for item, text in zip(items, self._generate(model, items)):
                    r, c = row_of[item.probe_index], col_of[item.variant]
                    probe = self.probes[item.probe_index]
                    generations[r][c] = text
                    scores[r, c, 0] = float(_contains(text, (probe.counterfactual_answer, *probe.counterfactual_aliases)))
                    scores[r, c, 1] = float(_contains(text, (probe.parametric_answer, *probe.parametric_aliases)))
        return ScoreResult(indices, self.variants, scores, num_tokens, generations, self.mode, time.perf_counter() - start)

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

    # -- log-likelihood engines -----------------------------------------------------------------------------------
    def _loglik(self, model: torch.nn.Module, items: list[EncodedItem]) -> list[tuple[float, float]]:
        if not items:
            return []
        engine = self.active_engine
        if engine == "prefix" and self._prefix_length(items) == 0:
            engine = "batched"
        if engine == "prefix":
            try:
                return self._loglik_prefix(model, items)
            except Exception as err:  # noqa: BLE001 - auto mode degrades gracefully, explicit mode re-raises
                if self.engine == "prefix":
                    raise
                logger.warning(
                    "ctx_callback: the prefix-cache engine failed on %s (%s: %s); using the batched engine.",
                    type(model).__name__, type(err).__name__, err,
                )
                self._resolved_engine = "batched"
                engine = "batched"
        if engine == "batched":
            return self._loglik_batched(model, items)
        return self._loglik_simple(model, items)

    def _loglik_simple(self, model: torch.nn.Module, items: list[EncodedItem]) -> list[tuple[float, float]]:
        device = _device_of(model)
        out = []
        for item in items:
            pair = []
            for answer in (item.counterfactual_ids, item.parametric_ids):
                ids = torch.tensor([list(item.prompt_ids) + list(answer)], device=device)
                logits = model(input_ids=ids, use_cache=False).logits[0].float()
                p = len(item.prompt_ids)
                logp = torch.log_softmax(logits[p - 1 : p - 1 + len(answer)], dim=-1)
                pair.append(float(logp.gather(1, torch.tensor(answer, device=device)[:, None]).sum()))
            out.append((pair[0], pair[1]))
        return out

    def _batches(self, lengths: Sequence[int], rows_per_unit: int = 1) -> list[list[int]]:
        """Length-sorted batches of indices within the token and row budgets."""
        order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
        batches, current, longest = [], [], 0
        for i in order:
            new_longest = max(longest, lengths[i])
            rows = (len(current) + 1) * rows_per_unit
            if current and (rows * new_longest > self.max_batch_tokens or rows > self.max_batch_size):
                batches.append(current)
                current, new_longest = [], lengths[i]
            current.append(i)
            longest = new_longest
        if current:
            batches.append(current)
        return batches

    def _loglik_batched(self, model: torch.nn.Module, items: list[EncodedItem]) -> list[tuple[float, float]]:
        device = _device_of(model)
        pad = self.encoded.pad_token_id
        rows = [(i, k, item.prompt_ids, ans) for i, item in enumerate(items)
                for k, ans in enumerate((item.counterfactual_ids, item.parametric_ids))]
        results = np.zeros((len(items), 2))
        for batch in self._batches([len(r[2]) + len(r[3]) for r in rows]):
            width = max(len(rows[b][2]) + len(rows[b][3]) for b in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            keep = torch.zeros((len(batch), width), dtype=torch.bool)
            targets = []
            for r, b in enumerate(batch):
                _, _, prompt, answer = rows[b]
                seq = list(prompt) + list(answer)
                input_ids[r, : len(seq)] = torch.tensor(seq)
                attention[r, : len(seq)] = 1
                keep[r, len(prompt) - 1 : len(seq) - 1] = True
                targets.extend(answer)
            logits = model(
                input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False,
                logits_to_keep=keep.to(device),
            ).logits
            if logits.dim() == 3:  # a model that ignored the boolean logits_to_keep
                logits = logits[keep.to(logits.device)]
            sums = self._answer_logprob_sums(logits, targets, [len(rows[b][3]) for b in batch])
            for b, value in zip(batch, sums):
                results[rows[b][0], rows[b][1]] = value
        return [tuple(map(float, r)) for r in results]

    @staticmethod
    def _answer_logprob_sums(logits: torch.Tensor, targets: list[int], lengths: list[int]) -> list[float]:
        """Sum of log p(target) over each answer's consecutive rows of ``logits`` ([sum(lengths), vocab])."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        tok = torch.tensor(targets, device=logp.device)
        per_token = logp.gather(1, tok[:, None])[:, 0].double().cpu()
        return [float(chunk.sum()) for chunk in torch.split(per_token, lengths)]

    def _prefix_length(self, items: list[EncodedItem]) -> int:
        """Shared preamble length, leaving at least one prompt token per item for the tail pass."""
        shortest = min(len(item.prompt_ids) for item in items)
        return min(len(self.encoded.shared_prefix), shortest - 1)

    def _loglik_prefix(self, model: torch.nn.Module, items: list[EncodedItem]) -> list[tuple[float, float]]:
        from transformers import DynamicCache

        device = _device_of(model)
        pad = self.encoded.pad_token_id
        cache_kw = _cache_kwarg(model)
        config = getattr(model, "config", None)
        p0 = self._prefix_length(items)
        preamble = torch.tensor([self.encoded.shared_prefix[:p0]], device=device)
        out = model(input_ids=preamble, use_cache=True, logits_to_keep=1)
        base_cache = [(layer[0], layer[1]) for layer in _output_cache(out)]
        results = np.zeros((len(items), 2))
        # Budget: the tail pass holds B x tail tokens; the answer pass 2B x answer tokens over a cache of p0 + tail.
        lengths = [len(item.prompt_ids) - p0 + max(len(item.counterfactual_ids), len(item.parametric_ids))
                   for item in items]
        for batch in self._batches(lengths, rows_per_unit=2):
            bsz = len(batch)
            tails = [items[b].prompt_ids[p0:-1] for b in batch]  # all but the last prompt token
            t_width = max(len(t) for t in tails)
            cache = DynamicCache(
                ddp_cache_data=[(k.expand(bsz, -1, -1, -1), v.expand(bsz, -1, -1, -1)) for k, v in base_cache],
                config=config,
            )
            prefix_mask = torch.ones((bsz, p0), dtype=torch.long)
            tail_mask = torch.zeros((bsz, t_width), dtype=torch.long)
            if t_width > 0:
                tail_ids = torch.full((bsz, t_width), pad, dtype=torch.long)
                for r, tail in enumerate(tails):
                    tail_ids[r, : len(tail)] = torch.tensor(tail, dtype=torch.long)
                    tail_mask[r, : len(tail)] = 1
                positions = (p0 + torch.arange(t_width)).expand(bsz, -1)
                out = model(
                    input_ids=tail_ids.to(device),
                    attention_mask=torch.cat([prefix_mask, tail_mask], 1).to(device),
                    position_ids=positions.to(device),
                    use_cache=True,
                    logits_to_keep=1,
                    **{cache_kw: cache},
                )
                cache = _output_cache(out)
            cache.batch_repeat_interleave(2)
            # Answer pass: [last prompt token] + answer[:-1] predicts answer[0..n-1], for cf and par of each item.
            answers = [(items[b].prompt_ids[-1:], ans) for b in batch
                       for ans in (items[b].counterfactual_ids, items[b].parametric_ids)]
            a_width = max(len(ans) for _, ans in answers)
            ans_ids = torch.full((2 * bsz, a_width), pad, dtype=torch.long)
            ans_mask = torch.zeros((2 * bsz, a_width), dtype=torch.long)
            positions = torch.zeros((2 * bsz, a_width), dtype=torch.long)
            targets: list[int] = []
            for r, (last, ans) in enumerate(answers):
                seq = list(last) + list(ans[:-1])
                ans_ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                ans_mask[r, : len(seq)] = 1
                start = p0 + len(tails[r // 2])
                positions[r] = start + torch.arange(a_width)
                targets.extend(ans)
            attention = torch.cat(
                [prefix_mask.repeat_interleave(2, 0), tail_mask.repeat_interleave(2, 0), ans_mask], 1
            )
            keep = ans_mask.bool()
            logits = model(
                input_ids=ans_ids.to(device),
                attention_mask=attention.to(device),
                position_ids=positions.to(device),
                use_cache=True,
                logits_to_keep=keep.to(device),
                **{cache_kw: cache},
            ).logits
            if logits.dim() == 3:
                logits = logits[keep.to(logits.device)]
            sums = self._answer_logprob_sums(logits, targets, [len(ans) for _, ans in answers])
            for r, value in enumerate(sums):
                results[batch[r // 2], r % 2] = value
        return [tuple(map(float, r)) for r in results]

    # -- generation ---------------------------------------------------------------------------------------------
    @staticmethod
    def _stop_token_ids(tokenizer: Any) -> list[int]:
        ids = []
        if tokenizer.eos_token_id is not None:
            ids.append(int(tokenizer.eos_token_id))
        for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
            tid = tokenizer.convert_tokens_to_ids(token) if token in tokenizer.get_vocab() else None
            if tid is not None and tid not in ids:
                ids.append(int(tid))
        return ids

    def _generate(self, model: torch.nn.Module, items: list[EncodedItem]) -> list[str]:
        from transformers import GenerationConfig

        device = _device_of(model)
        pad = self.encoded.pad_token_id
        config = GenerationConfig(
            max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad,
            eos_token_id=self._eos_ids or None,
        )
        texts: list[str] = [""] * len(items)
        lengths = [len(item.prompt_ids) + self.max_new_tokens for item in items]
        for batch in self._batches(lengths):
            width = max(len(items[b].prompt_ids) for b in batch)
            # Left padding, built here: the tokenizer's padding_side is never touched.
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for r, b in enumerate(batch):
                ids = items[b].prompt_ids
                input_ids[r, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                attention[r, width - len(ids):] = 1
            output = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention.to(device), generation_config=config,
                synced_gpus=self.synced_gpus,
            )
            for r, b in enumerate(batch):
                texts[b] = self.tokenizer.decode(output[r, width:], skip_special_tokens=True).strip()
        return texts
