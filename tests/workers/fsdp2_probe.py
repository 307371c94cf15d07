"""One rank of the FSDP2 test (launched by tests/test_fsdp2.py through torch.distributed.run, gloo on CPU).

Real: a tiny Llama whose parameters are sharded with ``torch.distributed.fsdp.fully_shard`` (FSDP2: every decoder
layer, then the root; each rank holds half of every weight as a ``DTensor``), the all-gathers and reduce-scatters of
its forward and backward passes, SGD steps on the shards, and the callback's whole probe path: ``plan_probes`` (told
that parameters are sharded by ``trainer.is_fsdp_enabled = True``), ``run_round``, ``ProbeScorer.score_raw`` with the
prefix / batched engines or ``generate(..., synced_gpus=True)``, the peak tracker, ``broadcast_from_main`` and
``Trainer.log``. Driven by hand: the event loop. accelerate refuses FSDP on CPU, so ``Trainer.train()`` cannot run
here; a plain ``transformers.Trainer`` (never trained) supplies ``state``, ``log`` and the ``CallbackHandler``, and
this script fires ``on_train_begin`` / ``on_step_end`` / ``on_train_end`` through that handler around its own
optimizer steps, as ``Trainer._inner_training_loop`` does.

For every configuration (``loglik`` with engine ``prefix``, ``loglik`` with engine ``batched``, ``generate``) it writes
OUT/<config>.rank{N}.json: the rows the callback logged, the raw per-probe scores (and generations) the callback's
scorer produced, the same from a one-process ``ProbeScorer`` run on an *unsharded* copy of the weights (a deep copy
taken before sharding for the baseline; later, the full tensors gathered from the shards with
``DTensor.full_tensor()``), the number of forward calls of each probe round, the stop step and evidence of sharding.
"""

import copy
import json
import os
import sys

import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoTokenizer, PrinterCallback, Trainer, TrainingArguments

from ctx_callback import ContextRelianceCallback, ProbeScorer, probes_from_records
from tests.helpers import CAPITALS, PROBES, make_tiny_llama

MAX_STEPS = 6
EVAL_STEPS = 2
MAX_NEW_TOKENS = 4
#: Small enough that the probes are cut into several forward passes of very different widths.
MAX_BATCH_TOKENS = 600
VARIANTS = ("context", "closed_book")


def long_records():
    """Probes whose contexts are 5, 10 and 20 times longer than PROBES' (the same sentence repeated)."""
    rows = []
    for repeat, (country, true, fake) in zip((5, 10, 20), CAPITALS[:3]):
        rows.append({
            "id": f"long/{country.lower()}-{repeat}x", "family": "long",
            "context": " ".join([f"The capital of {country} is {fake}."] * repeat),
            "question": f"What is the capital of {country}?",
            "counterfactual_answer": fake, "parametric_answer": true,
        })
    return rows


RECORDS = PROBES + long_records()
#: name -> (mode, engine, make_tiny_llama overrides). The generation model is untied with larger initial weights: the
#: default tiny Llama (tied, std 0.02) greedily answers "\n" to every prompt, which would make equal texts trivial;
#: this one generates varied text from the start and a few hits after the SGD steps.
CONFIGS = {
    "prefix": ("loglik", "prefix", {}),
    "batched": ("loglik", "batched", {}),
    "generate": ("generate", "auto", {"tie_word_embeddings": False, "initializer_range": 0.2}),
}


def training_batch(tokenizer):
    """Identical on every rank: with FSDP's gradient averaging, the steps equal one-process steps on this batch."""
    texts = [f"The capital of {country} is {true}." for country, true, _ in CAPITALS[:4]]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


class ForwardCounter:
    """Counts calls of a module's forward (every one is an all-gather round under FSDP)."""

    def __init__(self, module):
        self.calls = 0
        module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.calls += 1


def gathered_copy(sharded, reference):
    """Load the full tensors of the sharded model's state into ``reference`` (a collective: every rank calls it)."""
    state = {name: (value.full_tensor() if isinstance(value, DTensor) else value)
             for name, value in sharded.state_dict().items()}
    reference.load_state_dict(state)
    return reference


def scored(result):
    return {"scores": result.scores.tolist(), "generations": result.generations,
            "indices": result.probe_indices.tolist()}


