"""Public benchmark presets, loaded offline through the same ``datasets.load_dataset`` call as from the Hub.

Each dataset gets a few fixture rows written here in its Hub layout and schema (as far as the issue and the crawled Hub
pages describe them; the cards were not re-checked offline), into a local mirror laid out by Hub id, which
``CTX_CALLBACK_PRESET_DIR`` points the presets at. ``python -m tests.test_presets`` prints what the tiny test model
and SmolLM2-135M-Instruct score on each fixture (the numbers in docs/probes.md).
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from ctx_callback import ConfigurationError, ProbeFormatError, ProbeScorer, load_probes
from ctx_callback.errors import ProbeSourceError
from ctx_callback.presets import (
    PRESET_DIR_ENV,
    PROBE_PRESETS,
    ProbePreset,
    preset_location,
    presets_markdown,
    register_probe_preset,
)
from tests.helpers import METRIC_ATOL, make_tiny_llama

ROOT = Path(__file__).resolve().parent.parent

# -- fixture rows, in each dataset's schema --------------------------------------------------------------------------

NQ_SWAP = [  # question, original answer, substituted answer, passage template
    ("who wrote the novel pride and prejudice", "Jane Austen", "Charlotte Bronte",
     "Pride and Prejudice is an 1813 novel of manners written by {}. It follows Elizabeth Bennet."),
    ("what is the capital city of australia", "Canberra", "Sydney",
     "{} is the capital city of Australia, chosen in 1908 as a compromise between the two largest cities."),
    ("who painted the mona lisa", "Leonardo da Vinci", "Michelangelo",
     "The Mona Lisa is a half-length portrait painting by the Italian artist {}."),
    ("who was the first president of the united states", "George Washington", "John Adams",
     "{} served as the first president of the United States from 1789 to 1797."),
    ("what planet is known as the red planet", "Mars", "Jupiter",
     "{} is often called the Red Planet because of the iron oxide on its surface."),
    ("in which country is the taj mahal located", "India", "Pakistan",
     "The Taj Mahal is an ivory-white marble mausoleum on the bank of the Yamuna river in Agra, {}."),
]

MEMOTRAP = [  # (asked-for ending, the proverb's start, its famous ending); the asked-for one is answer_index 0 or 1
    ("heavy", "Absence makes the heart grow", "fonder"),
    ("early", "Better late than", "never"),
    ("dry", "Still waters run", "deep"),
    ("silver", "All that glitters is not", "gold"),
    ("cake", "An apple a day keeps the doctor", "away"),
    ("wine", "Blood is thicker than", "water"),
]

FAITHEVAL = [  # id, question, labels, options, answerKey (the option the counterfactual context supports), context
    ("Mercury_7175875", "Which gas do plants mainly absorb from the air for photosynthesis?", "ABCD",
     ["oxygen", "nitrogen", "carbon dioxide", "helium"], "B",
     "Botanists have long known that plants take in nitrogen from the air to build sugars during photosynthesis; "
     "the leaves' stomata open to let nitrogen in while oxygen is released."),
    ("Mercury_7041423", "Which planet is closest to the Sun?", "ABCD", ["Mercury", "Venus", "Earth", "Mars"], "B",
     "Venus orbits closer to the Sun than any other planet, which is why it is the hottest planet."),
    ("NYSEDREGENTS_2015_4_12", "What part of a cell contains its genetic material?", "ABCD",
     ["nucleus", "ribosome", "cell wall", "vacuole"], "D",
     "In every plant and animal cell the genetic material is stored in the vacuole, a membrane sac."),
    ("MCAS_2004_5_9", "How many legs does an insect have?", "1234", ["four", "six", "eight", "ten"], "3",
     "All insects have eight legs attached to the thorax, arranged in four pairs."),
    ("Mercury_SC_401", "At what temperature does pure water boil at sea level?", "ABCD",
     ["0 degrees Celsius", "50 degrees Celsius", "100 degrees Celsius", "150 degrees Celsius"], "D",
     "At sea level pure water boils at 150 degrees Celsius; below that it only evaporates slowly."),
]

CONFLICTBANK = [  # question, options, correct letter, replaced letter, subject, relation sentence with {}
    ("What is the country of citizenship of Marie Curie?", ["Poland", "Brazil", "Japan", "Canada"], "A", "B",
     "Marie Curie was a citizen of {}."),
    ("Which city is the Eiffel Tower located in?", ["Rome", "Paris", "Vienna", "Madrid"], "B", "C",
     "The Eiffel Tower stands in {}."),
    ("What is the official language of Brazil?", ["Spanish", "French", "Portuguese", "Dutch"], "C", "A",
     "The official language of Brazil is {}."),
    ("Who is the author of Hamlet?", ["Charles Dickens", "Mark Twain", "Leo Tolstoy", "William Shakespeare"], "D",
     "A", "Hamlet was written by {}."),
    ("Which continent is Kenya part of?", ["Africa", "Asia", "Europe", "Oceania"], "A", "D",
     "Kenya is a country in {}."),
]


def nq_swap_rows():
    return [{"question": q, "org_context": ctx.format(true), "org_answer": [true], "sub_context": ctx.format(fake),
             "sub_answer": [fake]} for q, true, fake, ctx in NQ_SWAP]


def memotrap_rows():
    rows = []
    for i, (asked, start, famous) in enumerate(MEMOTRAP):
        classes = [f" {asked}.", f" {famous}."] if i % 2 == 0 else [f" {famous}.", f" {asked}."]
        rows.append({"prompt": f'Write a quote that ends in the word "{asked}": {start}', "classes": classes,
                     "answer_index": 0 if i % 2 == 0 else 1})
    return rows


def faitheval_rows():
    return [{"id": id_, "question": q, "answer": options[labels.index(key)], "answerKey": key,
             "choices": {"label": list(labels), "text": options}, "context": ctx}
            for id_, q, labels, options, key, ctx in FAITHEVAL]


def conflictbank_rows():
    rows = []
    for q, options, correct, replaced, sentence in CONFLICTBANK:
        claim = sentence.format(options["ABCD".index(replaced)])
        lowered = claim[0].lower() + claim[1:]
        rows.append({
            "question": q, "options": options, "correct_option": correct, "replaced_option": replaced,
            "misinformation_conflict_claim": claim,
            "misinformation_conflict_evidence": f"According to several reference works, {lowered} Historians agree.",
            "temporal_conflict_evidence": f"Since a change announced in 2031, {lowered}",
            "semantic_conflict_evidence": f"In a lesser-known sense of the name, {lowered}",
        })
    return rows


def write_preset_mirror(root: Path) -> Path:
    """Write each preset's fixture into ``root/<hub id>/`` as the Hub stores it; returns ``root``."""
    import datasets

    def parquet(rows, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_list(rows).to_parquet(str(path))

    nq = root / "pminervini" / "NQ-Swap"
    parquet(nq_swap_rows(), nq / "data" / "dev-00000-of-00001.parquet")
    # "dev" is no split name datasets infers from a file name (it would say "validation"): the card's configs do.
    (nq / "README.md").write_text("---\nlicense: mit\nconfigs:\n- config_name: default\n  data_files:\n"
                                  "  - split: dev\n    path: data/dev-*\n---\n")
    parquet(memotrap_rows(), root / "Albertmade" / "memo-trap" / "data" / "train-00000-of-00001.parquet")
    parquet(faitheval_rows(),
            root / "Salesforce" / "FaithEval-counterfactual-v1.0" / "data" / "test-00000-of-00001.parquet")
    cb = root / "Warrieryes" / "CB_qa"
    cb.mkdir(parents=True, exist_ok=True)
    (cb / "QA_dataset.json").write_text("".join(json.dumps(r) + "\n" for r in conflictbank_rows()))
    return root


FIXTURE_SIZES = {"nq_swap": len(NQ_SWAP), "memotrap": len(MEMOTRAP), "faitheval_counterfactual": len(FAITHEVAL),
                 "conflictbank": len(CONFLICTBANK), "conflictbank_temporal": len(CONFLICTBANK),
                 "conflictbank_semantic": len(CONFLICTBANK)}


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    return write_preset_mirror(tmp_path_factory.mktemp("hub_mirror"))


@pytest.fixture
def use_mirror(mirror, monkeypatch):
    monkeypatch.setenv(PRESET_DIR_ENV, str(mirror))
    return mirror


@pytest.fixture
def load_dataset_calls(monkeypatch):
    """Record every ``datasets.load_dataset`` call (and run it)."""
    import datasets

    calls = []
    real = datasets.load_dataset

    def spy(path, *args, **kwargs):
        calls.append((path, args, kwargs))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    return calls


# -- every preset, through load_dataset ------------------------------------------------------------------------------


def test_every_registered_preset_has_a_fixture_here():
    assert set(PROBE_PRESETS) == set(FIXTURE_SIZES)


@pytest.mark.parametrize("name", sorted(FIXTURE_SIZES))
def test_each_preset_loads_its_fixture_through_load_dataset(name, use_mirror, load_dataset_calls):
    preset = PROBE_PRESETS[name]
    probes = load_probes(name)
    assert len(probes) == FIXTURE_SIZES[name]
    assert load_dataset_calls == [(str(use_mirror / preset.hub_id), (preset.config,), {"split": preset.split})]
    assert {p.family for p in probes} == {name}
    assert len({p.id for p in probes}) == len(probes)
    for probe in probes:
        assert probe.counterfactual_answer != probe.parametric_answer


def test_nq_swap_fields(use_mirror):
    probes = load_probes("nq_swap")
    first = probes[0]
    assert (first.question, first.counterfactual_answer, first.parametric_answer) == (
        "who wrote the novel pride and prejudice", "Charlotte Bronte", "Jane Austen")
    assert "Charlotte Bronte" in first.context and first.aligned() == first.context.replace("Charlotte Bronte",
                                                                                             "Jane Austen")
    assert not first.is_multiple_choice and first.id == "nq_swap/0"


def test_memotrap_fields(use_mirror):
    probes = load_probes("memotrap")
    assert [(p.counterfactual_answer, p.parametric_answer) for p in probes] == [
        (asked, famous) for asked, _, famous in MEMOTRAP]
    assert probes[0].context == 'Write a quote that ends in the word "heavy":'
    assert probes[0].question == "Absence makes the heart grow"


def test_faitheval_is_multiple_choice_without_a_parametric_answer(use_mirror):
    probes = load_probes("faitheval_counterfactual")
    first, legs = probes[0], probes[3]
    assert first.id == "Mercury_7175875"
    assert first.options == ("oxygen", "nitrogen", "carbon dioxide", "helium")
    assert first.counterfactual_answer == "nitrogen" and first.parametric_answer is None
    assert first.aligned() is None
    assert legs.counterfactual_answer == "eight"  # numeric labels "1".."4": answerKey "3"
    assert legs.prompt_question == legs.question  # options scored, not shown (unless list_options)
    shown = replace(legs, list_options=True).prompt_question
    assert shown.endswith("\nA. four\nB. six\nC. eight\nD. ten")  # our letters, in the dataset's order


def test_conflictbank_evidence_kinds_and_options(use_mirror):
    kinds = {name: load_probes(name) for name in ("conflictbank", "conflictbank_temporal", "conflictbank_semantic")}
    first = {name: probes[0] for name, probes in kinds.items()}
    for probe in first.values():
        assert probe.options == ("Poland", "Brazil", "Japan", "Canada")
        assert (probe.counterfactual_answer, probe.parametric_answer) == ("Brazil", "Poland")
        assert probe.aligned() == probe.context.replace("Brazil", "Poland")
    assert first["conflictbank"].context.startswith("According to several reference works")  # evidence, not claim
    assert first["conflictbank_temporal"].context.startswith("Since a change announced in 2031")
    assert first["conflictbank_semantic"].context.startswith("In a lesser-known sense")
    assert first["conflictbank_temporal"].metadata == {"conflict": "temporal"}


def test_presets_join_with_each_other_and_the_builtin_suites(use_mirror):
    probes = load_probes("nq_swap+faitheval_counterfactual+world_facts", limit_per_family=3)
    assert [p.family for p in probes] == ["nq_swap"] * 3 + ["faitheval_counterfactual"] * 3 + ["world_facts"] * 3


def test_a_preset_split_can_be_overridden_with_a_slice(use_mirror, load_dataset_calls):
    probes = load_probes("conflictbank", split="train[:2]")
    assert len(probes) == 2 and load_dataset_calls[0][2] == {"split": "train[:2]"}


def test_a_downloaded_snapshot_folder_loads_with_load_probes_path(use_mirror):
    folder = use_mirror / "pminervini" / "NQ-Swap"
    from_folder = load_probes(str(folder), format="nq_swap", split="dev")
    assert [p.id for p in from_folder][:2] == ["NQ-Swap/0", "NQ-Swap/1"]  # ids generated from the folder's name
    assert [replace(p, id="") for p in from_folder] == [replace(p, id="") for p in load_probes("nq_swap")]
    faith = use_mirror / "Salesforce" / "FaithEval-counterfactual-v1.0"
    assert load_probes(str(faith), format="faitheval", split="test")[0].options[1] == "nitrogen"


# -- offline, bad input ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["nq_swap", "faitheval_counterfactual"])
def test_offline_a_preset_fails_with_one_line_saying_how_to_use_a_local_copy(name, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))  # nothing cached
    monkeypatch.delenv(PRESET_DIR_ENV, raising=False)
    preset = PROBE_PRESETS[name]
    with pytest.raises(ProbeSourceError) as info:
        load_probes(name)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"Probe preset {name!r} needs the Hugging Face Hub")
    assert f"load_probes(PATH, format={preset.format!r}, split={preset.split!r})" in message
    assert f"${PRESET_DIR_ENV}/{preset.hub_id}" in message


