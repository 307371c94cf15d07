"""Which monitor should the callback watch? Rank candidate monitors against a held-out generation reference.

The evidence behind the monitor-choice table in docs/stopping.md ("Which monitor?"). Three steps:

1. Train the example observe-only, keeping a checkpoint every 10 steps (one run per seed; the seed also reshuffles
   the training mixture)::

       python examples/finetune_smollm2.py --no-stop --save-steps 10 --seed 0 --output-dir outputs/monitor/seed0

2. Write the probe sets and score every checkpoint (step 0, the untrained model, is linked in as ``checkpoint-0``)::

       python benchmarks/monitor_choice.py prepare outputs/monitor/seed0     # probe files + checkpoint-0 link
       python benchmarks/monitor_choice.py score outputs/monitor/seed0       # monitor probes, per-probe margins
       ctx-callback scan outputs/monitor/seed0 --probes outputs/monitor/seed0/reference_probes.jsonl \\
           --variants context --mode generate --output-dir outputs/monitor/seed0/reference_scan

3. Compare::

       python benchmarks/monitor_choice.py analyze outputs/monitor/seed0 outputs/monitor/seed1 ...

The probe sets never share a fact:

- *monitor probes* (log-likelihood, what the callback can watch): the example's 90 probed built-in probes (30 per
  family, exactly what its callback scores) plus split ``A`` of the harder suite ``conflicts_hard``;
- *reference probes* (generation mode, the paper's metric): the rest of the example's probed half of the built-in
  suites (never trained on, never monitored) plus split ``B`` of ``conflicts_hard``.

The reference is counterfactual accuracy in generation mode (the output contains the context's answer). For each
candidate monitor and run: Spearman rank agreement with the reference over the checkpoints, the checkpoint the
monitor would pick (its maximum) and how many reference points that pick loses against the reference's best
checkpoint, and the delay, in probe events, between the reference's fall and the monitor's fall (a fall: the first
event after the series' maximum at which it has lost at least half of its eventual decline, a unit-free definition
that works for accuracies, probabilities and nats alike).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
HARD_SUITE = REPO / "ctx_callback" / "data" / "conflicts_hard.jsonl"
BUILTIN_FAMILIES = ("biographies", "quotes", "world_facts")
HARD_FAMILIES = ("hard_distractor", "hard_inference", "hard_strong")
METRICS = ("counterfactual_accuracy", "counterfactual_probability", "logprob_margin")
INFORMATIVE_BANDS = ((0.1, 0.9), (0.05, 0.99))
SHORT = {"counterfactual_accuracy": "cf_acc", "counterfactual_probability": "p_cf", "logprob_margin": "margin"}


def _example_module():
    sys.path.insert(0, str(REPO / "examples"))
    import finetune_smollm2  # noqa: PLC0415

    return finetune_smollm2


def probe_sets(probes_per_family: int = 30) -> tuple[list, list]:
    """(monitor probes, reference probes), as described in the module docstring."""
    from ctx_callback import load_probes  # noqa: PLC0415

    example = _example_module()
    probed, _train = example.split_probes(load_probes("all"))
    monitored = load_probes(probed, limit_per_family=probes_per_family)
    monitored_ids = {p.id for p in monitored}
    held_out = [p for p in probed if p.id not in monitored_ids]
    hard = load_probes(str(HARD_SUITE))
    hard_a = [p for p in hard if p.metadata.get("split") == "A"]
    hard_b = [p for p in hard if p.metadata.get("split") == "B"]
    return list(monitored) + hard_a, held_out + hard_b


def _write_jsonl(path: Path, probes: list) -> None:
    with path.open("w", encoding="utf-8") as f:
        for probe in probes:
            f.write(json.dumps(probe.to_dict(), ensure_ascii=False) + "\n")


def prepare(run_dir: Path, base_model: str) -> None:
    monitor, reference = probe_sets()
    _write_jsonl(run_dir / "monitor_probes.jsonl", monitor)
    _write_jsonl(run_dir / "reference_probes.jsonl", reference)
    link = run_dir / "checkpoint-0"
    if not link.exists():
        os.symlink(base_model, link)
    print(f"{run_dir}: {len(monitor)} monitor probes, {len(reference)} reference probes, checkpoint-0 -> {base_model}")


def _checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for path in run_dir.glob("checkpoint-*"):
        suffix = path.name.split("-", 1)[1]
        if suffix.isdigit() and (path / "config.json").exists():
            found.append((int(suffix), path))
    return sorted(found)


def score_monitor(run_dir: Path) -> Path:
    """Per-probe log-likelihood margins of the monitor probes at every checkpoint: ``monitor_margins.json``.

    Every candidate monitor is a mean over probes of a function of the margin m = log p(cf) - log p(par) under the
    counterfactual context (accuracy: m > 0; probability: sigmoid(m); margin: m), so one scoring pass per checkpoint
    gives all of them, and the per-probe outcomes for the stop-rule simulation's calibration.
    """
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    from ctx_callback import ProbeScorer, load_probes  # noqa: PLC0415

    torch.manual_seed(0)
    probes = load_probes(str(run_dir / "monitor_probes.jsonl"))
    checkpoints = _checkpoints(run_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoints[0][1]))
    scorer = ProbeScorer(probes, tokenizer, variants=("context",))
    out = {"probes": [{"id": p.id, "family": p.family} for p in probes], "steps": {}}
    target = run_dir / "monitor_margins.json"
    if target.exists():  # resume: keep the checkpoints already scored on the same probes
        previous = json.loads(target.read_text())
        if previous.get("probes") == out["probes"]:
            out["steps"] = previous["steps"]
    for step, path in checkpoints:
        if str(step) in out["steps"]:
            continue
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        report = scorer.score(model)
        margins = [r["context_counterfactual_logprob"] - r["context_parametric_logprob"] for r in report.records]
        out["steps"][str(step)] = margins
        print(f"{path.name}: counterfactual_accuracy {np.mean(np.array(margins) > 0):.3f}", flush=True)
        del model
        target.write_text(json.dumps(out))
    return target


# ----------------------------------------------------------------------------------------------------------------
# Analysis
# ----------------------------------------------------------------------------------------------------------------


def _scan_rows(path: Path) -> dict[int, dict[str, float]]:
    data = json.loads(path.read_text())
    return {int(row["step"]): row["metrics"] for row in data["rows"]}


def _margin_rows(path: Path | dict, index: np.ndarray | None = None) -> dict[int, dict[str, float]]:
    """``monitor_margins.json`` as scan-like rows: every candidate metric per family, with num_probes.

    ``index``: the probes to use (a bootstrap resample), default all.
    """
    data = json.loads(path.read_text()) if isinstance(path, Path) else path
    index = np.arange(len(data["probes"])) if index is None else index
    families = np.array([p["family"] for p in data["probes"]])[index]
    # pseudo-families: the built-in probes whose counterfactual probability at step 0 lies in a band (the callback's
    # informative_band selection, made once at train begin)
    base = 1 / (1 + np.exp(-np.asarray(data["steps"]["0"], dtype=np.float64)[index]))
    builtin = np.isin(families, BUILTIN_FAMILIES)
    groups = {family: families == family for family in sorted(set(families))}
    for low, high in INFORMATIVE_BANDS:
        groups[f"informative_{low:g}_{high:g}"] = builtin & (base > low) & (base < high)
    rows = {}
    for step, margins in data["steps"].items():
        m = np.asarray(margins, dtype=np.float64)[index]
        metrics = {}
        for family, mask in groups.items():
            x = m[mask]
            metrics[f"ctx_reliance/{family}/num_probes"] = float(x.size)
            metrics[f"ctx_reliance/{family}/counterfactual_accuracy"] = float(np.mean(x > 0))
            metrics[f"ctx_reliance/{family}/counterfactual_probability"] = float(np.mean(1 / (1 + np.exp(-x))))
            metrics[f"ctx_reliance/{family}/logprob_margin"] = float(np.mean(x))
        rows[int(step)] = metrics
    return rows


def _union(metrics: dict[str, float], families: tuple[str, ...], metric: str) -> float:
    """A metric over the union of families: every candidate is a mean over probes, so weight by num_probes."""
    total = weight = 0.0
    for family in families:
        n = metrics.get(f"ctx_reliance/{family}/num_probes", 0.0)
        value = metrics.get(f"ctx_reliance/{family}/{metric}", math.nan)
        if n and not math.isnan(value):
            total += n * value
            weight += n
    return total / weight if weight else math.nan


def candidates() -> dict[str, tuple[tuple[str, ...], str]]:
    """Candidate monitors: name -> (families, metric)."""
    out: dict[str, tuple[tuple[str, ...], str]] = {}
    for metric in METRICS:
        out[metric] = (BUILTIN_FAMILIES, metric)
    for family in BUILTIN_FAMILIES:
        for metric in METRICS:
            out[f"{family}/{metric}"] = ((family,), metric)
    for metric in METRICS:
        out[f"conflicts_hard[A]/{metric}"] = (HARD_FAMILIES, metric)
        out[f"built-in + conflicts_hard[A]/{metric}"] = (BUILTIN_FAMILIES + HARD_FAMILIES, metric)
    for family in HARD_FAMILIES:
        out[f"{family}[A]/counterfactual_probability"] = ((family,), "counterfactual_probability")
    for low, high in INFORMATIVE_BANDS:
        for metric in METRICS:
            out[f"informative_band=({low:g}, {high:g})/{metric}"] = ((f"informative_{low:g}_{high:g}",), metric)
    return out


#: Candidates read from the callback's own logged rows (``ctx_reliance_summary.json``), where the run logged them
#: (``examples/finetune_smollm2.py --two-sided``): the two-sided controls and diagnostics of issue 22. Not resampled
#: (no bootstrap interval): the attention share and the label check are on the callback's 32-probe sample.
LOGGED = {
    "logged: attention/context_share": "ctx_reliance/attention/context_share",
    "logged: irrelevant_robustness": "ctx_reliance/irrelevant_robustness",
    "logged: utilisation": "ctx_reliance/utilisation",
    "logged: aligned_accuracy": "ctx_reliance/aligned_accuracy",
    "logged: label_check/agreement": "ctx_reliance/label_check/agreement",
    "logged: ambiguous_rate": "ctx_reliance/ambiguous_rate",
}


def _logged_rows(run_dir: Path) -> dict[int, dict[str, float]]:
    """The callback's rows of the run, by step (empty when the run wrote no summary)."""
    path = run_dir / "ctx_reliance_summary.json"
    if not path.is_file():
        return {}
    return {int(row["step"]): row for row in json.loads(path.read_text())["history"]}


