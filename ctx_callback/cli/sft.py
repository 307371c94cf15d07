"""``ctx-callback sft [trl sft options | --config RECIPE.yaml] [--ctx_* options]``: ``trl sft`` with the callback.

TRL's ``trl sft`` runs ``trl/scripts/sft.py``: its ``make_parser()`` builds a ``TrlParser`` over ``ScriptArguments``,
``SFTConfig``, ``ModelConfig`` and ``DatasetMixtureConfig`` (flags, or a YAML recipe given with ``--config``), and its
``main(script_args, training_args, model_args, dataset_args)`` loads the dataset, builds the ``SFTTrainer`` from the
model name, trains, saves and ends the trackers. It has no way to add a callback. This command reuses both functions
as they are (nothing of ``main`` is copied):

1. The parser is TRL's: a ``TrlParser`` over the dataclasses TRL's ``make_parser()`` uses, plus
   :class:`~ctx_callback.cli.sft_args.ContextRelianceArguments` (the ``ctx_*`` options), so a recipe YAML can carry
   ``ctx_*`` keys and flags override it as in TRL.
2. The ``ctx_*`` values are checked by building a :class:`~ctx_callback.ContextRelianceCallback` without a trainer
   (which validates every argument and loads the probes) before any model or dataset is loaded: a bad value exits 2
   with the callback's message, naming the option.
3. TRL's ``main`` runs with ``trl.SFTTrainer`` replaced, for the call only, by a function that builds the real
   ``SFTTrainer`` with the same arguments and adds the callback to it (``trainer.add_callback``, as in a training
   script). The trainer is TRL's own class; the callback observes, so the run trains exactly as ``trl sft``'s
   training script would (``tests/test_cli_sft.py`` compares losses and weights). If a TRL version builds its trainer
   otherwise, the run ends with an error saying the callback was never attached, instead of passing silently.

Differences from ``trl sft``: ``trl sft`` re-launches its script through ``accelerate launch`` and forwards options it
does not know (``--num_processes``, ``--accelerate_config``, unknown YAML keys) to it. This command trains in the
current process, like ``python trl/scripts/sft.py``. Unknown command-line options are refused (exit 2, with the
``accelerate launch`` command to use instead); unknown YAML keys are ignored with a warning, as TRL's script ignores
them, so one recipe serves ``accelerate launch [options] -m ctx_callback.cli sft --config RECIPE.yaml`` too.

``--help`` is fast (no torch): this command's options and the ``ctx_*`` options. ``--trl-help`` prints the full
parser's help: every ``trl sft`` option and the ``ctx_*`` group (it imports TRL).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from ..errors import CtxCallbackError, ProbeFormatError, ProbeSourceError, UnsafeFileError, UsageError
from .common import EXIT_OK, add_subparser, warn
from .sft_args import GROUP_NAME, PREFIX, ContextRelianceArguments, option_fields

__all__ = ["NAME", "add_parser", "build_trl_parser", "callback_added", "run"]

NAME = "sft"

#: This command's own flags; every other argument goes to TRL's parser.
OWN_FLAGS = ("--debug", "--trl-help")

_USAGE = "ctx-callback sft [--config RECIPE.yaml] [trl sft options] [--ctx_* options] [--trl-help] [--debug]"
_DESCRIPTION = """\
Run TRL's `trl sft` training script (trl/scripts/sft.py: same parser, dataset and model loading, same SFTTrainer)
with a ContextRelianceCallback added. Every `trl sft` option is accepted, as a flag or in a --config YAML recipe
(flags override the recipe); `ctx-callback sft --trl-help` lists them all. The ctx_* options below configure the
callback, as flags or as YAML keys.

Trains in this process, like `python trl/scripts/sft.py`; for several processes or GPUs launch it yourself:
  accelerate launch [--num_processes N ...] -m ctx_callback.cli sft --config RECIPE.yaml