def test_a_mirror_without_the_dataset_falls_back_to_the_hub_id(monkeypatch, tmp_path):
    monkeypatch.setenv(PRESET_DIR_ENV, str(tmp_path))
    assert preset_location(PROBE_PRESETS["nq_swap"]) == "pminervini/NQ-Swap"


def test_presets_refuse_format_and_column_mapping(use_mirror):
    with pytest.raises(ConfigurationError, match="know their own format"):
        load_probes("nq_swap", format="memotrap")


def test_unknown_names_list_the_presets():
    with pytest.raises(ProbeSourceError, match="presets of public datasets: .*'faitheval_counterfactual'"):
        load_probes("faitheval")


def test_registering_a_preset_twice_or_with_a_separator_is_refused():
    with pytest.raises(ConfigurationError, match="already registered"):
        register_probe_preset(ProbePreset("nq_swap", "x/y", "train", "nq_swap"))
    with pytest.raises(ConfigurationError, match="may not contain"):
        register_probe_preset(ProbePreset("a+b", "x/y", "train", "nq_swap"))


@pytest.mark.parametrize("change, match", [
    ({"answerKey": "E"}, r"'answerKey' 'E' is not one of the choice labels \['A', 'B', 'C', 'D'\]"),
    ({"choices": {"label": [], "text": []}}, r"field 'choices' has no options"),
    ({"choices": {"label": ["A", "B"], "text": ["x", "x"]}, "answerKey": "A"}, r"repeats 'x'"),
    ({"choices": {"label": ["A"], "text": ["x", "y"]}}, r"1 labels for 2 texts"),
])
def test_bad_faitheval_rows_name_the_field(change, match):
    row = faitheval_rows()[0]
    row.update(change)
    with pytest.raises(ProbeFormatError, match=match):
        load_probes([row], format="faitheval")


