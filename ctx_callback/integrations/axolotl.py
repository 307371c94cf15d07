"""An axolotl plugin that adds :class:`~ctx_callback.ContextRelianceCallback` to the trainer axolotl builds.

In the axolotl YAML::

    plugins:
      - ctx_callback.integrations.axolotl.ContextReliancePlugin
    ctx_reliance_probes: all
    ctx_reliance_eval_steps: 50

Every ``ctx_reliance_<argument>`` key is a callback argument (:class:`ContextRelianceArgs`, page
``docs/axolotl.md``). axolotl merges :class:`ContextRelianceArgs` into its config schema, so a bad key or value fails
at axolotl's config validation, before any model loads; :meth:`ContextReliancePlugin.add_callbacks_post_trainer`
builds the callback with the trainer axolotl created (axolotl then calls ``trainer.add_callback``). The probes are
rendered with the trainer's tokenizer (``trainer.processing_class``), whose chat template axolotl set from the
config's ``chat_template``, and axolotl's ``chat_template_kwargs`` unless ``ctx_reliance_chat_template_kwargs`` is
given.

Importing this module needs axolotl (``pip install axolotl``); ``import ctx_callback`` does not.
"""

from __future__ import annotations

from typing import Any

try:
    from axolotl.integrations.base import BasePlugin
except ModuleNotFoundError as err:
    if err.name is None or err.name.split(".")[0] != "axolotl":
        raise  # axolotl is there but one of its own dependencies is missing: axolotl's message says which
    raise ImportError(
        "ctx_callback.integrations.axolotl is an axolotl plugin and needs axolotl, which is not installed: "
        "`pip install axolotl` (tested with axolotl 0.19.0; the install used for the tests is in docs/axolotl.md). "
        "Outside axolotl, add ctx_callback.ContextRelianceCallback to your Trainer directly."
    ) from err

from .axolotl_args import ContextRelianceArgs, callback_kwargs

__all__ = ["ContextRelianceArgs", "ContextReliancePlugin", "build_callback"]


def build_callback(cfg: Any, trainer: Any) -> Any:
    """The callback the plugin adds: ``ContextRelianceCallback(trainer, **<the ctx_reliance_* keys>)``.

    Args:
        cfg: axolotl's validated config (a ``DictDefault``).
        trainer: The trainer axolotl built.

    Returns:
        The :class:`~ctx_callback.ContextRelianceCallback`; axolotl adds it to ``trainer``.
    """
    from ..callback import ContextRelianceCallback

    kwargs = callback_kwargs(cfg)
    if "chat_template_kwargs" not in kwargs and cfg.get("chat_template_kwargs"):
        kwargs["chat_template_kwargs"] = dict(cfg["chat_template_kwargs"])  # render probes as the data was rendered
    return ContextRelianceCallback(trainer, **kwargs)


class ContextReliancePlugin(BasePlugin):
    """axolotl plugin: probe context reliance during training (``plugins:`` entry
    ``ctx_callback.integrations.axolotl.ContextReliancePlugin``)."""

    def get_input_args(self) -> str:
        """The dotted path of the pydantic model axolotl merges into its config schema."""
        return "ctx_callback.integrations.axolotl_args.ContextRelianceArgs"

    def add_callbacks_post_trainer(self, cfg: Any, trainer: Any) -> list[Any]:
        """The callback, built with the trainer axolotl created (axolotl adds it with ``trainer.add_callback``)."""
        return [build_callback(cfg, trainer)]