example:
  ctx-callback sft --config recipe.yaml --ctx_probes all --ctx_eval_steps 50 --ctx_save_peak_checkpoint"""


class _PassThroughParser(argparse.ArgumentParser):
    """Shows every option in ``--help`` but parses only ``-h``/``--help`` and :data:`OWN_FLAGS`: the rest, in order,
    is ``args.trl_args``, for TRL's parser (argparse would refuse options it does not know)."""

    def parse_known_args(self, args: Sequence[str] | None = None,
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        args = list(sys.argv[1:] if args is None else args)
        namespace = namespace if namespace is not None else argparse.Namespace()
        if "-h" in args or "--help" in args:
            self.print_help()
            self.exit()
        namespace.debug = "--debug" in args
        namespace.trl_help = "--trl-help" in args
        namespace.trl_args = [arg for arg in args if arg not in OWN_FLAGS]
        return namespace, []


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``sft``: its own flags, and the ``ctx_*`` options listed for ``--help`` (TRL's parser reads them).

    Args:
        subparsers: The object ``ArgumentParser.add_subparsers()`` returned.

    Returns:
        The ``sft`` subparser.
    """
    parser = add_subparser(subparsers, NAME, help="train with `trl sft`'s script (flags or a YAML recipe) plus the "
                                                  "callback", description=_DESCRIPTION)
    parser.__class__ = _PassThroughParser  # the subparser is created by add_subparsers(); only its parsing changes
    parser.usage = _USAGE
    parser.add_argument("--trl-help", action="store_true",
                        help="print every `trl sft` option and the ctx_* options (imports TRL: a few seconds)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    group = parser.add_argument_group(GROUP_NAME)
    for option in option_fields():
        default = option.default_factory() if option.default is dataclasses.MISSING else option.default
        metavar, is_list = _metavar(option.type)
        help = option.metadata["help"] + (f"; --no_{option.name} turns it off" if default is True else "")
        group.add_argument(f"--{option.name}", metavar=metavar, default=default, help=help,
                           nargs="+" if is_list else None)
    return parser


def _metavar(annotation: Any) -> tuple[str, bool]:
    """``("INT", False)`` for ``int | None``, ``("FLOAT", True)`` for ``list[float]``: from the annotation's text."""
    text = str(annotation)
    for kind in ("bool", "int", "float", "str"):
        if text.startswith(f"list[{kind}]"):
            return kind.upper(), True
        if text.startswith(kind):
            return kind.upper(), False
    return "VALUE", False


def build_trl_parser() -> Any:
    """TRL's ``trl sft`` parser with the ``ctx_*`` options added.

    Returns:
        A ``trl.TrlParser`` over the dataclasses of ``trl.scripts.sft.make_parser()`` (in TRL's order) followed by
        :class:`~ctx_callback.cli.sft_args.ContextRelianceArguments`.
    """
    from trl import TrlParser
    from trl.scripts import sft

    trl_types = sft.make_parser().dataclass_types
    return TrlParser([*trl_types, ContextRelianceArguments], prog="ctx-callback sft")


def _checked(kwargs: dict[str, Any]) -> None:
    """Build the callback without a trainer: it validates every value and loads the probes, before any model."""
    from .. import ContextRelianceCallback

    try:
        ContextRelianceCallback(None, **kwargs)
    except CtxCallbackError as err:
        message = " ".join(str(err).split())
        named = [name for name in kwargs if message.startswith(name)]
        if not named and isinstance(err, (ProbeSourceError, ProbeFormatError, UnsafeFileError)):
            named = ["probes"]  # the probe loaders name the file or suite, not the argument
        where = f"--{PREFIX}{named[0]}" if named else "a ctx_* option"
        raise UsageError(f"{where}: {message} (the option or recipe key ctx_<name> is ContextRelianceCallback's "
                         "argument <name>)") from err


@contextlib.contextmanager
def callback_added(options: dict[str, Any]) -> Iterator[list[Any]]:
    """Within the block, ``trl.SFTTrainer(...)`` builds TRL's trainer and adds a ``ContextRelianceCallback`` to it.

    TRL's script imports the trainer inside ``main`` (``from trl import SFTTrainer``), so replacing the package
    attribute for the call is enough; it is restored on exit, also on errors.

    Args:
        options: The callback's keyword arguments (:meth:`ContextRelianceArguments.callback_kwargs`).

    Yields:
        A list that receives each ``(trainer, callback)`` pair built in the block.
    """
    import trl

    from .. import ContextRelianceCallback

    trainer_class = trl.SFTTrainer
    built: list[Any] = []

    def build_with_callback(*args: Any, **kwargs: Any) -> Any:
        trainer = trainer_class(*args, **kwargs)
        callback = ContextRelianceCallback(trainer, **options)
        trainer.add_callback(callback)
        built.append((trainer, callback))
        return trainer

    trl.SFTTrainer = build_with_callback
    try:
        yield built
    finally:
        trl.SFTTrainer = trainer_class


def _refuse_unknown(cli_remaining: list[str], config_remaining: list[str]) -> None:
    if cli_remaining:
        raise UsageError(
            f"unknown options {' '.join(cli_remaining)}: neither `trl sft` options nor ctx_* options (see "
            "ctx-callback sft --trl-help). `trl sft` forwards such options to `accelerate launch`; ctx-callback sft "
            "trains in this process: put launcher options before the module instead: `accelerate launch "
            "--num_processes 2 -m ctx_callback.cli sft ...` (for --accelerate_config NAME: accelerate launch "
            "--config_file FILE).")
    if config_remaining:
        keys = sorted({arg[2:] for arg in config_remaining if arg.startswith("--")})
        warn(f"recipe keys {', '.join(keys)} are neither `trl sft` nor ctx_* options: ignored, as TRL's training "
             "script ignores them (`trl sft` passes them to `accelerate launch`; to launch several processes, run "
             "`accelerate launch [options] -m ctx_callback.cli sft ...`).")


def run(args: argparse.Namespace) -> int:
    """Parse with TRL's parser, check the ``ctx_*`` options, then run TRL's ``sft.main`` with the callback added.

    Args:
        args: ``args.trl_args`` (everything but this command's own flags), ``args.trl_help``.

    Returns:
        0 when training finished (also after an early stop at the peak).

    Raises:
        UsageError: Unknown command-line options; a bad ``ctx_*`` value (before any model is loaded); TRL's script
            returning without having built its trainer through ``trl.SFTTrainer`` (a TRL version this command does
            not support).
    """
    parser = build_trl_parser()
    if args.trl_help:
        parser.print_help()
        return EXIT_OK
    try:
        *parsed, config_remaining, cli_remaining = parser.parse_args_and_config(
            args.trl_args, return_remaining_strings=True, separate_remaining_strings=True)
    except (OSError, ValueError) as err:  # a missing or malformed recipe, a value SFTConfig refuses
        raise UsageError(f"trl sft's parser refused the arguments: {err}") from err
    script_args, training_args, model_args, dataset_args, ctx_args = parsed
    _refuse_unknown(cli_remaining, config_remaining)
    options = ctx_args.callback_kwargs()
    _checked(options)

    from trl.scripts import sft

    with callback_added(options) as built:
        sft.main(script_args, training_args, model_args, dataset_args)
    if not built:
        import trl

        raise UsageError(f"trl {trl.__version__}'s sft script trained without building its trainer through "
                         "trl.SFTTrainer, so the callback was never attached; ctx-callback sft supports the trl "
                         "versions docs/trl_cli.md lists.")
    return EXIT_OK
