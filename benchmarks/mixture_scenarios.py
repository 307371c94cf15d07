"""Mixture scenarios beyond the two-phase demo: interleaved mixtures, a recovery, a flat run.

Each scenario is a training mixture built from the training half of the built-in suites, as
``examples/finetune_smollm2.py`` builds its demo (same facts, same row makers), consumed in order
(``train_sampling_strategy="sequential"``), so row ``i`` is trained on at step ``i // batch_size + 1``:

- ``interleaved_q010``, ``interleaved_q025``, ``interleaved_q050``: every row is context-critical (the context
  states a counterfactual fact, the answer is the context's) with probability q, otherwise memory-heavy (the answer
  is the known fact; the context agrees with it, is an unrelated passage, or is absent, in turn), shuffled through
  the whole run; 60 steps;
- ``recovery``: 20 steps context-critical, 30 steps memory-heavy, 30 steps context-critical again; 80 steps;
- ``flat``: context-critical rows only (q = 1): nothing in the data pushes towards memory; 60 steps.

``run NAME`` trains the scenario observe-only with the example (SmolLM2-135M-Instruct, fp32, lr 5e-5 constant,
batch 8, the callback's 90 probes every 10 steps, a weights-only checkpoint every 10 steps), then scores every
checkpoint as ``benchmarks/monitor_choice.py`` does: the monitor probes' per-probe margins (log-likelihood) and the
held-out generation reference (``ctx-callback scan --mode generate``, probes the monitor never sees), and removes the
checkpoints' weights (the scores are kept; ``--keep-weights`` keeps them). It also writes ``rows.jsonl``: each
training row's kind, which ``analyze`` turns into the share of non-context-critical rows consumed between events::

    python benchmarks/mixture_scenarios.py run interleaved_q025 --root outputs/scenarios
    python benchmarks/mixture_scenarios.py audit interleaved_q025 --root outputs/scenarios
    python benchmarks/mixture_scenarios.py analyze --root outputs/scenarios --json scenarios.json

``audit NAME`` audits the scenario's training rows with the untrained model (``ctx_callback.audit``, the default
rule), as a user would before training, into ``audit.jsonl``: the file ``ContextRelianceCallback(audit=...)`` reads.
``analyze`` then also reports, per event, the share of the rows consumed since the previous event that the audit calls
non-context-critical (what the callback logs as ``ctx_reliance/consumed/non_context_critical_share``).

``analyze`` replays the library's stop rules on every scenario's per-probe outcomes of the callback's 90 probes
(the observe-only run trains exactly as a run with a rule would until that rule stops it) and reports, per scenario
and rule, the stop step, the reference points lost against the reference's best checkpoint by the checkpoint the
rule keeps, whether a recovery was lost, and which event each keeping policy picks.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import monitor_choice  # noqa: E402

#: name -> (phases as (steps, q)), q = probability that a row is context-critical.
SCENARIOS: dict[str, tuple[tuple[int, float], ...]] = {
    "interleaved_q010": ((60, 0.10),),
    "interleaved_q025": ((60, 0.25),),
    "interleaved_q050": ((60, 0.50),),
    "recovery": ((20, 1.0), (30, 0.0), (30, 1.0)),
    "flat": ((60, 1.0),),
}
BATCH_SIZE = 8
EVAL_STEPS = 10


def build_rows(train_facts: list, phases: tuple[tuple[int, float], ...], batch_size: int = BATCH_SIZE,
               seed: int = 0) -> list[dict]:
    """The scenario's rows in training order: ``{"messages": ..., "kind": ...}``; kind is ``"context_critical"`` or
    one of the memory-heavy kinds ``"aligned"``, ``"unrelated"``, ``"closed_book"``."""
    example = monitor_choice._example_module()
    rng = random.Random(seed)
    facts = list(train_facts)
    memory_kinds = ("aligned", "unrelated", "closed_book")
    rows: list[dict] = []
    memory_count = 0
    for steps, q in phases:
        for _ in range(steps * batch_size):
            p = facts[rng.randrange(len(facts))]
            if rng.random() < q:
                row = example.chat(p.context, p.question, p.counterfactual_answer)
                rows.append({**row, "kind": "context_critical"})
                continue
            kind = memory_kinds[memory_count % 3]
            memory_count += 1
            if kind == "aligned":
                context = p.aligned()
            elif kind == "unrelated":
                context = facts[(facts.index(p) + 7) % len(facts)].aligned()
            else:
                context = None
            rows.append({**example.chat(context, p.question, p.parametric_answer), "kind": kind})
    return rows


def run(name: str, root: Path, keep_weights: bool = False) -> Path:
    """Train scenario ``name`` observe-only, score its checkpoints, drop their weights (module docstring)."""
    import datasets  # noqa: PLC0415

    from ctx_callback import load_probes  # noqa: PLC0415
    from ctx_callback.models import smollm2_path  # noqa: PLC0415

    example = monitor_choice._example_module()
    run_dir = root / name
    run_dir.mkdir(parents=True, exist_ok=True)
    phases = SCENARIOS[name]
    steps = sum(s for s, _ in phases)
    _probed, train_facts = example.split_probes(load_probes("all"))
    rows = build_rows(train_facts, phases)
    with (run_dir / "rows.jsonl").open("w", encoding="utf-8") as f:
        for index, row in enumerate(rows):
            f.write(json.dumps({"index": index, "kind": row["kind"]}) + "\n")
    if not (run_dir / "ctx_reliance_summary.json").exists():
        dataset = datasets.Dataset.from_list([{"messages": row["messages"]} for row in rows])
        example.main(["--no-stop", "--save-steps", str(EVAL_STEPS), "--max-steps", str(steps), "--seed", "0",
                      "--report-to", "", "--output-dir", str(run_dir)], train_dataset=dataset)
    monitor_choice.prepare(run_dir, str(smollm2_path()))
    monitor_choice.score_monitor(run_dir)
    subprocess.run([sys.executable, "-m", "ctx_callback.cli", "scan", str(run_dir), "--probes",
                    str(run_dir / "reference_probes.jsonl"), "--variants", "context", "--mode", "generate",
                    "--output-dir", str(run_dir / "reference_scan")], check=True)
    if not keep_weights:
        for checkpoint in run_dir.glob("checkpoint-*"):
            if checkpoint.is_symlink():
                continue
            for weights in checkpoint.glob("*.safetensors"):
                weights.unlink()
            for extra in ("optimizer.pt", "scheduler.pt"):
                (checkpoint / extra).unlink(missing_ok=True)
    return run_dir


# ----------------------------------------------------------------------------------------------------------------
# Analysis
# ----------------------------------------------------------------------------------------------------------------

WARMUP = 30  #: the example's warm-up (3 events of 10 steps)
#: label -> StopDecider.from_options options (all at the example's warm-up; the monitor: counterfactual_probability)
RULES: dict[str, dict] = {
    "patience=3": {"patience": 3},
    "significant_decline, sustained_events=1": {"stop_rule": "significant_decline", "sustained_events": 1},
    "significant_decline, sustained_events=1, warmup 0": {"stop_rule": "significant_decline", "sustained_events": 1,
                                                          "warmup": 0},
    "significant_decline, sustained_events=2 (default)": {"stop_rule": "significant_decline", "sustained_events": 2},
    "significant_decline, sustained_events=3": {"stop_rule": "significant_decline", "sustained_events": 3},
    "divergence_threshold=0.05": {"divergence_threshold": 0.05},
    "stopping_threshold=0.85": {"stopping_threshold": 0.85},
    "keep_best (never stop)": {},
}


def _events(run_dir: Path) -> tuple[list[int], dict[int, np.ndarray]]:
    data = json.loads((run_dir / "monitor_margins.json").read_text())
    builtin = np.array([p["family"] in monitor_choice.BUILTIN_FAMILIES for p in data["probes"]])
    steps = sorted(int(s) for s in data["steps"])
    probs = {s: 1 / (1 + np.exp(-np.asarray(data["steps"][str(s)], dtype=np.float64)[builtin])) for s in steps}
    return steps, probs


def replay_rule(steps: list[int], probs: dict[int, np.ndarray], options: dict,
                smoothing: str = "ema") -> tuple[int | None, int, str]:
    """(stop step or None, the peak step the callback would keep at the stop or the end, the stop message)."""
    from ctx_callback.decisions import ProbeEvent  # noqa: PLC0415
    from ctx_callback.stopping import StopDecider  # noqa: PLC0415

    options = {"warmup": WARMUP, **options}
    decider = StopDecider.from_options(smoothing=smoothing, metric="ctx_reliance/counterfactual_probability",
                                       **options)
    for step in steps:
        decision = decider.update(ProbeEvent(step, float(probs[step].mean()), probs[step]))
        if decision.stop:
            return step, int(decision.peak.peak_step), decision.reason or ""
    return None, int(decider.peak_step), "no stop"


def audit(name: str, root: Path) -> Path:
    """Audit the scenario's training rows with the untrained model (``ctx_callback.audit``, the default rule), as a
    user would before training: ``audit.jsonl``, the file ``ContextRelianceCallback(audit=...)`` reads."""
    import torch  # noqa: PLC0415

    from ctx_callback import load_probes  # noqa: PLC0415
    from ctx_callback.audit import audit_dataset  # noqa: PLC0415
    from ctx_callback.models import load_model_and_tokenizer, smollm2_path  # noqa: PLC0415

    example = monitor_choice._example_module()
    _probed, train_facts = example.split_probes(load_probes("all"))
    rows = build_rows(train_facts, SCENARIOS[name])
    model, tokenizer = load_model_and_tokenizer(str(smollm2_path()), dtype=torch.float32)
    result = audit_dataset([{"messages": row["messages"]} for row in rows], model, tokenizer)
    target = root / name / "audit.jsonl"
    result.to_jsonl(target)
    print(result.table())
    return target


def consumed_audit_share(run_dir: Path, steps: list[int]) -> dict[int, float]:
    """As :func:`consumed_memory_share`, by the audit's category: the share of consumed rows that are
    ``non_context_critical`` (what ``ContextRelianceCallback(audit=...)`` logs as
    ``ctx_reliance/consumed/non_context_critical_share``; sequential sampling)."""
    from ctx_callback.consumed import read_audit_categories  # noqa: PLC0415

    path = run_dir / "audit.jsonl"
    if not path.exists():
        return {}
    return _share_per_event(read_audit_categories(path), steps, "non_context_critical".__eq__)


def consumed_memory_share(run_dir: Path, steps: list[int]) -> dict[int, float]:
    """Per event after the first: the share of rows consumed since the previous event that are not context-critical
    (sequential sampling: row i is trained on at step i // BATCH_SIZE + 1)."""
    kinds = [json.loads(line)["kind"] for line in (run_dir / "rows.jsonl").read_text().splitlines()]
    return _share_per_event(kinds, steps, "context_critical".__ne__)


def _share_per_event(labels: list[str], steps: list[int], counted) -> dict[int, float]:
    """Per event after the first: the share of the rows trained on since the previous event whose label is
    ``counted`` (sequential sampling, :data:`BATCH_SIZE` rows a step)."""
    out = {}
    for previous, step in zip(steps, steps[1:]):
        window = labels[previous * BATCH_SIZE:step * BATCH_SIZE]
        out[step] = sum(1 for label in window if counted(label)) / len(window)
    return out


def analyze(root: Path) -> dict:
    out: dict = {"scenarios": {}}
    for name in SCENARIOS:
        run_dir = root / name
        scan = run_dir / "reference_scan" / "ctx_reliance_scan.json"
        if not scan.exists() or not (run_dir / "monitor_margins.json").exists():
            print(f"{name}: not scored yet, skipped")
            continue
        steps, probs = _events(run_dir)
        ref_rows = monitor_choice._scan_rows(scan)
        families = monitor_choice.BUILTIN_FAMILIES + monitor_choice.HARD_FAMILIES
        reference = {s: monitor_choice._union(ref_rows[s], families, "counterfactual_accuracy") for s in steps}
        best_step = max(steps, key=lambda s: (reference[s], -s))
        monitor = {s: float(probs[s].mean()) for s in steps}
        rules = {}
        for label, options in RULES.items():
            stop, kept, message = replay_rule(steps, probs, options)
            later_best = stop is not None and max(reference[s] for s in steps if s > stop) > reference[kept] \
                if stop is not None and stop < steps[-1] else False
            rules[label] = {"stop": stop, "kept": kept, "lost": 100 * (reference[best_step] - reference[kept]),
                            "better_after_stop": bool(later_best), "message": message}
        raw_stop, raw_kept, _ = replay_rule(steps, probs, {}, smoothing="none")
        keep = {"smoothed peak (EMA 0.5)": rules["keep_best (never stop)"]["kept"], "raw best event": raw_kept}
        out["scenarios"][name] = {
            "steps": steps, "monitor": monitor, "reference": reference, "reference_best_step": best_step,
            "memory_share": consumed_memory_share(run_dir, steps),
            "audit_share": consumed_audit_share(run_dir, steps), "rules": rules,
            "keep": {k: {"step": v, "lost": 100 * (reference[best_step] - reference[v])} for k, v in keep.items()},
        }
    print_tables(out)
    return out


def print_tables(out: dict) -> None:
    for name, sc in out["scenarios"].items():
        print(f"\n{name}: reference best at step {sc['reference_best_step']}")
        print("| step | " + " | ".join(str(s) for s in sc["steps"]) + " |")
        print("|---|" + "---|" * len(sc["steps"]))
        print("| `counterfactual_probability` (90 monitor probes) | "
              + " | ".join(f"{sc['monitor'][s]:.3f}" for s in sc["steps"]) + " |")
        print("| reference: generation cf accuracy (183 held-out probes) | "
              + " | ".join(f"{sc['reference'][s]:.3f}" for s in sc["steps"]) + " |")
        print("| share of memory-heavy rows consumed since the previous event | "
              + " | ".join("" if s not in sc["memory_share"] else f"{sc['memory_share'][s]:.2f}"
                           for s in sc["steps"]) + " |")
        if sc["audit_share"]:
            print("| audit: `consumed/non_context_critical_share` | "
                  + " | ".join("" if s not in sc["audit_share"] else f"{sc['audit_share'][s]:.2f}"
                               for s in sc["steps"]) + " |")
    names = list(out["scenarios"])
    print("\n| rule | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for label in RULES:
        cells = []
        for name in names:
            r = out["scenarios"][name]["rules"][label]
            stop = "no stop" if r["stop"] is None else f"stop {r['stop']}"
            flag = ", better checkpoint after the stop" if r["better_after_stop"] else ""
            cells.append(f"{stop}, keeps {r['kept']}: {r['lost']:.1f} lost{flag}")
        print(f"| {label} | " + " | ".join(cells) + " |")
    print("\n| event kept (never stop) | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for label in ("smoothed peak (EMA 0.5)", "raw best event"):
        cells = [f"step {out['scenarios'][n]['keep'][label]['step']}: {out['scenarios'][n]['keep'][label]['lost']:.1f}"
                 for n in names]
        print(f"| {label} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train one scenario observe-only and score its checkpoints")
    r.add_argument("names", nargs="+", choices=sorted(SCENARIOS))
    r.add_argument("--root", type=Path, default=Path("outputs/scenarios"))
    r.add_argument("--keep-weights", action="store_true")
    u = sub.add_parser("audit", help="audit the scenarios' training rows with the untrained model")
    u.add_argument("names", nargs="+", choices=sorted(SCENARIOS))
    u.add_argument("--root", type=Path, default=Path("outputs/scenarios"))
    a = sub.add_parser("analyze", help="replay the stop rules on the scored scenarios; the table")
    a.add_argument("--root", type=Path, default=Path("outputs/scenarios"))
    a.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.command == "run":
        for name in args.names:
            print(run(name, args.root, args.keep_weights), flush=True)
    elif args.command == "audit":
        for name in args.names:
            print(audit(name, args.root), flush=True)
    else:
        out = analyze(args.root)
        if args.json:
            args.json.write_text(json.dumps(out, indent=2, default=float))


if __name__ == "__main__":
    main()
