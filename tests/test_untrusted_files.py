"""Untrusted files never run code: pickled checkpoints, model code and dataset code are refused with clear errors,
and nothing is written outside the chosen output directory."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from ctx_callback.checkpoints import load_weights_into
from ctx_callback.cli import SCAN_CSV, SCAN_JSON, main
from ctx_callback.errors import ConfigurationError, UnsafeFileError
from ctx_callback.probes import load_probes
from tests.helpers import PROBES, make_tiny_llama


class _TouchOnUnpickle:
    """A pickle payload that creates ``marker`` when unpickled: the file exists iff the pickle ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _write_malicious_bin(directory: Path, marker: Path, model=None) -> None:
    state = dict(model.state_dict()) if model is not None else {}
    state["payload"] = _TouchOnUnpickle(marker)
    with open(directory / "pytorch_model.bin", "wb") as f:
        pickle.dump(state, f)  # a plain pickle, which torch.load also reads


def test_a_code_executing_pickle_is_refused_by_the_peak_restore(tmp_path, tokenizer):
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "checkpoint-10"
    checkpoint.mkdir()
    _write_malicious_bin(checkpoint, marker, make_tiny_llama(tokenizer))
    with pytest.raises(UnsafeFileError, match="refusing to load .*pytorch_model.bin.*safetensors"):
        load_weights_into(make_tiny_llama(tokenizer), checkpoint)
    assert not marker.exists()


def test_safetensors_is_preferred_over_a_pickle_next_to_it(tmp_path, tokenizer):
    marker = tmp_path / "pwned"
    saved = make_tiny_llama(tokenizer, seed=1)
    saved.save_pretrained(tmp_path / "ckpt")  # model.safetensors
    _write_malicious_bin(tmp_path / "ckpt", marker)
    target = make_tiny_llama(tokenizer, seed=2)
    load_weights_into(target, tmp_path / "ckpt")
    assert not marker.exists()
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), target.state_dict().values()))


def test_scan_skips_a_code_executing_pickle_checkpoint(tmp_path, tokenizer, probes_file, capsys):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    good, bad = run / "checkpoint-2", run / "checkpoint-4"
    make_tiny_llama(tokenizer).save_pretrained(good)
    tokenizer.save_pretrained(good)
    bad.mkdir(parents=True)
    tokenizer.save_pretrained(bad)
    (bad / "config.json").write_text((good / "config.json").read_text())
    _write_malicious_bin(bad, marker, make_tiny_llama(tokenizer))
    code = main(["scan", str(run), "--probes", str(probes_file), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 0 and not marker.exists()
    assert "skipping checkpoint-4" in err
    rows = json.loads((run / SCAN_JSON).read_text())["rows"]
    assert [r["checkpoint"] for r in rows] == ["checkpoint-2"]


@pytest.mark.parametrize("model_type, refused", [("llama", False), ("evil_llama", True)])
def test_model_code_in_a_checkpoint_is_never_executed(tmp_path, tokenizer, probes_file, capsys, model_type, refused):
    """A config with ``auto_map`` asks to import Python shipped with the model. ctx_callback never passes
    trust_remote_code: a known architecture loads with the library's own class (the shipped code is ignored), an
    unknown one is refused with one line and exit code 2. Either way the shipped code never runs."""
    marker = tmp_path / "pwned"
    model_dir = tmp_path / "model"
    make_tiny_llama(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                          "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (model_dir / "config.json").write_text(json.dumps(config))
    code_line = f"import pathlib; pathlib.Path({str(marker)!r}).touch()\n"
    (model_dir / "configuration_evil.py").write_text(code_line)
    (model_dir / "modeling_evil.py").write_text(code_line)
    code = main(["probe", str(model_dir), "--probes", str(probes_file), "--device", "cpu"])
    err = capsys.readouterr().err
    assert not marker.exists()
    if refused:
        assert code == 2 and "ctx-callback: error: could not load model" in err, err
    else:
        assert code == 0, err


def test_dataset_code_is_refused(tmp_path):
    path = tmp_path / "probes.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PROBES))
    with pytest.raises(ConfigurationError, match="never runs code from a dataset"):
        load_probes(str(tmp_path), from_hub=True, trust_remote_code=True)


def test_scan_writes_only_its_results_inside_the_output_dir(tmp_path, tokenizer):
    """Probe ids are never used as paths; scan writes exactly its two result files into --output-dir."""
    probes = [dict(p, id=f"../../escape/{i}") for i, p in enumerate(PROBES)]
    probes_file = tmp_path / "probes.jsonl"
    probes_file.write_text("".join(json.dumps(r) + "\n" for r in probes))
    run = tmp_path / "deep" / "run"
    make_tiny_llama(tokenizer).save_pretrained(run / "checkpoint-2")
    tokenizer.save_pretrained(run / "checkpoint-2")
    results = tmp_path / "deep" / "results"
    before = {p for p in tmp_path.rglob("*")}
    assert main(["scan", str(run), "--probes", str(probes_file), "--output-dir", str(results), "--device", "cpu"]) == 0
    created = {p for p in tmp_path.rglob("*")} - before
    assert created == {results, results / SCAN_JSON, results / SCAN_CSV}
