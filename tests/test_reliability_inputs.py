"""Reliability on awkward inputs: checkpoints whose weights do not match the model, answers that contain each other,
BOM-prefixed probe files, models shorter than the probes, missing Hub models, and scans with nothing to score.

Each test is named after the defect it guards against; all of them use real parts (the SmolLM2 tokenizer, tiny
random Llamas, real files and the real command line in-process).
"""

from __future__ import annotations

import codecs
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ctx_callback import ProbeLengthError, ProbeScorer, load_probes, matching, probes_from_records
from ctx_callback.checkpoints import load_weights_into
from ctx_callback.cli import SCAN_CSV, SCAN_JSON, main
from ctx_callback.errors import CheckpointMismatchError
from tests.helpers import capital_records, make_tiny_llama

MONITOR = "ctx_reliance/counterfactual_accuracy"


def error_line(stderr: str) -> str:
    """The single ``ctx-callback: error: ...`` line of ``stderr`` (and nothing else)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("ctx-callback: error: ") and "Traceback" not in stderr
    return lines[0]


def save_checkpoint(path: Path, model, tokenizer, state_dict=None) -> Path:
    """``save_pretrained`` (optionally with another state dict, as Trainer does for compiled models) + tokenizer."""
    model.save_pretrained(path, state_dict=state_dict)
    tokenizer.save_pretrained(path)
    return path


def rewrite_weights(path: Path, edit) -> None:
    """Replace ``path/model.safetensors`` by ``edit(tensors)``."""
    tensors = load_file(str(path / "model.safetensors"))
    save_file(edit(tensors), str(path / "model.safetensors"), metadata={"format": "pt"})


def scan(run: Path, probes_file: Path, capsys, *extra: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what saving printed
    code = main(["scan", str(run), "--probes", str(probes_file), "--device", "cpu", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def expected_metrics(model, tokenizer, probes_file: Path) -> dict[str, float]:
    return ProbeScorer(load_probes(str(probes_file)), tokenizer, "chat").score(model.eval()).metrics


# ----------------------------------------------------------------------------------------------------------------
# 1. Checkpoints whose weights do not match the model
# ----------------------------------------------------------------------------------------------------------------


def _drop_layer_1(tensors):
    return {k: v for k, v in tensors.items() if ".layers.1." not in k}


def _add_extra(tensors):
    return {**tensors, "model.extra_head.weight": torch.zeros(4, 4)}


def _orig_mod_and_missing(tensors):
    return {f"_orig_mod.{k}": v for k, v in _drop_layer_1(tensors).items()}


def _drop_lm_head(tensors):
    assert "lm_head.weight" in tensors  # an untied model saves its head
    return {k: v for k, v in tensors.items() if k != "lm_head.weight"}


@pytest.mark.parametrize("breakage, untied, edit", [
    ("missing", False, _drop_layer_1),
    ("unexpected", False, _add_extra),
    ("orig_mod_and_missing", False, _orig_mod_and_missing),
    ("untied_lm_head_missing", True, _drop_lm_head),
])
def test_scan_skips_checkpoint_with_missing_keys(breakage, untied, edit, tokenizer, probes_file, tmp_path, capsys):
    """A checkpoint whose weights do not match its config is skipped (warning, not recorded, retried), not scored
    with randomly initialised weights; a good tied-embedding checkpoint (no lm_head.weight saved) still scores."""
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoint-1", make_tiny_llama(tokenizer, seed=1), tokenizer)
    broken = save_checkpoint(run / "checkpoint-2",
                             make_tiny_llama(tokenizer, seed=2, tie_word_embeddings=not untied), tokenizer)
    rewrite_weights(broken, edit)
    good3 = make_tiny_llama(tokenizer, seed=3)
    save_checkpoint(run / "checkpoint-3", good3, tokenizer)

    code, out, err = scan(run, probes_file, capsys)
    assert code == 0, err
    warning_lines = [line for line in err.splitlines() if "warning" in line]
    assert len(warning_lines) == 1 and "skipping checkpoint-2: CheckpointMismatchError" in warning_lines[0], err
    assert "[2/3] checkpoint-2 ... failed" in err and "Traceback" not in err
    data = json.loads((run / SCAN_JSON).read_text())
    assert [row["step"] for row in data["rows"]] == [1, 3]
    assert data["peak"]["checkpoint"] != "checkpoint-2"
    assert not re.search(r"^\s*2\*?\s+checkpoint-2", out, re.MULTILINE)
    # checkpoint-3 (tied embeddings: no lm_head.weight on disk) scored with its own weights.
    scored = {row["step"]: row["metrics"] for row in data["rows"]}
    assert scored[3] == pytest.approx(expected_metrics(good3, tokenizer, probes_file), abs=1e-5, nan_ok=True)

    # Not recorded: the next run retries it (and only it).
    code, _, err = scan(run, probes_file, capsys)
    assert code == 0 and err.count("... cached") == 2 and "[2/3] checkpoint-2 ... failed" in err


def test_scan_scores_compiled_checkpoint_with_orig_mod_prefix(tokenizer, probes_file, tmp_path, capsys):
    """Weights saved from a torch.compile'd model carry ``_orig_mod.`` prefixes: mapped, and scored normally."""
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoint-1", make_tiny_llama(tokenizer, seed=1), tokenizer)
    model = make_tiny_llama(tokenizer, seed=2)
    # What Trainer does for a compiled model: save_pretrained(state_dict=<the compiled module's state dict>).
    compiled_state = torch.compile(model).state_dict()
    assert all(key.startswith("_orig_mod.") for key in compiled_state)
    save_checkpoint(run / "checkpoint-2", model, tokenizer, state_dict=compiled_state)
    assert all(key.startswith("_orig_mod.") for key in load_file(str(run / "checkpoint-2" / "model.safetensors")))

    code, _, err = scan(run, probes_file, capsys)
    assert code == 0, err
    assert "warning" not in err, err
    rows = json.loads((run / SCAN_JSON).read_text())["rows"]
    assert [row["step"] for row in rows] == [1, 2]
    assert rows[1]["metrics"] == pytest.approx(expected_metrics(model, tokenizer, probes_file), abs=1e-5,
                                               nan_ok=True)


