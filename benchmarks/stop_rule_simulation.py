"""How often does each stop rule stop a run whose reliance does not decline, and how late does it see a real fall?

A simulation with a known truth, feeding the library's own stop rules (``ctx_callback.decisions``, the code the
callback runs) with per-probe outcomes drawn from a model of a run. Pure numpy + scipy; about a minute.

The model of a run (per simulated run, ``n`` probes, ``events`` probe events, one every 50 steps):

- every probe has a persistent latent log-likelihood margin ``z_i`` (log p(counterfactual) - log p(parametric) under
  the counterfactual context, in nats), drawn with replacement from the margins of real probes: the example's 90
  probed built-in probes, on SmolLM2-135M-Instruct, at the checkpoints of an observe-only run (``--calibration``);
- at every event each probe's margin is ``z_i + e_it`` with a fresh perturbation ``e_it ~ N(0, tau^2)``: the
  event-to-event noise of a probe (another checkpoint, a few more optimizer steps). ``tau`` is measured on the same
  real run: the spread, over probes, of the change of a probe's margin between consecutive checkpoints (its mean,
  the real trend, removed), ``sd / sqrt(2)``. With it, probes near the decision boundary flip between events and the
  others do not, as in the real run, and outcomes are correlated over events through ``z_i``;
- the outcome is ``z_i + e_it > 0`` (counterfactual accuracy, a McNemar-able bool per probe) or
  ``sigmoid(z_i + e_it)`` (counterfactual probability, a float per probe, paired t-test);
- a *flat* run keeps this for all its events: its true reliance never changes, so any stop is a false stop;
- a *declining* run has the paper's shape: reliance rises (the margins start ``rise`` below, solved for a
  10-point lower expected accuracy, and climb linearly to the peak at event ``decline_event - 1``), then falls at
  event ``decline_event`` and stays down. The fall is not the same for every probe: probe ``i`` loses
  ``delta * (1 + cv * g_i)`` nats, ``g_i ~ N(0, 1)`` fixed per run (some probes fall a lot, some not at all, a few
  rise), ``cv`` measured on the real run's fall (the spread of the per-probe change from its peak checkpoint to its
  last one, the event noise removed, over its mean); ``delta`` is solved so that the expected accuracy drops 5, 10
  or 20 points. The rise gives every rule a true peak to count from (on a flat start, patience rules stop before
  the fall).

- a *recovering* run (:func:`dip_shifts`) rises as a declining one, then dips by 5, 10 or 20 points for one or two
  events from ``decline_event`` on (the same per-probe spread) and returns to its peak level for the rest of the run:
  the dip-and-recover curves of interleaved mixtures and of the paper's own TULU replication. Every stop of such a run
  is a stop lost to a recovery.

Reported per rule and probe count: the false-stop rate on flat runs (any stop within the horizon), and on declining
runs the detection delay (events after the first declined event: 0 = stopped at it), its median and 90th
percentile, and the share of declining runs stopped before the fall (``early``) or not at all within the horizon
(``missed``); on recovering runs the share stopped (recoveries lost).

    python benchmarks/stop_rule_simulation.py                      # the table in docs/stopping.md (markdown)
    python benchmarks/stop_rule_simulation.py --runs 200 --probes 100,400 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.special import expit
from scipy.stats import norm

from ctx_callback.decisions import ProbeEvent, make_stop_rules

#: Real per-probe margins (nats) of the example's 90 probed built-in probes at its baseline (step 0), used when no
#: ``--calibration`` file is given. Measured with ``benchmarks/monitor_choice.py score`` on an observe-only run of
#: ``examples/finetune_smollm2.py --no-stop --save-steps 10 --seed 0`` (checkpoints 0-50), rounded to 0.01: median
#: 5.0 nats, 88% above 0 (the accuracy), 7 of 90 within 1 nat of the boundary.
DEFAULT_MARGINS: tuple[float, ...] = (
    3.09, 4.62, 10.19, 3.10, 1.53, 3.93, 5.39, 3.55, 6.86, 11.28, 4.32, 5.40, 5.09, 2.69, -6.09, 2.05, -3.48,
    -2.13, -6.02, -5.32, 3.14, 1.63, 5.88, 4.66, 6.92, -2.30, 0.73, -2.90, -2.64, -1.56, 3.74, 6.17, 9.19, 8.11,
    9.22, 3.02, 5.89, 17.50, 5.65, 18.35, 6.94, 3.74, 4.87, 7.18, 9.62, 3.70, 9.32, 15.54, 10.43, 8.04, 5.56,
    7.36, 5.82, 9.58, 7.71, 10.74, 13.98, 12.65, 8.85, 3.23, 5.16, -1.47, 4.13, 6.48, 0.92, 1.26, 6.85, 4.86,
    6.58, -0.67, 2.14, 1.91, 4.72, 0.14, 0.77, 14.68, 8.96, 6.36, 7.45, 9.06, 2.57, 2.17, 0.69, 3.36, 4.09,
    6.92, 7.39, 0.94, 7.30, 5.27,
)
#: Event-to-event perturbation of a probe's margin (nats), measured on the same run (see the module docstring): the
#: median over the five pairs of consecutive checkpoints (0.83 to 2.92 nats). A conservative choice: it gives flat
#: runs 7.1% of probes flipping between two events, while the real run's flips between consecutive checkpoints
#: (1-10% of probes) were almost all in the direction of its net change (at most 2 of 90 against it), so most of its
#: margin changes were training signal, not noise. More noise makes false stops likelier and detection slower.
DEFAULT_TAU = 1.61
#: Per-probe spread of the fall, relative to its mean, measured on the same run (see the module docstring): from the
#: peak checkpoint (step 20) to step 50 the margins fell 7.3 nats on average, sd 3.9 (3.1 with the noise removed:
#: cv = 3.1 / 7.3 = 0.43).
DEFAULT_CV = 0.43

EVENT_STEPS = 50
DECLINES = (0.05, 0.10, 0.20)


@dataclass(frozen=True)
class RuleSpec:
    """A rule configuration of the table: a label, ``make_stop_rules`` options, and the outcome type it watches."""

    label: str
    options: dict = field(default_factory=dict)
    outcome: str = "accuracy"  # or "probability"


def rule_specs(include_extras: bool = True) -> list[RuleSpec]:
    specs = [RuleSpec(f"patience={p} (EMA 0.5)", {"patience": p}) for p in (1, 3, 5)]
    # Labels without sustained_events: the one-event rule (sustained_events=1), as docs/stopping.md's table shows it.
    one = {"stop_rule": "significant_decline", "sustained_events": 1}
    specs += [RuleSpec(f"significant_decline alpha={a:g} (accuracy, McNemar)", {**one, "alpha": a})
              for a in (0.05, 0.01)]
    if include_extras:
        specs += [
            RuleSpec("significant_decline alpha=0.05 (probability, paired t-test)", {**one, "alpha": 0.05},
                     "probability"),
            RuleSpec("significant_decline alpha=0.05, no correction (accuracy)",
                     {**one, "alpha": 0.05, "correction": "none"}),
            RuleSpec("patience=3 (EMA 0.5), probability monitor", {"patience": 3}, "probability"),
        ]
    specs += [RuleSpec(f"significant_decline alpha=0.05 sustained_events={k} (probability, paired t-test)",
                       {"stop_rule": "significant_decline", "alpha": 0.05, "sustained_events": k}, "probability")
              for k in (2, 3)]
    specs += [RuleSpec("significant_decline alpha=0.05 sustained_events=2 (accuracy, McNemar)",
                       {"stop_rule": "significant_decline", "alpha": 0.05, "sustained_events": 2})]
    return specs


#: Dips that recover: (accuracy points, events) of the dip.
DIPS = ((0.05, 1), (0.10, 1), (0.20, 1), (0.10, 2), (0.20, 2))


# ----------------------------------------------------------------------------------------------------------------
# The model of a run
# ----------------------------------------------------------------------------------------------------------------


def calibrate(path: Path, step: int | None = None) -> tuple[np.ndarray, float, float, dict]:
    """Margins and ``tau`` from ``monitor_margins.json`` (``benchmarks/monitor_choice.py score``), built-in probes only.

    ``tau``: for each pair of consecutive checkpoints, the standard deviation over probes of the change in margin
    (mean change removed), divided by sqrt(2) (the difference of two independent perturbations); the median over
    pairs. Also returns what was measured (flip rates between consecutive checkpoints), for the report.
    """
    data = json.loads(Path(path).read_text())
    builtin = np.array([not p["family"].startswith("hard_") for p in data["probes"]])
    steps = sorted(int(s) for s in data["steps"])
    margins = {s: np.asarray(data["steps"][str(s)], dtype=np.float64)[builtin] for s in steps}
    taus, flips, net = [], [], []
    for a, b in zip(steps, steps[1:]):
        diff = margins[b] - margins[a]
        taus.append(float(np.std(diff - diff.mean(), ddof=1) / math.sqrt(2)))
        hit_a, hit_b = margins[a] > 0, margins[b] > 0
        flips.append(float(np.mean(hit_a != hit_b)))
        net.append(float(np.mean(hit_b) - np.mean(hit_a)))
    tau = float(np.median(taus))
    accuracy = [float(np.mean(margins[s] > 0)) for s in steps]
    peak, last = steps[int(np.argmax(accuracy))], steps[-1]
    fall = margins[last] - margins[peak]
    spread = math.sqrt(max(float(np.var(fall, ddof=1)) - 2 * tau**2, 0.0))
    cv = spread / abs(float(fall.mean())) if fall.mean() < 0 else 0.0
    base = margins[steps[0] if step is None else step]
    info = {"steps": steps, "tau_per_pair": taus, "flip_rate_per_pair": flips, "net_change_per_pair": net,
            "accuracy_per_step": accuracy, "fall_from_step": peak, "fall_to_step": last,
            "fall_mean_nats": float(fall.mean()), "fall_sd_nats": float(np.std(fall, ddof=1)), "cv": cv}
    return base, tau, cv, info


def expected_accuracy(z: np.ndarray, tau: float, shift: float = 0.0, cv: float = 0.0) -> float:
    """Expected accuracy of probes with latent margins ``z`` under the perturbation, after subtracting
    ``shift * (1 + cv * g)``, ``g ~ N(0, 1)`` (a normal shift: it adds ``(shift * cv)^2`` to the variance)."""
    return float(np.mean(norm.cdf((z - shift) / math.hypot(tau, shift * cv))))


def shift_for_decline(z: np.ndarray, tau: float, decline: float, cv: float = 0.0) -> float:
    """The mean margin shift that lowers the expected accuracy by ``decline`` (bisection)."""
    target = expected_accuracy(z, tau) - decline
    low, high = 0.0, 50.0
    for _ in range(80):
        mid = (low + high) / 2
        if expected_accuracy(z, tau, mid, cv) > target:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def shifts(events: int, decline_event: int, rise: float, fall: float) -> tuple[np.ndarray, np.ndarray]:
    """Per event: the common margin shift of the rise (linear, zero at the peak ``decline_event - 1``) and the mean
    shift of the fall (``fall`` from ``decline_event`` on, made per-probe by ``cv``)."""
    t = np.arange(events, dtype=np.float64)
    before = rise * np.clip(1.0 - t / max(decline_event - 1, 1), 0.0, 1.0)
    return np.where(t >= decline_event, 0.0, before), np.where(t >= decline_event, fall, 0.0)


def dip_shifts(events: int, dip_event: int, rise: float, depth: float, length: int) -> tuple[np.ndarray, np.ndarray]:
    """A run that recovers: the rise of :func:`shifts` to the peak at ``dip_event - 1``, a dip of mean shift
    ``depth`` for ``length`` events from ``dip_event`` on, then back at the peak level for the rest of the run."""
    common, _ = shifts(events, dip_event, rise, 0.0)
    t = np.arange(events)
    return common, np.where((t >= dip_event) & (t < dip_event + length), depth, 0.0)


def simulate_run(rules, rng: np.random.Generator, pool: np.ndarray, tau: float, n: int,
                 schedule: tuple[np.ndarray, np.ndarray], outcome: str, cv: float = 0.0) -> int | None:
    """Feed one simulated run to ``rules``; the index of the first event any of them stops at, or ``None``."""
    for rule in rules:
        rule.reset()
    z = rng.choice(pool, size=n, replace=True)
    fall_weight = 1.0 + cv * rng.normal(size=n)
    for t, (common, fall) in enumerate(zip(*schedule)):
        margin = z + rng.normal(0.0, tau, size=n) - common - fall * fall_weight
        outcomes = margin > 0 if outcome == "accuracy" else expit(margin)
        event = ProbeEvent(step=t * EVENT_STEPS, value=float(np.mean(outcomes)), outcomes=outcomes)
        stopped = [rule.update(event).stop for rule in rules]
        if any(stopped):
            return t
    return None


def run_table(pool: np.ndarray, tau: float, probe_counts: list[int], runs_flat: int, runs_decline: int,
              events: int, decline_event: int, warmup_events: int, seed: int, specs: list[RuleSpec],
              rise_points: float = 0.10, cv: float = 0.0) -> list[dict]:
    rows = []
    rise = shift_for_decline(pool, tau, rise_points)
    for spec in specs:
        for n in probe_counts:
            rng = np.random.default_rng([seed, n])
            rules = make_stop_rules(warmup=warmup_events * EVENT_STEPS, **spec.options)
            zero = (np.zeros(events), np.zeros(events))
            flat = [simulate_run(rules, rng, pool, tau, n, zero, spec.outcome) for _ in range(runs_flat)]
            row = {"rule": spec.label, "probes": n, "false_stop_flat": float(np.mean([s is not None for s in flat])),
                   "runs_flat": runs_flat}
            for decline in DECLINES:
                schedule = shifts(events, decline_event, rise, shift_for_decline(pool, tau, decline, cv))
                stops = [simulate_run(rules, rng, pool, tau, n, schedule, spec.outcome, cv)
                         for _ in range(runs_decline)]
                early = [s for s in stops if s is not None and s < decline_event]
                delays = np.array([s - decline_event for s in stops if s is not None and s >= decline_event])
                row[f"decline_{int(round(100 * decline))}"] = {
                    "early": len(early) / runs_decline,
                    "missed": sum(s is None for s in stops) / runs_decline,
                    "median_delay": float(np.median(delays)) if delays.size else math.nan,
                    "p90_delay": float(np.percentile(delays, 90)) if delays.size else math.nan,
                    "mean_delay": float(delays.mean()) if delays.size else math.nan,
                    "runs": runs_decline,
                }
            rows.append(row)
            print(f"  {spec.label:62s} n={n:3d}: flat false stops {row['false_stop_flat']:.3f}", flush=True)
    return rows


def recovery_table(pool: np.ndarray, tau: float, probe_counts: list[int], runs: int, events: int, dip_event: int,
                   warmup_events: int, seed: int, specs: list[RuleSpec], rise_points: float = 0.10,
                   cv: float = 0.0) -> list[dict]:
    """Per rule and probe count: the share of runs with a dip that recovers (:data:`DIPS`) that a rule stops at
    all (every such stop loses the recovery: the run returns to its peak level), and the share stopped in the dip."""
    rows = []
    rise = shift_for_decline(pool, tau, rise_points)
    for spec in specs:
        for n in probe_counts:
            rng = np.random.default_rng([seed, n, 7])
            rules = make_stop_rules(warmup=warmup_events * EVENT_STEPS, **spec.options)
            row = {"rule": spec.label, "probes": n, "runs": runs}
            for depth, length in DIPS:
                schedule = dip_shifts(events, dip_event, rise, shift_for_decline(pool, tau, depth, cv), length)
                stops = [simulate_run(rules, rng, pool, tau, n, schedule, spec.outcome, cv) for _ in range(runs)]
                row[f"dip_{int(round(100 * depth))}x{length}"] = {
                    "stopped": sum(s is not None for s in stops) / runs,
                    "in_dip": sum(s is not None and dip_event <= s < dip_event + length for s in stops) / runs,
                }
            rows.append(row)
            print(f"  {spec.label:62s} n={n:3d}: recoveries lost "
                  + " ".join(f"{k}={v['stopped']:.2f}" for k, v in row.items() if k.startswith("dip_")), flush=True)
    return rows


#: Which event an observe-only run keeps: label -> StopDecider smoothing options.
KEEP_POLICIES = {"smoothed peak (EMA 0.5, the default)": {"smoothing": "ema", "ema_alpha": 0.5},
                 "raw best event (smoothing='none')": {"smoothing": "none"}}


def keep_table(pool: np.ndarray, tau: float, n: int, runs: int, events: int, dip_event: int, seed: int,
               rise_points: float = 0.10, cv: float = 0.0) -> list[dict]:
    """Observe-only runs (no stop): the true expected accuracy lost by keeping the smoothed peak or the raw best
    event, against the run's truly best event, on rising-then-falling, dipping and flat runs (probability monitor)."""
    from ctx_callback.stopping import StopDecider  # noqa: PLC0415

    rise = shift_for_decline(pool, tau, rise_points)
    shapes = {"flat": (np.zeros(events), np.zeros(events)),
              "10-point fall": shifts(events, dip_event, rise, shift_for_decline(pool, tau, 0.10, cv)),
              "10-point dip, 1 event": dip_shifts(events, dip_event, rise, shift_for_decline(pool, tau, 0.10, cv), 1),
              "20-point dip, 1 event": dip_shifts(events, dip_event, rise, shift_for_decline(pool, tau, 0.20, cv), 1)}
    rows = []
    for shape, (common, fall) in shapes.items():
        truth = np.array([expected_accuracy(pool, tau, c + f, cv if f else 0.0) for c, f in zip(common, fall)])
        rng = np.random.default_rng([seed, n, 11])
        lost = {label: [] for label in KEEP_POLICIES}
        for _ in range(runs):
            deciders = {label: StopDecider(**options) for label, options in KEEP_POLICIES.items()}
            z = rng.choice(pool, size=n, replace=True)
            weight = 1.0 + cv * rng.normal(size=n)
            for t in range(events):
                margin = z + rng.normal(0.0, tau, size=n) - common[t] - fall[t] * weight
                outcomes = expit(margin)
                for decider in deciders.values():
                    decider.update(ProbeEvent(t, float(outcomes.mean()), outcomes))
            for label, decider in deciders.items():
                lost[label].append(100 * (truth.max() - truth[int(decider.peak_step)]))
        rows.append({"shape": shape, "probes": n, "runs": runs,
                     **{label: {"mean": float(np.mean(v)), "p90": float(np.percentile(v, 90))}
                        for label, v in lost.items()}})
        print(f"  keep, {shape:24s} n={n}: " + ", ".join(f"{k} {np.mean(v):.2f}" for k, v in lost.items()),
              flush=True)
    return rows


