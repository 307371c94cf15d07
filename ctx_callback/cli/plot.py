"""``ctx-callback plot INPUT``: reliance curves to a PNG, from a trainer state, a run summary, a scan results file or
an output dir.

An output directory is drawn from the run's fullest record: ``ctx_reliance_summary.json`` (the callback's whole
history, its stop and peak; the only record of an early stop after the last checkpoint), ``trainer_state.json`` or the
newest ``checkpoint-*/trainer_state.json``, whichever has the latest probe event (ties: in that order); see
:func:`_pick_record`. The ``wrote ...`` line says what was drawn (steps, peak, stop), and the PNG records it
(:data:`ctx_callback.plotting.PNG_METADATA_KEY`).

The curves drawn are the metrics of :data:`ctx_callback.metrics.METRICS` that have a ``plot_label`` (see
:func:`ctx_callback.plotting.plot_reliance`); ``--monitor`` is parsed by the core's
:func:`~ctx_callback.monitor.parse_monitor` (any mode, no variant check) and picks the peak of scan results in the
metric's own direction.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..outcomes import SUMMARY_FILE
from ..plotting import plot_data
from .common import (
    EXIT_FAILURE,
    EXIT_OK,
    PREFIX,
    SCAN_FORMAT,
    SCAN_JSON,
    add_debug_option,
    add_subparser,
    eprint,
    find_checkpoints,
    find_peak,
    one_line,
    parse_monitor_option,
    positive_float,
    positive_int,
    read_json,
    warn,
)

__all__ = ["NAME", "PLOT_FILE", "add_parser", "run", "scan_to_log_history"]

NAME = "plot"

#: The PNG written next to INPUT (inside it for a directory) when ``--output`` is not given.
PLOT_FILE = "ctx_reliance.png"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``plot`` and its options.

    Args:
        subparsers: The object ``ArgumentParser.add_subparsers()`` returned.

    Returns:
        The ``plot`` subparser.
    """
    parser = add_subparser(
        subparsers, NAME,
        help="draw reliance curves to a PNG",
        description="Draw counterfactual, parametric and closed-book accuracy against the step, with the peak "
                    "and stop steps marked and the training loss on a second axis. INPUT is a trainer_state.json, "
                    f"a run summary ({SUMMARY_FILE}), a scan results JSON ({SCAN_JSON}) or a training output "
                    f"directory. For a directory the run's own record is drawn: of OUTPUT_DIR/{SUMMARY_FILE} (the "
                    "callback's full history with its stop and peak, rewritten at every save and at train end), "
                    "OUTPUT_DIR/trainer_state.json and the newest checkpoint-*/trainer_state.json, the later last "
                    "step wins (an early stop after the last checkpoint is only in the summary); on a tie the "
                    "summary, then trainer_state.json. Records that disagree on a shared step (two runs in one "
                    "directory) get a warning naming both. The scan results are drawn only when none of these holds "
                    "ctx_reliance metrics.",
    )
    parser.add_argument("input", metavar="INPUT",
                        help=f"trainer_state.json | {SUMMARY_FILE} | OUTPUT_DIR | scan results .json")
    parser.add_argument("--output", "-o", default=None, metavar="PNG",
                        help=f"PNG to write; default: {PLOT_FILE} next to INPUT (inside it for a directory)")
    parser.add_argument("--monitor", default=None, metavar="METRIC",
                        help="monitored metric (labels the smoothed curve; picks the peak of scan results); default: "
                             "the run's or the scan's own monitor")
    parser.add_argument("--title", default="Context reliance during training", help="plot title")
    parser.add_argument("--width", type=positive_float, default=8.0, help="figure width in inches")
    parser.add_argument("--height", type=positive_float, default=4.5, help="figure height in inches")
    parser.add_argument("--dpi", type=positive_int, default=100, help="dots per inch (PNG pixels = inches x dpi)")
    add_debug_option(parser)
    return parser


def _has_reliance(log_history: Any) -> bool:
    return isinstance(log_history, list) and any(
        isinstance(r, dict) and f"{PREFIX}/counterfactual_accuracy" in r for r in log_history)


