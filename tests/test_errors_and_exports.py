"""One error root for bad input, and public names that exist where ``__all__`` says they do."""

from __future__ import annotations

import importlib
import inspect
import json

import pytest

import ctx_callback
from ctx_callback import errors
from ctx_callback.errors import (
    CheckpointMismatchError,
    ConfigurationError,
    ConfigurationTypeError,
    CtxCallbackError,
    ProbeFormatError,
    ProbeSourceError,
    TrainerWiringError,
)
from ctx_callback.probe_formats import PROBE_FORMATS, register_probe_format
from ctx_callback.probes import load_probes

MODULES = ["callback", "checkpoints", "distributed", "encoding", "errors", "formatting", "metrics", "models",
           "monitor", "peak", "plotting", "probe_formats", "probes", "scoring"]


def test_every_error_is_a_ctx_callback_error_and_a_value_error():
    classes = [obj for _, obj in inspect.getmembers(errors, inspect.isclass) if issubclass(obj, Exception)]
    exported_classes = [name for name in errors.__all__ if inspect.isclass(getattr(errors, name))]
    assert sorted(cls.__name__ for cls in classes) == sorted(exported_classes)
    for cls in classes:
        assert issubclass(cls, CtxCallbackError) and issubclass(cls, ValueError), cls
        assert cls.__doc__, f"{cls.__name__} needs a docstring"
    # the types these replaced stay catchable as before
    assert issubclass(TrainerWiringError, TypeError) and issubclass(ConfigurationTypeError, TypeError)
    assert issubclass(CheckpointMismatchError, RuntimeError)


@pytest.mark.parametrize("module", MODULES)
def test_all_lists_exactly_names_that_exist(module):
    mod = importlib.import_module(f"ctx_callback.{module}")
    names = getattr(mod, "__all__", None)
    assert names is not None and len(names) == len(set(names))
    for name in names:
        assert hasattr(mod, name), f"ctx_callback.{module}.__all__ lists missing {name!r}"


def test_package_exports_resolve_to_their_modules():
    assert ctx_callback.__all__ == sorted(ctx_callback._EXPORTS)
    for name, module in ctx_callback._EXPORTS.items():
        obj = getattr(ctx_callback, name)
        assert obj is getattr(importlib.import_module(f"ctx_callback.{module}"), name)


def test_probe_loading_errors_have_specific_types(tmp_path):
    with pytest.raises(ProbeSourceError, match="Unknown probe suite 'wordl_facts'"):
        load_probes("wordl_facts")
    with pytest.raises(ProbeSourceError, match="does not exist"):
        load_probes(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ConfigurationError, match="Unknown probe format 'csv'"):
        load_probes([{"context": "c"}], format="csv")
    with pytest.raises(ConfigurationError, match="families"):
        load_probes("world_facts", families=["nope"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "c"}\n')
    with pytest.raises(ProbeFormatError, match="bad.jsonl, line 1: cannot detect the probe format"):
        load_probes(bad)


@pytest.fixture
def restore_probe_formats():
    before = dict(PROBE_FORMATS)
    yield
    PROBE_FORMATS.clear()
    PROBE_FORMATS.update(before)


def test_a_registered_probe_format_is_loaded_and_detected(tmp_path, restore_probe_formats):
    """What 'one edit' means for probe formats: register a converter and load_probes reads the layout."""
    @register_probe_format("swapped_facts", detect=lambda keys: {"passage", "fake", "true"} <= keys,
                           description="passage, q, fake, true (test only)")
    def _convert(record, where, mapping):
        return {"context": record["passage"], "question": record["q"],
                "counterfactual_answer": record["fake"], "parametric_answer": record["true"]}

    path = tmp_path / "swapped.jsonl"
    rows = [{"passage": "The capital of Peru is Cusco.", "q": "Capital of Peru?", "fake": "Cusco", "true": "Lima"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    for fmt in (None, "swapped_facts"):
        (probe,) = load_probes(path, format=fmt)
        assert (probe.counterfactual_answer, probe.parametric_answer, probe.id) == ("Cusco", "Lima", "swapped/0")
    with pytest.raises(ConfigurationError, match="already registered"):
        register_probe_format("swapped_facts")(_convert)
    # validation still runs on what a converter returns
    path.write_text(json.dumps({**rows[0], "fake": "Lima"}))
    with pytest.raises(ProbeFormatError, match="identical"):
        load_probes(path)
