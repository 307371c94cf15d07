"""The callback (not only the scorer) with multiple-choice probes, for every preset's shape (issue 20, item 3).

Shapes: two-answer presets (``nq_swap``, ``memotrap``), N-way multiple choice without a parametric option
(``faitheval_counterfactual``: a winning rival is always "other"), N-way with one (the three ``conflictbank`` presets: a
third option can win), options listed in the prompt (``list_options=True``), and all of them mixed in one round. A
probe whose preferred option is neither the counterfactual nor the parametric one is ``"other"``; before the fix that
label crashed the callback at the baseline (``KeyError: 'other'`` while exporting the resume state).

Real parts only: the SmolLM2 tokenizer, a tiny random Llama, a real SFTTrainer, the presets' fixture rows (written in
each dataset's Hub layout by ``tests.test_presets``) loaded through ``datasets.load_dataset``.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest

from ctx_callback import ConfigurationError, ContextRelianceCallback, load_probes, probes_from_records
from ctx_callback.callback import STATE_KEY
from ctx_callback.outcomes import PROBES_FILE, read_probe_rows
from ctx_callback.presets import PRESET_DIR_ENV, PROBE_PRESETS
from tests.helpers import conflict_dataset, make_tiny_llama, make_trainer
from tests.test_multiple_choice import mc_records
from tests.test_presets import write_preset_mirror

CF_PROB = "ctx_reliance/counterfactual_probability"
#: The preferred answers the probe log documents (``ctx_callback.outcomes``), ``"other"`` included.
PREFERRED_LABELS = ("context", "memory", "tie", "both", "neither", "other")
#: Every registered preset, in one probe set (two-answer and multiple-choice probes in one round).
ALL_PRESETS = "+".join(PROBE_PRESETS)
#: Keys of a probe row that compare the event with the peak and the previous event (read the kept preferred answers).
#: The options of the module's run (and of its resume).
MC_OPTIONS = dict(stop_rule="significant_decline", controls_every=4)
PAIRED_KEYS = ("ctx_reliance/decline_from_peak", "ctx_reliance/decline_p_value", "ctx_reliance/flips_to_memory",
               "ctx_reliance/flips_to_context", "ctx_reliance/flips_since_previous")


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """The presets' fixture rows in a local Hub mirror, which ``CTX_CALLBACK_PRESET_DIR`` points the presets at."""
    root = write_preset_mirror(tmp_path_factory.mktemp("hub_mirror"))
    patch = pytest.MonkeyPatch()
    patch.setenv(PRESET_DIR_ENV, str(root))
    yield root
    patch.undo()


@pytest.fixture(scope="module")
def every_shape(mirror):
    """Every preset's probes, plus four-way probes with their options listed in the prompt."""
    return load_probes(ALL_PRESETS) + probes_from_records(mc_records(list_options=True, family="mc_listed"))


def train(tokenizer, output_dir, probes, *, max_steps, resume=None, extra_callbacks=(), trainer_kwargs=None,
          **options):
    """A tiny SFT run (14 examples, batch 7) probed at every step."""
    model = make_tiny_llama(tokenizer)
    trainer = make_trainer(model, tokenizer, output_dir, dataset=conflict_dataset(1, 1), max_steps=max_steps,
                           **(trainer_kwargs or {}))
    callback = ContextRelianceCallback(trainer, probes, **{"eval_steps": 1, "verbose": False, **options})
    trainer.add_callback(callback)
    for extra in extra_callbacks:
        trainer.add_callback(extra)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, callback


def probe_rows(trainer):
    return {r["step"]: r for r in trainer.state.log_history if CF_PROB in r}


@pytest.fixture(scope="module")
def mc_run(tokenizer, every_shape, tmp_path_factory):
    """Every shape in one run with ``stop_rule="significant_decline"``, probed at steps 0-4 (the controls at 0 and
    4), saved at step 2."""
    out = tmp_path_factory.mktemp("mc") / "run"
    trainer, callback = train(tokenizer, out, every_shape, max_steps=4, **MC_OPTIONS,
                              trainer_kwargs=dict(save_strategy="steps", save_steps=2))
    return out, trainer, callback


