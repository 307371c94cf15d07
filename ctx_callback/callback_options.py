"""The callback's arguments checked, and what they resolve to: the monitor, the probes, the stop decider.

:func:`validate_arguments` takes :class:`~ctx_callback.ContextRelianceCallback`'s constructor arguments (by name; the
class docstring documents them, and their defaults live in its signature) and returns :class:`CallbackOptions`, or
raises a :class:`~ctx_callback.errors.ConfigurationError` (a :class:`~ctx_callback.errors.TrainerWiringError` for a
trainer that is not a ``transformers.Trainer``) naming the argument, the value and what is allowed. The checks run in
a fixed order, so of several bad arguments the same one is reported as before.

Where a change goes: a new argument is checked here (and documented in the class docstring).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from transformers import Trainer, TrainingArguments

from .decisions import RECOMMENDED_PROBES, min_probes_for_significance
from .diagnostics import check_diagnostics
from .errors import ConfigurationError, TrainerWiringError
from .known_facts import check_distractors
from .messages import rank_zero_warn
from .metrics import CONFIDENCE, METRIC_PREFIX, metric_spec
from .monitor import NEEDS_PARAMETRIC, Monitor, parse_monitor
from .outcomes import PER_PROBE_METRICS
from .peak import check_peak_options
from .probe_selection import check_band
from .probes import Probe, load_probes
from .scoring import resolve_probe_dtype
from .stopping import StopDecider
from .trainer_support import check_trainer_support

__all__ = [
    "ON_PROBE_SET_CHANGE",
    "PROBE_ON",
    "CallbackOptions",
    "check_best_metric",
    "check_significant_probe_count",
    "check_wiring",
    "probe_set_digest",
    "validate_arguments",
    "warn_about_training_arguments",
]

#: Values of ``probe_on``.
PROBE_ON = ("steps", "evaluate")
#: Values of ``on_probe_set_change``: refuse a resume whose checkpoint was probed with another probe set, or start a
#: new curve at the resumed step.
ON_PROBE_SET_CHANGE = ("error", "new_curve")


@dataclass(frozen=True)
class CallbackOptions:
    """What the checked arguments resolve to.

    Attributes:
        monitor: The parsed monitor, its direction resolved (``greater_is_better`` given or inferred).
        probe_dtype: The resolved ``probe_dtype``.
        informative_band: The checked band, or ``None``.
        probes: The loaded probes (``limit_per_family`` applied).
        probe_set_sha1: Their digest (:func:`probe_set_digest`).
        decider: The stop decider of the peak and stop options.
        save_peak_checkpoint: Save a checkpoint at each new peak (``save_peak_checkpoint`` or ``keep_best``).
        restore_peak_at_end: Restore the peak at train end (``restore_peak_at_end`` or ``keep_best``).
    """

    monitor: Monitor
    probe_dtype: str | None
    informative_band: tuple[float, float] | None
    probes: list[Probe]
    probe_set_sha1: str
    decider: StopDecider
    save_peak_checkpoint: bool = False
    restore_peak_at_end: bool = False


def probe_set_digest(probes: Sequence[Probe]) -> str:
    """SHA-1 of a probe set, in order: each probe's id and everything that is scored or matched (context, question,
    answers, aliases, options, their listing, the aligned context); ``metadata`` is not included. Equal digests mean
    the same probes in the same order (the prompt format, system prompt and model are not part of it)."""
    digest = hashlib.sha1()
    for p in probes:
        fields = [p.id, p.family, p.context, p.question, p.counterfactual_answer, p.parametric_answer,
                  list(p.counterfactual_aliases), list(p.parametric_aliases), p.aligned_context, list(p.options),
                  p.list_options]
        digest.update(json.dumps(fields, ensure_ascii=False).encode("utf-8") + b"\n")
    return digest.hexdigest()


def _check_plain(a: dict[str, Any]) -> None:
    """The arguments checked on their own, before anything is parsed."""
    trainer = a["trainer"]
    if trainer is not None and not isinstance(trainer, Trainer):
        raise TrainerWiringError(
            f"trainer must be a transformers.Trainer (or SFTTrainer), got {type(trainer).__name__}. "
            "Usage: trainer.add_callback(ContextRelianceCallback(trainer, probes=...))."
        )
    check_trainer_support(trainer)  # a reward trainer, a model without a causal-LM head: refused before any work
    eval_steps = a["eval_steps"]
    if isinstance(eval_steps, bool) or not isinstance(eval_steps, int) or eval_steps < 1:
        raise ConfigurationError(
            f"eval_steps must be an integer >= 1 (optimizer steps between probes), got {eval_steps!r}."
        )
    if not isinstance(a["verbose"], bool):
        raise ConfigurationError(f"verbose must be True or False, got {a['verbose']!r}.")
    if a["on_probe_set_change"] not in ON_PROBE_SET_CHANGE:
        raise ConfigurationError(
            f"on_probe_set_change must be one of {list(ON_PROBE_SET_CHANGE)} (what a resumed run does when the "
            f"checkpoint was probed with another probe set), got {a['on_probe_set_change']!r}."
        )
    if a["probe_on"] not in PROBE_ON:
        raise ConfigurationError(f"probe_on must be one of {list(PROBE_ON)}, got {a['probe_on']!r}.")
    if a["mode"] not in ("loglik", "generate"):
        raise ConfigurationError(f"mode must be 'loglik' or 'generate', got {a['mode']!r}.")
    _check_keep_best(a)
    if a["restore_peak_at_end"] and not a["save_peak_checkpoint"] and not a["keep_best"]:
        raise ConfigurationError(
            "restore_peak_at_end=True needs save_peak_checkpoint=True (the peak weights are restored from the "
            "peak checkpoint)."
        )
    if a["known_only"] and "closed_book" not in a["variants"]:
        raise ConfigurationError("known_only=True needs the 'closed_book' variant in variants=.")
    check_distractors(a["known_distractors"])
    check_diagnostics(a["label_check_every"], a["attention_every"], a["diagnostic_probes"], a["mode"])


def _check_keep_best(a: dict[str, Any]) -> None:
    """``keep_best`` is a bool, and never combined with a stop rule (it means: never stop)."""
    if not isinstance(a["keep_best"], bool):
        raise ConfigurationError(f"keep_best must be True or False, got {a['keep_best']!r}.")
    if not a["keep_best"]:
        return
    rules = {name: a[name] for name in ("patience", "stop_rule", "divergence_threshold", "stopping_threshold")
             if a[name] is not None}
    if rules:
        given = ", ".join(f"{name}={value!r}" for name, value in rules.items())
        raise ConfigurationError(
            f"keep_best=True means: never stop, save each new peak, restore the best at the end; but a stop rule is "
            f"set too ({given}). Remove the stop rule to keep training and keep the best, or keep the rule and use "
            "save_peak_checkpoint=True, restore_peak_at_end=True instead of keep_best to stop and restore the peak."
        )


def _parse_monitor(a: dict[str, Any]) -> tuple[Monitor, str | None]:
    """The monitor (direction resolved) and the probe dtype; checks ``controls_every`` against the monitor."""
    monitor, controls_every = a["monitor"], a["controls_every"]
    parsed = parse_monitor(monitor, a["mode"], tuple(a["variants"]))
    probe_dtype = resolve_probe_dtype(a["probe_dtype"])
    if isinstance(controls_every, bool) or not isinstance(controls_every, int) or controls_every < 1:
        raise ConfigurationError(
            f"controls_every must be an integer >= 1 (score the control variants on every K-th probe event; 1 = "
            f"every event), got {controls_every!r}."
        )
    needs = " and ".join(metric_spec(parsed.metric).required_variants)
    if controls_every > 1 and needs:
        raise ConfigurationError(
            f"monitor {monitor!r} needs the {needs} control variant, which controls_every={controls_every} "
            "scores only on every K-th probe event; the peak and stop decisions need a value at every event. "
            "Monitor a context metric (e.g. 'counterfactual_accuracy'), or use controls_every=1."
        )
    greater_is_better = a["greater_is_better"]
    if greater_is_better is None:
        greater_is_better = parsed.greater_is_better
    return replace(parsed, greater_is_better=bool(greater_is_better)), probe_dtype


def _build_decider(a: dict[str, Any], monitor: Monitor) -> StopDecider:
    """The stop decider; checks the peak options, then that ``stop_rule`` has per-probe outcomes, then the rules'."""
    check_peak_options("max" if monitor.greater_is_better else "min", a["smoothing"], a["ema_alpha"],
                       a["smoothing_window"], a["min_delta"], a["patience"], a["warmup_steps"])
    stop_rule = a["stop_rule"]
    if stop_rule is not None and monitor.metric not in PER_PROBE_METRICS:
        raise ConfigurationError(
            f"stop_rule={stop_rule!r} needs per-probe outcomes of the monitored metric, which {a['monitor']!r} does "
            f"not have (a ratio of sums, or a count); monitor one of {sorted(PER_PROBE_METRICS)}."
        )
    return StopDecider.from_options(
        patience=a["patience"], ema_alpha=a["ema_alpha"], min_delta=a["min_delta"], warmup=a["warmup_steps"],
        stop_rule=stop_rule, min_decline=a["min_decline"], alpha=a["alpha"], sustained_events=a["sustained_events"],
        divergence_threshold=a["divergence_threshold"], stopping_threshold=a["stopping_threshold"],
        greater_is_better=monitor.greater_is_better, smoothing=a["smoothing"], window=a["smoothing_window"],
        metric=monitor.key, confidence=CONFIDENCE,
    )


