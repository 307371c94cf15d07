"""What a probe round returns: :class:`ScoreResult` (raw per-probe scores of a shard, merged across shards) and
:class:`ScoreReport` (the metrics plus one record per probe, as the probe log writes them)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .probes import Probe

__all__ = ["ScoreReport", "ScoreResult"]


@dataclass
class ScoreResult:
    """Raw per-probe scores for a subset (shard) of probes; merge shards with :meth:`merge`.

    Attributes:
        probe_indices: Indices into the scorer's probe list, one per row.
        variants: Column names (``"context"``, ``"closed_book"``, ``"aligned"``).
        scores: ``[rows, variants, 2]`` float64. Log-likelihood mode: summed log-probability of the
            counterfactual (``0``) and parametric (``1``) answer; generation mode: 1.0/0.0 hits. NaN = not scored.
        generations: Generation mode: ``[rows][variants]`` generated texts (``None`` where not scored).
        mode: ``"loglik"`` or ``"generate"``.
        seconds: Wall time spent scoring.
        scored: ``[rows, variants]`` bool: which (probe, variant) cells were scored (a probe without an aligned
            context has no ``"aligned"`` row). ``None`` for results built without it: then every ``"context"`` cell
            counts as scored (every probe has one) and so does every infinite value.
        option_scores: Multiple choice: ``[rows, variants, K]`` float64, the score (log-probability, or 1.0/0.0 hit)
            of every answer option in the probe's order (:attr:`~ctx_callback.probes.Probe.answers`), NaN-padded past
            a probe's own count; a two-answer row holds ``(counterfactual, parametric)``. ``None`` when the scorer's
            probes all have two answers. For a multiple-choice row ``scores[r, c, 0]`` is the counterfactual option
            and ``scores[r, c, 1]`` its strongest rival (the best other option; in generation mode, whether any other
            option was named), so ``scores[r, c, 0] > scores[r, c, 1]`` means "the counterfactual answer wins" for
            every probe.
        option_roles: With ``option_scores``: ``[rows, 2]`` int64, the position of the counterfactual and of the
            parametric option in each row's options (``-1``: parametric answer unknown); ``(0, 1)`` for two answers.
    """

    probe_indices: np.ndarray
    variants: tuple[str, ...]
    scores: np.ndarray
    generations: list[list[str | None]] | None = None
    mode: str = "loglik"
    seconds: float = 0.0
    scored: np.ndarray | None = None
    option_scores: np.ndarray | None = None
    option_roles: np.ndarray | None = None

    @property
    def nonfinite_scores(self) -> int:
        """How many scored values are NaN or infinite (NaN/inf logits, a diverged model): a round with any is not
        trustworthy, however finite its metrics over the rest look."""
        bad = ~np.isfinite(self.scores)
        if self.scored is not None:
            return int(np.count_nonzero(bad & self.scored[..., None]))
        count = int(np.count_nonzero(np.isinf(self.scores)))
        if "context" in self.variants:
            col = self.variants.index("context")
            count += int(np.count_nonzero(np.isnan(self.scores[:, col])))
        return count

    @classmethod
    def merge(cls, results: Sequence[ScoreResult]) -> ScoreResult:
        """Concatenate shards (sorted by probe index; a probe scored twice keeps its first score)."""
        if not results:
            raise ValueError("nothing to merge")
        indices = np.concatenate([r.probe_indices for r in results])
        _, first = np.unique(indices, return_index=True)
        order = first[np.argsort(indices[first], kind="stable")]
        gens = None
        if all(r.generations is not None for r in results):
            flat = [g for r in results for g in r.generations]  # type: ignore[union-attr]
            gens = [flat[i] for i in order]
        scored = None
        if all(r.scored is not None for r in results):
            scored = np.concatenate([r.scored for r in results])[order]  # type: ignore[misc]
        option_scores = option_roles = None
        if any(r.option_scores is not None for r in results):
            width = max(r.option_scores.shape[2] for r in results if r.option_scores is not None)
            padded = []
            for r in results:
                # A shard without options has two answers per row: (counterfactual, parametric) = its scores.
                values = r.option_scores if r.option_scores is not None else r.scores
                extra = np.full(values.shape[:2] + (width - values.shape[2],), np.nan)
                padded.append(np.concatenate([values, extra], axis=2))
            option_scores = np.concatenate(padded)[order]
            option_roles = np.concatenate([
                r.option_roles if r.option_roles is not None else np.tile(np.array([0, 1]), (len(r.probe_indices), 1))
                for r in results
            ]).astype(np.int64)[order]
        return cls(
            probe_indices=indices[order],
            variants=results[0].variants,
            scores=np.concatenate([r.scores for r in results])[order],
            generations=gens,
            mode=results[0].mode,
            seconds=max(r.seconds for r in results),
            scored=scored,
            option_scores=option_scores,
            option_roles=option_roles,
        )


@dataclass
class ScoreReport:
    """What :meth:`ctx_callback.scoring.ProbeScorer.score` returns: metrics plus per-probe records."""

    metrics: dict[str, float]
    result: ScoreResult
    probes: list[Probe] = field(repr=False)

    @property
    def records(self) -> list[dict[str, Any]]:
        """One dict per scored probe: id, family, answers, and the score of each (variant, answer).

        A multiple-choice probe also has ``options`` and ``<variant>_option_<logprobs|hits>`` (one value per option);
        its ``<variant>_parametric_<kind>`` is the parametric option's score (``None`` when it is unknown).
        """
        rows = []
        kind = "logprob" if self.result.mode == "loglik" else "hit"
        for row, index in enumerate(self.result.probe_indices):
            probe = self.probes[int(index)]
            record: dict[str, Any] = {
                "id": probe.id,
                "family": probe.family,
                "counterfactual_answer": probe.counterfactual_answer,
                "parametric_answer": probe.parametric_answer,
            }
            if probe.options:
                record["options"] = list(probe.options)
            for col, variant in enumerate(self.result.variants):
                cf, par = self.result.scores[row, col]
                values = None
                if probe.options and self.result.option_scores is not None:
                    values = self.result.option_scores[row, col, : len(probe.options)]
                    par_index = probe.parametric_index
                    par = values[par_index] if par_index is not None else np.nan
                record[f"{variant}_counterfactual_{kind}"] = None if np.isnan(cf) else float(cf)
                record[f"{variant}_parametric_{kind}"] = None if np.isnan(par) else float(par)
                if values is not None:
                    record[f"{variant}_option_{kind}s"] = [None if np.isnan(v) else float(v) for v in values]
                if self.result.generations is not None:
                    record[f"{variant}_generation"] = self.result.generations[row][col]
            rows.append(record)
        return rows
