"""Which probes a run monitors: ``known_only`` and ``informative_band`` at train begin, kept on resume.

:class:`ProbeSelection` holds the selection (``active_indices``, ``None`` for all probes) and its per-family counts.
At a fresh run's train begin it selects on the model as it is (:meth:`ProbeSelection.select`): ``known_only`` keeps
the probes whose parametric answer the model prefers closed-book (no conflict exists where the model does not know
the fact), then ``informative_band`` keeps those whose baseline counterfactual probability ``p_cf / (p_cf + p_par)``
lies in the band (not at the ceiling or the floor). A resumed run takes the selection made at the run's start from
the checkpoint's resume state (:meth:`ProbeSelection.resume`), never a new selection on the fine-tuned weights.

Where a change goes: a new selection criterion is a method here, called from :meth:`ProbeSelection.select`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

from .errors import ConfigurationError
from .messages import rank_zero_info, rank_zero_warn
from .outcomes import metric_outcomes
from .probes import Probe
from .reliance_row import option_kwargs
from .resume_state import TRAINER_STATE_FILE, ResumeState

__all__ = ["ProbeSelection", "check_band"]


def check_band(band: Any, mode: str) -> tuple[float, float] | None:
    """Validate ``informative_band``: ``None``, or ``(low, high)`` with ``0 <= low < high <= 1`` in ``loglik`` mode.

    Raises:
        ConfigurationError: Another value, or another mode.
    """
    if band is None:
        return None
    ok = (isinstance(band, (tuple, list)) and len(band) == 2
          and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in band)
          and 0.0 <= band[0] < band[1] <= 1.0)
    if not ok:
        raise ConfigurationError(
            f"informative_band must be None or (low, high) with 0 <= low < high <= 1 (the band of baseline "
            f"counterfactual probability whose probes are kept), got {band!r}."
        )
    if mode != "loglik":
        raise ConfigurationError(
            "informative_band needs mode='loglik' (it selects on the counterfactual probability), got "
            f"mode={mode!r}."
        )
    return (float(band[0]), float(band[1]))


class ProbeSelection:
    """The probes a run monitors (module docstring).

    Args:
        probes: Every probe of the callback.
        known_only: Keep the probes the model knows closed-book.
        informative_band: ``(low, high)`` of baseline counterfactual probability, or ``None``.
        known_distractors: ``known_only``: length-matched distractors the parametric answer must also beat
            (:mod:`ctx_callback.known_facts`).

    Attributes:
        active_indices: Indices of the monitored probes, or ``None`` (all; or not selected yet).
        known_counts: ``{family: {"kept": n, "total": m}}`` of the selection, or ``None``.
    """

    def __init__(self, probes: Sequence[Probe], known_only: bool = False,
                 informative_band: tuple[float, float] | None = None, known_distractors: int = 0) -> None:
        self.probes = list(probes)
        self.known_only = known_only
        self.known_distractors = known_distractors
        self.informative_band = informative_band
        self.reset()

    @property
    def selects(self) -> bool:
        """Whether probes are selected at all (``known_only`` or ``informative_band``)."""
        return bool(self.known_only or self.informative_band is not None)

    def reset(self) -> None:
        """Forget the selection (it is made again on the model as it is)."""
        self.active_indices: list[int] | None = None
        self.known_counts: dict[str, dict[str, int]] | None = None

    def indices(self) -> Sequence[int]:
        """The monitored probes' indices."""
        return self.active_indices if self.active_indices is not None else range(len(self.probes))

    def monitored_count(self, family: str | None, indices: Sequence[int] | None = None) -> int:
        """How many of the probes ``indices`` (all when ``None``) a metric of ``family`` (``None``: overall) is
        computed on."""
        chosen = range(len(self.probes)) if indices is None else indices
        return sum(1 for i in chosen if family in (None, self.probes[i].family))

    def ids_digest(self) -> str:
        """SHA-1 of the monitored probes' ids (the resume state's per-probe records are for these probes)."""
        return hashlib.sha1("\n".join(self.probes[i].id for i in self.indices()).encode()).hexdigest()

    def saved_ids(self) -> list[str] | None:
        """The selected probe ids for the resume state (``None`` without a selection)."""
        if not self.selects or self.active_indices is None:
            return None
        return [self.probes[i].id for i in self.active_indices]

    def select(self, model: Any, scorer: Any) -> None:
        """Select on ``model`` as it is (train begin of a fresh run), unless a selection is already made.

        Raises:
            ConfigurationError: The selection kept no probe.
        """
        if self.known_only and self.active_indices is None:
            self.active_indices, self.known_counts = scorer.known_probe_indices(model, self.known_distractors)
            summary = ", ".join(f"{f}: {c['kept']}/{c['total']}" + (
                f" ({c['known_without_distractors']} without the distractors)" if "known_without_distractors" in c
                else "") for f, c in sorted(self.known_counts.items()))
            rank_zero_info("knowledge verification kept %d/%d probes (the parametric answer above the counterfactual "
                           "one and %d distractors closed-book; %s).", len(self.active_indices), len(self.probes),
                           self.known_distractors, summary)
            if not self.active_indices:
                raise ConfigurationError(
                    "known_only=True kept no probes: the model prefers the parametric answer closed-book for none of "
                    "them. Use other probes or known_only=False."
                )
            if self.informative_band is not None:
                self._select_informative(model, scorer)
        elif self.informative_band is not None and self.active_indices is None:
            self._select_informative(model, scorer)

    def _select_informative(self, model: Any, scorer: Any) -> None:
        """Keep the probes whose counterfactual probability on the model as it is (train begin) lies in
        ``informative_band``: the others sit at the ceiling or the floor and can barely move the metric."""
        assert self.informative_band is not None
        indices = self.active_indices if self.active_indices is not None else list(range(len(self.probes)))
        result = scorer.score_raw(model, indices, variants=("context",))
        p_cf = metric_outcomes(result.scores, result.variants, result.mode, "counterfactual_probability",
                               **option_kwargs(result))
        assert p_cf is not None
        low, high = self.informative_band
        counts: dict[str, dict[str, int]] = {}
        for probe in self.probes:
            counts.setdefault(probe.family, {"kept": 0, "total": 0})["total"] += 1
        kept = []
        for row, index in enumerate(result.probe_indices):
            if low <= p_cf[row] <= high:
                kept.append(int(index))
                counts[self.probes[int(index)].family]["kept"] += 1
        self.active_indices, self.known_counts = kept, counts
        summary = ", ".join(f"{f}: {c['kept']}/{c['total']}" for f, c in sorted(counts.items()))
        rank_zero_info("informative_band=%s kept %d/%d probes (%s).", self.informative_band,
                       len(kept), len(self.probes), summary)
        if not kept:
            raise ConfigurationError(
                f"informative_band={self.informative_band} kept no probes: no probe's counterfactual probability lies "
                "in the band on this model. Widen the band or use other probes."
            )

    def resume(self, saved: ResumeState | None, step: int, new_curve: bool) -> None:
        """On resume: monitor the probes selected at the start of the run, not a new selection made on the
        fine-tuned weights. Leaves ``active_indices`` at ``None`` (select again) with a warning when it cannot; on a
        new curve (``new_curve``) the saved selection is of the old probes, so it is made again (silently: the new
        curve's warning says so)."""
        if new_curve:
            self.reset()
            return
        ids = saved.selected_ids if saved else None
        if not self.selects:
            if ids is not None:
                rank_zero_warn(
                    "the resumed run was started with known_only=True (%d probes monitored), but this "
                    "callback has known_only=False: it monitors all %d probes from step %d on, so its values are not "
                    "comparable with the rows logged before.", len(ids), len(self.probes), step,
                )
            return
        self.active_indices = None
        if saved is None:
            reason = (f"the checkpoint's {TRAINER_STATE_FILE} holds no ctx_callback state (the run was started "
                      "without known_only=True, or with an older ctx_callback)")
        elif ids is None:
            reason = "the run was started with known_only=False"
        else:
            index = {probe.id: i for i, probe in enumerate(self.probes)}
            missing = [probe_id for probe_id in ids if probe_id not in index]
            if not missing:
                self.active_indices = [index[probe_id] for probe_id in ids]
                self.known_counts = saved.known_counts
                rank_zero_info("resumed with the known_only probe selection made at the start of the run "
                               "(%d/%d probes).", len(ids), len(self.probes))
                return
            reason = f"{len(missing)} of its probe ids are not among this callback's probes ({missing[:3]})"
        rank_zero_warn(
            "known_only=True on a resumed run, but the probe selection made at the start of the run "
            "cannot be restored: %s. Recomputing it on the current, already fine-tuned weights (step %d): it can "
            "differ from the probes the logged history measured, and then the resumed run's peak and stop decisions "
            "can differ from an uninterrupted run's.", reason, step,
        )
