"""``ctx-callback flips RUN_DIR``: which probes went from the context's answer to the memorised one (and back).

Reads ``RUN_DIR/ctx_reliance_probes.jsonl`` (written by :class:`~ctx_callback.ContextRelianceCallback` with
``probe_log=True``, the default) and compares two probe events: ``--from`` (default: the peak step recorded in
``RUN_DIR/ctx_reliance_summary.json``, else the first event) and ``--to`` (default: the last event). Prints the
flips grouped by direction and family, each with whether the model knows the fact closed-book (the latest
``closed_book`` check up to ``--to``); ``--json`` prints one JSON object instead.

The log is checked before it is compared (:func:`read_log`): a line that is not JSON (cut short by a killed run) is
skipped with a warning; rows repeated identically (the same events written twice, e.g. a log concatenated with
itself) are dropped with a note; two *different* rows for the same probe at the same step (two runs' logs in one
file) are refused, naming the probe, both lines and where the steps start over. When the two compared events hold
different probe sets (a last event cut short), a warning names the counts. Warnings go to stderr and, with
``--json``, into the object's ``warnings`` list.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..outcomes import PROBES_FILE, SUMMARY_FILE, FlipReport, compute_flips, event_steps
from .common import EXIT_OK, add_debug_option, add_subparser, eprint, read_json, warn

__all__ = ["NAME", "add_parser", "format_report", "read_log", "run"]

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
                    f"(from RUN_DIR/{PROBES_FILE}), grouped by family, with closed-book knowledge. Rows repeated "
                    "identically in the log are dropped (with a note); different rows for the same probe and step "
                    "(two runs' logs in one file) are refused; compared events with different probe sets (a last "
                    "event cut short) get a warning naming the counts.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help=f"the trainer's output_dir (holds {PROBES_FILE})")
    parser.add_argument("--from", dest="from_step", type=int, default=None, metavar="STEP",
                        help="earlier event's step (default: the run's peak step, else the first event)")
    parser.add_argument("--to", dest="to_step", type=int, default=None, metavar="STEP",
                        help="later event's step (default: the last event)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the listing")
    add_debug_option(parser)
    return parser


def _lines(numbers: list[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:5])
    return f"line {shown}" if len(numbers) == 1 else f"lines {shown}" + (" ..." if len(numbers) > 5 else "")


def read_log(path: Path) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """The rows of a probe log, each ``(step, probe)`` once, and what was wrong with the file.

    Args:
        path: A ``ctx_reliance_probes.jsonl``.

    Returns:
        ``(rows, warnings, notes)``: the rows in file order, without the lines that are not probe rows (a warning)
        and without repeats of an identical row (a note); one message each, for stderr and ``--json``.

    Raises:
        UsageError: Two different rows for the same probe at the same step: the file mixes runs; the message names
            the probe, both lines, and the line where the steps start over.
    """
    rows: list[dict[str, Any]] = []
    first: dict[tuple[int, str], tuple[int, dict[str, Any]]] = {}
    bad: list[int] = []
    repeats = 0
    conflicts: list[tuple[int, str, int, int]] = []  # (step, id, earlier line, later line)
    restarts: list[tuple[int, int, int]] = []  # (line, step, previous step)
    previous: int | None = None
    with open(path, encoding="utf-8", errors="replace") as f:  # undecodable bytes: a line that is not JSON
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad.append(number)
                continue
            if not (isinstance(row, dict) and isinstance(row.get("step"), int) and isinstance(row.get("id"), str)):
                bad.append(number)
                continue
            step = row["step"]
            if previous is not None and step < previous:
                restarts.append((number, step, previous))
            previous = step
            key = (step, row["id"])
            if key not in first:
                first[key] = (number, row)
                rows.append(row)
            elif first[key][1] == row:
                repeats += 1
            else:
                conflicts.append((step, row["id"], first[key][0], number))
    if conflicts:
        step, probe_id, earlier, later = conflicts[0]
        steps = sorted({c[0] for c in conflicts})
        where = "; ".join(f"line {line} (step {s} after step {p})" for line, s, p in restarts[:3])
        restart = f" The steps start over at {where}." if restarts else ""
        raise UsageError(
            f"{path} holds conflicting rows for {len({c[:2] for c in conflicts})} probe(s) at step(s) {steps}: "
            f"probe {probe_id!r} at step {step} is on line {earlier} and line {later} with different outcomes. The "
            f"file mixes the logs of different runs (logs concatenated, or a run that appended to another's log), "
            f"and comparing its events would report flips that no run made.{restart} Keep one run's rows in "
            f"{PROBES_FILE} (e.g. split it where the steps start over) and re-run."
        )
    warnings, notes = [], []
    if bad:
        warnings.append(f"{path}: {_lines(bad)} {'is' if len(bad) == 1 else 'are'} not a valid JSON probe row "
                        "(cut short, e.g. by a killed run): skipped")
    if repeats:
        notes.append(f"{path}: {repeats} duplicate rows, identical to earlier rows (the same events written twice, "
                     "e.g. a log concatenated with itself): each counted once")
    return rows, warnings, notes


def _probe_sets(rows: list[dict[str, Any]], report: FlipReport) -> str | None:
    """A warning when the two compared events hold different probes, naming the counts; else ``None``."""
    before = {r["id"] for r in rows if r["step"] == report.from_step}
    after = {r["id"] for r in rows if r["step"] == report.to_step}
    if before == after:
        return None
    parts = []
    for step, mine, other in ((report.from_step, before, after), (report.to_step, after, before)):
        only = sorted(mine - other)
        if only:
            parts.append(f"{len(only)} only at step {step}, e.g. {', '.join(only[:3])}")
    return (f"the compared events hold different probes: step {report.from_step} has {len(before)} probes, step "
            f"{report.to_step} has {len(after)} ({'; '.join(parts)}); comparing the {report.num_probes} in both. An "
            "event cut short (a killed run) or a changed probe set does this; pass --from/--to to compare complete "
            "events.")


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
    shares = report.decline_shares()
    if shares:
        lines.append("\nshare of the counterfactual accuracy's decline (net flips to memory), by family and relation:")
        lines += [f"  {group}: {share:+.0%}" for group, share in shares.items()]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run ``ctx-callback flips``.

    Args:
        args: The parsed command line.

    Returns:
        ``EXIT_OK``.

    Raises:
        UsageError: No run directory, no probe log, an empty log, a log with conflicting rows (:func:`read_log`), or
            a step the log has no event at.
    """
    run_dir = Path(args.run_dir).expanduser()
    if not run_dir.is_dir():
        raise UsageError(f"run directory does not exist: {run_dir}")
    path = run_dir / PROBES_FILE
    if not path.is_file():
        raise UsageError(f"{path} not found: train with ContextRelianceCallback(..., probe_log=True) (the default) "
                         "to write it")
    rows, warnings, notes = read_log(path)
    for message in warnings:
        warn(message)
    for message in notes:
        eprint(f"ctx-callback: note: {message}")
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
    different = _probe_sets(rows, report)
    if different is not None:
        warn(different)
        warnings.append(different)
    if args.json:
        print(json.dumps({**report.to_json(), "warnings": warnings + notes}, indent=2))
    else:
        print(format_report(report))
    return EXIT_OK
