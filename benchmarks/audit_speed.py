"""Throughput of the data audit on SmolLM2-135M-Instruct: ``audit_dataset`` (fp32 and bf16) vs a naive loop.

The data: QA examples built from the built-in probe suites (every other one with its counterfactual context and
answer, the rest with the aligned context and the true answer; a quarter without context), chat template. Each
configuration scores the same examples with and without their context:

- ``naive fp32``: one unbatched forward pass per (example, with/without context), the prompt and target tokens the
  audit uses, no batching, no cache (what a hand-written audit loop does);
- ``audit fp32``: :func:`ctx_callback.audit.audit_dataset` (the probe engines: shared-prefix KV cache, length-sorted
  batches, vocabulary projection only at target positions), tokenization included;
- ``audit bf16``: the same with ``probe_dtype="bfloat16"`` (autocast; fp32 weights untouched).

All in one process, one after the other, interleaved; best of ``--repeats`` (the naive loop: of ``--naive-repeats``);
examples/s = examples / seconds::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/audit_speed.py --examples 96
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from ctx_callback import load_probes
from ctx_callback.audit import audit_dataset, prepare_examples
from ctx_callback.audit.scoring import encode_example
from ctx_callback.formatting import resolve_prompt_format
from ctx_callback.models import SMOLLM2_ALIAS, load_model_and_tokenizer


def build(n: int) -> list[dict]:
    probes = load_probes("all")
    step = max(1, len(probes) // n)
    rows = []
    for i, p in enumerate(probes[::step][:n]):
        if i % 4 == 3:
            rows.append({"context": "", "question": p.question, "answer": p.parametric_answer})
        elif i % 2 == 0:
            rows.append({"context": p.context, "question": p.question, "answer": p.counterfactual_answer})
        else:
            rows.append({"context": p.aligned() or p.context, "question": p.question, "answer": p.parametric_answer})
    return rows


def naive(model, tokenizer, rows) -> float:
    """One forward pass per (example, variant); returns the seconds (tokenization included, like the audit)."""
    start = time.perf_counter()
    fmt = resolve_prompt_format("chat", tokenizer)
    examples, _, _, _ = prepare_examples(rows, data_format="qa")
    model.eval()
    with torch.no_grad():
        for example in examples:
            enc = encode_example(example, tokenizer, fmt, 64)
            for variant, prompt in enc.prompts.items():
                target = list(enc.targets[variant])
                ids = torch.tensor([list(prompt) + target])
                logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0].float(), -1)
                p = len(prompt)
                float(logp[torch.arange(p - 1, p - 1 + len(target)), torch.tensor(target)].sum())
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each audit configuration (best counts)")
    parser.add_argument("--naive-repeats", type=int, default=1, help="runs of the (slow) naive loop")
    args = parser.parse_args()
    model, tokenizer = load_model_and_tokenizer(SMOLLM2_ALIAS, dtype=torch.float32)
    rows = build(args.examples)
    n = len(rows)
    with_context = sum(1 for r in rows if r["context"])
    audit_dataset(rows[:4], model, tokenizer, data_format="qa")  # warm-up
    timings: dict[str, float] = {}
    for repeat in range(args.repeats):
        for name, fn in (
            ("naive fp32", lambda: naive(model, tokenizer, rows)),
            ("audit fp32", lambda: audit_dataset(rows, model, tokenizer, data_format="qa")),
            ("audit bf16", lambda: audit_dataset(rows, model, tokenizer, data_format="qa", probe_dtype="bfloat16")),
        ):
            if name.startswith("naive") and repeat >= args.naive_repeats:
                continue
            start = time.perf_counter()
            fn()
            seconds = time.perf_counter() - start
            timings[name] = min(seconds, timings.get(name, float("inf")))
    print(f"SmolLM2-135M-Instruct, {n} examples ({with_context} with context: {n + with_context} scored rows), chat "
          f"template, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, audits best of {args.repeats}, naive best of "
          f"{args.naive_repeats}")
    print(f"{'configuration':<12} {'seconds':>8} {'examples/s':>11} {'vs naive':>9}")
    for name, seconds in timings.items():
        print(f"{name:<12} {seconds:>8.2f} {n / seconds:>11.1f} {timings['naive fp32'] / seconds:>8.2f}x")


if __name__ == "__main__":
    main()
