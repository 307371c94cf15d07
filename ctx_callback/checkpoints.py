"""Loading saved weights back into a live model (the peak checkpoint at train end).

Handles full-model checkpoints (``model.safetensors``, sharded ``model.safetensors.index.json``, ``pytorch_model.bin``)
and PEFT adapter checkpoints (``adapter_model.safetensors``). DeepSpeed/FSDP-sharded checkpoints are not handled
here: use ``load_best_model_at_end`` with ``metric_for_best_model`` for those.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from typing import TYPE_CHECKING, Any

from .errors import CheckpointMismatchError, UnsafeFileError, quote_error

if TYPE_CHECKING:  # torch is imported where weights are loaded: the command line's --help stays fast
    import torch

__all__ = [
    "CHECKPOINT_DIR_RE",
    "COMPILED_KEY_MAPPING",
    "COMPILED_PREFIX",
    "checkpoint_dirs",
    "load_weights_into",
    "strip_compiled_prefix",
]

#: What ``torch.compile`` puts before every parameter name of the module it wraps (``OptimizedModule._orig_mod``).
COMPILED_PREFIX = "_orig_mod."
#: The same as a ``key_mapping`` for transformers' ``from_pretrained``: the prefix removed from every saved name.
COMPILED_KEY_MAPPING = {"^" + re.escape(COMPILED_PREFIX): ""}


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model itself: without a DDP-style ``.module`` wrapper, then without a ``torch.compile`` wrapper."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def strip_compiled_prefix(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with the ``_orig_mod.`` prefix of weights saved from a ``torch.compile``d model removed.

    Keys without the prefix are kept as they are; a stripped name that another key already has is left prefixed (so
    the strict key check reports it instead of one silently overwriting the other).
    """
    if not any(key.startswith(COMPILED_PREFIX) for key in state):
        return state
    out: dict[str, Any] = {key: value for key, value in state.items() if not key.startswith(COMPILED_PREFIX)}
    for key, value in state.items():
        if key.startswith(COMPILED_PREFIX):
            name = key[len(COMPILED_PREFIX):]
            out[key if name in out else name] = value
    return out


def _tied_aliases(model: torch.nn.Module) -> dict[str, set[str]]:
    """For each state-dict name, the other names of the same tensor (tied weights such as ``lm_head.weight``)."""
    by_tensor: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        by_tensor.setdefault(id(tensor), []).append(name)
    return {name: set(names) - {name} for names in by_tensor.values() for name in names}


def load_weights_into(model: torch.nn.Module, checkpoint_dir: str | os.PathLike) -> None:
    """Load the weights saved in ``checkpoint_dir`` into ``model`` in place.

    Weights saved from a ``torch.compile``d model (every name prefixed ``_orig_mod.``) load like any other; a compiled
    live ``model`` is loaded through the module it wraps.

    Raises:
        FileNotFoundError: No weights file in the directory.
        UnsafeFileError: A ``pytorch_model.bin`` holds more than tensors (loading it could run code). Safetensors
            files are always preferred when both exist.
        CheckpointMismatchError: The checkpoint does not match the model (missing or unexpected parameters); also a
            ``RuntimeError``.
    """
    import torch
    from safetensors.torch import load_file

    path = os.fspath(checkpoint_dir)
    model = _unwrap(model)
    adapter = os.path.join(path, "adapter_model.safetensors")
    if os.path.isfile(adapter):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, strip_compiled_prefix(load_file(adapter)))
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
        try:  # never unpickle arbitrary objects: only tensors and plain containers
            state = torch.load(legacy, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise UnsafeFileError(
                f"refusing to load {legacy}: it holds objects other than tensors, and unpickling them could run "
                f"code (torch.load(weights_only=True) said: {quote_error(err)}). Re-save the "
                "checkpoint as safetensors (save_pretrained(safe_serialization=True)) from a trusted environment."
            ) from None
    else:
        raise FileNotFoundError(f"no model weights (model.safetensors, adapter_model.safetensors, ...) in {path}")
    state = strip_compiled_prefix(state)  # saved from a torch.compile'd model: only the prefix differs
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if isinstance(getattr(model, "_tied_weights_keys", None), dict):
        tied = set(model._tied_weights_keys)
    aliases = _tied_aliases(model)
    # A tied weight is loaded through the name that is saved (lm_head.weight through the input embeddings).
    missing = [k for k in missing if k not in tied and not (aliases.get(k, set()) & state.keys())]
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"checkpoint {path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


#: The name of a folder the Trainer saves a checkpoint into: ``checkpoint-<global step>``.
CHECKPOINT_DIR_RE = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dirs(output_dir: os.PathLike | str) -> list[tuple[int, str]]:
    """The ``checkpoint-<step>`` folders of a Trainer ``output_dir``, as ``(step, name)`` sorted by step.

    Raises:
        OSError: ``output_dir`` cannot be listed.
    """
    found = []
    with os.scandir(output_dir) as entries:
        for entry in entries:
            match = CHECKPOINT_DIR_RE.match(entry.name)
            if match and entry.is_dir():
                found.append((int(match.group(1)), entry.name))
    return sorted(found)