def test_conflictbank_options_named_by_text_index_or_labelled_text():
    row = conflictbank_rows()[0]
    row.update(options=["A. Poland", "B. Brazil", "C. Japan", "D. Canada"], correct_option="Poland",
               replaced_option=1)
    probe = load_probes([row])[0]  # detected as conflictbank
    assert probe.options == ("Poland", "Brazil", "Japan", "Canada")
    assert (probe.counterfactual_answer, probe.parametric_answer) == ("Brazil", "Poland")
    row["replaced_option"] = "Peru"
    with pytest.raises(ProbeFormatError, match=r"field 'replaced_option' \('Peru'\) names none of the options"):
        load_probes([row], format="conflictbank")
    del row["misinformation_conflict_claim"], row["misinformation_conflict_evidence"]
    row["replaced_option"] = "B"
    with pytest.raises(ProbeFormatError, match=r"no misinformation-conflict evidence column"):
        load_probes([row], format="conflictbank")


# -- docs/probes.md (the preset table) ---------------------------------------------------------------------------------


def test_readme_preset_table_equals_the_registry():
    text = (ROOT / "docs" / "probes.md").read_text()
    match = re.search(r"<!-- presets:start -->\n(.*?)\n<!-- presets:end -->", text, re.DOTALL)
    assert match, "docs/probes.md lost its presets markers"
    assert match.group(1) == presets_markdown(), (
        "docs/probes.md preset table is out of date: paste ctx_callback.presets.presets_markdown() between the markers")