def _newest_checkpoint_state(directory: Path) -> Path | None:
    for ckpt in reversed(find_checkpoints(directory)):
        if (ckpt.path / "trainer_state.json").is_file():
            return ckpt.path / "trainer_state.json"
    return None


def _loss_rows(directory: Path | None) -> list[dict[str, Any]]:
    """Training-loss rows of a run (its trainer_state.json, else the newest checkpoint's), for the second axis."""
    if directory is None or not directory.is_dir():
        return []
    for state in (directory / "trainer_state.json", _newest_checkpoint_state(directory)):
        if state is not None and state.is_file():
            try:
                history = json.loads(state.read_text()).get("log_history", [])
            except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                continue
            return [{"step": r["step"], "loss": r["loss"]} for r in history
                    if isinstance(r, dict) and "loss" in r and "step" in r]
    return []


@dataclass
class _Record:
    """One plottable record of a run: a run summary's history or a trainer state's log_history.

    Attributes:
        path: The file.
        history: Its rows (a summary's rows carry no training loss: the run's trainer state adds it).
        stop_step: The early stop it records, or ``None``.
        peak_step: The peak it records (a summary's ``peak_step``), or ``None`` to take the rows' latest.
        description: How the ``wrote ...`` line names it.
    """

    path: Path
    history: list[dict[str, Any]]
    stop_step: int | None
    peak_step: int | None
    description: str

    def reliance(self) -> dict[int, Any]:
        """``{step: counterfactual_accuracy}`` of its probe events."""
        key = f"{PREFIX}/counterfactual_accuracy"
        return {int(r["step"]): r[key] for r in self.history if isinstance(r, dict) and key in r and "step" in r}

    @property
    def last_step(self) -> int:
        return max(self.reliance(), default=-1)


def _is_summary(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("summary"), dict) and isinstance(data.get("history"), list)


def _summary_record(path: Path, data: dict[str, Any]) -> _Record:
    """A run summary (``ctx_reliance_summary.json``): its history, stop and peak, and the run's training loss."""
    history = [r for r in data["history"] if isinstance(r, dict)]
    summary = data["summary"]
    stop = summary.get("stop_step")
    peak = summary.get("peak_step")
    return _Record(path, history + _loss_rows(path.parent),
                   stop if isinstance(stop, int) and not isinstance(stop, bool) else _stop_step(history),
                   peak if isinstance(peak, int) and not isinstance(peak, bool) else None, f"run summary {path}")


def _state_record(path: Path, data: dict[str, Any]) -> _Record:
    history = data["log_history"]
    return _Record(path, history, _stop_step(history), None, f"trainer state {path}")


def _run_records(directory: Path) -> list[_Record]:
    """The plottable records of an output directory, in tie-break order: its run summary, its trainer_state.json,
    its newest checkpoint's trainer_state.json (those that hold ctx_reliance metrics)."""
    records = []
    candidates = [(True, directory / SUMMARY_FILE), (False, directory / "trainer_state.json"),
                  (False, _newest_checkpoint_state(directory))]
    for is_summary, path in candidates:
        if path is None or not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        if is_summary and _is_summary(data) and _has_reliance(data["history"]):
            records.append(_summary_record(path, data))
        elif not is_summary and isinstance(data, dict) and _has_reliance(data.get("log_history")):
            records.append(_state_record(path, data))
    return records


def _pick_record(records: list[_Record]) -> _Record:
    """The record whose last probe event is latest (the first of ``records`` on a tie).

    A record that disagrees with the chosen one at a shared step (another run's, in the same directory) gets a
    warning; a run summary that ends before the chosen record (a stale copy) gets a note.
    """
    chosen = records[0]
    for record in records[1:]:
        if record.last_step > chosen.last_step:
            chosen = record
    ours = chosen.reliance()
    for record in records:
        if record is chosen:
            continue
        theirs = record.reliance()
        differ = [step for step in sorted(set(ours) & set(theirs))
                  if not _same_value(ours[step], theirs[step])]
        if differ:
            step = differ[0]
            warn(f"{record.path} and {chosen.path} disagree at step {step} (counterfactual_accuracy "
                 f"{theirs[step]} vs {ours[step]}): they record different runs. Drawing {chosen.path} (last probe "
                 f"event at step {chosen.last_step}; the later last step wins); pass the other file as INPUT to "
                 "draw it instead.")
        elif record.path.name == SUMMARY_FILE and record.last_step < chosen.last_step:
            eprint(f"ctx-callback: note: {record.path} ends at step {record.last_step}, before {chosen.path} "
                   f"(step {chosen.last_step}): drawing the latter (the later last step wins).")
    return chosen


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b or (a != a and b != b) or abs(a - b) <= 1e-9
    return bool(a == b)


