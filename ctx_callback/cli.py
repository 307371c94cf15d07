"""``ctx-callback``: score saved checkpoints, plot reliance curves and probe single models from the command line.

Commands::

    ctx-callback scan OUTPUT_DIR [options]   # score every checkpoint-* of a training run (full models and PEFT
                                             # adapters), print a table, name the peak, write CSV + JSON
    ctx-callback plot INPUT [--output PNG]   # reliance curves from trainer_state.json, an output dir or scan JSON
    ctx-callback probe MODEL [options]       # score one model (a path, a Hub id or "smollm2-135m-instruct")

``scan`` uses the same probes, prompt formats and scoring engine as :class:`~ctx_callback.ContextRelianceCallback`.
It is resumable: results are kept in ``ctx_reliance_scan.json`` keyed by checkpoint name and a fingerprint of the
probe settings (the tokenized probes, the mode and the dtype), so a re-run scores only new (or re-saved) checkpoints.
A checkpoint that fails to load or score is skipped with a warning and is not recorded, so the next run retries it.

Exit codes (stable, for scripts):

    0  success (``scan``: also when some broken checkpoints were skipped, as long as one was scored)
    1  unexpected failure (a bug, out of memory, a missing optional dependency, every checkpoint failing, ...)
    2  usage error or bad input: unknown option, missing directory, no checkpoints, unknown probe suite,
       malformed probe file, no tokenizer found, nothing to plot

Errors are printed to stderr as one line ``ctx-callback: error: ...`` (no traceback; pass ``--debug`` for one).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "SCAN_CSV", "SCAN_JSON", "build_parser", "main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

SCAN_JSON = "ctx_reliance_scan.json"
SCAN_CSV = "ctx_reliance_scan.csv"
PLOT_FILE = "ctx_reliance.png"
SCAN_FORMAT = "ctx_callback.scan/1"
from .metrics import METRIC_PREFIX as PREFIX  # noqa: E402 (numpy only; keeps --help free of torch)

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_VARIANTS = ("context", "closed_book", "aligned")
_DTYPES = ("float32", "bfloat16", "float16")
_WEIGHT_FILES = re.compile(r"^(model.*\.safetensors|model\.safetensors\.index\.json|pytorch_model.*\.bin|"
                           r"adapter_model\.(safetensors|bin))$")
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json")
#: Short column names of the printed tables, in display order.
_SHORT = {
    "counterfactual_accuracy": "cf", "parametric_accuracy": "par", "closed_book_accuracy": "cb",
    "aligned_accuracy": "al", "counterfactual_probability": "p_cf", "logprob_margin": "margin",
    "context_lift": "lift", "both_rate": "both", "neither_rate": "neither", "memorization_ratio": "mem",
}
_EPILOG = """exit codes:
  0  success
  1  unexpected failure (bug, out of memory, missing optional dependency, every checkpoint failed)
  2  usage error or bad input (missing directory, no checkpoints, unknown probe suite, bad probe file, ...)
