"""``ContextRelianceCallback``: probe context reliance during training, log it, stop and keep the peak.

The callback only wires the Trainer's events to the parts it owns, each a module with one job (selection, probe
round, logged row, stop decision, peak checkpoint, probe reports, summary, resume state): ``docs/architecture.md``.
"""

from __future__ import annotations

import importlib
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
    check_wiring,
    probe_set_digest,
    validate_arguments,
    warn_about_training_arguments,
)
from .consumed import ConsumedData, read_audit_categories
from .decisions import DEFAULT_ALPHA, DEFAULT_MIN_DECLINE, DEFAULT_SUSTAINED_EVENTS, ProbeEvent
from .diagnostics import DEFAULT_DIAGNOSTIC_PROBES, Diagnostics
from .distributed import broadcast_from_main, plan_probes
from .encoding import DEFAULT_VARIANTS
from .engines.base import device_of
from .known_facts import DEFAULT_KNOWN_DISTRACTORS
from .messages import announce, warn
from .metrics import METRIC_PREFIX
from .models import max_positions
from .outcomes import PER_PROBE_METRICS
from .peak import PeakTracker
from .peak_checkpoint import PeakCheckpointer
from .probe_reports import ProbeReports
from .probe_round import RowLogger, event_row, score_round
from .probe_selection import ProbeSelection
from .probes import Probe
from .reliance_row import KEY_FAILED, round_outcomes
from .resume import current_state, rebuild
from .resume_state import write_state
from .scoring import ProbeScorer, check_probe_dtype_device
from .stopping import RoundDecision, baseline_stop_error

__all__ = ["ContextRelianceCallback", "probe_set_digest"]
#: The modules the names that moved out of this module live in (they stay importable from here), by name prefix.
_MOVED = {"KEY_": "reliance_row", "SE_SUFFIX": "reliance_row", "CI_": "reliance_row", "FLIP_COLUMNS": "probe_reports",
          "ON_PROBE_SET_CHANGE": "callback_options", "RESTORED_FROM_BASELINE": "peak_checkpoint",
          "STATE_KEY": "resume_state", "TRAINER_STATE_FILE": "resume_state"}


def __getattr__(name: str) -> Any:
    """``ctx_callback.callback.KEY_*``, ``STATE_KEY``, ...: the names that moved to the parts."""
    module = next((module for prefix, module in _MOVED.items() if name.startswith(prefix)), None)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"ctx_callback.{module}"), name)


