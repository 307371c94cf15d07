"""Context-reliance metrics from per-probe scores. Pure numpy, no torch.

Keys are namespaced and stable (they end up on dashboards): ``ctx_reliance/<metric>`` over all probes and
``ctx_reliance/<family>/<metric>`` per family. :data:`METRIC_DESCRIPTIONS` documents each one.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

__all__ = ["METRIC_DESCRIPTIONS", "METRIC_PREFIX", "compute_metrics", "metric_key"]

METRIC_PREFIX = "ctx_reliance"

#: One line per metric (also rendered in the README's glossary).
METRIC_DESCRIPTIONS: dict[str, str] = {
    "counterfactual_accuracy": "share of probes where the model follows the context: log-likelihood mode, "
    "log p(counterfactual | context) > log p(parametric | context); generation mode, the output contains the "
    "counterfactual answer",
    "parametric_accuracy": "share of probes where the model answers from memory despite the context "
    "(parametric answer preferred, or contained in the output)",
    "counterfactual_probability": "mean of p_cf / (p_cf + p_par) under the counterfactual context (log-likelihood mode)",
    "logprob_margin": "mean of log p(counterfactual) - log p(parametric) under the counterfactual context, in nats "
    "(log-likelihood mode)",
    "closed_book_accuracy": "share of probes whose parametric answer the model prefers (or generates) with no "
    "context: does it know the fact?",
    "aligned_accuracy": "share of probes answered with the true fact when the context states it (aligned control)",
    "context_lift": "mean of log p(cf | counterfactual context) - log p(cf | no context), in nats: how much the "
    "context moves the model (log-likelihood mode)",
    "both_rate": "share of outputs containing both answers (generation mode)",
    "neither_rate": "share of outputs containing neither answer (generation mode)",
    "memorization_ratio": "parametric hits / (parametric + counterfactual hits) over outputs (generation mode)",
    "num_probes": "number of probes the metrics are computed on",
}


def metric_key(metric: str, family: str | None = None) -> str:
    """``ctx_reliance/<metric>`` or ``ctx_reliance/<family>/<metric>``."""
    return f"{METRIC_PREFIX}/{metric}" if family is None else f"{METRIC_PREFIX}/{family}/{metric}"


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def _better(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1.0 where a > b, 0.0 where not, NaN where either is missing."""
    out = (a > b).astype(np.float64)
    out[np.isnan(a) | np.isnan(b)] = np.nan
    return out


def _loglik_metrics(lp: np.ndarray, variant_index: Mapping[str, int]) -> dict[str, float]:
    ctx = variant_index["context"]
    cf, par = lp[:, ctx, 0], lp[:, ctx, 1]
    margin = cf - par
    with np.errstate(over="ignore"):
        prob = 1.0 / (1.0 + np.exp(-margin))
    out = {
        "counterfactual_accuracy": _nanmean(_better(cf, par)),
        "parametric_accuracy": _nanmean(_better(par, cf)),
        "counterfactual_probability": _nanmean(prob),
        "logprob_margin": _nanmean(margin),
    }
    if "closed_book" in variant_index:
        cb = variant_index["closed_book"]
        out["closed_book_accuracy"] = _nanmean(_better(lp[:, cb, 1], lp[:, cb, 0]))
        out["context_lift"] = _nanmean(cf - lp[:, cb, 0])
    if "aligned" in variant_index:
        al = variant_index["aligned"]
        out["aligned_accuracy"] = _nanmean(_better(lp[:, al, 1], lp[:, al, 0]))
    return out


def _generation_metrics(hits: np.ndarray, variant_index: Mapping[str, int]) -> dict[str, float]:
    ctx = variant_index["context"]
    cf, par = hits[:, ctx, 0], hits[:, ctx, 1]
    valid = ~(np.isnan(cf) | np.isnan(par))
    cf_v, par_v = cf[valid], par[valid]
    total_hits = cf_v.sum() + par_v.sum()
    out = {
        "counterfactual_accuracy": _nanmean(cf),
        "parametric_accuracy": _nanmean(par),
        "both_rate": float(((cf_v == 1) & (par_v == 1)).mean()) if valid.any() else float("nan"),
        "neither_rate": float(((cf_v == 0) & (par_v == 0)).mean()) if valid.any() else float("nan"),
        "memorization_ratio": float(par_v.sum() / total_hits) if total_hits > 0 else float("nan"),
    }
    if "closed_book" in variant_index:
        out["closed_book_accuracy"] = _nanmean(hits[:, variant_index["closed_book"], 1])
    if "aligned" in variant_index:
        out["aligned_accuracy"] = _nanmean(hits[:, variant_index["aligned"], 1])
    return out


def compute_metrics(
    scores: np.ndarray,
    families: Sequence[str],
    variants: Sequence[str],
    *,
    mode: str = "loglik",
    per_family: bool = True,
) -> dict[str, float]:
    """Compute the metric dict from a score table.

    Args:
        scores: ``[num_probes, num_variants, 2]`` array. Log-likelihood mode: summed answer log-probabilities
            (``[..., 0]`` counterfactual, ``[..., 1]`` parametric). Generation mode: 1.0/0.0 hits. NaN = missing.
        families: Family of each probe (row).
        variants: Variant name of each column (must include ``"context"``).
        mode: ``"loglik"`` or ``"generate"``.
        per_family: Also emit ``ctx_reliance/<family>/<metric>`` keys.

    Returns:
        A flat dict of plain Python floats.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 3 or scores.shape[2] != 2 or scores.shape[1] != len(variants):
        raise ValueError(f"scores must have shape [probes, {len(variants)}, 2], got {scores.shape}.")
    if len(families) != scores.shape[0]:
        raise ValueError(f"got {len(families)} families for {scores.shape[0]} probes.")
    variant_index = {name: i for i, name in enumerate(variants)}
    if "context" not in variant_index:
        raise ValueError("the 'context' variant is required.")
    fn = _loglik_metrics if mode == "loglik" else _generation_metrics
    families_arr = np.asarray(list(families), dtype=object)
    groups: list[tuple[str | None, np.ndarray]] = [(None, np.ones(len(families_arr), dtype=bool))]
    if per_family:
        groups += [(family, families_arr == family) for family in sorted(set(families_arr.tolist()))]
    out: dict[str, float] = {}
    for family, mask in groups:
        if not mask.any():
            continue
        for name, value in fn(scores[mask], variant_index).items():
            out[metric_key(name, family)] = float(value)
        out[metric_key("num_probes", family)] = float(mask.sum())
    return out
