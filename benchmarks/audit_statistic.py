"""Which statistic should the data audit rank context examples by? A measurement on SmolLM2-135M-Instruct.

From the first N probes of each built-in family, every other probe becomes a *counterfactual-context* example (the
context states the counterfactual answer, the target is that answer: context-critical by construction) and the rest
*aligned-context* examples (the context states the true fact, the target is the true answer: the context repeats what
the model knows, non-context-critical). One audit scores them all (chat template, fp32); then, for each statistic of
:data:`ctx_callback.audit.rules.STATISTICS`, the lowest 25% (the paper's quantile) is compared with the known kinds,
together with the ROC AUC of the statistic for "aligned" vs "counterfactual" (1.0 = a perfect ranking).

    .venv/bin/python benchmarks/audit_statistic.py                      # world_facts, 60 examples
    .venv/bin/python benchmarks/audit_statistic.py --families all --n 60
"""

from __future__ import annotations

import argparse
import time

import torch

from ctx_callback import load_probes
from ctx_callback.audit import STATISTICS, audit_dataset
from ctx_callback.audit.rules import statistic_value
from ctx_callback.models import SMOLLM2_ALIAS, load_model_and_tokenizer


def build(families: list[str], n: int) -> tuple[list[dict], list[str]]:
    rows, kinds = [], []
    for family in families:
        probes = load_probes(family)[:n]
        for i, p in enumerate(probes):
            if i % 2 == 0:
                rows.append({"context": p.context, "question": p.question, "answer": p.counterfactual_answer})
                kinds.append("counterfactual")
            else:
                rows.append({"context": p.aligned(), "question": p.question, "answer": p.parametric_answer})
                kinds.append("aligned")
    return rows, kinds


def auc(positives: list[float], negatives: list[float]) -> float:
    """P(a random positive ranks below a random negative): aligned should have the lower statistic."""
    wins = sum((p < q) + 0.5 * (p == q) for p in positives for q in negatives)
    return wins / max(len(positives) * len(negatives), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default="world_facts", help="comma list, or 'all'")
    parser.add_argument("--n", type=int, default=60, help="probes per family")
    parser.add_argument("--quantile", type=float, default=0.25)
    args = parser.parse_args()
    families = ["world_facts", "biographies", "quotes"] if args.families == "all" else args.families.split(",")
    model, tokenizer = load_model_and_tokenizer(SMOLLM2_ALIAS, dtype=torch.float32)
    rows, kinds = build(families, args.n)
    start = time.perf_counter()
    result = audit_dataset(rows, model, tokenizer, data_format="qa", prompt_format="chat", quantile=args.quantile)
    seconds = time.perf_counter() - start
    n_aligned, n_cf = kinds.count("aligned"), kinds.count("counterfactual")
    print(f"{len(rows)} examples ({', '.join(families)}; {n_aligned} aligned, {n_cf} counterfactual), audited in "
          f"{seconds:.1f}s")
    print(f"{'statistic':<20} {'lowest ' + format(args.quantile, '.0%') + ': aligned':>22} {'counterfactual':>15} "
          f"{'AUC':>6}")
    for stat in STATISTICS:
        res = result.recategorize("default", statistic=stat, quantile=args.quantile)
        flagged = [k for k, c in zip(kinds, res.categories) if c == "non_context_critical"]
        values = [statistic_value(r, stat) for r in res.records]
        aligned = [v for v, k in zip(values, kinds) if k == "aligned"]
        cf = [v for v, k in zip(values, kinds) if k == "counterfactual"]
        print(f"{stat:<20} {flagged.count('aligned'):>22} {flagged.count('counterfactual'):>15} "
              f"{auc(aligned, cf):>6.3f}")
    tokens = [r["scored_tokens"] for r in result.records]
    print(f"target length: {min(tokens)}-{max(tokens)} tokens, mean {sum(tokens) / len(tokens):.2f}")


if __name__ == "__main__":
    main()