def run_config(name, tokenizer, out_dir, mesh, rank):
    mode, engine, overrides = CONFIGS[name]
    model = make_tiny_llama(tokenizer, **overrides)  # same seed on every rank: identical initial weights
    reference = copy.deepcopy(model)
    ref_counter = ForwardCounter(reference)
    ref_scorer = ProbeScorer(probes_from_records(RECORDS), tokenizer, mode=mode, engine=engine, variants=VARIANTS,
                             max_new_tokens=MAX_NEW_TOKENS, max_batch_tokens=MAX_BATCH_TOKENS,
                             max_length=model.config.max_position_embeddings)
    ref_results = {0: ref_scorer.score_raw(reference)}  # one process, unsharded, before sharding
    ref_calls = {0: ref_counter.calls}

    args = TrainingArguments(output_dir=os.path.join(out_dir, f"run-{name}"), use_cpu=True, report_to="none",
                             ddp_backend="gloo", disable_tqdm=True, logging_steps=1, save_strategy="no",
                             max_steps=MAX_STEPS)
    trainer = Trainer(model=model, args=args, processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)  # disable_tqdm: it would print every logged row
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert trainer.model is model  # fully_shard works in place: the trainer holds the sharded model
    trainer.is_fsdp_enabled = True  # what accelerate would set on an accelerator; the planner reads it
    q_proj = model.model.layers[0].self_attn.q_proj.weight
    sharding = {"dtensor": isinstance(q_proj, DTensor), "local_numel": q_proj.to_local().numel(),
                "full_numel": q_proj.numel()}

    kwargs = dict(mode=mode, engine=engine, eval_steps=EVAL_STEPS, variants=VARIANTS, max_new_tokens=MAX_NEW_TOKENS,
                  max_batch_tokens=MAX_BATCH_TOKENS, verbose=False)
    if mode == "loglik":  # a stop that does not depend on training: no event can improve on the first by 10
        kwargs.update(patience=1, min_delta=10.0, warmup_steps=4)
    callback = ContextRelianceCallback(trainer, RECORDS, **kwargs)
    trainer.add_callback(callback)
    callback_results = {}
    real_score_raw = callback.scorer.score_raw

    def recording_score_raw(m, indices=None):  # the real method; only its result is kept for the comparison
        result = real_score_raw(m, indices)
        callback_results[trainer.state.global_step] = result
        return result

    callback.scorer.score_raw = recording_score_raw
    counter = ForwardCounter(model)
    calls = {}

    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    batch = training_batch(tokenizer)
    state, control, handler = trainer.state, trainer.control, trainer.callback_handler
    state.max_steps = MAX_STEPS
    state.global_step = 0
    before = counter.calls
    control = handler.on_train_begin(args, state, control)
    calls[0] = counter.calls - before
    losses = []
    for step in range(1, MAX_STEPS + 1):
        model.train()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
        state.global_step = step
        before = counter.calls
        control = handler.on_step_end(args, state, control)
        if callback.last_probe_step == step:
            calls[step] = counter.calls - before
            gathered_copy(model, reference)  # collective, same order on every rank
            before_ref = ref_counter.calls
            ref_results[step] = ref_scorer.score_raw(reference)
            ref_calls[step] = ref_counter.calls - before_ref
        if control.should_training_stop:
            break
    handler.on_train_end(args, state, control)

    rows = [r for r in state.log_history if "ctx_reliance/counterfactual_accuracy" in r]
    payload = {
        "rank": rank, "world_size": dist.get_world_size(), "sharding": sharding, "losses": losses,
        "synced_gpus": callback.scorer.synced_gpus, "active_engine": callback.scorer.active_engine,
        "rows": rows, "stop_step": callback.stop_step, "global_step": state.global_step,
        "callback": {str(k): scored(v) for k, v in callback_results.items()},
        "reference": {str(k): scored(v) for k, v in ref_results.items()},
        "reference_metrics": {str(k): ref_scorer.metrics(v) for k, v in ref_results.items()},
        "forward_calls": {str(k): v for k, v in calls.items()},
        "reference_forward_calls": {str(k): v for k, v in ref_calls.items()},
        "failed_steps": [r["step"] for r in state.log_history if "ctx_reliance/probe_failed" in r],
    }
    with open(os.path.join(out_dir, f"{name}.rank{rank}.json"), "w") as f:
        json.dump(payload, f)


def main(tokenizer_dir, out_dir, *names):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rank = None
    for name in names or CONFIGS:
        if not dist.is_initialized():  # the first Trainer's TrainingArguments initialise the gloo group
            TrainingArguments(output_dir=out_dir, use_cpu=True, report_to="none", ddp_backend="gloo").device  # noqa: B018
        rank = dist.get_rank()
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        run_config(name, tokenizer, out_dir, mesh, rank)
    dist.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:])
