"""The harder probe suite ``ctx_callback/data/conflicts_hard.jsonl`` (built by scripts/build_hard_suite.py)."""

from __future__ import annotations

import collections
import importlib.util
import json
from pathlib import Path

from ctx_callback import load_probes

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "ctx_callback" / "data" / "conflicts_hard.jsonl"


def _builder():
    spec = importlib.util.spec_from_file_location("build_hard_suite", ROOT / "scripts" / "build_hard_suite.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_file_is_what_the_builder_writes():
    built = _builder().build()
    on_disk = [json.loads(line) for line in SUITE.read_text(encoding="utf-8").splitlines()]
    assert on_disk == json.loads(json.dumps(built))


def test_loads_validates_and_splits_into_two_halves_that_share_no_fact():
    probes = load_probes(str(SUITE))
    assert len(probes) == 124 and len({p.id for p in probes}) == 124
    counts = collections.Counter((p.family, p.metadata["split"]) for p in probes)
    assert counts == {("hard_strong", "A"): 24, ("hard_strong", "B"): 24, ("hard_distractor", "A"): 24,
                      ("hard_distractor", "B"): 24, ("hard_inference", "A"): 14, ("hard_inference", "B"): 14}
    relations = collections.defaultdict(set)
    for p in probes:
        relations[p.metadata["split"]].add((p.metadata["relation"], p.question))
    assert not relations["A"] & relations["B"]
    for p in probes:
        if p.family == "hard_distractor":
            # the counterfactual sentence is in the context once, among true sentences of the same half
            assert p.context.count(p.counterfactual_answer) == 1
            assert p.aligned_context.count(p.parametric_answer) >= 1


def test_it_is_not_part_of_all_and_shares_no_question_with_the_built_in_suites():
    builtin = load_probes("all")
    assert not any(p.family.startswith("hard_") for p in builtin)  # the example's published numbers are unchanged
    questions = {p.question for p in builtin}
    assert not questions & {p.question for p in load_probes(str(SUITE))}


def test_it_loads_by_name_alone_and_joined_with_all():
    by_path = load_probes(str(SUITE))
    by_name = load_probes("conflicts_hard")
    assert [p.id for p in by_name] == [p.id for p in by_path] and len(by_name) == 124
    joined = load_probes("all+conflicts_hard")
    assert len(joined) == len(load_probes("all")) + len(by_name)
