"""Loading saved models without the command line (:mod:`ctx_callback.model_loading`), and the command line's
wording of its errors (:mod:`ctx_callback.cli.common`)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ctx_callback import model_loading
from ctx_callback.checkpoints import COMPILED_KEY_MAPPING, COMPILED_PREFIX
from ctx_callback.cli import common
from ctx_callback.errors import CheckpointMismatchError, ModelLoadError, UsageError
from ctx_callback.model_loading import (
    ModelLoader,
    adapter_base,
    check_loading_info,
    has_tokenizer,
    load_model_config,
    load_tokenizer,
    max_positions_of,
)
from tests.helpers import make_tiny_llama


def test_one_compiled_prefix_for_both_loaders():
    assert COMPILED_KEY_MAPPING == {r"^_orig_mod\.": ""} and COMPILED_PREFIX == "_orig_mod."


def test_the_cli_re_exports_the_library_loaders():
    for name in ("check_loading_info", "has_tokenizer", "max_positions_of"):
        assert getattr(common, name) is getattr(model_loading, name)
    assert issubclass(common.ModelLoader, ModelLoader)


def test_adapter_base_reads_the_config_or_takes_the_override(tmp_path):
    assert adapter_base(tmp_path) is None  # no adapter_config.json: a full checkpoint
    config = tmp_path / "adapter_config.json"
    config.write_text(json.dumps({"base_model_name_or_path": "base/model"}))
    assert adapter_base(tmp_path) == "base/model"
    assert adapter_base(tmp_path, "other/model") == "other/model"
    config.write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ModelLoadError, match="names no base_model_name_or_path; pass the base model"):
        adapter_base(tmp_path)
    with pytest.raises(UsageError, match="names no base_model_name_or_path; pass --base-model$"):
        common.adapter_base(tmp_path, None)
    config.write_text("{not json")
    with pytest.raises(ModelLoadError, match="unreadable .*adapter_config.json"):
        adapter_base(tmp_path)


def test_missing_model_and_tokenizer_raise_model_load_errors_worded_for_the_cli(tmp_path):
    missing = str(tmp_path / "nothing")
    with pytest.raises(ModelLoadError, match="could not load model 'x'"):
        load_model_config(missing, "'x'")
    with pytest.raises(UsageError, match="could not load model 'x'"):
        common.load_model_config(missing, "'x'")
    with pytest.raises(ModelLoadError, match=r"could not load a tokenizer from .*\)$"):
        load_tokenizer(missing)
    with pytest.raises(UsageError, match="; pass --tokenizer$"):
        common.load_tokenizer(missing)
    assert max_positions_of(missing) is None and max_positions_of(None) is None
    assert not has_tokenizer(tmp_path)


def test_check_loading_info_names_the_keys():
    check_loading_info("ok", {"missing_keys": [], "unexpected_keys": []})
    keys = [f"layer.{i}" for i in range(7)]
    with pytest.raises(CheckpointMismatchError, match=r"missing layer.0, .*layer.4 and 2 more; unexpected extra"):
        check_loading_info("ckpt", {"missing_keys": keys, "unexpected_keys": ["extra"]})


def test_model_loader_loads_a_checkpoint_saved_from_a_compiled_model(tmp_path, tokenizer):
    saved = make_tiny_llama(tokenizer, seed=4)
    saved.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    save_file({COMPILED_PREFIX + k: v.contiguous() for k, v in load_file(weights).items()}, weights,
              metadata={"format": "pt"})
    assert has_tokenizer(tmp_path)
    assert max_positions_of(str(tmp_path)) == saved.config.max_position_embeddings
    loader = ModelLoader(torch.float32, "cpu")
    model, kind = loader.load(str(tmp_path))
    assert kind == "full" and not model.training
    for name, tensor in saved.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    loader.release(model, kind)
