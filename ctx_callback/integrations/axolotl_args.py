"""The axolotl plugin's YAML keys: ``ctx_reliance_<argument>`` for each :class:`~ctx_callback.ContextRelianceCallback`
argument, validated when axolotl validates its config.

axolotl merges this pydantic model into its config schema (``AxolotlInputConfig``) when the plugin
:class:`ctx_callback.integrations.axolotl.ContextReliancePlugin` is listed under ``plugins:``. This module needs
pydantic but not axolotl, so the mapping onto the callback can be checked without axolotl installed.

Validation happens in three layers, all inside axolotl's config validation (a ``pydantic.ValidationError`` from
``axolotl train`` / ``load_cfg``, before any model or dataset is loaded):

1. a key that starts with ``ctx_reliance_`` but is not one of the fields below (a typo) is refused, naming the
   closest key (axolotl itself ignores unknown top-level keys);
2. each field's type, strictly (``ctx_reliance_eval_steps: "50"`` or ``1.5`` is refused, not coerced);
3. the callback's own argument validation: the model validator builds the callback once without a trainer, so a bad
   value (``ctx_reliance_mode: fast``, an unknown suite, ``restore_peak_at_end`` without ``save_peak_checkpoint``,
   a missing probe file) fails with the callback's message, prefixed by the YAML key.

Each field's default is the callback's default (``tests/test_axolotl_args.py`` checks both the names and the
defaults against the constructor's signature). ``trainer`` and ``tokenizer`` are not keys: the plugin passes the
trainer axolotl built, and the callback takes the tokenizer from it (``trainer.processing_class``).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, Field, model_validator

__all__ = ["KEY_PREFIX", "ContextRelianceArgs", "callback_kwargs", "known_fields"]

#: The prefix of every YAML key of the plugin; the rest is the callback's argument name.
KEY_PREFIX = "ctx_reliance_"


def _strict(default: Any, description: str) -> Any:
    """A field with ``default`` whose YAML value must already have the field's type (no coercion)."""
    return Field(default=default, strict=True, description=description)