errors go to stderr as one line; --debug shows the traceback."""


class CliError(Exception):
    """Bad input or usage: reported as one line on stderr, exit code 2."""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's layout and shows real defaults (not None/False, not when the help already says)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" not in text and action.default not in (None, False, argparse.SUPPRESS)
                and action.option_strings and action.nargs != 0):
            text += " (default: %(default)s)"
        return text


def _eprint(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


def _warn(message: str) -> None:
    _eprint(f"ctx-callback: warning: {message}")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 600 else text[:597] + "..."


# ----------------------------------------------------------------------------------------------------------------
# Argument parsing
# ----------------------------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _variants(text: str) -> tuple[str, ...]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in _VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {unknown or [text]}; choose from {','.join(_VARIANTS)}")
    if "context" not in names:
        raise argparse.ArgumentTypeError("the 'context' variant is required (it holds the knowledge conflict)")
    return tuple(v for v in _VARIANTS if v in names)


def _add_probe_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("probe options (as in ContextRelianceCallback)")
    g.add_argument("--probes", default="all", metavar="SUITE|PATH",
                   help="built-in suite (world_facts, biographies, quotes, all, or a '+'-joined list such as "
                        "world_facts+quotes), a .json/.jsonl probe file or directory, or a Hub dataset id")
    g.add_argument("--limit-per-family", type=_positive_int, default=None, metavar="N",
                   help="use at most N probes per family (spread evenly); default: all")
    g.add_argument("--prompt-format", default="chat", metavar="FORMAT",
                   help="'chat' (the tokenizer's chat template), 'alpaca', 'tulu', 'plain', or a template string "
                        "with {context} and {question}")
    g.add_argument("--system-prompt", default=None, help="chat format: system message (use your training one)")
    g.add_argument("--mode", choices=("loglik", "generate"), default="loglik",
                   help="log-likelihood comparison of the two answers, or greedy generation + answer matching")
    g.add_argument("--variants", type=_variants, default=",".join(_VARIANTS), metavar="LIST",
                   help="comma list of probe rows to score, from context,closed_book,aligned")
    g.add_argument("--monitor", default="counterfactual_accuracy", metavar="METRIC",
                   help="metric that defines the peak, e.g. counterfactual_accuracy or "
                        "world_facts/counterfactual_accuracy (parametric_accuracy: lower is better)")
    g = parser.add_argument_group("model options")
    g.add_argument("--tokenizer", default=None, metavar="PATH|ID",
                   help="tokenizer to render probes with; default: the model's own tokenizer files, else the base "
                        "model named in a PEFT adapter_config.json")
    g.add_argument("--base-model", default=None, metavar="PATH|ID",
                   help="PEFT adapters: base model to apply them to; default: base_model_name_or_path from "
                        "adapter_config.json")
    g.add_argument("--dtype", choices=_DTYPES, default="float32", help="weights dtype for scoring")
    g.add_argument("--device", default=None, help="torch device; default: cuda if available, else cpu")
    g.add_argument("--batch-tokens", type=_positive_int, default=8192, metavar="N",
                   help="padded tokens per forward pass (lower it on out-of-memory errors)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctx-callback", formatter_class=_Formatter, epilog=_EPILOG,
        description="Measure context reliance (counterfactual probes) of saved checkpoints and plot it.",
    )
    parser.add_argument("--version", action="version", version="%(prog)s " + _version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    scan = sub.add_parser(
        "scan", formatter_class=_Formatter, epilog=_EPILOG,
        help="score every checkpoint-* of a training output directory",
        description="Score every checkpoint-* in OUTPUT_DIR (full models and PEFT adapter checkpoints) with the "
                    "callback's probes and engine, print a table, name the checkpoint at peak reliance and write "
                    f"{SCAN_CSV} and {SCAN_JSON}. Resumable: checkpoints already scored with the same probe "
                    "settings are read from the JSON, not scored again; broken checkpoints are skipped with a "
                    "warning and retried on the next run.",
    )
    scan.add_argument("output_dir", metavar="OUTPUT_DIR", help="training output directory holding checkpoint-*")
    scan.add_argument("--output-dir", dest="results_dir", default=None, metavar="DIR",
                      help=f"where to write {SCAN_CSV} and {SCAN_JSON}; default: OUTPUT_DIR")
    scan.add_argument("--rescore", action="store_true", help="ignore cached results and score every checkpoint")
    _add_probe_options(scan)
    scan.add_argument("--debug", action="store_true", help="show tracebacks")

    plot = sub.add_parser(
        "plot", formatter_class=_Formatter, epilog=_EPILOG,
        help="draw reliance curves to a PNG",
        description="Draw counterfactual, parametric and closed-book accuracy against the step, with the peak "
                    "and stop steps marked and the training loss on a second axis. INPUT is a trainer_state.json, "
                    f"a scan results JSON ({SCAN_JSON}) or a training output directory (its trainer_state.json, "
                    "else the newest checkpoint-*/trainer_state.json, else its scan results).",
    )
    plot.add_argument("input", metavar="INPUT", help="trainer_state.json | OUTPUT_DIR | scan results .json")
    plot.add_argument("--output", "-o", default=None, metavar="PNG",
                      help=f"PNG to write; default: {PLOT_FILE} next to INPUT (inside it for a directory)")
    plot.add_argument("--monitor", default="counterfactual_accuracy", metavar="METRIC",
                      help="monitored metric (labels the smoothed curve; picks the peak of scan results)")
    plot.add_argument("--title", default="Context reliance during training", help="plot title")
    plot.add_argument("--width", type=_positive_float, default=8.0, help="figure width in inches")
    plot.add_argument("--height", type=_positive_float, default=4.5, help="figure height in inches")
    plot.add_argument("--dpi", type=_positive_int, default=100, help="dots per inch (PNG pixels = inches x dpi)")
    plot.add_argument("--debug", action="store_true", help="show tracebacks")

    probe = sub.add_parser(
        "probe", formatter_class=_Formatter, epilog=_EPILOG,
        help="score one model and print metrics per family",
        description="Score one model (a checkpoint directory, a PEFT adapter directory, a Hub id or the offline "
                    "alias smollm2-135m-instruct) and print the metrics per probe family.",
    )
    probe.add_argument("model", metavar="MODEL", help="model directory, PEFT adapter directory or Hub id")
    probe.add_argument("--json", action="store_true", help="print the metrics as one JSON object instead of a table")
    _add_probe_options(probe)
    probe.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("ctx_callback")
    except Exception:  # noqa: BLE001 - not installed (running from a checkout)
        return "unknown"


# ----------------------------------------------------------------------------------------------------------------
# Shared helpers: monitor, probes, models
# ----------------------------------------------------------------------------------------------------------------


def parse_monitor(monitor: str, mode: str, variants: Sequence[str]) -> tuple[str, bool]:
    """``(full metric key, greater_is_better)`` for a user-facing monitor name (the callback's rules)."""
    from .monitor import parse_monitor as parse

    try:
        parsed = parse(monitor, mode, variants)
    except ValueError as err:
        raise CliError(f"--monitor: {err}") from None
    return parsed.key, parsed.greater_is_better


def _load_probes(args: argparse.Namespace) -> list[Any]:
    from .probes import ProbeFormatError, load_probes

    try:
        return load_probes(args.probes, limit_per_family=args.limit_per_family)
    except (ProbeFormatError, ValueError, FileNotFoundError) as err:
        raise CliError(_one_line(err)) from None


def _resolve_device(device: str | None) -> str:
    import torch

    if device:
        try:
            torch.device(device)
        except (RuntimeError, ValueError) as err:
            raise CliError(f"invalid --device {device!r}: {_one_line(err)}") from None
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _resolve_name(name_or_path: str) -> str:
    from .models import resolve_model_path

    return resolve_model_path(name_or_path)


def _has_tokenizer(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in _TOKENIZER_FILES)


def _adapter_base(path: Path, override: str | None) -> str | None:
    """Base model of a PEFT adapter directory (``--base-model`` wins), or None when ``path`` is no adapter."""
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        return None
    if override:
        return override
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RuntimeError(f"unreadable {config_file}: {_one_line(err)}") from None
    base = config.get("base_model_name_or_path")
    if not base:
        raise RuntimeError(f"{config_file} names no base_model_name_or_path; pass --base-model")
    return str(base)


def _load_tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(_resolve_name(source))
    except Exception as err:  # noqa: BLE001 - reported as bad input
        raise CliError(f"could not load a tokenizer from {source!r} ({type(err).__name__}: {_one_line(err)}); "
                       "pass --tokenizer") from None


def _max_positions(source: str | None) -> int | None:
    """The model's maximum length (what the callback passes to the scorer), or None when unknown."""
    if source is None:
        return None
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(_resolve_name(source))
    except Exception:  # noqa: BLE001 - only a length check: skip it
        return None
    text_config = getattr(config, "get_text_config", lambda: config)()
    value = getattr(text_config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) else None


def _build_scorer(args: argparse.Namespace, probes: list[Any], tokenizer: Any, max_length: int | None) -> Any:
    from .probes import ProbeFormatError
    from .scoring import ProbeScorer

    try:
        return ProbeScorer(
            probes, tokenizer, args.prompt_format, mode=args.mode, variants=args.variants,
            system_prompt=args.system_prompt, max_batch_tokens=args.batch_tokens, max_length=max_length,
        )
    except (ProbeFormatError, ValueError, TypeError) as err:
        raise CliError(_one_line(err)) from None


class _ModelLoader:
    """Loads full checkpoints and PEFT adapters; keeps one base model around to swap adapters on it."""

    def __init__(self, dtype: Any, device: str, base_override: str | None = None) -> None:
        self.dtype = dtype
        self.device = device
        self.base_override = base_override
        self._base_name: str | None = None
        self._base: Any = None

    def _from_pretrained(self, name: str) -> Any:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own progress line per checkpoint is enough

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecation chatter between library versions
            model = AutoModelForCausalLM.from_pretrained(_resolve_name(name), dtype=self.dtype)
        return model.to(self.device).eval()

    def load(self, path: str) -> tuple[Any, str]:
        """``(model, kind)`` where kind is ``"full"`` or ``"peft"``. Call :meth:`release` after scoring."""
        local = Path(path)
        base = _adapter_base(local, self.base_override) if local.is_dir() else None
        if base is None:
            return self._from_pretrained(path), "full"
        from peft import PeftModel

        if self._base is None or self._base_name != base:
            self._base = None
            self._base = self._from_pretrained(base)
            self._base_name = base
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                model = PeftModel.from_pretrained(self._base, path, is_trainable=False)
        except Exception:
            self._base = None  # the base may hold half-injected adapter layers: reload it next time
            raise
        return model.to(self.device).eval(), "peft"

    def release(self, model: Any, kind: str) -> None:
        """Undo an adapter so the cached base model is clean for the next one (reload it if that fails)."""
        if kind != "peft":
            return
        try:
            self._base = model.unload()
        except Exception:  # noqa: BLE001 - correctness first: reload the base next time
            self._base = None


def _format_value(value: Any, width: int = 6) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-".rjust(width)
    return f"{value:.3f}".rjust(width)


def _families(metrics: dict[str, float]) -> list[str]:
    found = set()
    for key in metrics:
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == PREFIX:
            found.add(parts[1])
    return sorted(found)


def _table_metrics(metrics_rows: Iterable[dict[str, float]], monitor_key: str) -> list[str]:
    """Metric names to show: accuracies (and margin) present in the rows, plus the monitored one."""
    present = set()
    for metrics in metrics_rows:
        present.update(k.split("/")[-1] for k in metrics)
    shown = [m for m in ("counterfactual_accuracy", "parametric_accuracy", "closed_book_accuracy",
                         "aligned_accuracy") if m in present]
    monitored = monitor_key.split("/")[-1]
    if monitored not in shown and monitored in present:
        shown.append(monitored)
    return shown


# ----------------------------------------------------------------------------------------------------------------
# scan
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _Checkpoint:
    name: str
    step: int
    path: Path
    signature: list[list[Any]] = field(default_factory=list)


def find_checkpoints(output_dir: Path) -> list[_Checkpoint]:
    """``checkpoint-<step>`` directories of ``output_dir``, sorted by step."""
    found = []
    for entry in output_dir.iterdir():
        match = _CHECKPOINT_RE.match(entry.name)
        if match and entry.is_dir():
            found.append(_Checkpoint(entry.name, int(match.group(1)), entry))
    return sorted(found, key=lambda c: c.step)


def _weights_signature(path: Path) -> list[list[Any]]:
    """Name, size and mtime of the weight files: a re-saved checkpoint (new training run) is scored again."""
    out = []
    for entry in sorted(path.iterdir(), key=lambda e: e.name):
        if _WEIGHT_FILES.match(entry.name) and entry.is_file():
            stat = entry.stat()
            out.append([entry.name, stat.st_size, stat.st_mtime_ns])
    return out


def _fingerprint(scorer: Any, args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """A hash of everything that determines the scores: the tokenized probes, mode, dtype (and generation length)."""
    encoded = scorer.encoded
    digest = hashlib.sha256()
    settings = {
        "probes": args.probes, "limit_per_family": args.limit_per_family, "prompt_format": args.prompt_format,
        "system_prompt": args.system_prompt, "mode": args.mode, "variants": list(encoded.variants),
        "dtype": args.dtype, "num_probes": len(encoded.probes),
    }
    exact = {"mode": args.mode, "dtype": args.dtype, "variants": list(encoded.variants),
             "max_new_tokens": scorer.max_new_tokens if args.mode == "generate" else None}
    digest.update(json.dumps(exact, sort_keys=True).encode())
    for probe in encoded.probes:
        digest.update(json.dumps([probe.id, probe.family, probe.counterfactual_answer, probe.parametric_answer,
                                  list(probe.counterfactual_aliases), list(probe.parametric_aliases)]).encode())
    for item in encoded.items:
        digest.update(json.dumps([item.probe_index, item.variant, item.prompt_ids, item.counterfactual_ids,
                                  item.parametric_ids]).encode())
    return digest.hexdigest()[:16], settings


def _read_scan_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        _warn(f"ignoring unreadable {path} ({_one_line(err)}); all checkpoints will be scored")
        return {}
    if not isinstance(data, dict) or data.get("format") != SCAN_FORMAT:
        _warn(f"ignoring {path}: not a ctx-callback scan file")
        return {}
    return data


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _find_peak(rows: list[dict[str, Any]], monitor_key: str, greater_is_better: bool) -> dict[str, Any] | None:
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


def _metric_columns(rows: list[dict[str, Any]]) -> list[str]:
    keys = {k for row in rows for k in row["metrics"]}
    overall = sorted(k for k in keys if k.count("/") == 1)
    return overall + sorted(k for k in keys if k.count("/") == 2)


def _write_csv(path: Path, rows: list[dict[str, Any]], peak: dict[str, Any] | None) -> None:
    columns = _metric_columns(rows)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["checkpoint", "step", "kind", "is_peak", "seconds", *columns])
        for row in rows:
            is_peak = int(peak is not None and peak["checkpoint"] == row["checkpoint"])
            writer.writerow([row["checkpoint"], row["step"], row["kind"], is_peak, repr(float(row["seconds"])),
                             *[repr(float(row["metrics"].get(c, math.nan))) for c in columns]])
    os.replace(tmp, path)


def _print_scan_table(rows: list[dict[str, Any]], monitor_key: str, peak: dict[str, Any] | None) -> None:
    metrics = _table_metrics((r["metrics"] for r in rows), monitor_key)
    families = _families(rows[0]["metrics"]) if rows else []
    groups = ([None] if len(families) != 1 else []) + families
    name_width = max(len("checkpoint"), *(len(r["checkpoint"]) for r in rows))
    group_width = 7 * len(metrics) - 1
    head1 = f"{'':>6}  {'':<{name_width}}"
    head2 = f"{'step':>6}  {'checkpoint':<{name_width}}"
    for group in groups:
        label = "all" if group is None else group
        head1 += " | " + (label if len(label) <= group_width else label[: group_width - 1] + "~").center(group_width)
        head2 += " | " + " ".join(_SHORT.get(m, m[:6]).rjust(6) for m in metrics)
    print(head1)
    print(head2)
    print("-" * len(head2))
    for row in rows:
        mark = "*" if peak is not None and row["checkpoint"] == peak["checkpoint"] else " "
        line = f"{row['step']:>6}{mark} {row['checkpoint']:<{name_width}}"
        for group in groups:
            values = [row["metrics"].get(f"{PREFIX}/{m}" if group is None else f"{PREFIX}/{group}/{m}")
                      for m in metrics]
            line += " | " + " ".join(_format_value(v) for v in values)
        print(line)
    legend = ", ".join(f"{_SHORT.get(m, m)} = {m}" for m in metrics)
    print(f"({legend}; * = peak of {monitor_key})")


def cmd_scan(args: argparse.Namespace) -> int:
    output_dir = Path(args.output_dir).expanduser()
    if not output_dir.exists():
        raise CliError(f"no such directory: {output_dir}")
    if not output_dir.is_dir():
        raise CliError(f"not a directory: {output_dir}")
    checkpoints = find_checkpoints(output_dir)
    if not checkpoints:
        raise CliError(f"no checkpoint-* directories in {output_dir} (train with save_strategy='steps')")
    results_dir = Path(args.results_dir).expanduser() if args.results_dir else output_dir
    monitor_key, greater_is_better = parse_monitor(args.monitor, args.mode, args.variants)
    probes = _load_probes(args)
    families = sorted({p.family for p in probes})
    if monitor_key.count("/") == 2 and monitor_key.split("/")[1] not in families:
        raise CliError(f"--monitor {args.monitor!r} names a family the probes lack; families: {families}")
    device = _resolve_device(args.device)

    # One tokenizer (and one scorer: tokenization is cached) for the whole run.
    tokenizer_source = args.tokenizer
    model_source = None  # for the maximum length
    for ckpt in checkpoints:
        try:
            base = _adapter_base(ckpt.path, args.base_model)
        except RuntimeError:
            continue
        model_source = model_source or base or str(ckpt.path)
        if tokenizer_source is None and _has_tokenizer(ckpt.path):
            tokenizer_source = str(ckpt.path)
        if tokenizer_source is None and base is not None:
            tokenizer_source = base
        if tokenizer_source is not None:
            break
    if tokenizer_source is None:
        raise CliError(f"no tokenizer files in the checkpoints of {output_dir} and no PEFT base model to take them "
                       "from; pass --tokenizer PATH_OR_ID")
    tokenizer = _load_tokenizer(tokenizer_source)
    scorer = _build_scorer(args, probes, tokenizer, _max_positions(model_source))
    fingerprint, settings = _fingerprint(scorer, args)
    settings["tokenizer"] = tokenizer_source

    results_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = results_dir / SCAN_JSON, results_dir / SCAN_CSV
    data = _read_scan_file(json_path)
    scans = data.get("scans", {}) if isinstance(data.get("scans"), dict) else {}
    entry = scans.setdefault(fingerprint, {"settings": settings, "results": {}})
    entry["settings"] = settings
    cache: dict[str, Any] = entry.setdefault("results", {})

    loader = _ModelLoader(_torch_dtype(args.dtype), device, args.base_model)
    total, scored, failed, cached = len(checkpoints), 0, [], 0

    def save() -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        return _write_results(json_path, csv_path, data, scans, fingerprint, checkpoints, monitor_key,
                              greater_is_better, output_dir)

    for index, ckpt in enumerate(checkpoints, start=1):
        prefix = f"[{index}/{total}] {ckpt.name}"
        signature = _weights_signature(ckpt.path)
        previous = cache.get(ckpt.name)
        if previous is not None and not args.rescore and previous.get("weights") == signature:
            cached += 1
            _eprint(f"{prefix} ... cached")
            continue
        start = time.perf_counter()
        model, kind = None, "full"
        try:
            if not signature:
                raise FileNotFoundError("no model or adapter weights in it")
            model, kind = loader.load(str(ckpt.path))
            report = scorer.score(model)
        except Exception as err:  # noqa: BLE001 - a broken checkpoint must not end the scan
            if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
                raise
            _eprint(f"{prefix} ... failed")
            cache.pop(ckpt.name, None)  # never show a stale result for a checkpoint that changed and broke
            _warn(f"skipping {ckpt.name}: {type(err).__name__}: {_one_line(err)}")
            failed.append(ckpt.name)
            if args.debug:
                import traceback

                traceback.print_exc()
            continue
        finally:
            if model is not None:
                loader.release(model, kind)
                del model
        seconds = time.perf_counter() - start
        cache[ckpt.name] = {
            "checkpoint": ckpt.name, "step": ckpt.step, "kind": kind, "weights": signature,
            "seconds": round(seconds, 3), "metrics": report.metrics,
        }
        scored += 1
        _eprint(f"{prefix} ... {seconds:.1f}s")
        save()  # after every checkpoint: an interrupted scan keeps what it did

    rows, peak = save()
    if rows:
        _print_scan_table(rows, monitor_key, peak)
    summary = f"scored {scored}, cached {cached}, failed {len(failed)} of {total} checkpoints"
    if failed:
        summary += f" (failed: {', '.join(failed)}; re-run to retry them)"
    _eprint(summary)
    if peak is not None:
        print(f"peak {monitor_key} = {peak['value']:.4f} at {peak['checkpoint']} (step {peak['step']}): "
              f"{peak['path']}")
    else:
        print(f"no peak: {monitor_key} is missing or NaN for every checkpoint")
    print(f"results: {csv_path} {json_path}")
    if not rows:
        _eprint("ctx-callback: error: no checkpoint could be scored")
        return EXIT_FAILURE
    return EXIT_OK


def _write_results(json_path: Path, csv_path: Path, data: dict[str, Any], scans: dict[str, Any], fingerprint: str,
                   checkpoints: list[_Checkpoint], monitor_key: str, greater_is_better: bool,
                   output_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    cache = scans[fingerprint]["results"]
    rows = []
    for ckpt in checkpoints:
        if ckpt.name in cache:
            rows.append({**cache[ckpt.name], "path": str(ckpt.path)})
    peak = _find_peak(rows, monitor_key, greater_is_better)
    payload = {
        "format": SCAN_FORMAT,
        "output_dir": str(output_dir.resolve()),
        "fingerprint": fingerprint,
        "settings": scans[fingerprint]["settings"],
        "monitor": monitor_key,
        "greater_is_better": greater_is_better,
        "peak": peak,
        "rows": [{k: v for k, v in row.items() if k != "weights"} for row in rows],
        "scans": scans,
    }
    _atomic_write(json_path, json.dumps(payload, indent=2, allow_nan=True) + "\n")
    _write_csv(csv_path, rows, peak)
    data.clear()
    data.update(payload)
    return rows, peak


# ----------------------------------------------------------------------------------------------------------------
# probe
# ----------------------------------------------------------------------------------------------------------------


def cmd_probe(args: argparse.Namespace) -> int:
    monitor_key, _ = parse_monitor(args.monitor, args.mode, args.variants)
    probes = _load_probes(args)
    device = _resolve_device(args.device)
    local = Path(args.model).expanduser()
    is_local = local.exists()
    if not is_local and (args.model.startswith((".", "/", "~")) or args.model.count("/") > 1):
        raise CliError(f"no such model directory: {args.model}")
    model_name = str(local) if is_local else args.model
    try:
        base = _adapter_base(local, args.base_model) if local.is_dir() else None
    except RuntimeError as err:
        raise CliError(str(err)) from None
    tokenizer_source = args.tokenizer
    if tokenizer_source is None:
        tokenizer_source = model_name if (not is_local or _has_tokenizer(local) or base is None) else base
    tokenizer = _load_tokenizer(tokenizer_source)
    scorer = _build_scorer(args, probes, tokenizer, _max_positions(base or model_name))
    loader = _ModelLoader(_torch_dtype(args.dtype), device, args.base_model)
    start = time.perf_counter()
    try:
        model, kind = loader.load(model_name)
    except OSError as err:  # not a model directory / unknown Hub id
        raise CliError(f"could not load model {args.model!r}: {_one_line(err)}") from None
    _eprint(f"loaded {kind} model {model_name} in {time.perf_counter() - start:.1f}s; scoring {len(probes)} probes")
    report = scorer.score(model)
    metrics = report.metrics
    if args.json:
        print(json.dumps({"model": model_name, "kind": kind, "monitor": monitor_key,
                          "seconds": report.result.seconds, "metrics": metrics}, indent=2))
        return EXIT_OK
    names = [m for m in _SHORT if any(k.endswith("/" + m) for k in metrics)]
    family_width = max(len("family"), len("all"), *(len(f) for f in _families(metrics)))
    header = f"{'family':<{family_width}} {'probes':>6} " + " ".join(_SHORT[m].rjust(7) for m in names)
    print(header)
    print("-" * len(header))
    for family in [None, *_families(metrics)]:
        key = (lambda m: f"{PREFIX}/{m}") if family is None else (lambda m, f=family: f"{PREFIX}/{f}/{m}")
        count = metrics.get(key("num_probes"))
        line = f"{'all' if family is None else family:<{family_width}} {int(count) if count else 0:>6} "
        line += " ".join(_format_value(metrics.get(key(m)), 7) for m in names)
        print(line)
    print("(" + ", ".join(f"{_SHORT[m]} = {m}" for m in names) + ")")
    print(f"{monitor_key} = {_format_value(metrics.get(monitor_key), 0).strip()} "
          f"({report.result.seconds:.1f}s)")
    return EXIT_OK


# ----------------------------------------------------------------------------------------------------------------
# plot
# ----------------------------------------------------------------------------------------------------------------


def _has_reliance(log_history: Any) -> bool:
    return isinstance(log_history, list) and any(
        isinstance(r, dict) and f"{PREFIX}/counterfactual_accuracy" in r for r in log_history)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CliError(f"cannot read {path} as JSON: {_one_line(err)}") from None


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

    Each scored checkpoint becomes one row ``{"step": ..., "ctx_reliance/...": ...}`` with the scan's peak step as
    ``ctx_reliance/peak_step`` (recomputed for ``monitor_key`` when given); the run's training loss rows are added
    when its ``trainer_state.json`` is still around.
    """
    rows = sorted(scan.get("rows", []), key=lambda r: r["step"])
    peak = scan.get("peak")
    if monitor_key is not None and monitor_key != scan.get("monitor"):
        from .monitor import LOWER_IS_BETTER

        peak = _find_peak(rows, monitor_key, monitor_key.split("/")[-1] not in LOWER_IS_BETTER)
    history: list[dict[str, Any]] = []
    for row in rows:
        entry = {"step": row["step"], **row["metrics"]}
        if peak is not None:
            entry[f"{PREFIX}/peak_step"] = float(peak["step"])
        history.append(entry)
    output_dir = scan.get("output_dir")
    history.extend(_loss_rows(Path(output_dir)) if output_dir else [])
    return history


def _stop_step(log_history: list[dict[str, Any]]) -> int | None:
    stops = [r["step"] for r in log_history if isinstance(r, dict) and r.get(f"{PREFIX}/early_stop") and "step" in r]
    return int(stops[-1]) if stops else None


def _plot_source(path: Path, monitor_key: str) -> tuple[list[dict[str, Any]], int | None, str]:
    """``(log_history, stop_step, description)`` from a trainer_state.json, scan JSON or output directory."""
    if not path.exists():
        raise CliError(f"no such file or directory: {path}")
    if path.is_dir():
        candidates = [path / "trainer_state.json", _newest_checkpoint_state(path), path / SCAN_JSON]
        for candidate in candidates:
            if candidate is None or not candidate.is_file():
                continue
            history, stop, description = _plot_source(candidate, monitor_key) if _usable(candidate) else ([], None, "")
            if history:
                return history, stop, description
        raise CliError(f"nothing to plot in {path}: no ctx_reliance metrics in trainer_state.json or checkpoint-*/"
                       f"trainer_state.json, and no {SCAN_JSON} (run `ctx-callback scan {path}` first)")
    data = _read_json(path)
    if isinstance(data, dict) and data.get("format") == SCAN_FORMAT:
        history = scan_to_log_history(data, monitor_key)
        if not any(f"{PREFIX}/counterfactual_accuracy" in r for r in history):
            raise CliError(f"{path} holds no scored checkpoints")
        return history, None, f"scan results {path}"
    if isinstance(data, dict) and isinstance(data.get("log_history"), list):
        history = data["log_history"]
        if not _has_reliance(history):
            raise CliError(f"{path} has no ctx_reliance metrics (was ContextRelianceCallback used?); "
                           "score the checkpoints with `ctx-callback scan OUTPUT_DIR` and plot its JSON")
        return history, _stop_step(history), f"trainer state {path}"
    raise CliError(f"{path} is neither a trainer_state.json (no 'log_history') nor a ctx-callback scan file")


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


def cmd_plot(args: argparse.Namespace) -> int:
    source = Path(args.input).expanduser()
    monitor_key = f"{PREFIX}/{args.monitor.removeprefix(PREFIX + '/')}"
    history, stop_step, description = _plot_source(source, monitor_key)
    if args.output:
        output = Path(args.output).expanduser()
    else:
        output = (source if source.is_dir() else source.parent) / PLOT_FILE
    if output.parent and not output.parent.exists():
        raise CliError(f"output directory does not exist: {output.parent}")
    try:
        import matplotlib  # noqa: F401

        from .plotting import plot_reliance
    except ImportError as err:
        _eprint(f"ctx-callback: error: plot needs matplotlib (pip install 'ctx_callback[plot]'): {_one_line(err)}")
        return EXIT_FAILURE
    plot_reliance(history, output, monitor_key=monitor_key, stop_step=stop_step, title=args.title,
                  size=(args.width, args.height), dpi=args.dpi)
    print(f"wrote {output} (from {description})")
    return EXIT_OK


# ----------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------

_COMMANDS = {"scan": cmd_scan, "plot": cmd_plot, "probe": cmd_probe}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with 2 on usage errors, 0 on --help
    try:
        return _COMMANDS[args.command](args)
    except CliError as err:
        _eprint(f"ctx-callback: error: {err}")
        if getattr(args, "debug", False):
            import traceback

            traceback.print_exc()
        return EXIT_USAGE
    except BrokenPipeError:  # stdout closed early (`ctx-callback ... | head`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE
    except KeyboardInterrupt:
        _eprint("ctx-callback: interrupted")
        return 130
    except Exception as err:  # noqa: BLE001 - one line for users, traceback with --debug
        _eprint(f"ctx-callback: error: unexpected {type(err).__name__}: {_one_line(err)}"
                + ("" if getattr(args, "debug", False) else " (re-run with --debug for the traceback)"))
        if getattr(args, "debug", False):
            import traceback

            traceback.print_exc()
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
