"""One probe event's round: score the probes (across ranks), build the row it logs, and log it through the Trainer.

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

The control variants (``controls_every=K``): events are counted from the first probe of the run (the baseline, which
always scores the controls), so they are scored at events 0, K, 2K, ...; a round whose controls are not scored logs
no control metric (``closed_book_accuracy``, ``aligned_accuracy``, ``context_lift``, and their per-family keys)
instead of a NaN. The event index is the number of successful probe rows logged before (rebuilt from
``state.log_history`` on resume), so a resumed run scores the controls at the same steps as an uninterrupted one; a
failed round does not count, so the next round retries its controls.

Where a change goes: what a round scores is :class:`~ctx_callback.scoring.ProbeScorer`; a new key of the row is
:mod:`ctx_callback.reliance_row`; how the row reaches the trackers is :class:`RowLogger`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from transformers import Trainer, TrainerControl

from .distributed import ProbePlan, run_round
from .messages import logger, rank_zero_warn
from .monitor import Monitor
from .probes import Probe
from .reliance_row import KEY_FAILED, KEY_STOPPED, decision_row, decline_row, decline_share_row, uncertainty_row
from .scoring import ProbeScorer, ScoreResult
from .stopping import RoundDecision

__all__ = ["RowLogger", "event_row", "score_round"]


def score_round(scorer: ProbeScorer, model: Any, plan: ProbePlan, controls: bool) -> tuple[ScoreResult, dict]:
    """Score this rank's share of the probes (``plan``) and merge the ranks' results; the result and its metrics.

    Args:
        scorer: The probe scorer.
        model: The model as it is now.
        plan: This rank's probes (:func:`~ctx_callback.distributed.plan_probes`).
        controls: Score the control variants too (else the ``"context"`` variant alone).

    Raises:
        Exception: On every rank when scoring failed on any (:func:`~ctx_callback.distributed.run_round`).
    """
    scorer.synced_gpus = plan.sharded_params
    options = {} if controls else {"variants": ("context",)}  # ``variants=`` only when a subset
    result = run_round(lambda mine: scorer.score_raw(model, mine, **options), ScoreResult.merge, plan)
    return result, scorer.metrics(result)


def event_row(metrics: dict[str, float], result: ScoreResult, probes: Sequence[Probe], monitor: Monitor,
              decision: RoundDecision, flips: dict[str, float], value: float, step: int) -> dict[str, float]:
    """The row of one probe event: the metrics, their uncertainty, the decline from the peak, the flips
    (``flips``), the decision's keys, and the fault flags (a warning for each fault)."""
    nonfinite = result.nonfinite_scores
    row = {**metrics, **uncertainty_row(result, probes, monitor), **decline_row(decision.comparison), **flips}
    row.update(decline_share_row(decision.comparison, result, probes, monitor))
    row.update(decision_row(decision, result.seconds, nonfinite))
    if nonfinite:
        rank_zero_warn("%d probe score(s) at step %d are not finite (NaN/inf logits?): the round is "
                       "flagged (%s = 1.0) and can neither be the peak nor count toward patience; its metrics over "
                       "the finite scores are logged for diagnosis only.", nonfinite, step, KEY_FAILED)
        row[KEY_FAILED] = 1.0
    elif math.isnan(value):
        rank_zero_warn("the monitored metric %s is NaN at step %d (NaN logits?).", monitor.key, step)
        row[KEY_FAILED] = 1.0
    if decision.stop:
        row[KEY_STOPPED] = 1.0
    return row


class RowLogger:
    """Logs the callback's rows through the base ``Trainer.log``: into ``state.log_history``, then every callback's
    ``on_log`` (the trackers first).

    Why the callback takes the trainer: the tracker integrations (TensorBoard, W&B, MLflow, trackio, ...) receive rows
    only through ``Trainer.log``; a callback that edits ``logs`` in its own ``on_log`` runs after them, and callback
    events do not receive the trainer. TRL's own logging callbacks take the trainer in their constructor for the same
    reason. Rows are logged through the base ``transformers.Trainer.log`` (not ``SFTTrainer.log``, which would fold its
    own running averages into our row).

    ``control.should_log`` is restored afterwards (``on_log`` clears it, which would drop the Trainer's own loss row
    for the step). A tracker (or any callback) that raises in ``on_log`` on this row does not stop training:
    ``Trainer.log`` appended the row to ``state.log_history`` before calling ``on_log``, so it is kept (and reaches
    ``trainer_state.json``); only the trackers from the failing one on miss it. The first such error is a warning,
    later ones DEBUG messages. ``strict=True`` re-raises it.
    """

    def __init__(self, trainer: Any, strict: bool = False) -> None:
        self.trainer = trainer
        self.strict = strict
        self.failures = 0

    def log(self, row: dict[str, float], control: TrainerControl) -> None:
        """Log ``row`` (module docstring)."""
        should_log = control.should_log
        try:
            Trainer.log(self.trainer, dict(row))  # base class: SFTTrainer.log would add its running averages
        except Exception as err:  # noqa: BLE001 - a tracker failing on our row must not kill a long run
            if self.strict:
                raise
            self.failures += 1
            (logger.debug if self.failures > 1 else logger.warning)(
                "a tracker raised while logging the ctx_reliance row at step %d (%s: %s); training "
                "continues. The row is in trainer.state.log_history (and trainer_state.json); the trackers from the "
                "failing one on missed it. Further tracker errors on these rows are logged at DEBUG level.",
                self.trainer.state.global_step, type(err).__name__, err,
            )
        finally:
            control.should_log = should_log
