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

__all__ = ["KEY_DECLINE_SHARE", "decline_shares", "group_labels", "group_shares"]

#: Prefix of the logged shares: ``ctx_reliance/decline_share/<family>[/<relation>]``.
KEY_DECLINE_SHARE = f"{METRIC_PREFIX}/decline_share"


def group_labels(probes: Sequence[Any]) -> tuple[list[str], list[str | None]]:
    """Each probe's family, and its ``family/relation`` label (``None`` when its metadata names no relation)."""
    return ([p.family for p in probes],
            [None if p.relation is None else f"{p.family}/{p.relation}" for p in probes])


def group_shares(per_probe: np.ndarray, families: Sequence[str],
                 relations: Sequence[str | None] | None = None) -> dict[str, float]:
    """``{group: share}`` of the summed per-probe decline: the families (sorted), then the ``family/relation`` groups
    (sorted; a probe whose relation is ``None`` is in none); ``{}`` when the sum is not positive.

    Args:
        per_probe: Per-probe decline (positive = worse), NaN where a probe was not scored at both events.
        families: Family of each probe, in the same order.
        relations: ``family/relation`` label of each probe (``None`` where it has none); ``None`` for no relations.
    """
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
        out.update({group: value / total for group, value in sorted(sums.items())})
    return out


def decline_shares(per_probe: np.ndarray | None, families: Sequence[str],
                   relations: Sequence[str | None] | None = None) -> dict[str, float]:
    """The logged keys ``ctx_reliance/decline_share/<group>`` of :func:`group_shares` (``{}`` for ``per_probe=None``,
    an event without paired outcomes)."""
    if per_probe is None:
        return {}
    shares = group_shares(per_probe, families, relations)
    return {f"{KEY_DECLINE_SHARE}/{group}": share for group, share in shares.items()}
