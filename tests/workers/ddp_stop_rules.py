"""One rank of the two-process stop-rule test (launched by tests/test_stop_rules_training.py via torch.distributed.run).

Trains a tiny Llama with SFTTrainer under DDP on CPU (gloo) with ContextRelianceCallback and
``stop_rule="significant_decline"`` (``sustained_events`` from the command line, default 1) on 42 probes split over
the ranks, and writes what this rank saw to
OUT/rank{N}.json: the logged probe rows, the stop step, rule and message, and the final global step.
"""

import json
import os
import sys

import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from transformers import AutoTokenizer  # noqa: E402

from ctx_callback import ContextRelianceCallback  # noqa: E402
from tests.helpers import make_tiny_llama, make_trainer  # noqa: E402
from tests.test_stop_rules_training import PHRASED_PROBES  # noqa: E402


def main(tokenizer_dir, out_dir, sustained_events="1"):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = make_tiny_llama(tokenizer)
    trainer = make_trainer(model, tokenizer, os.path.join(out_dir, "run"), max_steps=30, ddp_backend="gloo")
    callback = ContextRelianceCallback(trainer, PHRASED_PROBES, eval_steps=2, monitor="counterfactual_probability",
                                       stop_rule="significant_decline", warmup_steps=4, variants=("context",),
                                       sustained_events=int(sustained_events), verbose=False)
    trainer.add_callback(callback)
    trainer.train()
    rank = trainer.args.process_index
    rows = [r for r in trainer.state.log_history if "ctx_reliance/counterfactual_probability" in r]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "world_size": trainer.args.world_size, "rows": rows, "stop_step": callback.stop_step,
                   "stop_rule": callback.stop_rule_name, "stop_reason": callback.stop_reason,
                   "global_step": trainer.state.global_step, "peak_step": callback.peak_tracker.peak_step}, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
