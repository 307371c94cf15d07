"""One rank of the two-process test (launched by tests/test_distributed.py through torch.distributed.run).

Trains a tiny Llama with SFTTrainer under DDP on CPU (gloo) with ContextRelianceCallback, and writes what this rank
saw to OUT/MODE-SHARDED.rank{N}.json: the logged probe rows, a full one-process re-score of the same weights at every
probe step, the stop step and the final global step. Mode ``mixed``: log-likelihood mode on the two-answer capital
probes plus four-way multiple-choice probes (one without a parametric answer), shared round-robin over the ranks.

Usage: ``ddp_probe.py TOKENIZER_DIR OUT_DIR MODE:SHARDED [MODE:SHARDED ...]``. Each configuration is a separate
training run with its own Trainer, one after the other in the same two processes (one launch pays the start-up of
torch, transformers and the process group once); configuration ``MODE:SHARDED`` writes ``MODE-SHARDED.rank{N}.json``.
"""

import json
import os
import sys

import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from transformers import AutoTokenizer, TrainerCallback  # noqa: E402

import ctx_callback.distributed as distributed  # noqa: E402
from ctx_callback import ALL_VARIANTS, ContextRelianceCallback, ProbeScorer, probes_from_records  # noqa: E402
from ctx_callback.distributed import ProbePlan  # noqa: E402
from tests.helpers import (  # noqa: E402
    PROBES,
    make_tiny_llama,  # noqa: E402
    make_trainer,
)

#: Multiple-choice probes for mode "mixed": (country, true capital, counterfactual city, two more options).
MC_CAPITALS = [("France", "Paris", "Lyon", "Nice", "Lille"), ("Japan", "Tokyo", "Osaka", "Kyoto", "Kobe"),
               ("Italy", "Rome", "Milan", "Turin", "Naples"), ("Spain", "Madrid", "Seville", "Bilbao", "Malaga")]


def mc_probes():
    rows = []
    for i, (country, true, fake, a, b) in enumerate(MC_CAPITALS):
        options = [true, fake, a, b][i:] + [true, fake, a, b][:i]
        rows.append({"id": f"mc/{country.lower()}", "family": "mc", "context": f"The capital of {country} is {fake}.",
                     "question": f"What is the capital of {country}?", "counterfactual_answer": fake,
                     "parametric_answer": true if i < 3 else None, "options": options, "list_options": i % 2 == 0})
    return rows


class Rescore(TrainerCallback):
    """After the callback under test: score all probes on this rank alone, as a one-process run would."""

    def __init__(self, scorer, callback):
        self.scorer, self.callback, self.rows = scorer, callback, {}

    def _record(self, state, model):
        if self.callback.last_probe_step == state.global_step and state.global_step not in self.rows:
            report = self.scorer.score(model)
            self.rows[state.global_step] = report.metrics
            # The label check and the attention share as one process computes them (every probe on this rank).
            everything = ProbePlan(list(range(len(self.scorer.probes))), 0, 1, False)
            self.rows[state.global_step].update(self.callback.diagnostics.row(
                self.scorer, model, everything, self.callback.selection.indices(), report.result,
                self.callback.probe_events - 1))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._record(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._record(state, model)


def run(tokenizer_dir, out_dir, mode, sharded):
    config = f"{mode}-{sharded}"
    probes = PROBES
    if mode == "mixed":  # multiple choice + two answers in one log-likelihood round
        probes, mode = PROBES + mc_probes(), "loglik"
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = make_tiny_llama(tokenizer)
    if sharded == "sharded":
        # accelerate enables FSDP only on accelerators (on CPU it silently runs DDP), so the FSDP / ZeRO-3 path is
        # exercised by declaring the parameters sharded: every rank then scores every probe in lock step and rank
        # 0's result is shared (generation runs with synced_gpus=True).
        distributed.params_are_sharded = lambda trainer: True
    trainer = make_trainer(model, tokenizer, os.path.join(out_dir, config), max_steps=8,
                           per_device_train_batch_size=3, ddp_backend="gloo")
    rank = trainer.args.process_index
    if sharded == "fail_on_rank1" and rank == 1:  # a probe failure (as an OOM would be) on one rank only
        def fail_in_eval(module, args):
            if not module.training:
                raise RuntimeError("simulated out of memory on rank 1")

        model.model.register_forward_pre_hook(fail_in_eval)
    # Every variant, the irrelevant-context control included: its metrics must shard like the others.
    kwargs = dict(eval_steps=2, variants=ALL_VARIANTS, mode=mode, max_new_tokens=3)
    if mode == "loglik" and probes is PROBES:  # a stop independent of the training dynamics: no event can improve
        kwargs.update(patience=1, min_delta=10.0, warmup_steps=4)
    if sharded == "replicated" and mode == "loglik":  # the diagnostics shard their sample like a round
        kwargs.update(label_check_every=1, attention_every=2, diagnostic_probes=5)
    if sharded == "fail_on_rank1":
        kwargs["engine"] = "batched"
    callback = ContextRelianceCallback(trainer, probes, **kwargs)
    rescore = Rescore(ProbeScorer(probes_from_records(probes), tokenizer, mode=mode, max_new_tokens=3,
                                  variants=ALL_VARIANTS), callback)
    trainer.add_callback(callback)
    trainer.add_callback(rescore)
    trainer.train()
    rows = [r for r in trainer.state.log_history if "ctx_reliance/counterfactual_accuracy" in r]
    with open(os.path.join(out_dir, f"{config}.rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "synced_gpus": callback.scorer.synced_gpus, "world_size": trainer.args.world_size,
                   "rows": rows,
                   "rescored": {str(k): v for k, v in rescore.rows.items()}, "stop_step": callback.stop_step,
                   "global_step": trainer.state.global_step,
                   "failed_steps": [r["step"] for r in trainer.state.log_history if "ctx_reliance/probe_failed" in r]},
                  f)


def main(tokenizer_dir, out_dir, *configs):
    params_are_sharded = distributed.params_are_sharded
    for config in configs:
        mode, sharded = config.split(":")
        try:
            run(tokenizer_dir, out_dir, mode, sharded)
        finally:
            distributed.params_are_sharded = params_are_sharded  # the next configuration decides for itself


if __name__ == "__main__":
    main(*sys.argv[1:])
