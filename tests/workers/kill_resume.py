"""A training process that is killed with SIGKILL and resumed (launched by tests/test_faults_training.py).

Usage::

    python tests/workers/kill_resume.py OUT_DIR full
    python tests/workers/kill_resume.py OUT_DIR kill_after_the_peak
    python tests/workers/kill_resume.py OUT_DIR resume

The run is the rise-and-fall setup of ``tests/test_callback.py::rise_and_fall_run`` (a tiny Llama, SFT data that
first teaches copying from the context and then answering from memory, sequential sampling, ``seed=data_seed=0``),
with ``save_strategy="steps"``, patience, ``save_peak_checkpoint`` and ``restore_peak_at_end``, plus attention
dropout so that the restored RNG state matters.

- ``full``: trains to the early stop.
- ``kill_after_the_peak``: kills its own process (``SIGKILL``: no cleanup, no ``on_train_end``) from a callback's
  ``on_step_end`` at the first probe event that is not a new peak (the peak checkpoint exists, the stop is still
  ahead); it writes ``killed.json`` just before, so the test can check where it died.
- ``resume``: ``trainer.train(resume_from_checkpoint=True)`` (the last checkpoint in OUT_DIR).

A run that finishes writes ``result-{mode}.json`` (stop step, peak, losses, the probe curve, summary) and two weight
files into OUT_DIR: ``weights-{mode}.safetensors`` (after train end: the restored peak) and
``stop-weights-{mode}.safetensors`` (at train end before the restore: the stop step's weights).

The tokenizer comes from ``CTX_TOKENIZER_DIR`` (default: :func:`ctx_callback.models.smollm2_path`).
"""

import json
import os
import signal
import sys

import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from safetensors.torch import save_file  # noqa: E402
from transformers import AutoTokenizer, TrainerCallback  # noqa: E402

from ctx_callback import ContextRelianceCallback  # noqa: E402
from tests.helpers import PROBES, make_tiny_llama, make_trainer  # noqa: E402

MONITOR = "ctx_reliance/counterfactual_probability"


def weights_of(model):
    """A plain copy of the state dict (tied tensors copied apart, as safetensors requires)."""
    return {name: tensor.detach().to("cpu").clone().contiguous() for name, tensor in model.state_dict().items()}


class KillAfterThePeak(TrainerCallback):
    """SIGKILLs this process at the first probe event after the peak (added after the callback under test)."""

    def __init__(self, callback, out_dir):
        self.callback, self.out_dir = callback, out_dir

    def on_step_end(self, args, state, control, **kwargs):
        cb = self.callback
        peak = cb.peak_tracker.peak_step
        if cb.last_probe_step != state.global_step or peak in (None, 0) or peak == state.global_step:
            return
        with open(os.path.join(self.out_dir, "killed.json"), "w") as f:
            json.dump({"step": state.global_step, "peak_step": cb.peak_tracker.peak_step,
                       "peak_checkpoint": cb.peak_checkpoint, "stop_step": cb.stop_step,
                       "peak_checkpoint_exists": bool(cb.peak_checkpoint and os.path.isdir(cb.peak_checkpoint)),
                       "checkpoints": sorted(p for p in os.listdir(self.out_dir) if p.startswith("checkpoint-"))}, f)
            f.flush()
            os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)


class StopWeights(TrainerCallback):
    """Keeps the weights at train end *before* the callback under test restores the peak (added before it)."""

    def __init__(self):
        self.weights = None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.weights = weights_of(model)


def main(out_dir, mode):
    tokenizer_dir = os.environ.get("CTX_TOKENIZER_DIR")
    if not tokenizer_dir:
        from ctx_callback.models import smollm2_path

        tokenizer_dir = str(smollm2_path())
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = make_tiny_llama(tokenizer, attention_dropout=0.1)
    trainer = make_trainer(model, tokenizer, out_dir, max_steps=30, save_strategy="steps", save_steps=5,
                           save_total_limit=1)
    stop_weights = StopWeights()
    trainer.add_callback(stop_weights)
    callback = ContextRelianceCallback(trainer, PROBES, eval_steps=2, monitor="counterfactual_probability", patience=2,
                                       warmup_steps=4, save_peak_checkpoint=True, restore_peak_at_end=True,
                                       variants=("context", "closed_book"), verbose=False)
    trainer.add_callback(callback)
    if mode == "kill_after_the_peak":
        trainer.add_callback(KillAfterThePeak(callback, out_dir))
        trainer.train()
        raise SystemExit(f"kill_after_the_peak: training ended at step {trainer.state.global_step} without the kill")
    if mode == "resume":
        trainer.train(resume_from_checkpoint=True)
    elif mode == "full":
        trainer.train()
    else:
        raise SystemExit(f"unknown mode {mode!r}: use full, kill_after_the_peak or resume")

    save_file(weights_of(model), os.path.join(out_dir, f"weights-{mode}.safetensors"))
    save_file(stop_weights.weights, os.path.join(out_dir, f"stop-weights-{mode}.safetensors"))
    history = trainer.state.log_history
    result = {
        "global_step": trainer.state.global_step,
        "stop_step": callback.stop_step,
        "peak_step": callback.peak_tracker.peak_step,
        "peak_value": callback.peak_tracker.peak_value,
        "peak_checkpoint": os.path.basename(callback.peak_checkpoint or ""),
        "restored": callback.last_restored,
        "restored_from": os.path.basename(callback.restored_from or ""),
        "losses": {str(r["step"]): r["loss"] for r in history if "loss" in r},
        "curve": {str(r["step"]): r[MONITOR] for r in history if MONITOR in r},
        "summary": callback.summary(callback.last_restored),
    }
    with open(os.path.join(out_dir, f"result-{mode}.json"), "w") as f:
        json.dump(result, f, indent=1, default=float)


if __name__ == "__main__":
    main(*sys.argv[1:3])
