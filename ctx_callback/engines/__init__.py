"""Log-likelihood engines: interchangeable ways to compute the same answer log-probabilities.

Every engine subclasses :class:`LoglikEngine`: it is built with the :class:`~ctx_callback.encoding.EncodedProbes`
(``pad_token_id``, ``shared_prefix``) and a :class:`Batcher` (token and row budgets), and implements
``score(model, items) -> list[(counterfactual_logprob, parametric_logprob)]``, the summed log-probability of each
item's two answers given its prompt. ``applicable(items)`` says whether it can score those items (otherwise the
scorer uses ``"batched"`` for that call). All engines compute the same numbers up to float summation order; the
tests check each registered engine against ``"simple"`` to 1e-5.

- ``"prefix"``: shared-prefix KV cache (preamble once, each prompt once, answers from its cache);
- ``"batched"``: one right-padded row per (prompt, answer), length-sorted batches;
- ``"simple"``: one unbatched forward pass per (prompt, answer), the reference;
- ``"auto"`` (default, not in the registry): ``"prefix"``, falling back to ``"batched"`` (see :mod:`.auto`).

To add an engine, write a module with a ``LoglikEngine`` subclass and register it in :data:`LOGLIK_ENGINES` (a
:class:`~ctx_callback.registry.Registry`; or decorate it with ``@register_engine("name")`` outside this package)::

    class MyEngine(LoglikEngine):
        name = "mine"

        def score(self, model, items):
            ...  # use self.batcher.batches(lengths) and self.encoded.pad_token_id

``ProbeScorer(engine="mine")`` then accepts it, and the engine-agreement tests cover it.
"""

from __future__ import annotations

from collections.abc import Callable

from ..encoding import EncodedProbes
from ..errors import ConfigurationError
from ..registry import Registry
from .auto import AutoEngine
from .base import LoglikEngine, is_out_of_memory
from .batched import BatchedEngine
from .batching import Batcher
from .generation import GenerationEngine
from .prefix import PrefixCacheEngine
from .simple import SimpleEngine

__all__ = [
    "AUTO",
    "FALLBACK_ENGINE",
    "LOGLIK_ENGINES",
    "AutoEngine",
    "BatchedEngine",
    "Batcher",
    "GenerationEngine",
    "LoglikEngine",
    "PrefixCacheEngine",
    "SimpleEngine",
    "create_loglik_engine",
    "check_engine_name",
    "engine_names",
    "is_out_of_memory",
    "register_engine",
]

#: The default engine name: :class:`AutoEngine` (prefix cache, falling back to batched).
AUTO = "auto"

#: The log-likelihood engines by name. Adding an engine = one module + one ``register`` line here.
LOGLIK_ENGINES: Registry[type[LoglikEngine]] = Registry(
    "engine", unknown_message=lambda name, _: f"engine must be one of {list(engine_names())}, got {name!r}."
)
LOGLIK_ENGINES.register("prefix", PrefixCacheEngine)
LOGLIK_ENGINES.register("batched", BatchedEngine)
LOGLIK_ENGINES.register("simple", SimpleEngine)

#: The engine used for a call that the chosen engine is not :meth:`~LoglikEngine.applicable` to.
FALLBACK_ENGINE = "batched"


def engine_names() -> tuple[str, ...]:
    """Every name ``ProbeScorer(engine=...)`` accepts: ``"auto"``, then the registry's."""
    return (AUTO, *LOGLIK_ENGINES)


def check_engine_name(engine: str) -> None:
    """Refuse an engine name :func:`engine_names` does not list (the scorer's and the audit's argument check).

    Raises:
        ConfigurationError: ``engine`` is not ``"auto"`` nor a registered engine; the message lists them.
    """
    if engine not in engine_names():
        raise ConfigurationError(f"engine must be one of {list(engine_names())}, got {engine!r}.")


def register_engine(name: str) -> Callable[[type[LoglikEngine]], type[LoglikEngine]]:
    """Class decorator adding an engine to :data:`LOGLIK_ENGINES` under ``name`` (for engines outside this package).

    Raises:
        ConfigurationError: ``name`` is ``"auto"`` or already registered to another class.
    """

    def decorate(cls: type[LoglikEngine]) -> type[LoglikEngine]:
        if name == AUTO or LOGLIK_ENGINES.get(name, cls) is not cls:
            raise ConfigurationError(f"engine name {name!r} is taken; registered: {list(engine_names())}.")
        cls.name = name
        LOGLIK_ENGINES.register(name, cls, replace=True)  # the same class again: a no-op
        return cls

    return decorate


def create_loglik_engine(name: str, encoded: EncodedProbes, batcher: Batcher) -> LoglikEngine:
    """The engine called ``name`` (``"auto"`` or a registry key), built for ``encoded`` with ``batcher``.

    Raises:
        ConfigurationError: Unknown name; the message lists the allowed ones.
    """
    if name == AUTO:
        return AutoEngine(encoded, batcher)
    return LOGLIK_ENGINES.lookup(name)(encoded, batcher)
