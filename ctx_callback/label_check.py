"""Labels checked against generation: does the log-likelihood preference say what the model would answer?

Every log-likelihood metric reads a *label* per probe: the answer with the higher log-likelihood under the
counterfactual context. A replication of Goyal et al. (GIRIAYUSH/context-parametric-inversion-research, Llama-2-7B
LoRA) found that these labels disagree with the model's generated text often enough to matter. This check measures it
during training, at a slower cadence and on a sample of probes: it greedy-decodes the answer to the counterfactual
prompt (the training format, :class:`~ctx_callback.engines.GenerationEngine`) and compares.

Per probe of the sample:

- the **log-likelihood label** is the answer with the highest score in the round just scored (the counterfactual or
  the parametric answer; for multiple choice, any option);
- the **generated label** is the one answer the output names (:func:`~ctx_callback.matching.answer_hits`); an output
  that names none of the answers, or several, has none (*undecided*).

Logged (:data:`KEYS`): ``label_check/agreement`` (share of sampled probes whose generated label equals their
log-likelihood label; undecided ones disagree) with its Wilson 95% interval, ``label_check/undecided_rate``,
``label_check/probes`` (the sample size) and ``label_check/seconds`` (the cost of the check). A falling agreement means
the log-likelihood metrics drift away from what the model says. Its per-probe companion over *all* probes at every
event is the metric ``ambiguous_rate`` (the two answers' log-likelihoods within 1 nat).

The sample is spread evenly over the monitored probes (:func:`sample_indices`), the same at every event, so the
agreement is paired across events. Under DDP each rank generates its share of the sample and the counts are summed;
with sharded parameters (FSDP / ZeRO-3) every rank generates all of it in lock step.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from .distributed import ProbePlan, run_round
from .matching import answer_hits
from .metric_spec import METRIC_PREFIX
from .score_results import ScoreResult
from .stats import wilson_interval

__all__ = ["KEYS", "label_counts", "label_row", "sample_indices"]

_PREFIX = f"{METRIC_PREFIX}/label_check"
#: The keys a label check logs.
KEYS = {name: f"{_PREFIX}/{name}" for name in
        ("agreement", "agreement_ci_low", "agreement_ci_high", "undecided_rate", "probes", "seconds")}


def sample_indices(indices: Sequence[int], size: int) -> list[int]:
    """``size`` probe indices spread evenly over ``indices`` (all of them when there are no more)."""
    indices = sorted(int(i) for i in indices)
    if len(indices) <= size:
        return indices
    picks = np.linspace(0, len(indices) - 1, size).round().astype(int)
    return [indices[i] for i in sorted(set(picks.tolist()))]


def _loglik_choice(result: ScoreResult, row: int, probe: Any) -> int:
    """The position (in ``probe.answers``) of the answer with the highest context score."""
    column = result.variants.index("context")
    if result.option_scores is not None and probe.options:
        return int(np.nanargmax(result.option_scores[row, column, :len(probe.answers)]))
    cf, rival = result.scores[row, column, 0], result.scores[row, column, 1]
    return probe.counterfactual_index if cf > rival else 1 - probe.counterfactual_index


def label_counts(texts: dict[int, str], result: ScoreResult, probes: Sequence[Any]) -> tuple[int, int, int]:
    """``(agree, undecided, n)`` over the generated ``texts`` (probe index -> output) against ``result``'s scores."""
    row_of = {int(p): r for r, p in enumerate(result.probe_indices)}
    agree = undecided = 0
    for index, text in texts.items():
        probe = probes[index]
        hits = answer_hits(probe, text)
        if sum(hits) != 1:
            undecided += 1
            continue
        agree += int(hits.index(True) == _loglik_choice(result, row_of[index], probe))
    return agree, undecided, len(texts)


def label_row(scorer: Any, model: Any, plan: ProbePlan, sample: Sequence[int],
              result: ScoreResult) -> dict[str, float]:
    """Generate the sample's answers (this rank's share), compare with ``result`` and sum the ranks' counts."""
    start = time.perf_counter()
    wanted = set(sample)

    def count(mine: list[int]) -> tuple[int, int, int]:
        texts = scorer.generate(model, [i for i in mine if i in wanted])
        return label_counts(texts, result, scorer.probes)

    agree, undecided, n = run_round(count, lambda parts: tuple(map(sum, zip(*parts))), plan)
    if n == 0:
        return {}
    low, high = wilson_interval(agree, n, 0.95)
    return {KEYS["agreement"]: agree / n, KEYS["agreement_ci_low"]: float(low), KEYS["agreement_ci_high"]: float(high),
            KEYS["undecided_rate"]: undecided / n, KEYS["probes"]: float(n),
            KEYS["seconds"]: time.perf_counter() - start}