class ContextRelianceCallback(TrainerCallback):
    """Probe the model's context reliance every ``eval_steps`` optimizer steps during training.

    Add it to an existing ``Trainer``/``SFTTrainer``::

        trainer = SFTTrainer(model=model, args=SFTConfig(..., report_to="tensorboard"), ...)
        trainer.add_callback(ContextRelianceCallback(trainer, probes="world_facts", eval_steps=50))
        trainer.train()

    Every probe event logs ``ctx_reliance/...`` metrics (glossary: ``docs/metrics.md``) through the trainer, so they
    reach every tracker in ``report_to``, ``state.log_history`` and ``trainer_state.json`` at the current global step.

    Args:
        trainer: The trainer this callback is added to (needed to log to its trackers).
        probes: A built-in suite name (``"world_facts"``, ``"biographies"``, ``"quotes"``, ``"all"`` = ``"default"``),
            a benchmark preset (``"nq_swap"``, ``"memotrap"``, ...), ``"+"``-joins of these, a path to a
            ``.json``/``.jsonl`` file or folder, a Hub dataset id, or a list of :class:`~ctx_callback.Probe` or of
            probe records (dicts).
        tokenizer: The tokenizer used to render probes. Default: the trainer's ``processing_class``.
        prompt_format: ``"chat"`` (default: the tokenizer's chat template with ``add_generation_prompt=True``, as
            SFTTrainer applies it), a preset (``"alpaca"``, ``"tulu"``, ``"plain"``), a template string with
            ``{context}``/``{question}``, or a callable ``fn(context_or_None, question) -> str``.
        system_prompt: Chat format: optional system message (use the one your training data has).
        chat_template_kwargs: Chat format: extra ``apply_chat_template`` arguments (use the training ones).
        eval_steps: Probe every this many optimizer steps (``probe_on="steps"``).
        probe_on: ``"steps"`` (every ``eval_steps``) or ``"evaluate"`` (on each Trainer evaluation).
        probe_at_start: Probe once before the first step (the baseline, logged at step 0).
        probe_at_end: Probe at the last step if it is not a multiple of ``eval_steps``.
        mode: ``"loglik"`` (default) or ``"generate"`` (greedy decoding + answer matching; slower).
        variants: Probe rows to score: ``"context"`` (always), ``"closed_book"`` (the question without context),
            ``"aligned"`` (a context that states the true fact), ``"irrelevant"`` (another probe's passage; opt-in).
        limit_per_family: Use at most this many probes per family (spread evenly) to keep probing cheap.
        known_only: Before the baseline, keep only probes whose parametric answer the model prefers closed-book
            (no conflict exists where the model does not know the fact); logs kept/total per family. Needs the
            ``closed_book`` variant.
        known_distractors: ``known_only``: the parametric answer must also beat this many length-matched answers of
            other probes of its family closed-book (default 3; 0: the counterfactual one alone; :mod:`~ctx_callback.
            known_facts`).
        monitor: Metric that defines the peak, e.g. ``"counterfactual_probability"`` or
            ``"world_facts/counterfactual_accuracy"``. Default (``None``): ``"counterfactual_probability"`` in
            log-likelihood mode, ``"counterfactual_accuracy"`` in generation mode, chosen by measurement
            (``docs/stopping.md``, "Which monitor?"; :data:`~ctx_callback.monitor.DEFAULT_MONITORS`).
        greater_is_better: Direction of ``monitor``; default inferred (``parametric_accuracy``, ``both_rate``,
            ``neither_rate`` and ``memorization_ratio`` are better when lower).
        smoothing: ``"ema"`` (default), ``"mean"`` or ``"none"`` over probe events.
        ema_alpha: EMA weight of the newest value.
        smoothing_window: Window of the moving average.
        min_delta: Smallest smoothed improvement that counts as a new peak.
        patience: Probe events without improvement before training stops; ``None`` (default) never stops.
        warmup_steps: Never stop before this global step (applies to every stop rule).
        stop_rule: ``None`` (default) or ``"significant_decline"``: stop when the monitored metric is at least
            ``min_decline`` below its value at the peak event and a paired test on the same probes (McNemar, paired t)
            is significant at ``alpha``, corrected for the events compared (:mod:`ctx_callback.decisions`).
        min_decline: ``significant_decline``: smallest decline that may stop, in the metric's units (default 0.02,
            2 points of accuracy: the test guards against noise, this against real but negligible declines).
        alpha: ``significant_decline``: false-stop level for the run (default 0.05).
        sustained_events: ``significant_decline``: stop only once the decline has qualified (at least
            ``min_decline``, significant) at this many consecutive probe events, so a dip that recovers does not stop
            the run (default 2; 1: the first qualifying event stops; measured: ``docs/mixtures.md``).
        divergence_threshold: Stop once the monitored metric is this far (metric units) below its value at the
            peak event; ``None`` (default): no such rule. Lightning's name.
        stopping_threshold: Stop once the monitored metric is below this absolute floor (above it for a metric
            where lower is better); ``None`` (default): no such rule. Unlike Lightning's argument of that name, a
            floor, not a target.
        probe_log: Append every probe's outcome at every event to ``output_dir/ctx_reliance_probes.jsonl`` and log
            the probes that flipped since the peak as a table to W&B and TensorBoard (:mod:`~ctx_callback.probe_log`).
        informative_band: ``(low, high)``: at train begin, keep only the probes whose baseline counterfactual
            probability lies within the band (not at the ceiling or the floor); log-likelihood mode, after
            ``known_only``, kept on resume (:mod:`ctx_callback.probe_selection`). ``None`` (default): all.
        save_peak_checkpoint: Save a checkpoint (``checkpoint-{step}``) at each new peak, protected from
            ``save_total_limit`` rotation; ``output_dir`` must be writable (checked at train begin). A save that fails
            later is a warning, never a failed run (:mod:`ctx_callback.peak_checkpoint`).
        restore_peak_at_end: Load the peak's weights back at train end (full models and PEFT adapters; needs
            ``save_peak_checkpoint``): from its checkpoint, or for step 0 from a CPU copy taken at train begin (memory,
            FSDP / ZeRO-3: :mod:`ctx_callback.peak_checkpoint`). The summary's ``restored_from`` says which.
        keep_best: Keep training, keep the best: never stop, save a checkpoint at each new peak and restore the peak
            at the end (``save_peak_checkpoint=True`` and ``restore_peak_at_end=True`` in one argument; a stop rule
            with it is refused). When to prefer it to stopping: ``docs/stopping.md``.
        strict: Re-raise a failed probe round instead of logging it and continuing.
        plot: Write ``ctx_reliance.png`` (the reliance curve) into ``output_dir`` at train end (needs matplotlib); the
            summary and the plot never fail a finished run (a warning names the file and the error).
        max_batch_tokens: Padded tokens per probe forward pass.
        max_batch_size: Rows per probe forward pass.
        max_new_tokens: Generation mode: tokens per answer.
        engine: Scoring engine (``"auto"``: ``"prefix"`` where the model supports it; ``"batched"``, ``"simple"``).
        probe_dtype: Precision of the probe forward passes. ``None`` (default): the dtype the training step uses.
            ``"bfloat16"`` / ``"float16"`` (CUDA only): probe under ``torch.autocast`` in that dtype, the weights
            untouched (training is bit-identical either way); cost, accuracy and hardware: ``docs/performance.md``.
        controls_every: Score the control variants (all but ``"context"``) at events 0, K, 2K, ... only
            (default 1: every event; counting, also on resume: :mod:`ctx_callback.probe_round`); the ``"context"``
            variant, which the decisions read, at every event. ``monitor`` and the Trainer's ``metric_for_best_model``
            must then not need a control variant.
        verbose: Print the stop message and the train-end summary on the main process. They are always logged
            at INFO level through the ``ctx_callback.callback`` logger as well.
        on_probe_set_change: A resumed run whose checkpoint was probed with another probe set: ``"error"``
            (default) refuses at train begin, naming both probe sets; ``"new_curve"`` starts a new reliance curve at
            the resumed step, with a warning (:mod:`ctx_callback.resume`; the summary's ``curve_start_step``).
        audit: An audit of the training dataset (an ``AuditResult`` or the JSONL ``ctx-callback audit --out`` writes):
            every event then logs the share of each category among the examples consumed since the previous event
            (``ctx_reliance/consumed/*``), where the sampler can be followed (:mod:`ctx_callback.consumed`).
        label_check_every: At events 0, K, 2K, ...: greedy-generate the answers of a probe sample and log how often
            they agree with the log-likelihood labels (``ctx_reliance/label_check/*``; :mod:`ctx_callback.label_check`).
        attention_every: At events 0, K, 2K, ...: log the attention share from the answer position to the context
            tokens on the sample, overall and per layer (``ctx_reliance/attention/*``; :mod:`ctx_callback.attention`).
        diagnostic_probes: The sample size of those two checks (default 32; :mod:`ctx_callback.diagnostics`).

    More: stops (:mod:`ctx_callback.stopping`), resumes (:mod:`ctx_callback.resume`), peak saves
    (:mod:`ctx_callback.peak_checkpoint`), round faults (:mod:`ctx_callback.probe_round`), the summary
    (:mod:`ctx_callback.reporting`), probe counts (:func:`ctx_callback.callback_options.check_significant_probe_count`).

    Raises:
        ConfigurationError: An invalid argument, probe file or chat template, at construction (a ``ValueError``). At
            train begin: an ``output_dir`` a peak cannot be saved to, a resumed run probed with another probe set
            (``on_probe_set_change="error"``), a stop rule firing on the baseline, too few probes for a stop rule.
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
        variants: Sequence[str] = DEFAULT_VARIANTS,
        limit_per_family: int | None = None,
        known_only: bool = False,
        known_distractors: int = DEFAULT_KNOWN_DISTRACTORS,
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
        sustained_events: int = DEFAULT_SUSTAINED_EVENTS,
        divergence_threshold: float | None = None,
        stopping_threshold: float | None = None,
        probe_log: bool = True,
        informative_band: tuple[float, float] | None = None,
        save_peak_checkpoint: bool = False,
        restore_peak_at_end: bool = False,
        keep_best: bool = False,
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
        audit: Any = None,
        label_check_every: int | None = None,
        attention_every: int | None = None,
        diagnostic_probes: int = DEFAULT_DIAGNOSTIC_PROBES,
    ) -> None:
        options = validate_arguments({name: value for name, value in locals().items() if name != "self"})
        self.monitor = options.monitor
        self.monitor_key, self.monitor_metric = options.monitor.key, options.monitor.metric
        self.monitor_family, self.greater_is_better = options.monitor.family, options.monitor.greater_is_better
        self.probes, self._probe_set_sha1, self.decider = options.probes, options.probe_set_sha1, options.decider
        self.informative_band, self.probe_dtype = options.informative_band, options.probe_dtype
        self.selection = ProbeSelection(self.probes, known_only, options.informative_band, known_distractors)
        self.diagnostics = Diagnostics(label_check_every, attention_every, diagnostic_probes, strict)
        self.checkpointer, self.reports = PeakCheckpointer(trainer, strict), ProbeReports(strict)
        self.trainer, self.tokenizer, self.prompt_format, self.mode = trainer, tokenizer, prompt_format, mode
        self.eval_steps, self.probe_on, self.probe_at_start, self.probe_at_end = eval_steps, probe_on, \
            probe_at_start, probe_at_end
        self.known_only, self.stop_rule, self.alpha, self.controls_every = known_only, stop_rule, alpha, controls_every
        self.save_peak_checkpoint, self.restore_peak_at_end = options.save_peak_checkpoint, options.restore_peak_at_end
        self.strict, self.plot, self.verbose, self.probe_log = strict, plot, verbose, probe_log
        self.on_probe_set_change = on_probe_set_change
        self.consumed = None if audit is None else ConsumedData(read_audit_categories(audit))
        self._scorer_kwargs = dict(mode=mode, variants=tuple(variants), engine=engine, max_new_tokens=max_new_tokens,
                                   max_batch_tokens=max_batch_tokens, max_batch_size=max_batch_size,
                                   system_prompt=system_prompt, chat_template_kwargs=chat_template_kwargs,
                                   probe_dtype=options.probe_dtype)
        self.scorer: ProbeScorer | None = None
        self.train_start_step: int | None = None  # the global step the current (or last) ``train()`` began at
        self.row_logger = RowLogger(trainer, strict)
        self._start_fresh()
        tokenizer = tokenizer if tokenizer is not None else getattr(trainer, "processing_class", None)
        if tokenizer is not None:
            self._build_scorer(tokenizer, getattr(trainer, "model", None))

    peak_tracker: PeakTracker = property(lambda self: self.decider.tracker)  # type: ignore  # the parts' state:
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
        self.history: list[dict[str, float]] = []  # the run's probe rows
        self.latest_metrics: dict[str, float] = {}
        # The last probed step; why, at which step and by which rule (its name) training stopped, else None.
        self.last_probe_step: int | None = None
        self.stop_reason, self.stop_step, self.stop_rule_name = None, None, None
        # Seconds spent probing; successful rounds so far (the next one's event index: ``controls_every``); whether
        # the peak weights were loaded back at train end.
        self.probe_seconds_total, self.probe_events, self.last_restored = 0.0, 0, False
        self.curve_start_step: int | None = None  # where a new curve began (on_probe_set_change="new_curve")

    def _build_scorer(self, tokenizer: Any, model: Any) -> None:  # a multimodal processor carries a tokenizer
        self.scorer = ProbeScorer(self.probes, getattr(tokenizer, "tokenizer", tokenizer), self.prompt_format,
                                  max_length=max_positions(getattr(model, "config", None)), **self._scorer_kwargs)

    def _export_state(self, state: TrainerState) -> None:
        """Keep the resume state in ``state.stateful_callbacks``: every checkpoint saved from now on carries it."""
        write_state(state.stateful_callbacks, self.monitor_key, current_state(
            num_probes=len(self.probes), sha1=self._probe_set_sha1, curve_start_step=self.curve_start_step,
            selection=self.selection, decider=self.decider, reports=self.reports, checkpointer=self.checkpointer))

    def _resume(self, state: TrainerState) -> None:
        """Rebuild the run's state from the checkpoint (:func:`~ctx_callback.resume.rebuild`)."""
        check, replayed = rebuild(
            state, monitor_key=self.monitor_key, binary=PER_PROBE_METRICS.get(self.monitor_metric, False),
            num_probes=len(self.probes), sha1=self._probe_set_sha1, on_change=self.on_probe_set_change,
            selection=self.selection, decider=self.decider, reports=self.reports, checkpointer=self.checkpointer,
            output_dir=self.trainer.args.output_dir)
        self.curve_start_step, self.history = check.curve_start_step, replayed.history
        self.probe_seconds_total, self.probe_events = replayed.probe_seconds_total, replayed.probe_events
        self.last_probe_step = replayed.last_probe_step if replayed.history else self.last_probe_step

    def _probe(self, model: torch.nn.Module, state: TrainerState, control: TrainerControl) -> RoundDecision | None:
        """Score a round, decide, log its row, report per probe and keep the resume state; ``None`` if it failed."""
        assert self.scorer is not None
        step = state.global_step
        plan = plan_probes(self.selection.indices(), self.trainer)  # this rank's share (all under FSDP / ZeRO-3)
        # The controls on every controls_every-th event counted from the run's first (the baseline).
        controls = self.controls_every == 1 or self.probe_events % self.controls_every == 0
        try:
            result, metrics = score_round(self.scorer, model, plan, controls)
        except Exception as err:  # noqa: BLE001 - a failed probe must not kill a long run unless strict
            if self.strict:
                raise
            warn("probe at step %d failed (%s: %s); training continues.", step, type(err).__name__, err)
            self.row_logger.log({KEY_FAILED: 1.0}, control)
            return None
        self.probe_seconds_total += result.seconds
        self.probe_events += 1
        # NaN/inf scores: the round is flagged and its monitored value is NaN for the decider (probe_round).
        nonfinite = result.nonfinite_scores
        value = math.nan if nonfinite else metrics.get(self.monitor_key, math.nan)
        outcomes, preferred = round_outcomes(result, self.probes, self.monitor)  # of the merged result: every rank
        decision = self.decider.update(ProbeEvent(step, value, None if nonfinite else outcomes))
        # Taken once and shared, so that stopping and saving (a barrier) happen on all ranks or on none.
        decision = broadcast_from_main(decision, plan)
        flips = self.reports.flip_counts(preferred, decision.peak.is_new_peak)
        row = event_row(metrics, result, self.probes, self.monitor, decision, flips, value, step)
        row.update(self.consumed.row(self.last_probe_step, step) if self.consumed else {})
        row.update(self.diagnostics.row(self.scorer, model, plan, self.selection.indices(), result,
                                        self.probe_events - 1))  # the event index, counted as controls_every
        self.row_logger.log(row, control)
        # What on_evaluate hands to metric_for_best_model: NaN for a flagged round, so it is never the Trainer's best.
        self.latest_metrics = {k: math.nan for k in metrics} if nonfinite else metrics
        self.last_probe_step = step
        self.history.append({**row, "step": step})
        if state.is_world_process_zero and self.probe_log:
            peak = self.decider.peak_event
            self.reports.after_event(step, result, self.probes, preferred, self.trainer.args.output_dir,
                                     None if peak is None else peak.step, self.trainer.callback_handler.callbacks,
                                     self.trainer.state.global_step)
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
        if decision.stop and step == 0:  # the Trainer cannot stop before its first step: refuse to start
            raise baseline_stop_error(decision)
        if decision.stop:
            control.should_training_stop = True
            self.stop_reason, self.stop_step, self.stop_rule_name = decision.reason, step, decision.rule
            announce(f"ctx_callback: stopping training at step {step}: {decision.reason}.{self.checkpointer.note()}",
                     self.verbose and state.is_world_process_zero)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        check_wiring(self.trainer, state, self.scorer is not None or kwargs.get("processing_class") is not None)
        model = kwargs["model"]
        if self.scorer is None:
            self._build_scorer(kwargs["processing_class"], model)
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
        if self.consumed is not None:
            self.consumed.follow(self.trainer, kwargs.get("train_dataloader"))
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
        restored = bool(self.restore_peak_at_end and model is not None and peak_step not in (None, state.global_step)
                        and self.checkpointer.restore_at_end(model, peak_step, state.global_step))
        self.checkpointer.baseline_weights, self.last_restored = None, restored
        if state.is_world_process_zero:
            reporting.write_summary(args.output_dir, self.summary(restored), self.history)
            if self.plot:
                reporting.write_plot(args.output_dir, state.log_history, self.monitor_key, self.stop_step)
            announce(self.summary_text(restored=restored), self.verbose)
        return control

    def summary(self, restored: bool = False) -> dict[str, Any]:
        """Baseline, peak and final values of the monitored metric, the stop step and the peak checkpoint: every
        field is described by :func:`~ctx_callback.reporting.summarize`."""
        return reporting.summarize(reporting.run_facts(self), restored)

    def summary_text(self, restored: bool = False) -> str:
        """The summary as the lines printed at train end."""
        return reporting.summary_text(self.summary(restored), restored)
