"""``ctx-callback probe MODEL``: score one model and print its metrics per probe family (or as JSON).

``MODEL`` is a checkpoint directory, a PEFT adapter directory, a Hub id or the offline alias
``smollm2-135m-instruct``. The table has one column per metric of :data:`ctx_callback.metrics.METRICS` that the run
produced, labelled with the metric's ``short`` name, in table order.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..metrics import METRICS, MetricSpec, metric_key
from ..models import max_positions
from .common import (
    EXIT_OK,
    ModelLoader,
    adapter_base,
    add_debug_option,
    add_probe_options,
    add_subparser,
    build_scorer,
    eprint,
    families_in,
    format_value,
    has_tokenizer,
    load_model_config,
    load_probes_from_args,
    load_tokenizer,
    one_line,
    parse_monitor_option,
    resolve_device,
    torch_dtype,
)

__all__ = ["NAME", "add_parser", "run", "table_metrics"]

NAME = "probe"

#: The metric the table shows in its own ``probes`` column, not among the metric columns.
_COUNT_METRIC = "num_probes"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``probe`` and its options.

    Args:
        subparsers: The object ``ArgumentParser.add_subparsers()`` returned.

    Returns:
        The ``probe`` subparser.
    """
    parser = add_subparser(
        subparsers, NAME,
        help="score one model and print metrics per family",
        description="Score one model (a checkpoint directory, a PEFT adapter directory, a Hub id or the offline "
                    "alias smollm2-135m-instruct) and print the metrics per probe family.",
    )
    parser.add_argument("model", metavar="MODEL", help="model directory, PEFT adapter directory or Hub id")
    parser.add_argument("--json", action="store_true",
                        help="print the metrics as one JSON object instead of a table")
    add_probe_options(parser)
    add_debug_option(parser)
    return parser


def table_metrics(metrics: dict[str, float]) -> list[MetricSpec]:
    """The metrics the ``probe`` table shows as columns.

    Args:
        metrics: A scoring report's metrics (``ctx_reliance/[<family>/]<metric>`` keys).

    Returns:
        Every spec of :data:`~ctx_callback.metrics.METRICS` with a key in ``metrics``, in table order, except
        ``num_probes`` (the table's ``probes`` column).
    """
    return [spec for spec in METRICS
            if spec.name != _COUNT_METRIC and any(k.endswith("/" + spec.name) for k in metrics)]


def _print_table(metrics: dict[str, float]) -> None:
    specs = table_metrics(metrics)
    families = families_in(metrics)
    family_width = max(len("family"), len("all"), *(len(f) for f in families))
    header = f"{'family':<{family_width}} {'probes':>6} " + " ".join(spec.short.rjust(7) for spec in specs)
    print(header)
    print("-" * len(header))
    for family in [None, *families]:
        count = metrics.get(metric_key(_COUNT_METRIC, family))
        line = f"{'all' if family is None else family:<{family_width}} {int(count) if count else 0:>6} "
        line += " ".join(format_value(metrics.get(metric_key(spec.name, family)), 7) for spec in specs)
        print(line)
    print("(" + ", ".join(f"{spec.short} = {spec.name}" for spec in specs) + ")")


def run(args: argparse.Namespace) -> int:
    """Run ``ctx-callback probe``.

    Args:
        args: The parsed command line.

    Returns:
        ``EXIT_OK``.

    Raises:
        CtxCallbackError: Bad input (missing model directory, bad ``--monitor``, bad probes, unloadable model, ...).
    """
    monitor_key = parse_monitor_option(args.monitor, args.mode, args.variants).key
    probes = load_probes_from_args(args)
    device = resolve_device(args.device)
    local = Path(args.model).expanduser()
    is_local = local.exists()
    if not is_local and (args.model.startswith((".", "/", "~")) or args.model.count("/") > 1):
        raise UsageError(f"no such model directory: {args.model}")
    model_name = str(local) if is_local else args.model
    base = adapter_base(local, args.base_model) if local.is_dir() else None
    # The model (its config) before the tokenizer: a missing model is reported as such, not as a missing tokenizer.
    label = repr(args.model) + (f" (its PEFT base model {base!r})" if base else "")
    config = load_model_config(base or model_name, label)
    tokenizer_source = args.tokenizer
    if tokenizer_source is None:
        tokenizer_source = model_name if (not is_local or has_tokenizer(local) or base is None) else base
    tokenizer = load_tokenizer(tokenizer_source)
    scorer = build_scorer(args, probes, tokenizer, max_positions(config))
    loader = ModelLoader(torch_dtype(args.dtype), device, args.base_model)
    start = time.perf_counter()
    try:
        model, kind = loader.load(model_name)
    except OSError as err:  # not a model directory / unknown Hub id
        raise UsageError(f"could not load model {args.model!r}: {one_line(err)}") from None
    precision = f" under {scorer.probe_dtype} autocast" if scorer.probe_dtype else ""
    eprint(f"loaded {kind} model {model_name} in {time.perf_counter() - start:.1f}s; scoring {len(probes)} probes"
           f"{precision}")
    report = scorer.score(model)
    metrics = report.metrics
    if args.json:
        print(json.dumps({"model": model_name, "kind": kind, "monitor": monitor_key, "probe_dtype": scorer.probe_dtype,
                          "seconds": report.result.seconds, "metrics": metrics}, indent=2))
        return EXIT_OK
    _print_table(metrics)
    print(f"{monitor_key} = {format_value(metrics.get(monitor_key), 0).strip()} "
          f"({report.result.seconds:.1f}s)")
    return EXIT_OK
