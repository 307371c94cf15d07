"""The generic registry (ctx_callback.registry) and the four registries built on it."""

from __future__ import annotations

import pytest

from ctx_callback.audit.adapters import AUDIT_FORMATS, AuditFormat
from ctx_callback.engines import LOGLIK_ENGINES, LoglikEngine
from ctx_callback.errors import AuditDataError, ConfigurationError
from ctx_callback.presets import PROBE_PRESETS, ProbePreset
from ctx_callback.probe_formats import PROBE_FORMATS, ProbeRecordFormat
from ctx_callback.registry import Registry


def test_register_lookup_and_names_in_registration_order():
    colors: Registry[int] = Registry("color")
    assert colors.register("red", 1) == 1
    colors.register("blue", 2)
    colors.register("green", 3)
    assert colors.names() == ("red", "blue", "green")
    assert list(colors) == ["red", "blue", "green"] and len(colors) == 3
    assert colors.lookup("blue") == 2 and colors["green"] == 3 and "red" in colors and "pink" not in colors
    assert dict(colors) == {"red": 1, "blue": 2, "green": 3}
    assert repr(colors) == "Registry('color', ['red', 'blue', 'green'])"


def test_a_taken_name_is_refused_unless_replace_is_asked():
    colors: Registry[int] = Registry("color")
    colors.register("red", 1)
    with pytest.raises(ConfigurationError, match=r"^color 'red' is already registered\.$"):
        colors.register("red", 2)
    assert colors["red"] == 1
    colors.register("red", 2, replace=True)
    assert colors["red"] == 2
    colors["red"] = 3  # item assignment is the explicit form
    assert colors["red"] == 3 and colors.names() == ("red",)


def test_lookup_of_an_unknown_name_names_the_known_entries():
    colors: Registry[int] = Registry("color")
    colors.register("red", 1)
    colors.register("blue", 2)
    with pytest.raises(ConfigurationError, match=r"^unknown color 'pink'; registered: \['red', 'blue'\]\.$"):
        colors.lookup("pink")
    with pytest.raises(KeyError):  # indexing stays a mapping's
        colors["pink"]
    assert colors.get("pink") is None


def test_error_type_message_and_name_check_are_the_registry_s_own():
    def no_spaces(name: str) -> None:
        if " " in name:
            raise ConfigurationError(f"color name {name!r} may not contain spaces.")

    colors: Registry[int] = Registry("color", error=AuditDataError, check_name=no_spaces,
                                     unknown_message=lambda name, reg: f"no {name!r} among {reg.names()}")
    colors.register("red", 1)
    with pytest.raises(AuditDataError, match=r"^no 'pink' among \('red',\)$"):
        colors.lookup("pink")
    with pytest.raises(AuditDataError, match="already registered"):
        colors.register("red", 1)
    with pytest.raises(ConfigurationError, match="may not contain spaces"):
        colors.register("light red", 4)
    assert colors.names() == ("red",)


def test_decorator_registers_what_it_builds_and_returns_the_decorated_object():
    shouts: Registry[tuple[str, object]] = Registry("shout")

    @shouts.decorator("loud", lambda fn: ("loud", fn))
    def loud(text: str) -> str:
        return text.upper()

    assert loud("a") == "A"  # the function itself comes back
    assert shouts.lookup("loud") == ("loud", loud)
    with pytest.raises(ConfigurationError, match="already registered"):
        shouts.decorator("loud", lambda fn: ("loud", fn))(loud)
    shouts.decorator("loud", lambda fn: ("again", fn), replace=True)(loud)
    assert shouts["loud"][0] == "again"


def test_copy_is_independent_and_keeps_the_rules():
    colors: Registry[int] = Registry("color", error=AuditDataError)
    colors.register("red", 1)
    other = colors.copy()
    other.register("blue", 2)
    assert colors.names() == ("red",) and other.names() == ("red", "blue")
    with pytest.raises(AuditDataError, match="already registered"):
        other.register("red", 5)
    del other["red"]
    assert other.names() == ("blue",) and colors.names() == ("red",)
    other.clear()
    other.update({"green": 3})
    assert dict(other) == {"green": 3}


@pytest.mark.parametrize(("registry", "entry_type", "first"), [
    (PROBE_FORMATS, ProbeRecordFormat, "ctx_callback"),
    (PROBE_PRESETS, ProbePreset, "nq_swap"),
    (AUDIT_FORMATS, AuditFormat, "alpaca"),
])
def test_the_registries_of_the_package_are_registries(registry, entry_type, first):
    assert isinstance(registry, Registry)
    assert registry.names()[0] == first
    for name, entry in registry.items():
        assert isinstance(entry, entry_type) and entry.name == name


def test_the_engine_registry_holds_classes_and_its_own_message():
    assert isinstance(LOGLIK_ENGINES, Registry)
    assert LOGLIK_ENGINES.names() == ("prefix", "batched", "simple")
    assert all(issubclass(cls, LoglikEngine) for cls in LOGLIK_ENGINES.values())
    with pytest.raises(ConfigurationError, match=r"^engine must be one of \['auto', 'prefix', 'batched', 'simple'\], "
                                                 r"got 'fastest'\.$"):
        LOGLIK_ENGINES.lookup("fastest")


def test_lookup_messages_of_the_package_registries():
    with pytest.raises(ConfigurationError, match=r"^Unknown probe format 'csv'; expected one of \['ctx_callback', "):
        PROBE_FORMATS.lookup("csv")
    with pytest.raises(ConfigurationError, match=r"^unknown data format 'csv'; choose from \['alpaca', .*'auto'"):
        AUDIT_FORMATS.lookup("csv")
    with pytest.raises(ConfigurationError, match=r"^unknown probe preset 'nq'; registered: \['nq_swap', "):
        PROBE_PRESETS.lookup("nq")
