"""Pieces the ``ctx-callback`` commands share: output, option types, probe options, probe/tokenizer/model loading.

Everything here is a thin command-line layer over the core: monitor names are parsed by
:func:`ctx_callback.monitor.parse_monitor`, probe variants come from :data:`ctx_callback.encoding.ALL_VARIANTS`,
metric labels and directions from :data:`ctx_callback.metrics.METRICS`, models, adapters and tokenizers are loaded by
:mod:`ctx_callback.model_loading` (its :class:`~ctx_callback.errors.ModelLoadError` worded here as a
:class:`~ctx_callback.errors.UsageError` that names the option to pass). Bad input is raised as
:class:`~ctx_callback.errors.UsageError` (or any other :class:`~ctx_callback.errors.CtxCallbackError`), which
:func:`ctx_callback.cli.main` turns into exit code 2.

Module-level imports stay free of torch and transformers (``--help`` must be fast): those are imported inside the
functions that need them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import model_loading
from ..checkpoints import checkpoint_dirs
from ..encoding import ALL_VARIANTS, DEFAULT_VARIANTS
from ..errors import ConfigurationError, CtxCallbackError, ModelLoadError, UsageError, quote_error
from ..metrics import METRIC_PREFIX as PREFIX
from ..model_loading import check_loading_info, has_tokenizer, max_positions_of
from ..monitor import Monitor, parse_monitor

__all__ = [
    "Checkpoint",
    "EPILOG",
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_USAGE",
    "HelpFormatter",
    "ModelLoader",
    "SCAN_CSV",
    "SCAN_FORMAT",
    "SCAN_JSON",
    "adapter_base",
    "add_debug_option",
    "add_probe_options",
    "add_subparser",
    "build_scorer",
    "check_loading_info",
    "eprint",
    "families_in",
    "find_checkpoints",
    "find_peak",
    "format_value",
    "has_tokenizer",
    "load_model_config",
    "load_probes_from_args",
    "load_tokenizer",
    "max_positions_of",
    "one_line",
    "parse_monitor_option",
    "positive_float",
    "positive_int",
    "read_json",
    "resolve_device",
    "resolve_name",
    "torch_dtype",
    "warn",
]

#: Exit codes (stable, for scripts); re-exported by :mod:`ctx_callback.cli`.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

#: Files ``scan`` writes (and ``plot`` reads) and the format tag of the JSON.
SCAN_JSON = "ctx_reliance_scan.json"
SCAN_CSV = "ctx_reliance_scan.csv"
SCAN_FORMAT = "ctx_callback.scan/1"

WEIGHT_DTYPES = ("float32", "bfloat16", "float16")
#: ``--probe-dtype`` (the autocast dtype of the forward passes; ``ctx_callback.scoring.PROBE_DTYPES``).
PROBE_DTYPE_CHOICES = ("bfloat16", "float16")

EPILOG = """exit codes:
  0  success
  1  unexpected failure (bug, out of memory, missing optional dependency, every checkpoint failed)
  2  usage error or bad input (missing directory, no checkpoints, unknown probe suite, bad probe file, ...)
errors go to stderr as one line; --debug shows the traceback."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's layout and shows real defaults (not None/False, not when the help already says)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" not in text and action.default not in (None, False, argparse.SUPPRESS)
                and action.option_strings and action.nargs != 0):
            text += " (default: %(default)s)"
        return text


def eprint(*parts: Any) -> None:
    """Print to stderr (progress lines, warnings, errors), flushed at once."""
    print(*parts, file=sys.stderr, flush=True)


def warn(message: str) -> None:
    """Print ``ctx-callback: warning: MESSAGE`` to stderr."""
    eprint(f"ctx-callback: warning: {message}")


def one_line(err: BaseException) -> str:
    """An exception's message on one line, shortened (:func:`ctx_callback.errors.quote_error`)."""
    return quote_error(err)


