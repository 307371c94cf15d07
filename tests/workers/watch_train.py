"""A training run watched by ``ctx-callback watch`` in another process (launched by tests/test_watch.py).

Usage::

    python tests/workers/watch_train.py OUT_DIR

The rise-and-fall run of ``tests/test_callback.py::rise_and_fall_run`` (a tiny Llama, SFT data that first teaches
copying from the context and then answering from memory), saving ``checkpoint-N`` every 2 steps with
``save_total_limit=2``, with:

- the in-loop :class:`~ctx_callback.ContextRelianceCallback`, observe-only (no stop rule), probing every 2 steps and
  at step 0: the rows the watcher's must equal;
- :class:`Pacer`: at each step after a save it waits until the watcher has logged that checkpoint (or a stop was
  requested), so the test is deterministic on any machine, however slow;
- :class:`~ctx_callback.StopRequestCallback` (after the pacer): the stop request reaches the trainer through it.

It trains the model the test saved into ``OUT_DIR/base`` (a tiny Llama; the watcher's ``--baseline``). At the end it
writes ``OUT_DIR/result.json``: the in-loop rows, the final step, what ``StopRequestCallback`` saw,
``best_model_checkpoint`` and the checkpoints left.

The tokenizer comes from ``CTX_TOKENIZER_DIR`` (default: :func:`ctx_callback.models.smollm2_path`).
"""

import json
import os
import sys
import time

import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402

from ctx_callback import ContextRelianceCallback, StopRequestCallback  # noqa: E402
from ctx_callback.watcher import WATCH_FILE  # noqa: E402
from tests.helpers import PROBES, conflict_dataset, make_trainer  # noqa: E402

SAVE_STEPS = 2
START = time.monotonic()


class Pacer(TrainerCallback):
    """At each step N that follows a save (N odd), waits for the watcher to have logged checkpoint N-1 (or to have
    requested a stop): the watcher is never behind, so a stop decided at checkpoint S reaches the trainer at step S+1
    on any machine, however slow."""

    def __init__(self, out_dir, timeout=240.0):
        self.out_dir, self.timeout = out_dir, timeout

    def _caught_up(self, step):
        try:
            with open(os.path.join(self.out_dir, WATCH_FILE)) as f:
                state = json.load(f)
        except (OSError, ValueError):
            return False
        return state.get("stop") is not None or any(e["step"] >= step and e.get("logged") for e in state["events"])

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step % SAVE_STEPS != 1 or step < SAVE_STEPS:
            return
        deadline = time.monotonic() + self.timeout
        while not self._caught_up(step - 1) and time.monotonic() < deadline:
            time.sleep(0.05)


def main(out_dir):
    from ctx_callback.models import smollm2_path

    tokenizer = AutoTokenizer.from_pretrained(os.environ.get("CTX_TOKENIZER_DIR") or smollm2_path())
    model = AutoModelForCausalLM.from_pretrained(os.path.join(out_dir, "base"), dtype=torch.float32)
    trainer = make_trainer(model, tokenizer, out_dir, dataset=conflict_dataset(15, 15), max_steps=30,
                           save_strategy="steps", save_steps=SAVE_STEPS, save_total_limit=2, save_only_model=True)
    callback = ContextRelianceCallback(trainer, PROBES, eval_steps=SAVE_STEPS, monitor="counterfactual_probability",
                                       variants=("context", "closed_book"), probe_log=False, verbose=False)
    stop = StopRequestCallback()
    for cb in (callback, Pacer(out_dir), stop):
        trainer.add_callback(cb)
    trainer.train()
    rows = [row for row in trainer.state.log_history if "ctx_reliance/counterfactual_probability" in row]
    result = {"rows": rows, "seconds": time.monotonic() - START, "global_step": trainer.state.global_step,
              "stopped_at_step": stop.stopped_at_step,
              "stop_request": stop.stop_request, "best_model_checkpoint": trainer.state.best_model_checkpoint,
              "checkpoints": sorted(p for p in os.listdir(out_dir) if p.startswith("checkpoint-"))}
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