def _logged_series(run_dir: Path, steps: list[int]) -> dict[str, np.ndarray]:
    """The :data:`LOGGED` candidates the run logged at every one of ``steps``."""
    rows = _logged_rows(run_dir)
    return {name: np.array([rows[s][key] for s in steps]) for name, key in LOGGED.items()
            if all(s in rows and key in rows[s] for s in steps)}


def fall_event(values: np.ndarray) -> int | None:
    """First event after the maximum where the series has lost at least half of its eventual decline."""
    peak = int(np.argmax(values))
    after = values[peak + 1:]
    if after.size == 0:
        return None
    decline = values[peak] - after.min()
    if decline <= 0:
        return None
    for offset, value in enumerate(after, start=1):
        if values[peak] - value >= 0.5 * decline:
            return peak + offset
    return None


def _bootstrap_spearman(data: dict, steps: list[int], reference: np.ndarray, resamples: int,
                        seed: int = 0) -> dict[str, list[float]]:
    """Spearman of every candidate on ``resamples`` resamples of the monitor probes (within each family)."""
    from scipy.stats import spearmanr  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    families = np.array([p["family"] for p in data["probes"]])
    groups = [np.flatnonzero(families == f) for f in sorted(set(families))]
    out: dict[str, list[float]] = {}
    for _ in range(resamples):
        index = np.concatenate([rng.choice(g, size=g.size, replace=True) for g in groups])
        rows = _margin_rows(data, index)
        for name, (fams, metric) in candidates().items():
            series = np.array([_union(rows[s], fams, metric) for s in steps])
            if np.isnan(series).any() or np.ptp(series) == 0:
                continue
            out.setdefault(name, []).append(float(spearmanr(series, reference).statistic))
    return out


