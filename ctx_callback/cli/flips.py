"""``ctx-callback flips RUN_DIR``: which probes went from the context's answer to the memorised one (and back).

Reads ``RUN_DIR/ctx_reliance_probes.jsonl`` (written by :class:`~ctx_callback.ContextRelianceCallback` with
``probe_log=True``, the default) and compares two probe events: ``--from`` (default: the peak step recorded in
``RUN_DIR/ctx_reliance_summary.json``, else the first event) and ``--to`` (default: the last event). Prints the
flips grouped by direction and family, each with whether the model knows the fact closed-book (the latest
``closed_book`` check up to ``--to``); ``--json`` prints one JSON object instead.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..outcomes import PROBES_FILE, SUMMARY_FILE, FlipReport, compute_flips, event_steps, read_probe_rows
from .common import EXIT_OK, add_debug_option, add_subparser, read_json

__all__ = ["NAME", "add_parser", "format_report", "run"]

NAME = "flips"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``flips`` and its options.

    Args:
        subparsers: The object ``ArgumentParser.add_subparsers()`` returned.

    Returns:
        The ``flips`` subparser.
    """
    parser = add_subparser(
        subparsers, NAME,
        help="probes that flipped between the context's and the memorised answer",
        description="List the probes whose preferred answer changed between two probe events of a training run "
                    f"(from RUN_DIR/{PROBES_FILE}), grouped by family, with closed-book knowledge.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help=f"the trainer's output_dir (holds {PROBES_FILE})")
    parser.add_argument("--from", dest="from_step", type=int, default=None, metavar="STEP",
                        help="earlier event's step (default: the run's peak step, else the first event)")
    parser.add_argument("--to", dest="to_step", type=int, default=None, metavar="STEP",
                        help="later event's step (default: the last event)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the listing")
    add_debug_option(parser)
    return parser


def _peak_step(run_dir: Path) -> int | None:
    path = run_dir / SUMMARY_FILE
    if not path.is_file():
        return None
    summary = read_json(path)
    step = summary.get("summary", {}).get("peak_step") if isinstance(summary, dict) else None
    return step if isinstance(step, int) else None


def format_report(report: FlipReport) -> str:
    """The human-readable listing of :func:`~ctx_callback.outcomes.compute_flips`'s report."""
    lines = [f"probes that changed their preferred answer from step {report.from_step} to step {report.to_step} "
             f"({report.num_probes} probes in both events):"]
    titles = {"to_memory": "context -> memory (now answers from memory)",
              "to_context": "memory -> context (now follows the context)", "other": "other changes"}
    for direction, title in titles.items():
        flips = report.by_direction(direction)
        if not flips and direction == "other":
            continue
        lines.append(f"\n{title}: {len(flips)}")
        family = None
        for flip in flips:
            if flip.family != family:
                family = flip.family
                lines.append(f"  {family}: {sum(f.family == family for f in flips)}")
            known = {True: "knows it closed-book", False: "does not know it closed-book",
                     None: "closed-book not measured"}[flip.known]
            change = "" if direction != "other" else f" ({flip.before} -> {flip.after})"
            lines.append(f"    {flip.id}{change}  [{known}]")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run ``ctx-callback flips``.

    Args:
        args: The parsed command line.

    Returns:
        ``EXIT_OK``.

    Raises:
        UsageError: No run directory, no probe log, an empty log, or a step the log has no event at.
    """
    run_dir = Path(args.run_dir).expanduser()
    if not run_dir.is_dir():
        raise UsageError(f"run directory does not exist: {run_dir}")
    path = run_dir / PROBES_FILE
    if not path.is_file():
        raise UsageError(f"{path} not found: train with ContextRelianceCallback(..., probe_log=True) (the default) "
                         "to write it")
    rows = read_probe_rows(path)
    steps = event_steps(rows)
    if not steps:
        raise UsageError(f"{path} holds no probe rows")
    from_step = args.from_step
    if from_step is None:
        peak = _peak_step(run_dir)
        from_step = peak if peak in steps else steps[0]
    to_step = steps[-1] if args.to_step is None else args.to_step
    try:
        report = compute_flips(rows, from_step, to_step)
    except KeyError as err:
        raise UsageError(f"{err.args[0]} (choose --from/--to among them)") from None
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(format_report(report))
    return EXIT_OK