def scan_to_log_history(scan: dict[str, Any], monitor_key: str | None = None) -> list[dict[str, Any]]:
    """Scan results -> ``log_history``-style rows for :func:`~ctx_callback.plotting.plot_reliance`.

    Args:
        scan: The contents of a ``ctx_reliance_scan.json``.
        monitor_key: The metric whose peak to mark (a logged key or a ``--monitor`` name). When it differs from
            the scan's own monitor, the peak is recomputed in that metric's direction (``greater_is_better`` from
            :data:`~ctx_callback.metrics.METRICS`); ``None`` keeps the scan's peak.

    Returns:
        One row ``{"step": ..., "ctx_reliance/...": ...}`` per scored checkpoint, by step, with the peak step as
        ``ctx_reliance/peak_step``, followed by the run's training-loss rows when its ``trainer_state.json`` is
        still around.

    Raises:
        UsageError: ``monitor_key`` names no monitorable metric.
    """
    rows = sorted(scan.get("rows", []), key=lambda r: r["step"])
    peak = scan.get("peak")
    if monitor_key is not None and monitor_key != scan.get("monitor"):
        monitor = parse_monitor_option(monitor_key, None, None)
        peak = find_peak(rows, monitor.key, monitor.greater_is_better)
    history: list[dict[str, Any]] = []
    for row in rows:
        entry = {"step": row["step"], **row["metrics"], **row.get("intervals", {})}  # intervals: the plot's band
        if peak is not None:
            entry[f"{PREFIX}/peak_step"] = float(peak["step"])
        history.append(entry)
    output_dir = scan.get("output_dir")
    history.extend(_loss_rows(Path(output_dir)) if output_dir else [])
    return history


