"""The ``ctx_*`` options of ``ctx-callback sft``: :class:`ContextRelianceArguments`, one field per argument of
:class:`~ctx_callback.ContextRelianceCallback`.

The dataclass is added to TRL's own ``TrlParser`` next to ``ScriptArguments``, ``SFTConfig``, ``ModelConfig`` and
``DatasetMixtureConfig``, so every option is a flag (``--ctx_eval_steps 50``) and a key of a ``--config`` recipe YAML
(``ctx_eval_steps: 50``), parsed by the same parser as TRL's own options. Each field is the callback's argument of the
same name without the ``ctx_`` prefix, with the callback's default (``tests/test_cli_sft.py`` checks both against the
callback's signature); the values are checked by the callback itself (:meth:`ContextRelianceArguments.callback_kwargs`
only converts the command-line shapes: lists to tuples, a JSON string to a dict).

The types are plain (``str``, not a ``Literal``), on purpose: YAML values never go through argparse's ``choices``, so
the callback's validation is the one check, with the same message for a flag and a YAML key.

This module imports neither torch nor TRL: ``ctx-callback sft --help`` lists these options from it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from ..decisions import DEFAULT_ALPHA, DEFAULT_MIN_DECLINE, DEFAULT_SUSTAINED_EVENTS
from ..encoding import DEFAULT_VARIANTS
from ..errors import UsageError

__all__ = ["GROUP_NAME", "PREFIX", "ContextRelianceArguments", "option_fields"]

#: The prefix of every option: ``ctx_<callback argument>``.
PREFIX = "ctx_"
#: The title of the options' group in ``--help`` (TRL's parser reads it from ``_argument_group_name``).
GROUP_NAME = "context-reliance options (ContextRelianceCallback's arguments; also keys of a --config YAML)"


def _option(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class ContextRelianceArguments:
    """The :class:`~ctx_callback.ContextRelianceCallback` arguments as ``ctx_*`` options (its docstring is the full
    reference; ``docs/trl_cli.md`` lists them)."""

    _argument_group_name = GROUP_NAME  # a class attribute, not a field: HfArgumentParser's argument group title

    ctx_probes: str = _option("default", "probe suite(s) ('world_facts', 'biographies', 'quotes', 'all' = "
                                         "'default', a preset such as 'nq_swap', '+'-joins of these), a .json/.jsonl "
                                         "file or folder, or a Hub dataset id")
    ctx_prompt_format: str = _option("chat", "'chat' (the tokenizer's chat template), 'alpaca', 'tulu', 'plain' or "
                                             "a template string with {context} and {question}")
    ctx_system_prompt: str | None = _option(None, "chat format: a system message (use your training data's)")
    ctx_chat_template_kwargs: str | None = _option(None, "chat format: extra apply_chat_template arguments, a JSON "
                                                         "object (a mapping in YAML)")
    ctx_eval_steps: int = _option(50, "probe every this many optimizer steps")
    ctx_probe_on: str = _option("steps", "'steps' (every ctx_eval_steps) or 'evaluate' (on each evaluation)")
    ctx_probe_at_start: bool = _option(True, "probe once before the first step (the baseline, step 0)")
    ctx_probe_at_end: bool = _option(True, "probe at the last step if it is not a multiple of ctx_eval_steps")
    ctx_mode: str = _option("loglik", "'loglik' (answer log-likelihoods) or 'generate' (greedy decoding; slower)")
    ctx_variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS), metadata={
        "help": "probe rows to score: 'context' (always), 'closed_book', 'aligned', 'irrelevant'"})
    ctx_limit_per_family: int | None = _option(None, "use at most this many probes per family")
    ctx_known_only: bool = _option(False, "keep only probes the model answers right closed-book at the start")
    ctx_known_distractors: int = _option(3, "ctx_known_only: length-matched distractors the true answer must also "
                                            "beat closed-book (0: the counterfactual answer alone)")
    ctx_monitor: str | None = _option(None, "the metric that defines the peak (default: counterfactual_probability "
                                            "in loglik mode, counterfactual_accuracy in generate mode)")
    ctx_greater_is_better: bool | None = _option(None, "direction of ctx_monitor (default: inferred)")
    ctx_smoothing: str = _option("ema", "'ema', 'mean' or 'none' over probe events")
    ctx_ema_alpha: float = _option(0.5, "EMA weight of the newest value")
    ctx_smoothing_window: int = _option(3, "window of the moving average (ctx_smoothing='mean')")
    ctx_min_delta: float = _option(0.0, "smallest smoothed improvement that counts as a new peak")
    ctx_patience: int | None = _option(None, "probe events without improvement before training stops (default: "
                                             "never stop)")
    ctx_warmup_steps: int = _option(0, "never stop before this global step")
    ctx_stop_rule: str | None = _option(None, "'significant_decline': stop on a significant paired decline from the "
                                              "peak")
    ctx_min_decline: float = _option(DEFAULT_MIN_DECLINE, "significant_decline: smallest decline that may stop")
    ctx_alpha: float = _option(DEFAULT_ALPHA, "significant_decline: false-stop level for the run")
    ctx_sustained_events: int = _option(DEFAULT_SUSTAINED_EVENTS, "significant_decline: consecutive probe events the "
                                        "decline must hold at before stopping")
    ctx_divergence_threshold: float | None = _option(None, "stop once the monitor is this far below its peak value")
    ctx_stopping_threshold: float | None = _option(None, "stop once the monitor is below this absolute floor")
    ctx_probe_log: bool = _option(True, "append every probe's outcome to output_dir/ctx_reliance_probes.jsonl")
    ctx_informative_band: list[float] | None = _option(None, "two numbers LOW HIGH: keep only probes whose baseline "
                                                             "counterfactual probability lies in the band")
    ctx_save_peak_checkpoint: bool = _option(False, "save checkpoint-{step} at each new peak and protect it from "
                                                    "save_total_limit rotation")
    ctx_restore_peak_at_end: bool = _option(False, "load the peak's weights back at train end (before TRL saves the "
                                                   "final model); needs ctx_save_peak_checkpoint")
    ctx_keep_best: bool = _option(False, "keep training, keep the best: never stop, save each new peak, restore the "
                                  "best at train end")
    ctx_strict: bool = _option(False, "re-raise a failed probe round instead of logging it")
    ctx_plot: bool = _option(False, "write output_dir/ctx_reliance.png at train end (needs matplotlib)")
    ctx_max_batch_tokens: int = _option(8192, "padded tokens per probe forward pass")
    ctx_max_batch_size: int = _option(64, "rows per probe forward pass")
    ctx_max_new_tokens: int = _option(24, "generate mode: tokens per answer")
    ctx_engine: str = _option("auto", "scoring engine: 'auto', 'prefix', 'batched' or 'simple'")
    ctx_probe_dtype: str | None = _option(None, "precision of the probe forwards: 'bfloat16', 'float16' (CUDA) or "
                                                "unset (the training step's)")
    ctx_controls_every: int = _option(1, "score the control variants (all but 'context') on every K-th probe event "
                                         "only")
    ctx_verbose: bool = _option(True, "print the stop message and the train-end summary")
    ctx_on_probe_set_change: str = _option("error", "on resume with another probe set: 'error' or 'new_curve'")
    ctx_audit: str | None = _option(None, "the training data's audit (`ctx-callback audit --out FILE`): log the share "
                                    "of each category consumed between probe events")
    ctx_label_check_every: int | None = _option(None, "every K-th probe event: check the log-likelihood labels of a "
                                                      "probe sample against greedy generation")
    ctx_attention_every: int | None = _option(None, "every K-th probe event: log the attention share from the answer "
                                                    "position to the context tokens on a probe sample")
    ctx_diagnostic_probes: int = _option(32, "the sample size of the label check and the attention share")

    def callback_kwargs(self) -> dict[str, Any]:
        """The callback's keyword arguments: each field's value under its name without ``ctx_``.

        Lists become tuples (``variants``, ``informative_band``) and ``chat_template_kwargs`` given as a JSON string
        (a flag) becomes a dict; a YAML mapping is passed as it is. Nothing else is checked here: the callback
        validates every value.

        Returns:
            ``{"probes": ..., "eval_steps": ..., ...}``, for ``ContextRelianceCallback(trainer, **kwargs)``.

        Raises:
            UsageError: ``ctx_chat_template_kwargs`` is a string that is not a JSON object.
        """
        kwargs = {f.name[len(PREFIX):]: getattr(self, f.name) for f in option_fields()}
        for name in ("variants", "informative_band"):
            if isinstance(kwargs[name], list):
                kwargs[name] = tuple(kwargs[name])
        template_kwargs = kwargs["chat_template_kwargs"]
        if isinstance(template_kwargs, str):
            try:
                template_kwargs = json.loads(template_kwargs)
            except json.JSONDecodeError as err:
                template_kwargs = err
            if not isinstance(template_kwargs, dict):
                raise UsageError(
                    f"--ctx_chat_template_kwargs must be a JSON object, e.g. '{{\"enable_thinking\": false}}' (in a "
                    f"YAML recipe: a mapping), got {self.ctx_chat_template_kwargs!r}.")
            kwargs["chat_template_kwargs"] = template_kwargs
        return kwargs


def option_fields() -> tuple[dataclasses.Field, ...]:
    """The fields of :class:`ContextRelianceArguments`, in order (one per option)."""
    return dataclasses.fields(ContextRelianceArguments)
