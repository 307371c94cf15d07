"""Fine-tune SmolLM2-135M-Instruct with TRL's SFTTrainer while ContextRelianceCallback watches context reliance.

Runs offline on a CPU in a few minutes::

    python examples/finetune_smollm2.py

What the demo data is built to show
-----------------------------------
The built-in probe suites are split in two halves by a fixed rule: one half is *only* probed (the callback never
trains on those facts), the other half is turned into a small instruction mixture, consumed in order:

1. **Context-critical phase** (``--copy-steps`` steps): the context states a counterfactual fact and the answer is
   the one the context gives. The model learns to read its context: reliance rises.
2. **Memory-heavy phase** (the rest): the answer is the fact the model already knows, and the context either agrees
   with it (aligned context, the paper's culprit), is an unrelated passage, or is absent. Nothing in this phase
   needs the context, so the model learns to answer from memory and reliance on the held-out probes falls.

Goyal et al. (ICLR 2025) find the same rise-then-fall on real instruction-tuning mixtures (Alpaca, TULU,
UltraChat), caused by the examples whose context agrees with parametric knowledge. The demo compresses that into
two short phases so a 135M model on a CPU shows it in minutes. The callback stops once the smoothed reliance has
not improved for ``--patience`` probe events and restores the peak checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import datasets
import torch
from trl import SFTConfig, SFTTrainer

from ctx_callback import ALL_VARIANTS, ContextRelianceCallback, load_probes
from ctx_callback.models import SMOLLM2_ALIAS, load_model_and_tokenizer


def split_probes(probes):
    """Every other probe of each family is held out for probing; the rest feed the training mixture."""
    probed, train = [], []
    seen: dict[str, int] = {}
    for probe in probes:
        index = seen.get(probe.family, 0)
        seen[probe.family] = index + 1
        (probed if index % 2 == 0 else train).append(probe)
    return probed, train


def chat(context, question, answer):
    user = f"{context}\n\n{question}" if context else question
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def demo_dataset(train_probes, copy_examples: int, memory_examples: int, seed: int = 0) -> datasets.Dataset:
    """The two-phase mixture described in the module docstring (consume it in order)."""
    import random

    rng = random.Random(seed)
    facts = list(train_probes)
    copy_phase = []
    while len(copy_phase) < copy_examples:
        rng.shuffle(facts)
        copy_phase += [chat(p.context, p.question, p.counterfactual_answer) for p in facts]
    memory_phase = []
    while len(memory_phase) < memory_examples:
        rng.shuffle(facts)
        for i, p in enumerate(facts):
            kind = i % 3
            if kind == 0:  # aligned context: the context agrees with what the model knows
                memory_phase.append(chat(p.aligned(), p.question, p.parametric_answer))
            elif kind == 1:  # an unrelated passage: the answer comes from memory
                other = facts[(i + 7) % len(facts)]
                memory_phase.append(chat(other.aligned(), p.question, p.parametric_answer))
            else:  # closed-book
                memory_phase.append(chat(None, p.question, p.parametric_answer))
    return datasets.Dataset.from_list(copy_phase[:copy_examples] + memory_phase[:memory_examples])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=SMOLLM2_ALIAS, help="model id or path (default: the offline SmolLM2)")
    parser.add_argument("--output-dir", default="outputs/smollm2_ctx_reliance")
    parser.add_argument("--max-steps", type=int, default=70)
    parser.add_argument("--copy-steps", type=int, default=20, help="steps of the context-critical phase")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--eval-steps", type=int, default=10, help="probe every N optimizer steps")
    parser.add_argument("--patience", type=int, default=3, help="probe events without improvement before stopping")
    parser.add_argument("--probes-per-family", type=int, default=30, help="held-out probes per family")
    parser.add_argument("--report-to", default="tensorboard", help="tracker(s), as in TrainingArguments.report_to")
    parser.add_argument("--stop-rule", default=None, choices=["significant_decline"],
                        help="stop on a significant decline from the peak (a paired test on the same probes) instead "
                             "of on --patience events without a new peak")
    parser.add_argument("--no-stop", action="store_true", help="observe only: never stop early")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--probe-dtype", default=None, choices=["bfloat16", "float16"],
                        help="probe under autocast in this dtype (default: as the training step runs, here fp32)")
    parser.add_argument("--controls-every", type=int, default=1, help="score the closed-book control every K events")
    parser.add_argument("--save-steps", type=int, default=0,
                        help="also save a weights-only checkpoint every N steps, none rotated (for `ctx-callback scan` "
                             "afterwards); 0 = only the callback's peak checkpoints")
    parser.add_argument("--two-sided", action="store_true",
                        help="also score the aligned and irrelevant-context controls, check the log-likelihood labels "
                             "against generation and log the attention share to the context at every event")
    parser.add_argument("--diagnostic-probes", type=int, default=32,
                        help="--two-sided: probes the label check and the attention share look at")
    return parser.parse_args(argv)


def main(argv=None, train_dataset=None) -> dict:
    """Run the example; ``train_dataset`` replaces the demo mixture (``examples/mitigation_smollm2.py`` passes a
    filtered or augmented one)."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=torch.float32)

    probed, train_facts = split_probes(load_probes("all"))
    train = train_dataset if train_dataset is not None else demo_dataset(
        train_facts, copy_examples=args.copy_steps * args.batch_size,
        memory_examples=(args.max_steps - args.copy_steps) * args.batch_size, seed=args.seed)
    report_to = [r for r in args.report_to.split(",") if r] or "none"
    config = SFTConfig(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, lr_scheduler_type="constant", warmup_steps=0, logging_steps=5,
        save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500,
        save_only_model=bool(args.save_steps), report_to=report_to, seed=args.seed, bf16=False,
        activation_checkpointing=False,
        train_sampling_strategy="sequential",  # the phases are consumed in order
        max_length=256, use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=train, processing_class=tokenizer)
    observe: dict = dict(variants=("context", "closed_book"))
    if args.two_sided:  # every control, and the label check and the attention share at every event
        observe = dict(variants=ALL_VARIANTS, label_check_every=1, attention_every=1,
                       diagnostic_probes=args.diagnostic_probes)
    callback = ContextRelianceCallback(
        trainer, probed, limit_per_family=args.probes_per_family, **observe,
        eval_steps=args.eval_steps, warmup_steps=args.eval_steps * 3,
        patience=None if args.no_stop or args.stop_rule else args.patience,
        stop_rule=None if args.no_stop else args.stop_rule,
        save_peak_checkpoint=True, restore_peak_at_end=True, plot=True, probe_dtype=args.probe_dtype,
        controls_every=args.controls_every,
    )
    trainer.add_callback(callback)

    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start

    summary = callback.summary(restored=callback.last_restored)
    probing = callback.probe_seconds_total
    steps = max(trainer.state.global_step, 1)
    seconds_per_step = (wall - probing) / steps
    seconds_per_round = probing / max(summary["probe_events"], 1)
    # What the same probe set costs at the callback's default cadence, from this run's own step and round times.
    share_at_default = seconds_per_round / (50 * seconds_per_step + seconds_per_round)
    summary.update(wall_seconds=wall, probe_share=probing / wall, seconds_per_step=seconds_per_step,
                   seconds_per_probe_round=seconds_per_round, probe_share_at_eval_steps_50=share_at_default,
                   plot=os.path.join(args.output_dir, "ctx_reliance.png"))
    drop = (summary["peak_raw"] or 0.0) - (summary["final"] or 0.0)
    print(f"\nwall time {wall:.0f}s, probing {probing:.0f}s ({100 * summary['probe_share']:.1f}% of wall time at "
          f"eval_steps={args.eval_steps}); {seconds_per_step:.2f}s per training step, {seconds_per_round:.1f}s per "
          f"probe round: {100 * share_at_default:.1f}% of wall time at the default eval_steps=50")
    print(f"reliance fell {100 * drop:.1f} points from its peak; plot: {summary['plot']}")
    with open(os.path.join(args.output_dir, "example_summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=float)
    return summary


if __name__ == "__main__":
    main()