def _check_parametric_answers(probes: list[Probe], monitor: Monitor, name: str | None, known_only: bool) -> None:
    """Refuse what cannot work on probes without a parametric answer (multiple choice whose dataset does not say
    which option is true, e.g. the ``faitheval_counterfactual`` preset), instead of NaN rounds or an empty
    ``known_only`` selection after the baseline."""
    without = [p for p in probes if p.parametric_answer is None]
    if not without:
        return
    if monitor.metric in NEEDS_PARAMETRIC:
        monitored = [p for p in probes if monitor.family in (None, p.family)]
        if all(p.parametric_answer is None for p in monitored):
            raise ConfigurationError(
                f"monitor {name!r} needs the parametric answer (the true fact), which none of the "
                f"{len(monitored)} monitored probes has (multiple-choice probes without a parametric option, "
                "e.g. the faitheval_counterfactual preset): it would be NaN at every probe event. Monitor a "
                "context metric (e.g. 'counterfactual_probability'), or add probes with a parametric answer."
            )
    if not known_only:
        return
    if len(without) == len(probes):
        raise ConfigurationError(
            "known_only=True keeps the probes whose parametric answer the model prefers closed-book, but none of "
            f"the {len(probes)} probes has a parametric answer (multiple-choice probes without a parametric "
            "option, e.g. the faitheval_counterfactual preset), so it would keep none. Use known_only=False with "
            "these probes, or add probes with a parametric answer."
        )
    rank_zero_warn(
        "known_only=True: %d of the %d probes have no parametric answer (multiple choice without a "
        "parametric option, e.g. %r), so the knowledge check never keeps them.", len(without), len(probes),
        without[0].id,
    )


