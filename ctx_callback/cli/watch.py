"""``ctx-callback watch OUTPUT_DIR``: score checkpoints as training saves them, log to its trackers, request a stop.

Runs next to training (another process, another machine sharing the filesystem, another GPU): waits for each
``checkpoint-<step>`` the Trainer saves, scores it with the callback's probes and engine, logs the same row the
in-loop :class:`~ctx_callback.ContextRelianceCallback` would (TensorBoard log dir, W&B run id, MLflow run id), applies
the callback's stop rules, and on a stop writes the request :class:`~ctx_callback.StopRequestCallback` acts on. The
core is :mod:`ctx_callback.watcher`; the request files are :mod:`ctx_callback.remote_stop`; ``docs/watch.md``.
"""

from __future__ import annotations

import argparse
from typing import Any

from .common import (
    EXIT_OK,
    ModelLoader,
    adapter_base,
    add_debug_option,
    add_probe_options,
    add_subparser,
    build_scorer,
    eprint,
    has_tokenizer,
    load_tokenizer,
    max_positions_of,
    non_negative_float,
    positive_float,
    positive_int,
    resolve_device,
    torch_dtype,
)

__all__ = ["NAME", "add_parser", "run"]

NAME = "watch"


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``watch`` and its options.

    Args:
        subparsers: The object ``ArgumentParser.add_subparsers()`` returned.

    Returns:
        The ``watch`` subparser.
    """
    parser = add_subparser(
        subparsers, NAME,
        help="score checkpoints as training saves them, log to its trackers, request a stop",
        description="Wait for the checkpoint-* folders training writes into OUTPUT_DIR, score each with the "
                    "callback's probes and engine, log the rows the in-loop callback would log into the run's "
                    "trackers, apply its stop rules, and on a stop write OUTPUT_DIR/ctx_reliance_stop.json, which "
                    "StopRequestCallback in the training process turns into a stop at its next step. Resumable: "
                    "state in OUTPUT_DIR/ctx_reliance_watch.json. See docs/watch.md.",
    )
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="the training run's output_dir")
    add_probe_options(parser)
    g = parser.add_argument_group("stop options (as in ContextRelianceCallback; checked by its own validation)")
    g.add_argument("--greater-is-better", type=_bool, default=None, metavar="true|false",
                   help="direction of --monitor; default: inferred from the metric")
    g.add_argument("--smoothing", default="ema", choices=("ema", "mean", "none"), help="smoothing of the monitor")
    g.add_argument("--ema-alpha", type=float, default=0.5, help="EMA weight of the newest value")
    g.add_argument("--smoothing-window", type=int, default=3, help="window of --smoothing mean")
    g.add_argument("--min-delta", type=float, default=0.0, help="smallest smoothed improvement that is a new peak")
    g.add_argument("--patience", type=int, default=None, help="checkpoints without improvement before a stop")
    g.add_argument("--warmup-steps", type=int, default=0, help="never stop before this global step")
    g.add_argument("--stop-rule", default=None, choices=("significant_decline",), help="a paired-test stop rule")
    g.add_argument("--min-decline", type=float, default=None, help="significant_decline: smallest decline")
    g.add_argument("--alpha", type=float, default=None, help="significant_decline: false-stop level")
    g.add_argument("--sustained-events", type=int, default=None,
                   help="significant_decline: consecutive checkpoints the decline must hold at before stopping "
                        "(default 2)")
    g.add_argument("--divergence-threshold", type=float, default=None, help="stop this far below the peak")
    g.add_argument("--stopping-threshold", type=float, default=None, help="stop below this absolute floor")
    g.add_argument("--controls-every", type=int, default=1, help="score the control variants every K-th event")
    g = parser.add_argument_group("watch options")
    g.add_argument("--baseline", default=None, metavar="MODEL",
                   help="the model training started from, scored first as step 0 (the callback's baseline); "
                        "without it the first checkpoint is the first event")
    g.add_argument("--tensorboard-dir", default=None, metavar="DIR", help="TensorBoard log dir to write rows to")
    g.add_argument("--wandb-run-id", default=None, metavar="ID", help="W&B run to resume and log into")
    g.add_argument("--wandb-project", default=None, help="its W&B project")
    g.add_argument("--wandb-entity", default=None, help="its W&B entity")
    g.add_argument("--mlflow-run-id", default=None, metavar="ID", help="MLflow run to log into")
    g.add_argument("--mlflow-tracking-uri", default=None, metavar="URI", help="its MLflow tracking URI")
    g.add_argument("--once", action="store_true", help="score the checkpoints that are complete now and exit")
    g.add_argument("--until-step", type=positive_int, default=None, metavar="N", help="exit after step N")
    g.add_argument("--idle-timeout", type=positive_float, default=None, metavar="SECONDS",
                   help="exit after this long without a new checkpoint; default: wait for the end of training "
                        "(StopRequestCallback's end marker), a stop, or --until-step")
    g.add_argument("--poll-interval", type=positive_float, default=5.0, metavar="SECONDS", help="between looks")
    g.add_argument("--settle-seconds", type=non_negative_float, default=2.0, metavar="SECONDS",
                   help="a complete checkpoint's newest file must be this old")
    g.add_argument("--retries", type=int, default=3, help="failed loads of one checkpoint before it is skipped")
    g.add_argument("--state-file", default=None, metavar="PATH",
                   help="the watcher's state; default: OUTPUT_DIR/ctx_reliance_watch.json")
    add_debug_option(parser)
    return parser


def _options(args: argparse.Namespace) -> Any:
    """The callback's checked options for these flags (:func:`~ctx_callback.callback_options.validate_arguments`).

    Raises:
        ConfigurationError: A bad value, in the callback's words (its argument names).
    """
    import inspect

    from ..callback import ContextRelianceCallback
    from ..callback_options import validate_arguments

    arguments = {name: p.default for name, p in inspect.signature(ContextRelianceCallback).parameters.items()}
    given = {name: getattr(args, name) for name in ("probes", "limit_per_family", "prompt_format", "system_prompt",
                                                    "mode", "monitor", "greater_is_better", "smoothing", "ema_alpha",
                                                    "smoothing_window", "min_delta", "patience", "warmup_steps",
                                                    "stop_rule", "min_decline", "alpha", "sustained_events",
                                                    "divergence_threshold", "stopping_threshold", "controls_every",
                                                    "probe_dtype")}
    arguments.update({k: v for k, v in given.items() if v is not None or k in ("monitor", "greater_is_better")})
    arguments.update(trainer=None, variants=tuple(args.variants), probe_log=False)
    return validate_arguments(arguments), arguments


def _settings(args: argparse.Namespace, arguments: dict[str, Any], options: Any) -> dict[str, Any]:
    keys = ("limit_per_family", "prompt_format", "system_prompt", "mode", "variants", "monitor", "greater_is_better",
            "smoothing", "ema_alpha", "smoothing_window", "min_delta", "patience", "warmup_steps", "stop_rule",
            "min_decline", "alpha", "sustained_events", "divergence_threshold", "stopping_threshold", "controls_every",
            "probe_dtype")
    settings = {k: arguments[k] for k in keys}
    if settings["sustained_events"] == 1:  # the rule before the option existed: older state files still match
        del settings["sustained_events"]
    settings.update(probe_set_sha1=options.probe_set_sha1, dtype=args.dtype, baseline=args.baseline,
                    monitor_key=options.monitor.key)
    return settings


def _scorer_factory(args: argparse.Namespace, probes: list[Any]) -> Any:
    def make(path: str) -> Any:
        from pathlib import Path

        source, base = args.tokenizer, adapter_base(Path(path), args.base_model) if Path(path).is_dir() else None
        if source is None:
            source = path if has_tokenizer(Path(path)) or base is None else base
        eprint(f"tokenizer: {source}")
        return build_scorer(args, probes, load_tokenizer(source), max_positions_of(base or path))

    return make


def run(args: argparse.Namespace) -> int:
    """Run ``ctx-callback watch``.

    Args:
        args: The parsed command line.

    Returns:
        ``EXIT_OK`` (also after a stop request: the stop is the watcher's job done).

    Raises:
        CtxCallbackError: Bad input (missing directory, bad probe or stop option, a state file of other settings,
            a missing tracker package).
    """
    from pathlib import Path

    from ..errors import UsageError

    output_dir = Path(args.output_dir).expanduser()
    if not output_dir.is_dir():
        raise UsageError(f"no such directory: {output_dir} (start training first, or pass its output_dir)")
    if args.retries < 0:
        raise UsageError(f"--retries must be >= 0, got {args.retries}")
    options, arguments = _options(args)
    from ..watch_trackers import make_sinks
    from ..watcher import Watcher

    sinks = make_sinks(args.tensorboard_dir, args.wandb_run_id, args.wandb_project, args.wandb_entity,
                       args.mlflow_run_id, args.mlflow_tracking_uri)
    loader = ModelLoader(torch_dtype(args.dtype), resolve_device(args.device), args.base_model)
    watcher = Watcher(output_dir, options, _scorer_factory(args, options.probes), loader,
                      _settings(args, arguments, options), sinks, baseline=args.baseline,
                      controls_every=args.controls_every, settle_seconds=args.settle_seconds, retries=args.retries,
                      state_file=args.state_file, say=eprint)
    result = watcher.run(once=args.once, until_step=args.until_step, idle_timeout=args.idle_timeout,
                         poll_interval=args.poll_interval)
    print(f"watch ended ({result.reason}): scored {result.scored}, replayed {len(watcher.events) - result.scored} "
          f"from {watcher.state_path.name}, skipped {len(result.skipped)}"
          + (f" ({', '.join(result.skipped)})" if result.skipped else ""))
    if result.peak_step is not None:
        print(f"peak {options.monitor.key} at step {result.peak_step}")
    if result.stop is not None:
        print(f"stop requested at checkpoint step {result.stop['step']} ({result.stop['rule']}): "
              f"{result.stop['reason']}; peak checkpoint {result.stop.get('peak_checkpoint')}")
    return EXIT_OK
