"""``ctx-callback scan OUTPUT_DIR``: score every ``checkpoint-*`` of a training run, name the peak, write CSV + JSON.

Uses the same probes, prompt formats and scoring engine as :class:`~ctx_callback.ContextRelianceCallback`. It is
resumable: results are kept in ``ctx_reliance_scan.json`` keyed by checkpoint name and a fingerprint of the probe
settings (the tokenized probes, the mode, the dtype and the probe dtype), so a re-run scores only new (or re-saved)
checkpoints. A checkpoint that fails to load or score is skipped with a warning and is not recorded, so the next run
retries it.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..metrics import METRICS, metric_spec
from .common import (
    EXIT_FAILURE,
    EXIT_OK,
    PREFIX,
    SCAN_CSV,
    SCAN_FORMAT,
    SCAN_JSON,
    Checkpoint,
    ModelLoader,
    adapter_base,
    add_debug_option,
    add_probe_options,
    add_subparser,
    build_scorer,
    eprint,
    families_in,
    find_checkpoints,
    find_peak,
    format_value,
    has_tokenizer,
    load_probes_from_args,
    load_tokenizer,
    max_positions_of,
    one_line,
    parse_monitor_option,
    resolve_device,
    torch_dtype,
    warn,
)

__all__ = ["NAME", "add_parser", "run"]

NAME = "scan"

_WEIGHT_FILES = re.compile(r"^(model.*\.safetensors|model\.safetensors\.index\.json|pytorch_model.*\.bin|"
                           r"adapter_model\.(safetensors|bin))$")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``scan`` and its options.

    Args:
        subparsers: The object ``ArgumentParser.add_subparsers()`` returned.

    Returns:
        The ``scan`` subparser.
    """
    parser = add_subparser(
        subparsers, NAME,
        help="score every checkpoint-* of a training output directory",
        description="Score every checkpoint-* in OUTPUT_DIR (full models and PEFT adapter checkpoints) with the "
                    "callback's probes and engine, print a table, name the checkpoint at peak reliance and write "
                    f"{SCAN_CSV} and {SCAN_JSON}. Resumable: checkpoints already scored with the same probe "
                    "settings are read from the JSON, not scored again; broken checkpoints are skipped with a "
                    "warning and retried on the next run.",
    )
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="training output directory holding checkpoint-*")
    parser.add_argument("--output-dir", dest="results_dir", default=None, metavar="DIR",
                        help=f"where to write {SCAN_CSV} and {SCAN_JSON}; default: OUTPUT_DIR")
    parser.add_argument("--rescore", action="store_true", help="ignore cached results and score every checkpoint")
    add_probe_options(parser)
    add_debug_option(parser)
    return parser


# ----------------------------------------------------------------------------------------------------------------
# Cache: weight signatures, settings fingerprint, the results file
# ----------------------------------------------------------------------------------------------------------------


def _weights_signature(path: Path) -> list[list[Any]]:
    """Name, size and mtime of the weight files: a re-saved checkpoint (new training run) is scored again."""
    out = []
    for entry in sorted(path.iterdir(), key=lambda e: e.name):
        if _WEIGHT_FILES.match(entry.name) and entry.is_file():
            stat = entry.stat()
            out.append([entry.name, stat.st_size, stat.st_mtime_ns])
    return out