def check_significant_probe_count(count: int, when: str, monitor: Monitor, alpha: float, warn: bool = True) -> None:
    """``stop_rule="significant_decline"`` on ``count`` monitored probes: refuse below the fewest probes whose
    directions alone can be significant (:func:`~ctx_callback.decisions.min_probes_for_significance`), warn below
    :data:`~ctx_callback.decisions.RECOMMENDED_PROBES`.

    How many probes ``stop_rule="significant_decline"`` needs: with ``n`` monitored probes, even a decline on every
    probe gives an exact sign test (McNemar on accuracies) ``p = 2^(1 - n)``, so below
    :func:`~ctx_callback.decisions.min_probes_for_significance` (6 probes at ``alpha=0.05``) the rule could never
    stop on accuracy and would rest on the normality of a handful of differences on probabilities: refused with a
    :class:`~ctx_callback.errors.ConfigurationError` (at construction, and at train begin after ``known_only`` /
    ``informative_band`` selected); below :data:`~ctx_callback.decisions.RECOMMENDED_PROBES` (100 on probabilities,
    200 on accuracies, from the simulation in ``docs/stopping.md``) a warning says how much it misses.

    Raises:
        ConfigurationError: Too few probes for the test ever to be significant at ``alpha``.
    """
    binary = PER_PROBE_METRICS.get(monitor.metric, False)
    test, recommended = ("exact McNemar", RECOMMENDED_PROBES["mcnemar"]) if binary else \
        ("paired t-test", RECOMMENDED_PROBES["t"])
    minimum = min_probes_for_significance(alpha)
    if count < minimum:
        raise ConfigurationError(
            f"stop_rule='significant_decline' needs at least {minimum} monitored probes at alpha={alpha:g}, "
            f"got {count} ({when}; monitor {monitor.key}). With n probes, even a decline on every one of "
            f"them is significant only at p = 2^(1 - n) by the probes' directions alone (the exact sign test; "
            f"McNemar's smallest p-value on accuracies), {2.0 ** (1 - max(count, 1)):.3g} here, above alpha: "
            f"the {test} could never stop, or only by trusting the normality of {count} differences. Use at "
            f"least {recommended} probes (docs/stopping.md, 'How many probes do I need?'), or another stop rule "
            "(patience=, divergence_threshold=)."
        )
    if warn and count < recommended:
        rank_zero_warn(
            "stop_rule='significant_decline' on %d monitored probes (%s): in the simulation of docs/stopping.md "
            "('How many probes do I need?') the rule missed most 5-point falls and many 10-point "
            "falls below %d probes for this test (with sustained_events=1 it missed 23%% of 10-point falls at 50 "
            "probes on probabilities, 95%% at 50 and 34%% at 100 on accuracies; the default sustained_events=2 "
            "misses more: 72%% of 5-point falls at 100 probes). Its stops stay rare on flat runs; it is "
            "its power that is low. Use at least %d probes to rely on it.", count, test, recommended, recommended,
        )


