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
"""

from __future__ import annotations

import contextlib
import logging
import platform
import random
import time
import warnings
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
    is_out_of_memory,
)
from .engines.base import device_of
from .errors import ConfigurationError, quote_error
from .formatting import resolve_prompt_format
from .matching import match_answers, normalize_answer, option_label
from .metrics import ScoreTable, compute_metrics
from .models import max_positions
from .probes import Probe

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

logger = logging.getLogger(__name__)

_MODES = ("loglik", "generate")

#: What ``probe_dtype`` accepts besides ``None`` (the dtype the training step uses), and the torch dtype of each.
PROBE_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------------------------------------------
# Probe precision: autocast in a lower dtype, weights untouched
# ----------------------------------------------------------------------------------------------------------------


def resolve_probe_dtype(probe_dtype: Any) -> str | None:
    """Validate a ``probe_dtype`` option and return its canonical name.

    Args:
        probe_dtype: ``None`` (probe in the dtype the training step uses: the model as given, under the Trainer's
            autocast if any), ``"bfloat16"`` or ``"float16"`` (or the matching ``torch.dtype``): probe under
            ``torch.autocast(device_type, dtype=...)``, the weights left as they are.

    Returns:
        ``None``, ``"bfloat16"`` or ``"float16"``.

    Warns:
        UserWarning: ``"bfloat16"`` without CUDA on a CPU without native bf16 (see :func:`cpu_has_native_bf16`), once
            per process: there it is 3-4x slower than float32.

    Raises:
        ConfigurationError: Any other value, or ``"float16"`` where CUDA is not available (float16 autocast is
            supported on CUDA only here: on CPU it is slow and overflows where bfloat16 does not).
    """
    if probe_dtype is None:
        return None
    if isinstance(probe_dtype, torch.dtype):
        names = {dtype: name for name, dtype in PROBE_DTYPES.items()}
        name = names.get(probe_dtype)
    else:
        name = probe_dtype if isinstance(probe_dtype, str) and probe_dtype in PROBE_DTYPES else None
    if name is None:
        raise ConfigurationError(
            f"probe_dtype must be None (the dtype the training step uses) or one of {list(PROBE_DTYPES)}, got "
            f"{probe_dtype!r}. It sets the autocast dtype of the probe forward passes; the weights are not cast."
        )
    if name == "float16" and not torch.cuda.is_available():
        raise ConfigurationError(
            'probe_dtype="float16" needs a CUDA device (float16 autocast is not supported for probing on CPU); '
            'use probe_dtype="bfloat16" on CPU, or None.'
        )
    if name == "bfloat16" and not torch.cuda.is_available():  # the model will run on this CPU: say so up front
        _warn_if_bf16_is_emulated(name, "cpu")
    return name


def cpu_has_native_bf16() -> bool | None:
    """Whether this CPU computes bfloat16 matrix products natively, as torch dispatches them here.

    x86: the CPU has AVX-512 BF16 or AMX *and* torch runs its AVX-512 kernels
    (``torch.backends.cpu.get_cpu_capability()`` starts with ``"AVX512"``; ``ATEN_CPU_CAPABILITY=avx2`` turns them
    off). Other architectures: ``None`` (unknown; no claim is made).

    Returns:
        ``True``, ``False``, or ``None`` where it cannot be told.
    """
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return None
    capability = str(torch.backends.cpu.get_cpu_capability()).upper()
    cpu = getattr(torch, "cpu", None)
    has_bf16 = any(bool(getattr(cpu, probe, lambda: False)())
                   for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return capability.startswith("AVX512") and has_bf16


#: Capabilities already warned about (the warning is given once per process).
_WARNED_SLOW_BF16: set[str] = set()


def _warn_if_bf16_is_emulated(probe_dtype: str | None, device_type: str) -> None:
    if probe_dtype != "bfloat16" or device_type != "cpu" or cpu_has_native_bf16() is not False:
        return
    capability = str(torch.backends.cpu.get_cpu_capability())
    if capability in _WARNED_SLOW_BF16:
        return
    _WARNED_SLOW_BF16.add(capability)
    warnings.warn(
        f'probe_dtype="bfloat16" on a CPU without native bfloat16 (torch CPU capability {capability}; no AVX-512 BF16 '
        "or AMX in use): bf16 autocast is emulated here and is SLOWER than float32, not faster (measured 3-4x slower "
        "on an AVX2-only AMD EPYC: SmolLM2-135M, 16 x 128 tokens, 13-20 s in float32, 59-66 s under bf16 autocast). "
        "Use probe_dtype=None (the default) on this machine; bfloat16 pays off on CPUs with AVX-512 BF16 / AMX and "
        "on GPUs.",
        UserWarning,
        stacklevel=2,
    )


def check_probe_dtype_device(probe_dtype: str | None, device: torch.device | str) -> None:
    """Raise when ``probe_dtype`` cannot run on ``device`` (float16 off CUDA; no autocast for the device type).

    Also warns, once per process, when ``"bfloat16"`` is asked for on a CPU without native bf16 (see
    :func:`cpu_has_native_bf16`): there bf16 autocast is 3-4x slower than float32.

    Raises:
        ConfigurationError: Naming the dtype and the device.
    """
    if probe_dtype is None:
        return
    device_type = torch.device(device).type
    _warn_if_bf16_is_emulated(probe_dtype, device_type)
    if probe_dtype == "float16" and device_type != "cuda":
        raise ConfigurationError(
            f'probe_dtype="float16" is supported on CUDA only, but the model is on {device_type!r}; use '
            'probe_dtype="bfloat16" (native on CPUs with AVX-512 BF16 / AMX) or None.'
        )
    if not torch.amp.is_autocast_available(device_type):
        raise ConfigurationError(
            f"probe_dtype={probe_dtype!r}: torch has no autocast for device type {device_type!r}; use None."
        )


def probe_autocast(model: torch.nn.Module, probe_dtype: str | None) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast(<model's device type>, dtype=probe_dtype)``, or a no-op context for ``None``.

    Under autocast, matrix multiplications run in ``probe_dtype`` on bf16/fp16 copies of the weights (cached for the
    context's duration: about half an fp32 model's size, freed on exit); the parameters are never modified. Where the
    model's forward wraps itself in the Trainer's own autocast (``bf16=True``/``fp16=True`` training), that inner
    autocast takes precedence, so the round runs in the training precision anyway.

    Raises:
        ConfigurationError: See :func:`check_probe_dtype_device`.
    """
    if probe_dtype is None:
        return contextlib.nullcontext()
    device = device_of(model)
    check_probe_dtype_device(probe_dtype, device)
    return torch.autocast(device.type, dtype=PROBE_DTYPES[probe_dtype])


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
        scored: ``[rows, variants]`` bool: which (probe, variant) cells were scored (a probe without an aligned
            context has no ``"aligned"`` row). ``None`` for results built without it: then every ``"context"`` cell
            counts as scored (every probe has one) and so does every infinite value.
        option_scores: Multiple choice: ``[rows, variants, K]`` float64, the score (log-probability, or 1.0/0.0 hit)
            of every answer option in the probe's order (:attr:`~ctx_callback.probes.Probe.answers`), NaN-padded past
            a probe's own count; a two-answer row holds ``(counterfactual, parametric)``. ``None`` when the scorer's
            probes all have two answers. For a multiple-choice row ``scores[r, c, 0]`` is the counterfactual option
            and ``scores[r, c, 1]`` its strongest rival (the best other option; in generation mode, whether any other
            option was named), so ``scores[r, c, 0] > scores[r, c, 1]`` means "the counterfactual answer wins" for
            every probe.
        option_roles: With ``option_scores``: ``[rows, 2]`` int64, the position of the counterfactual and of the
            parametric option in each row's options (``-1``: parametric answer unknown); ``(0, 1)`` for two answers.
    """

    probe_indices: np.ndarray
    variants: tuple[str, ...]
    scores: np.ndarray
    generations: list[list[str | None]] | None = None
    mode: str = "loglik"
    seconds: float = 0.0
    scored: np.ndarray | None = None
    option_scores: np.ndarray | None = None
    option_roles: np.ndarray | None = None

    @property
    def nonfinite_scores(self) -> int:
        """How many scored values are NaN or infinite (NaN/inf logits, a diverged model): a round with any is not
        trustworthy, however finite its metrics over the rest look."""
        bad = ~np.isfinite(self.scores)
        if self.scored is not None:
            return int(np.count_nonzero(bad & self.scored[..., None]))
        count = int(np.count_nonzero(np.isinf(self.scores)))
        if "context" in self.variants:
            col = self.variants.index("context")
            count += int(np.count_nonzero(np.isnan(self.scores[:, col])))
        return count

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
        scored = None
        if all(r.scored is not None for r in results):
            scored = np.concatenate([r.scored for r in results])[order]  # type: ignore[misc]
        option_scores = option_roles = None
        if any(r.option_scores is not None for r in results):
            width = max(r.option_scores.shape[2] for r in results if r.option_scores is not None)
            padded = []
            for r in results:
                # A shard without options has two answers per row: (counterfactual, parametric) = its scores.
                values = r.option_scores if r.option_scores is not None else r.scores
                extra = np.full(values.shape[:2] + (width - values.shape[2],), np.nan)
                padded.append(np.concatenate([values, extra], axis=2))
            option_scores = np.concatenate(padded)[order]
            option_roles = np.concatenate([
                r.option_roles if r.option_roles is not None else np.tile(np.array([0, 1]), (len(r.probe_indices), 1))
                for r in results
            ]).astype(np.int64)[order]
        return cls(
            probe_indices=indices[order],
            variants=results[0].variants,
            scores=np.concatenate([r.scores for r in results])[order],
            generations=gens,
            mode=results[0].mode,
            seconds=max(r.seconds for r in results),
            scored=scored,
            option_scores=option_scores,
            option_roles=option_roles,
        )


@dataclass
class ScoreReport:
    """What :meth:`ProbeScorer.score` returns: metrics plus per-probe records."""

    metrics: dict[str, float]
    result: ScoreResult
    probes: list[Probe] = field(repr=False)

    @property
    def records(self) -> list[dict[str, Any]]:
        """One dict per scored probe: id, family, answers, and the score of each (variant, answer).

        A multiple-choice probe also has ``options`` and ``<variant>_option_<logprobs|hits>`` (one value per option);
        its ``<variant>_parametric_<kind>`` is the parametric option's score (``None`` when it is unknown).
        """
        rows = []
        kind = "logprob" if self.result.mode == "loglik" else "hit"
        for row, index in enumerate(self.result.probe_indices):
            probe = self.probes[int(index)]
            record: dict[str, Any] = {
                "id": probe.id,
                "family": probe.family,
                "counterfactual_answer": probe.counterfactual_answer,
                "parametric_answer": probe.parametric_answer,
            }
            if probe.options:
                record["options"] = list(probe.options)
            for col, variant in enumerate(self.result.variants):
                cf, par = self.result.scores[row, col]
                values = None
                if probe.options and self.result.option_scores is not None:
                    values = self.result.option_scores[row, col, : len(probe.options)]
                    par_index = probe.parametric_index
                    par = values[par_index] if par_index is not None else np.nan
                record[f"{variant}_counterfactual_{kind}"] = None if np.isnan(cf) else float(cf)
                record[f"{variant}_parametric_{kind}"] = None if np.isnan(par) else float(par)
                if values is not None:
                    record[f"{variant}_option_{kind}s"] = [None if np.isnan(v) else float(v) for v in values]
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
        probe_dtype: Precision of the probe forward passes. ``None`` (default): the dtype the training step uses,
            i.e. the model as given (and, inside a Trainer with ``bf16=True``/``fp16=True``, the Trainer's autocast,
            which wraps the model's forward). ``"bfloat16"``: every round runs under
            ``torch.autocast(<device type>, dtype=torch.bfloat16)``, the weights untouched; about 2x faster on
            hardware with native bf16 (CPUs with AVX-512 BF16 / AMX, recent GPUs) for fp32 models, at a small,
            documented loss of precision (README, "bf16 probing and control cadence"). ``"float16"``: the same in
            float16, CUDA only. Log-softmax and the sums of answer log-probabilities stay in float32/float64.

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
        variants: Sequence[str] = ALL_VARIANTS,
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
        limit = max_positions(_model_config(model))
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
        round_budget = self.batcher
        retries = 0
        while True:
            smaller: Batcher | None = None
            try:
                scores, scored, generations = self._score_round(model, indices, items, round_variants)
                break
            except Exception as err:
                if not is_out_of_memory(err):
                    raise
                smaller = self._smaller_budget(err, items)
                if smaller is None:
                    self._set_batcher(round_budget)
                    raise
            # Outside the except block: the failed forward's traceback (and the tensors it holds) is released.
            _free_cached_memory(model)
            self._set_batcher(smaller)
            retries += 1
        if retries:
            logger.warning(
                "ctx_callback: the probe round completed after %d out-of-memory retr%s with max_batch_tokens=%d, "
                "max_batch_size=%d (configured: %d, %d); later rounds start from this budget "
                "(ProbeScorer.reset_budget() restores the configured one).", retries, "y" if retries == 1 else "ies",
                self.batcher.max_batch_tokens, self.batcher.max_batch_size, self.max_batch_tokens,
                self.max_batch_size,
            )
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
                    hits = _answer_hits(self.probes[item.probe_index], text)
                    scores[r, c] = self._row(item.probe_index, [float(hit) for hit in hits], width)
                    scored[r, c] = True
        return scores, scored, generations

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

    def _smaller_budget(self, err: BaseException, items: list[EncodedItem]) -> Batcher | None:
        """The budget to retry a round that ran out of memory with, or ``None`` (after a warning) when a retry
        cannot help: sharded parameters, an engine that does not batch, or one item per forward pass already."""
        budget = self.batcher
        reason = f"{type(err).__name__}: {quote_error(err, first_line=True)}"
        if self.synced_gpus:
            logger.warning(
                "ctx_callback: out of memory in a probe forward pass (%s) under sharded parameters (FSDP / ZeRO-3): "
                "not retried, since the other ranks wait inside that forward pass's collective. Lower "
                "max_batch_tokens / max_batch_size (now %d / %d).", reason, budget.max_batch_tokens,
                budget.max_batch_size,
            )
            return None
        if self.mode == "loglik" and not self._loglik_engine_for(items).uses_batcher:
            logger.warning(
                "ctx_callback: out of memory in a probe forward pass (%s); the %r engine runs one row per forward pass "
                "and does not batch, so there is no smaller batch to retry with.", reason,
                self._loglik_engine_for(items).name,
            )
            return None
        if budget.max_batch_size <= 1:
            logger.warning(
                "ctx_callback: out of memory in a probe forward pass even with one probe item per forward pass "
                "(max_batch_tokens=%d, max_batch_size=1) (%s): the round fails. Use shorter or fewer probes or "
                "variants, or probe while less memory is in use.", budget.max_batch_tokens, reason,
            )
            return None
        smaller = Batcher(max(1, budget.max_batch_tokens // 2), max(1, budget.max_batch_size // 2))
        logger.warning(
            "ctx_callback: out of memory in a probe forward pass with max_batch_tokens=%d, max_batch_size=%d (%s); "
            "retrying the round with max_batch_tokens=%d, max_batch_size=%d.", budget.max_batch_tokens,
            budget.max_batch_size, reason, smaller.max_batch_tokens, smaller.max_batch_size,
        )
        return smaller

    def _set_batcher(self, batcher: Batcher) -> None:
        """Cut every engine's later forward passes with ``batcher``."""
        self.batcher = batcher
        self.loglik_engine.set_batcher(batcher)
        self._fallback_engine.set_batcher(batcher)
        self.generation_engine.set_batcher(batcher)

    def known_probe_indices(self, model: torch.nn.Module) -> tuple[list[int], dict[str, dict[str, int]]]:
        """Knowledge verification: probes whose parametric answer the model prefers closed-book (multiple choice: over
        every other option; a probe whose parametric option is unknown is never kept).

        Returns:
            ``(indices, counts)`` where counts maps each family to ``{"kept": k, "total": n}``.
        """
        if "closed_book" not in self.variants:
            raise ValueError("knowledge verification needs the 'closed_book' variant.")
        result = self.score_raw(model)
        table = ScoreTable(result.scores, {v: c for c, v in enumerate(result.variants)}, result.mode,
                           result.option_scores, result.option_roles)
        if result.mode == "loglik":
            known = table.parametric_wins("closed_book") == 1  # multiple choice: over every other option
        else:
            known = (table.parametric("closed_book") == 1) & (table.counterfactual("closed_book") == 0)
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


