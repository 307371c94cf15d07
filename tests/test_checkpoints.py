"""checkpoints.load_weights_into: every weights layout the peak restore meets, and clear errors for the rest."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from ctx_callback.checkpoints import load_weights_into
from ctx_callback.errors import CheckpointMismatchError
from tests.helpers import make_tiny_llama


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin"])
def test_full_model_layouts_load_exactly(tmp_path, tokenizer, layout):
    saved, target = make_tiny_llama(tokenizer, seed=1), make_tiny_llama(tokenizer, seed=2)
    assert not _same(saved, target)
    if layout == "bin":
        torch.save(saved.state_dict(), tmp_path / "pytorch_model.bin")
    else:
        saved.save_pretrained(tmp_path, max_shard_size="100KB" if layout == "sharded" else "5GB")
        assert (tmp_path / "model.safetensors.index.json").is_file() == (layout == "sharded")
    load_weights_into(target, tmp_path)
    assert _same(saved, target)


def test_a_wrapped_module_is_unwrapped(tmp_path, tokenizer):
    saved, target = make_tiny_llama(tokenizer, seed=1), make_tiny_llama(tokenizer, seed=2)
    saved.save_pretrained(tmp_path)
    load_weights_into(torch.nn.ModuleDict({"module": target})["module"], tmp_path)
    wrapper = torch.nn.Module()
    wrapper.module = make_tiny_llama(tokenizer, seed=3)
    load_weights_into(wrapper, tmp_path)  # DDP-style .module
    assert _same(saved, target) and _same(saved, wrapper.module)


def test_peft_adapter_checkpoint(tmp_path, tokenizer):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    saved = get_peft_model(make_tiny_llama(tokenizer, seed=1), config)
    saved.save_pretrained(tmp_path)
    target = get_peft_model(make_tiny_llama(tokenizer, seed=1), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    lora = [k for k in saved.state_dict() if "lora_B" in k]
    assert lora and not torch.equal(saved.state_dict()[lora[0]], target.state_dict()[lora[0]])
    load_weights_into(target, tmp_path)
    assert all(torch.equal(saved.state_dict()[k], target.state_dict()[k]) for k in lora)


def test_mismatched_weights_raise(tmp_path, tokenizer):
    model = make_tiny_llama(tokenizer)
    state = {k: v.clone() for k, v in model.state_dict().items() if "layers.1." not in k}
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="does not match the model: missing") as info:
        load_weights_into(make_tiny_llama(tokenizer), tmp_path)
    assert isinstance(info.value, RuntimeError)


def test_no_weights_raise_file_not_found(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="no model weights"):
        load_weights_into(make_tiny_llama(tokenizer), tmp_path)
