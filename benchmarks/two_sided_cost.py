"""What each two-sided control costs per probe event, measured side by side in one run on SmolLM2-135M-Instruct.

The example's probe set (90 probes, 30 per built-in family), the model as loaded (the example's step 0), fp32 unless
``--probe-dtype bfloat16``. Each line is the median of ``--repeats`` timings after one warm-up:

- probe rounds with growing variant sets: ``context``; ``+ closed_book``; ``+ aligned`` (the callback's default);
  ``+ irrelevant`` (every variant). A control's cost is the difference between two lines;
- the label check (greedy generation, ``max_new_tokens``) and the attention share, each on ``--sample`` probes;
- the ``known_only`` selection with 0 and 3 distractors (once per run, at train begin).

Shares are of the default round (context, closed_book, aligned). Run it alone: two torch processes on 2 cores slow
each other down by far more than 2x::

    python benchmarks/two_sided_cost.py --repeats 3 --sample 32
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sample", type=int, default=32)
    parser.add_argument("--probe-dtype", default=None, choices=["bfloat16"])
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO / "examples"))
    from finetune_smollm2 import split_probes  # noqa: PLC0415

    from ctx_callback import ALL_VARIANTS, ProbeScorer, load_probes
    from ctx_callback.attention import ContextSpans, attention_row
    from ctx_callback.distributed import ProbePlan
    from ctx_callback.label_check import label_row, sample_indices
    from ctx_callback.models import SMOLLM2_ALIAS, load_model_and_tokenizer

    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(SMOLLM2_ALIAS, dtype=torch.float32)
    probed, _ = split_probes(load_probes("all"))
    families = sorted({p.family for p in probed})
    probes = [p for family in families for p in [q for q in probed if q.family == family][:30]]
    scorer = ProbeScorer(probes, tokenizer, variants=ALL_VARIANTS, probe_dtype=args.probe_dtype)
    plan = ProbePlan(list(range(len(probes))), 0, 1, False)
    sample = sample_indices(range(len(probes)), args.sample)
    result = scorer.score_raw(model, variants=("context",))
    spans = ContextSpans(scorer.encoded.items, probes, tokenizer, scorer.prompt_format.adds_special_tokens)
    rounds = {"context": ("context",), "+ closed_book": ("context", "closed_book"),
              "+ aligned (default)": ("context", "closed_book", "aligned"), "+ irrelevant (all)": ALL_VARIANTS}
    seconds = {name: _timed(lambda v=variants: scorer.score_raw(model, variants=v), args.repeats)
               for name, variants in rounds.items()}
    seconds[f"label check ({len(sample)} probes)"] = _timed(
        lambda: label_row(scorer, model, plan, sample, result), args.repeats)
    seconds[f"attention share ({len(sample)} probes)"] = _timed(
        lambda: attention_row(model, spans, plan, sample), args.repeats)
    for k in (0, 3):
        seconds[f"known_only, {k} distractors (once)"] = _timed(
            lambda k=k: scorer.known_probe_indices(model, k), args.repeats)
    default = seconds["+ aligned (default)"]
    print(f"{len(probes)} probes, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}, "
          f"probe dtype {args.probe_dtype or 'float32'}, engine {scorer.active_engine}, median of {args.repeats}")
    print("| what | seconds | share of the default round |\n|---|---|---|")
    for name, value in seconds.items():
        print(f"| {name} | {value:.2f} | {value / default:.2f} |")
    print(f"| irrelevant control alone | {seconds['+ irrelevant (all)'] - default:.2f} | "
          f"{(seconds['+ irrelevant (all)'] - default) / default:.2f} |")


if __name__ == "__main__":
    main()