def test_every_preset_shape_runs_through_the_callback(mc_run, every_shape):
    """Before the fix: ``KeyError: 'other'`` at train begin (the baseline's resume state)."""
    out, trainer, callback = mc_run
    rows = probe_rows(trainer)
    assert sorted(rows) == [0, 1, 2, 3, 4] and trainer.state.global_step == 4
    families = {p.family for p in every_shape}
    assert families == set(PROBE_PRESETS) | {"mc_listed"}
    for row in rows.values():
        assert "ctx_reliance/probe_failed" not in row
        assert row["ctx_reliance/num_probes"] == len(every_shape)
        for family in families:
            assert 0.0 <= row[f"ctx_reliance/{family}/counterfactual_accuracy"] <= 1.0, family
            assert 0.0 <= row[f"ctx_reliance/{family}/counterfactual_probability"] <= 1.0, family
        # FaithEval has no parametric option: what needs one is not a number for it, and is for ConflictBank.
        assert math.isnan(row.get("ctx_reliance/faitheval_counterfactual/parametric_accuracy", math.nan))
        assert 0.0 <= row["ctx_reliance/conflictbank/parametric_accuracy"] <= 1.0
        assert ("ctx_reliance/conflictbank/closed_book_accuracy" in row) == (row["step"] in (0, 4))  # controls_every
        for key in ("ctx_reliance/decline_from_peak", "ctx_reliance/flips_since_previous"):
            assert key in row or row["step"] == 0, (row["step"], key)
    summary = json.loads((out / "ctx_reliance_summary.json").read_text())["summary"]
    assert summary["final_step"] == 4 and summary["probe_events"] == 5


def test_a_winning_third_option_is_other_in_the_probe_log(mc_run, every_shape):
    out, _, _ = mc_run
    log = read_probe_rows(out / PROBES_FILE)
    assert len(log) == 5 * len(every_shape)
    by_id = {p.id: p for p in every_shape}
    labels = {r["preferred"] for r in log}
    assert labels <= set(PREFERRED_LABELS) | {None}
    assert "other" in labels, "some multiple-choice probe must prefer a third option for this test to mean much"
    for r in log:
        probe = by_id[r["id"]]
        if not probe.is_multiple_choice:
            assert r["preferred"] in ("context", "memory", "tie"), r
        elif probe.parametric_answer is None:
            assert r["preferred"] in ("context", "other", "tie") and r["par"] is None, r


def test_other_round_trips_through_the_checkpoint_and_a_resume(mc_run, every_shape, tokenizer, tmp_path):
    """The kept preferred answers (``paired`` in ``trainer_state.json``) hold "other" and come back on resume: the
    resumed run's comparisons with the peak and the previous event equal the uninterrupted run's."""
    out, full, _ = mc_run
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    paired = state["stateful_callbacks"][STATE_KEY][CF_PROB]["paired"]
    assert paired["previous"]["step"] == 2
    codes = paired["previous"]["preferred"]
    logged = {r["id"]: r["preferred"] for r in read_probe_rows(out / PROBES_FILE) if r["step"] == 2}
    labels = [logged[p.id] for p in every_shape]
    assert len(codes) == len(labels) and "other" in labels
    # One character per label, distinct labels distinct characters: the encoding loses nothing.
    assert len({(label, code) for label, code in zip(labels, codes)}) == len(set(labels)) == len(set(codes))

    resumed_dir = tmp_path / "resumed"  # a copy: the module's run and its probe log stay as they are
    shutil.copytree(out / "checkpoint-2", resumed_dir / "checkpoint-2")
    second, _ = train(tokenizer, resumed_dir, every_shape, max_steps=4, **MC_OPTIONS,
                      resume=str(resumed_dir / "checkpoint-2"))
    full_rows, resumed_rows = probe_rows(full), probe_rows(second)
    assert sorted(resumed_rows) == [0, 1, 2, 3, 4]
    for step in (3, 4):
        for key in PAIRED_KEYS:
            assert key in resumed_rows[step], (step, key)
            assert resumed_rows[step][key] == pytest.approx(full_rows[step][key], rel=1e-4, abs=1e-5), (step, key)


