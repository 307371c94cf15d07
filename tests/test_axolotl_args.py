"""The axolotl plugin's YAML keys (``ctx_callback.integrations.axolotl_args``), without axolotl: the mapping onto the
callback's constructor and the three validation layers of the pydantic model axolotl merges into its schema.

axolotl itself (config loading, trainer building, training) is tested in ``tests/test_axolotl.py`` (opt-in);
page ``docs/axolotl.md``.
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys

import pytest

pytest.importorskip("pydantic")

from pydantic import ValidationError  # noqa: E402

from ctx_callback import ContextRelianceCallback  # noqa: E402
from ctx_callback.integrations.axolotl_args import (  # noqa: E402
    KEY_PREFIX,
    ContextRelianceArgs,
    callback_kwargs,
    known_fields,
)

#: Constructor arguments that are not YAML keys: the plugin passes axolotl's trainer, whose tokenizer the callback uses.
NOT_KEYS = {"trainer", "tokenizer"}


def constructor_parameters() -> dict[str, inspect.Parameter]:
    params = inspect.signature(ContextRelianceCallback.__init__).parameters
    return {name: p for name, p in params.items() if name != "self" and name not in NOT_KEYS}


def test_every_callback_argument_is_a_key_with_the_callbacks_default():
    params = constructor_parameters()
    keys = [name[len(KEY_PREFIX):] for name in known_fields()]
    assert all(name.startswith(KEY_PREFIX) for name in known_fields())
    assert keys == list(params), "the YAML keys must follow the constructor's arguments one to one, in order"
    defaults = ContextRelianceArgs()
    for name, param in params.items():
        value = getattr(defaults, KEY_PREFIX + name)
        expected = param.default
        if isinstance(expected, tuple):  # YAML has lists; callback_kwargs turns them back into tuples
            value = tuple(value)
        assert value == expected, f"{KEY_PREFIX}{name}: default {value!r}, the callback's is {expected!r}"


def test_the_defaults_build_the_callbacks_default_arguments():
    assert callback_kwargs(ContextRelianceArgs().model_dump()) == {
        name: p.default for name, p in constructor_parameters().items() if p.default is not None
    }


def test_yaml_values_reach_the_callback_and_missing_or_none_ones_keep_its_defaults():
    cfg = {"ctx_reliance_probes": "world_facts", "ctx_reliance_eval_steps": 7, "ctx_reliance_patience": 2,
           "ctx_reliance_informative_band": [0.1, 0.9], "ctx_reliance_monitor": None, "base_model": "elsewhere"}
    args = ContextRelianceArgs.model_validate(cfg)
    kwargs = callback_kwargs(args.model_dump())
    assert kwargs["probes"] == "world_facts" and kwargs["eval_steps"] == 7 and kwargs["patience"] == 2
    assert kwargs["informative_band"] == (0.1, 0.9) and "monitor" not in kwargs and "base_model" not in kwargs
    callback = ContextRelianceCallback(None, **kwargs)
    assert (callback.eval_steps, callback.informative_band) == (7, (0.1, 0.9))
    assert {p.family for p in callback.probes} == {"world_facts"}


@pytest.mark.parametrize("cfg, fragments", [
    ({"ctx_reliance_eval_step": 50}, ["'ctx_reliance_eval_step'", "did you mean 'ctx_reliance_eval_steps'"]),
    ({"ctx_reliance_eval_steps": "50"}, ["ctx_reliance_eval_steps", "int"]),
    ({"ctx_reliance_eval_steps": 1.5}, ["ctx_reliance_eval_steps", "int"]),
    ({"ctx_reliance_known_only": "yes"}, ["ctx_reliance_known_only", "bool"]),
    ({"ctx_reliance_mode": "fast"}, ["mode must be 'loglik' or 'generate'", "got 'fast'", KEY_PREFIX]),
    ({"ctx_reliance_eval_steps": 0}, ["eval_steps must be an integer >= 1"]),
    ({"ctx_reliance_restore_peak_at_end": True}, ["restore_peak_at_end=True needs save_peak_checkpoint=True"]),
    ({"ctx_reliance_probes": "no_such_suite"}, ["no_such_suite"]),
])
def test_a_bad_key_or_value_is_a_validation_error_that_names_it(cfg, fragments):
    with pytest.raises(ValidationError) as info:
        ContextRelianceArgs.model_validate(cfg)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message


def test_the_plugin_module_says_how_to_install_axolotl_when_it_is_missing(monkeypatch):
    # what an environment without axolotl gives (also where an earlier test imported it)
    for name in ["axolotl", *(name for name in list(sys.modules) if name.startswith("axolotl."))]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "ctx_callback.integrations.axolotl", raising=False)
    with pytest.raises(ImportError, match=r"needs axolotl, which is not installed: `pip install axolotl`"):
        importlib.import_module("ctx_callback.integrations.axolotl")
    import ctx_callback.integrations  # noqa: F401  (the package itself imports no framework)


def test_the_docs_page_lists_every_key_with_its_default():
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "axolotl.md").read_text(encoding="utf-8")
    rows = {line.split("|")[1].strip(" `"): line.split("|")[2].strip(" `") for line in page.splitlines()
            if line.startswith("| `ctx_reliance_")}
    assert list(rows) == known_fields()
    defaults = ContextRelianceArgs().model_dump()
    for name, shown in rows.items():
        assert shown == ("null" if defaults[name] is None else json.dumps(defaults[name])), name
