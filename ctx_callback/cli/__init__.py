"""``ctx-callback``: score saved checkpoints, plot reliance curves and probe single models from the command line.

Commands::

    ctx-callback scan OUTPUT_DIR [options]   # score every checkpoint-* of a training run (full models and PEFT
                                             # adapters), print a table, name the peak, write CSV + JSON
    ctx-callback plot INPUT [--output PNG]   # reliance curves from trainer_state.json, an output dir or scan JSON
    ctx-callback probe MODEL [options]       # score one model (a path, a Hub id or "smollm2-135m-instruct")
    ctx-callback audit DATA --model M        # audit SFT data: non-context-critical examples; filter / augment it
    ctx-callback sft --config RECIPE.yaml    # `trl sft` (same parser, data and model loading, trainer) plus the
                                             # callback, configured by --ctx_* options or ctx_* keys of the recipe
    ctx-callback watch OUTPUT_DIR [options]  # score checkpoints as training saves them, log, request a stop

Each command is one module of this package (:mod:`~ctx_callback.cli.scan`, :mod:`~ctx_callback.cli.plot`,
:mod:`~ctx_callback.cli.probe`) listed in :data:`COMMANDS`; what they share lives in :mod:`ctx_callback.cli.common`.

``scan`` uses the same probes, prompt formats and scoring engine as :class:`~ctx_callback.ContextRelianceCallback`.
It is resumable: results are kept in ``ctx_reliance_scan.json`` keyed by checkpoint name and a fingerprint of the
probe settings (the tokenized probes, the mode and the dtype), so a re-run scores only new (or re-saved) checkpoints.
A checkpoint that fails to load or score is skipped with a warning and is not recorded, so the next run retries it.

Exit codes (stable, for scripts):

    0  success (``scan``: also when some broken checkpoints were skipped, as long as one was scored)
    1  unexpected failure (a bug, out of memory, a missing optional dependency, every checkpoint failing, ...)
    2  usage error or bad input: unknown option, missing directory, no checkpoints, unknown probe suite,
       malformed probe file, no tokenizer found, nothing to plot; every
       :class:`~ctx_callback.errors.CtxCallbackError` a command raises

Errors are printed to stderr as one line ``ctx-callback: error: ...`` (no traceback; pass ``--debug`` for one).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ..errors import CtxCallbackError, UsageError
from . import audit, flips, plot, probe, scan, sft, watch
from .common import (
    EPILOG,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    SCAN_CSV,
    SCAN_JSON,
    HelpFormatter,
    eprint,
    find_checkpoints,
    one_line,
)
from .plot import scan_to_log_history

__all__ = [
    "COMMANDS",
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_USAGE",
    "SCAN_CSV",
    "SCAN_JSON",
    "CliError",
    "build_parser",
    "find_checkpoints",
    "main",
    "scan_to_log_history",
]

#: The command registry, in ``--help`` order. Each entry is a module with ``NAME``, ``add_parser(subparsers)``
#: (registers its subparser and options) and ``run(args) -> int`` (the exit code). To add a command, write such a
#: module in this package and add it to this tuple: nothing else needs to change.
COMMANDS = (scan, plot, probe, audit, flips, sft, watch)

#: Deprecated alias: commands raise :class:`~ctx_callback.errors.UsageError` (any ``CtxCallbackError`` exits 2).
CliError = UsageError


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("ctx_callback")
    except Exception:  # noqa: BLE001 - not installed (running from a checkout)
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The ``ctx-callback`` argument parser, with one subparser per module of :data:`COMMANDS`.

    Returns:
        The top-level parser; ``args.command`` holds the chosen command's ``NAME``.
    """
    parser = argparse.ArgumentParser(
        prog="ctx-callback", formatter_class=HelpFormatter, epilog=EPILOG,
        description="Measure context reliance (counterfactual probes) of saved checkpoints and plot it.",
    )
    parser.add_argument("--version", action="version", version="%(prog)s " + _version())
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def _print_traceback(args: argparse.Namespace) -> None:
    if getattr(args, "debug", False):
        import traceback

        traceback.print_exc()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    Args:
        argv: The arguments (without the program name); ``None`` reads ``sys.argv``.

    Returns:
        The exit code: 0 success, 1 unexpected failure, 2 bad input (any
        :class:`~ctx_callback.errors.CtxCallbackError`), 130 interrupted. ``--help`` and argparse usage errors
        raise ``SystemExit`` (0 and 2).
    """
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with 2 on usage errors, 0 on --help
    commands = {command.NAME: command for command in COMMANDS}
    try:
        return commands[args.command].run(args)
    except CtxCallbackError as err:
        # One line; the CLI's own usage messages are never shortened (their advice comes last).
        message = " ".join(str(err).split()) if isinstance(err, UsageError) else one_line(err)
        eprint(f"ctx-callback: error: {message}")
        _print_traceback(args)
        return EXIT_USAGE
    except BrokenPipeError:  # stdout closed early (`ctx-callback ... | head`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE
    except KeyboardInterrupt:
        eprint("ctx-callback: interrupted")
        return 130
    except Exception as err:  # noqa: BLE001 - one line for users, traceback with --debug
        eprint(f"ctx-callback: error: unexpected {type(err).__name__}: {one_line(err)}"
                + ("" if getattr(args, "debug", False) else " (re-run with --debug for the traceback)"))
        _print_traceback(args)
        return EXIT_FAILURE
