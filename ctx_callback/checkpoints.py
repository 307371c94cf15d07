"""Loading saved weights back into a live model (the peak checkpoint at train end).

Handles full-model checkpoints (``model.safetensors``, sharded ``model.safetensors.index.json``, ``pytorch_model.bin``)
and PEFT adapter checkpoints (``adapter_model.safetensors``). DeepSpeed/FSDP-sharded checkpoints are not handled
here: use ``load_best_model_at_end`` with ``metric_for_best_model`` for those.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from .errors import CheckpointMismatchError

__all__ = ["load_weights_into"]


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def load_weights_into(model: torch.nn.Module, checkpoint_dir: str | os.PathLike) -> None:
    """Load the weights saved in ``checkpoint_dir`` into ``model`` in place.

    Raises:
        FileNotFoundError: No weights file in the directory.
        CheckpointMismatchError: The checkpoint does not match the model (missing or unexpected parameters); also a
            ``RuntimeError``.
    """
    from safetensors.torch import load_file

    path = os.fspath(checkpoint_dir)
    model = _unwrap(model)
    adapter = os.path.join(path, "adapter_model.safetensors")
    if os.path.isfile(adapter):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(adapter))
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise CheckpointMismatchError(f"adapter checkpoint {path} has parameters the model lacks: {unexpected[:5]}")
        return
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    legacy = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(single):
        state: dict[str, Any] = load_file(single)
    elif os.path.isfile(index):
        # transformers 5 removed ``load_sharded_checkpoint``: read the index and merge the shards ourselves, so the
        # same missing/unexpected check applies to sharded checkpoints.
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(os.path.join(path, shard)))
    elif os.path.isfile(legacy):
        state = torch.load(legacy, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"no model weights (model.safetensors, adapter_model.safetensors, ...) in {path}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if isinstance(getattr(model, "_tied_weights_keys", None), dict):
        tied = set(model._tied_weights_keys)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"checkpoint {path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