def test_probe_command_rejects_checkpoint_with_missing_keys(tokenizer, probes_file, tmp_path, capsys):
    broken = save_checkpoint(tmp_path / "broken", make_tiny_llama(tokenizer, seed=2), tokenizer)
    rewrite_weights(broken, _drop_layer_1)
    capsys.readouterr()
    assert main(["probe", str(broken), "--probes", str(probes_file), "--device", "cpu"]) == 2
    line = error_line(capsys.readouterr().err)
    assert "does not match the model" in line and "model.layers.1." in line


def test_load_weights_into_maps_orig_mod_prefix(tmp_path, tokenizer):
    saved, target = make_tiny_llama(tokenizer, seed=1), make_tiny_llama(tokenizer, seed=2)
    saved.save_pretrained(tmp_path, state_dict=torch.compile(saved).state_dict())
    load_weights_into(target, tmp_path)
    assert all(torch.equal(x, y) for x, y in zip(saved.state_dict().values(), target.state_dict().values()))
    # A compiled live model is unwrapped too.
    compiled_target = torch.compile(make_tiny_llama(tokenizer, seed=3))
    load_weights_into(compiled_target, tmp_path)
    assert all(torch.equal(x, y) for x, y in zip(saved.state_dict().values(),
                                                  compiled_target._orig_mod.state_dict().values()))


def test_load_weights_into_orig_mod_with_missing_keys_still_raises(tmp_path, tokenizer):
    model = make_tiny_llama(tokenizer)
    state = {f"_orig_mod.{k}": v.clone() for k, v in model.state_dict().items()
             if ".layers.1." not in k and k != "lm_head.weight"}
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"missing \['model\.layers\.1\."):
        load_weights_into(make_tiny_llama(tokenizer), tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# 2. Answers that contain each other ("York" vs "New York")
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("output, hits", [
    ("New York", [False, True]),
    ("York is nice", [True, False]),
    ("New York and York", [True, True]),
    ("It is new york, not york.", [True, True]),
    ("Paris", [False, False]),
    ("The Big Apple", [False, True]),  # an alias of the longer answer
    ("the big apple york", [True, True]),
])
def test_generation_hit_for_contained_answer_only_outside_longer_answer(output, hits):
    counterfactual, parametric = ("York",), ("New York", "Big Apple")
    assert matching.match_answers(output, [counterfactual, parametric]) == hits
    # The order of the answer groups does not matter.
    assert matching.match_answers(output, [parametric, counterfactual]) == hits[::-1]


def test_generation_contained_alias_and_identical_alias():
    # The contained answer is an alias ("NY" inside "NY City"); an alias shared by both answers hits both.
    assert matching.match_answers("I live in NY City", [("New York", "NY"), ("NY City",)]) == [False, True]
    assert matching.match_answers("somewhere", [("here", "somewhere"), ("there", "somewhere")]) == [True, True]
    assert matching.match_answers("", [("a",), ("b",)]) == [False, False]


def _new_york_model(tokenizer):
    """A tiny Llama that always answers "New York": the layers add nothing (zeroed output projections), so the
    next token depends on the last one only: anything -> " New" -> " York" -> <|im_end|>."""
    model = make_tiny_llama(tokenizer, seed=3, tie_word_embeddings=False)
    new, york = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in (" New", " York"))
    assert len(new) == 1 and len(york) == 1
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed = model.model.embed_tokens.weight
        embed.zero_()
        embed[:, 0] = 1.0
        embed[new[0]] = 0.0
        embed[new[0], 1] = 1.0
        embed[york[0]] = 0.0
        embed[york[0], 2] = 1.0
        head = model.lm_head.weight
        head.zero_()
        head[new[0], 0] = 10.0
        head[york[0], 1] = 10.0
        head[end, 2] = 10.0
    return model


