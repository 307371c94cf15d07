"""Integrations of :class:`~ctx_callback.ContextRelianceCallback` with training frameworks.

- :mod:`ctx_callback.integrations.axolotl`: an axolotl plugin (``plugins:`` in the YAML, ``ctx_reliance_*`` keys),
  page ``docs/axolotl.md``. Importing it needs axolotl; its keys and their mapping onto the callback live in
  :mod:`ctx_callback.integrations.axolotl_args`, which needs only pydantic.

This package imports no framework: ``import ctx_callback.integrations`` works without any of them.
"""