def validate_arguments(arguments: dict[str, Any]) -> CallbackOptions:
    """Check the constructor's ``arguments`` (by name) in a fixed order and resolve them (module docstring).

    Raises:
        ConfigurationError: A bad argument (also ``ProbeSourceError`` / ``ProbeFormatError`` from loading probes).
        TrainerWiringError: ``trainer`` is not a ``transformers.Trainer``.
        UnsupportedTrainerError: ``trainer`` trains what cannot be probed (``ctx_callback.trainer_support``).
    """
    a = arguments
    _check_plain(a)
    monitor, probe_dtype = _parse_monitor(a)
    decider = _build_decider(a, monitor)
    if not isinstance(a["probe_log"], bool):
        raise ConfigurationError(f"probe_log must be True or False, got {a['probe_log']!r}.")
    band = check_band(a["informative_band"], a["mode"])
    source = a["probes"]
    probes = load_probes(source if isinstance(source, (str, os.PathLike)) else list(source),
                         limit_per_family=a["limit_per_family"])
    families = sorted({p.family for p in probes})
    if monitor.family is not None and monitor.family not in families:
        raise ConfigurationError(f"monitor {a['monitor']!r} names family {monitor.family!r}, which the probes lack; "
                                 f"families: {families}.")
    _check_parametric_answers(probes, monitor, a["monitor"], a["known_only"])
    if a["stop_rule"] == "significant_decline":  # again at train begin when known_only / informative_band select
        count = sum(1 for p in probes if monitor.family in (None, p.family))
        check_significant_probe_count(count, "at construction", monitor, a["alpha"],
                                      warn=not a["known_only"] and a["informative_band"] is None)
    keep_best = a["keep_best"]
    return CallbackOptions(monitor, probe_dtype, band, probes, probe_set_digest(probes), decider,
                           save_peak_checkpoint=bool(a["save_peak_checkpoint"] or keep_best),
                           restore_peak_at_end=bool(a["restore_peak_at_end"] or keep_best))


