"""Fine-tune with LLaMA-Factory and watch context reliance: LLaMA-Factory's own training, plus our callback.

LLaMA-Factory (https://github.com/hiyouga/LLaMA-Factory) has no YAML key for extra callbacks, but its Python entry
point ``run_exp(args, callbacks=[...])`` passes them to the Trainer it builds. It builds that Trainer itself, so the
callback cannot be given the trainer: :class:`~ctx_callback.DeferredContextRelianceCallback` finds it when it is built.

Usage (the same YAML you give ``llamafactory-cli train``)::

    python examples/llamafactory_sft.py my_sft.yaml
    python examples/llamafactory_sft.py my_sft.yaml --ctx-probes all --ctx-eval-steps 50 --ctx-patience 3

The metrics reach the trackers in the YAML's ``report_to`` and ``OUTPUT_DIR/trainer_state.json`` as with any Trainer.
Tested with llamafactory 0.9.5 (transformers 5.6.0, trl 0.24.0) by ``tests/test_llamafactory.py`` (opt-in; its
docstring has the install commands). LLaMA-Factory pins ``trl<=0.24``, below this package's ``trl>=1.0``: install
ctx_callback with ``pip install --no-deps`` next to it (ctx_callback does not import trl).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml
from llamafactory.train.tuner import run_exp

from ctx_callback import DeferredContextRelianceCallback


def parse(argv: list[str] | None = None) -> tuple[str, argparse.Namespace]:
    """The LLaMA-Factory YAML and the callback's options (a few; add any of the callback's keyword arguments)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="LLaMA-Factory training YAML (what `llamafactory-cli train` takes)")
    parser.add_argument("--ctx-probes", default="all", help="probe suite, preset or file (default: all)")
    parser.add_argument("--ctx-eval-steps", type=int, default=50, help="probe every N optimizer steps (default: 50)")
    parser.add_argument("--ctx-patience", type=int, default=None, help="stop after N events without a new peak")
    parser.add_argument("--ctx-limit-per-family", type=int, default=None, help="at most N probes per family")
    parser.add_argument("--ctx-restore-peak", action="store_true", help="save the peak checkpoint, restore it at end")
    options = parser.parse_args(argv)
    return options.config, options


def main(argv: list[str] | None = None) -> None:
    config, options = parse(argv)
    callback = DeferredContextRelianceCallback(
        probes=options.ctx_probes, eval_steps=options.ctx_eval_steps, patience=options.ctx_patience,
        limit_per_family=options.ctx_limit_per_family,
        save_peak_checkpoint=options.ctx_restore_peak, restore_peak_at_end=options.ctx_restore_peak,
    )
    run_exp(yaml.safe_load(Path(config).read_text(encoding="utf-8")), callbacks=[callback])


if __name__ == "__main__":
    main(sys.argv[1:])
