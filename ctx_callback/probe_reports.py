"""Per-probe reporting during training: the probe log, the flip counts and the trackers' table of flips since the peak.

:class:`ProbeReports` keeps every probe's preferred answer (``"context"``, ``"memory"``, ...) at the peak event and
at the previous event, and from them:

- the flip counts of each logged row (:meth:`ProbeReports.flip_counts`: ``flips_to_memory`` / ``flips_to_context``
  since the peak, ``flips_since_previous``);
- the rows of ``ctx_reliance_probes.jsonl`` (:meth:`ProbeReports.write_probe_log`, main process; the file starts
  over on a fresh run and drops the rows after the resumed step on resume, :meth:`ProbeReports.prepare_probe_log`);
- the table of probes that flipped since the peak, sent to W&B (an ``INCREMENTAL`` table: only new rows are
  uploaded) and TensorBoard (text) (:meth:`ProbeReports.report_flips`).

Where a change goes: a new per-probe report is a method here, called by the callback after each probe event.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from .messages import warn
from .metrics import METRIC_PREFIX
from .outcomes import PROBES_FILE, ProbeLog, probe_rows
from .reliance_row import KEY_FLIPS_SINCE_PREVIOUS, KEY_FLIPS_TO_CONTEXT, KEY_FLIPS_TO_MEMORY, option_kwargs

__all__ = ["FLIP_COLUMNS", "ProbeReports"]

#: Columns of the tracker table of flips since the peak.
FLIP_COLUMNS = ["step", "peak_step", "probe_id", "family", "from", "to", "cf", "par"]


class ProbeReports:
    """The preferred answers at the peak and previous events, and the reports made from them (module docstring).

    Args:
        strict: Re-raise a tracker's error on the flip table instead of warning.

    Attributes:
        peak_preferred: Every probe's preferred answer at the peak event, or ``None``.
        previous_preferred: Every probe's preferred answer at the previous event, or ``None``.
    """

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self._wandb_flip_table: Any = None
        self._probe_log_failed = False
        self.reset()

    def reset(self) -> None:
        """Forget the peak and previous events' answers (a fresh run, a new curve, or before a resume)."""
        self.peak_preferred: list[str | None] | None = None
        self.previous_preferred: list[str | None] | None = None
        #: Flips since the current peak already sent to the trackers' tables: (probe id, from, to).
        self.reported_flips: set[tuple[str, str | None, str | None]] = set()

    def flip_counts(self, preferred: list[str | None], new_peak: bool) -> dict[str, float]:
        """Take this event's preferred answers (the peak's when ``new_peak``); its flip counts since the peak and
        since the previous event."""
        out: dict[str, float] = {}
        if new_peak:
            self.peak_preferred = preferred
            self.reported_flips = set()
        if self.peak_preferred is not None and len(self.peak_preferred) == len(preferred):
            pairs = list(zip(self.peak_preferred, preferred))
            out[KEY_FLIPS_TO_MEMORY] = float(sum(a == "context" and b == "memory" for a, b in pairs))
            out[KEY_FLIPS_TO_CONTEXT] = float(sum(a == "memory" and b == "context" for a, b in pairs))
        if self.previous_preferred is not None and len(self.previous_preferred) == len(preferred):
            out[KEY_FLIPS_SINCE_PREVIOUS] = float(sum(a != b for a, b in zip(self.previous_preferred, preferred)))
        self.previous_preferred = preferred
        return out

    def after_event(self, step: int, result: Any, probes: Sequence[Any], preferred: list[str | None],
                    output_dir: str, peak_step: int | None, callbacks: Sequence[Any], global_step: int) -> None:
        """Main process, with ``probe_log``: append the event's rows (:func:`~ctx_callback.outcomes.probe_rows` of the
        round's ``result``) to the probe log, and send the new flips since the peak (``peak_step``) to the trackers'
        tables among ``callbacks``."""
        chosen = [probes[int(i)] for i in result.probe_indices]
        log_rows = probe_rows(step, [p.id for p in chosen], [p.family for p in chosen], result.scores,
                              result.variants, result.mode, result.generations, **option_kwargs(result),
                              relations=[p.relation for p in chosen])
        self.write_probe_log(output_dir, log_rows)
        self.report_flips(step, peak_step, log_rows, preferred, callbacks, global_step)

    @staticmethod
    def prepare_probe_log(output_dir: str, resumed_step: int) -> None:
        """A fresh run (``resumed_step`` 0) starts the probe log over; a resumed one drops the rows after its step.
        An OS error is a warning."""
        log = ProbeLog(os.path.join(output_dir, PROBES_FILE))
        try:
            log.truncate_after(resumed_step if resumed_step > 0 else None)
        except OSError as err:
            warn("could not prepare %s (%s: %s); training is unaffected.", log.path,
                 type(err).__name__, err)

    def write_probe_log(self, output_dir: str, rows: list[dict[str, Any]]) -> None:
        """Append this event's rows to ``ctx_reliance_probes.jsonl``; an OS error is a warning (once)."""
        if not output_dir:
            return
        try:
            ProbeLog(os.path.join(output_dir, PROBES_FILE)).append(rows)
        except OSError as err:
            if not self._probe_log_failed:
                warn("could not append to %s (%s: %s); training is unaffected.",
                     os.path.join(output_dir, PROBES_FILE), type(err).__name__, err)
            self._probe_log_failed = True

    def report_flips(self, step: int, peak_step: int | None, log_rows: list[dict[str, Any]],
                     preferred: list[str | None], callbacks: Sequence[Any], global_step: int) -> None:
        """Send the probes that flipped since the peak, and were not sent before, to the trackers' tables among
        ``callbacks``. ``cf``/``par`` are the probe log's (``par``: the parametric answer's score; ``None`` for a
        multiple-choice probe without one)."""
        if peak_step is None or self.peak_preferred is None or len(self.peak_preferred) != len(preferred):
            return
        rows = []
        for log_row, before, after in zip(log_rows, self.peak_preferred, preferred):
            key = (log_row["id"], before, after)
            if before == after or after is None or before is None or key in self.reported_flips:
                continue
            self.reported_flips.add(key)
            cf, par = log_row["cf"], log_row["par"]
            rows.append([step, peak_step, log_row["id"], log_row["family"], before, after,
                         None if cf is None else round(float(cf), 4), None if par is None else round(float(par), 4)])
        if rows:
            self._send_flip_table(step, rows, callbacks, global_step)

    def _send_flip_table(self, step: int, rows: list[list[Any]], callbacks: Sequence[Any], global_step: int) -> None:
        from transformers.integrations import TensorBoardCallback, WandbCallback

        for callback in callbacks:
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
                               "train/global_step": global_step})
            except Exception as err:  # noqa: BLE001 - a tracker failing on our table must not end a run
                if self.strict:
                    raise
                warn("could not log the flips table to %s (%s: %s).", type(callback).__name__,
                     type(err).__name__, err)
