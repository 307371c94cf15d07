"""Worker for tests/test_deepspeed.py: a real ``SFTTrainer.train()`` under DeepSpeed ZeRO-3 on CPU (two processes).

Arguments: SMOLLM2_DIR OUT_DIR. Each rank writes ``rank{N}.json`` with its logged reliance rows, the one-process
metrics of the gathered (unsharded) weights at every probe event, and proof that the weights were partitioned.
"""

from __future__ import annotations

import json
import os
import sys

import torch

torch.set_num_threads(1)

import deepspeed  # noqa: E402
from transformers import AutoTokenizer, TrainerCallback  # noqa: E402

from ctx_callback import ContextRelianceCallback, ProbeScorer, probes_from_records  # noqa: E402
from tests.helpers import PROBES, make_tiny_llama, make_trainer  # noqa: E402

VARIANTS = ("context", "closed_book")


class GatheredRescore(TrainerCallback):
    """At each probe event, gather the ZeRO-3 partitions into an unsharded copy and score it in one process."""

    def __init__(self, callback, tokenizer):
        self.callback, self.tokenizer = callback, tokenizer
        self.scorer = ProbeScorer(probes_from_records(PROBES), tokenizer, variants=VARIANTS)
        self.rows, self.partitioned = {}, {}

    def _record(self, state, model):
        step = state.global_step
        if self.callback.last_probe_step != step or step in self.rows:
            return
        weight = model.model.layers[0].self_attn.q_proj.weight
        self.partitioned[step] = {"numel_visible": weight.numel(), "numel_local": weight.ds_tensor.numel(),
                                  "numel_full": int(torch.Size(weight.ds_shape).numel())}
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            full = {k: v.detach().clone() for k, v in model.state_dict().items()}
        reference = make_tiny_llama(self.tokenizer)
        reference.load_state_dict(full)
        self.rows[step] = self.scorer.score(reference).metrics

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._record(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._record(state, model)


def main() -> None:
    smollm2_dir, out_dir = sys.argv[1], sys.argv[2]
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    zero3 = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
             # threshold 0: also partition tiny tensors (by default ZeRO-3 keeps tensors < 100k values whole)
             "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
             "zero_allow_untested_optimizer": True}
    trainer = make_trainer(make_tiny_llama(tokenizer), tokenizer, os.path.join(out_dir, "run"), max_steps=4,
                           per_device_train_batch_size=3, use_cpu=True, deepspeed=zero3, ddp_backend="gloo")
    callback = ContextRelianceCallback(trainer, PROBES, eval_steps=2, variants=VARIANTS, verbose=False,
                                       patience=1, monitor="parametric_accuracy")
    rescore = GatheredRescore(callback, tokenizer)
    trainer.add_callback(callback)
    trainer.add_callback(rescore)
    trainer.train()
    rows = [r for r in trainer.state.log_history if "ctx_reliance/counterfactual_accuracy" in r]
    rank = trainer.args.process_index
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "world_size": trainer.args.world_size, "synced_gpus": callback.scorer.synced_gpus,
                   "rows": rows, "reference": {str(k): v for k, v in rescore.rows.items()},
                   "partitioned": {str(k): v for k, v in rescore.partitioned.items()},
                   "stop_step": callback.stop_step, "global_step": trainer.state.global_step}, f)


if __name__ == "__main__":
    main()