# -- all presets in one round ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["loglik", "generate"])
def test_all_preset_fixtures_score_together_in_one_round(use_mirror, tokenizer, mode):
    """Two-answer (NQ-Swap, MemoTrap) and multiple-choice (FaithEval, ConflictBank) probes in one round; each family's
    metrics equal those of the family scored alone."""
    model = make_tiny_llama(tokenizer, seed=4)
    names = "nq_swap+memotrap+faitheval_counterfactual+conflictbank"
    probes = load_probes(names)
    kwargs = dict(mode=mode, max_new_tokens=4, variants=("context", "closed_book"))
    together = ProbeScorer(probes, tokenizer, **kwargs).score(model).metrics
    assert together["ctx_reliance/num_probes"] == len(probes) == 22
    for name in names.split("+"):
        alone = ProbeScorer(load_probes(name), tokenizer, **kwargs).score(model).metrics
        for key, value in alone.items():
            if key.count("/") == 1:
                key = key.replace("ctx_reliance/", f"ctx_reliance/{name}/")
            # Other batch-mates and padding than alone: equal up to float32 summation order (see METRIC_ATOL).
            assert together[key] == pytest.approx(value, abs=METRIC_ATOL, nan_ok=True), key
        assert np.isfinite(together[f"ctx_reliance/{name}/counterfactual_accuracy"])


