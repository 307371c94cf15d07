"""What a metric is: :class:`MetricSpec`, its per-probe outcome and aggregate, and the registry of metrics. Pure numpy.

A metric is defined once, per probe: ``per_probe(table)`` gives one value per probe (NaN where it does not apply)
and ``outcome`` says what kind of value that is (:data:`HIT`: 1.0/0.0 hit/miss, read with Wilson intervals and the
exact McNemar test; :data:`CONTINUOUS`: a number, read with Student's t, ``bounds`` clipping its intervals). Its
logged value is the aggregate of those values over a probe group, by default their mean (:class:`MeanOverProbes`), as
lm-evaluation-harness separates a metric's per-item function from its aggregation. A metric without per-probe values
(a ratio of sums, a count) gives ``compute`` instead and has no intervals or paired tests.

:class:`MetricRegistry` holds the metrics in display order; :data:`ctx_callback.metrics.METRICS` is the one every
part of the library reads at call time, so a metric added with :func:`ctx_callback.metrics.register_metric` is seen
everywhere. :class:`MetricNames` and :class:`OutcomeKinds` are live views of it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np

from .errors import ConfigurationError
from .score_table import ScoreTable

__all__ = [
    "CONTINUOUS",
    "CONTROL_VARIANTS",
    "HIT",
    "METRIC_PREFIX",
    "MODES",
    "OUTCOME_KINDS",
    "MeanOverProbes",
    "MetricNames",
    "MetricRegistry",
    "MetricSpec",
    "OutcomeKinds",
]

#: The namespace of every logged key: ``ctx_reliance/<metric>`` and ``ctx_reliance/<family>/<metric>``.
METRIC_PREFIX = "ctx_reliance"
#: Scoring modes: compare the two answers' log-likelihoods, or generate greedily and match answers in the output.
MODES: tuple[str, ...] = ("loglik", "generate")
#: Outcome kind of a hit/miss metric: per-probe values 1.0/0.0 (NaN = not scored).
HIT = "hit"
#: Outcome kind of a metric that is a mean of per-probe numbers (probability, margin, lift).
CONTINUOUS = "continuous"
OUTCOME_KINDS: tuple[str, ...] = (HIT, CONTINUOUS)
#: The probe variants a metric may need besides ``"context"``.
CONTROL_VARIANTS: tuple[str, ...] = ("closed_book", "aligned", "irrelevant")
MAX_SHORT_LENGTH = 7


@dataclass(frozen=True)
class MeanOverProbes:
    """The default aggregate of a metric: the mean of its per-probe values over the probes that have one (NaN when
    none has)."""

    per_probe: Callable[[ScoreTable], np.ndarray]

    def __call__(self, table: ScoreTable) -> float:
        values = np.asarray(self.per_probe(table), dtype=np.float64)
        values = values[~np.isnan(values)]
        return float(values.mean()) if values.size else float("nan")


@dataclass(frozen=True)
class MetricSpec:
    """Everything about one metric, in one place.

    Attributes:
        name: The metric's key suffix (``ctx_reliance/<name>``); stable, it ends up on dashboards.
        description: One line for the metric glossary (``docs/metrics.md`` (Markdown; ``|`` is escaped when rendered).
        short: Column label in the command line's tables (at most 7 characters).
        modes: Modes in which the metric exists (``"loglik"``, ``"generate"``).
        compute: ``fn(table) -> float``: the metric of one probe group from a :class:`ScoreTable`. Leave it out when
            ``per_probe`` is given: it is then the mean of the per-probe values (:class:`MeanOverProbes`).
        requires: The probe variant it needs besides ``"context"`` (``"closed_book"``, ``"aligned"``,
            ``"irrelevant"``), a tuple of them when it needs several, or ``None``.
        greater_is_better: Direction when the metric is monitored (the peak is a maximum, or a minimum).
        monitorable: Whether ``monitor=`` may name it (``num_probes`` is a count, not a measurement).
        in_summary_table: Shown by default in ``ctx-callback scan``'s table.
        plot_label: Drawn by ``ctx-callback plot`` / ``plot=True`` with this legend label; ``None`` = not drawn.
        per_probe: ``fn(table) -> array``: one value per probe (row of the table), NaN where the probe has none.
            What the intervals, the paired test of ``stop_rule="significant_decline"`` and the decline's interval
            read. ``None`` for a metric that is not a mean over probes (a ratio of sums, a count).
        outcome: With ``per_probe``: :data:`HIT` (values 1.0/0.0: Wilson intervals, exact McNemar test) or
            :data:`CONTINUOUS` (any number: Student's t interval, paired t-test).
        bounds: A :data:`CONTINUOUS` metric's range (e.g. ``(0.0, 1.0)`` for a probability): its t intervals are
            clipped to it. ``None``: unbounded.
        interval: Log the uncertainty keys (``<key>_se``, ``<key>_ci_low``, ``<key>_ci_high``) of the overall metric
            at every probe event even when it is not monitored (the monitored metric always gets them).
        needs_parametric: Reads the parametric answer (the true fact): a probe without one (a multiple-choice probe
            whose dataset does not say which option is true) is skipped, so over such probes alone it is NaN.

    Raises:
        ConfigurationError: Neither ``compute`` nor ``per_probe``, ``per_probe`` without a valid ``outcome`` (or the
            reverse), ``bounds`` on a hit/miss metric, or ``interval`` without per-probe values.
    """

    name: str
    description: str
    short: str
    modes: tuple[str, ...]
    compute: Callable[[ScoreTable], float] = None  # type: ignore[assignment]  # filled in from per_probe
    requires: str | tuple[str, ...] | None = None
    greater_is_better: bool = True
    monitorable: bool = True
    in_summary_table: bool = False
    plot_label: str | None = None
    per_probe: Callable[[ScoreTable], np.ndarray] | None = None
    outcome: str | None = None
    bounds: tuple[float, float] | None = None
    interval: bool = False
    needs_parametric: bool = False

    def __post_init__(self) -> None:
        where = f"metric {self.name!r}"
        if self.per_probe is None:
            if self.compute is None:
                raise ConfigurationError(f"{where} needs per_probe=fn(table) -> one value per probe (or compute=).")
            if self.outcome is not None or self.bounds is not None or self.interval:
                raise ConfigurationError(f"{where}: outcome, bounds and interval describe per-probe values; give "
                                         "per_probe=fn(table) -> one value per probe, or drop them.")
            return
        if self.outcome not in OUTCOME_KINDS:
            raise ConfigurationError(f"{where}: outcome must be one of {list(OUTCOME_KINDS)} with per_probe (hit: "
                                     f"1.0/0.0 per probe; continuous: any number), got {self.outcome!r}.")
        if self.bounds is not None and self.outcome != CONTINUOUS:
            raise ConfigurationError(f"{where}: bounds clip the t interval of a continuous metric; a hit/miss "
                                     "metric's Wilson interval is within [0, 1] already: drop bounds.")
        if self.compute is None:
            object.__setattr__(self, "compute", MeanOverProbes(self.per_probe))

    @property
    def key(self) -> str:
        """The overall logged key, ``ctx_reliance/<name>``."""
        return f"{METRIC_PREFIX}/{self.name}"

    @property
    def is_hit(self) -> bool:
        """Per-probe values are hits/misses (Wilson intervals, McNemar test)."""
        return self.outcome == HIT

    @property
    def required_variants(self) -> tuple[str, ...]:
        """The variants it needs besides ``"context"`` (``requires`` as a tuple; empty for none)."""
        if self.requires is None:
            return ()
        return (self.requires,) if isinstance(self.requires, str) else tuple(self.requires)

    def exists_for(self, mode: str, variants: Iterable[str]) -> bool:
        """Whether the metric exists in ``mode`` when ``variants`` are scored."""
        scored = set(variants)
        return mode in self.modes and all(variant in scored for variant in self.required_variants)

    def outcomes(self, table: ScoreTable) -> np.ndarray | None:
        """Per-probe values over ``table`` (float64, NaN = none), or ``None`` when the metric has no per-probe values
        or does not exist for the table's mode and variants."""
        if self.per_probe is None or not self.exists_for(table.mode, table.variant_index):
            return None
        return np.asarray(self.per_probe(table), dtype=np.float64)

    def check(self) -> None:
        """Check the fields that the tables and keys rely on.

        Raises:
            ConfigurationError: A name that is not ``[a-z_]+``, an empty or multi-line description, a short label
                that is empty or longer than 7 characters, modes outside :data:`MODES`, or an unknown ``requires``.
        """
        where = f"metric {self.name!r}"
        if not isinstance(self.name, str) or not re.fullmatch(r"[a-z_]+", self.name):
            raise ConfigurationError(f"{where}: the name must be lower-case letters and '_' (it becomes a key).")
        if not self.description or "\n" in self.description:
            raise ConfigurationError(f"{where}: give a one-line description (it is the glossary's meaning cell).")
        if not 0 < len(self.short) <= MAX_SHORT_LENGTH:
            raise ConfigurationError(f"{where}: short must have 1 to {MAX_SHORT_LENGTH} characters (a table column), "
                                     f"got {self.short!r}.")
        if not self.modes or not set(self.modes) <= set(MODES):
            raise ConfigurationError(f"{where}: modes must be a non-empty tuple of {list(MODES)}, got {self.modes!r}.")
        if (self.requires is not None and not self.required_variants) or not set(self.required_variants) <= set(
                CONTROL_VARIANTS):
            raise ConfigurationError(f"{where}: requires must be None or one of {list(CONTROL_VARIANTS)} (or a tuple "
                                     f"of them), got {self.requires!r}.")


class MetricRegistry(Sequence[MetricSpec]):
    """The metrics, in display order: a read-only sequence of :class:`MetricSpec` with :meth:`register` and
    :meth:`unregister`.

    Args:
        specs: The initial metrics (each checked with :meth:`MetricSpec.check`).
    """

    def __init__(self, specs: Iterable[MetricSpec] = ()) -> None:
        self._specs: list[MetricSpec] = []
        for spec in specs:
            self.register(spec)

    @overload
    def __getitem__(self, index: int) -> MetricSpec: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[MetricSpec, ...]: ...

    def __getitem__(self, index: int | slice) -> MetricSpec | tuple[MetricSpec, ...]:
        return tuple(self._specs[index]) if isinstance(index, slice) else self._specs[index]

    def __len__(self) -> int:
        return len(self._specs)

    def __iter__(self) -> Iterator[MetricSpec]:
        return iter(tuple(self._specs))

    def __repr__(self) -> str:
        return f"MetricRegistry({[spec.name for spec in self._specs]})"

    def get(self, name: str) -> MetricSpec | None:
        """The metric called ``name``, or ``None``."""
        return next((spec for spec in self._specs if spec.name == name), None)

    def register(self, spec: MetricSpec) -> MetricSpec:
        """Add ``spec`` after the others.

        Raises:
            ConfigurationError: Not a :class:`MetricSpec`, a malformed field (:meth:`MetricSpec.check`), or a name
                or short label already taken.
        """
        if not isinstance(spec, MetricSpec):
            raise ConfigurationError(f"register a MetricSpec, got {type(spec).__name__}.")
        spec.check()
        if self.get(spec.name) is not None:
            raise ConfigurationError(f"a metric called {spec.name!r} is registered already; pick another name or "
                                     "unregister the old one first.")
        taken = {other.short: other.name for other in self._specs}
        if spec.short in taken:
            raise ConfigurationError(f"metric {spec.name!r}: short label {spec.short!r} is taken by "
                                     f"{taken[spec.short]!r}; pick another (it is a table column).")
        self._specs.append(spec)
        return spec

    def unregister(self, name: str) -> MetricSpec:
        """Remove the metric called ``name`` and return it.

        Raises:
            ConfigurationError: No metric has that name.
        """
        spec = self.get(name)
        if spec is None:
            raise ConfigurationError(f"no metric called {name!r} is registered; registered: {self.names()}.")
        self._specs.remove(spec)
        return spec

    def names(self) -> list[str]:
        """The names, in order."""
        return [spec.name for spec in self._specs]


class MetricNames(Sequence[str]):
    """A live, read-only sequence of the names of the metrics that pass ``keep``, in table order (it follows
    registrations). Equal to any sequence with the same names in the same order.

    Args:
        source: Returns the metrics to read (called on every access).
        keep: Which metrics to name.
    """

    def __init__(self, source: Callable[[], Iterable[MetricSpec]], keep: Callable[[MetricSpec], bool]) -> None:
        self._source = source
        self._keep = keep

    def _names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self._source() if self._keep(spec))

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[str, ...]: ...

    def __getitem__(self, index: int | slice) -> str | tuple[str, ...]:
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and not isinstance(other, str) and self._names() == tuple(other)

    def __hash__(self) -> int:
        return hash(self._names())

    def __repr__(self) -> str:
        return repr(self._names())


class OutcomeKinds(Mapping[str, bool]):
    """A live, read-only ``{name: is hit/miss}`` of the metrics with per-probe values, in table order (it follows
    registrations).

    Args:
        source: Returns the metrics to read (called on every access).
    """

    def __init__(self, source: Callable[[], Iterable[MetricSpec]]) -> None:
        self._source = source

    def _kinds(self) -> dict[str, bool]:
        return {spec.name: spec.is_hit for spec in self._source() if spec.per_probe is not None}

    def __getitem__(self, name: str) -> bool:
        return self._kinds()[name]

    def __len__(self) -> int:
        return len(self._kinds())

    def __iter__(self) -> Iterator[str]:
        return iter(self._kinds())

    def __repr__(self) -> str:
        return repr(self._kinds())
