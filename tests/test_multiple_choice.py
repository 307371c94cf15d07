"""N-way multiple-choice probes: schema and validation, rendering, scoring against a hand loop, mixed rounds with
two-answer probes, metrics, generation mode, shards and records (tiny real Llama, real SmolLM2 tokenizer)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctx_callback import ProbeFormatError, ProbeScorer, ScoreResult, load_probes, probes_from_records
from ctx_callback.matching import option_label
from tests.helpers import LOGLIK_ATOL, METRIC_ATOL, capital_records, make_tiny_llama

# (country, true capital, counterfactual city, two more options)
MC_CAPITALS = [
    ("France", "Paris", "Lyon", "Marseille", "Nice"),
    ("Japan", "Tokyo", "Osaka", "Kyoto", "Nagoya"),
    ("Italy", "Rome", "Milan", "Naples", "Turin"),
    ("Germany", "Berlin", "Munich", "Hamburg", "Cologne"),
]


def mc_records(with_parametric: bool = True, family: str = "mc", list_options: bool = False):
    rows = []
    for i, (country, true, fake, a, b) in enumerate(MC_CAPITALS):
        options = [true, fake, a, b]
        options = options[i % 4:] + options[: i % 4]  # the answers sit at different positions
        row = {"id": f"{family}/{country.lower()}", "family": family,
               "context": f"The capital of {country} is {fake}.", "question": f"What is the capital of {country}?",
               "counterfactual_answer": fake, "options": options, "list_options": list_options}
        if with_parametric:
            row["parametric_answer"] = true
        rows.append(row)
    return rows


def mixed_probes():
    """Four-way MC probes (parametric known; options listed in the prompt), MC probes without a parametric answer
    (options not listed), and two-answer probes."""
    return probes_from_records(mc_records(list_options=True) + mc_records(False, "mc_nopar") + capital_records(4))


# -- schema and validation ---------------------------------------------------------------------------------------


def test_multiple_choice_probe_properties_and_rendering():
    probe = probes_from_records(mc_records())[1]  # Japan: options rotated by one
    assert probe.is_multiple_choice
    assert probe.options == ("Osaka", "Kyoto", "Nagoya", "Tokyo")
    assert probe.answers == probe.options
    assert (probe.counterfactual_index, probe.parametric_index) == (0, 3)
    assert probe.prompt_question == probe.question  # by default the options are not shown, only scored
    listed = probes_from_records(mc_records(list_options=True))[1]
    assert listed.prompt_question == "What is the capital of Japan?\nA. Osaka\nB. Kyoto\nC. Nagoya\nD. Tokyo"
    assert probe.aligned() == listed.aligned() == "The capital of Japan is Tokyo."
    # round trip through the native format
    for p in (probe, listed):
        assert probes_from_records([p.to_dict()])[0] == p
    # two-answer probes are unchanged: no options in their dict, the question as it is
    two = probes_from_records(capital_records(1))[0]
    assert not two.is_multiple_choice and "options" not in two.to_dict() and "list_options" not in two.to_dict()
    assert two.answers == ("Lyon", "Paris") and two.prompt_question == two.question
    assert (two.counterfactual_index, two.parametric_index) == (0, 1)


def test_multiple_choice_without_a_parametric_answer():
    probe = probes_from_records(mc_records(False))[0]
    assert probe.parametric_answer is None and probe.parametric_index is None
    assert probe.aligned() is None  # no true fact to write into the context
    # the record form detects as native without a parametric_answer column
    assert load_probes([dict(r) for r in mc_records(False)])[0] == probe


def test_answers_are_matched_to_the_options_as_written():
    row = mc_records()[0]
    row["counterfactual_answer"], row["parametric_answer"] = "  lyon ", "PARIS"
    probe = probes_from_records([row])[0]
    assert (probe.counterfactual_answer, probe.parametric_answer) == ("Lyon", "Paris")


def _bad(**changes):
    row = mc_records()[0]
    row.update(changes)
    return row


@pytest.mark.parametrize("row, match", [
    (_bad(counterfactual_answer="Bordeaux"), r"'counterfactual_answer' \('Bordeaux'\) is not one of the options"),
    (_bad(parametric_answer="Bordeaux"), r"'parametric_answer' \('Bordeaux'\) is not one of the options"),
    (_bad(options=["Paris", "Lyon", "paris"]), r"repeats 'paris' \(options 0 and 2 are identical"),
    (_bad(options=[]), r"field 'options' is empty"),
    (_bad(options=["Lyon"]), r"has one option"),
    (_bad(options=["Paris", "Lyon", ""]), r"option 2 is ''"),
    (_bad(options=["Paris", "Lyon", 3]), r"option 2 is 3"),
    (_bad(options="Paris, Lyon"), r"must be a list of answer strings"),
    (_bad(parametric_answer="Lyon"), r"are identical"),
    (_bad(list_options="yes"), r"'list_options' must be true or false"),
])
def test_bad_multiple_choice_records_name_the_probe_and_the_field(row, match):
    with pytest.raises(ProbeFormatError, match=match) as info:
        probes_from_records([row], source="mc.jsonl")
    assert "mc.jsonl" in str(info.value) and "probe 'mc/france'" in str(info.value)


def test_list_options_needs_options():
    row = dict(capital_records(1)[0], list_options=True)
    with pytest.raises(ProbeFormatError, match="'list_options' is true but the probe has no 'options'"):
        probes_from_records([row])


def test_a_two_answer_probe_still_needs_its_parametric_answer():
    row = capital_records(1)[0]
    del row["parametric_answer"]
    with pytest.raises(ProbeFormatError, match="missing required field 'parametric_answer'"):
        probes_from_records([row], format="ctx_callback")


def test_overlapping_options_warn_once():
    row = _bad(options=["Paris", "Lyon", "New Lyon"])
    with pytest.warns(UserWarning, match="contain each other"):
        load_probes([row])


# -- scoring: equal to a per-option unbatched computation ------------------------------------------------------------


def _hand_scores(model, item):
    """log p(option | prompt), one unbatched forward pass per option: the reference."""
    out = []
    for answer in item.answer_ids:
        ids = torch.tensor([list(item.prompt_ids) + list(answer)])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        p = len(item.prompt_ids)
        out.append(sum(float(logp[p - 1 + k, tok]) for k, tok in enumerate(answer)))
    return out


@pytest.mark.parametrize("engine", ["auto", "batched", "simple"])
def test_multiple_choice_scores_equal_a_per_option_hand_loop(tokenizer, engine):
    model = make_tiny_llama(tokenizer, seed=5)
    probes = mixed_probes()
    scorer = ProbeScorer(probes, tokenizer, engine=engine, max_batch_tokens=400)
    if engine == "auto":
        assert scorer.active_engine == "prefix"  # the prompt's cache shared over all options
    result = scorer.score_raw(model)
    assert result.option_scores is not None and result.option_scores.shape == (len(probes), 3, 4)
    np.testing.assert_array_equal(result.option_roles, [(p.counterfactual_index, -1 if p.parametric_index is None
                                                         else p.parametric_index) for p in probes])
    checked = 0
    for item in scorer.encoded.items:
        probe = probes[item.probe_index]
        col = result.variants.index(item.variant)
        listed = [f"\n{'ABCD'[i]}. {o}" in item.prompt_text for i, o in enumerate(probe.options)]
        assert listed == [probe.list_options] * len(probe.options)
        assert len(item.answer_ids) == len(probe.answers)
        expected = _hand_scores(model, item)
        got = result.option_scores[item.probe_index, col, : len(expected)]
        # One unbatched pass per option, log-softmax in float64, against the engine's batches and float32 per-token
        # log-probabilities: equal up to float32 rounding (measured up to 5.1e-6 on AVX2); see LOGLIK_ATOL.
        np.testing.assert_allclose(got, expected, atol=LOGLIK_ATOL, rtol=0)
        assert np.isnan(result.option_scores[item.probe_index, col, len(expected):]).all()
        cf = probe.counterfactual_index
        assert result.scores[item.probe_index, col, 0] == pytest.approx(expected[cf], abs=LOGLIK_ATOL)
        rival = max(v for i, v in enumerate(expected) if i != cf)
        assert result.scores[item.probe_index, col, 1] == pytest.approx(rival, abs=LOGLIK_ATOL)
        checked += 1
    assert checked == len(scorer.encoded.items) == 4 * 3 + 4 * 2 + 4 * 3  # no aligned row without a parametric


def _expected_metrics(probes, options, variants):
    """The main metrics recomputed from the option scores by hand, for one group of probes."""
    col = {v: i for i, v in enumerate(variants)}

    def wins(row, variant, index):
        values = options[row, col[variant], : len(probes[row].answers)]
        if np.isnan(values[index]):
            return None
        return all(values[index] > v for i, v in enumerate(values) if i != index)

    def mean(values):
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else float("nan")

    rows = range(len(probes))
    par = {r: probes[r].parametric_index for r in rows}
    cf = {r: probes[r].counterfactual_index for r in rows}
    return {
        "counterfactual_accuracy": mean([wins(r, "context", cf[r]) for r in rows]),
        "parametric_accuracy": mean([wins(r, "context", par[r]) if par[r] is not None else None for r in rows]),
        "closed_book_accuracy": mean([wins(r, "closed_book", par[r]) if par[r] is not None else None for r in rows]),
        "aligned_accuracy": mean([wins(r, "aligned", par[r]) if par[r] is not None else None for r in rows]),
        "logprob_margin": mean([options[r, 0, cf[r]] - max(v for i, v in enumerate(
            options[r, 0, : len(probes[r].answers)]) if i != cf[r]) for r in rows]),
        "context_lift": mean([options[r, 0, cf[r]] - options[r, 1, cf[r]] for r in rows]),
    }


def test_a_mixed_round_gives_the_documented_metrics_per_family(tokenizer):
    model = make_tiny_llama(tokenizer, seed=6)
    probes = mixed_probes()
    scorer = ProbeScorer(probes, tokenizer)
    report = scorer.score(model)
    result, metrics = report.result, report.metrics
    assert metrics["ctx_reliance/num_probes"] == 12
    for family in ("mc", "mc_nopar", "capitals"):
        rows = [i for i, p in enumerate(probes) if p.family == family]
        expected = _expected_metrics([probes[i] for i in rows], result.option_scores[rows], result.variants)
        for name, value in expected.items():
            key = f"ctx_reliance/{family}/{name}"
            if np.isnan(value):
                assert np.isnan(metrics[key]), key
            else:
                assert metrics[key] == pytest.approx(value, abs=1e-9), key
    # the parametric metrics skip MC probes without a parametric answer, over all probes too
    assert np.isnan(metrics["ctx_reliance/mc_nopar/parametric_accuracy"])
    known = [i for i, p in enumerate(probes) if p.parametric_index is not None]
    all_expected = _expected_metrics([probes[i] for i in known], result.option_scores[known], result.variants)
    assert metrics["ctx_reliance/parametric_accuracy"] == pytest.approx(all_expected["parametric_accuracy"])
    # the two-answer probes score as they do alone, up to float32 summation order (other batch-mates and padding:
    # see LOGLIK_ATOL, METRIC_ATOL)
    alone = ProbeScorer(probes_from_records(capital_records(4)), tokenizer).score(model)
    assert alone.result.option_scores is None
    rows = [i for i, p in enumerate(probes) if p.family == "capitals"]
    np.testing.assert_allclose(result.scores[rows], alone.result.scores, atol=LOGLIK_ATOL, rtol=0)
    for key, value in alone.metrics.items():
        family_key = key.replace("ctx_reliance/", "ctx_reliance/capitals/") if key.count("/") == 1 else key
        assert metrics[family_key] == pytest.approx(value, abs=METRIC_ATOL), key


def test_counterfactual_wins_exactly_when_its_option_scores_highest(tokenizer):
    """The scores[..., 0] > scores[..., 1] invariant, against the option scores."""
    result = ProbeScorer(mixed_probes(), tokenizer).score_raw(make_tiny_llama(tokenizer, seed=7))
    probes = mixed_probes()
    for r, probe in enumerate(probes):
        for c in range(len(result.variants)):
            values = result.option_scores[r, c, : len(probe.answers)]
            if np.isnan(values).all():
                continue
            argmax_is_cf = int(np.argmax(values)) == probe.counterfactual_index
            assert (result.scores[r, c, 0] > result.scores[r, c, 1]) == argmax_is_cf


def test_shards_of_a_mixed_round_merge_to_the_full_result(tokenizer):
    model = make_tiny_llama(tokenizer, seed=8)
    scorer = ProbeScorer(mixed_probes(), tokenizer, variants=("context", "closed_book"))
    full = scorer.score_raw(model)
    shards = [scorer.score_raw(model, range(r, 12, 2)) for r in (1, 0)]
    merged = ScoreResult.merge(shards)
    # Each shard runs other batches than the full round: equal up to float32 summation order (one float32 spacing of
    # a per-token log-probability, 9.5e-7, measured here already); see LOGLIK_ATOL and METRIC_ATOL.
    np.testing.assert_allclose(merged.option_scores, full.option_scores, atol=LOGLIK_ATOL, rtol=0)
    np.testing.assert_array_equal(merged.option_roles, full.option_roles)
    assert scorer.metrics(merged) == pytest.approx(scorer.metrics(full), abs=METRIC_ATOL, nan_ok=True)
    # a shard result built without options (two answers only) pads into the merged table
    two = ScoreResult(np.array([99]), full.variants, np.zeros((1, 2, 2)))
    both = ScoreResult.merge([full, two])
    assert both.option_scores.shape == (13, 2, 4) and tuple(both.option_roles[-1]) == (0, 1)


def test_records_carry_every_option_score(tokenizer):
    report = ProbeScorer(mixed_probes(), tokenizer, variants=("context",)).score(make_tiny_llama(tokenizer))
    by_id = {r["id"]: r for r in report.records}
    france = by_id["mc/france"]
    assert france["options"] == ["Paris", "Lyon", "Marseille", "Nice"]
    assert len(france["context_option_logprobs"]) == 4
    assert france["context_counterfactual_logprob"] == pytest.approx(france["context_option_logprobs"][1])
    assert france["context_parametric_logprob"] == pytest.approx(france["context_option_logprobs"][0])
    assert by_id["mc_nopar/france"]["context_parametric_logprob"] is None
    assert "options" not in by_id["capitals/france"]


def test_known_only_selection_needs_the_parametric_option_to_win(tokenizer):
    model = make_tiny_llama(tokenizer, seed=9)
    probes = mixed_probes()
    scorer = ProbeScorer(probes, tokenizer)
    kept, counts = scorer.known_probe_indices(model)
    result = scorer.score_raw(model)
    col = result.variants.index("closed_book")
    for r, probe in enumerate(probes):
        values = result.option_scores[r, col, : len(probe.answers)]
        expected = probe.parametric_index is not None and int(np.argmax(values)) == probe.parametric_index
        assert (r in kept) == expected, probe.id
    assert counts["mc_nopar"] == {"kept": 0, "total": 4}


# -- generation mode --------------------------------------------------------------------------------------------------


def _model_that_always_says(tokenizer, text, seed=3):
    """An lm_head whose bias always picks the single token ``text``."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, ids
    model = make_tiny_llama(tokenizer, seed=seed)
    head = torch.nn.Linear(32, len(tokenizer), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[ids[0]] = 10.0
    model.lm_head = head
    model.config.tie_word_embeddings = False
    return model


def test_generation_mode_matches_the_output_against_every_option(tokenizer):
    model = _model_that_always_says(tokenizer, " Lyon")
    probes = probes_from_records(mc_records()[:2] + mc_records(False, "mc_nopar")[:1] + capital_records(1))
    # France MC: Lyon is the counterfactual option; Japan MC: Lyon is no option; France two-answer: Lyon is the cf.
    scorer = ProbeScorer(probes, tokenizer, mode="generate", max_new_tokens=1, variants=("context", "closed_book"))
    report = scorer.score(model)
    result = report.result
    assert [r["context_generation"] for r in report.records] == ["Lyon"] * 4
    np.testing.assert_array_equal(result.option_scores[0, 0], [0, 1, 0, 0])  # France MC: options Paris, Lyon, ...
    np.testing.assert_array_equal(result.option_scores[1, 0], [0, 0, 0, 0])  # Japan MC
    m = report.metrics
    assert m["ctx_reliance/mc/counterfactual_accuracy"] == 0.5
    assert m["ctx_reliance/mc/parametric_accuracy"] == 0.0
    assert m["ctx_reliance/mc/neither_rate"] == 0.5
    assert m["ctx_reliance/mc_nopar/counterfactual_accuracy"] == 1.0
    assert np.isnan(m["ctx_reliance/mc_nopar/parametric_accuracy"])
    assert np.isnan(m["ctx_reliance/mc_nopar/memorization_ratio"])
    assert m["ctx_reliance/counterfactual_accuracy"] == 0.75
    assert m["ctx_reliance/memorization_ratio"] == 0.0


def test_generation_mode_reads_an_option_letter_where_the_options_are_listed(tokenizer):
    model = _model_that_always_says(tokenizer, "B")
    # France: B = Lyon (counterfactual); Japan: B = Kyoto; unlisted France: "B" names nothing
    probes = probes_from_records(mc_records(list_options=True)[:2] + mc_records(family="plain")[:1])
    report = ProbeScorer(probes, tokenizer, mode="generate", max_new_tokens=1, variants=("context",)).score(model)
    assert [r["context_generation"] for r in report.records] == ["B", "B", "B"]
    m = report.metrics
    assert m["ctx_reliance/mc/counterfactual_accuracy"] == 0.5
    assert m["ctx_reliance/mc/both_rate"] == 0.0
    assert m["ctx_reliance/mc/neither_rate"] == 0.0  # Japan's B names Kyoto: another option
    assert m["ctx_reliance/plain/neither_rate"] == 1.0


@pytest.mark.parametrize("text, count, expected", [
    ("B", 4, 1), ("(C)", 4, 2), ("D. Tokyo", 4, 3), ("A) Paris", 4, 0), ("B: Lyon", 4, 1),
    ("A dog barks", 4, None), ("E", 4, None), ("Paris", 4, None), ("Bordeaux", 4, None), ("B.x", 4, None),
])
def test_option_label(text, count, expected):
    assert option_label(text, count) == expected


# -- the metric table with options (pure numpy) -----------------------------------------------------------------------


def test_compute_metrics_reads_the_parametric_option_and_counts_ties_as_no_win():
    from ctx_callback import ConfigurationError, compute_metrics

    nan = float("nan")
    options = np.array([[[-1.0, -2.0, -3.0]],      # cf (0) wins; parametric (2) last
                        [[-2.0, -1.0, -1.0]],      # parametric (1) ties with option 2: no win for anyone
                        [[-3.0, -1.0, nan]],       # a two-answer row: (cf, par)
                        [[-5.0, -4.0, -1.0]]])     # parametric unknown: option 2 wins
    roles = np.array([[0, 2], [0, 1], [0, 1], [1, -1]])
    scores = np.stack([np.array([o[0][r[0]] for o, r in zip(options, roles)]),
                       np.array([max(v for i, v in enumerate(o[0]) if i != r[0] and not np.isnan(v))
                                 for o, r in zip(options, roles)])], axis=-1)[:, None, :]
    m = compute_metrics(scores, ["f"] * 4, ["context"], per_family=False, option_scores=options, option_roles=roles)
    assert m["ctx_reliance/counterfactual_accuracy"] == 0.25       # only row 0
    assert m["ctx_reliance/parametric_accuracy"] == pytest.approx(1 / 3)  # row 2 of rows 0-2; row 3 skipped
    assert m["ctx_reliance/logprob_margin"] == pytest.approx(np.mean([1.0, -1.0, -2.0, -3.0]))
    with pytest.raises(ConfigurationError, match="go together"):
        compute_metrics(scores, ["f"] * 4, ["context"], option_scores=options)
    with pytest.raises(ConfigurationError, match=r"option_roles must have shape \[probes, 2\]"):
        compute_metrics(scores, ["f"] * 4, ["context"], option_scores=options, option_roles=roles[:2])


# -- per-probe outcomes (the paired tests, the probe log) read the options as the metrics do ---------------------------


@pytest.mark.parametrize("seed", [6, 11])
def test_per_probe_outcomes_of_a_mixed_round_average_to_the_logged_metrics(tokenizer, seed):
    from ctx_callback.metrics import METRICS
    from ctx_callback.outcomes import metric_outcomes, preferred_vector, probe_rows

    model = make_tiny_llama(tokenizer, seed=seed)
    probes = mixed_probes()
    report = ProbeScorer(probes, tokenizer).score(model)
    result, metrics = report.result, report.metrics
    options = {"options": result.option_scores, "option_roles": result.option_roles}
    checked = 0
    for spec in METRICS:
        outcomes = metric_outcomes(result.scores, result.variants, result.mode, spec.name, **options)
        key = f"ctx_reliance/{spec.name}"
        if outcomes is None or key not in metrics:
            continue
        assert np.nanmean(np.asarray(outcomes, dtype=float)) == pytest.approx(metrics[key], abs=1e-9), spec.name
        checked += 1
    assert checked >= 6
    # Without the options, the parametric outcomes of the MC probes would be read from their strongest rival.
    par_with = metric_outcomes(result.scores, result.variants, result.mode, "parametric_accuracy", **options)
    nopar = [i for i, p in enumerate(probes) if p.family == "mc_nopar"]
    assert np.isnan(np.asarray(par_with, dtype=float)[nopar]).all()
    preferred = preferred_vector(result.scores, result.variants, result.mode, **options)
    rows = probe_rows(10, [p.id for p in probes], [p.family for p in probes], result.scores, result.variants,
                      result.mode, **options)
    for r, (row, label) in enumerate(zip(rows, preferred)):
        assert row["preferred"] == label
        opts = result.option_scores[r, result.variants.index("context")]
        cf_pos, par_pos = result.option_roles[r]
        assert row["cf"] == pytest.approx(opts[cf_pos], abs=1e-5)  # probe rows round to 5 decimals (<= 5e-6 off)
        if par_pos < 0:
            assert row["par"] is None
            assert label in ("context", "other")
        else:
            assert row["par"] == pytest.approx(opts[par_pos], abs=1e-5)
            winner = int(np.nanargmax(opts))
            assert label == ("context" if winner == cf_pos else "memory" if winner == par_pos else "other")