def test_generation_new_york_is_no_hit_for_york(tokenizer):
    rows = [
        {"id": "city/york", "family": "city", "context": "The meeting is in York.", "question": "Where is it?",
         "counterfactual_answer": "York", "parametric_answer": "New York"},
        {"id": "city/new_york", "family": "city", "context": "The meeting is in New York.",
         "question": "Where is it?", "counterfactual_answer": "New York", "parametric_answer": "York"},
        {"id": "city/alias", "family": "city", "context": "The meeting is in York.", "question": "Where is it?",
         "counterfactual_answer": "York", "parametric_answer": "Manhattan", "parametric_aliases": ["New York"]},
    ]
    scorer = ProbeScorer(probes_from_records(rows), tokenizer, mode="generate", variants=("context",),
                         max_new_tokens=4)
    report = scorer.score(_new_york_model(tokenizer))
    records = {r["id"]: r for r in report.records}
    assert {r["context_generation"] for r in report.records} == {"New York"}
    hits = {pid: (r["context_counterfactual_hit"], r["context_parametric_hit"]) for pid, r in records.items()}
    assert hits == {"city/york": (0.0, 1.0), "city/new_york": (1.0, 0.0), "city/alias": (0.0, 1.0)}
    assert report.metrics["ctx_reliance/both_rate"] == 0.0


def test_load_warns_once_about_answers_that_contain_each_other(tmp_path):
    rows = capital_records(3)
    rows[0].update(counterfactual_answer="York", parametric_answer="New York", context="It is York.")
    # An alias of the parametric answer ("Milan") inside the counterfactual answer ("Milan Centrale").
    rows[2]["parametric_aliases"] = ["the Rome of the North", "Milan"]
    rows[2]["counterfactual_answer"] = "Milan Centrale"
    rows[2]["context"] = "The capital of Italy is Milan Centrale."
    path = tmp_path / "overlap.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(UserWarning) as record:
        probes = load_probes(str(path))
    assert len(probes) == 3
    overlap = [w for w in record if "contain each other" in str(w.message)]
    assert len(overlap) == 1, [str(w.message) for w in record]
    message = str(overlap[0].message)
    assert "'capitals/france'" in message and "'capitals/italy'" in message and "'capitals/japan'" not in message
    # The built-in suites and clean files load without it.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_probes(capital_records())
        load_probes("all")


# ----------------------------------------------------------------------------------------------------------------
# 3. UTF-8 files with a byte-order mark
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_probe_files_with_utf8_bom_load(tmp_path, suffix):
    rows = capital_records(3)
    text = json.dumps(rows) if suffix == ".json" else "".join(json.dumps(r) + "\n" for r in rows)
    path = tmp_path / f"bom{suffix}"
    path.write_bytes(codecs.BOM_UTF8 + text.encode("utf-8"))
    probes = load_probes(str(path))
    assert [p.id for p in probes] == [r["id"] for r in rows]
    # A directory of such files too.
    assert [p.id for p in load_probes(str(tmp_path))] == [r["id"] for r in rows]


# ----------------------------------------------------------------------------------------------------------------
# 4. ProbeScorer used directly checks the model's position limit
# ----------------------------------------------------------------------------------------------------------------


