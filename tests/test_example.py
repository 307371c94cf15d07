"""The README's main job, shrunk: the example script runs end to end on the real SmolLM2 (2 steps)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "finetune_smollm2.py"


def load_example():
    spec = importlib.util.spec_from_file_location("finetune_smollm2", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_data_holds_out_the_probed_facts():
    example = load_example()
    from ctx_callback import load_probes

    probed, train = example.split_probes(load_probes("all"))
    assert not {p.id for p in probed} & {p.id for p in train}
    assert abs(len(probed) - len(train)) <= 3
    data = example.demo_dataset(train, copy_examples=16, memory_examples=30)
    assert len(data) == 46
    copy, memory = data[:16]["messages"], data[16:]["messages"]
    train_by_question = {p.question: p for p in train}
    for messages in copy:  # context-critical: the answer is the context's counterfactual
        probe = next(p for q, p in train_by_question.items() if messages[0]["content"].endswith(q))
        assert messages[1]["content"] == probe.counterfactual_answer
    for messages in memory:  # memory-heavy: the answer is always the true fact
        probe = next(p for q, p in train_by_question.items() if messages[0]["content"].endswith(q))
        assert messages[1]["content"] == probe.parametric_answer


def test_example_runs_end_to_end(tmp_path, smollm2_dir):
    example = load_example()
    out = tmp_path / "run"
    summary = example.main(["--output-dir", str(out), "--max-steps", "2", "--copy-steps", "1", "--batch-size", "2",
                            "--eval-steps", "1", "--probes-per-family", "2", "--report-to", "tensorboard"])
    assert summary["baseline_step"] == 0 and summary["final_step"] == 2
    assert summary["probe_events"] == 3
    assert (out / "ctx_reliance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "example_summary.json").read_text())["final_step"] == 2
    assert list(out.glob("runs/*/events.out.tfevents.*"))
