"""Two-sided reliance: the irrelevant-context variant, robustness, utilisation and the ambiguous rate, each checked
against a hand computation on a tiny model (issue 22)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctx_callback import ALL_VARIANTS, DEFAULT_VARIANTS, ProbeScorer, load_probes, probes_from_records
from ctx_callback.irrelevant import IrrelevantPassage, irrelevant_passages
from ctx_callback.matching import normalize_answer
from ctx_callback.metrics import AMBIGUITY_MARGIN, compute_metrics
from tests.helpers import capital_records, make_tiny_llama


def hand_logprob(model, prompt_ids, answer_ids) -> float:
    """log p(answer | prompt): one unbatched forward pass in float64 log-softmax (the reference)."""
    ids = torch.tensor([list(prompt_ids) + list(answer_ids)])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    p = len(prompt_ids)
    return sum(float(logp[p - 1 + i, t]) for i, t in enumerate(answer_ids))


# -- the passages -----------------------------------------------------------------------------------------------


def test_every_built_in_probe_gets_a_passage_of_its_own_relation_that_names_none_of_its_answers():
    probes = load_probes("world_facts+biographies+quotes")
    by_id = {p.id: p for p in probes}
    passages = irrelevant_passages(probes)
    assert all(passage is not None for passage in passages)
    def names_an_answer(probe, text):
        text = f" {normalize_answer(text)} "
        answers = (*probe.answers, *probe.parametric_aliases, *probe.counterfactual_aliases)
        return any(f" {normalize_answer(answer)} " in text for answer in answers)

    same_relation = 0
    for probe, passage in zip(probes, passages):
        source = by_id[passage.source_id]
        assert source.id != probe.id and source.family == probe.family
        assert passage.context == source.aligned() and passage.lure == source.parametric_answer
        assert not names_an_answer(probe, passage.context) and not names_an_answer(probe, passage.lure)
        if source.metadata["relation"] == probe.metadata["relation"]:
            same_relation += 1
        else:  # only when no other probe of its relation can serve (the same author for two characters, ...)
            for other in probes:
                if other.id != probe.id and other.metadata["relation"] == probe.metadata["relation"]:
                    assert names_an_answer(probe, other.aligned()), (probe.id, other.id)
    assert same_relation / len(probes) > 0.9
    assert irrelevant_passages(probes) == passages  # a function of the probe list alone


def test_pairing_skips_overlapping_partners_falls_back_to_the_context_and_gives_up_alone():
    records = [
        {"id": "a", "family": "f", "context": "The capital of France is Lyon.", "question": "Capital of France?",
         "counterfactual_answer": "Lyon", "parametric_answer": "Paris"},
        # Its aligned passage names Paris, probe a's answer: skipped as a's partner.
        {"id": "b", "family": "f", "context": "Texas has a town called Lyon.", "question": "Town in Texas?",
         "counterfactual_answer": "Lyon", "parametric_answer": "Paris"},
        # No aligned context can be built: its own (counterfactual) context and answer serve.
        {"id": "c", "family": "f", "context": "Mars is the largest planet.", "question": "Largest planet?",
         "counterfactual_answer": "Venus", "parametric_answer": "Jupiter"},
        {"id": "alone", "family": "g", "context": "The sky is green.", "question": "Sky colour?",
         "counterfactual_answer": "green", "parametric_answer": "blue"},
    ]
    passages = irrelevant_passages(probes_from_records(records))
    assert passages[0] == IrrelevantPassage("c", "Mars is the largest planet.", "Venus")
    assert passages[2] == IrrelevantPassage("a", "The capital of France is Paris.", "Paris")
    assert passages[3] is None  # no other probe in its family


# -- the scores and metrics, against a hand computation -------------------------------------------------------


@pytest.fixture(scope="module")
def scored(tokenizer):
    probes = probes_from_records(capital_records())
    model = make_tiny_llama(tokenizer, seed=3)
    scorer = ProbeScorer(probes, tokenizer, variants=ALL_VARIANTS)
    return probes, model, scorer, scorer.score(model)


def test_the_irrelevant_item_asks_the_question_after_the_partners_passage_with_lure_and_parametric(scored, tokenizer):
    probes, _, scorer, _ = scored
    items = {(i.probe_index, i.variant): i for i in scorer.encoded.items}
    for index, probe in enumerate(probes):
        passage = scorer.encoded.irrelevant[index]
        item = items[(index, "irrelevant")]
        assert passage.context in item.prompt_text and probe.question in item.prompt_text
        assert probe.context not in item.prompt_text
        lure, par = (tokenizer.decode(ids) for ids in item.answer_ids)
        assert lure.strip() == passage.lure and par.strip() == probe.parametric_answer


def test_robustness_utilisation_and_ambiguity_equal_a_hand_computation(scored):
    probes, model, scorer, report = scored
    items = {(i.probe_index, i.variant): i for i in scorer.encoded.items}
    hand = {key: [hand_logprob(model, item.prompt_ids, ids) for ids in item.answer_ids] for key, item in items.items()}
    n = len(probes)
    margins = [hand[(i, "context")][0] - hand[(i, "context")][1] for i in range(n)]
    robust = [hand[(i, "irrelevant")][1] > hand[(i, "irrelevant")][0] for i in range(n)]
    follows = [m > 0 for m in margins]
    aligned = [hand[(i, "aligned")][1] > hand[(i, "aligned")][0] for i in range(n)]
    # A random model's margins sit far from 0 compared with float noise (else an accuracy could flip by noise).
    assert min(abs(hand[k][0] - hand[k][1]) for k in hand) > 1e-3
    m = report.metrics
    assert m["ctx_reliance/irrelevant_robustness"] == pytest.approx(np.mean(robust))
    assert m["ctx_reliance/utilisation"] == pytest.approx(np.mean([f and a and r for f, a, r in
                                                                   zip(follows, aligned, robust)]))
    assert m["ctx_reliance/ambiguous_rate"] == pytest.approx(np.mean([abs(x) < AMBIGUITY_MARGIN for x in margins]))
    assert 0 < m["ctx_reliance/ambiguous_rate"] < 1  # the tiny model has both kinds: the comparison is not vacuous
    # The utilisation's parts are logged alongside it.
    assert m["ctx_reliance/counterfactual_accuracy"] == pytest.approx(np.mean(follows))
    assert m["ctx_reliance/aligned_accuracy"] == pytest.approx(np.mean(aligned))


def test_metrics_from_a_hand_built_table():
    # Columns: context, aligned, irrelevant; [..., 0] = counterfactual (lure), [..., 1] = parametric.
    scores = np.array([
        [[-1.0, -3.0], [-4.0, -1.0], [-5.0, -2.0]],   # follows, aligned right, ignores the lure: utilised
        [[-1.0, -1.5], [-4.0, -1.0], [-1.0, -2.0]],   # follows (ambiguous: 0.5 nat), falls for the lure
        [[-3.0, -1.0], [-1.0, -2.0], [-5.0, -2.0]],   # answers from memory, aligned wrong, robust
        [[np.nan, np.nan], [-4.0, -1.0], [np.nan, np.nan]],  # not scored
    ])
    m = compute_metrics(scores, ["f"] * 4, ("context", "aligned", "irrelevant"))
    assert m["ctx_reliance/irrelevant_robustness"] == pytest.approx(2 / 3)
    assert m["ctx_reliance/utilisation"] == pytest.approx(1 / 3)
    assert m["ctx_reliance/ambiguous_rate"] == pytest.approx(1 / 3)
    generated = np.array([[[1, 0], [0, 1], [0, 1]], [[1, 0], [0, 1], [1, 1]], [[1, 1], [0, 1], [0, 0]]], float)
    g = compute_metrics(generated, ["f"] * 3, ("context", "aligned", "irrelevant"), mode="generate")
    # Robust: the parametric answer named and the lure not (probe 2 names both, probe 3 neither).
    assert g["ctx_reliance/irrelevant_robustness"] == pytest.approx(1 / 3)
    assert g["ctx_reliance/utilisation"] == pytest.approx(1 / 3)
    assert "ctx_reliance/ambiguous_rate" not in g  # log-likelihood only


def test_generation_mode_matches_the_lure_not_the_counterfactual_answer(tokenizer):
    passage = IrrelevantPassage("x", "The capital of Japan is Tokyo.", "Tokyo")
    probe = probes_from_records(capital_records(1))[0]
    assert passage.hits(probe, "It is Tokyo.") == [True, False]
    assert passage.hits(probe, "Paris, not Lyon.") == [False, True]


def test_multiple_choice_probes_are_scored_on_their_options_after_the_passage(tokenizer):
    records = [{"id": f"mc{i}", "family": "mc", "context": f"The capital of {c} is {fake}.",
                "question": f"What is the capital of {c}?", "counterfactual_answer": fake, "parametric_answer": true,
                "options": [true, fake, "Oslo"]} for i, (c, true, fake) in enumerate(
                    [("France", "Paris", "Lyon"), ("Japan", "Tokyo", "Osaka"), ("Italy", "Rome", "Milan")])]
    probes = probes_from_records(records)
    model = make_tiny_llama(tokenizer, seed=1)
    scorer = ProbeScorer(probes, tokenizer, variants=ALL_VARIANTS)
    result = scorer.score_raw(model)
    column = result.variants.index("irrelevant")
    hand = [[hand_logprob(model, item.prompt_ids, ids) for ids in item.answer_ids]
            for item in scorer.encoded.items if item.variant == "irrelevant"]
    np.testing.assert_allclose(result.option_scores[:, column, :3], hand, atol=1e-4)
    expected = np.mean([row[0] > max(row[1:]) for row in hand])  # the true option (first) beats every other
    assert scorer.metrics(result)["ctx_reliance/irrelevant_robustness"] == pytest.approx(expected)


def test_the_irrelevant_variant_is_opt_in_and_a_control(tokenizer):
    assert "irrelevant" in ALL_VARIANTS and "irrelevant" not in DEFAULT_VARIANTS
    probes = probes_from_records(capital_records(3))
    scorer = ProbeScorer(probes, tokenizer)
    assert scorer.variants == DEFAULT_VARIANTS and scorer.encoded.irrelevant is None
    model = make_tiny_llama(tokenizer)
    metrics = ProbeScorer(probes, tokenizer, variants=ALL_VARIANTS).score(model, variants=("context",)).metrics
    assert not any(k.endswith(("irrelevant_robustness", "utilisation")) for k in metrics)


# -- which part of the probes carries the decline --------------------------------------------------------------


def test_decline_shares_by_hand():
    from ctx_callback.decline_share import decline_shares, shares_from_counts

    per_probe = np.array([0.3, 0.1, np.nan, -0.1, 0.2])
    families = ["a", "a", "a", "b", "b"]
    relations = ["a/x", "a/y", "a/x", None, "b/z"]
    total = 0.3 + 0.1 - 0.1 + 0.2
    assert decline_shares(per_probe, families, relations) == pytest.approx({
        "ctx_reliance/decline_share/a": 0.4 / total, "ctx_reliance/decline_share/b": 0.1 / total,
        "ctx_reliance/decline_share/a/x": 0.3 / total, "ctx_reliance/decline_share/a/y": 0.1 / total,
        "ctx_reliance/decline_share/b/z": 0.2 / total})
    assert decline_shares(-per_probe, families, relations) == {}  # no decline: nothing to split
    assert decline_shares(None, families) == {}
    assert shares_from_counts({"a": 3.0, "b": -1.0}) == {"a": 1.5, "b": -0.5}


def test_a_real_run_logs_the_decline_split_the_two_sided_controls_and_the_probe_log_fields(tokenizer, tmp_path):
    from ctx_callback import ContextRelianceCallback
    from ctx_callback.probe_log import compute_flips, read_probe_rows
    from tests.helpers import make_trainer

    records = capital_records()
    for i, record in enumerate(records):  # two families, three relations
        record["family"] = "east" if i % 2 else "west"
        record["metadata"] = {"relation": "capital" if i < 4 else "seat"}
    model = make_tiny_llama(tokenizer)
    trainer = make_trainer(model, tokenizer, tmp_path, max_steps=30)
    callback = ContextRelianceCallback(trainer, records, eval_steps=5, variants=ALL_VARIANTS, controls_every=2,
                                       monitor="counterfactual_probability", verbose=False)
    trainer.add_callback(callback)
    trainer.train()
    rows = [r for r in trainer.state.log_history if "ctx_reliance/num_probes" in r]
    assert [r["step"] for r in rows] == [0, 5, 10, 15, 20, 25, 30]
    for event, row in enumerate(rows):  # the controls on the slower clock, as the other controls
        assert ("ctx_reliance/utilisation" in row) == (event % 2 == 0)
        assert ("ctx_reliance/irrelevant_robustness" in row) == ("ctx_reliance/aligned_accuracy" in row)
    log = read_probe_rows(tmp_path / "ctx_reliance_probes.jsonl")
    assert {r["relation"] for r in log} == {"capital", "seat"}
    assert all(("robust" in r) == (r["step"] in (0, 10, 20, 30)) for r in log)
    final = rows[-1]
    peak_step = int(final["ctx_reliance/peak_step"])
    assert final["ctx_reliance/decline_from_peak"] > 0.05, "the run must decline for the split to mean anything"

    def p_cf(step):
        return {r["id"]: 1 / (1 + np.exp(-(r["cf"] - r["par"]))) for r in log if r["step"] == step}

    before, after = p_cf(peak_step), p_cf(30)
    decline = {i: before[i] - after[i] for i in before}
    total = sum(decline.values())
    family = {r["id"]: r["family"] for r in records}
    relation = {r["id"]: f"{r['family']}/{r['metadata']['relation']}" for r in records}
    expected = {}
    for probe_id, value in decline.items():
        for group in (family[probe_id], relation[probe_id]):
            key = f"ctx_reliance/decline_share/{group}"
            expected[key] = expected.get(key, 0.0) + value / total
    logged = {k: v for k, v in final.items() if k.startswith("ctx_reliance/decline_share/")}
    assert logged == pytest.approx(expected, abs=1e-3)  # the log rounds scores to 5 decimals
    assert sum(v for k, v in logged.items() if k.count("/") == 2) == pytest.approx(1.0)
    summary = callback.summary()
    assert summary["final_decline_shares"] == pytest.approx({k.split("/", 2)[2]: v for k, v in logged.items()})
    assert "share of the decline:" in callback.summary_text()
    # ctx-callback flips splits the counterfactual accuracy's decline by net flips to memory.
    report = compute_flips(log, peak_step, 30)
    net = {}
    for flip in report.flips:
        step = {"to_memory": 1, "to_context": -1}.get(flip.direction, 0)
        for group in (flip.family, f"{flip.family}/{flip.relation}"):
            net[group] = net.get(group, 0) + step
    total_net = sum(v for k, v in net.items() if "/" not in k)
    assert total_net > 0, "the accuracy must decline too"
    assert report.decline_shares() == pytest.approx({k: v / total_net for k, v in net.items()})
