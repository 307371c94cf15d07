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
    probes = load_probes("world_facts+biographies")
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


def test_instructions_are_never_lent_as_irrelevant_passages():
    # MemoTrap-style contexts ("Write a quote that ends in the word ...") apply to any question.
    quotes = load_probes("quotes")
    assert irrelevant_passages(quotes) == [None] * len(quotes)
    mixed = probes_from_records([{**r, "metadata": {"context_kind": "instruction"}} if i == 1 else r
                                 for i, r in enumerate(capital_records(3))])
    assert [p.source_id for p in irrelevant_passages(mixed)] == ["capitals/italy", "capitals/italy", "capitals/france"]


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
    from ctx_callback.decline_share import decline_shares, group_shares

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
    assert group_shares(np.array([3.0, -1.0]), ["a", "b"]) == {"a": 1.5, "b": -0.5}


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
    from ctx_callback.cli.flips import format_report

    listing = format_report(report)
    assert "share of the counterfactual accuracy's decline" in listing
    assert all(f"  {group}: " in listing for group in net)
    assert report.to_json()["decline_shares"] == report.decline_shares()


# -- known facts, checked with distractors ---------------------------------------------------------------------


def test_distractors_are_other_probes_answers_of_the_family_closest_in_token_length(tokenizer):
    from ctx_callback.known_facts import length_matched_distractors

    records = [{"id": f"p{i}", "family": "f", "context": f"c{i} is {fake}.", "question": f"q{i}?",
                "counterfactual_answer": fake, "parametric_answer": true}
               for i, (true, fake) in enumerate([("Paris", "Lyon"), ("Buenos Aires", "Rosario"), ("Rome", "Milan"),
                                                 ("Kuala Lumpur", "Penang"), ("Lyon", "Nice")])]
    records.append({**records[0], "id": "other", "family": "g"})
    probes = probes_from_records(records)
    length = {a: len(tokenizer(" " + a, add_special_tokens=False)["input_ids"])
              for a in ("Paris", "Buenos Aires", "Rome", "Kuala Lumpur", "Lyon")}
    chosen = length_matched_distractors(probes, tokenizer, 2)
    # p0 (Paris vs Lyon): Lyon is its own counterfactual answer, never a distractor; the rest by length distance.
    others = ["Buenos Aires", "Rome", "Kuala Lumpur"]
    expected = sorted(others, key=lambda a: (abs(length[a] - length["Paris"]), others.index(a)))[:2]
    assert list(chosen[0]) == expected
    assert all(len(c) == 2 and probes[i].parametric_answer not in c for i, c in enumerate(chosen[:5]))
    assert chosen[5] == ()  # alone in its family
    assert length_matched_distractors(probes, tokenizer, 0) == [()] * 6


def test_known_only_with_distractors_equals_a_hand_computation(tokenizer):
    from ctx_callback.known_facts import distractor_items, length_matched_distractors

    probes = probes_from_records(capital_records())
    model = make_tiny_llama(tokenizer)
    scorer = ProbeScorer(probes, tokenizer)
    plain, plain_counts = scorer.known_probe_indices(model)
    strict, counts = scorer.known_probe_indices(model, distractors=3)
    closed = {i.probe_index: i for i in scorer.encoded.items if i.variant == "closed_book"}
    hand_plain = [i for i, item in closed.items()
                  if hand_logprob(model, item.prompt_ids, item.answer_ids[1])
                  > hand_logprob(model, item.prompt_ids, item.answer_ids[0])]
    extra = distractor_items(probes, length_matched_distractors(probes, tokenizer, 3), tokenizer,
                             scorer.prompt_format)
    assert [len(item.answer_ids) for item in extra] == [4] * 7 and extra[0].prompt_ids == closed[0].prompt_ids
    beats = {item.probe_index: all(hand_logprob(model, item.prompt_ids, item.answer_ids[0])
                                   > hand_logprob(model, item.prompt_ids, ids) for ids in item.answer_ids[1:])
             for item in extra}
    assert plain == sorted(hand_plain)
    assert strict == [i for i in hand_plain if beats[i]]
    assert len(strict) < len(plain)  # the distractors removed some: the comparison is not vacuous
    assert counts == {"capitals": {"kept": len(strict), "total": 7, "known_without_distractors": len(plain)}}
    assert plain_counts == {"capitals": {"kept": len(plain), "total": 7}}


# -- labels checked against generation ----------------------------------------------------------------------------


def test_label_counts_by_hand():
    from ctx_callback.label_check import label_counts, sample_indices
    from ctx_callback.score_results import ScoreResult

    probes = probes_from_records(capital_records(4))
    scores = np.array([[[-1.0, -2.0]], [[-3.0, -1.0]], [[-1.0, -2.0]], [[-1.0, -2.0]]])  # labels cf, par, cf, cf
    result = ScoreResult(np.arange(4), ("context",), scores, None, "loglik", 0.0)
    texts = {0: "Lyon.", 1: "It is Osaka", 2: "Milan or Rome", 3: "I do not know"}  # agree, disagree, both, none
    assert label_counts(texts, result, probes) == (1, 2, 4)  # agree, undecided (both; neither), n
    assert sample_indices(range(10), 4) == [0, 3, 6, 9] and sample_indices([5, 1], 4) == [1, 5]