# ----------------------------------------------------------------------------------------------------------------
# Argument parsing
# ----------------------------------------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _variants(text: str) -> tuple[str, ...]:
    """``--variants``: a comma list of :data:`~ctx_callback.encoding.ALL_VARIANTS`, returned in their order."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in ALL_VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown variant(s) {unknown or [text]}; choose from {','.join(ALL_VARIANTS)}")
    if "context" not in names:
        raise argparse.ArgumentTypeError("the 'context' variant is required (it holds the knowledge conflict)")
    return tuple(v for v in ALL_VARIANTS if v in names)


def add_subparser(subparsers: Any, name: str, *, help: str, description: str) -> argparse.ArgumentParser:
    """Register one command's subparser with the shared formatter and exit-code epilog.

    Args:
        subparsers: The object ``ArgumentParser.add_subparsers()`` returned.
        name: The command's name (its module's ``NAME``).
        help: One line for the top-level ``--help``.
        description: The paragraph at the top of ``ctx-callback NAME --help``.

    Returns:
        The new subparser, to add the command's own options to.
    """
    return subparsers.add_parser(name, formatter_class=HelpFormatter, epilog=EPILOG, help=help,
                                 description=description)


def add_debug_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--debug`` (print tracebacks), which every command has."""
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def add_probe_options(parser: argparse.ArgumentParser) -> None:
    """Add the probe and model options ``scan`` and ``probe`` share (as in ``ContextRelianceCallback``).

    Args:
        parser: A command's subparser; two argument groups are added to it.
    """
    g = parser.add_argument_group("probe options (as in ContextRelianceCallback)")
    g.add_argument("--probes", default="all", metavar="SUITE|PATH",
                   help="built-in suite (world_facts, biographies, quotes, all, or a '+'-joined list such as "
                        "world_facts+quotes), a public benchmark preset (nq_swap, memotrap, faitheval_counterfactual, "
                        "conflictbank, ...; needs the Hub or CTX_CALLBACK_PRESET_DIR), a .json/.jsonl probe file or "
                        "directory, or a Hub dataset id")
    g.add_argument("--limit-per-family", type=positive_int, default=None, metavar="N",
                   help="use at most N probes per family (spread evenly); default: all")
    g.add_argument("--prompt-format", default="chat", metavar="FORMAT",
                   help="'chat' (the tokenizer's chat template), 'alpaca', 'tulu', 'plain', or a template string "
                        "with {context} and {question}")
    g.add_argument("--system-prompt", default=None, help="chat format: system message (use your training one)")
    g.add_argument("--mode", choices=("loglik", "generate"), default="loglik",
                   help="log-likelihood comparison of the two answers, or greedy generation + answer matching")
    g.add_argument("--variants", type=_variants, default=",".join(DEFAULT_VARIANTS), metavar="LIST",
                   help="comma list of probe rows to score, from " + ",".join(ALL_VARIANTS)
                   + " (default: %(default)s)")
    g.add_argument("--monitor", default=None, metavar="METRIC",
                   help="metric that defines the peak, e.g. counterfactual_accuracy or "
                        "world_facts/counterfactual_accuracy (parametric_accuracy: lower is better); default: "
                        "counterfactual_probability in loglik mode, counterfactual_accuracy in generate mode")
    g = parser.add_argument_group("model options")
    g.add_argument("--tokenizer", default=None, metavar="PATH|ID",
                   help="tokenizer to render probes with; default: the model's own tokenizer files, else the base "
                        "model named in a PEFT adapter_config.json")
    g.add_argument("--base-model", default=None, metavar="PATH|ID",
                   help="PEFT adapters: base model to apply them to; default: base_model_name_or_path from "
                        "adapter_config.json")
    g.add_argument("--dtype", choices=WEIGHT_DTYPES, default="float32", help="weights dtype for scoring")
    g.add_argument("--probe-dtype", choices=PROBE_DTYPE_CHOICES, default=None,
                   help="run the forward passes under torch.autocast in this dtype, the weights left in --dtype "
                        "(as the callback's probe_dtype); float16 needs a CUDA --device; default: no autocast")
    g.add_argument("--device", default=None, help="torch device; default: cuda if available, else cpu")
    g.add_argument("--batch-tokens", type=positive_int, default=8192, metavar="N",
                   help="padded tokens per forward pass (lower it on out-of-memory errors)")


def parse_monitor_option(monitor: str | None, mode: str | None, variants: Sequence[str] | None) -> Monitor:
    """``--monitor`` parsed by the core's :func:`~ctx_callback.monitor.parse_monitor`.

    Args:
        monitor: The option's value (``counterfactual_accuracy``, ``world_facts/parametric_accuracy``, a full key);
            ``None``: the default monitor of ``mode`` (:func:`~ctx_callback.monitor.default_monitor`).
        mode: The scoring mode, or ``None`` to accept a metric of either mode (``plot``).
        variants: The scored variants, or ``None`` to skip the variant check (``plot``).

    Returns:
        The parsed :class:`~ctx_callback.monitor.Monitor` (key, metric, family, direction).

    Raises:
        UsageError: The core's message, prefixed with ``--monitor: ``.
    """
    try:
        return parse_monitor(monitor, mode, variants)
    except ConfigurationError as err:
        raise UsageError(f"--monitor: {err}") from None


# ----------------------------------------------------------------------------------------------------------------
# Probes, tokenizers, models
# ----------------------------------------------------------------------------------------------------------------


def load_probes_from_args(args: argparse.Namespace) -> list[Any]:
    """The probes ``--probes`` / ``--limit-per-family`` name (core errors pass through to exit code 2)."""
    from ..probes import load_probes

    try:
        return load_probes(args.probes, limit_per_family=args.limit_per_family)
    except CtxCallbackError:
        raise
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(one_line(err)) from None


