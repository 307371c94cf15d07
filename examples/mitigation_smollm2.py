"""Audit the example's training mixture, apply a mitigation, train, and compare the reliance curves.

Uses the training setup of ``examples/finetune_smollm2.py`` (same model, probes, mixture, SFT settings and callback,
imported from it) with the callback observing only (``--no-stop``), and one of three mixtures::

    python examples/mitigation_smollm2.py --mitigation none      # the example's mixture
    python examples/mitigation_smollm2.py --mitigation filter    # without the audit's non-context-critical examples
    python examples/mitigation_smollm2.py --mitigation augment   # plus 10% counterfactual copies of its examples
    python examples/mitigation_smollm2.py --mitigation all       # all three, one PNG with the three curves
    python examples/mitigation_smollm2.py --mitigation plot      # the table + PNG from three runs made separately

- ``none``: the example's two-phase mixture (``--copy-steps`` context-critical steps, then memory-heavy ones).
- ``filter``: the same recipe drawn with more memory-phase examples, audited with
  :func:`ctx_callback.audit.audit_dataset` (default rule), the non-context-critical examples removed
  (:func:`~ctx_callback.audit.filter_dataset`), then cut to the same number of rows as ``none``: same steps, same
  batch size, a different composition.
- ``augment``: the ``none`` mixture plus ``--augment`` x rows counterfactual copies
  (:func:`~ctx_callback.audit.augment_dataset`, spread through the data), trained for one pass (more steps).

The audit of the ``filter`` pool is compared with the known kind of every example (counterfactual context, aligned
context, unrelated context, no context): the confusion table is printed and saved in ``--output-dir``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from collections import Counter

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import finetune_smollm2 as base  # noqa: E402 - the example next to this file

from ctx_callback import load_probes  # noqa: E402
from ctx_callback.audit import CATEGORIES, audit_dataset, augment_dataset, filter_dataset  # noqa: E402
from ctx_callback.models import load_model_and_tokenizer  # noqa: E402

MITIGATIONS = ("none", "filter", "augment")
KINDS = ("counterfactual", "aligned", "unrelated", "no_context")
CF = "ctx_reliance/counterfactual_accuracy"


def known_kinds(dataset, train_facts) -> list[str]:
    """The kind of every example of the demo mixture, from how :func:`finetune_smollm2.demo_dataset` builds it."""
    by_question = {p.question: p for p in train_facts}
    kinds = []
    for messages in dataset["messages"]:
        user, answer = messages[0]["content"], messages[1]["content"]
        context, sep, question = user.rpartition("\n\n")
        probe = by_question[question if sep else user]
        if not sep:
            kinds.append("no_context")
        elif context == probe.context and answer == probe.counterfactual_answer:
            kinds.append("counterfactual")
        elif context == probe.aligned() and answer == probe.parametric_answer:
            kinds.append("aligned")
        else:
            kinds.append("unrelated")
    return kinds


def confusion(kinds, categories) -> dict[str, dict[str, int]]:
    table = {kind: dict.fromkeys(CATEGORIES[:3], 0) for kind in KINDS}
    for kind, category in zip(kinds, categories):
        table[kind][category] = table[kind].get(category, 0) + 1
    return table


def print_confusion(table) -> None:
    cats = CATEGORIES[:3]
    print(f"{'known kind':<16}" + "".join(f"{c:>22}" for c in cats))
    for kind, row in table.items():
        print(f"{kind:<16}" + "".join(f"{row.get(c, 0):>22}" for c in cats))


def build_mixture(args, mitigation: str, out_dir: str):
    """``(train_dataset, max_steps, info)`` for one mitigation."""
    _, train_facts = base.split_probes(load_probes("all"))
    rows = args.max_steps * args.batch_size
    copy_rows = args.copy_steps * args.batch_size
    plain = base.demo_dataset(train_facts, copy_examples=copy_rows, memory_examples=rows - copy_rows, seed=args.seed)
    info: dict = {"mitigation": mitigation}
    if mitigation == "none":
        return plain, args.max_steps, info
    if mitigation == "augment":
        augmented = augment_dataset(plain, fraction=args.augment, seed=args.seed)
        added = len(augmented) - len(plain)
        info.update(rows_added=added, fraction=args.augment)
        return augmented, math.ceil(len(augmented) / args.batch_size), info
    # filter: a larger pool of the same recipe, audited, filtered, cut back to the same number of rows
    pool = base.demo_dataset(train_facts, copy_examples=copy_rows,
                             memory_examples=int((rows - copy_rows) * args.pool_factor), seed=args.seed)
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=torch.float32)
    start = time.perf_counter()
    result = audit_dataset(pool, model, tokenizer, probe_dtype=args.audit_probe_dtype, progress=True)
    seconds = time.perf_counter() - start
    del model
    gc.collect()
    print(result.table())
    kinds = known_kinds(pool, train_facts)
    table = confusion(kinds, result.categories)
    print(f"audit of the filter pool ({len(pool)} rows) against the known kinds, {seconds:.0f}s:")
    print_confusion(table)
    result.to_jsonl(os.path.join(out_dir, "audit.jsonl"))
    result.plot_histogram(os.path.join(out_dir, "audit_hist.png"))
    filtered = filter_dataset(pool, result)
    kept = filtered.select(range(min(rows, len(filtered))))
    info.update(pool_rows=len(pool), audit_seconds=seconds, confusion=table, summary=result.summary,
                kept_kinds=dict(Counter(known_kinds(kept, train_facts))))
    return kept, math.ceil(len(kept) / args.batch_size), info


def curve(output_dir: str) -> list[tuple[int, float]]:
    with open(os.path.join(output_dir, "ctx_reliance_summary.json")) as f:
        history = json.load(f)["history"]
    return [(row["step"], row[CF]) for row in history if CF in row]


def run_one(args, mitigation: str) -> dict:
    out_dir = os.path.join(args.output_dir, mitigation)
    os.makedirs(out_dir, exist_ok=True)
    train, steps, info = build_mixture(args, mitigation, out_dir)
    print(f"[{mitigation}] training on {len(train)} rows for {steps} steps")
    argv = ["--output-dir", out_dir, "--max-steps", str(steps), "--copy-steps", str(args.copy_steps),
            "--batch-size", str(args.batch_size), "--eval-steps", str(args.eval_steps), "--no-stop",
            "--report-to", args.report_to, "--seed", str(args.seed), "--controls-every", str(args.controls_every),
            "--probes-per-family", str(args.probes_per_family)]
    if args.probe_dtype:
        argv += ["--probe-dtype", args.probe_dtype]
    start = time.perf_counter()
    base.main(argv, train_dataset=train)
    points = curve(out_dir)
    values = [v for _, v in points]
    peak = max(values)
    peak_step = points[values.index(peak)][0]
    info.update(steps=steps, rows=len(train), points=points, baseline=values[0], peak=peak, peak_step=peak_step,
                final=values[-1], final_step=points[-1][0], fall=peak - values[-1],
                wall_seconds=time.perf_counter() - start)
    with open(os.path.join(out_dir, "mitigation_result.json"), "w") as f:
        json.dump(info, f, indent=2, default=str)
    print(f"[{mitigation}] baseline {values[0]:.3f}, peak {peak:.3f} at step {peak_step}, final {values[-1]:.3f} "
          f"at step {points[-1][0]}, fall from peak {100 * (peak - values[-1]):.1f} points")
    return info


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=100)
    for info in results:
        steps, values = zip(*info["points"])
        ax.plot(steps, values, marker="o", markersize=3,
                label=f"{info['mitigation']}: peak {info['peak']:.3f}, final {info['final']:.3f}")
    ax.set_xlabel("global step")
    ax.set_ylabel("counterfactual accuracy (held-out probes)")
    ax.set_title("SmolLM2-135M-Instruct, demo mixture: no mitigation vs filter vs augment", fontsize=9)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--mitigation", choices=[*MITIGATIONS, "all", "plot"], default="all",
                        help="one run, all three (and the PNG), or 'plot': the PNG from three saved runs")
    parser.add_argument("--model", default=base.SMOLLM2_ALIAS)
    parser.add_argument("--output-dir", default="outputs/smollm2_mitigation")
    parser.add_argument("--max-steps", type=int, default=70, help="steps of the 'none' and 'filter' runs")
    parser.add_argument("--copy-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-steps", type=int, default=10)
    parser.add_argument("--augment", type=float, default=0.1, help="counterfactual rows added, share of the rows")
    parser.add_argument("--pool-factor", type=float, default=1.6,
                        help="filter: memory-phase rows drawn, relative to 'none', before filtering")
    parser.add_argument("--audit-probe-dtype", default=None, choices=["bfloat16"])
    parser.add_argument("--probe-dtype", default=None, choices=["bfloat16"], help="the callback's probe_dtype")
    parser.add_argument("--controls-every", type=int, default=1, help="the callback's controls_every")
    parser.add_argument("--probes-per-family", type=int, default=30, help="held-out probes per family")
    parser.add_argument("--report-to", default="none")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default="docs/mitigation_curves.png", help="'all': the PNG of the three curves")
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.mitigation == "plot":  # the table and the PNG from the three runs' saved results
        results = []
        for mitigation in MITIGATIONS:
            with open(os.path.join(args.output_dir, mitigation, "mitigation_result.json")) as f:
                results.append(json.load(f))
    else:
        chosen = MITIGATIONS if args.mitigation == "all" else (args.mitigation,)
        results = [run_one(args, mitigation) for mitigation in chosen]
    print(f"\n{'mitigation':<11} {'rows':>5} {'steps':>6} {'baseline':>9} {'peak':>7} {'peak step':>10} "
          f"{'final':>7} {'fall':>7}")
    for info in results:
        print(f"{info['mitigation']:<11} {info['rows']:>5} {info['steps']:>6} {info['baseline']:>9.3f} "
              f"{info['peak']:>7.3f} {info['peak_step']:>10} {info['final']:>7.3f} {info['fall']:>7.3f}")
    if len(results) > 1 and args.plot:
        os.makedirs(os.path.dirname(args.plot) or ".", exist_ok=True)
        plot(results, args.plot)
        print(f"plot: {args.plot}")
    with open(os.path.join(args.output_dir, "mitigation_results.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    return results


if __name__ == "__main__":
    main()