def _fingerprint(scorer: Any, args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """A hash of everything that determines the scores: the tokenized probes, mode, dtype, probe dtype (and generation
    length). ``--probe-dtype`` enters the hash only when given, so scans cached before it existed stay valid."""
    encoded = scorer.encoded
    digest = hashlib.sha256()
    settings = {
        "probes": args.probes, "limit_per_family": args.limit_per_family, "prompt_format": args.prompt_format,
        "system_prompt": args.system_prompt, "mode": args.mode, "variants": list(encoded.variants),
        "dtype": args.dtype, "probe_dtype": scorer.probe_dtype, "num_probes": len(encoded.probes),
    }
    exact = {"mode": args.mode, "dtype": args.dtype, "variants": list(encoded.variants),
             "max_new_tokens": scorer.max_new_tokens if args.mode == "generate" else None}
    if scorer.probe_dtype is not None:
        exact["probe_dtype"] = scorer.probe_dtype
    digest.update(json.dumps(exact, sort_keys=True).encode())
    for probe in encoded.probes:
        digest.update(json.dumps([probe.id, probe.family, probe.counterfactual_answer, probe.parametric_answer,
                                  list(probe.counterfactual_aliases), list(probe.parametric_aliases)]
                                 + ([list(probe.options)] if probe.options else [])).encode())
    for item in encoded.items:  # every answer (all options of a multiple-choice probe); two answers hash as before
        digest.update(json.dumps([item.probe_index, item.variant, item.prompt_ids, *item.answer_ids]).encode())
    return digest.hexdigest()[:16], settings


def _read_scan_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        warn(f"ignoring unreadable {path} ({one_line(err)}); all checkpoints will be scored")
        return {}
    if not isinstance(data, dict) or data.get("format") != SCAN_FORMAT:
        warn(f"ignoring {path}: not a ctx-callback scan file")
        return {}
    return data


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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


def _write_results(json_path: Path, csv_path: Path, data: dict[str, Any], scans: dict[str, Any], fingerprint: str,
                   checkpoints: list[Checkpoint], monitor_key: str, greater_is_better: bool,
                   output_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    cache = scans[fingerprint]["results"]
    rows = []
    for ckpt in checkpoints:
        if ckpt.name in cache:
            rows.append({**cache[ckpt.name], "path": str(ckpt.path)})
    peak = find_peak(rows, monitor_key, greater_is_better)
    if not rows:
        # Nothing scored or cached: no empty results file (plot rejects it), and an existing one stays as it is.
        return rows, peak
    json_path.parent.mkdir(parents=True, exist_ok=True)
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
# The table
# ----------------------------------------------------------------------------------------------------------------


def _intervals(report: Any, monitor: Any) -> dict[str, float]:
    """Standard errors and 95% intervals (Wilson / t) of the monitored metric and the :data:`INTERVAL_METRICS`."""
    from ..metrics import INTERVAL_METRICS, metric_key
    from ..outcomes import uncertainty

    targets = [(monitor.key, monitor.metric, monitor.family)]
    targets += [(metric_key(m), m, None) for m in INTERVAL_METRICS if metric_key(m) != monitor.key]
    result = report.result
    families = [report.probes[int(i)].family for i in result.probe_indices]
    options = {} if result.option_scores is None else {"options": result.option_scores,
                                                         "option_roles": result.option_roles}
    return uncertainty(result.scores, families, result.variants, result.mode, targets, **options)


def _table_metrics(metrics_rows: Iterable[dict[str, float]], monitor_key: str) -> list[str]:
    """Metric names to show: the summary metrics of :data:`METRICS` present in the rows, plus the monitored one."""
    present: set[str] = set()
    for metrics in metrics_rows:
        present.update(k.split("/")[-1] for k in metrics)
    shown = [spec.name for spec in METRICS if spec.in_summary_table and spec.name in present]
    monitored = monitor_key.split("/")[-1]
    if monitored not in shown and monitored in present:
        shown.append(monitored)
    return shown


def _print_scan_table(rows: list[dict[str, Any]], monitor_key: str, peak: dict[str, Any] | None) -> None:
    metrics = _table_metrics((r["metrics"] for r in rows), monitor_key)
    short = {name: metric_spec(name).short for name in metrics}
    families = families_in(rows[0]["metrics"]) if rows else []
    groups = ([None] if len(families) != 1 else []) + families
    name_width = max(len("checkpoint"), *(len(r["checkpoint"]) for r in rows))
    group_width = 7 * len(metrics) - 1
    head1 = f"{'':>6}  {'':<{name_width}}"
    head2 = f"{'step':>6}  {'checkpoint':<{name_width}}"
    for group in groups:
        label = "all" if group is None else group
        head1 += " | " + (label if len(label) <= group_width else label[: group_width - 1] + "~").center(group_width)
        head2 += " | " + " ".join(short[m].rjust(6) for m in metrics)
    print(head1)
    print(head2)
    print("-" * len(head2))
    for row in rows:
        mark = "*" if peak is not None and row["checkpoint"] == peak["checkpoint"] else " "
        line = f"{row['step']:>6}{mark} {row['checkpoint']:<{name_width}}"
        for group in groups:
            values = [row["metrics"].get(f"{PREFIX}/{m}" if group is None else f"{PREFIX}/{group}/{m}")
                      for m in metrics]
            line += " | " + " ".join(format_value(v) for v in values)
        print(line)
    legend = ", ".join(f"{short[m]} = {m}" for m in metrics)
    print(f"({legend}; * = peak of {monitor_key})")


# ----------------------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Run ``ctx-callback scan``.

    Args:
        args: The parsed command line.

    Returns:
        ``EXIT_OK`` when at least one checkpoint is scored (or cached), ``EXIT_FAILURE`` when none could be (then no
        results file is written, and an existing one is left as it was).

    Raises:
        CtxCallbackError: Bad input (missing directory, no checkpoints, bad ``--monitor``, bad probes, ...).
    """
    output_dir, checkpoints = _checkpoints(args.output_dir)
    results_dir = Path(args.results_dir).expanduser() if args.results_dir else output_dir
    monitor = parse_monitor_option(args.monitor, args.mode, args.variants)
    monitor_key, greater_is_better = monitor.key, monitor.greater_is_better
    probes = load_probes_from_args(args)
    families = sorted({p.family for p in probes})
    if monitor.family is not None and monitor.family not in families:
        raise UsageError(f"--monitor {args.monitor!r} names a family the probes lack; families: {families}")
    device = resolve_device(args.device)

    # One tokenizer (and one scorer: tokenization is cached) for the whole run.
    tokenizer_source, model_source = _tokenizer_source(checkpoints, args, output_dir)
    tokenizer = load_tokenizer(tokenizer_source)
    scorer = build_scorer(args, probes, tokenizer, max_positions_of(model_source))
    fingerprint, settings = _fingerprint(scorer, args)
    settings["tokenizer"] = tokenizer_source

    json_path, csv_path = results_dir / SCAN_JSON, results_dir / SCAN_CSV
    data = _read_scan_file(json_path)
    scans = data.get("scans", {}) if isinstance(data.get("scans"), dict) else {}
    entry = scans.setdefault(fingerprint, {"settings": settings, "results": {}})
    entry["settings"] = settings
    cache: dict[str, Any] = entry.setdefault("results", {})

    loader = ModelLoader(torch_dtype(args.dtype), device, args.base_model)
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
            eprint(f"{prefix} ... cached")
            continue
        result = _score_checkpoint(ckpt, signature, loader, scorer, monitor, prefix, args.debug)
        if result is None:
            cache.pop(ckpt.name, None)  # never show a stale result for a checkpoint that changed and broke
            failed.append(ckpt.name)
            continue
        cache[ckpt.name] = result
        scored += 1
        save()  # after every checkpoint: an interrupted scan keeps what it did

    rows, peak = save()
    if rows:
        _print_scan_table(rows, monitor_key, peak)
    summary = f"scored {scored}, cached {cached}, failed {len(failed)} of {total} checkpoints"
    if failed:
        summary += f" (failed: {', '.join(failed)}; re-run to retry them)"
    eprint(summary)
    if not rows:  # nothing written (see _write_results)
        eprint("ctx-callback: error: no checkpoint could be scored")
        return EXIT_FAILURE
    _print_outcome(peak, monitor_key, csv_path, json_path)
    return EXIT_OK


def _checkpoints(text: str) -> tuple[Path, list[Checkpoint]]:
    """The training output directory and its checkpoints.

    Raises:
        UsageError: The directory does not exist, is a file, or holds no ``checkpoint-*`` directory.
    """
    output_dir = Path(text).expanduser()
    if not output_dir.exists():
        raise UsageError(f"no such directory: {output_dir}")
    if not output_dir.is_dir():
        raise UsageError(f"not a directory: {output_dir}")
    checkpoints = find_checkpoints(output_dir)
    if not checkpoints:
        raise UsageError(f"no checkpoint-* directories in {output_dir} (train with save_strategy='steps')")
    return output_dir, checkpoints


def _tokenizer_source(checkpoints: list[Checkpoint], args: argparse.Namespace,
                      output_dir: Path) -> tuple[str, str | None]:
    """``(tokenizer source, model source)``: ``--tokenizer``, else the first checkpoint with tokenizer files or a
    PEFT base model; the model source (for the maximum length) is that checkpoint's base model or itself.

    Raises:
        UsageError: No tokenizer anywhere (and no ``--tokenizer``).
    """
    tokenizer_source = args.tokenizer
    model_source = None
    for ckpt in checkpoints:
        try:
            base = adapter_base(ckpt.path, args.base_model)
        except UsageError:  # a broken adapter config: that checkpoint is skipped (with a warning) when scored
            continue
        model_source = model_source or base or str(ckpt.path)
        if tokenizer_source is None and has_tokenizer(ckpt.path):
            tokenizer_source = str(ckpt.path)
        if tokenizer_source is None and base is not None:
            tokenizer_source = base
        if tokenizer_source is not None:
            break
    if tokenizer_source is None:
        raise UsageError(f"no tokenizer files in the checkpoints of {output_dir} and no PEFT base model to take "
                         "them from; pass --tokenizer PATH_OR_ID")
    return tokenizer_source, model_source


def _score_checkpoint(ckpt: Checkpoint, signature: list[list[Any]], loader: ModelLoader, scorer: Any, monitor: Any,
                      prefix: str, debug: bool) -> dict[str, Any] | None:
    """Load and score one checkpoint: its entry of the scan file, or ``None`` (after a warning) when it failed.

    Raises:
        MemoryError: Out of memory (``torch.OutOfMemoryError`` too): the scan stops.
    """
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
        eprint(f"{prefix} ... failed")
        warn(f"skipping {ckpt.name}: {type(err).__name__}: {one_line(err)}")
        if debug:
            import traceback

            traceback.print_exc()
        return None
    finally:
        if model is not None:
            loader.release(model, kind)
            del model
    seconds = time.perf_counter() - start
    entry = {
        "checkpoint": ckpt.name, "step": ckpt.step, "kind": kind, "weights": signature,
        "seconds": round(seconds, 3), "metrics": report.metrics,
        "intervals": _intervals(report, monitor),
    }
    eprint(f"{prefix} ... {seconds:.1f}s")
    return entry


def _print_outcome(peak: dict[str, Any] | None, monitor_key: str, csv_path: Path, json_path: Path) -> None:
    """The last lines of a scan: the peak (or why there is none) and the files written."""
    if peak is not None:
        print(f"peak {monitor_key} = {peak['value']:.4f} at {peak['checkpoint']} (step {peak['step']}): "
              f"{peak['path']}")
    else:
        print(f"no peak: {monitor_key} is missing or NaN for every checkpoint")
    print(f"results: {csv_path} {json_path}")
