"""The peak checkpoint: save it, protect it from rotation, refresh its saved state, keep the baseline, restore it.

:class:`PeakCheckpointer` is what ``save_peak_checkpoint`` / ``restore_peak_at_end`` do, apart from the decision of
*when* (a new peak: :class:`~ctx_callback.stopping.StopDecider`), which the callback wires in.

Saving the peak checkpoint: at a new peak where the Trainer saves anyway (``save_steps``, or another callback set
``control.should_save``; not with ``save_strategy="best"``, whose flag the Trainer overwrites), the Trainer's save is
used, unchanged. Otherwise the checkpointer saves, from ``on_step_end`` (``on_evaluate`` with ``probe_on="evaluate"``),
by calling the Trainer's own ``_save_checkpoint``, so the folder is what the Trainer writes (weights, optimizer,
scheduler, RNG, ``trainer_state.json``; resumable; ``save_total_limit`` rotation included, protecting the peak through
``state.best_model_checkpoint``), and then dispatches ``on_save`` to every callback, as the Trainer does after its
saves. Saving inside the event, not by setting ``control.should_save``, is what lets a failed save be caught: an
exception in the Trainer's own save ends ``train()``. Since the Trainer logs and evaluates the step after
``on_step_end``, the checkpoint's ``trainer_state.json`` is written again at the next step's start (or at train end)
so that it holds that step's loss and eval rows too (:meth:`PeakCheckpointer.refresh_saved_state`). Every rank calls
the save (it is collective) and the ranks then exchange their outcomes
(:func:`~ctx_callback.distributed.gather_outcomes`), so all agree. Under several processes ``state.best_global_step``
is unset during the call, which skips the barrier ``_save_checkpoint`` runs with it: a rank failing before that
barrier would otherwise leave the others waiting in it (a failure inside a sharded FSDP / ZeRO-3 state-dict gather can
still hang, as any collective can). The failure path is tested in one process only (a simulated full disk).

When the save fails (any exception, on any rank): a warning names the folder and the error, the partial folder is
removed (``resume_from_checkpoint=True`` would pick it as the last checkpoint), the Trainer's "best" state goes back to
the previous peak's checkpoint (kept, not rotated away), ``peak_checkpoint`` is ``None`` and ``peak_save_error`` holds
the message (summary, stop message, summary text), and ``restore_peak_at_end`` keeps the final weights with a warning
instead of restoring a missing or partial folder. Training continues; a later peak that saves clears the error.
``strict=True`` raises instead (a ``RuntimeError`` on every rank).

Restoring (``restore_peak_at_end``): a peak after step 0 is loaded from its checkpoint. The baseline (step 0) is
never saved as a checkpoint, so when the baseline is the peak its weights come from an in-memory copy taken at train
begin (:meth:`PeakCheckpointer.keep_baseline`): memory cost, one CPU copy of the parameters that require grad
(everything the optimizer can change: the whole model's size for full fine-tuning, only the adapter weights for
PEFT/LoRA; buffers are not copied), held until a later peak is saved as a checkpoint, then freed. Not taken under
FSDP / DeepSpeed ZeRO-3 (sharded parameters), where a baseline peak cannot be restored (a warning says so).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import torch
from transformers import TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from .distributed import gather_outcomes, params_are_sharded, plan_probes
from .errors import ConfigurationError
from .messages import rank_zero_info, rank_zero_warn, warn
from .resume_state import TRAINER_STATE_FILE

__all__ = ["RESTORED_FROM_BASELINE", "PeakCheckpointer"]

#: ``restored_from`` in the summary when the peak was the baseline (step 0), restored from its in-memory copy.
RESTORED_FROM_BASELINE = "baseline (in memory)"


class PeakCheckpointer:
    """Saves, protects, refreshes and restores the peak checkpoint (module docstring), and the baseline copy.

    Args:
        trainer: The trainer whose ``_save_checkpoint`` saves and whose callbacks receive ``on_save``.
        strict: Re-raise a failed save or restore instead of warning.

    Attributes:
        peak_checkpoint: The current peak's checkpoint folder, or ``None``.
        peak_save_error: Why the current peak has no checkpoint when saving it failed, or ``None``.
        restored_from: Where the restored weights came from (a path or :data:`RESTORED_FROM_BASELINE`), or ``None``.
        baseline_weights: The in-memory copy of the baseline's trainable parameters, or ``None``.
    """

    def __init__(self, trainer: Any, strict: bool = False) -> None:
        self.trainer = trainer
        self.strict = strict
        self.reset()

    def reset(self) -> None:
        """Forget the peak checkpoint, the baseline copy and what was restored (a fresh run)."""
        self.peak_checkpoint: str | None = None
        self.peak_save_error: str | None = None
        self.restored_from: str | None = None
        self.baseline_weights: dict[str, torch.Tensor] | None = None
        # A checkpoint saved in the middle of a step, whose trainer_state.json is re-written once the Trainer has
        # logged/evaluated that step (see save).
        self.refresh_pending: str | None = None

    def resume(self, peak_step: int | None, output_dir: str, saved_checkpoint: str | None,
               saved_error: str | None) -> None:
        """On resume: the peak checkpoint where the run saved it (it may be outside this ``output_dir`` when the run
        is resumed from a copied checkpoint), else ``checkpoint-{peak}`` in ``output_dir``; or why it could not be
        saved."""
        self.peak_checkpoint, self.peak_save_error, self.refresh_pending = None, None, None
        if peak_step is None:
            return
        name = f"checkpoint-{peak_step}"
        candidates = [saved_checkpoint, os.path.join(output_dir, name)]
        self.peak_checkpoint = next((p for p in candidates if isinstance(p, str) and
                                     os.path.basename(os.path.normpath(p)) == name and os.path.isdir(p)), None)
        if self.peak_checkpoint is None and saved_error is not None:
            self.peak_save_error = saved_error

    def note(self) -> str:
        """What the stop message says about the peak checkpoint: its folder, why it was not saved, or nothing."""
        if self.peak_checkpoint:
            return f" Peak checkpoint: {self.peak_checkpoint}."
        if self.peak_save_error:
            return f" The peak checkpoint was not saved ({self.peak_save_error})."
        return ""

    def check_output_dir_writable(self, args: TrainingArguments) -> None:
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
    # Saving
    # ------------------------------------------------------------------------------------------------------------
    def save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, step: int, value: float,
             export_state: Callable[[], None]) -> None:
        """Save ``checkpoint-{step}`` for a new peak; a failed save is reported, never fatal (module docstring).

        Args:
            args: The training arguments.
            state: The Trainer state (its "best" fields protect the peak from rotation).
            control: The Trainer control (a save the Trainer makes anyway is used as is).
            step: The peak's global step.
            value: The peak's smoothed value (the Trainer's ``best_metric`` when the callback owns "best").
            export_state: Writes the callback's resume state into ``state`` (called with the new peak checkpoint
                set, and again after a failure).
        """
        self.baseline_weights = None  # a later peak: the baseline copy is no longer the peak's weights
        path = os.path.join(args.output_dir, f"checkpoint-{step}")
        own_best = args.metric_for_best_model is None  # then we own the Trainer's "best" bookkeeping
        previous = (state.best_global_step, state.best_metric, state.best_model_checkpoint)
        self.peak_checkpoint, self.peak_save_error = path, None
        export_state()  # the checkpoint's own Trainer state names it as the peak
        if control.should_save and args.save_strategy != "best":
            # The Trainer saves this step anyway (save_steps, or another callback asked), right after this event:
            # no second save. A failure there is the Trainer's own scheduled save failing, as without this callback.
            if own_best:
                state.best_global_step, state.best_metric, state.best_model_checkpoint = step, value, path
            return
        if own_best:  # set before the save: rotation (save_total_limit), run inside it, then keeps this folder
            state.best_global_step, state.best_metric, state.best_model_checkpoint = step, value, path
        errors = self._save_checkpoint(args, state, own_best)
        if not errors:
            if args.should_save:
                self.refresh_pending = path
            # As the Trainer does after each of its saves (W&B, MLflow, ... upload checkpoints in on_save).
            self.trainer.callback_handler.on_save(args, state, control)
            return
        state.best_global_step, state.best_metric, state.best_model_checkpoint = previous
        self.peak_checkpoint = None
        self.peak_save_error = f"saving {path} failed: {'; '.join(errors)}"
        cleanup = self._remove_partial_checkpoint(args, path)
        export_state()
        if self.strict:
            raise RuntimeError(f"ctx_callback: {self.peak_save_error}")
        warn(
            "could not save the peak checkpoint %s (%s); training continues. %s The summary reports "
            "peak_checkpoint: null and the error as peak_save_error, and restore_peak_at_end keeps the final weights "
            "unless a later peak is saved (free space or fix permissions in output_dir for that).",
            path, "; ".join(errors), cleanup,
        )

    def _save_checkpoint(self, args: TrainingArguments, state: TrainerState, own_best: bool) -> list[str]:
        """Call the Trainer's ``_save_checkpoint`` on every rank; every rank's error (empty: saved everywhere)."""
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
        except Exception as err:  # noqa: BLE001 - a full disk must not end a long run; reported by the caller
            error = f"{type(err).__name__}: {err}"
        finally:
            state.best_global_step = best_step
        outcomes = gather_outcomes(error, plan)  # every rank learns every rank's outcome: all decide alike
        return [f"rank {rank}: {e}" if plan.distributed else e for rank, e in enumerate(outcomes) if e]

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

    def refresh_saved_state(self, state: TrainerState) -> None:
        """Re-write ``trainer_state.json`` of the checkpoint saved during the last step, now that the Trainer has
        logged and evaluated that step, so it holds what a checkpoint the Trainer saves itself holds (the step's loss
        row, eval metrics, best metric, ``ExportableState`` callbacks' states). Nothing to do when none is pending."""
        path, self.refresh_pending = self.refresh_pending, None
        if path is None or not os.path.isdir(path):
            return
        for callback in self.trainer.callback_handler.callbacks:  # as _save_checkpoint does (lists: left as they are)
            name = type(callback).__name__
            if isinstance(callback, ExportableState) and isinstance(state.stateful_callbacks.get(name), dict):
                state.stateful_callbacks[name] = callback.state()
        try:
            state.save_to_json(os.path.join(path, TRAINER_STATE_FILE))
        except OSError as err:
            warn("could not update %s in %s (%s: %s); the checkpoint stays resumable, but its state "
                 "lacks what the Trainer logged at step %d after the save.", TRAINER_STATE_FILE, path,
                 type(err).__name__, err, state.global_step)

    # ------------------------------------------------------------------------------------------------------------
    # The baseline copy and restoring
    # ------------------------------------------------------------------------------------------------------------
    def keep_baseline(self, model: torch.nn.Module) -> None:
        """Copy the baseline's trainable parameters to CPU (the baseline is the peak and is never checkpointed)."""
        if params_are_sharded(self.trainer):
            rank_zero_warn("parameters are sharded (FSDP / ZeRO-3): no in-memory baseline copy is kept, so "
                 "restore_peak_at_end cannot restore the baseline if it stays the peak.")
            return
        self.baseline_weights = {
            name: param.detach().to("cpu", copy=True) for name, param in model.named_parameters()
            if param.requires_grad
        }

    def restore_at_end(self, model: torch.nn.Module, peak_step: int, end_step: int) -> bool:
        """Load the peak's weights into ``model`` (from the baseline copy or the peak checkpoint); whether it did.
        When the peak has neither, a warning says so and the model keeps its final weights."""
        if peak_step == 0 and self.baseline_weights is not None:
            return self._restore_baseline(model)
        if self.peak_checkpoint:
            return self._restore(model, self.peak_checkpoint)
        if self.peak_save_error:
            rank_zero_warn("restore_peak_at_end=True, but the peak (step %d) was not saved (%s); the model keeps "
                 "its final weights (step %d).", peak_step, self.peak_save_error, end_step)
        else:
            rank_zero_warn("restore_peak_at_end=True, but the peak (step %d) has neither a checkpoint nor an "
                 "in-memory copy (the baseline of a resumed run, or a run with sharded parameters); the model keeps "
                 "its final weights (step %d).", peak_step, end_step)
        return False

    def _restore(self, model: torch.nn.Module, path: str) -> bool:
        from .checkpoints import load_weights_into

        try:
            load_weights_into(model, path)
        except Exception as err:  # noqa: BLE001
            if self.strict:
                raise
            warn("could not restore the peak checkpoint %s (%s: %s); the model keeps its final "
                 "weights.", path, type(err).__name__, err)
            return False
        rank_zero_info("restored the peak weights from %s.", path)
        self.restored_from = path
        return True

    def _restore_baseline(self, model: torch.nn.Module) -> bool:
        """Copy the in-memory baseline back into ``model`` (the peak was step 0)."""
        saved = self.baseline_weights
        assert saved is not None
        params = dict(model.named_parameters())
        missing = [name for name in saved if name not in params]
        if missing:
            if self.strict:
                raise RuntimeError(f"cannot restore the baseline: the model lacks parameters {missing[:5]}")
            warn("could not restore the baseline weights (the model lacks parameters %s); the model "
                 "keeps its final weights.", missing[:5])
            return False
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)
        self.baseline_weights = None
        count = sum(v.numel() for v in saved.values())
        rank_zero_info("the peak is the baseline (step 0), which has no checkpoint: restored the "
                       "baseline weights from their in-memory copy (%d trainable tensors, %d values).",
                       len(saved), count)
        self.restored_from = RESTORED_FROM_BASELINE
        return True