def _run_monitor(source: Path, history: list[dict[str, Any]]) -> str:
    """The monitor the plotted run or scan used: a scan file's ``monitor``, else the run summary's
    (``ctx_reliance_summary.json``, the input or next to it), else the log-likelihood default where it was logged,
    else ``counterfactual_accuracy``."""
    folder = source if source.is_dir() else source.parent
    for candidate in ([] if source.is_dir() else [source]) + [folder / SUMMARY_FILE]:
        try:
            data = json.loads(candidate.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        monitor = data.get("monitor") if isinstance(data, dict) else None
        if _is_summary(data) and monitor is None:  # a run summary: {"summary": {"monitor": ...}, "history": ...}
            monitor = data["summary"].get("monitor")
        if isinstance(monitor, str):
            try:
                return parse_monitor_option(monitor, None, None).key
            except UsageError:
                continue
    default = parse_monitor_option(None, "loglik", None).key
    if any(isinstance(r, dict) and default in r for r in history):
        return default
    return f"{PREFIX}/counterfactual_accuracy"


def _stop_step(log_history: list[dict[str, Any]]) -> int | None:
    stops = [r["step"] for r in log_history if isinstance(r, dict) and r.get(f"{PREFIX}/early_stop") and "step" in r]
    return int(stops[-1]) if stops else None


def _plot_source(path: Path, monitor_key: str | None) -> _Record:
    """The record to draw from a trainer_state.json, run summary, scan JSON or output directory.

    For a directory: of its run summary, trainer_state.json and newest checkpoint-*/trainer_state.json, the one whose
    last probe event is latest (:func:`_pick_record`); its scan results only when none holds ctx_reliance metrics.
    """
    if not path.exists():
        raise UsageError(f"no such file or directory: {path}")
    if path.is_dir():
        records = _run_records(path)
        if records:
            return _pick_record(records)
        if (path / SCAN_JSON).is_file() and _usable(path / SCAN_JSON):
            return _plot_source(path / SCAN_JSON, monitor_key)
        raise UsageError(f"nothing to plot in {path}: no ctx_reliance metrics in {SUMMARY_FILE}, trainer_state.json "
                         f"or checkpoint-*/trainer_state.json, and no {SCAN_JSON} (run `ctx-callback scan {path}` "
                         "first)")
    data = read_json(path)
    if isinstance(data, dict) and data.get("format") == SCAN_FORMAT:
        history = scan_to_log_history(data, monitor_key)
        if not any(f"{PREFIX}/counterfactual_accuracy" in r for r in history):
            raise UsageError(f"{path} holds no scored checkpoints")
        return _Record(path, history, None, None, f"scan results {path}")
    if _is_summary(data):
        if not _has_reliance(data["history"]):
            raise UsageError(f"{path} holds no probe events (its history is empty: did every probe fail?)")
        return _summary_record(path, data)
    if isinstance(data, dict) and isinstance(data.get("log_history"), list):
        if not _has_reliance(data["log_history"]):
            raise UsageError(f"{path} has no ctx_reliance metrics (was ContextRelianceCallback used?); "
                             "score the checkpoints with `ctx-callback scan OUTPUT_DIR` and plot its JSON")
        return _state_record(path, data)
    raise UsageError(f"{path} is neither a trainer_state.json (no 'log_history'), a run summary ({SUMMARY_FILE}) "
                     "nor a ctx-callback scan file")


def _usable(path: Path) -> bool:
    """A candidate file inside an output directory that holds something plottable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    if not isinstance(data, dict):
        return False
    if data.get("format") == SCAN_FORMAT:
        return bool(data.get("rows"))
    return _has_reliance(data.get("log_history"))


def run(args: argparse.Namespace) -> int:
    """Run ``ctx-callback plot``.

    Args:
        args: The parsed command line.

    Returns:
        ``EXIT_OK`` when the PNG is written, ``EXIT_FAILURE`` when matplotlib is missing.

    Raises:
        CtxCallbackError: Bad input (bad ``--monitor``, missing input, nothing to plot, missing output directory).
    """
    source = Path(args.input).expanduser()
    monitor_key = None if args.monitor is None else parse_monitor_option(args.monitor, None, None).key
    record = _plot_source(source, monitor_key)
    if monitor_key is None:
        monitor_key = _run_monitor(record.path if record.path.name == SUMMARY_FILE else source, record.history)
    if args.output:
        output = Path(args.output).expanduser()
    else:
        output = (source if source.is_dir() else source.parent) / PLOT_FILE
    if output.parent and not output.parent.exists():
        raise UsageError(f"output directory does not exist: {output.parent}")
    try:
        import matplotlib  # noqa: F401

        from ..plotting import plot_reliance
    except ImportError as err:
        eprint(f"ctx-callback: error: plot needs matplotlib (pip install 'ctx_callback[plot]'): {one_line(err)}")
        return EXIT_FAILURE
    plot_reliance(record.history, output, monitor_key=monitor_key, stop_step=record.stop_step,
                  peak_step=record.peak_step, title=args.title, size=(args.width, args.height), dpi=args.dpi)
    print(f"wrote {output} (from {record.description}: {_drawn(record, monitor_key)})")
    return EXIT_OK


def _drawn(record: _Record, monitor_key: str) -> str:
    """What the plot shows, in a few words: its steps, peak and stop markers."""
    data = plot_data(record.history, monitor_key=monitor_key, stop_step=record.stop_step, peak_step=record.peak_step)
    steps = data.steps
    parts = [f"{len(steps)} probe events, steps {steps[0]}-{steps[-1]}" if steps else "no probe events"]
    parts.append("no peak marked" if data.peak_step is None else f"peak at step {int(data.peak_step)}")
    parts.append("no early stop" if data.stop_step is None else f"stop at step {data.stop_step}")
    return ", ".join(parts)