def check_best_metric(metric_for_best_model: str | None, controls_every: int) -> None:
    """With ``controls_every > 1``, refuse a ``metric_for_best_model`` that needs a control variant: the rounds
    without controls would not have it (the Trainer raises a ``KeyError`` on a missing best metric).

    Raises:
        ConfigurationError: Such a ``metric_for_best_model``.
    """
    name = metric_for_best_model or ""
    name = name[len("eval_"):] if name.startswith("eval_") else name
    if controls_every == 1 or not name.startswith(f"{METRIC_PREFIX}/"):
        return
    try:
        needs = " and ".join(metric_spec(name.split("/")[-1]).required_variants)
    except ConfigurationError:
        return  # not one of our metrics
    if needs:
        raise ConfigurationError(
            f"metric_for_best_model={metric_for_best_model!r} needs the {needs} control variant, which "
            f"controls_every={controls_every} scores only on every K-th probe event. Select on a context "
            "metric (e.g. 'ctx_reliance/counterfactual_accuracy'), or use controls_every=1."
        )


def warn_about_training_arguments(args: TrainingArguments, probe_on: str, save_peak_checkpoint: bool,
                                  monitor_key: str) -> None:
    """Warn (main process) about Trainer arguments that defeat an option: ``probe_on="evaluate"`` without
    evaluation, and a ``metric_for_best_model`` whose rotation may remove the peak checkpoint."""
    if probe_on == "evaluate" and args.eval_strategy == "no":
        rank_zero_warn(
            'ctx_callback: probe_on="evaluate" but the trainer never evaluates (eval_strategy="no"), so context '
            "reliance is probed only at start and end (and on your own trainer.evaluate() calls). Set "
            'eval_strategy="steps" with an eval_dataset, or use probe_on="steps" with eval_steps=N.'
        )
    if save_peak_checkpoint and args.metric_for_best_model is not None and args.save_total_limit:
        rank_zero_warn(
            "metric_for_best_model=%r is set, so the Trainer owns the 'best' checkpoint and "
            "save_total_limit=%d may rotate the reliance-peak checkpoint away. Use "
            "metric_for_best_model=%r to select on reliance, or unset save_total_limit.",
            args.metric_for_best_model, args.save_total_limit, monitor_key,
        )


def check_wiring(trainer: Any, state: Any, has_tokenizer: bool) -> None:
    """At train begin: the callback was given the trainer that is training, which it supports
    (:func:`~ctx_callback.trainer_support.check_trainer_support`: its model may have changed since construction),
    and has a tokenizer.

    Raises:
        TrainerWiringError: No trainer, another one, or no tokenizer.
        UnsupportedTrainerError: A trainer or model that cannot be probed (a reward model, no causal-LM head).
    """
    if trainer is None:
        raise TrainerWiringError(
            "ContextRelianceCallback needs the trainer to log to your trackers (TensorBoard, W&B, MLflow, ...). "
            "Create it with the trainer and then add it: "
            "`trainer.add_callback(ContextRelianceCallback(trainer, probes=...))`."
        )
    if trainer.state is not state:
        raise TrainerWiringError(
            "ContextRelianceCallback was created with a different trainer than the one that is training. Pass the "
            "trainer you call .train() on: `trainer.add_callback(ContextRelianceCallback(trainer, ...))`."
        )
    check_trainer_support(trainer)
    if not has_tokenizer:
        raise TrainerWiringError(
            "ContextRelianceCallback has no tokenizer: pass tokenizer=... to the callback, or "
            "processing_class=tokenizer to the trainer."
        )