def test_the_label_check_on_smollm2_equals_a_hand_computation(smollm2_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    from ctx_callback.distributed import ProbePlan
    from ctx_callback.label_check import KEYS, label_row

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    probes = load_probes("world_facts", limit_per_family=12)
    scorer = ProbeScorer(probes, tokenizer, max_new_tokens=12)
    result = scorer.score_raw(model, variants=("context",))
    sample = [0, 2, 4, 6, 8, 10]
    row = label_row(scorer, model, ProbePlan(list(range(12)), 0, 1, False), sample, result)
    agree = undecided = 0
    for index in sample:  # one unbatched greedy generation per probe; a substring test of the answers
        item = next(i for i in scorer.encoded.items if i.probe_index == index and i.variant == "context")
        with torch.no_grad():
            out = model.generate(torch.tensor([item.prompt_ids]), max_new_tokens=12, do_sample=False)
        text = tokenizer.decode(out[0, len(item.prompt_ids):], skip_special_tokens=True).lower()
        named = [answer.lower() in text for answer in probes[index].answers]
        if sum(named) != 1:
            undecided += 1
        else:
            cf, par = result.scores[index, 0]
            agree += named.index(True) == (0 if cf > par else 1)
    assert row[KEYS["probes"]] == 6
    assert row[KEYS["agreement"]] == pytest.approx(agree / 6)
    assert row[KEYS["undecided_rate"]] == pytest.approx(undecided / 6)
    assert row[KEYS["agreement"]] >= 0.5  # a real model mostly says what its log-likelihoods prefer
    assert row[KEYS["agreement_ci_low"]] <= row[KEYS["agreement"]] <= row[KEYS["agreement_ci_high"]]


# -- attention to the context --------------------------------------------------------------------------------------


def test_attention_shares_equal_a_hand_computation_with_an_eager_model(tokenizer):
    from ctx_callback.attention import ContextSpans, context_shares

    probes = probes_from_records(capital_records())
    model = make_tiny_llama(tokenizer, seed=2)
    eager = make_tiny_llama(tokenizer, seed=2, attn_implementation="eager")
    assert model.config._attn_implementation == "sdpa"
    scorer = ProbeScorer(probes, tokenizer)
    spans = ContextSpans(scorer.encoded.items, probes, tokenizer, False)
    shares = context_shares(model, spans, range(len(probes)))
    assert model.config._attn_implementation == "sdpa"  # restored
    for item in (i for i in scorer.encoded.items if i.variant == "context"):
        # The context's tokens by decoding the prompt token by token (not by offsets).
        start = item.prompt_text.index(probes[item.probe_index].context)
        end = start + len(probes[item.probe_index].context)
        position, inside = 0, []
        for t, token in enumerate(item.prompt_ids):
            piece = tokenizer.decode([token])
            if position < end and position + len(piece) > start and piece:
                inside.append(t)
            position += len(piece)
        with torch.no_grad():
            attentions = eager(input_ids=torch.tensor([item.prompt_ids]), output_attentions=True).attentions
        last = len(item.prompt_ids) - 1
        hand = [float(layer[0, :, last, inside].sum(-1).mean()) for layer in attentions]
        np.testing.assert_allclose(shares[item.probe_index], hand, atol=1e-6)
        assert 0 < min(hand) and max(hand) < 1


def test_eager_attention_restores_the_implementation_after_an_error(tokenizer):
    from ctx_callback.attention import eager_attention

    model = make_tiny_llama(tokenizer)
    with pytest.raises(RuntimeError, match="boom"), eager_attention(model):
        assert model.config._attn_implementation == "eager"
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


def test_training_with_every_diagnostic_is_bit_identical_to_training_without(tokenizer, tmp_path):
    from ctx_callback import ContextRelianceCallback
    from tests.helpers import make_trainer

    finals = []
    for name, extra in (("plain", {}), ("checked", dict(label_check_every=1, attention_every=1, diagnostic_probes=4,
                                                           variants=ALL_VARIANTS, max_new_tokens=3))):
        model = make_tiny_llama(tokenizer)
        trainer = make_trainer(model, tokenizer, tmp_path / name, max_steps=6)
        callback = ContextRelianceCallback(trainer, capital_records(), eval_steps=2, verbose=False, **extra)
        trainer.add_callback(callback)
        trainer.train()
        rows = [r for r in trainer.state.log_history if "ctx_reliance/num_probes" in r]
        assert len(rows) == 4
        if extra:
            assert all(r["ctx_reliance/label_check/probes"] == 4 and r["ctx_reliance/attention/probes"] == 4
                       for r in rows)
            assert all(f"ctx_reliance/attention/layer_{i:02d}" in rows[0] for i in range(2))
        assert model.config._attn_implementation == "sdpa" and model.training
        finals.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    assert finals[0].keys() == finals[1].keys()
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])


def test_diagnostic_arguments_are_checked(tokenizer):
    from ctx_callback import ContextRelianceCallback
    from ctx_callback.errors import ConfigurationError

    for kwargs, match in ((dict(label_check_every=0), "label_check_every must be None"),
                          (dict(attention_every=True), "attention_every must be None"),
                          (dict(diagnostic_probes=0), "diagnostic_probes must be an integer"),
                          (dict(label_check_every=2, mode="generate"), "needs mode='loglik'"),
                          (dict(known_only=True, known_distractors=-1), "known_distractors must be")):
        with pytest.raises(ConfigurationError, match=match):
            ContextRelianceCallback(None, capital_records(), tokenizer=tokenizer, **kwargs)
