"""``ctx-callback watch``'s core: score a training run's checkpoints as they are saved, off the training loop.

:class:`Watcher` polls ``OUTPUT_DIR`` for ``checkpoint-<step>`` folders and handles them in step order. Each is one
probe event of :class:`~ctx_callback.ContextRelianceCallback`, computed by the same parts: the round
(:func:`~ctx_callback.probe_round.score_round`), the monitored value and per-probe outcomes
(:func:`~ctx_callback.reliance_row.round_outcomes`), the decision (:class:`~ctx_callback.stopping.StopDecider`, built
by the callback's own option checks), the flips (:class:`~ctx_callback.probe_reports.ProbeReports`) and the row
(:func:`~ctx_callback.probe_round.event_row`). So for the same checkpoints (and the same baseline, ``baseline=``),
the watcher's rows hold the callback's keys and values (within float tolerance; ``probe_seconds`` is the watcher's
own time, and a stop row has ``early_stop = 1.0`` where an observe-only callback has none).

When a checkpoint is complete: the Trainer's ``_save_checkpoint`` writes ``trainer_state.json`` after the weights,
optimizer, scheduler and RNG state (transformers 5.24), so a folder is taken once it holds ``trainer_state.json`` and
its newest file was last modified at least ``settle_seconds`` ago (the clock of the watcher's machine against the
filesystem's modification times: on a network filesystem with skewed clocks, raise it). A folder without
``trainer_state.json`` is waited for, unless a later checkpoint is complete (the Trainer saves one at a time, so that
save was abandoned): it is skipped with a warning. A checkpoint that fails to load or score is retried (``retries``
times, one poll apart), then skipped with a warning; one that vanished (``save_total_limit`` rotation) is skipped
with a warning. Skipped checkpoints are no events (the decider never sees them).

The state file (:data:`WATCH_FILE`, ``ctx_reliance_watch.json`` in ``OUTPUT_DIR``) holds a fingerprint of the
settings, every event (checkpoint, step, row, the monitored value, per-probe outcomes and preferred answers, whether
the row reached the trackers), the skipped checkpoints and the stop. It is rewritten atomically after each event. A
restarted watcher replays the recorded events through a fresh decider (the same decisions: the paired comparison and
the flips need the per-probe records, which is why they are kept), logs a row that was recorded but not yet marked as
logged (a crash between the two), and goes on with the next checkpoint: no row is logged twice, except when the
watcher dies between a tracker's write and the state file's update (then that row is written once more, at the same
step). Other settings than the recorded ones are refused (a :class:`~ctx_callback.errors.ConfigurationError`).

A stop rule that fires on the baseline (``baseline=``; only ``stopping_threshold`` can) is refused as the callback
refuses it (:func:`~ctx_callback.stopping.baseline_stop_error`): the watch ends with that error, no request is
written. On a stop decision the watcher writes the stop request (:mod:`ctx_callback.remote_stop`) and ends; at every
new peak after step 0 it writes the peak notice, which :class:`~ctx_callback.StopRequestCallback` turns into rotation
protection.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoints import checkpoint_dirs
from .comparison import ProbeEvent
from .errors import ConfigurationError
from .remote_stop import END_FILE, PEAK_FILE, STOP_FILE, read_request, write_request
from .resume_state import KeptEvent
from .stopping import baseline_stop_error

__all__ = ["WATCH_FILE", "WATCH_FORMAT", "Watcher", "WatchResult", "settings_fingerprint"]

#: The watcher's state file in ``OUTPUT_DIR`` and its format tag.
WATCH_FILE = "ctx_reliance_watch.json"
WATCH_FORMAT = "ctx_callback.watch/1"
#: The name the baseline model's event is recorded under (step 0).
BASELINE = "baseline"
_STATE = "trainer_state.json"


def settings_fingerprint(settings: dict[str, Any]) -> str:
    """A short hash of everything that determines the rows and decisions (probes, scoring and stop options)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _signature(path: Path) -> list[list[Any]] | None:
    """Name, size and mtime of every file in a checkpoint folder; ``None`` when it vanished."""
    try:
        entries = sorted(path.iterdir(), key=lambda e: e.name)
        return [[e.name, e.stat().st_size, e.stat().st_mtime_ns] for e in entries if e.is_file()]
    except OSError:
        return None


def _checkpoints(output_dir: Path) -> list[tuple[int, str]]:
    try:
        return checkpoint_dirs(output_dir)
    except OSError:  # the output dir is not there yet (or no longer)
        return []


