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
takes exactly the decisions an uninterrupted one takes.

Under several processes (DDP, FSDP, DeepSpeed) :mod:`ctx_callback.distributed` decides which probes each rank scores
and combines the results, and the stop/save decision is taken once and broadcast, so every rank acts alike.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .distributed import broadcast_from_main, gather_outcomes, params_are_sharded, plan_probes, run_round
from .encoding import ALL_VARIANTS
from .errors import ConfigurationError, TrainerWiringError
from .metrics import METRIC_PREFIX
from .models import max_positions
from .monitor import parse_monitor
from .peak import PeakDecision, PeakTracker
from .probes import Probe, load_probes
from .scoring import ProbeScorer, ScoreResult

__all__ = ["ContextRelianceCallback"]

logger = logging.getLogger(__name__)

_PROBE_ON = ("steps", "evaluate")
SUMMARY_FILE = "ctx_reliance_summary.json"
#: ``restored_from`` in the summary when the peak was the baseline (step 0), restored from its in-memory copy.
RESTORED_FROM_BASELINE = "baseline (in memory)"

#: Extra keys the callback logs next to the metrics.
KEY_SMOOTHED = f"{METRIC_PREFIX}/monitor_smoothed"
KEY_PEAK_VALUE = f"{METRIC_PREFIX}/peak_value"
KEY_PEAK_STEP = f"{METRIC_PREFIX}/peak_step"
KEY_SECONDS = f"{METRIC_PREFIX}/probe_seconds"
KEY_FAILED = f"{METRIC_PREFIX}/probe_failed"
KEY_STOPPED = f"{METRIC_PREFIX}/early_stop"


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
        monitor: Metric that defines the peak, e.g. ``"counterfactual_accuracy"`` (default) or
            ``"world_facts/counterfactual_accuracy"``.
        greater_is_better: Direction of ``monitor``; default inferred (``parametric_accuracy`` and
            ``memorization_ratio`` are better when lower).
        smoothing: ``"ema"`` (default), ``"mean"`` or ``"none"`` over probe events.
        ema_alpha: EMA weight of the newest value.
        smoothing_window: Window of the moving average.
        min_delta: Smallest smoothed improvement that counts as a new peak.
        patience: Probe events without improvement before training stops; ``None`` (default) never stops.
        warmup_steps: Never stop before this global step.
        save_peak_checkpoint: Have the Trainer save a checkpoint at each new peak, and protect the peak checkpoint
            from ``save_total_limit`` rotation. ``output_dir`` must then be writable: this is checked at train begin
            (a :class:`~ctx_callback.errors.ConfigurationError` before the first step, not a crash at the first save).
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
        verbose: Print the stop message and the train-end summary on the main process. They are always logged
            at INFO level through the ``ctx_callback.callback`` logger as well.

    Each ``trainer.train()`` that starts at step 0 is a fresh run: the baseline is probed again and the peak,
    patience, history, stop information and (with ``known_only``) the probe selection start over. A run resumed from
    a checkpoint instead rebuilds them from ``state.log_history``.

    The summary (:meth:`summary`) reports ``trained_steps``, the optimizer steps this ``train()`` call ran; ``final``
    is the last probe event. When no step ran, ``final_step`` equals the baseline step and :meth:`summary_text` says
    that nothing was measured after training instead of presenting the baseline as a final value. The last step is
    always probed with ``probe_at_end`` (also when transformers runs a step for ``max_steps=0``).

    Raises:
        ConfigurationError: On any invalid argument, at construction (a ``ValueError``; probe files are loaded and
            validated here, raising ``ProbeSourceError``/``ProbeFormatError``; a chat template that refuses the
            probe conversation, e.g. one without a system role given ``system_prompt``, is one too). At train
            begin, when ``save_peak_checkpoint=True`` and ``output_dir`` is not writable.
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
        monitor: str = "counterfactual_accuracy",
        greater_is_better: bool | None = None,
        smoothing: str = "ema",
        ema_alpha: float = 0.5,
        smoothing_window: int = 3,
        min_delta: float = 0.0,
        patience: int | None = None,
        warmup_steps: int = 0,
        save_peak_checkpoint: bool = False,
        restore_peak_at_end: bool = False,
        strict: bool = False,
        plot: bool = False,
        max_batch_tokens: int = 8192,
        max_batch_size: int = 64,
        max_new_tokens: int = 24,
        engine: str = "auto",
        verbose: bool = True,
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
        if greater_is_better is None:
            greater_is_better = parsed.greater_is_better
        # PeakTracker validates smoothing, ema_alpha, window, min_delta, patience and warmup_steps.
        self.peak_tracker = PeakTracker(
            mode="max" if greater_is_better else "min", smoothing=smoothing, ema_alpha=ema_alpha,
            window=smoothing_window, min_delta=min_delta, patience=patience, warmup_steps=warmup_steps,
        )
        if isinstance(probes, (str, os.PathLike)):
            self.probes = load_probes(probes, limit_per_family=limit_per_family)
        else:
            self.probes = load_probes(list(probes), limit_per_family=limit_per_family)
        families = sorted({p.family for p in self.probes})
        if monitor_family is not None and monitor_family not in families:
            raise ConfigurationError(f"monitor {monitor!r} names family {monitor_family!r}, which the probes lack; "
                             f"families: {families}.")
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
        self._scorer_kwargs = dict(
            mode=mode, variants=tuple(variants), engine=engine, max_batch_tokens=max_batch_tokens,
            max_batch_size=max_batch_size, max_new_tokens=max_new_tokens, system_prompt=system_prompt,
            chat_template_kwargs=chat_template_kwargs,
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
        self.probe_seconds_total = 0.0
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

    def _replay_history(self, state: TrainerState) -> None:
        """Rebuild the peak/patience state from this callback's own rows (resume)."""
        self.peak_tracker.reset()
        self.history = []
        self.peak_checkpoint = None
        for row in state.log_history:
            if self.monitor_key in row and "step" in row and row["step"] <= state.global_step:
                self.peak_tracker.update(int(row["step"]), float(row[self.monitor_key]))
                self.history.append({k: v for k, v in row.items() if k.startswith(METRIC_PREFIX) or k == "step"})
                self.last_probe_step = int(row["step"])
        if self.peak_tracker.peak_step is not None:
            path = os.path.join(self.trainer.args.output_dir, f"checkpoint-{self.peak_tracker.peak_step}")
            self.peak_checkpoint = path if os.path.isdir(path) else None
        if self.peak_tracker.num_events:
            tracker = self.peak_tracker
            logger.info("ctx_callback: resumed with %d probe events, peak %.4f at step %s.", tracker.num_events,
                        tracker.peak_value, tracker.peak_step)

    def _start_fresh(self) -> None:
        """Forget everything a previous ``train()`` call left: this call starts at step 0 with a new baseline."""
        self.peak_tracker.reset()
        self.history = []
        self.latest_metrics = {}
        self.last_probe_step = None
        self.stop_reason = None
        self.stop_step = None
        self.peak_checkpoint = None
        self.probe_seconds_total = 0.0
        self.last_restored = False
        self.restored_from = None
        self._baseline_weights = None
        self.active_indices = None  # known_only: re-selected on the model as it is now
        self.known_counts = None

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
        should_log = control.should_log
        Trainer.log(self.trainer, dict(row))  # base class: SFTTrainer.log would add its running averages
        control.should_log = should_log

    def _probe(self, model: torch.nn.Module, state: TrainerState, control: TrainerControl) -> PeakDecision | None:
        assert self.scorer is not None
        step = state.global_step
        indices = self.active_indices if self.active_indices is not None else range(len(self.probes))
        plan = plan_probes(indices, self.trainer)  # this rank's share (all probes under FSDP / ZeRO-3)
        self.scorer.synced_gpus = plan.sharded_params
        try:
            result = run_round(lambda mine: self.scorer.score_raw(model, mine), ScoreResult.merge, plan)
            metrics = self.scorer.metrics(result)
        except Exception as err:  # noqa: BLE001 - a failed probe must not kill a long run unless strict
            if self.strict:
                raise
            logger.warning("ctx_callback: probe at step %d failed (%s: %s); training continues.", step,
                           type(err).__name__, err)
            self._log({KEY_FAILED: 1.0}, control)
            return None
        self.probe_seconds_total += result.seconds
        value = metrics.get(self.monitor_key, math.nan)
        # Every rank feeds the tracker identical values; the decision is still taken once and shared, so that
        # stopping and saving (a barrier) happen on all ranks or on none.
        decision = broadcast_from_main(self.peak_tracker.update(step, value), plan)
        row = dict(metrics)
        row[KEY_SMOOTHED] = float(decision.smoothed)
        row[KEY_PEAK_VALUE] = float(decision.peak_value)
        row[KEY_PEAK_STEP] = float(decision.peak_step) if decision.peak_step is not None else math.nan
        row[KEY_SECONDS] = float(result.seconds)
        if math.isnan(value):
            logger.warning("ctx_callback: the monitored metric %s is NaN at step %d (NaN logits?).",
                           self.monitor_key, step)
            row[KEY_FAILED] = 1.0
        if decision.should_stop:
            row[KEY_STOPPED] = 1.0
        self._log(row, control)
        self.latest_metrics = metrics
        self.last_probe_step = step
        self.history.append({**{k: v for k, v in row.items()}, "step": step})
        return decision

    def _act(self, decision: PeakDecision | None, args: TrainingArguments, state: TrainerState,
             control: TrainerControl, model: torch.nn.Module | None = None) -> None:
        if decision is None:
            return
        step = state.global_step
        if decision.is_new_peak and step == 0 and self.restore_peak_at_end and model is not None:
            self._keep_baseline(model)
        if decision.is_new_peak and self.save_peak_checkpoint and step > 0:
            path = os.path.join(args.output_dir, f"checkpoint-{step}")
            control.should_save = True
            self.peak_checkpoint = path
            self._baseline_weights = None  # a later peak has its checkpoint: the baseline copy is no longer needed
            if args.metric_for_best_model is None:
                # We own the Trainer's "best" bookkeeping: rotation (save_total_limit) then keeps this folder.
                state.best_global_step = step
                state.best_metric = float(decision.peak_value)
                state.best_model_checkpoint = path
        if decision.should_stop:
            control.should_training_stop = True
            self.stop_reason = decision.reason
            self.stop_step = step
            message = f"ctx_callback: stopping training at step {step}: {decision.reason}."
            if self.peak_checkpoint:
                message += f" Peak checkpoint: {self.peak_checkpoint}."
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
            self._replay_history(state)
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
        if self.probe_at_start and state.global_step == 0 and self.last_probe_step is None:
            self._act(self._probe(model, state, control), args, state, control, model)
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
        restored = False
        peak_step = self.peak_tracker.peak_step
        if self.restore_peak_at_end and model is not None and peak_step is not None and peak_step != state.global_step:
            if peak_step == 0 and self._baseline_weights is not None:
                restored = self._restore_baseline(model)
            elif self.peak_checkpoint:
                restored = self._restore(model, self.peak_checkpoint)
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
        (then ``peak_checkpoint`` is ``None``), or ``None`` when nothing was restored.
        """
        values = [(row["step"], row.get(self.monitor_key)) for row in self.history if self.monitor_key in row]
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
            "peak_checkpoint": self.peak_checkpoint,
            "restored_peak": restored,
            "restored_from": self.restored_from if restored else None,
            "trained_steps": None if end_step is None else end_step - int(self.train_start_step or 0),
            "end_step": end_step,
            "probe_events": self.peak_tracker.num_events,
            "probe_seconds_total": self.probe_seconds_total,
            "known_counts": self.known_counts,
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
            else f"  peak checkpoint: {s['peak_checkpoint']}" + (" (restored)" if restored else ""),
            f"  probing took {s['probe_seconds_total']:.1f}s over {s['probe_events']} events",
        ]
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