class ContextRelianceArgs(BaseModel):
    """The plugin's keys in an axolotl YAML config; each one is the callback argument after ``ctx_reliance_``.

    The meaning of every argument is documented once, in :class:`~ctx_callback.ContextRelianceCallback`; the
    descriptions here are the short form ``docs/axolotl.md`` lists.
    """

    ctx_reliance_probes: str | list[dict[str, Any]] = Field(
        default="default", description="Built-in suite or preset name ('+'-joins), a .json/.jsonl file or folder, a "
        "Hub dataset id, or a list of probe records.")
    ctx_reliance_prompt_format: str = _strict("chat", "'chat' (the tokenizer's chat template, which axolotl's "
                                              "chat_template sets), 'alpaca', 'tulu', 'plain' or a template string.")
    ctx_reliance_system_prompt: str | None = _strict(None, "Chat format: a system message for the probes.")
    ctx_reliance_chat_template_kwargs: dict[str, Any] | None = _strict(
        None, "Extra apply_chat_template arguments; default: axolotl's own chat_template_kwargs.")
    ctx_reliance_eval_steps: int = _strict(50, "Probe every this many optimizer steps.")
    ctx_reliance_probe_on: str = _strict("steps", "'steps' (every eval_steps) or 'evaluate' (each evaluation).")
    ctx_reliance_probe_at_start: bool = _strict(True, "Probe once before the first step (the baseline).")
    ctx_reliance_probe_at_end: bool = _strict(True, "Probe at the last step.")
    ctx_reliance_mode: str = _strict("loglik", "'loglik' or 'generate'.")
    ctx_reliance_variants: list[str] = _strict(["context", "closed_book", "aligned"], "Probe variants to score "
                                               "(`irrelevant` adds the irrelevant-context control).")
    ctx_reliance_limit_per_family: int | None = _strict(None, "At most this many probes per family.")
    ctx_reliance_known_only: bool = _strict(False, "Keep only probes the model answers right closed-book.")
    ctx_reliance_known_distractors: int = _strict(3, "known_only: length-matched distractors to beat as well.")
    ctx_reliance_monitor: str | None = _strict(None, "Metric that defines the peak (default by mode).")
    ctx_reliance_greater_is_better: bool | None = _strict(None, "Direction of the monitor (default inferred).")
    ctx_reliance_smoothing: str = _strict("ema", "'ema', 'mean' or 'none'.")
    ctx_reliance_ema_alpha: float = _strict(0.5, "EMA weight of the newest value.")
    ctx_reliance_smoothing_window: int = _strict(3, "Window of the moving average.")
    ctx_reliance_min_delta: float = _strict(0.0, "Smallest smoothed improvement that counts as a new peak.")
    ctx_reliance_patience: int | None = _strict(None, "Probe events without improvement before stopping.")
    ctx_reliance_warmup_steps: int = _strict(0, "Never stop before this global step.")
    ctx_reliance_stop_rule: str | None = _strict(None, "None or 'significant_decline'.")
    ctx_reliance_min_decline: float = _strict(0.02, "significant_decline: smallest decline that may stop.")
    ctx_reliance_alpha: float = _strict(0.05, "significant_decline: false-stop level for the run.")
    ctx_reliance_sustained_events: int = _strict(
        2, "significant_decline: consecutive probe events the decline must hold at before stopping.")
    ctx_reliance_divergence_threshold: float | None = _strict(None, "Stop this far below the peak.")
    ctx_reliance_stopping_threshold: float | None = _strict(None, "Stop below this absolute floor.")
    ctx_reliance_probe_log: bool = _strict(True, "Write output_dir/ctx_reliance_probes.jsonl.")
    ctx_reliance_informative_band: tuple[float, float] | None = Field(
        default=None, description="[low, high]: keep probes whose baseline probability lies in the band.")
    ctx_reliance_save_peak_checkpoint: bool = _strict(False, "Save checkpoint-{step} at each new peak.")
    ctx_reliance_restore_peak_at_end: bool = _strict(False, "Load the peak weights back at train end.")
    ctx_reliance_keep_best: bool = _strict(
        False, "Keep training, keep the best: never stop, save each new peak, restore the best at the end.")
    ctx_reliance_strict: bool = _strict(False, "Re-raise a failed probe round.")
    ctx_reliance_plot: bool = _strict(False, "Write output_dir/ctx_reliance.png at train end (matplotlib).")
    ctx_reliance_max_batch_tokens: int = _strict(8192, "Padded tokens per probe forward pass.")
    ctx_reliance_max_batch_size: int = _strict(64, "Rows per probe forward pass.")
    ctx_reliance_max_new_tokens: int = _strict(24, "Generation mode: tokens per answer.")
    ctx_reliance_engine: str = _strict("auto", "'auto', 'prefix', 'batched' or 'simple'.")
    ctx_reliance_probe_dtype: str | None = _strict(None, "None (the training precision), 'bfloat16' or 'float16'.")
    ctx_reliance_controls_every: int = _strict(1, "Score the control variants every K-th probe event.")
    ctx_reliance_verbose: bool = _strict(True, "Print the stop message and the summary.")
    ctx_reliance_on_probe_set_change: str = _strict("error", "On resume with other probes: 'error' or 'new_curve'.")
    ctx_reliance_audit: str | None = _strict(
        None, "The training data's audit JSONL: log the share of each category consumed between probe events.")
    ctx_reliance_label_check_every: int | None = _strict(
        None, "Every K-th probe event: check log-likelihood labels against greedy generation on a sample.")
    ctx_reliance_attention_every: int | None = _strict(
        None, "Every K-th probe event: log the attention share to the context tokens on a sample.")
    ctx_reliance_diagnostic_probes: int = _strict(32, "The sample size of the label check and the attention share.")

    @model_validator(mode="before")
    @classmethod
    def _refuse_unknown_keys(cls, data: Any) -> Any:
        """A ``ctx_reliance_*`` key that is not a field is a typo: axolotl would drop it silently."""
        if not isinstance(data, Mapping):
            return data
        known = known_fields()
        for key in data:
            if isinstance(key, str) and key.startswith(KEY_PREFIX) and key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ValueError(
                    f"unknown ctx_callback plugin key {key!r} in the axolotl config: {hint}the keys are "
                    f"{KEY_PREFIX}<argument> for the ContextRelianceCallback arguments listed in docs/axolotl.md."
                )
        return data

    @model_validator(mode="after")
    def _check_with_the_callback(self) -> Any:
        """Run the callback's own argument validation now, before axolotl loads a model (no trainer yet)."""
        from ..callback import ContextRelianceCallback
        from ..errors import CtxCallbackError

        try:
            ContextRelianceCallback(None, **callback_kwargs({name: getattr(self, name) for name in known_fields()}))
        except CtxCallbackError as err:
            raise ValueError(
                f"ctx_callback plugin: {err} (the YAML keys are the callback's arguments prefixed with "
                f"{KEY_PREFIX!r}: docs/axolotl.md)"
            ) from err
        return self


def known_fields() -> list[str]:
    """The plugin's YAML keys, in the order of the callback's arguments."""
    return list(ContextRelianceArgs.model_fields)


def callback_kwargs(values: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`~ctx_callback.ContextRelianceCallback` keyword arguments from validated ``ctx_reliance_*`` values.

    Args:
        values: The validated config (axolotl's ``cfg``, or ``ContextRelianceArgs.model_dump()``). A key that is
            missing or ``None`` is left out, so the callback's default applies (axolotl dumps its config with
            ``exclude_none=True``). Keys other than the plugin's are ignored.

    Returns:
        The arguments by constructor name, without ``trainer`` and ``tokenizer``.
    """
    kwargs: dict[str, Any] = {}
    for name in ContextRelianceArgs.model_fields:
        value = values.get(name)
        if value is not None:
            kwargs[name[len(KEY_PREFIX):]] = value
    if "informative_band" in kwargs:
        kwargs["informative_band"] = tuple(kwargs["informative_band"])
    if "variants" in kwargs:
        kwargs["variants"] = tuple(kwargs["variants"])
    return kwargs