class _Refused(Exception):
    """Carries an error that ends the watch (not a checkpoint to retry)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass
class WatchResult:
    """What a watch ended with."""

    reason: str  #: why it ended: "stop", "train_end", "until_step", "idle_timeout", "once"
    scored: int = 0  #: events scored by this process
    replayed: int = 0  #: events read back from the state file
    skipped: list[str] = field(default_factory=list)  #: checkpoints skipped (by this process or before)
    stop: dict[str, Any] | None = None  #: the stop request, if one was written (or found in the state)
    peak_step: int | None = None


class Watcher:
    """Scores the checkpoints of ``output_dir`` as they appear (module docstring).

    Args:
        output_dir: The training output directory.
        options: The callback's checked options (:func:`~ctx_callback.callback_options.validate_arguments`): probes,
            monitor, decider.
        make_scorer: Builds the :class:`~ctx_callback.scoring.ProbeScorer` from the first model folder scored (its
            tokenizer); called once.
        loader: A :class:`~ctx_callback.model_loading.ModelLoader`.
        settings: What the fingerprint covers (compared with the state file's).
        sinks: The trackers (:mod:`ctx_callback.watch_trackers`).
        baseline: A model scored first, as the step-0 event (the callback's ``probe_at_start`` baseline).
        controls_every: As the callback's.
        settle_seconds: How long a complete folder's files must stay unchanged.
        retries: Failed loads of one checkpoint before it is skipped.
        state_file: The state file (default ``output_dir/ctx_reliance_watch.json``).
        say: Progress output (one line per event).
    """

    def __init__(self, output_dir: str | os.PathLike, options: Any, make_scorer: Callable[[str], Any], loader: Any,
                 settings: dict[str, Any], sinks: Sequence[Any] = (), *, baseline: str | None = None,
                 controls_every: int = 1, settle_seconds: float = 2.0, retries: int = 3,
                 state_file: str | os.PathLike | None = None, say: Callable[[str], None] = print) -> None:
        from .probe_reports import ProbeReports

        self.output_dir = Path(output_dir)
        self.options, self.make_scorer, self.loader = options, make_scorer, loader
        self.sinks, self.baseline, self.controls_every = list(sinks), baseline, controls_every
        self.settle_seconds, self.retries, self.say = settle_seconds, retries, say
        self.state_path = Path(state_file) if state_file else self.output_dir / WATCH_FILE
        self.fingerprint = settings_fingerprint(settings)
        self.settings = json.loads(json.dumps(settings, default=str))
        self.scorer: Any = None
        self.reports = ProbeReports()
        self.events: list[dict[str, Any]] = []
        self.skipped: dict[str, str] = {}
        self.stop: dict[str, Any] | None = None
        self._failures: dict[str, int] = {}

    # -- the state file ---------------------------------------------------------------------------------------------

    def _save(self) -> None:
        payload = {"format": WATCH_FORMAT, "fingerprint": self.fingerprint, "settings": self.settings,
                   "monitor": self.options.monitor.key, "events": self.events, "skipped": self.skipped,
                   "stop": self.stop}
        tmp = self.state_path.with_name(f".{self.state_path.name}.tmp")
        tmp.write_text(json.dumps(payload, indent=1) + "\n")
        os.replace(tmp, self.state_path)

    def resume(self) -> int:
        """Read the state file, replay its events through the decider, log rows not yet logged; the event count.

        Raises:
            ConfigurationError: The file is not a watch state file, or was written with other settings.
        """
        if not self.state_path.is_file():
            return 0
        try:
            data = json.loads(self.state_path.read_text())
        except (OSError, ValueError) as err:
            raise ConfigurationError(f"cannot read the watch state file {self.state_path} ({err}); delete it to "
                                     "score every checkpoint again.") from None
        if not isinstance(data, dict) or data.get("format") != WATCH_FORMAT:
            raise ConfigurationError(f"{self.state_path} is not a ctx-callback watch state file; delete it or pass "
                                     "--state-file.")
        if data.get("fingerprint") != self.fingerprint:
            raise ConfigurationError(
                f"{self.state_path} was written with other probe or stop settings (recorded: {data.get('settings')}"
                f"); its decisions cannot be continued with these. Use the same options, or delete the file (or pass "
                "another --state-file) to start over.")
        from .outcomes import PER_PROBE_METRICS

        binary = PER_PROBE_METRICS.get(self.options.monitor.metric, False)
        for event in data.get("events", []):
            kept = KeptEvent.from_dict(event.get("kept"), binary) if isinstance(event, dict) else None
            if kept is None or kept.preferred is None or not isinstance(event.get("value"), (int, float)):
                raise ConfigurationError(f"{self.state_path} holds a malformed event ({str(event)[:200]}); delete "
                                         "the file to score every checkpoint again.")
            decision = self.options.decider.update(ProbeEvent(event["step"], float(event["value"]), kept.outcomes))
            self.reports.flip_counts(kept.preferred, decision.peak.is_new_peak)
            self.events.append(event)
        self.skipped, self.stop = dict(data.get("skipped") or {}), data.get("stop")
        if self.stop is not None and not (self.output_dir / STOP_FILE).is_file():
            write_request(self.output_dir, STOP_FILE, self.stop)  # the request, should it have been lost
        for event in self.events:
            if not event.get("logged"):  # died between recording and logging: the requests may be missing too
                if event.get("new_peak") and event["step"] > 0:
                    write_request(self.output_dir, PEAK_FILE, {"monitor": self.options.monitor.key,
                                                               **self._peak_fields()})
                self._log(event)
        return len(self.events)

    # -- one event --------------------------------------------------------------------------------------------------

    def _log(self, event: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.log(event["row"], event["step"])
        event["logged"] = True
        self._save()

    def score(self, name: str, step: int, path: str) -> dict[str, Any]:
        """Load ``path``, score it as the probe event at ``step``, decide, record and log the row; the event.

        Raises:
            Exception: Loading or scoring failed (the caller retries or skips).
        """
        from .distributed import plan_probes
        from .probe_round import event_row, score_round
        from .reliance_row import round_outcomes

        opts = self.options
        if self.scorer is None:
            self.scorer = self.make_scorer(self.baseline or path)  # the tokenizer: the baseline's, else the first
        model, kind = self.loader.load(path)
        try:
            controls = self.controls_every == 1 or len(self.events) % self.controls_every == 0
            result, metrics = score_round(self.scorer, model, plan_probes(range(len(opts.probes))), controls)
        finally:
            self.loader.release(model, kind)
            del model
        nonfinite = result.nonfinite_scores
        value = math.nan if nonfinite else metrics.get(opts.monitor.key, math.nan)
        outcomes, preferred = round_outcomes(result, opts.probes, opts.monitor)
        kept = KeptEvent(step, None if nonfinite else outcomes, preferred)
        decision = opts.decider.update(ProbeEvent(step, value, kept.outcomes))
        if decision.stop and step == 0:  # as the callback: refused, not a stop before any training (stopping.py)
            raise _Refused(baseline_stop_error(decision))
        flips = self.reports.flip_counts(preferred, decision.peak.is_new_peak)
        row = event_row(metrics, result, opts.probes, opts.monitor, decision, flips, value, step)
        event = {"checkpoint": name, "step": step, "value": float(value), "row": row, "kept": kept.to_dict(),
                 "new_peak": bool(decision.peak.is_new_peak), "logged": False}
        self.events.append(event)
        if decision.stop:
            self.stop = {"step": step, "checkpoint": name, "reason": decision.reason, "rule": decision.rule,
                         "monitor": opts.monitor.key, **self._peak_fields()}
        self._save()  # recorded before the requests and the trackers (module docstring)
        if decision.peak.is_new_peak and step > 0:
            write_request(self.output_dir, PEAK_FILE, {"monitor": opts.monitor.key, **self._peak_fields()})
        if self.stop is not None:
            write_request(self.output_dir, STOP_FILE, self.stop)
        self._log(event)  # marks it logged: once that is in the state file, the requests are written
        return event

    def _peak_fields(self) -> dict[str, Any]:
        tracker = self.options.decider.tracker
        step = tracker.peak_step
        name = next((e["checkpoint"] for e in self.events if e["step"] == step and e["checkpoint"] != BASELINE), None)
        return {"peak_step": step, "peak_value": float(tracker.peak_value), "peak_checkpoint": name}

    # -- the loop ---------------------------------------------------------------------------------------------------

    def _done(self) -> set[str]:
        return {e["checkpoint"] for e in self.events} | set(self.skipped)

    def _skip(self, name: str, why: str) -> None:
        self.say(f"ctx-callback: warning: skipping {name}: {why}")
        self.skipped[name] = why
        self._save()

    def _ready(self, name: str, path: Path, later_complete: bool) -> bool | None:
        """Whether the folder can be scored now (``None``: it must be skipped, after a warning)."""
        signature = _signature(path)
        if signature is None:
            self._skip(name, "it vanished before it was scored (save_total_limit rotation?)")
            return None
        if not any(entry[0] == _STATE for entry in signature):
            if later_complete:
                self._skip(name, f"no {_STATE} while a later checkpoint is complete (an abandoned save)")
                return None
            return False
        newest = max(entry[2] for entry in signature) / 1e9
        return time.time() - newest >= self.settle_seconds

    def poll(self) -> tuple[int, list[str]]:
        """One pass: score every checkpoint that is ready, in step order; ``(events scored, folders waited for)``.

        Stops at the first folder that is not ready yet (events must be in step order) and after a stop decision.
        """
        scored, waiting = 0, []
        if self.baseline is not None and BASELINE not in self._done():
            if not self._attempt(BASELINE, 0, self.baseline):
                return scored, [BASELINE]  # the baseline is the first event: nothing before it
            scored += 1
        found = _checkpoints(self.output_dir)
        complete = {name for _, name in found if (self.output_dir / name / _STATE).is_file()}
        for index, (step, name) in enumerate(found):
            if self.stop is not None:
                break
            if name in self._done():
                continue
            later = any(other in complete for _, other in found[index + 1:])
            ready = self._ready(name, self.output_dir / name, later)
            if ready is None:
                continue
            if not ready:
                waiting.append(name)
                break
            if not self._attempt(name, step, str(self.output_dir / name)):
                waiting.append(name)
                break
            scored += 1
        return scored, waiting

    def _attempt(self, name: str, step: int, path: str) -> int:
        """Score one folder; 1 when scored, 0 when it failed (retried later, or skipped after ``retries``)."""
        start = time.perf_counter()
        try:
            event = self.score(name, step, path)
        except _Refused as refused:
            raise refused.error from None
        except Exception as err:  # noqa: BLE001 - a checkpoint still being written, or broken: retry, then skip
            if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
                raise
            if name != BASELINE and not Path(path).is_dir():
                self._skip(name, "it vanished while it was scored (save_total_limit rotation?)")
                return 0
            self._failures[name] = self._failures.get(name, 0) + 1
            why = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
            if self._failures[name] > self.retries:
                if name == BASELINE:
                    raise ConfigurationError(f"the baseline model {path} does not load or score ({why}).") from err
                self._skip(name, f"failed {self._failures[name]} times ({why})")
            else:
                self.say(f"ctx-callback: {name}: load or score failed ({why}); retrying")
            return 0
        row = event["row"]
        self.say(f"{name} (step {step}): {self.options.monitor.key} = {event['value']:.4f}, peak "
                 f"{row.get('ctx_reliance/peak_value', math.nan):.4f} at step "
                 f"{row.get('ctx_reliance/peak_step', math.nan):.0f} ({time.perf_counter() - start:.1f}s)"
                 + (f"; STOP: {self.stop['reason']}" if self.stop else ""))
        return 1

    def _train_end(self) -> int | None:
        marker = read_request(self.output_dir, END_FILE) if (self.output_dir / END_FILE).is_file() else None
        return None if marker is None else int(marker.get("global_step", 0))

    def run(self, *, once: bool = False, until_step: int | None = None, idle_timeout: float | None = None,
            poll_interval: float = 5.0) -> WatchResult:
        """Watch until a stop, the end of training, ``until_step``, ``idle_timeout`` seconds without a new event,
        or (``once``) after one pass.

        Returns:
            Why it ended and what it did.
        """
        result = WatchResult("once", replayed=self.resume())
        last_event = time.monotonic()
        while True:
            reason = None
            if self.stop is None:
                scored, waiting = self.poll()
                result.scored += scored
                last_event = time.monotonic() if scored else last_event
            else:
                waiting = []
            last = max((e["step"] for e in self.events), default=None)
            end = self._train_end()
            if self.stop is not None:
                reason = "stop"
            elif until_step is not None and last is not None and last >= until_step:
                reason = "until_step"
            elif end is not None and not waiting and all(s > end for s, n in _checkpoints(self.output_dir)
                                                         if n not in self._done()):
                reason = "train_end"
            elif once:
                reason = "once"
                for name in waiting:
                    self.say(f"ctx-callback: {name} is not complete yet (no {_STATE}, or its files still change); "
                             "a later run scores it")
            elif idle_timeout is not None and time.monotonic() - last_event >= idle_timeout:
                reason = "idle_timeout"
            if reason is not None:
                break
            time.sleep(poll_interval)
        for sink in self.sinks:
            sink.close()
        result.reason, result.stop, result.skipped = reason, self.stop, sorted(self.skipped)
        result.peak_step = self.options.decider.tracker.peak_step
        return result