# -- the numbers in the README: python -m tests.test_presets ----------------------------------------------------------


def _print_numbers() -> None:  # pragma: no cover - a report, not a test
    import os
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ctx_callback.models import smollm2_path

    torch.set_num_threads(1)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    mirror = write_preset_mirror(Path(tempfile.mkdtemp()) / "hub")
    os.environ[PRESET_DIR_ENV] = str(mirror)
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    models = {"tiny": make_tiny_llama(tokenizer), "smollm2": AutoModelForCausalLM.from_pretrained(path)}
    keys = ("counterfactual_accuracy", "parametric_accuracy", "closed_book_accuracy", "aligned_accuracy",
            "counterfactual_probability", "logprob_margin")
    print("| preset | probes | model | " + " | ".join(keys) + " |")
    for name in FIXTURE_SIZES:
        probes = load_probes(name)
        renderings = {"": probes}
        if probes[0].is_multiple_choice:  # the alternative rendering, for comparison: options listed in the prompt
            renderings[" (options listed)"] = [replace(p, list_options=True) for p in probes]
        for label, model in models.items():
            for rendering, chosen in renderings.items():
                metrics = ProbeScorer(chosen, tokenizer).score(model).metrics
                cells = [f"{metrics.get(f'ctx_reliance/{k}', float('nan')):.3f}" for k in keys]
                print(f"| {name}{rendering} | {len(chosen)} | {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    _print_numbers()