def _answer_hits(probe: Probe, text: str) -> list[bool]:
    """Generation mode: which of the probe's answers (:attr:`~ctx_callback.probes.Probe.answers`) ``text`` names.

    The longer answer is matched first: "New York" is no hit for "York" (see :mod:`ctx_callback.matching`). A
    multiple-choice probe's options are one group each (its counterfactual and parametric options with their
    aliases); when its prompt lists them (``list_options``), an output that opens with an option's letter ("B",
    "(B)", "B. ...") names that option as well.
    """
    groups: list[tuple[str, ...]] = [(answer,) for answer in probe.answers]
    groups[probe.counterfactual_index] += probe.counterfactual_aliases
    if probe.parametric_index is not None:
        groups[probe.parametric_index] += probe.parametric_aliases
    hits = match_answers(text, groups)
    if probe.list_options:  # the prompt showed the lettered options: "B" names option B
        label = option_label(text, len(probe.options))
        if label is not None:
            hits[label] = True
    return hits



def _free_cached_memory(model: torch.nn.Module) -> None:
    """Return the accelerator's cached blocks (``torch.cuda.empty_cache()`` and its kin) before a retry."""
    device = device_of(model)
    backend = getattr(torch, device.type, None)
    empty_cache = getattr(backend, "empty_cache", None)
    if device.type == "cuda" and not torch.cuda.is_initialized():
        return
    if callable(empty_cache):
        empty_cache()