def resolve_device(device: str | None) -> str:
    import torch

    if device:
        try:
            torch.device(device)
        except (RuntimeError, ValueError) as err:
            raise UsageError(f"invalid --device {device!r}: {one_line(err)}") from None
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resolve_name(name_or_path: str) -> str:
    """The offline SmolLM2 alias as its cache directory; anything else as is
    (:func:`~ctx_callback.models.resolve_model_path`)."""
    from ..models import resolve_model_path

    return resolve_model_path(name_or_path)


def adapter_base(path: Path, override: str | None) -> str | None:
    """Base model of a PEFT adapter directory (``--base-model`` wins), or None when ``path`` is no adapter
    (:func:`ctx_callback.model_loading.adapter_base`).

    Raises:
        UsageError: The adapter config is unreadable or names no base model (and ``--base-model`` is not given).
    """
    try:
        return model_loading.adapter_base(path, override, hint="pass --base-model")
    except ModelLoadError as err:
        raise UsageError(str(err)) from None


def load_tokenizer(source: str) -> Any:
    """The tokenizer ``source`` names (:func:`ctx_callback.model_loading.load_tokenizer`).

    Raises:
        UsageError: It does not load; the message says to pass ``--tokenizer``.
    """
    try:
        return model_loading.load_tokenizer(source)
    except ModelLoadError as err:
        raise UsageError(f"{err}; pass --tokenizer") from None


def load_model_config(source: str, name: str | None = None) -> Any:
    """The config of the model ``source`` names (:func:`ctx_callback.model_loading.load_model_config`).

    Raises:
        UsageError: ``could not load model NAME: ...``.
    """
    try:
        return model_loading.load_model_config(source, name)
    except ModelLoadError as err:
        raise UsageError(str(err)) from None


class ModelLoader(model_loading.ModelLoader):
    """The library's :class:`~ctx_callback.model_loading.ModelLoader`, a broken adapter config reported as a
    :class:`~ctx_callback.errors.UsageError` that names ``--base-model`` (``scan`` skips that checkpoint)."""

    def base_model_of(self, path: Path) -> str | None:
        return adapter_base(path, self.base_override)


def build_scorer(args: argparse.Namespace, probes: list[Any], tokenizer: Any, max_length: int | None) -> Any:
    """The scorer the probe options describe.

    Raises:
        ConfigurationError: ``--probe-dtype float16`` without a CUDA ``--device`` (checked here, before any model
            is loaded), or another bad scorer setting.
        UsageError: Other bad input the scorer rejects.
    """
    from ..scoring import ProbeScorer, check_probe_dtype_device

    probe_dtype = getattr(args, "probe_dtype", None)
    if probe_dtype is not None:
        check_probe_dtype_device(probe_dtype, resolve_device(getattr(args, "device", None)))
    try:
        return ProbeScorer(
            probes, tokenizer, args.prompt_format, mode=args.mode, variants=args.variants,
            system_prompt=args.system_prompt, max_batch_tokens=args.batch_tokens, max_length=max_length,
            probe_dtype=probe_dtype,
        )
    except CtxCallbackError:
        raise
    except (ValueError, TypeError) as err:
        raise UsageError(one_line(err)) from None


# ----------------------------------------------------------------------------------------------------------------
# Results: values, families, peaks, files
# ----------------------------------------------------------------------------------------------------------------


def format_value(value: Any, width: int = 6) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-".rjust(width)
    return f"{value:.3f}".rjust(width)


def families_in(metrics: dict[str, float]) -> list[str]:
    """Probe families that have per-family keys (``ctx_reliance/<family>/<metric>``) in ``metrics``, sorted."""
    found = set()
    for key in metrics:
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == PREFIX:
            found.add(parts[1])
    return sorted(found)


def find_peak(rows: list[dict[str, Any]], monitor_key: str, greater_is_better: bool) -> dict[str, Any] | None:
    """The scan row where ``monitor_key`` is best (the first one on ties), as the scan JSON's ``peak`` entry."""
    best = None
    for row in rows:
        value = row["metrics"].get(monitor_key)
        if value is None or not math.isfinite(value):
            continue
        if best is None or (value > best[1] if greater_is_better else value < best[1]):
            best = (row, value)
    if best is None:
        return None
    return {"checkpoint": best[0]["checkpoint"], "step": best[0]["step"], "value": best[1],
            "path": best[0]["path"]}


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"cannot read {path} as JSON: {one_line(err)}") from None


@dataclass
class Checkpoint:
    name: str
    step: int
    path: Path
    signature: list[list[Any]] = field(default_factory=list)


def find_checkpoints(output_dir: Path) -> list[Checkpoint]:
    """The ``checkpoint-<step>`` directories of a training output directory.

    Args:
        output_dir: A Trainer ``output_dir``.

    Returns:
        One entry (name, step, path) per ``checkpoint-<step>`` directory, sorted by step.
    """
    return [Checkpoint(name, step, output_dir / name) for step, name in checkpoint_dirs(output_dir)]