def test_every_preferred_label_survives_the_resume_state_codec(tmp_path):
    """Each label :func:`~ctx_callback.outcomes.preferred_vector` can return, and ``None``, is written into the JSON
    resume state and read back unchanged."""
    import numpy as np
    from transformers import TrainerState

    from ctx_callback import outcomes as outcomes_module
    from ctx_callback.decisions import ProbeEvent
    from ctx_callback.resume_state import read_state

    labels = [*PREFERRED_LABELS, None]
    probes = probes_from_records(mc_records(family="a") + mc_records(family="b"))[: len(labels)]
    callback = ContextRelianceCallback(None, probes)
    values = np.linspace(0.1, 0.9, len(labels))
    callback.decider.peak_event = callback.decider.previous_event = ProbeEvent(3, 0.5, values)
    callback.reports.peak_preferred = callback.reports.previous_preferred = labels
    state = TrainerState()
    callback._export_state(state)
    state.save_to_json(str(tmp_path / "trainer_state.json"))  # as every checkpoint writes it
    restored = TrainerState.load_from_json(str(tmp_path / "trainer_state.json"))
    saved = read_state(restored.stateful_callbacks, callback.monitor_key)
    kept = {step: (event.outcomes, event.preferred)
            for step, event in saved.paired.by_step(callback.selection.ids_digest()).items()}
    assert kept[3][1] == labels
    assert kept[3][0] == pytest.approx(values)
    assert set(outcomes_module.PREFERRED_LABELS) == set(PREFERRED_LABELS)  # the labels above are all there are


def test_faitheval_preset_by_name_with_informative_band(mirror, tokenizer, tmp_path):
    """The ``faitheval_counterfactual`` preset (no parametric option at all) through the callback by name, with
    ``informative_band`` (which crashed the same way)."""
    trainer, callback = train(tokenizer, tmp_path / "faitheval", "faitheval_counterfactual", max_steps=1,
                              informative_band=(0.001, 0.999), patience=3)
    rows = probe_rows(trainer)
    assert sorted(rows) == [0, 1]
    kept = len(callback.active_indices)
    assert callback.known_counts == {"faitheval_counterfactual": {"kept": kept, "total": 5}} and kept >= 1
    for row in rows.values():
        assert row["ctx_reliance/num_probes"] == kept and "ctx_reliance/probe_failed" not in row
        assert 0.0 <= row[CF_PROB] <= 1.0
        assert math.isnan(row.get("ctx_reliance/parametric_accuracy", math.nan))
    assert len(read_probe_rows(tmp_path / "faitheval" / PROBES_FILE)) == 2 * kept


def test_generation_mode_with_multiple_choice_probes(mirror, tokenizer, tmp_path):
    probes = load_probes("faitheval_counterfactual+conflictbank")
    trainer, _ = train(tokenizer, tmp_path / "gen", probes, max_steps=1, mode="generate", max_new_tokens=3,
                       variants=("context",))
    rows = {r["step"]: r for r in trainer.state.log_history if "ctx_reliance/counterfactual_accuracy" in r}
    assert sorted(rows) == [0, 1]
    log = read_probe_rows(tmp_path / "gen" / PROBES_FILE)
    assert len(log) == 2 * len(probes)
    assert {r["preferred"] for r in log} <= set(PREFERRED_LABELS) | {None}


def test_probe_sets_without_a_parametric_option_refuse_what_needs_one(mirror):
    """``known_only`` and a monitor that needs the parametric answer cannot work on FaithEval-style probes: said at
    construction, not as a run of NaN rounds or an empty selection after the baseline."""
    probes = load_probes("faitheval_counterfactual")
    with pytest.raises(ConfigurationError, match=r"known_only=True.*none of the 5 probes has a parametric answer"):
        ContextRelianceCallback(None, probes, known_only=True)
    for monitor in ("parametric_accuracy", "closed_book_accuracy", "faitheval_counterfactual/aligned_accuracy"):
        with pytest.raises(ConfigurationError, match=rf"monitor {monitor!r} needs the parametric answer"):
            ContextRelianceCallback(None, probes, monitor=monitor)
    # Mixed with probes that have one: allowed (the metric is computed over those), unless the monitored family has
    # none.
    mixed = load_probes("faitheval_counterfactual+conflictbank")
    ContextRelianceCallback(None, mixed, known_only=True, monitor="parametric_accuracy")
    with pytest.raises(ConfigurationError, match="needs the parametric answer"):
        ContextRelianceCallback(None, mixed, monitor="faitheval_counterfactual/parametric_accuracy")
