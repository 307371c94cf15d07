"""The stop-request protocol between ``ctx-callback watch`` and the training process, and its training-side half.

``ctx-callback watch OUTPUT_DIR`` (:mod:`ctx_callback.watcher`) scores the checkpoints off the training loop. It talks
to the training process through three small JSON files in ``OUTPUT_DIR``, each written atomically (a temporary file
in the same folder, then ``os.replace``), so a reader never sees half a file:

- :data:`PEAK_FILE` (``ctx_reliance_peak.json``), written by the watcher at every new peak after step 0: the
  checkpoint at the peak (``peak_checkpoint``, a folder name such as ``checkpoint-12``), its step and value.
  :class:`StopRequestCallback` points ``state.best_model_checkpoint`` at it, the one folder the Trainer's
  ``save_total_limit`` rotation always keeps, so the peak survives rotation from the moment the watcher knows it.
- :data:`STOP_FILE` (``ctx_reliance_stop.json``), written by the watcher when a stop rule fires: the step of the
  checkpoint that decided it, the reason, the rule, the peak checkpoint. :class:`StopRequestCallback` sets
  ``control.should_training_stop`` at the first ``on_step_end`` that sees it.
- :data:`END_FILE` (``ctx_reliance_train_end.json``), written by :class:`StopRequestCallback` at train end (the
  final global step): the watcher scores the checkpoints up to that step and exits.

Stale files: a request that is already in ``OUTPUT_DIR`` when ``train()`` begins (an earlier run's, or the request
that stopped the run now being resumed) is ignored with a warning; only a file written (or rewritten) after train
begin acts. The end marker is removed at train begin. ``"format"`` tags the layout (:data:`STOP_FORMAT`, ...).

Several processes (DDP, FSDP, DeepSpeed): rank 0 alone reads the files, every ``check_every`` steps, and broadcasts
what it found (``torch.distributed.broadcast_object_list``), so every rank stops at the same step and protects the
same folder; ranks that read the file themselves could see it at different steps on a network filesystem, and a rank
that stops while another trains on leaves the others waiting in the next collective. The broadcast runs at the same
steps on every rank (``global_step % check_every == 0``); on one process nothing is exchanged. The cost per check is
one ``os.stat`` per file (the file is read only when its size or modification time changed) and, under several
processes, one small broadcast.

Limits: ``metric_for_best_model`` makes the Trainer overwrite ``best_model_checkpoint`` at every save, so the peak
protection is not reliable with it (a warning says so at train begin); a checkpoint rotated away before the watcher
scored it cannot be protected: keep ``save_total_limit`` above the watcher's lag in checkpoints (``docs/watch.md``).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .errors import ConfigurationError
from .messages import rank_zero_info, rank_zero_warn

__all__ = ["END_FILE", "PEAK_FILE", "STOP_FILE", "STOP_FORMAT", "StopRequestCallback", "read_request",
           "write_request"]

#: The watcher's stop request, its peak notice, and the training process's end marker (in ``OUTPUT_DIR``).
STOP_FILE = "ctx_reliance_stop.json"
PEAK_FILE = "ctx_reliance_peak.json"
END_FILE = "ctx_reliance_train_end.json"
#: The ``"format"`` tag of each file.
STOP_FORMAT = "ctx_callback.stop/1"
PEAK_FORMAT = "ctx_callback.peak/1"
END_FORMAT = "ctx_callback.train_end/1"
_FORMATS = {STOP_FILE: STOP_FORMAT, PEAK_FILE: PEAK_FORMAT, END_FILE: END_FORMAT}


def write_request(output_dir: str | os.PathLike, name: str, payload: dict[str, Any]) -> str:
    """Write ``payload`` (plus its ``format`` tag and the time) atomically as ``output_dir/name``.

    Args:
        output_dir: The training output directory.
        name: :data:`STOP_FILE`, :data:`PEAK_FILE` or :data:`END_FILE`.
        payload: JSON values.

    Returns:
        The file's path.
    """
    path = os.path.join(os.fspath(output_dir), name)
    tmp = os.path.join(os.fspath(output_dir), f".{name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump({"format": _FORMATS[name], **payload, "written_at": time.time()}, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_request(output_dir: str | os.PathLike, name: str) -> dict[str, Any] | None:
    """The file ``output_dir/name`` as written by :func:`write_request`; ``None`` when it is missing, unreadable or
    of another format (a warning for the last two)."""
    path = os.path.join(os.fspath(output_dir), name)
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        rank_zero_warn("ctx_callback: ignoring unreadable %s (%s: %s).", path, type(err).__name__, err)
        return None
    if not isinstance(data, dict) or data.get("format") != _FORMATS[name]:
        rank_zero_warn("ctx_callback: ignoring %s: not a %s file.", path, _FORMATS[name])
        return None
    return data


def _stat(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class StopRequestCallback(TrainerCallback):
    """Turns ``ctx-callback watch``'s stop request into ``should_training_stop`` and protects its peak checkpoint.

    Add it to the training run the watcher watches (nothing else changes in training: it only reads two small files
    and, on a request, stops at the next step end, as ``EarlyStoppingCallback`` would)::

        trainer.add_callback(StopRequestCallback())
        trainer.train()

    The protocol, stale requests and multi-process behaviour: :mod:`ctx_callback.remote_stop`.

    Args:
        output_dir: Where the watcher writes its requests; default: the Trainer's ``output_dir``.
        check_every: Look for a request every this many optimizer steps (default 1: every step).
        protect_peak: Point ``state.best_model_checkpoint`` at the watcher's peak checkpoint (rotation keeps it).

    Attributes:
        stop_request: The stop request that stopped training (the file's content), or ``None``.
        stopped_at_step: The global step at which training was told to stop, or ``None``.
        peak_checkpoint: The protected peak checkpoint folder, or ``None``.

    Raises:
        ConfigurationError: ``check_every`` is not an integer >= 1.
    """

    def __init__(self, output_dir: str | os.PathLike | None = None, check_every: int = 1,
                 protect_peak: bool = True) -> None:
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
            raise ConfigurationError(f"check_every must be an integer >= 1 (optimizer steps between looks for a "
                                     f"stop request), got {check_every!r}.")
        if not isinstance(protect_peak, bool):
            raise ConfigurationError(f"protect_peak must be True or False, got {protect_peak!r}.")
        self.output_dir = None if output_dir is None else os.fspath(output_dir)
        self.check_every, self.protect_peak = check_every, protect_peak
        self.stop_request: dict[str, Any] | None = None
        self.stopped_at_step: int | None = None
        self.peak_checkpoint: str | None = None
        self._seen: dict[str, tuple[int, int, int] | None] = {}

    def _dir(self, args: TrainingArguments) -> str:
        return self.output_dir if self.output_dir is not None else str(args.output_dir)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        folder = self._dir(args)
        self.stop_request, self.stopped_at_step = None, None
        self._seen = {name: _stat(os.path.join(folder, name)) for name in (STOP_FILE, PEAK_FILE)}
        if state.is_world_process_zero:
            if self._seen[STOP_FILE] is not None:
                rank_zero_warn("ctx_callback: %s was there before training began (an earlier run's request?): it is "
                               "ignored; only a request written from now on stops training.",
                               os.path.join(folder, STOP_FILE))
            try:
                os.remove(os.path.join(folder, END_FILE))
            except OSError:
                pass
        if self.protect_peak and args.metric_for_best_model is not None and args.save_total_limit:
            rank_zero_warn("ctx_callback: metric_for_best_model=%r is set, so the Trainer rewrites "
                           "best_model_checkpoint at every save and save_total_limit=%d may rotate the watcher's "
                           "peak checkpoint away.", args.metric_for_best_model, args.save_total_limit)
        return control

    def _look(self, folder: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """The stop request and peak notice written since the last look (``None`` for each that did not change)."""
        found: list[dict[str, Any] | None] = []
        for name in (STOP_FILE, PEAK_FILE):
            stat = _stat(os.path.join(folder, name))
            if stat is None or stat == self._seen.get(name):
                found.append(None)
                continue
            self._seen[name] = stat
            found.append(read_request(folder, name))
        return found[0], found[1]

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if state.global_step % self.check_every:
            return control
        folder = self._dir(args)
        found = self._look(folder) if state.is_world_process_zero else (None, None)
        from .distributed import world

        if world()[1] > 1:  # rank 0's view on every rank (module docstring)
            import torch.distributed as dist

            box = [found]
            dist.broadcast_object_list(box, src=0)
            found = box[0]
        stop, peak = found
        if peak is not None and self.protect_peak and isinstance(peak.get("peak_checkpoint"), str):
            path = os.path.join(str(args.output_dir), os.path.basename(peak["peak_checkpoint"]))
            if os.path.isdir(path):
                state.best_model_checkpoint, self.peak_checkpoint = path, path
            else:
                rank_zero_warn("ctx_callback: the watcher's peak checkpoint %s does not exist (rotated away before "
                               "it was scored?); it cannot be protected.", path)
        if stop is not None:
            control.should_training_stop = True
            self.stop_request, self.stopped_at_step = stop, state.global_step
            rank_zero_info("ctx_callback: stopping training at step %d on the watcher's request (checkpoint step "
                           "%s: %s).", state.global_step, stop.get("step"), stop.get("reason"))
        return control

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if state.is_world_process_zero:
            try:
                write_request(self._dir(args), END_FILE, {"global_step": int(state.global_step),
                                                          "stopped_by_request": self.stop_request is not None})
            except OSError as err:
                rank_zero_warn("ctx_callback: could not write %s (%s: %s); the watcher will need --until-step or "
                               "--idle-timeout to exit.", END_FILE, type(err).__name__, err)
        return control