def test_probe_scorer_checks_model_position_limit(tokenizer, capital_probes):
    scorer = ProbeScorer(capital_probes, tokenizer)  # no max_length: the model is not known yet
    longest = max(item.total_length for item in scorer.encoded.items)
    short = make_tiny_llama(tokenizer, max_position_embeddings=16)
    with pytest.raises(ProbeLengthError, match=r"maximum length of 16 tokens: 'capitals/france'"):
        scorer.score(short)
    with pytest.raises(ProbeLengthError, match=r"maximum length of 16 tokens"):
        scorer.known_probe_indices(short)
    with pytest.raises(ProbeLengthError, match=r"maximum length of 16 tokens"):
        scorer.score_raw(short, [1])
    # A model that fits exactly scores, as often as asked.
    fits = make_tiny_llama(tokenizer, max_position_embeddings=longest)
    assert scorer.score(fits).metrics[MONITOR] == scorer.score(fits).metrics[MONITOR]
    with pytest.raises(ProbeLengthError, match=rf"maximum length of {longest - 1} tokens"):
        scorer.score(make_tiny_llama(tokenizer, max_position_embeddings=longest - 1))


# ----------------------------------------------------------------------------------------------------------------
# 5. Command line and messages
# ----------------------------------------------------------------------------------------------------------------


def test_probe_missing_hub_model_names_the_model(probes_file, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["probe", "nobody/no-such-model", "--probes", str(probes_file), "--device", "cpu"]) == 2
    line = error_line(capsys.readouterr().err)
    assert "could not load model 'nobody/no-such-model'" in line
    assert "tokenizer" not in line


def test_probe_missing_model_dir_without_config_names_the_model(tokenizer, probes_file, tmp_path, capsys):
    tokenizer.save_pretrained(tmp_path)  # tokenizer files, but no model
    capsys.readouterr()
    assert main(["probe", str(tmp_path), "--probes", str(probes_file), "--device", "cpu"]) == 2
    assert f"could not load model {str(tmp_path)!r}" in error_line(capsys.readouterr().err)


def test_probe_length_error_reports_each_probe_once(tokenizer, capital_probes):
    items = ProbeScorer(capital_probes, tokenizer).encoded.items
    longest = {}
    for item in items:
        if item.total_length > longest.get(item.probe_index, (None, 0))[1]:
            longest[item.probe_index] = (item.variant, item.total_length)
    with pytest.raises(ProbeLengthError) as info:
        ProbeScorer(capital_probes, tokenizer, max_length=20)
    message = str(info.value)
    assert message.startswith(f"{len(capital_probes)} probe(s) do not fit the model's maximum length of 20 tokens: ")
    assert message.count("'capitals/france'") == 1 and message.count("'capitals/japan'") == 1
    variant, length = longest[0]
    assert f"'capitals/france' ({variant}: {length} tokens)" in message


def test_scan_without_scorable_checkpoint_writes_no_results(tokenizer, probes_file, tmp_path, capsys):
    run = tmp_path / "run"
    broken = save_checkpoint(run / "checkpoint-1", make_tiny_llama(tokenizer, seed=1), tokenizer)
    (broken / "model.safetensors").write_bytes(b"this is not a safetensors file" * 10)

    code, out, err = scan(run, probes_file, capsys)
    assert code == 1
    assert "ctx-callback: error: no checkpoint could be scored" in err
    assert not (run / SCAN_JSON).exists() and not (run / SCAN_CSV).exists()
    assert "results:" not in out

    # An existing results file (another run's, in the same --output-dir) is left as it was.
    good_run, results = tmp_path / "good_run", tmp_path / "results"
    save_checkpoint(good_run / "checkpoint-1", make_tiny_llama(tokenizer, seed=1), tokenizer)
    code, _, err = scan(good_run, probes_file, capsys, "--output-dir", str(results))
    assert code == 0, err
    before = {name: (results / name).read_bytes() for name in (SCAN_JSON, SCAN_CSV)}
    assert json.loads(before[SCAN_JSON])["rows"]
    code, _, err = scan(run, probes_file, capsys, "--output-dir", str(results))
    assert code == 1 and "no checkpoint could be scored" in err
    assert {name: (results / name).read_bytes() for name in (SCAN_JSON, SCAN_CSV)} == before
    assert main(["plot", str(results / SCAN_JSON), "-o", str(tmp_path / "curve.png")]) == 0
