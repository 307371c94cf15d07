"""Two gloo processes (``torch.distributed.run``) feeding :class:`~ctx_callback.StopRequestCallback` the same steps
(launched by tests/test_watch.py).

Usage::

    python -m torch.distributed.run --nproc_per_node 2 tests/workers/ddp_stop_request.py OUT_DIR

Each rank has its own output folder (``OUT_DIR/rank<r>``, with a ``checkpoint-2`` in both); only rank 0's folder
ever receives request files (a peak notice at step 2, a stop request at step 4). So rank 1 can stop and protect the
peak only through rank 0's broadcast. The callback's events are called as the Trainer calls them, with real
``TrainingArguments``, ``TrainerState`` and ``TrainerControl``. Rank 0 writes ``OUT_DIR/result.json``: per rank, the
step it was told to stop at and its ``best_model_checkpoint``.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from transformers import TrainerControl, TrainerState, TrainingArguments  # noqa: E402

from ctx_callback.remote_stop import PEAK_FILE, STOP_FILE, StopRequestCallback, write_request  # noqa: E402


def main(out_dir):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mine = os.path.join(out_dir, f"rank{rank}")
    os.makedirs(os.path.join(mine, "checkpoint-2"), exist_ok=True)
    args = TrainingArguments(output_dir=mine, use_cpu=True, report_to="none")
    state, control = TrainerState(), TrainerControl()
    state.is_world_process_zero = rank == 0
    callback = StopRequestCallback()
    callback.on_train_begin(args, state, control)
    stopped = None
    for step in range(1, 7):
        state.global_step = step
        if rank == 0 and step == 2:
            write_request(mine, PEAK_FILE, {"peak_checkpoint": "checkpoint-2", "peak_step": 2, "peak_value": 0.5})
        if rank == 0 and step == 4:
            write_request(mine, STOP_FILE, {"step": 2, "reason": "test", "rule": "patience"})
        callback.on_step_end(args, state, control)
        if control.should_training_stop and stopped is None:
            stopped = step
    results = [None, None]
    dist.all_gather_object(results, {"stopped": stopped, "best": state.best_model_checkpoint, "dir": mine,
                                     "request": callback.stop_request})
    if rank == 0:
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