def _nan_or(fn, values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(fn(finite)) if finite else math.nan


def analyze(run_dirs: list[Path], markdown: bool, resamples: int = 200) -> dict:
    from scipy.stats import spearmanr  # noqa: PLC0415

    results: dict[str, list[dict]] = {}
    boot: dict[str, list[float]] = {}
    references = {}
    for run in run_dirs:
        mon = _margin_rows(run / "monitor_margins.json")
        ref = _scan_rows(run / "reference_scan" / "ctx_reliance_scan.json")
        steps = sorted(set(mon) & set(ref))
        reference = np.array([_union(ref[s], BUILTIN_FAMILIES + HARD_FAMILIES, "counterfactual_accuracy")
                              for s in steps])
        references[str(run)] = {
            "steps": steps, "reference": reference.tolist(),
            "reference_builtin_heldout": [_union(ref[s], BUILTIN_FAMILIES, "counterfactual_accuracy") for s in steps],
            "reference_hard_B": [_union(ref[s], HARD_FAMILIES, "counterfactual_accuracy") for s in steps],
        }
        margins_data = json.loads((run / "monitor_margins.json").read_text())
        for name, values in _bootstrap_spearman(margins_data, steps, reference, resamples).items():
            boot.setdefault(name, []).extend(values)
        ref_peak = int(np.argmax(reference))
        ref_fall = fall_event(reference)
        series_of = {name: np.array([_union(mon[s], families, metric) for s in steps])
                     for name, (families, metric) in candidates().items()}
        series_of.update(_logged_series(run, steps))
        for name, series in series_of.items():
            if np.isnan(series).any():
                continue
            def rho_with(target, series=series):
                return float(spearmanr(series, target).statistic) if np.ptp(series) > 0 else math.nan

            rho = rho_with(reference)
            parts = references[str(run)]
            pick = int(np.argmax(series))
            fall = fall_event(series)
            results.setdefault(name, []).append({
                "run": str(run), "spearman": rho, "pick_step": steps[pick], "reference_peak_step": steps[ref_peak],
                "spearman_builtin_heldout": rho_with(parts["reference_builtin_heldout"]),
                "spearman_hard_B": rho_with(parts["reference_hard_B"]),
                # the part that decides a stop: from the reference's peak on
                "spearman_after_peak": float(spearmanr(series[ref_peak:], reference[ref_peak:]).statistic)
                if np.ptp(series[ref_peak:]) > 0 and len(steps) - ref_peak >= 3 else math.nan,
                "regret_points": 100 * float(reference[ref_peak] - reference[pick]),
                "delay_events": (fall - ref_fall) if fall is not None and ref_fall is not None else None,
                "series": series.tolist(),
            })
    summary = []
    for name, rows in results.items():
        delays = [r["delay_events"] for r in rows if r["delay_events"] is not None]
        summary.append({
            "monitor": name, "runs": len(rows),
            "spearman_mean": _nan_or(np.nanmean, [r["spearman"] for r in rows]),
            "spearman_min": _nan_or(np.nanmin, [r["spearman"] for r in rows]),
            "spearman_boot_90": [float(np.percentile(boot[name], 5)), float(np.percentile(boot[name], 95))]
            if boot.get(name) else [math.nan, math.nan],
            "regret_mean": float(np.mean([r["regret_points"] for r in rows])),
            "spearman_after_peak": _nan_or(np.nanmean, [r["spearman_after_peak"] for r in rows]),
            "spearman_parts": [_nan_or(np.nanmean, [r["spearman_builtin_heldout"] for r in rows]),
                               _nan_or(np.nanmean, [r["spearman_hard_B"] for r in rows])],
            "picks": [r["pick_step"] for r in rows],
            "delays": [r["delay_events"] for r in rows],
            "delay_mean": float(np.mean(delays)) if delays else math.nan,
        })
    summary.sort(key=lambda r: -r["spearman_mean"] if not math.isnan(r["spearman_mean"]) else math.inf)
    out = {"references": references, "per_run": results, "summary": summary,
           "replay": {str(run): replay(run) for run in run_dirs}}
    print_table(out, markdown)
    return out


def replay(run_dir: Path, warmup: int = 30) -> list[dict]:
    """Replay the library's stop rules on the run's per-probe outcomes of the callback's 90 built-in probes.

    The observe-only run trains exactly as a run with a stop rule would until it stops, so feeding its events to the
    rules gives the step (and message) the callback would stop at (peak saving aside), at the example's warm-up.
    """
    from ctx_callback.decisions import ProbeEvent, first_stop, make_stop_rules  # noqa: PLC0415

    data = json.loads((run_dir / "monitor_margins.json").read_text())
    builtin = np.array([p["family"] in BUILTIN_FAMILIES for p in data["probes"]])
    steps = sorted(int(s) for s in data["steps"])
    out = []
    configs = [("patience=3", "counterfactual_accuracy", {"patience": 3}),
               ("significant_decline", "counterfactual_accuracy", {"stop_rule": "significant_decline"}),
               ("patience=3", "counterfactual_probability", {"patience": 3}),
               ("significant_decline", "counterfactual_probability", {"stop_rule": "significant_decline"})]
    for label, metric, options in configs:
        rules = make_stop_rules(warmup=warmup, metric=f"ctx_reliance/{metric}", **options)
        stop = None
        for step in steps:
            m = np.asarray(data["steps"][str(step)], dtype=np.float64)[builtin]
            outcomes = m > 0 if metric == "counterfactual_accuracy" else 1 / (1 + np.exp(-m))
            decision, _ = first_stop(rules, ProbeEvent(step, float(np.mean(outcomes)), outcomes))
            if decision is not None:
                stop = {"rule": label, "monitor": metric, "step": step, "message": decision.message}
                break
        out.append(stop or {"rule": label, "monitor": metric, "step": None, "message": "no stop"})
    return out


def print_table(out: dict, markdown: bool = True) -> None:
    for run, ref in out["references"].items():
        print(f"reference {run}: steps {ref['steps']}")
        for key in ("reference", "reference_builtin_heldout", "reference_hard_B"):
            print(f"  {key:26s} " + " ".join(f"{v:.3f}" for v in ref[key]))
    print()
    print("| monitor | Spearman with the reference (90% bootstrap over monitor probes) | from the reference's peak on "
          "| with its built-in / hard part | picked step (reference peak) | reference points lost by the pick "
          "| events of delay after the reference's fall |")
    print("|---|---|---|---|---|---|---|")
    ref_peaks = [int(np.argmax(r["reference"])) for r in out["references"].values()]
    ref_steps = [r["steps"][p] for r, p in zip(out["references"].values(), ref_peaks)]
    for row in out["summary"]:
        picks = ", ".join(str(p) for p in row["picks"])
        delays = ", ".join("-" if d is None else f"{d:+d}" for d in row["delays"])
        low, high = row["spearman_boot_90"]
        part_b, part_h = row["spearman_parts"]
        print(f"| `{row['monitor']}` | {row['spearman_mean']:.2f} ({low:.2f} to {high:.2f}) | "
              f"{row['spearman_after_peak']:.2f} | {part_b:.2f} / "
              f"{part_h:.2f} | {picks} "
              f"({', '.join(map(str, ref_steps))}) | {row['regret_mean']:.1f} | {delays} |")
    for run, stops in out.get("replay", {}).items():
        print(f"\nstop rules replayed on {run} (the callback's 90 probes, warm-up 30 steps):")
        for stop in stops:
            print(f"  {stop['rule']} on {stop['monitor']}: step {stop['step']}: {stop['message']}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="write the probe files and link the base model as checkpoint-0")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--base-model", default=None, help="untrained model folder (default: the offline SmolLM2 cache)")
    s = sub.add_parser("score", help="per-probe margins of the monitor probes at every checkpoint")
    s.add_argument("run_dir", type=Path)
    a = sub.add_parser("analyze", help="rank agreement, picks and delays over scanned runs")
    a.add_argument("run_dirs", type=Path, nargs="+")
    a.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        base = args.base_model
        if base is None:
            from ctx_callback.models import smollm2_path  # noqa: PLC0415

            base = str(smollm2_path())
        prepare(args.run_dir, base)
    elif args.command == "score":
        print(score_monitor(args.run_dir))
    else:
        out = analyze(args.run_dirs, markdown=True)
        if args.json:
            args.json.write_text(json.dumps(out, indent=2, default=float))


if __name__ == "__main__":
    main()
