"""``ContextRelianceCallback``: probe context reliance during training, log it, stop and keep the peak.

The callback is thin: probes come from :mod:`ctx_callback.probes`, encoding and scoring from
:class:`~ctx_callback.scoring.ProbeScorer`, the metrics from :mod:`ctx_callback.metrics` and the stop/peak decisions
from :class:`~ctx_callback.peak.PeakTracker`. Here they are wired into the Trainer's events.

Why the callback takes the trainer: the tracker integrations (TensorBoard, W&B, MLflow, trackio, ...) receive rows
only through ``Trainer.log``; a callback that edits ``logs`` in its own ``on_log`` runs after them, and callback
events do not receive the trainer. TRL's own logging callbacks take the trainer in their constructor for the same
reason. Rows are logged through the base ``transformers.Trainer.log`` (not ``SFTTrainer.log``, which would fold its
own running averages into our row) and ``control.should_log`` is preserved around the call, so the Trainer's own
loss row for the step is not dropped.

Why not ``ExportableState``: the Trainer restores exportable callbacks by rebuilding them from JSON arguments,
which would drop the trainer handle and the encoded probes. The peak/patience state is instead rebuilt on resume
by replaying this callback's own rows in ``state.log_history`` (which the Trainer always restores), so a resumed run
takes exactly the decisions an uninterrupted one takes. What the rows cannot rebuild (the ``known_only`` probe
selection, the peak checkpoint's path, why the peak could not be saved) is kept as plain JSON in
``state.stateful_callbacks`` under :data:`STATE_KEY`: the Trainer writes that dict into every checkpoint's
``trainer_state.json`` (whoever triggers the save) and loads it back on every resume, wherever
``resume_from_checkpoint`` points. The key is dotted, so it never equals a class name and the Trainer's
``restore_callback_states_from_checkpoint`` never rebuilds a callback from it (with that option on, the Trainer lists
it among the "callbacks not included in current configuration" it ignores).

Under several processes (DDP, FSDP, DeepSpeed) :mod:`ctx_callback.distributed` decides which probes each rank scores
and combines the results, and the stop/save decision is taken once and broadcast, so every rank acts alike.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from .decisions import (
    DEFAULT_ALPHA,
    DEFAULT_MIN_DECLINE,
    RECOMMENDED_PROBES,
    ProbeEvent,
    compare_events,
    first_stop,
    make_stop_rules,
    min_probes_for_significance,
)
from .distributed import broadcast_from_main, gather_outcomes, params_are_sharded, plan_probes, run_round
from .encoding import ALL_VARIANTS
from .engines.base import device_of
from .errors import ConfigurationError, TrainerWiringError
from .metrics import CONFIDENCE, INTERVAL_METRICS, METRIC_PREFIX, metric_key, metric_spec
from .models import max_positions
from .monitor import NEEDS_PARAMETRIC, parse_monitor
from .outcomes import (
    PER_PROBE_METRICS,
    PROBES_FILE,
    SUMMARY_FILE,
    ProbeLog,
    metric_outcomes,
    preferred_vector,
    probe_rows,
    uncertainty,
)
from .peak import PeakDecision, PeakTracker
from .probes import Probe, load_probes
from .scoring import ProbeScorer, ScoreResult, check_probe_dtype_device, resolve_probe_dtype

__all__ = ["ContextRelianceCallback", "probe_set_digest"]

logger = logging.getLogger(__name__)

_PROBE_ON = ("steps", "evaluate")
#: Values of ``on_probe_set_change``: refuse a resume whose checkpoint was probed with another probe set, or start a
#: new curve at the resumed step.
ON_PROBE_SET_CHANGE = ("error", "new_curve")
#: ``restored_from`` in the summary when the peak was the baseline (step 0), restored from its in-memory copy.
RESTORED_FROM_BASELINE = "baseline (in memory)"
#: Where the callback's resume state lives: an entry of ``TrainerState.stateful_callbacks`` (``trainer_state.json`` in
#: every checkpoint). A dotted name, which no class name can equal, so the Trainer never rebuilds a callback from it.
STATE_KEY = "ctx_callback.ContextRelianceCallback"
#: The checkpoint's Trainer state file (``transformers.trainer.TRAINER_STATE_NAME``).
TRAINER_STATE_FILE = "trainer_state.json"

#: Extra keys the callback logs next to the metrics.
KEY_SMOOTHED = f"{METRIC_PREFIX}/monitor_smoothed"
KEY_PEAK_VALUE = f"{METRIC_PREFIX}/peak_value"
KEY_PEAK_STEP = f"{METRIC_PREFIX}/peak_step"
KEY_SECONDS = f"{METRIC_PREFIX}/probe_seconds"
KEY_FAILED = f"{METRIC_PREFIX}/probe_failed"
KEY_STOPPED = f"{METRIC_PREFIX}/early_stop"
#: Logged by ``_probe``: the count of non-finite scores (such a round is fed to the peak tracker as NaN).
KEY_NONFINITE = f"{METRIC_PREFIX}/nonfinite_scores"
#: The paired comparison with the peak event, and flips (documented in the README's derived-key glossary,
#: :data:`ctx_callback.metrics.DERIVED_KEYS`).
KEY_DECLINE = metric_key("decline_from_peak")
KEY_DECLINE_LOW = metric_key("decline_ci_low")
KEY_DECLINE_HIGH = metric_key("decline_ci_high")
KEY_DECLINE_P = metric_key("decline_p_value")
KEY_FLIPS_TO_MEMORY = metric_key("flips_to_memory")
KEY_FLIPS_TO_CONTEXT = metric_key("flips_to_context")
KEY_FLIPS_SINCE_PREVIOUS = metric_key("flips_since_previous")
#: Suffixes of the uncertainty keys of a metric key: ``<key>_se``, ``<key>_ci_low``, ``<key>_ci_high``.
SE_SUFFIX, CI_LOW_SUFFIX, CI_HIGH_SUFFIX = "_se", "_ci_low", "_ci_high"
#: One character per probe for the preferred answers kept in the resume state: every label of
#: :data:`~ctx_callback.outcomes.PREFERRED_LABELS` (``"other"`` included: a multiple-choice probe whose winner is
#: neither the counterfactual nor the parametric option), and ``None`` (not scored) as ``"-"``.
_PREFERRED_CODES: dict[str | None, str] = {
    "context": "c", "memory": "m", "tie": "t", "both": "b", "neither": "n", "other": "o", None: "-",
}
_PREFERRED_NAMES = {code: name for name, code in _PREFERRED_CODES.items()}
#: Columns of the tracker table of flips since the peak.
FLIP_COLUMNS = ["step", "peak_step", "probe_id", "family", "from", "to", "cf", "par"]


class ContextRelianceCallback(TrainerCallback):
    """Probe the model's context reliance every ``eval_steps`` optimizer steps during training.

    Add it to an existing ``Trainer``/``SFTTrainer``::

        trainer = SFTTrainer(model=model, args=SFTConfig(..., report_to="tensorboard"), ...)
        trainer.add_callback(ContextRelianceCallback(trainer, probes="world_facts", eval_steps=50))
        trainer.train()

    Every probe event logs ``ctx_reliance/...`` metrics (see the README's glossary) through the trainer, so they reach
    every tracker in ``report_to``, ``state.log_history`` and ``trainer_state.json`` at the current global step.

    Args:
        trainer: The trainer this callback is added to (needed to log to its trackers).
        probes: A built-in suite name (``"world_facts"``, ``"biographies"``, ``"quotes"``, ``"all"``), a path to a
            ``.json``/``.jsonl`` file, a Hub dataset id, or a list of :class:`~ctx_callback.Probe`.
        tokenizer: The tokenizer used to render probes. Default: the trainer's ``processing_class``.
        prompt_format: ``"chat"`` (default: the tokenizer's chat template, as SFTTrainer applies it), a preset
            (``"alpaca"``, ``"tulu"``, ``"plain"``), a template string with ``{context}``/``{question}``, or a callable.
        system_prompt: Chat format: optional system message (use the one your training data has).
        chat_template_kwargs: Chat format: extra ``apply_chat_template`` arguments (use the training ones).
        eval_steps: Probe every this many optimizer steps (``probe_on="steps"``).
        probe_on: ``"steps"`` (every ``eval_steps``) or ``"evaluate"`` (on each Trainer evaluation).
        probe_at_start: Probe once before the first step (the baseline, logged at step 0).
        probe_at_end: Probe at the last step if it is not a multiple of ``eval_steps``.
        mode: ``"loglik"`` (default) or ``"generate"`` (greedy decoding + answer matching; slower).
        variants: Probe rows to score: ``"context"`` (always), ``"closed_book"``, ``"aligned"``.
        limit_per_family: Use at most this many probes per family (spread evenly) to keep probing cheap.
        known_only: Before the baseline, keep only probes whose parametric answer the model prefers closed-book
            (no conflict exists where the model does not know the fact). Needs the ``closed_book`` variant.
        monitor: Metric that defines the peak, e.g. ``"counterfactual_probability"`` or
            ``"world_facts/counterfactual_accuracy"``. Default (``None``): ``"counterfactual_probability"`` in
            log-likelihood mode, ``"counterfactual_accuracy"`` in generation mode, chosen by measurement (README,
            "Which monitor?"; :data:`~ctx_callback.monitor.DEFAULT_MONITORS`).
        greater_is_better: Direction of ``monitor``; default inferred (``parametric_accuracy`` and
            ``memorization_ratio`` are better when lower).
        smoothing: ``"ema"`` (default), ``"mean"`` or ``"none"`` over probe events.
        ema_alpha: EMA weight of the newest value.
        smoothing_window: Window of the moving average.
        min_delta: Smallest smoothed improvement that counts as a new peak.
        patience: Probe events without improvement before training stops; ``None`` (default) never stops.
        warmup_steps: Never stop before this global step (applies to every stop rule).
        stop_rule: ``None`` (default) or ``"significant_decline"``: stop when the monitored metric is at least
            ``min_decline`` below its value at the peak event and a paired test on the same probes (exact McNemar
            for accuracies, the paired t-test for probabilities and margins) is significant at ``alpha``, corrected for
            the number of events compared (see :mod:`ctx_callback.decisions` and the README's "How sure is the
            stop?"). The monitor must have per-probe outcomes (not ``memorization_ratio``).
        min_decline: ``significant_decline``: smallest decline that may stop, in the metric's units (default 0.02,
            2 points of accuracy: the test guards against noise, this against real but negligible declines).
        alpha: ``significant_decline``: false-stop level for the run (default 0.05).
        divergence_threshold: Stop once the monitored metric is this far (metric units) below its value at the
            peak event; ``None`` (default): no such rule. Lightning's name.
        stopping_threshold: Stop once the monitored metric is below this absolute floor (above it for a metric
            where lower is better); ``None`` (default): no such rule. Unlike Lightning's argument of that name, a
            floor, not a target.
        probe_log: Append every probe's outcome at every event to ``output_dir/ctx_reliance_probes.jsonl`` (main
            process; rows after the resumed step are dropped on resume, the file starts over on a fresh run) and
            log the probes that flipped since the peak as a table to W&B (incrementally) and TensorBoard (text).
        informative_band: ``(low, high)``: at train begin, keep only the probes whose baseline counterfactual
            probability ``p_cf / (p_cf + p_par)`` lies within the band (not at the ceiling or the floor, where a
            probe cannot show a decline or is not following the context anyway); reported per family and kept on
            resume like ``known_only`` (applied after it). Log-likelihood mode only. ``None`` (default): all.
        save_peak_checkpoint: Save a checkpoint (``checkpoint-{step}``) at each new peak, and protect the peak
            checkpoint from ``save_total_limit`` rotation. ``output_dir`` must then be writable: this is checked at
            train begin (a :class:`~ctx_callback.errors.ConfigurationError` before the first step, not a crash at the
            first save). A peak save that fails later (disk full, permission denied) does not stop training: see
            "Saving the peak checkpoint" below.
        restore_peak_at_end: Load the peak's weights back into the model at train end (full models and PEFT
            adapters). Requires ``save_peak_checkpoint``. A peak after step 0 is loaded from its checkpoint. The
            baseline (step 0) is never saved as a checkpoint, so when the baseline is the peak its weights come from
            an in-memory copy taken at train begin: memory cost, one CPU copy of the parameters that require grad
            (everything the optimizer can change: the whole model's size for full fine-tuning, only the adapter
            weights for PEFT/LoRA; buffers are not copied), held until a later peak is saved as a checkpoint, then
            freed. Not taken under FSDP / DeepSpeed ZeRO-3 (sharded parameters), where a baseline peak cannot be
            restored (a warning says so).
        strict: Re-raise a failed probe round instead of logging it and continuing.
        plot: Write ``ctx_reliance.png`` (the reliance curve) into ``output_dir`` at train end (needs matplotlib).
            The summary (``ctx_reliance_summary.json``) and the plot never fail a finished run: if ``output_dir``
            cannot be written, a warning names the file and the error and ``train()`` returns normally.
        max_batch_tokens: Padded tokens per probe forward pass.
        max_batch_size: Rows per probe forward pass.
        max_new_tokens: Generation mode: tokens per answer.
        engine: Scoring engine (``"auto"``, ``"prefix"``, ``"batched"``, ``"simple"``).
        probe_dtype: Precision of the probe forward passes. ``None`` (default): the dtype the training step uses
            (the model as given, under the Trainer's autocast with ``bf16=True``/``fp16=True``): today's behaviour.
            ``"bfloat16"``: probe under ``torch.autocast(<device type>, dtype=torch.bfloat16)``, the weights
            untouched (training is bit-identical either way); about 2x cheaper rounds for fp32 training on hardware
            with native bf16, with log-likelihoods within the tolerance the README documents. ``"float16"``: the
            same in float16, CUDA only (a :class:`~ctx_callback.errors.ConfigurationError` at construction without
            CUDA, and at train begin when the model is not on a CUDA device). Under the Trainer's own mixed
            precision its autocast (entered inside the model's forward) takes precedence.
        controls_every: Score the control variants (``"closed_book"``, ``"aligned"``) on every K-th probe event only
            (default 1: every event); the ``"context"`` variant, which the peak and stop decisions read, is scored
            at every event. Events are counted from the first probe of the run (the baseline, which always scores
            the controls), so they are scored at events 0, K, 2K, ...; a round whose controls are not scored logs
            no control metric (``closed_book_accuracy``, ``aligned_accuracy``, ``context_lift``, and their
            per-family keys) instead of a NaN. The event index is the number of successful probe rows logged
            before (rebuilt from ``state.log_history`` on resume), so a resumed run scores the controls at the same
            steps as an uninterrupted one; a failed round does not count, so the next round retries its controls.
            With ``controls_every > 1``, ``monitor`` (and the Trainer's ``metric_for_best_model``, checked at train
            begin) must not name a metric that needs a control variant.
        verbose: Print the stop message and the train-end summary on the main process. They are always logged
            at INFO level through the ``ctx_callback.callback`` logger as well.
        on_probe_set_change: What a resumed run does when the checkpoint was probed with another probe set than
            this callback's (other probe ids or texts, another ``limit_per_family``; compared by the digest stored in
            the checkpoint's ``trainer_state.json``). ``"error"`` (default): refuse at train begin, before any step,
            with a :class:`~ctx_callback.errors.ConfigurationError` naming both probe sets' sizes and digests: a
            peak, patience and paired test measured on one probe set cannot be compared with values on another.
            ``"new_curve"``: start a new reliance curve at the resumed step, with a warning: the old peak, smoothing,
            patience, stop-rule and paired state are forgotten (the old rows stay in ``state.log_history`` and on
            the trackers, but no decision reads them), the first probe event after the resumed step is the new
            curve's first (its baseline), ``known_only`` / ``informative_band`` select again on the current weights,
            and the summary's ``curve_start_step`` says where the curve began. Later resumes of that run with the new
            probes continue the new curve.

    Decisions that know about noise (see the README's "How sure is the stop?"): every probe event also logs the
    standard error and 95% interval of the monitored metric and the overall accuracies (Wilson / Student's t), and
    compares itself with the peak event on the same probes (``decline_from_peak``, its interval and a paired
    p-value: exact McNemar or paired t-test, from :mod:`ctx_callback.stats`). The stop rules (``patience``,
    ``stop_rule``, ``divergence_threshold``, ``stopping_threshold``) live in :mod:`ctx_callback.decisions`; the
    per-probe outcomes of the peak and previous events are kept in the checkpoints' Trainer state (``paired``), so
    a resumed run takes the same decisions, and are those of the merged result under DDP, identical on every rank.

    Each ``trainer.train()`` that starts at step 0 is a fresh run: the baseline is probed again and the peak,
    patience, history, stop information and (with ``known_only``) the probe selection start over. A run resumed from
    a checkpoint instead rebuilds them from ``state.log_history``, and takes the ``known_only`` selection made at the
    run's start from the checkpoint's Trainer state (never a new selection on the fine-tuned weights, which can
    differ). A checkpoint without that state (an older ctx_callback) gets a warning, then a recomputed selection.

    Saving the peak checkpoint: at a new peak where the Trainer saves anyway (``save_steps``, or another callback
    set ``control.should_save``; not with ``save_strategy="best"``, whose flag the Trainer overwrites), the Trainer's
    save is used, unchanged. Otherwise the callback saves, from ``on_step_end`` (``on_evaluate`` with
    ``probe_on="evaluate"``), by calling the Trainer's own ``_save_checkpoint``, so the folder is what the Trainer
    writes (weights, optimizer, scheduler, RNG, ``trainer_state.json``; resumable; ``save_total_limit`` rotation
    included, protecting the peak through ``state.best_model_checkpoint``), and then dispatches ``on_save`` to every
    callback, as the Trainer does after its saves. Saving inside the event, not by setting ``control.should_save``,
    is what lets a failed save be caught: an exception in the Trainer's own save ends ``train()``. Since the Trainer
    logs and evaluates the step after ``on_step_end``, the checkpoint's ``trainer_state.json`` is written again at
    the next step's start (or at train end) so that it holds that step's loss and eval rows too. Every rank calls
    the save (it is collective) and the ranks then exchange their outcomes
    (:func:`~ctx_callback.distributed.gather_outcomes`), so all agree. Under several processes
    ``state.best_global_step`` is unset during the call, which skips the barrier ``_save_checkpoint`` runs with it: a
    rank failing before that barrier would otherwise leave the others waiting in it (a failure inside a sharded
    FSDP / ZeRO-3 state-dict gather can still hang, as any collective can). The failure path is tested in one process
    only (a simulated full disk).

    When the save fails (any exception, on any rank): a warning names the folder and the error, the partial folder
    is removed (``resume_from_checkpoint=True`` would pick it as the last checkpoint), the Trainer's "best" state goes
    back to the previous peak's checkpoint (kept, not rotated away), ``peak_checkpoint`` is ``None`` and
    ``peak_save_error`` holds the message (summary, stop message, summary text), and ``restore_peak_at_end`` keeps the
    final weights with a warning instead of restoring a missing or partial folder. Training continues; a later peak
    that saves clears the error. ``strict=True`` raises instead (a ``RuntimeError`` on every rank).

    The summary (:meth:`summary`) reports ``trained_steps``, the optimizer steps this ``train()`` call ran; ``final``
    is the last probe event. When no step ran, ``final_step`` equals the baseline step and :meth:`summary_text` says
    that nothing was measured after training instead of presenting the baseline as a final value. The last step is
    always probed with ``probe_at_end`` (also when transformers runs a step for ``max_steps=0``).

    Faults during a probe round never stop training (unless ``strict=True``):

    - A round that raises (a failing forward pass, a bad probe) logs ``ctx_reliance/probe_failed = 1.0`` and a
      warning. Out of memory is retried first with smaller batches, down to one probe item per forward pass (see
      :class:`~ctx_callback.scoring.ProbeScorer`; not under FSDP / ZeRO-3, where an out-of-memory error inside a
      sharded forward pass leaves the other ranks waiting in its collective and cannot be recovered).
    - NaN/inf scores (NaN/inf logits): the row logs ``ctx_reliance/nonfinite_scores`` (their count, 0.0 on every
      clean round) and ``ctx_reliance/probe_failed = 1.0``; its metrics are computed over the finite scores for
      diagnosis, but the round is fed to the peak tracker as NaN: it is never the peak and never counts toward
      patience (and never the Trainer's best with ``metric_for_best_model``).
    - A tracker integration (or any callback) that raises in ``on_log`` on this callback's row: a warning (once)
      with the tracker's error, and training continues. The row is not lost: ``Trainer.log`` appends it to
      ``state.log_history`` before calling ``on_log``. A tracker that raises on the Trainer's *own* rows (loss,
      eval) still stops training: that is the Trainer's behaviour, outside this callback.

    Stopping at the baseline: the Trainer takes its first optimizer step whatever a callback decides before it, so a
    stop rule that fires on the baseline (only ``stopping_threshold`` can: the value is already past the floor before
    any training) cannot stop training "at step 0". The callback then refuses to start instead: a
    :class:`~ctx_callback.errors.ConfigurationError` from ``trainer.train()`` after the baseline row is logged, before
    any optimizer step (the model is untouched), naming the value and the floor. Lower the floor, or set
    ``warmup_steps`` so that it applies later.

    How many probes ``stop_rule="significant_decline"`` needs: with ``n`` monitored probes, even a decline on every
    probe gives an exact sign test (McNemar on accuracies) ``p = 2^(1 - n)``, so below
    :func:`~ctx_callback.decisions.min_probes_for_significance` (6 probes at ``alpha=0.05``) the rule could never
    stop on accuracy and would rest on the normality of a handful of differences on probabilities: refused with a
    :class:`~ctx_callback.errors.ConfigurationError` (at construction, and at train begin after ``known_only`` /
    ``informative_band`` selected); below :data:`~ctx_callback.decisions.RECOMMENDED_PROBES` (100 on probabilities,
    200 on accuracies, from the README's simulation) a warning says how much it misses.

    Raises:
        ConfigurationError: On any invalid argument, at construction (a ``ValueError``; probe files are loaded and
            validated here, raising ``ProbeSourceError``/``ProbeFormatError``; a chat template that refuses the
            probe conversation, e.g. one without a system role given ``system_prompt``, is one too). At train
            begin: when ``save_peak_checkpoint=True`` and ``output_dir`` is not writable; when a resumed
            checkpoint was probed with another probe set and ``on_probe_set_change="error"``; when a stop rule
            fires on the baseline (see above); when ``significant_decline`` is left with too few probes.
        TrainerWiringError: ``trainer`` is not a ``transformers.Trainer``.
    """

    def __init__(
        self,
        trainer: Trainer | None = None,
        probes: str | os.PathLike | Sequence[Probe] | Sequence[dict] = "default",
        *,
        tokenizer: Any = None,
        prompt_format: Any = "chat",
        system_prompt: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        eval_steps: int = 50,
        probe_on: str = "steps",
        probe_at_start: bool = True,
        probe_at_end: bool = True,
        mode: str = "loglik",
        variants: Sequence[str] = ALL_VARIANTS,
        limit_per_family: int | None = None,
        known_only: bool = False,
        monitor: str | None = None,
        greater_is_better: bool | None = None,
        smoothing: str = "ema",
        ema_alpha: float = 0.5,
        smoothing_window: int = 3,
        min_delta: float = 0.0,
        patience: int | None = None,
        warmup_steps: int = 0,
        stop_rule: str | None = None,
        min_decline: float = DEFAULT_MIN_DECLINE,
        alpha: float = DEFAULT_ALPHA,
        divergence_threshold: float | None = None,
        stopping_threshold: float | None = None,
        probe_log: bool = True,
        informative_band: tuple[float, float] | None = None,
        save_peak_checkpoint: bool = False,
        restore_peak_at_end: bool = False,
        strict: bool = False,
        plot: bool = False,
        max_batch_tokens: int = 8192,
        max_batch_size: int = 64,
        max_new_tokens: int = 24,
        engine: str = "auto",
        probe_dtype: str | None = None,
        controls_every: int = 1,
        verbose: bool = True,
        on_probe_set_change: str = "error",
    ) -> None:
        if trainer is not None and not isinstance(trainer, Trainer):
            raise TrainerWiringError(
                f"trainer must be a transformers.Trainer (or SFTTrainer), got {type(trainer).__name__}. "
                "Usage: trainer.add_callback(ContextRelianceCallback(trainer, probes=...))."
            )
        if isinstance(eval_steps, bool) or not isinstance(eval_steps, int) or eval_steps < 1:
            raise ConfigurationError(
                f"eval_steps must be an integer >= 1 (optimizer steps between probes), got {eval_steps!r}."
            )
        if not isinstance(verbose, bool):
            raise ConfigurationError(f"verbose must be True or False, got {verbose!r}.")
        if on_probe_set_change not in ON_PROBE_SET_CHANGE:
            raise ConfigurationError(
                f"on_probe_set_change must be one of {list(ON_PROBE_SET_CHANGE)} (what a resumed run does when the "
                f"checkpoint was probed with another probe set), got {on_probe_set_change!r}."
            )
        if probe_on not in _PROBE_ON:
            raise ConfigurationError(f"probe_on must be one of {list(_PROBE_ON)}, got {probe_on!r}.")
        if mode not in ("loglik", "generate"):
            raise ConfigurationError(f"mode must be 'loglik' or 'generate', got {mode!r}.")
        if restore_peak_at_end and not save_peak_checkpoint:
            raise ConfigurationError(
                "restore_peak_at_end=True needs save_peak_checkpoint=True (the peak weights are restored from the "
                "peak checkpoint)."
            )
        if known_only and "closed_book" not in variants:
            raise ConfigurationError("known_only=True needs the 'closed_book' variant in variants=.")
        parsed = parse_monitor(monitor, mode, tuple(variants))
        self.monitor_key, self.monitor_metric, monitor_family = parsed.key, parsed.metric, parsed.family
        self.monitor_family = monitor_family
        probe_dtype = resolve_probe_dtype(probe_dtype)
        if isinstance(controls_every, bool) or not isinstance(controls_every, int) or controls_every < 1:
            raise ConfigurationError(
                f"controls_every must be an integer >= 1 (score the control variants on every K-th probe event; 1 = "
                f"every event), got {controls_every!r}."
            )
        needs = metric_spec(parsed.metric).requires
        if controls_every > 1 and needs is not None:
            raise ConfigurationError(
                f"monitor {monitor!r} needs the {needs!r} control variant, which controls_every={controls_every} "
                "scores only on every K-th probe event; the peak and stop decisions need a value at every event. "
                "Monitor a context metric (e.g. 'counterfactual_accuracy'), or use controls_every=1."
            )
        if greater_is_better is None:
            greater_is_better = parsed.greater_is_better
        # PeakTracker validates smoothing, ema_alpha, window, min_delta, patience and warmup_steps.
        self.peak_tracker = PeakTracker(
            mode="max" if greater_is_better else "min", smoothing=smoothing, ema_alpha=ema_alpha,
            window=smoothing_window, min_delta=min_delta, patience=patience, warmup_steps=warmup_steps,
        )
        if stop_rule is not None and parsed.metric not in PER_PROBE_METRICS:
            raise ConfigurationError(
                f"stop_rule={stop_rule!r} needs per-probe outcomes of the monitored metric, which {monitor!r} does "
                f"not have (a ratio of sums, or a count); monitor one of {sorted(PER_PROBE_METRICS)}."
            )
        # Validates stop_rule, min_decline, alpha, divergence_threshold and stopping_threshold.
        self.stop_rules = make_stop_rules(
            patience=patience, ema=ema_alpha, min_delta=min_delta, warmup=warmup_steps, stop_rule=stop_rule,
            min_decline=min_decline, alpha=alpha, divergence_threshold=divergence_threshold,
            stopping_threshold=stopping_threshold, greater_is_better=bool(greater_is_better), smoothing=smoothing,
            window=smoothing_window, metric=self.monitor_key, confidence=CONFIDENCE,
        )
        self.greater_is_better = bool(greater_is_better)
        if not isinstance(probe_log, bool):
            raise ConfigurationError(f"probe_log must be True or False, got {probe_log!r}.")
        self.informative_band = self._check_band(informative_band, mode)
        if isinstance(probes, (str, os.PathLike)):
            self.probes = load_probes(probes, limit_per_family=limit_per_family)
        else:
            self.probes = load_probes(list(probes), limit_per_family=limit_per_family)
        families = sorted({p.family for p in self.probes})
        if monitor_family is not None and monitor_family not in families:
            raise ConfigurationError(f"monitor {monitor!r} names family {monitor_family!r}, which the probes lack; "
                             f"families: {families}.")
        self._check_parametric_answers(monitor, known_only)
        self.stop_rule = stop_rule
        self.alpha = alpha
        if stop_rule == "significant_decline":  # again at train begin when known_only / informative_band select
            self._check_significant_probe_count(self._monitored_count(None), "at construction",
                                                warn=not known_only and informative_band is None)
        #: Digest of the probe set (ids and everything scored), stored in the checkpoints to detect a resume with
        #: other probes (``on_probe_set_change``).
        self._probe_set_sha1 = probe_set_digest(self.probes)
        self.on_probe_set_change = on_probe_set_change
        #: The global step a new reliance curve started at (``on_probe_set_change="new_curve"``); ``None``: the
        #: curve is the run's own, from its first step. Rows logged at or before it are not this curve's.
        self.curve_start_step: int | None = None
        self._new_curve_started = False  # this train() call started a new curve (its selection is made afresh)
        self.trainer = trainer
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format
        self.eval_steps = eval_steps
        self.probe_on = probe_on
        self.probe_at_start = probe_at_start
        self.probe_at_end = probe_at_end
        self.known_only = known_only
        self.save_peak_checkpoint = save_peak_checkpoint
        self.restore_peak_at_end = restore_peak_at_end
        self.strict = strict
        self.plot = plot
        self.verbose = verbose
        self.probe_dtype = probe_dtype
        self.controls_every = controls_every
        self.probe_log = probe_log
        self.mode = mode
        #: The peak event (step, value, per-probe outcomes of the monitor) and its preferred answers per probe.
        self._peak_event: ProbeEvent | None = None
        self._peak_preferred: list[str | None] | None = None
        #: The previous event and its preferred answers.
        self._previous_event: ProbeEvent | None = None
        self._previous_preferred: list[str | None] | None = None
        #: Flips since the current peak already sent to the trackers' tables: (probe id, from, to).
        self._reported_flips: set[tuple[str, str | None, str | None]] = set()
        self._wandb_flip_table: Any = None
        self._probe_log_failed = False
        #: The rule that stopped training (its name), or ``None``.
        self.stop_rule_name: str | None = None
        self._last_stop_rule: str | None = None
        self._scorer_kwargs = dict(
            mode=mode, variants=tuple(variants), engine=engine, max_batch_tokens=max_batch_tokens,
            max_batch_size=max_batch_size, max_new_tokens=max_new_tokens, system_prompt=system_prompt,
            chat_template_kwargs=chat_template_kwargs, probe_dtype=probe_dtype,
        )
        self.scorer: ProbeScorer | None = None
        self.active_indices: list[int] | None = None
        self.known_counts: dict[str, dict[str, int]] | None = None
        self.history: list[dict[str, float]] = []
        self.latest_metrics: dict[str, float] = {}
        self.last_probe_step: int | None = None
        self.stop_reason: str | None = None
        self.stop_step: int | None = None
        self.peak_checkpoint: str | None = None
        #: Why the current peak has no checkpoint: saving it failed (``None`` when saved or not tried).
        self.peak_save_error: str | None = None
        # A checkpoint this callback saved in the middle of a step, whose trainer_state.json is re-written once the
        # Trainer has logged/evaluated that step (see _save_peak).
        self._refresh_state_of: str | None = None
        self.probe_seconds_total = 0.0
        #: Successful probe rounds of this run so far (the event index of the next one; see ``controls_every``).
        self.probe_events = 0
        #: Whether the peak weights were loaded back into the model at train end.
        self.last_restored = False
        #: Where they came from: the peak checkpoint's path, or :data:`RESTORED_FROM_BASELINE`.
        self.restored_from: str | None = None
        #: Global step at which the current (or last) ``train()`` call began.
        self.train_start_step: int | None = None
        # CPU copy of the baseline's trainable parameters (restore_peak_at_end while the baseline is the peak).
        self._baseline_weights: dict[str, torch.Tensor] | None = None
        tokenizer = tokenizer if tokenizer is not None else getattr(trainer, "processing_class", None)
        if tokenizer is not None:
            self._build_scorer(tokenizer, getattr(trainer, "model", None))

    # ------------------------------------------------------------------------------------------------------------
    # Setup
    # ------------------------------------------------------------------------------------------------------------
    def _check_parametric_answers(self, monitor: str | None, known_only: bool) -> None:
        """Refuse what cannot work on probes without a parametric answer (multiple choice whose dataset does not say
        which option is true, e.g. the ``faitheval_counterfactual`` preset), instead of NaN rounds or an empty
        ``known_only`` selection after the baseline."""
        without = [p for p in self.probes if p.parametric_answer is None]
        if not without:
            return
        if self.monitor_metric in NEEDS_PARAMETRIC:
            monitored = [p for p in self.probes if self.monitor_family in (None, p.family)]
            if all(p.parametric_answer is None for p in monitored):
                raise ConfigurationError(
                    f"monitor {monitor!r} needs the parametric answer (the true fact), which none of the "
                    f"{len(monitored)} monitored probes has (multiple-choice probes without a parametric option, "
                    "e.g. the faitheval_counterfactual preset): it would be NaN at every probe event. Monitor a "
                    "context metric (e.g. 'counterfactual_probability'), or add probes with a parametric answer."
                )
        if not known_only:
            return
        if len(without) == len(self.probes):
            raise ConfigurationError(
                "known_only=True keeps the probes whose parametric answer the model prefers closed-book, but none of "
                f"the {len(self.probes)} probes has a parametric answer (multiple-choice probes without a parametric "
                "option, e.g. the faitheval_counterfactual preset), so it would keep none. Use known_only=False with "
                "these probes, or add probes with a parametric answer."
            )
        logger.warning(
            "ctx_callback: known_only=True: %d of the %d probes have no parametric answer (multiple choice without a "
            "parametric option, e.g. %r), so the knowledge check never keeps them.", len(without), len(self.probes),
            without[0].id,
        )

    def _monitored_count(self, indices: Sequence[int] | None) -> int:
        """How many of the probes ``indices`` (all when ``None``) the monitored metric is computed on."""
        chosen = range(len(self.probes)) if indices is None else indices
        return sum(1 for i in chosen if self.monitor_family in (None, self.probes[i].family))

    def _check_significant_probe_count(self, count: int, when: str, warn: bool = True) -> None:
        """``stop_rule="significant_decline"`` on ``count`` monitored probes: refuse below the fewest probes whose
        directions alone can be significant (:func:`~ctx_callback.decisions.min_probes_for_significance`), warn below
        :data:`~ctx_callback.decisions.RECOMMENDED_PROBES`."""
        binary = PER_PROBE_METRICS.get(self.monitor_metric, False)
        test, recommended = ("exact McNemar", RECOMMENDED_PROBES["mcnemar"]) if binary else \
            ("paired t-test", RECOMMENDED_PROBES["t"])
        minimum = min_probes_for_significance(self.alpha)
        if count < minimum:
            raise ConfigurationError(
                f"stop_rule='significant_decline' needs at least {minimum} monitored probes at alpha={self.alpha:g}, "
                f"got {count} ({when}; monitor {self.monitor_key}). With n probes, even a decline on every one of "
                f"them is significant only at p = 2^(1 - n) by the probes' directions alone (the exact sign test; "
                f"McNemar's smallest p-value on accuracies), {2.0 ** (1 - max(count, 1)):.3g} here, above alpha: "
                f"the {test} could never stop, or only by trusting the normality of {count} differences. Use at "
                f"least {recommended} probes (README, 'How many probes do I need?'), or another stop rule "
                "(patience=, divergence_threshold=)."
            )
        if warn and count < recommended:
            logger.warning(
                "ctx_callback: stop_rule='significant_decline' on %d monitored probes (%s): in the README's "
                "simulation ('How many probes do I need?') the rule missed most 5-point falls and many 10-point "
                "falls below %d probes for this test (it missed 23%% of 10-point falls at 50 probes on "
                "probabilities, 95%% at 50 and 34%% at 100 on accuracies). Its stops stay rare on flat runs; it is "
                "its power that is low. Use at least %d probes to rely on it.", count, test, recommended, recommended,
            )

    def _build_scorer(self, tokenizer: Any, model: Any) -> None:
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # multimodal processors carry a tokenizer
        max_length = max_positions(getattr(model, "config", None))
        self.scorer = ProbeScorer(self.probes, tokenizer, self.prompt_format, max_length=max_length,
                                  **self._scorer_kwargs)

    def _check_wiring(self, state: TrainerState, kwargs: dict[str, Any]) -> None:
        if self.trainer is None:
            raise TrainerWiringError(
                "ContextRelianceCallback needs the trainer to log to your trackers (TensorBoard, W&B, MLflow, ...). "
                "Create it with the trainer and then add it: "
                "`trainer.add_callback(ContextRelianceCallback(trainer, probes=...))`."
            )
        if self.trainer.state is not state:
            raise TrainerWiringError(
                "ContextRelianceCallback was created with a different trainer than the one that is training. Pass the "
                "trainer you call .train() on: `trainer.add_callback(ContextRelianceCallback(trainer, ...))`."
            )
        if self.scorer is None:
            tokenizer = kwargs.get("processing_class")
            if tokenizer is None:
                raise TrainerWiringError(
                    "ContextRelianceCallback has no tokenizer: pass tokenizer=... to the callback, or "
                    "processing_class=tokenizer to the trainer."
                )
            self._build_scorer(tokenizer, kwargs.get("model"))

    def _check_best_metric(self, args: TrainingArguments) -> None:
        """With ``controls_every > 1``, refuse a ``metric_for_best_model`` that needs a control variant: the rounds
        without controls would not have it (the Trainer raises a ``KeyError`` on a missing best metric)."""
        name = args.metric_for_best_model or ""
        name = name[len("eval_"):] if name.startswith("eval_") else name
        if self.controls_every == 1 or not name.startswith(f"{METRIC_PREFIX}/"):
            return
        try:
            needs = metric_spec(name.split("/")[-1]).requires
        except ConfigurationError:
            return  # not one of our metrics
        if needs is not None:
            raise ConfigurationError(
                f"metric_for_best_model={args.metric_for_best_model!r} needs the {needs!r} control variant, which "
                f"controls_every={self.controls_every} scores only on every K-th probe event. Select on a context "
                "metric (e.g. 'ctx_reliance/counterfactual_accuracy'), or use controls_every=1."
            )

    def _round_variants(self) -> tuple[str, ...] | None:
        """The variants this probe event scores: all (``None``) on every ``controls_every``-th event counted from the
        run's first (the baseline), else ``"context"`` alone."""
        if self.controls_every == 1 or self.probe_events % self.controls_every == 0:
            return None
        return ("context",)

    def _reset_paired(self) -> None:
        for rule in self.stop_rules:
            rule.reset()
        self._peak_event = self._previous_event = None
        self._peak_preferred = self._previous_preferred = None
        self._reported_flips = set()

    def _replay_history(self, state: TrainerState) -> None:
        """Rebuild the peak/patience state and the stop rules from this callback's own rows (resume), with the
        per-probe outcomes of the peak and previous events kept in the checkpoint's Trainer state."""
        self.peak_tracker.reset()
        self._reset_paired()
        paired = self._saved_paired(state)
        self.history = []
        self.peak_checkpoint = None
        self.peak_save_error = None
        self._refresh_state_of = None
        self.probe_seconds_total = 0.0
        # Only this curve's rows: after the step a new curve started at (on_probe_set_change="new_curve"), if any.
        first = -1 if self.curve_start_step is None else self.curve_start_step

        def ours(row: dict[str, Any]) -> bool:
            return "step" in row and first < row["step"] <= state.global_step

        # The event index (controls_every): every successful round logged probe_seconds; a failed one did not.
        self.probe_events = sum(1 for row in state.log_history if KEY_SECONDS in row and ours(row))
        for row in state.log_history:
            if self.monitor_key in row and ours(row):
                # A round with non-finite scores logged its finite metrics but fed NaN to the tracker: replay that.
                value = math.nan if row.get(KEY_NONFINITE) else float(row[self.monitor_key])
                step = int(row["step"])
                kept = paired.get(step, (None, None))
                event = ProbeEvent(step, value, kept[0])
                if self.peak_tracker.update(step, value).is_new_peak:
                    self._peak_event, self._peak_preferred = event, kept[1]
                first_stop(self.stop_rules, event)
                if not math.isnan(value):
                    self._previous_event = event
                self._previous_preferred = kept[1]
                self.history.append({k: v for k, v in row.items() if k.startswith(METRIC_PREFIX) or k == "step"})
                self.last_probe_step = int(row["step"])
                self.probe_seconds_total += float(row.get(KEY_SECONDS, 0.0))
        if self.peak_tracker.peak_step is not None:
            # The peak checkpoint: where the run saved it (it may be outside this output_dir when the run is resumed
            # from a copied checkpoint), else checkpoint-{peak} in this output_dir; or why it could not be saved.
            name = f"checkpoint-{self.peak_tracker.peak_step}"
            saved = self._saved_state(state) or {}
            candidates = [saved.get("peak_checkpoint"), os.path.join(self.trainer.args.output_dir, name)]
            self.peak_checkpoint = next((p for p in candidates if isinstance(p, str) and
                                         os.path.basename(os.path.normpath(p)) == name and os.path.isdir(p)), None)
            if self.peak_checkpoint is None and isinstance(saved.get("peak_save_error"), str):
                self.peak_save_error = saved["peak_save_error"]
        if self._peak_event is not None and self._peak_event.outcomes is None and self.stop_rules:
            logger.warning(
                "ctx_callback: the checkpoint's %s holds no per-probe outcomes of the peak event (step %s; saved by "
                "an older ctx_callback, or with another probe selection): the paired comparison with the peak (and "
                "stop_rule='significant_decline') resumes at the next new peak.", TRAINER_STATE_FILE,
                self._peak_event.step)
        if self.peak_tracker.num_events:
            tracker = self.peak_tracker
            logger.info("ctx_callback: resumed with %d probe events, peak %.4f at step %s.", tracker.num_events,
                        tracker.peak_value, tracker.peak_step)

    def _start_fresh(self) -> None:
        """Forget everything a previous ``train()`` call left: this call starts at step 0 with a new baseline."""
        self.peak_tracker.reset()
        self._reset_paired()
        self.stop_rule_name = None
        self.history = []
        self.latest_metrics = {}
        self.last_probe_step = None
        self.stop_reason = None
        self.stop_step = None
        self.peak_checkpoint = None
        self.peak_save_error = None
        self._refresh_state_of = None
        self.probe_seconds_total = 0.0
        self.probe_events = 0
        self.last_restored = False
        self.restored_from = None
        self._baseline_weights = None
        self.active_indices = None  # known_only: re-selected on the model as it is now
        self.known_counts = None
        self.curve_start_step = None

    # ------------------------------------------------------------------------------------------------------------
    # State that survives a resume (what state.log_history cannot rebuild)
    # ------------------------------------------------------------------------------------------------------------
    def _export_state(self, state: TrainerState) -> None:
        """Keep the resume state in ``state.stateful_callbacks``: every checkpoint saved from now on carries it.

        ``paired`` holds the per-probe outcomes of the monitored metric and the preferred answers at the peak and
        the previous event (what ``state.log_history`` cannot rebuild; the paired test and the flips need them).
        They live here rather than in ``ctx_reliance_probes.jsonl`` because this state travels with each checkpoint
        and is exactly as of its step (a resume from a copied checkpoint, or with ``probe_log=False``, has it too),
        and it is small: one number and one character per probe, for two events."""
        entries = state.stateful_callbacks.setdefault(STATE_KEY, {})
        selected = self.active_indices if (self.known_only or self.informative_band) else None
        entries[self.monitor_key] = {
            "version": 2,
            # The probe set this run measures (on_probe_set_change compares it on resume) and where its curve began.
            "probe_set": {"num_probes": len(self.probes), "sha1": self._probe_set_sha1},
            "curve_start_step": self.curve_start_step,
            "known_only_probe_ids": None if selected is None else [self.probes[i].id for i in selected],
            "known_counts": self.known_counts if (self.known_only or self.informative_band) else None,
            "informative_band": None if self.informative_band is None else list(self.informative_band),
            "peak_checkpoint": self.peak_checkpoint,
            "peak_save_error": self.peak_save_error,
            "paired": self._paired_state(),
        }

    def _active_ids_digest(self) -> str:
        indices = self.active_indices if self.active_indices is not None else range(len(self.probes))
        return hashlib.sha1("\n".join(self.probes[i].id for i in indices).encode()).hexdigest()

    def _paired_state(self) -> dict[str, Any] | None:
        def pack(event: ProbeEvent | None, preferred: list[str | None] | None) -> dict[str, Any] | None:
            if event is None:
                return None
            outcomes = None
            if event.outcomes is not None:
                outcomes = [None if math.isnan(x) else x for x in np.asarray(event.outcomes, np.float64).tolist()]
            return {"step": int(event.step), "outcomes": outcomes,
                    # A label without a code (none today: a test covers PREFERRED_LABELS) is kept as "not scored"
                    # rather than failing the export, which runs outside the guard of the probe round.
                    "preferred": None if preferred is None else "".join(_PREFERRED_CODES.get(p, "-")
                                                                        for p in preferred)}

        if self._peak_event is None:
            return None
        return {"probes_sha1": self._active_ids_digest(), "peak": pack(self._peak_event, self._peak_preferred),
                "previous": pack(self._previous_event, self._previous_preferred)}

    def _saved_paired(self, state: TrainerState) -> dict[int, tuple[np.ndarray | None, list[str | None] | None]]:
        """The kept per-probe outcomes and preferred answers by step (empty when absent or for other probes)."""
        saved = self._saved_state(state) or {}
        paired = saved.get("paired")
        if not isinstance(paired, dict) or paired.get("probes_sha1") != self._active_ids_digest():
            return {}
        out: dict[int, tuple[np.ndarray | None, list[str | None] | None]] = {}
        for name in ("previous", "peak"):
            entry = paired.get(name)
            if not isinstance(entry, dict) or not isinstance(entry.get("step"), int):
                continue
            values = entry.get("outcomes")
            outcomes = None
            if isinstance(values, list):
                outcomes = np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)
                binary = PER_PROBE_METRICS.get(self.monitor_metric, False)
                if binary and not np.isnan(outcomes).any():
                    outcomes = outcomes.astype(bool)
            codes = entry.get("preferred")
            preferred = [_PREFERRED_NAMES.get(c) for c in codes] if isinstance(codes, str) else None
            out[int(entry["step"])] = (outcomes, preferred)
        return out

    def _saved_state(self, state: TrainerState) -> dict[str, Any] | None:
        """This callback's entry in a resumed ``state`` (``None`` when the checkpoint has none)."""
        entries = (state.stateful_callbacks or {}).get(STATE_KEY)
        entry = entries.get(self.monitor_key) if isinstance(entries, dict) else None
        return entry if isinstance(entry, dict) else None

    def _saved_probe_set(self, state: TrainerState) -> tuple[dict[str, Any] | None, int | None]:
        """The probe set a resumed checkpoint's run measured (from any monitor's entry, this one's first) and the step
        its curve began at; ``(None, None)`` when the checkpoint does not say (an older ctx_callback, or none)."""
        entries = (state.stateful_callbacks or {}).get(STATE_KEY)
        if not isinstance(entries, dict):
            return None, None
        ordered = [entries.get(self.monitor_key)] + [v for k, v in entries.items() if k != self.monitor_key]
        for entry in ordered:
            if isinstance(entry, dict) and isinstance(entry.get("probe_set"), dict):
                start = entry.get("curve_start_step")
                return entry["probe_set"], start if isinstance(start, int) else None
        return None, None

    def _logged_before(self, state: TrainerState, key: str) -> Any:
        """The value of ``key`` in the last row up to the resumed step that has it (``None`` if none)."""
        rows = [row for row in state.log_history if key in row and row.get("step", math.inf) <= state.global_step]
        return rows[-1][key] if rows else None

    def _check_probe_set(self, state: TrainerState) -> None:
        """On resume: the checkpoint's run must have measured this callback's probe set. Otherwise refuse
        (``on_probe_set_change="error"``) or start a new curve at the resumed step (``"new_curve"``)."""
        saved, start = self._saved_probe_set(state)
        self.curve_start_step = start
        self._new_curve_started = False
        if saved is not None:
            if saved.get("sha1") == self._probe_set_sha1:
                return
            before = f"{saved.get('num_probes')} probes (probe set sha1 {str(saved.get('sha1'))[:12]})"
        else:
            # A checkpoint that stored no probe set (an older ctx_callback): the probe count its rows logged, which is
            # the probe set's size when no selection (known_only / informative_band) was made, then or now.
            entries = (state.stateful_callbacks or {}).get(STATE_KEY)
            selected = isinstance(entries, dict) and any(
                isinstance(e, dict) and e.get("known_only_probe_ids") is not None for e in entries.values())
            logged = self._logged_before(state, metric_key("num_probes"))
            if (logged is None or int(logged) == len(self.probes) or selected or self.known_only
                    or self.informative_band is not None):
                return
            before = f"{int(logged)} probes (as its rows logged {metric_key('num_probes')}; it stored no digest)"
        now = f"{len(self.probes)} probes (probe set sha1 {self._probe_set_sha1[:12]})"
        step = state.global_step
        peak = self._logged_before(state, KEY_PEAK_STEP)
        old_peak = "" if peak is None or math.isnan(float(peak)) else f" (peak at step {int(peak)})"
        if self.on_probe_set_change == "error":
            raise ConfigurationError(
                f"on_probe_set_change='error': resuming at step {step} from a checkpoint whose run was probed with "
                f"{before}, but this callback has {now}. The run's peak{old_peak}, patience and paired per-probe "
                "outcomes were measured on its probes; comparing them with values on other probes would mix two "
                "different curves, so nothing was trained. To resume, pass the probes the run started with (the "
                f"same probes= and limit_per_family=); or pass on_probe_set_change='new_curve' to start a new "
                f"reliance curve at step {step} (the old peak and stop-rule state are forgotten)."
            )
        self.curve_start_step = step
        self._new_curve_started = True
        reselect = (" The known_only / informative_band selection is made again, on the current weights."
                    if self.known_only or self.informative_band is not None else "")
        logger.warning(
            "ctx_callback: on_probe_set_change='new_curve': the checkpoint resumed at step %d was probed with %s; "
            "this callback has %s. Starting a NEW reliance curve at step %d: the old curve's peak%s, smoothing, "
            "patience, stop-rule state and paired per-probe outcomes are forgotten, and the first probe event after "
            "step %d is the new curve's baseline.%s The old rows stay in state.log_history and on your trackers: the "
            "ctx_reliance/* curves before and after step %d measure different probes and must not be compared.",
            step, before, now, step, old_peak, step, reselect, step,
        )

    def _resume_selection(self, state: TrainerState) -> None:
        """``known_only`` on resume: monitor the probes selected at the start of the run, not a new selection made
        on the fine-tuned weights. Sets ``active_indices`` to ``None`` (recompute) with a warning when it cannot."""
        if self._new_curve_started:  # the saved selection is of the old probes: select again (said in the warning)
            self.active_indices, self.known_counts = None, None
            return
        saved = self._saved_state(state)
        ids = saved.get("known_only_probe_ids") if saved else None
        if not (self.known_only or self.informative_band is not None):
            if ids is not None:
                logger.warning(
                    "ctx_callback: the resumed run was started with known_only=True (%d probes monitored), but this "
                    "callback has known_only=False: it monitors all %d probes from step %d on, so its values are not "
                    "comparable with the rows logged before.", len(ids), len(self.probes), state.global_step,
                )
            return
        self.active_indices = None
        if saved is None:
            reason = (f"the checkpoint's {TRAINER_STATE_FILE} holds no ctx_callback state (the run was started "
                      "without known_only=True, or with an older ctx_callback)")
        elif ids is None:
            reason = "the run was started with known_only=False"
        else:
            index = {probe.id: i for i, probe in enumerate(self.probes)}
            missing = [probe_id for probe_id in ids if probe_id not in index]
            if not missing:
                self.active_indices = [index[probe_id] for probe_id in ids]
                self.known_counts = saved.get("known_counts")
                logger.info("ctx_callback: resumed with the known_only probe selection made at the start of the "
                            "run (%d/%d probes).", len(ids), len(self.probes))
                return
            reason = f"{len(missing)} of its probe ids are not among this callback's probes ({missing[:3]})"
        logger.warning(
            "ctx_callback: known_only=True on a resumed run, but the probe selection made at the start of the run "
            "cannot be restored: %s. Recomputing it on the current, already fine-tuned weights (step %d): it can "
            "differ from the probes the logged history measured, and then the resumed run's peak and stop decisions "
            "can differ from an uninterrupted run's.", reason, state.global_step,
        )

    @staticmethod
    def _check_band(band: Any, mode: str) -> tuple[float, float] | None:
        """Validate ``informative_band``."""
        if band is None:
            return None
        ok = (isinstance(band, (tuple, list)) and len(band) == 2
              and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in band)
              and 0.0 <= band[0] < band[1] <= 1.0)
        if not ok:
            raise ConfigurationError(
                f"informative_band must be None or (low, high) with 0 <= low < high <= 1 (the band of baseline "
                f"counterfactual probability whose probes are kept), got {band!r}."
            )
        if mode != "loglik":
            raise ConfigurationError(
                "informative_band needs mode='loglik' (it selects on the counterfactual probability), got "
                f"mode={mode!r}."
            )
        return (float(band[0]), float(band[1]))

    def _select_informative(self, model: torch.nn.Module) -> None:
        """Keep the probes whose counterfactual probability on the model as it is (train begin) lies in
        ``informative_band``: the others sit at the ceiling or the floor and can barely move the metric."""
        assert self.scorer is not None and self.informative_band is not None
        indices = self.active_indices if self.active_indices is not None else list(range(len(self.probes)))
        result = self.scorer.score_raw(model, indices, variants=("context",))
        p_cf = metric_outcomes(result.scores, result.variants, result.mode, "counterfactual_probability",
                               **_option_kwargs(result))
        assert p_cf is not None
        low, high = self.informative_band
        counts: dict[str, dict[str, int]] = {}
        for probe in self.probes:
            counts.setdefault(probe.family, {"kept": 0, "total": 0})["total"] += 1
        kept = []
        for row, index in enumerate(result.probe_indices):
            if low <= p_cf[row] <= high:
                kept.append(int(index))
                counts[self.probes[int(index)].family]["kept"] += 1
        self.active_indices, self.known_counts = kept, counts
        summary = ", ".join(f"{f}: {c['kept']}/{c['total']}" for f, c in sorted(counts.items()))
        logger.warning("ctx_callback: informative_band=%s kept %d/%d probes (%s).", self.informative_band, len(kept),
                       len(self.probes), summary)
        if not kept:
            raise ConfigurationError(
                f"informative_band={self.informative_band} kept no probes: no probe's counterfactual probability lies "
                "in the band on this model. Widen the band or use other probes."
            )

    def _prepare_probe_log(self, args: TrainingArguments, state: TrainerState) -> None:
        """Main process: a fresh run starts the probe log over; a resumed one drops the rows after its step."""
        if not (self.probe_log and args.output_dir and state.is_world_process_zero):
            return
        log = ProbeLog(os.path.join(args.output_dir, PROBES_FILE))
        try:
            log.truncate_after(state.global_step if state.global_step > 0 else None)
        except OSError as err:
            logger.warning("ctx_callback: could not prepare %s (%s: %s); training is unaffected.", log.path,
                           type(err).__name__, err)

    def _check_output_dir_writable(self, args: TrainingArguments) -> None:
        """Raise before the first step if the peak checkpoints could not be written (every rank raises alike)."""
        directory = args.output_dir
        problem = None
        if directory and args.should_save:  # the processes that write checkpoints
            try:
                os.makedirs(directory, exist_ok=True)
                with tempfile.TemporaryFile(dir=directory):
                    pass
            except OSError as err:
                problem = f"{type(err).__name__}: {err}"
        problems = [p for p in gather_outcomes(problem, plan_probes([], self.trainer)) if p]
        if problems:
            raise ConfigurationError(
                f"save_peak_checkpoint=True, but output_dir {directory!r} is not writable ({problems[0]}), so the "
                "peak checkpoints could not be saved. Pass a writable directory as the trainer's output_dir "
                "(TrainingArguments / SFTConfig), or set save_peak_checkpoint=False (and restore_peak_at_end=False) "
                "to probe and log without saving."
            )

    # ------------------------------------------------------------------------------------------------------------
    # Probing and logging
    # ------------------------------------------------------------------------------------------------------------
    def _log(self, row: dict[str, float], control: TrainerControl) -> None:
        """Log ``row`` through the base ``Trainer.log``: into ``state.log_history``, then every callback's ``on_log``
        (the trackers first). ``control.should_log`` is restored afterwards (``on_log`` clears it, which would drop
        the Trainer's own loss row for the step).

        A tracker (or any callback) that raises in ``on_log`` on this row does not stop training: ``Trainer.log``
        appended the row to ``state.log_history`` before calling ``on_log``, so it is kept (and reaches
        ``trainer_state.json``); only the trackers from the failing one on miss it. The first such error is a
        warning, later ones DEBUG messages. ``strict=True`` re-raises it.
        """
        should_log = control.should_log
        try:
            Trainer.log(self.trainer, dict(row))  # base class: SFTTrainer.log would add its running averages
        except Exception as err:  # noqa: BLE001 - a tracker failing on our row must not kill a long run
            if self.strict:
                raise
            failures = getattr(self, "_tracker_failures", 0)
            self._tracker_failures = failures + 1
            (logger.debug if failures else logger.warning)(
                "ctx_callback: a tracker raised while logging the ctx_reliance row at step %d (%s: %s); training "
                "continues. The row is in trainer.state.log_history (and trainer_state.json); the trackers from the "
                "failing one on missed it. Further tracker errors on these rows are logged at DEBUG level.",
                self.trainer.state.global_step, type(err).__name__, err,
            )
        finally:
            control.should_log = should_log

    def _probe(self, model: torch.nn.Module, state: TrainerState, control: TrainerControl) -> PeakDecision | None:
        assert self.scorer is not None
        step = state.global_step
        indices = self.active_indices if self.active_indices is not None else range(len(self.probes))
        plan = plan_probes(indices, self.trainer)  # this rank's share (all probes under FSDP / ZeRO-3)
        self.scorer.synced_gpus = plan.sharded_params
        variants = self._round_variants()  # identical on every rank: the event index is
        # ``variants=`` only when it is a subset: a default round calls score_raw exactly as before.
        options = {} if variants is None else {"variants": variants}
        try:
            result = run_round(lambda mine: self.scorer.score_raw(model, mine, **options), ScoreResult.merge, plan)
            metrics = self.scorer.metrics(result)
        except Exception as err:  # noqa: BLE001 - a failed probe must not kill a long run unless strict
            if self.strict:
                raise
            logger.warning("ctx_callback: probe at step %d failed (%s: %s); training continues.", step,
                           type(err).__name__, err)
            self._log({KEY_FAILED: 1.0}, control)
            return None
        self.probe_seconds_total += result.seconds
        self.probe_events += 1
        # NaN/inf scores (NaN/inf logits): the metrics over the finite rest are logged for diagnosis, but the round
        # is flagged and its monitored value is NaN for the peak tracker: never a peak, never counts toward patience.
        nonfinite = result.nonfinite_scores
        value = math.nan if nonfinite else metrics.get(self.monitor_key, math.nan)
        # Per-probe outcomes come from the merged result, identical on every rank; so are the rules' states.
        outcomes, preferred = self._round_outcomes(result)
        event = ProbeEvent(step, value, None if nonfinite else outcomes)
        peak_decision = self.peak_tracker.update(step, value)
        stop, _ = first_stop(self.stop_rules, event)
        peak_decision = replace(peak_decision, should_stop=stop is not None,
                                reason=None if stop is None else stop.message)
        # Every rank feeds the rules identical values; the decision is still taken once and shared, so that
        # stopping and saving (a barrier) happen on all ranks or on none.
        decision, self._last_stop_rule = broadcast_from_main((peak_decision, None if stop is None else stop.rule),
                                                             plan)
        row = dict(metrics)
        row.update(self._uncertainty(result))
        row.update(self._paired_row(event, preferred, decision.is_new_peak, state))
        row[KEY_SMOOTHED] = float(decision.smoothed)
        row[KEY_PEAK_VALUE] = float(decision.peak_value)
        row[KEY_PEAK_STEP] = float(decision.peak_step) if decision.peak_step is not None else math.nan
        row[KEY_SECONDS] = float(result.seconds)
        row[KEY_NONFINITE] = float(nonfinite)
        if nonfinite:
            logger.warning("ctx_callback: %d probe score(s) at step %d are not finite (NaN/inf logits?): the round is "
                           "flagged (%s = 1.0) and can neither be the peak nor count toward patience; its metrics over "
                           "the finite scores are logged for diagnosis only.", nonfinite, step, KEY_FAILED)
            row[KEY_FAILED] = 1.0
        elif math.isnan(value):
            logger.warning("ctx_callback: the monitored metric %s is NaN at step %d (NaN logits?).",
                           self.monitor_key, step)
            row[KEY_FAILED] = 1.0
        if decision.should_stop:
            row[KEY_STOPPED] = 1.0
        self._log(row, control)
        # What on_evaluate hands to metric_for_best_model: NaN for a flagged round, so it is never the Trainer's best.
        self.latest_metrics = {k: math.nan for k in metrics} if nonfinite else metrics
        self.last_probe_step = step
        self.history.append({**{k: v for k, v in row.items()}, "step": step})
        if state.is_world_process_zero and self.probe_log:
            log_rows = self._probe_log_rows(step, result)
            self._write_probe_rows(log_rows)
            self._report_flips(step, log_rows, preferred)
        self._export_state(state)  # the paired state (peak and previous outcomes) goes into the next checkpoint
        return decision

    # ------------------------------------------------------------------------------------------------------------
    # Per-probe outcomes: uncertainty, the paired comparison with the peak, the probe log and flip tables
    # ------------------------------------------------------------------------------------------------------------
    def _rows_of(self, result: ScoreResult, family: str | None) -> np.ndarray:
        """Mask of ``result``'s rows in ``family`` (all rows for ``None``)."""
        if family is None:
            return np.ones(len(result.probe_indices), dtype=bool)
        return np.array([self.probes[int(i)].family == family for i in result.probe_indices], dtype=bool)

    def _round_outcomes(self, result: ScoreResult) -> tuple[np.ndarray | None, list[str | None]]:
        """The monitored metric's per-probe outcomes and every probe's preferred answer, in probe order."""
        mask = self._rows_of(result, self.monitor_family)
        outcomes = metric_outcomes(result.scores[mask], result.variants, result.mode, self.monitor_metric,
                                   **_option_kwargs(result, mask))
        return outcomes, preferred_vector(result.scores, result.variants, result.mode, **_option_kwargs(result))

    def _uncertainty(self, result: ScoreResult) -> dict[str, float]:
        """Standard error and 95% interval of the monitored metric and the overall accuracies: Wilson for hit/miss
        outcomes, Student's t for means (keys ``<key>_se``, ``<key>_ci_low``, ``<key>_ci_high``)."""
        targets = [(self.monitor_key, self.monitor_metric, self.monitor_family)]
        targets += [(metric_key(m), m, None) for m in INTERVAL_METRICS if metric_key(m) != self.monitor_key]
        families = [self.probes[int(i)].family for i in result.probe_indices]
        return uncertainty(result.scores, families, result.variants, result.mode, targets, CONFIDENCE,
                           **_option_kwargs(result))

    def _paired_row(self, event: ProbeEvent, preferred: list[str | None], new_peak: bool,
                    state: TrainerState) -> dict[str, float]:
        """Update the kept peak/previous events; the decline from the peak, its interval and paired p-value, and
        the flips since the peak and since the previous event."""
        out: dict[str, float] = {}
        valid = not math.isnan(event.value)
        if valid and new_peak:
            self._peak_event, self._peak_preferred = event, preferred
            self._reported_flips = set()
        if valid and self._peak_event is not None:
            comparison = compare_events(self._peak_event, event, self.greater_is_better, CONFIDENCE)
            out[KEY_DECLINE] = float(comparison.decline)
            if comparison.interval is not None:
                out[KEY_DECLINE_LOW], out[KEY_DECLINE_HIGH] = map(float, comparison.interval)
            if comparison.p_value is not None:
                out[KEY_DECLINE_P] = float(comparison.p_value)
        if self._peak_preferred is not None and len(self._peak_preferred) == len(preferred):
            pairs = list(zip(self._peak_preferred, preferred))
            out[KEY_FLIPS_TO_MEMORY] = float(sum(a == "context" and b == "memory" for a, b in pairs))
            out[KEY_FLIPS_TO_CONTEXT] = float(sum(a == "memory" and b == "context" for a, b in pairs))
        if self._previous_preferred is not None and len(self._previous_preferred) == len(preferred):
            out[KEY_FLIPS_SINCE_PREVIOUS] = float(sum(a != b for a, b in zip(self._previous_preferred, preferred)))
        if valid:
            self._previous_event = event
        self._previous_preferred = preferred
        return out

    def _probe_ids(self, result: ScoreResult) -> list[str]:
        return [self.probes[int(i)].id for i in result.probe_indices]

    def _probe_log_rows(self, step: int, result: ScoreResult) -> list[dict[str, Any]]:
        """This event's probe log rows (:func:`~ctx_callback.outcomes.probe_rows`), in the result's probe order."""
        return probe_rows(step, self._probe_ids(result), [self.probes[int(i)].family for i in result.probe_indices],
                          result.scores, result.variants, result.mode, result.generations, **_option_kwargs(result))

    def _write_probe_rows(self, rows: list[dict[str, Any]]) -> None:
        """Append this event's rows to ``ctx_reliance_probes.jsonl``; an OS error is a warning (once)."""
        output_dir = self.trainer.args.output_dir
        if not output_dir:
            return
        try:
            ProbeLog(os.path.join(output_dir, PROBES_FILE)).append(rows)
        except OSError as err:
            if not self._probe_log_failed:
                logger.warning("ctx_callback: could not append to %s (%s: %s); training is unaffected.",
                               os.path.join(output_dir, PROBES_FILE), type(err).__name__, err)
            self._probe_log_failed = True

    def _report_flips(self, step: int, log_rows: list[dict[str, Any]], preferred: list[str | None]) -> None:
        """Send the probes that flipped since the peak, and were not sent before, to the trackers' tables: a W&B
        table in ``INCREMENTAL`` mode (only the new rows are uploaded) and TensorBoard text. ``cf``/``par`` are the
        probe log's (``par``: the parametric answer's score; ``None`` for a multiple-choice probe without one)."""
        peak = self._peak_event
        if peak is None or self._peak_preferred is None or len(self._peak_preferred) != len(preferred):
            return
        rows = []
        for log_row, before, after in zip(log_rows, self._peak_preferred, preferred):
            key = (log_row["id"], before, after)
            if before == after or after is None or before is None or key in self._reported_flips:
                continue
            self._reported_flips.add(key)
            cf, par = log_row["cf"], log_row["par"]
            rows.append([step, peak.step, log_row["id"], log_row["family"], before, after,
                         None if cf is None else round(float(cf), 4), None if par is None else round(float(par), 4)])
        if rows:
            self._send_flip_table(step, rows)

    def _send_flip_table(self, step: int, rows: list[list[Any]]) -> None:
        from transformers.integrations import TensorBoardCallback, WandbCallback

        for callback in self.trainer.callback_handler.callbacks:
            try:
                if isinstance(callback, TensorBoardCallback) and getattr(callback, "tb_writer", None) is not None:
                    lines = ["| " + " | ".join(FLIP_COLUMNS) + " |", "|" + "---|" * len(FLIP_COLUMNS)]
                    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
                    callback.tb_writer.add_text(f"{METRIC_PREFIX}/flips_since_peak", "\n".join(lines), step)
                    callback.tb_writer.flush()
                elif isinstance(callback, WandbCallback) and getattr(callback, "_initialized", False):
                    wandb = callback._wandb
                    if self._wandb_flip_table is None:
                        self._wandb_flip_table = wandb.Table(columns=FLIP_COLUMNS, log_mode="INCREMENTAL")
                    for row in rows:
                        self._wandb_flip_table.add_data(*row)
                    wandb.log({f"{METRIC_PREFIX}/flips_since_peak": self._wandb_flip_table,
                               "train/global_step": self.trainer.state.global_step})
            except Exception as err:  # noqa: BLE001 - a tracker failing on our table must not end a run
                if self.strict:
                    raise
                logger.warning("ctx_callback: could not log the flips table to %s (%s: %s).",
                               type(callback).__name__, type(err).__name__, err)

    def _act(self, decision: PeakDecision | None, args: TrainingArguments, state: TrainerState,
             control: TrainerControl, model: torch.nn.Module | None = None) -> None:
        if decision is None:
            return
        step = state.global_step
        if decision.is_new_peak and step == 0 and self.restore_peak_at_end and model is not None:
            self._keep_baseline(model)
        if decision.is_new_peak and self.save_peak_checkpoint and step > 0:
            self._baseline_weights = None  # a later peak: the baseline copy is no longer the peak's weights
            self._save_peak(args, state, control, step, float(decision.peak_value))
        if decision.should_stop and step == 0:
            # The Trainer runs its first optimizer step whatever a callback decides before it: a stop "at step 0"
            # would train one unprobed step. Refuse to start instead (before any step; the model is untouched).
            raise ConfigurationError(
                f"{self._last_stop_rule or 'a stop rule'} fired on the baseline, before any training: "
                f"{decision.reason}. The Trainer cannot stop before its first optimizer step, so rather than train an "
                "unprobed step and report a stop at step 0, ctx_callback refuses to start (the model is untouched). "
                "The floor is already crossed by the model you start from: lower stopping_threshold below the "
                "baseline value, set warmup_steps=N so that it applies from step N on, or remove it."
            )
        if decision.should_stop:
            control.should_training_stop = True
            self.stop_reason = decision.reason
            self.stop_step = step
            self.stop_rule_name = self._last_stop_rule
            message = f"ctx_callback: stopping training at step {step}: {decision.reason}."
            if self.peak_checkpoint:
                message += f" Peak checkpoint: {self.peak_checkpoint}."
            elif self.peak_save_error:
                message += f" The peak checkpoint was not saved ({self.peak_save_error})."
            self._announce(message, state)

    def _save_peak(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, step: int,
                   value: float) -> None:
        """Save ``checkpoint-{step}`` for a new peak; a failed save is reported, never fatal (class docstring)."""
        path = os.path.join(args.output_dir, f"checkpoint-{step}")
        own_best = args.metric_for_best_model is None  # then we own the Trainer's "best" bookkeeping
        previous = (state.best_global_step, state.best_metric, state.best_model_checkpoint)
        self.peak_checkpoint, self.peak_save_error = path, None
        self._export_state(state)  # the checkpoint's own Trainer state names it as the peak
        if control.should_save and args.save_strategy != "best":
            # The Trainer saves this step anyway (save_steps, or another callback asked), right after this event:
            # no second save. A failure there is the Trainer's own scheduled save failing, as without this callback.
            if own_best:
                state.best_global_step, state.best_metric, state.best_model_checkpoint = step, value, path
            return
        if own_best:  # set before the save: rotation (save_total_limit), run inside it, then keeps this folder
            state.best_global_step, state.best_metric, state.best_model_checkpoint = step, value, path
        plan = plan_probes([], self.trainer)
        best_step = state.best_global_step
        if plan.distributed:
            # With best_global_step set, _save_checkpoint runs a barrier after rank 0 wrote the weights: a rank
            # failing before it would leave the others waiting there. Unset for the call, the first collective after
            # a failure is the agreement below, which every rank reaches. What the Trainer does after that barrier
            # (point best_model_checkpoint at its best step's folder if it exists) is done here, before the call.
            if not own_best and args.save_strategy in ("steps", "epoch", "best") and best_step:
                best = os.path.join(args.output_dir, f"checkpoint-{best_step}")
                if os.path.exists(best):
                    state.best_model_checkpoint = best
            state.best_global_step = None
        error = None
        try:
            self.trainer._save_checkpoint(self.trainer.model_wrapped, None)
        except Exception as err:  # noqa: BLE001 - a full disk must not end a long run; reported below
            error = f"{type(err).__name__}: {err}"
        finally:
            state.best_global_step = best_step
        outcomes = gather_outcomes(error, plan)  # every rank learns every rank's outcome: all decide alike
        errors = [f"rank {rank}: {e}" if plan.distributed else e for rank, e in enumerate(outcomes) if e]
        if not errors:
            if args.should_save:
                self._refresh_state_of = path
            # As the Trainer does after each of its saves (W&B, MLflow, ... upload checkpoints in on_save).
            self.trainer.callback_handler.on_save(args, state, control)
            return
        state.best_global_step, state.best_metric, state.best_model_checkpoint = previous
        self.peak_checkpoint = None
        self.peak_save_error = f"saving {path} failed: {'; '.join(errors)}"
        cleanup = self._remove_partial_checkpoint(args, path)
        self._export_state(state)
        if self.strict:
            raise RuntimeError(f"ctx_callback: {self.peak_save_error}")
        logger.warning(
            "ctx_callback: could not save the peak checkpoint %s (%s); training continues. %s The summary reports "
            "peak_checkpoint: null and the error as peak_save_error, and restore_peak_at_end keeps the final weights "
            "unless a later peak is saved (free space or fix permissions in output_dir for that).",
            path, "; ".join(errors), cleanup,
        )

    @staticmethod
    def _remove_partial_checkpoint(args: TrainingArguments, path: str) -> str:
        """Remove what a failed save left (resume_from_checkpoint=True would pick it as the last checkpoint)."""
        if not args.should_save or not os.path.isdir(path):
            return "No partial folder was left."
        try:
            shutil.rmtree(path)
        except OSError as err:
            return (f"The partial folder could not be removed ({type(err).__name__}: {err}): delete it before "
                    "resume_from_checkpoint=True, which would pick it as the last checkpoint.")
        return "The partial folder was removed."

    def _refresh_saved_state(self, state: TrainerState) -> None:
        """Re-write ``trainer_state.json`` of the checkpoint saved during the last step, now that the Trainer has
        logged and evaluated that step, so it holds what a checkpoint the Trainer saves itself holds (the step's loss
        row, eval metrics, best metric, ``ExportableState`` callbacks' states)."""
        path, self._refresh_state_of = self._refresh_state_of, None
        if path is None or not os.path.isdir(path):
            return
        for callback in self.trainer.callback_handler.callbacks:  # as _save_checkpoint does (lists: left as they are)
            name = type(callback).__name__
            if isinstance(callback, ExportableState) and isinstance(state.stateful_callbacks.get(name), dict):
                state.stateful_callbacks[name] = callback.state()
        try:
            state.save_to_json(os.path.join(path, TRAINER_STATE_FILE))
        except OSError as err:
            logger.warning("ctx_callback: could not update %s in %s (%s: %s); the checkpoint stays resumable, but its "
                           "state lacks what the Trainer logged at step %d after the save.", TRAINER_STATE_FILE, path,
                           type(err).__name__, err, state.global_step)

    def _announce(self, message: str, state: TrainerState) -> None:
        """Log ``message`` at INFO; with ``verbose=True`` also print it, on the main process only."""
        logger.info(message)
        if self.verbose and state.is_world_process_zero:
            print(message, flush=True)

    # ------------------------------------------------------------------------------------------------------------
    # Trainer events
    # ------------------------------------------------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self._check_wiring(state, kwargs)
        model = kwargs["model"]
        check_probe_dtype_device(self.probe_dtype, device_of(model))  # float16 off CUDA: before the first step
        self._check_best_metric(args)
        if state.global_step == 0:
            self._start_fresh()
        else:
            self._baseline_weights = None
            self.latest_metrics = {}
            self.last_restored = False
            self.restored_from = None
        self.train_start_step = state.global_step
        if self.save_peak_checkpoint:
            self._check_output_dir_writable(args)
        if self.probe_on == "evaluate" and args.eval_strategy == "no":
            logger.warning(
                'ctx_callback: probe_on="evaluate" but the trainer never evaluates (eval_strategy="no"), so context '
                "reliance is probed only at start and end (and on your own trainer.evaluate() calls). Set "
                'eval_strategy="steps" with an eval_dataset, or use probe_on="steps" with eval_steps=N.'
            )
        if self.save_peak_checkpoint and args.metric_for_best_model is not None and args.save_total_limit:
            logger.warning(
                "ctx_callback: metric_for_best_model=%r is set, so the Trainer owns the 'best' checkpoint and "
                "save_total_limit=%d may rotate the reliance-peak checkpoint away. Use "
                "metric_for_best_model=%r to select on reliance, or unset save_total_limit.",
                args.metric_for_best_model, args.save_total_limit, self.monitor_key,
            )
        self.stop_reason = None
        self.stop_step = None
        if state.global_step > 0:
            self._check_probe_set(state)  # first: refuse, or start a new curve, before anything is rebuilt
            self._resume_selection(state)  # then: the paired state is kept for the selected probes
            self._replay_history(state)
        self._prepare_probe_log(args, state)
        if self.known_only and self.active_indices is None:
            self.active_indices, self.known_counts = self.scorer.known_probe_indices(model)
            summary = ", ".join(f"{f}: {c['kept']}/{c['total']}" for f, c in sorted(self.known_counts.items()))
            logger.warning("ctx_callback: knowledge verification kept %d/%d probes (%s).", len(self.active_indices),
                           len(self.probes), summary)
            if not self.active_indices:
                raise ConfigurationError(
                    "known_only=True kept no probes: the model prefers the parametric answer closed-book for none of "
                    "them. Use other probes or known_only=False."
                )
            if self.informative_band is not None:
                self._select_informative(model)
        elif self.informative_band is not None and self.active_indices is None:
            self._select_informative(model)
        if self.stop_rule == "significant_decline" and self.active_indices is not None:  # checked unselected before
            self._check_significant_probe_count(self._monitored_count(self.active_indices),
                                                "at train begin after the known_only / informative_band selection")
        self._export_state(state)
        if self.probe_at_start and state.global_step == 0 and self.last_probe_step is None:
            self._act(self._probe(model, state, control), args, state, control, model)
        return control

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self._refresh_state_of is not None:  # the previous step's logging/evaluation is done
            self._refresh_saved_state(state)
        return control

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        step = state.global_step
        due = self.probe_on == "steps" and step % self.eval_steps == 0
        # state.max_steps is 0 with max_steps=0, for which transformers still runs one step: probe after it too.
        last = self.probe_at_end and step >= state.max_steps
        if (due or last) and self.last_probe_step != step:
            self._act(self._probe(kwargs["model"], state, control), args, state, control, kwargs["model"])
        return control

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    metrics: dict[str, float] | None = None, **kwargs: Any):
        if self.probe_on == "evaluate" and self.last_probe_step != state.global_step:
            self._act(self._probe(kwargs["model"], state, control), args, state, control, kwargs["model"])
        if metrics is not None and self.latest_metrics and self.last_probe_step == state.global_step:
            # Visible to metric_for_best_model / save_strategy="best" (injected into the first eval set only).
            if not any(k.startswith(f"eval_{METRIC_PREFIX}/") for k in metrics):
                metrics.update({f"eval_{k}": v for k, v in self.latest_metrics.items()})
        return control

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if state.is_world_process_zero:
            self._write_summary(args, state)
        return control

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        model = kwargs.get("model")
        if self._refresh_state_of is not None:
            self._refresh_saved_state(state)
        restored = False
        peak_step = self.peak_tracker.peak_step
        if self.restore_peak_at_end and model is not None and peak_step is not None and peak_step != state.global_step:
            if peak_step == 0 and self._baseline_weights is not None:
                restored = self._restore_baseline(model)
            elif self.peak_checkpoint:
                restored = self._restore(model, self.peak_checkpoint)
            elif self.peak_save_error:
                logger.warning(
                    "ctx_callback: restore_peak_at_end=True, but the peak (step %d) was not saved (%s); the model "
                    "keeps its final weights (step %d).", peak_step, self.peak_save_error, state.global_step,
                )
            else:
                logger.warning(
                    "ctx_callback: restore_peak_at_end=True, but the peak (step %d) has neither a checkpoint nor an "
                    "in-memory copy (the baseline of a resumed run, or a run with sharded parameters); the model "
                    "keeps its final weights (step %d).", peak_step, state.global_step,
                )
        self._baseline_weights = None
        self.last_restored = restored
        if state.is_world_process_zero:
            self._write_summary(args, state, restored=restored)
            if self.plot:
                self._plot(args, state)
            self._announce(self.summary_text(restored=restored), state)
        return control

    # ------------------------------------------------------------------------------------------------------------
    # Peak restore, summary, plot
    # ------------------------------------------------------------------------------------------------------------
    def _restore(self, model: torch.nn.Module, path: str) -> bool:
        from .checkpoints import load_weights_into

        try:
            load_weights_into(model, path)
        except Exception as err:  # noqa: BLE001
            if self.strict:
                raise
            logger.warning("ctx_callback: could not restore the peak checkpoint %s (%s: %s); the model keeps its "
                           "final weights.", path, type(err).__name__, err)
            return False
        logger.warning("ctx_callback: restored the peak weights from %s.", path)
        self.restored_from = path
        return True

    def _keep_baseline(self, model: torch.nn.Module) -> None:
        """Copy the baseline's trainable parameters to CPU (the baseline is the peak and is never checkpointed)."""
        if params_are_sharded(self.trainer):
            logger.warning("ctx_callback: parameters are sharded (FSDP / ZeRO-3): no in-memory baseline copy is "
                           "kept, so restore_peak_at_end cannot restore the baseline if it stays the peak.")
            return
        self._baseline_weights = {
            name: param.detach().to("cpu", copy=True) for name, param in model.named_parameters()
            if param.requires_grad
        }

    def _restore_baseline(self, model: torch.nn.Module) -> bool:
        """Copy the in-memory baseline back into ``model`` (the peak was step 0)."""
        saved = self._baseline_weights
        assert saved is not None
        params = dict(model.named_parameters())
        missing = [name for name in saved if name not in params]
        if missing:
            if self.strict:
                raise RuntimeError(f"cannot restore the baseline: the model lacks parameters {missing[:5]}")
            logger.warning("ctx_callback: could not restore the baseline weights (the model lacks parameters %s); "
                           "the model keeps its final weights.", missing[:5])
            return False
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)
        self._baseline_weights = None
        count = sum(v.numel() for v in saved.values())
        logger.warning("ctx_callback: the peak is the baseline (step 0), which has no checkpoint: restored the "
                       "baseline weights from their in-memory copy (%d trainable tensors, %d values).",
                       len(saved), count)
        self.restored_from = RESTORED_FROM_BASELINE
        return True

    def summary(self, restored: bool = False) -> dict[str, Any]:
        """Baseline, peak and final values of the monitored metric, the stop step and the peak checkpoint.

        ``final`` is the last probe event (``final_step`` its step); ``trained_steps`` the optimizer steps the last
        ``train()`` call ran (``None`` before training) and ``end_step`` the global step training ended (or is) at.
        With ``trained_steps == 0`` no measurement was taken after training: ``final_step`` is the baseline step.
        ``restored_from`` says where restored weights came from: the checkpoint's path, ``"baseline (in memory)"``
        (then ``peak_checkpoint`` is ``None``), or ``None`` when nothing was restored. ``peak_save_error`` says why
        the current peak has no checkpoint when saving it failed (then ``peak_checkpoint`` is ``None``).
        ``curve_start_step``: the step a new reliance curve began at after a resume with another probe set
        (``on_probe_set_change="new_curve"``; ``baseline`` is then the new curve's first event), else ``None``.
        """
        values = [(row["step"], row.get(self.monitor_key)) for row in self.history if self.monitor_key in row]
        rows = {row["step"]: row for row in self.history if self.monitor_key in row}

        def interval(step: Any, low: str, high: str) -> list[float] | None:
            row = rows.get(step, {})
            return [row[low], row[high]] if low in row and high in row else None

        peak_step, final_step = self.peak_tracker.peak_step, values[-1][0] if values else None
        final_row = rows.get(final_step, {})
        end_step = None
        if self.trainer is not None and self.train_start_step is not None:
            end_step = int(self.trainer.state.global_step)
        return {
            "monitor": self.monitor_key,
            "baseline": values[0][1] if values else None,
            "baseline_step": values[0][0] if values else None,
            "final": values[-1][1] if values else None,
            "final_step": values[-1][0] if values else None,
            "peak_smoothed": None if math.isnan(self.peak_tracker.peak_value) else self.peak_tracker.peak_value,
            "peak_step": self.peak_tracker.peak_step,
            "peak_raw": next((v for s, v in values if s == self.peak_tracker.peak_step), None),
            "stop_step": self.stop_step,
            "stop_reason": self.stop_reason,
            "stop_rule": self.stop_rule_name,
            "peak_interval": interval(peak_step, self.monitor_key + CI_LOW_SUFFIX, self.monitor_key + CI_HIGH_SUFFIX),
            "final_interval": interval(final_step, self.monitor_key + CI_LOW_SUFFIX,
                                       self.monitor_key + CI_HIGH_SUFFIX),
            "final_decline_from_peak": final_row.get(KEY_DECLINE),
            "final_decline_interval": interval(final_step, KEY_DECLINE_LOW, KEY_DECLINE_HIGH),
            "final_decline_p_value": final_row.get(KEY_DECLINE_P),
            "peak_checkpoint": self.peak_checkpoint,
            "peak_save_error": self.peak_save_error,
            "restored_peak": restored,
            "restored_from": self.restored_from if restored else None,
            "trained_steps": None if end_step is None else end_step - int(self.train_start_step or 0),
            "end_step": end_step,
            "probe_events": self.peak_tracker.num_events,
            "probe_seconds_total": self.probe_seconds_total,
            "known_counts": self.known_counts,
            "curve_start_step": self.curve_start_step,
        }

    def summary_text(self, restored: bool = False) -> str:
        s = self.summary(restored)

        def fmt(v: Any) -> str:
            return "n/a" if v is None else f"{v:.3f}"

        lines = [
            f"ctx_callback summary ({s['monitor']}):",
            f"  baseline {fmt(s['baseline'])} at step {s['baseline_step']}",
            f"  peak     {fmt(s['peak_raw'])} (smoothed {fmt(s['peak_smoothed'])}) at step {s['peak_step']}",
            self._final_line(s, fmt),
            f"  stopped early at step {s['stop_step']}" if s["stop_step"] is not None else "  no early stop",
            "  peak checkpoint: None (the peak is the baseline; restored from its in-memory copy)"
            if s["restored_from"] == RESTORED_FROM_BASELINE
            else f"  peak checkpoint: not saved ({s['peak_save_error']})" if s["peak_save_error"]
            else f"  peak checkpoint: {s['peak_checkpoint']}" + (" (restored)" if restored else ""),
            f"  probing took {s['probe_seconds_total']:.1f}s over {s['probe_events']} events",
        ]
        if s["curve_start_step"] is not None:
            lines.insert(1, f"  a new curve from step {s['curve_start_step']} (resumed with another probe set; the "
                            "rows before it measured other probes)")
        return "\n".join(lines)

    @staticmethod
    def _final_line(s: dict[str, Any], fmt: Any) -> str:
        """The summary's "final" line, which never presents a measurement not taken after training as final."""
        if s["final_step"] is None:
            return "  final    n/a (no probe succeeded)"
        if s["trained_steps"] == 0 and s["final_step"] == s["baseline_step"]:
            return (f"  final    n/a: no training step ran (trained_steps 0); the only measurement is the baseline "
                    f"at step {s['baseline_step']}")
        line = f"  final    {fmt(s['final'])} at step {s['final_step']}"
        if s["end_step"] is not None and s["final_step"] < s["end_step"]:
            line += f" (the last probe; training ended at step {s['end_step']})"
        return line

    def _write_summary(self, args: TrainingArguments, state: TrainerState, restored: bool = False) -> None:
        """Write ``ctx_reliance_summary.json``; an OS error is a warning, never a failed run."""
        if not args.output_dir:
            return
        path = os.path.join(args.output_dir, SUMMARY_FILE)
        payload = {"summary": self.summary(restored), "history": self.history}
        try:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            with open(path, "w") as f:
                json.dump(payload, f, indent=2, default=float)
        except OSError as err:
            logger.warning("ctx_callback: could not write %s (%s: %s); training is unaffected, and the summary is "
                           "still in callback.summary() and the metrics in trainer.state.log_history.", path,
                           type(err).__name__, err)

    def _plot(self, args: TrainingArguments, state: TrainerState) -> None:
        try:
            from .plotting import plot_reliance
        except ImportError as err:  # pragma: no cover - matplotlib missing
            logger.warning("ctx_callback: plot=True needs matplotlib (%s).", err)
            return
        path = os.path.join(args.output_dir, "ctx_reliance.png")
        try:
            plot_reliance(state.log_history, path, monitor_key=self.monitor_key, stop_step=self.stop_step)
        except OSError as err:
            logger.warning("ctx_callback: could not write the plot %s (%s: %s); training is unaffected.", path,
                           type(err).__name__, err)


def probe_set_digest(probes: Sequence[Probe]) -> str:
    """SHA-1 of a probe set, in order: each probe's id and everything that is scored or matched (context, question,
    answers, aliases, options, their listing, the aligned context); ``metadata`` is not included. Equal digests mean
    the same probes in the same order (the prompt format, system prompt and model are not part of it)."""
    digest = hashlib.sha1()
    for p in probes:
        fields = [p.id, p.family, p.context, p.question, p.counterfactual_answer, p.parametric_answer,
                  list(p.counterfactual_aliases), list(p.parametric_aliases), p.aligned_context, list(p.options),
                  p.list_options]
        digest.update(json.dumps(fields, ensure_ascii=False).encode("utf-8") + b"\n")
    return digest.hexdigest()


def _option_kwargs(result: ScoreResult, mask: np.ndarray | None = None) -> dict[str, Any]:
    """``options=`` / ``option_roles=`` of a round's multiple-choice scores (rows selected by ``mask``), for the
    per-probe outcome functions of :mod:`ctx_callback.outcomes`."""
    options, roles = result.option_scores, result.option_roles
    if options is None or roles is None:
        return {}
    if mask is not None:
        options, roles = options[mask], roles[mask]
    return {"options": options, "option_roles": roles}
