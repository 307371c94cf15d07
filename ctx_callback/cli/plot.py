"""``ctx-callback plot INPUT``: reliance curves to a PNG, from a trainer state, a scan results file or an output dir.

The curves drawn are the metrics of :data:`ctx_callback.metrics.METRICS` that have a ``plot_label`` (see
:func:`ctx_callback.plotting.plot_reliance`); ``--monitor`` is parsed by the core's
:func:`~ctx_callback.monitor.parse_monitor` (any mode, no variant check) and picks the peak of scan results in the
metric's own direction.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..outcomes import SUMMARY_FILE
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
                    f"a scan results JSON ({SCAN_JSON}) or a training output directory (its trainer_state.json, "
                    "else the newest checkpoint-*/trainer_state.json, else its scan results).",
    )
    parser.add_argument("input", metavar="INPUT", help="trainer_state.json | OUTPUT_DIR | scan results .json")
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
            except (OSError, json.JSONDecodeError, AttributeError):
                continue
            return [{"step": r["step"], "loss": r["loss"]} for r in history
                    if isinstance(r, dict) and "loss" in r and "step" in r]
    return []


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
    """The monitor the plotted run or scan used: a scan file's ``monitor``, else the run's
    ``ctx_reliance_summary.json`` ``monitor`` (next to the input), else the log-likelihood default where it was
    logged, else ``counterfactual_accuracy``."""
    folder = source if source.is_dir() else source.parent
    for candidate in ([] if source.is_dir() else [source]) + [folder / SUMMARY_FILE]:
        try:
            data = json.loads(candidate.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(data, dict) and isinstance(data.get("monitor"), str):
            try:
                return parse_monitor_option(data["monitor"], None, None).key
            except UsageError:
                continue
    default = parse_monitor_option(None, "loglik", None).key
    if any(isinstance(r, dict) and default in r for r in history):
        return default
    return f"{PREFIX}/counterfactual_accuracy"


def _stop_step(log_history: list[dict[str, Any]]) -> int | None:
    stops = [r["step"] for r in log_history if isinstance(r, dict) and r.get(f"{PREFIX}/early_stop") and "step" in r]
    return int(stops[-1]) if stops else None


def _plot_source(path: Path, monitor_key: str | None) -> tuple[list[dict[str, Any]], int | None, str]:
    """``(log_history, stop_step, description)`` from a trainer_state.json, scan JSON or output directory."""
    if not path.exists():
        raise UsageError(f"no such file or directory: {path}")
    if path.is_dir():
        candidates = [path / "trainer_state.json", _newest_checkpoint_state(path), path / SCAN_JSON]
        for candidate in candidates:
            if candidate is None or not candidate.is_file():
                continue
            history, stop, description = _plot_source(candidate, monitor_key) if _usable(candidate) else ([], None, "")
            if history:
                return history, stop, description
        raise UsageError(f"nothing to plot in {path}: no ctx_reliance metrics in trainer_state.json or "
                         f"checkpoint-*/trainer_state.json, and no {SCAN_JSON} (run `ctx-callback scan {path}` "
                         "first)")
    data = read_json(path)
    if isinstance(data, dict) and data.get("format") == SCAN_FORMAT:
        history = scan_to_log_history(data, monitor_key)
        if not any(f"{PREFIX}/counterfactual_accuracy" in r for r in history):
            raise UsageError(f"{path} holds no scored checkpoints")
        return history, None, f"scan results {path}"
    if isinstance(data, dict) and isinstance(data.get("log_history"), list):
        history = data["log_history"]
        if not _has_reliance(history):
            raise UsageError(f"{path} has no ctx_reliance metrics (was ContextRelianceCallback used?); "
                             "score the checkpoints with `ctx-callback scan OUTPUT_DIR` and plot its JSON")
        return history, _stop_step(history), f"trainer state {path}"
    raise UsageError(f"{path} is neither a trainer_state.json (no 'log_history') nor a ctx-callback scan file")


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
    history, stop_step, description = _plot_source(source, monitor_key)
    if monitor_key is None:
        monitor_key = _run_monitor(source, history)
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
    plot_reliance(history, output, monitor_key=monitor_key, stop_step=stop_step, title=args.title,
                  size=(args.width, args.height), dpi=args.dpi)
    print(f"wrote {output} (from {description})")
    return EXIT_OK
