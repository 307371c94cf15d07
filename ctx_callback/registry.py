"""One registry shape for everything the library looks up by name: probe formats, probe presets, engines, audit formats.

A :class:`Registry` maps names to entries of one kind, in registration order (the order detection tries them and
documentation lists them). It registers an entry by name (:meth:`Registry.register`) or by decorating the function or
class the entry is built from (:meth:`Registry.decorator`), refuses to overwrite a name unless asked
(``replace=True``), and looks a name up with an error that names the kind and the known entries
(:meth:`Registry.lookup`). It is a mutable mapping, so ``name in registry``, ``registry[name]``, ``list(registry)``
and ``dict(registry)`` read it as before, when the registries were plain dicts.

The four registries built on it:

- :data:`~ctx_callback.probe_formats.PROBE_FORMATS` (``register_probe_format``);
- :data:`~ctx_callback.presets.PROBE_PRESETS` (``register_probe_preset``);
- :data:`~ctx_callback.engines.LOGLIK_ENGINES` (``register_engine``);
- :data:`~ctx_callback.audit.adapters.AUDIT_FORMATS` (``register_audit_format``).

Pure Python, no torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from typing import TypeVar

from .errors import ConfigurationError

__all__ = ["Registry"]

EntryT = TypeVar("EntryT")
DecoratedT = TypeVar("DecoratedT")


class Registry(MutableMapping[str, EntryT]):
    """Entries of one kind by name, in registration order.

    Args:
        kind: What an entry is, as messages say it (``"probe format"``).
        error: The exception raised for a taken name and for an unknown one.
        unknown_message: ``fn(name, registry) -> message`` for :meth:`lookup` of an unknown name; by default the
            message names the kind and lists the registered names.
        check_name: ``fn(name)`` that raises for a name that may not be registered (checked after the name is
            found to be free).

    Item assignment (``registry[name] = entry``) is the explicit form: it replaces an existing entry, as
    ``register(name, entry, replace=True)`` does. ``registry[name]`` of an unknown name raises ``KeyError``, as a
    dict does; :meth:`lookup` raises ``error`` with a message that says what exists.

    Example::

        FORMATS: Registry[Format] = Registry("probe format")

        @FORMATS.decorator("mine", lambda fn: Format("mine", fn))
        def _from_mine(record): ...

        FORMATS.lookup("mine")   # Format("mine", _from_mine)
        FORMATS.lookup("theirs") # ConfigurationError: unknown probe format 'theirs'; registered: ['mine'].
    """

    def __init__(
        self,
        kind: str,
        *,
        error: type[Exception] = ConfigurationError,
        unknown_message: Callable[[str, Registry[EntryT]], str] | None = None,
        check_name: Callable[[str], None] | None = None,
    ) -> None:
        self.kind = kind
        self.error = error
        self.unknown_message = unknown_message
        self.check_name = check_name
        self._entries: dict[str, EntryT] = {}

    def register(self, name: str, entry: EntryT, *, replace: bool = False) -> EntryT:
        """Add ``entry`` under ``name``.

        Args:
            name: The name users pass to select the entry.
            entry: The entry.
            replace: Replace an entry already registered under ``name`` (otherwise that is an error).

        Returns:
            ``entry``.

        Raises:
            Exception: ``self.error``: ``name`` is taken (and ``replace`` is false), or ``check_name`` refuses it.
        """
        if name in self._entries and not replace:
            raise self.error(f"{self.kind} {name!r} is already registered.")
        if self.check_name is not None:
            self.check_name(name)
        self._entries[name] = entry
        return entry

    def decorator(self, name: str, make_entry: Callable[[DecoratedT], EntryT], *,
                  replace: bool = False) -> Callable[[DecoratedT], DecoratedT]:
        """A decorator that registers ``make_entry(decorated)`` under ``name`` and returns the decorated object.

        Args:
            name: The name users pass to select the entry.
            make_entry: Builds the entry from the decorated function or class (``lambda cls: cls`` to register it
                as it is).
            replace: As in :meth:`register`.
        """

        def decorate(decorated: DecoratedT) -> DecoratedT:
            self.register(name, make_entry(decorated), replace=replace)
            return decorated

        return decorate

    def lookup(self, name: str) -> EntryT:
        """The entry registered under ``name``.

        Raises:
            Exception: ``self.error``, naming the kind and every registered name, when ``name`` is unknown.
        """
        if name not in self._entries:
            if self.unknown_message is not None:
                raise self.error(self.unknown_message(name, self))
            raise self.error(f"unknown {self.kind} {name!r}; registered: {list(self._entries)}.")
        return self._entries[name]

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order."""
        return tuple(self._entries)

    def copy(self) -> Registry[EntryT]:
        """A registry of the same kind and rules holding the same entries (registering in it leaves this one as
        it is)."""
        other: Registry[EntryT] = Registry(self.kind, error=self.error, unknown_message=self.unknown_message,
                                           check_name=self.check_name)
        other._entries = dict(self._entries)
        return other

    def __getitem__(self, name: str) -> EntryT:
        return self._entries[name]

    def __setitem__(self, name: str, entry: EntryT) -> None:
        self.register(name, entry, replace=True)

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._entries)})"
