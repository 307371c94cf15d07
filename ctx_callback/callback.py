"""``ContextRelianceCallback``: probe context reliance during training, log it, stop and keep the peak.

The callback is the wiring between the Trainer's events and the parts it owns, each a module with one job:
:mod:`~ctx_callback.callback_options` (the arguments checked), :mod:`~ctx_callback.probe_selection` (``known_only`` /
``informative_band``), :class:`~ctx_callback.scoring.ProbeScorer` (a probe round), :mod:`~ctx_callback.reliance_row`
(the logged row), :class:`~ctx_callback.stopping.StopDecider` (peak and stop: one decision per event),
:class:`~ctx_callback.peak_checkpoint.PeakCheckpointer` (save, protect, refresh, restore),
:mod:`~ctx_callback.probe_reports` (probe log, flips), :mod:`~ctx_callback.reporting` (summary, plot), and
:mod:`~ctx_callback.resume_state` / :mod:`~ctx_callback.resume` (what a resume needs, and rebuilding it).

Why the callback takes the trainer: the tracker integrations (TensorBoard, W&B, MLflow, trackio, ...) receive rows
only through ``Trainer.log``; a callback that edits ``logs`` in its own ``on_log`` runs after them, and callback
events do not receive the trainer. TRL's own logging callbacks take the trainer in their constructor for the same
reason. Rows are logged through the base ``transformers.Trainer.log`` (not ``SFTTrainer.log``, which would fold its
own running averages into our row) and ``control.should_log`` is preserved around the call, so the Trainer's own
loss row for the step is not dropped.

Under several processes (DDP, FSDP, DeepSpeed) :mod:`ctx_callback.distributed` decides which probes each rank scores
and combines the results, and the stop/save decision is taken once and broadcast, so every rank acts alike.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from . import reporting
from .callback_options import (
    check_best_metric,
    check_significant_probe_count,
    probe_set_digest,
    validate_arguments,
    warn_about_training_arguments,
)
from .decisions import DEFAULT_ALPHA, DEFAULT_MIN_DECLINE, ProbeEvent
from .distributed import broadcast_from_main, plan_probes, run_round
from .encoding import ALL_VARIANTS
from .engines.base import device_of
from .errors import ConfigurationError, TrainerWiringError
from .messages import logger, rank_zero_warn, warn
from .metrics import METRIC_PREFIX
from .models import max_positions
from .outcomes import PER_PROBE_METRICS, probe_rows
from .peak import PeakTracker
from .peak_checkpoint import PeakCheckpointer
from .probe_reports import ProbeReports
from .probe_selection import ProbeSelection
from .probes import Probe
from .reliance_row import (
    KEY_FAILED,
    KEY_STOPPED,
    decision_row,
    decline_row,
    option_kwargs,
    round_outcomes,
    uncertainty_row,
)
from .resume import check_probe_set, replay_rows
from .resume_state import TRAINER_STATE_FILE, KeptEvent, PairedEvents, ResumeState, read_state, write_state
from .scoring import ProbeScorer, ScoreResult, check_probe_dtype_device
from .stopping import RoundDecision

__all__ = ["ContextRelianceCallback", "probe_set_digest"]
#: Where the names that moved out of this module live (they stay importable from here).
_MOVED = {
    "reliance_row": ("KEY_", "SE_SUFFIX", "CI_LOW_SUFFIX", "CI_HIGH_SUFFIX"), "probe_reports": ("FLIP_COLUMNS",),
    "callback_options": ("ON_PROBE_SET_CHANGE",), "peak_checkpoint": ("RESTORED_FROM_BASELINE",),
    "resume_state": ("STATE_KEY", "TRAINER_STATE_FILE"),
}


def __getattr__(name: str) -> Any:
    """``ctx_callback.callback.KEY_*``, ``STATE_KEY``, ...: the names that moved to the parts."""
    import importlib

    for module, prefixes in _MOVED.items():
        if name.startswith(prefixes):
            return getattr(importlib.import_module(f"ctx_callback.{module}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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

    Saving the peak checkpoint (``save_peak_checkpoint``): the Trainer's own save is used where it saves anyway, else
    the callback calls it, so the folder is a resumable Trainer checkpoint protected from ``save_total_limit``
    rotation; a failed save (a full disk) is a warning, never a failed run (``strict=True`` raises). The details,
    under several processes too, are in :mod:`ctx_callback.peak_checkpoint`. What a resume keeps is described in
    :mod:`ctx_callback.resume_state`.

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
        options = validate_arguments({name: value for name, value in locals().items() if name != "self"})
        self.monitor = options.monitor
        self.monitor_key, self.monitor_metric = options.monitor.key, options.monitor.metric
        self.monitor_family, self.greater_is_better = options.monitor.family, options.monitor.greater_is_better
        self.probes, self._probe_set_sha1, self.decider = options.probes, options.probe_set_sha1, options.decider
        self.informative_band, self.probe_dtype = options.informative_band, options.probe_dtype
        self.selection = ProbeSelection(self.probes, known_only, options.informative_band)
        self.checkpointer, self.reports = PeakCheckpointer(trainer, strict), ProbeReports(strict)
        self.trainer, self.tokenizer, self.prompt_format, self.mode = trainer, tokenizer, prompt_format, mode
        self.eval_steps, self.probe_on, self.probe_at_start, self.probe_at_end = eval_steps, probe_on, \
            probe_at_start, probe_at_end
        self.known_only, self.stop_rule, self.alpha, self.controls_every = known_only, stop_rule, alpha, controls_every
        self.save_peak_checkpoint, self.restore_peak_at_end = save_peak_checkpoint, restore_peak_at_end
        self.strict, self.plot, self.verbose, self.probe_log = strict, plot, verbose, probe_log
        self.on_probe_set_change = on_probe_set_change
        self._scorer_kwargs = dict(
            mode=mode, variants=tuple(variants), engine=engine, max_batch_tokens=max_batch_tokens,
            max_batch_size=max_batch_size, max_new_tokens=max_new_tokens, system_prompt=system_prompt,
            chat_template_kwargs=chat_template_kwargs, probe_dtype=options.probe_dtype,
        )
        self.scorer: ProbeScorer | None = None
        #: Global step at which the current (or last) ``train()`` call began.
        self.train_start_step: int | None = None
        self._tracker_failures = 0
        self._start_fresh()
        tokenizer = tokenizer if tokenizer is not None else getattr(trainer, "processing_class", None)
        if tokenizer is not None:
            self._build_scorer(tokenizer, getattr(trainer, "model", None))

    # The parts' state, under the names it always had.
    peak_tracker: PeakTracker = property(lambda self: self.decider.tracker)  # type: ignore[assignment]
    active_indices: list[int] | None = property(lambda self: self.selection.active_indices)  # type: ignore
    known_counts: dict | None = property(lambda self: self.selection.known_counts)  # type: ignore[assignment]
    peak_checkpoint: str | None = property(lambda self: self.checkpointer.peak_checkpoint)  # type: ignore
    peak_save_error: str | None = property(lambda self: self.checkpointer.peak_save_error)  # type: ignore
    restored_from: str | None = property(lambda self: self.checkpointer.restored_from)  # type: ignore[assignment]

    def _start_fresh(self) -> None:
        """Forget everything a previous ``train()`` call left: this call starts at step 0 with a new baseline."""
        self.decider.reset()
        self.reports.reset()
        self.checkpointer.reset()
        self.selection.reset()  # known_only / informative_band: re-selected on the model as it is now
        self.history: list[dict[str, float]] = []
        self.latest_metrics: dict[str, float] = {}
        self.last_probe_step: int | None = None
        self.stop_reason: str | None = None
        self.stop_step: int | None = None
        #: The rule that stopped training (its name), or ``None``.
        self.stop_rule_name: str | None = None
        self.probe_seconds_total = 0.0
        #: Successful probe rounds of this run so far (the event index of the next one; see ``controls_every``).
        self.probe_events = 0
        #: Whether the peak weights were loaded back into the model at train end.
        self.last_restored = False
        #: The global step a new reliance curve started at (``on_probe_set_change="new_curve"``), else ``None``.
        self.curve_start_step: int | None = None

    def _build_scorer(self, tokenizer: Any, model: Any) -> None:
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # multimodal processors carry a tokenizer
        self.scorer = ProbeScorer(self.probes, tokenizer, self.prompt_format,
                                  max_length=max_positions(getattr(model, "config", None)), **self._scorer_kwargs)

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
            if kwargs.get("processing_class") is None:
                raise TrainerWiringError(
                    "ContextRelianceCallback has no tokenizer: pass tokenizer=... to the callback, or "
                    "processing_class=tokenizer to the trainer."
                )
            self._build_scorer(kwargs["processing_class"], kwargs.get("model"))

    # ------------------------------------------------------------------------------------------------------------
    # Resume: what survives in the checkpoint, and rebuilding the rest
    # ------------------------------------------------------------------------------------------------------------
    def _resume_state(self) -> ResumeState:
        """What a resume from a checkpoint saved now needs (:class:`~ctx_callback.resume_state.ResumeState`)."""
        peak, previous, selection = self.decider.peak_event, self.decider.previous_event, self.selection
        paired = None if peak is None else PairedEvents(
            selection.ids_digest(), KeptEvent(peak.step, peak.outcomes, self.reports.peak_preferred),
            None if previous is None else KeptEvent(previous.step, previous.outcomes, self.reports.previous_preferred))
        return ResumeState(
            num_probes=len(self.probes), probe_set_sha1=self._probe_set_sha1, curve_start_step=self.curve_start_step,
            selected_ids=selection.saved_ids(), known_counts=selection.known_counts if selection.selects else None,
            informative_band=None if self.informative_band is None else list(self.informative_band),
            peak_checkpoint=self.checkpointer.peak_checkpoint, peak_save_error=self.checkpointer.peak_save_error,
            paired=paired)

    def _export_state(self, state: TrainerState) -> None:
        """Keep the resume state in ``state.stateful_callbacks``: every checkpoint saved from now on carries it."""
        write_state(state.stateful_callbacks, self.monitor_key, self._resume_state())

    def _resume(self, state: TrainerState) -> None:
        """Check the probe set (refuse, or start a new curve), restore the selection, replay the logged rows."""
        step = state.global_step
        check = check_probe_set(state.stateful_callbacks, state.log_history, step, monitor_key=self.monitor_key,
                                num_probes=len(self.probes), sha1=self._probe_set_sha1,
                                selects=self.selection.selects, on_change=self.on_probe_set_change)
        self.curve_start_step = check.curve_start_step
        binary = PER_PROBE_METRICS.get(self.monitor_metric, False)
        saved = read_state(state.stateful_callbacks, self.monitor_key, binary)
        self.selection.resume(saved, step, check.new_curve)  # first: the paired records are for the selected probes
        kept = saved.paired.by_step(self.selection.ids_digest()) if saved and saved.paired else {}
        replayed = replay_rows(state.log_history, step, self.curve_start_step, self.monitor_key, kept, self.decider,
                               self.reports)
        self.history, self.probe_seconds_total = replayed.history, replayed.probe_seconds_total
        self.probe_events = replayed.probe_events
        self.last_probe_step = replayed.last_probe_step if replayed.history else self.last_probe_step
        self.checkpointer.resume(self.decider.peak_step, self.trainer.args.output_dir,
                                 saved.peak_checkpoint if saved else None, saved.peak_save_error if saved else None)
        peak = self.decider.peak_event
        if peak is not None and peak.outcomes is None and self.decider.rules:
            rank_zero_warn(
                "ctx_callback: the checkpoint's %s holds no per-probe outcomes of the peak event (step %s; saved by "
                "an older ctx_callback, or with another probe selection): the paired comparison with the peak (and "
                "stop_rule='significant_decline') resumes at the next new peak.", TRAINER_STATE_FILE, peak.step)
        tracker = self.decider.tracker
        if tracker.num_events:
            logger.info("ctx_callback: resumed with %d probe events, peak %.4f at step %s.", tracker.num_events,
                        tracker.peak_value, tracker.peak_step)

    # ------------------------------------------------------------------------------------------------------------
    # A probe event: score, decide, log, act
    # ------------------------------------------------------------------------------------------------------------
    def _log(self, row: dict[str, float], control: TrainerControl) -> None:
        """Log ``row`` through the base ``Trainer.log`` (``control.should_log`` kept: ``on_log`` clears it, which
        would drop the Trainer's own loss row for the step). A tracker that raises in ``on_log`` does not stop
        training (the row is already in ``state.log_history``): a warning, later ones at DEBUG; ``strict`` re-raises.
        """
        should_log = control.should_log
        try:
            Trainer.log(self.trainer, dict(row))  # base class: SFTTrainer.log would add its running averages
        except Exception as err:  # noqa: BLE001 - a tracker failing on our row must not kill a long run
            if self.strict:
                raise
            self._tracker_failures += 1
            (logger.debug if self._tracker_failures > 1 else logger.warning)(
                "ctx_callback: a tracker raised while logging the ctx_reliance row at step %d (%s: %s); training "
                "continues. The row is in trainer.state.log_history (and trainer_state.json); the trackers from the "
                "failing one on missed it. Further tracker errors on these rows are logged at DEBUG level.",
                self.trainer.state.global_step, type(err).__name__, err,
            )
        finally:
            control.should_log = should_log

    def _probe(self, model: torch.nn.Module, state: TrainerState, control: TrainerControl) -> RoundDecision | None:
        assert self.scorer is not None
        step, scorer = state.global_step, self.scorer
        plan = plan_probes(self.selection.indices(), self.trainer)  # this rank's share (all under FSDP / ZeRO-3)
        scorer.synced_gpus = plan.sharded_params
        # The controls on every controls_every-th event counted from the baseline; ``variants=`` only when a subset.
        controls = self.controls_every == 1 or self.probe_events % self.controls_every == 0
        options = {} if controls else {"variants": ("context",)}
        try:
            result = run_round(lambda mine: scorer.score_raw(model, mine, **options), ScoreResult.merge, plan)
            metrics = scorer.metrics(result)
        except Exception as err:  # noqa: BLE001 - a failed probe must not kill a long run unless strict
            if self.strict:
                raise
            warn("ctx_callback: probe at step %d failed (%s: %s); training continues.", step, type(err).__name__, err)
            self._log({KEY_FAILED: 1.0}, control)
            return None
        self.probe_seconds_total += result.seconds
        self.probe_events += 1
        # NaN/inf scores: the metrics over the finite rest are logged for diagnosis, but the round is flagged and
        # its monitored value is NaN for the decider: never a peak, never counts toward patience.
        nonfinite = result.nonfinite_scores
        value = math.nan if nonfinite else metrics.get(self.monitor_key, math.nan)
        outcomes, preferred = round_outcomes(result, self.probes, self.monitor)  # of the merged result: every rank
        decision = self.decider.update(ProbeEvent(step, value, None if nonfinite else outcomes))
        # Taken once and shared, so that stopping and saving (a barrier) happen on all ranks or on none.
        decision = broadcast_from_main(decision, plan)
        row = {**metrics, **uncertainty_row(result, self.probes, self.monitor), **decline_row(decision.comparison)}
        row.update(self.reports.flip_counts(preferred, decision.peak.is_new_peak))
        row.update(decision_row(decision, result.seconds, nonfinite))
        if nonfinite:
            rank_zero_warn("ctx_callback: %d probe score(s) at step %d are not finite (NaN/inf logits?): the round is "
                           "flagged (%s = 1.0) and can neither be the peak nor count toward patience; its metrics "
                           "over the finite scores are logged for diagnosis only.", nonfinite, step, KEY_FAILED)
            row[KEY_FAILED] = 1.0
        elif math.isnan(value):
            rank_zero_warn("ctx_callback: the monitored metric %s is NaN at step %d (NaN logits?).", self.monitor_key,
                           step)
            row[KEY_FAILED] = 1.0
        if decision.stop:
            row[KEY_STOPPED] = 1.0
        self._log(row, control)
        # What on_evaluate hands to metric_for_best_model: NaN for a flagged round, so it is never the Trainer's best.
        self.latest_metrics = {k: math.nan for k in metrics} if nonfinite else metrics
        self.last_probe_step = step
        self.history.append({**row, "step": step})
        if state.is_world_process_zero and self.probe_log:
            probes = [self.probes[int(i)] for i in result.probe_indices]
            log_rows = probe_rows(step, [p.id for p in probes], [p.family for p in probes], result.scores,
                                  result.variants, result.mode, result.generations, **option_kwargs(result))
            self.reports.write_probe_log(self.trainer.args.output_dir, log_rows)
            peak_event = self.decider.peak_event
            self.reports.report_flips(step, None if peak_event is None else peak_event.step, log_rows, preferred,
                                      self.trainer.callback_handler.callbacks, self.trainer.state.global_step)
        self._export_state(state)  # the paired state (peak and previous outcomes) goes into the next checkpoint
        return decision

    def _act(self, decision: RoundDecision | None, args: TrainingArguments, state: TrainerState,
             control: TrainerControl, model: torch.nn.Module | None = None) -> None:
        """Keep the baseline, save a new peak, stop: what the decision for this event asks for."""
        if decision is None:
            return
        step, peak = state.global_step, decision.peak
        if peak.is_new_peak and step == 0 and self.restore_peak_at_end and model is not None:
            self.checkpointer.keep_baseline(model)
        if peak.is_new_peak and self.save_peak_checkpoint and step > 0:
            self.checkpointer.save(args, state, control, step, float(peak.peak_value),
                                   lambda: self._export_state(state))
        if decision.stop and step == 0:
            # The Trainer runs its first optimizer step whatever a callback decides before it: a stop "at step 0"
            # would train one unprobed step. Refuse to start instead (before any step; the model is untouched).
            raise ConfigurationError(
                f"{decision.rule or 'a stop rule'} fired on the baseline, before any training: "
                f"{decision.reason}. The Trainer cannot stop before its first optimizer step, so rather than train an "
                "unprobed step and report a stop at step 0, ctx_callback refuses to start (the model is untouched). "
                "The floor is already crossed by the model you start from: lower stopping_threshold below the "
                "baseline value, set warmup_steps=N so that it applies from step N on, or remove it."
            )
        if decision.stop:
            control.should_training_stop = True
            self.stop_reason, self.stop_step, self.stop_rule_name = decision.reason, step, decision.rule
            message = f"ctx_callback: stopping training at step {step}: {decision.reason}."
            if self.peak_checkpoint:
                message += f" Peak checkpoint: {self.peak_checkpoint}."
            elif self.peak_save_error:
                message += f" The peak checkpoint was not saved ({self.peak_save_error})."
            self._announce(message, state)

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
        check_best_metric(args.metric_for_best_model, self.controls_every)
        if state.global_step == 0:
            self._start_fresh()
        else:
            self.checkpointer.baseline_weights, self.checkpointer.restored_from = None, None
            self.latest_metrics, self.last_restored = {}, False
        self.train_start_step = state.global_step
        if self.save_peak_checkpoint:
            self.checkpointer.check_output_dir_writable(args)
        warn_about_training_arguments(args, self.probe_on, self.save_peak_checkpoint, self.monitor_key)
        self.stop_reason, self.stop_step = None, None
        if state.global_step > 0:
            self._resume(state)
        if self.probe_log and args.output_dir and state.is_world_process_zero:
            ProbeReports.prepare_probe_log(args.output_dir, state.global_step)
        self.selection.select(model, self.scorer)
        if self.stop_rule == "significant_decline" and self.active_indices is not None:  # checked unselected before
            check_significant_probe_count(self.selection.monitored_count(self.monitor_family, self.active_indices),
                                          "at train begin after the known_only / informative_band selection",
                                          self.monitor, self.alpha)
        self._export_state(state)
        if self.probe_at_start and state.global_step == 0 and self.last_probe_step is None:
            self._act(self._probe(model, state, control), args, state, control, model)
        return control

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self.checkpointer.refresh_saved_state(state)  # a peak saved during the last step: now it is logged
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
            reporting.write_summary(args.output_dir, self.summary(), self.history)
        return control

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        model, peak_step = kwargs.get("model"), self.decider.peak_step
        self.checkpointer.refresh_saved_state(state)
        restored = False
        if self.restore_peak_at_end and model is not None and peak_step is not None and peak_step != state.global_step:
            restored = self.checkpointer.restore_at_end(model, peak_step, state.global_step)
        self.checkpointer.baseline_weights = None
        self.last_restored = restored
        if state.is_world_process_zero:
            reporting.write_summary(args.output_dir, self.summary(restored), self.history)
            if self.plot:
                reporting.write_plot(args.output_dir, state.log_history, self.monitor_key, self.stop_step)
            self._announce(self.summary_text(restored=restored), state)
        return control

    # ------------------------------------------------------------------------------------------------------------
    # The report
    # ------------------------------------------------------------------------------------------------------------
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
        tracker, checkpointer = self.decider.tracker, self.checkpointer
        end_step = None
        if self.trainer is not None and self.train_start_step is not None:
            end_step = int(self.trainer.state.global_step)
        return reporting.summarize(reporting.RunFacts(
            self.monitor_key, self.history, tracker.peak_step, tracker.peak_value, tracker.num_events, self.stop_step,
            self.stop_reason, self.stop_rule_name, checkpointer.peak_checkpoint, checkpointer.peak_save_error,
            checkpointer.restored_from, end_step, self.train_start_step, self.probe_seconds_total,
            self.selection.known_counts, self.curve_start_step), restored)

    def summary_text(self, restored: bool = False) -> str:
        """The summary as the lines printed at train end."""
        return reporting.summary_text(self.summary(restored), restored)