def recovery_markdown(rows: list[dict]) -> str:
    head = " | ".join(f"{int(round(100 * d))}-point dip, {n} event{'s' if n > 1 else ''}" for d, n in DIPS)
    lines = [f"| rule | probes | {head} |", "|---|---|" + "---|" * len(DIPS)]
    for row in rows:
        cells = [_percent(row[f"dip_{int(round(100 * d))}x{n}"]["stopped"]) for d, n in DIPS]
        lines.append(f"| {row['rule']} | {row['probes']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _percent(share: float) -> str:
    return "<1%" if 0 < share < 0.01 else f"{100 * share:.0f}%"


def _delay_cell(cell: dict) -> str:
    if math.isnan(cell["median_delay"]):
        return f"- [{_percent(cell['early'])} early, {_percent(cell['missed'])} missed]"
    text = f"{cell['median_delay']:.0f} ({cell['p90_delay']:.0f})"
    notes = [f"{_percent(cell[key])} {key}" for key in ("early", "missed") if cell[key] > 0]
    return text + (f" [{', '.join(notes)}]" if notes else "")


def markdown(rows: list[dict]) -> str:
    lines = ["| rule | probes | false stops, flat runs | delay, 5-point fall | delay, 10-point fall "
             "| delay, 20-point fall |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['rule']} | {row['probes']} | {100 * row['false_stop_flat']:.1f}% | "
                     + " | ".join(_delay_cell(row[f"decline_{d}"]) for d in (5, 10, 20)) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--probes", default="50,100,200,400", help="comma list of probe counts")
    parser.add_argument("--runs", type=int, default=500, help="simulated flat runs per cell")
    parser.add_argument("--runs-decline", type=int, default=200, help="simulated declining runs per cell and size")
    parser.add_argument("--runs-recovery", type=int, default=200,
                        help="simulated runs with a dip that recovers, per cell (0: skip that table)")
    parser.add_argument("--events", type=int, default=20, help="probe events per run (the baseline included)")
    parser.add_argument("--decline-event", type=int, default=8, help="first event after the true decline")
    parser.add_argument("--rise", type=float, default=0.10, help="declining runs: accuracy points of the rise")
    parser.add_argument("--warmup-events", type=int, default=3, help="no stop before this event (as the example)")
    parser.add_argument("--tau", type=float, default=None, help="event-to-event noise (nats); default: calibrated")
    parser.add_argument("--calibration", type=Path, default=None,
                        help="monitor_margins.json of a real run (benchmarks/monitor_choice.py score)")
    parser.add_argument("--no-extras", action="store_true", help="only the five rules the issue asks for")
    parser.add_argument("--keep", action="store_true",
                        help="only the table of which event an observe-only run keeps (smoothed peak vs raw best)")
    parser.add_argument("--only", default=None,
                        help="comma list of substrings: only the rules whose label contains one of them")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    if args.calibration is not None:
        pool, tau, cv, info = calibrate(args.calibration)
    else:
        pool, tau, cv = np.asarray(DEFAULT_MARGINS, dtype=np.float64), DEFAULT_TAU, DEFAULT_CV
        info = {"source": "built-in"}
    if args.tau is not None:
        tau = args.tau
    if pool.size == 0:
        raise SystemExit("no calibration margins: pass --calibration monitor_margins.json")
    probe_counts = [int(x) for x in args.probes.split(",") if x]
    if args.keep:
        rows = [row for n in probe_counts for row in keep_table(pool, tau, n, args.runs_decline, args.events,
                                                                args.decline_event, args.seed, args.rise, cv)]
        print("\n| run | probes | " + " | ".join(f"points lost, {label}: mean (90th pct)" for label in KEEP_POLICIES)
              + " |\n|---|---|" + "---|" * len(KEEP_POLICIES))
        for row in rows:
            print(f"| {row['shape']} | {row['probes']} | " + " | ".join(
                f"{row[label]['mean']:.2f} ({row[label]['p90']:.2f})" for label in KEEP_POLICIES) + " |")
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
        return {"keep": rows}
    p0 = expected_accuracy(pool, tau)
    print(f"model: {pool.size} real margins, tau {tau:.3f} nats, fall cv {cv:.2f}, expected flat accuracy {p0:.3f}; "
          f"{args.events} events (every {EVENT_STEPS} steps), decline from event {args.decline_event}, "
          f"warm-up {args.warmup_events} events")
    specs = [spec for spec in rule_specs(not args.no_extras)
             if args.only is None or any(part in spec.label for part in args.only.split(","))]
    start = time.perf_counter()
    rows = run_table(pool, tau, probe_counts, args.runs, args.runs_decline, args.events, args.decline_event,
                     args.warmup_events, args.seed, specs, args.rise, cv)
    recoveries = [] if args.runs_recovery == 0 else recovery_table(
        pool, tau, probe_counts, args.runs_recovery, args.events, args.decline_event, args.warmup_events, args.seed,
        specs, args.rise, cv)
    print(f"\n{markdown(rows)}\n")
    if recoveries:
        print(f"Dips that recover (share of runs stopped; every stop loses the recovery):\n\n"
              f"{recovery_markdown(recoveries)}\n")
    print(f"({time.perf_counter() - start:.0f}s)")
    out = {"tau": tau, "cv": cv, "flat_accuracy": p0, "calibration": info, "rows": rows, "recoveries": recoveries,
           "args": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
