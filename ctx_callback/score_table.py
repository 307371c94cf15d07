"""The scores of one group of probes, as the metric definitions read them. Pure numpy.

:class:`ScoreTable` is the view every per-probe metric function of :mod:`ctx_callback.metrics` takes: the
counterfactual answer's score, its strongest rival's, the parametric answer's (read from the option scores for
multiple choice) and whether the parametric answer beats every other answer. :func:`better` and :func:`hit` are the
two NaN-aware comparisons per-probe hit/miss outcomes are made of.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

__all__ = ["ScoreTable", "better", "hit"]


def better(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1.0 where ``a > b``, 0.0 where not, NaN where either is missing."""
    out = (a > b).astype(np.float64)
    out[np.isnan(a) | np.isnan(b)] = np.nan
    return out


def hit(a: np.ndarray) -> np.ndarray:
    """1.0 where ``a == 1`` (a generation-mode hit), 0.0 where not, NaN where ``a`` is missing."""
    out = (a == 1).astype(np.float64)
    out[np.isnan(a)] = np.nan
    return out


@dataclass(frozen=True)
class ScoreTable:
    """The scores of one group of probes, as metric functions read them.

    Two-answer and multiple-choice probes share one layout: ``scores[..., 0]`` is the counterfactual (context-supported)
    answer and ``scores[..., 1]`` its strongest rival (the parametric answer of a two-answer probe, the best other
    option of a multiple-choice one), so ``scores[..., 0] > scores[..., 1]`` means "the counterfactual answer wins"
    for every probe. What needs the parametric answer of a multiple-choice probe reads ``options``.

    Attributes:
        scores: ``[probes, variants, 2]``. Log-likelihood mode: summed answer log-probabilities (``[..., 0]``
            counterfactual, ``[..., 1]`` its strongest rival). Generation mode: 1.0/0.0 hits. NaN = not scored.
        variant_index: Column of each scored variant (``"context"``, ``"closed_book"``, ``"aligned"``).
        mode: ``"loglik"`` or ``"generate"``; metrics that exist in both modes read the scores accordingly.
        options: ``[probes, variants, K]`` score of every answer option (NaN-padded past a probe's own count), or
            ``None`` when every probe has two answers (then ``scores`` says everything).
        option_roles: ``[probes, 2]`` ints with ``options``: the position of the counterfactual and of the parametric
            answer among the options (``-1``: the parametric answer is unknown). A two-answer row is ``(0, 1)``.
    """

    scores: np.ndarray
    variant_index: Mapping[str, int]
    mode: str = "loglik"
    options: np.ndarray | None = None
    option_roles: np.ndarray | None = None

    @property
    def is_generation(self) -> bool:
        """Scores are generation-mode hits (1.0/0.0), not log-probabilities."""
        return self.mode == "generate"

    @property
    def num_probes(self) -> int:
        """Number of probes (rows) in the table."""
        return int(self.scores.shape[0])

    def has(self, variant: str) -> bool:
        """Whether ``variant`` was scored."""
        return variant in self.variant_index

    def counterfactual(self, variant: str = "context") -> np.ndarray:
        """Per-probe score of the counterfactual answer under ``variant``."""
        return self.scores[:, self.variant_index[variant], 0]

    def rival(self, variant: str = "context") -> np.ndarray:
        """Per-probe score of the counterfactual answer's strongest rival under ``variant`` (the parametric answer of
        a two-answer probe; the best other option, or whether any other option was generated, for multiple choice)."""
        return self.scores[:, self.variant_index[variant], 1]

    def parametric(self, variant: str = "context") -> np.ndarray:
        """Per-probe score of the parametric answer under ``variant``; NaN where it is unknown (multiple choice)."""
        if self.options is None or self.option_roles is None:
            return self.rival(variant)
        opts = self.options[:, self.variant_index[variant], :]
        par = self.option_roles[:, 1]
        known = par >= 0
        out = np.full(opts.shape[0], np.nan)
        out[known] = opts[np.flatnonzero(known), par[known]]
        return out

    def parametric_wins(self, variant: str = "context") -> np.ndarray:
        """Log-likelihood mode: 1.0 where the parametric answer scores above every other answer, 0.0 where not, NaN
        where it is unknown or not scored."""
        if self.options is None or self.option_roles is None:
            return better(self.rival(variant), self.counterfactual(variant))
        opts = self.options[:, self.variant_index[variant], :]
        par = self.option_roles[:, 1]
        rows = np.arange(opts.shape[0])
        column = np.where(par >= 0, par, 0)
        mine = np.where(par >= 0, opts[rows, column], np.nan)
        others = np.where(np.isnan(opts), -np.inf, opts)
        others[rows, column] = -np.inf
        out = (mine > others.max(axis=1)).astype(np.float64)
        out[np.isnan(mine)] = np.nan
        return out

    def context_valid(self) -> np.ndarray:
        """Probes whose counterfactual and rival context-variant scores are both present."""
        return ~(np.isnan(self.counterfactual()) | np.isnan(self.rival()))
