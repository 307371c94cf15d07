"""Which part of the probes carries the decline: each family's (and relation's) share of the decline from the peak.

A replication of Goyal et al. found one category (country capitals) carrying most of the decline. From the monitored
metric's per-probe decline between the peak event and now (the paired outcomes the stop rules compare,
:attr:`~ctx_callback.comparison.Comparison.per_probe`), a group's share is the sum of its probes' declines over the sum
of all::

    share(g) = sum_{i in g} (peak_i - now_i) / sum_i (peak_i - now_i)

over the probes scored at both events (the sign flipped for a metric where lower is better). The shares of the
families sum to 1; a family that improved has a negative share. Relations (``metadata["relation"]``, e.g.
``world_facts/capital``) split their family the same way. Nothing is reported while the monitored metric has not
declined (a non-positive sum).

Logged keys (at every probe event with a decline): ``ctx_reliance/decline_share/<family>`` and
``ctx_reliance/decline_share/<family>/<relation>``; the summary keeps the last event's, and ``ctx-callback flips``
gives the same split of the counterfactual accuracy's decline from the flips (:meth:`FlipReport.decline_shares
<ctx_callback.probe_log.FlipReport.decline_shares>`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .metric_spec import METRIC_PREFIX

__all__ = ["KEY_DECLINE_SHARE", "decline_shares", "group_labels", "shares_from_counts"]

#: Prefix of the logged shares: ``ctx_reliance/decline_share/<family>[/<relation>]``.
KEY_DECLINE_SHARE = f"{METRIC_PREFIX}/decline_share"


def group_labels(probes: Sequence[Any]) -> tuple[list[str], list[str | None]]:
    """Each probe's family, and its ``family/relation`` label (``None`` when its metadata names no relation)."""
    families = [p.family for p in probes]
    relations = []
    for probe in probes:
        relation = probe.metadata.get("relation") if probe.metadata else None
        relations.append(None if relation in (None, "") else f"{probe.family}/{relation}")
    return families, relations


def shares_from_counts(declines: dict[str, float]) -> dict[str, float]:
    """Each group's share of the summed decline (``{}`` when the sum is not positive)."""
    total = float(sum(declines.values()))
    if not total > 0:
        return {}
    return {group: float(value) / total for group, value in sorted(declines.items())}


def decline_shares(per_probe: np.ndarray | None, families: Sequence[str],
                   relations: Sequence[str | None] | None = None) -> dict[str, float]:
    """``{key: share}`` of the decline from the peak, per family and per relation (module docstring).

    Args:
        per_probe: Per-probe decline (positive = worse), NaN where a probe was not scored at both events; ``None``
            without paired outcomes.
        families: Family of each probe, in the same order.
        relations: ``family/relation`` label of each probe (``None`` where it has none); ``None`` for no relations.

    Returns:
        ``ctx_reliance/decline_share/<group>`` keys; empty without a positive decline.
    """
    if per_probe is None:
        return {}
    per_probe = np.asarray(per_probe, dtype=np.float64)
    valid = ~np.isnan(per_probe)
    total = float(per_probe[valid].sum())
    if not total > 0:
        return {}
    out: dict[str, float] = {}
    for labels in (families, relations) if relations is not None else (families,):
        sums: dict[str, float] = {}
        for value, label, ok in zip(per_probe, labels, valid):
            if ok and label is not None:
                sums[label] = sums.get(label, 0.0) + float(value)
        out.update({f"{KEY_DECLINE_SHARE}/{group}": value / total for group, value in sorted(sums.items())})
    return out
