"""The per-event table of docs/two_sided.md from a run of ``examples/finetune_smollm2.py --two-sided``.

    python examples/finetune_smollm2.py --two-sided --no-stop --save-steps 10 --output-dir outputs/two_sided
    python benchmarks/two_sided_table.py outputs/two_sided

Reads the callback's rows (``ctx_reliance_summary.json``). The irrelevant-context metrics are given over the probes
that have an irrelevant row (``world_facts`` and ``biographies``: ``quotes`` contexts are instructions, never lent),
weighted by each family's probe count; Spearman's rho of each series against the counterfactual probability, over the
events, says what moved together.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

FAMILIES = ("world_facts", "biographies")
COLUMNS = {
    "cf prob": "counterfactual_probability",
    "cf acc": "counterfactual_accuracy",
    "aligned": "aligned_accuracy",
    "irr. robust": "irrelevant_robustness*",
    "utilisation": "utilisation*",
    "LL-gen agree": "label_check/agreement",
    "undecided": "label_check/undecided_rate",
    "ambiguous": "ambiguous_rate",
    "attn ctx": "attention/context_share",
}


def value(row: dict, name: str) -> float:
    """``ctx_reliance/<name>``; a name ending in ``*`` is the probe-weighted mean over :data:`FAMILIES`."""
    if not name.endswith("*"):
        return float(row.get(f"ctx_reliance/{name}", np.nan))
    metric = name[:-1]
    weights = [row.get(f"ctx_reliance/{f}/num_probes", 0.0) for f in FAMILIES]
    values = [row.get(f"ctx_reliance/{f}/{metric}", np.nan) for f in FAMILIES]
    return float(np.average(values, weights=weights)) if sum(weights) else float("nan")


def main(argv: list[str] | None = None) -> None:
    from scipy.stats import spearmanr  # noqa: PLC0415

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    rows = json.loads((args.run_dir / "ctx_reliance_summary.json").read_text())["history"]
    table = {label: [value(r, name) for r in rows] for label, name in COLUMNS.items()}
    print("| step | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for i, row in enumerate(rows):
        print(f"| {row['step']} | " + " | ".join(f"{table[c][i]:.3f}" for c in COLUMNS) + " |")
    reference = table["cf prob"]
    print("| Spearman vs cf prob | " + " | ".join(
        f"{spearmanr(table[c], reference).statistic:+.2f}" if np.ptp(table[c]) > 0 else "n/a" for c in COLUMNS) + " |")
    seconds = {key: np.mean([r.get(f"ctx_reliance/{key}", np.nan) for r in rows])
               for key in ("probe_seconds", "label_check/seconds", "attention/seconds")}
    print("\nmean seconds per event: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    layers = sorted(k for k in rows[0] if k.startswith("ctx_reliance/attention/layer_"))
    print("attention per layer, first and last event: " + ", ".join(
        f"{k.rsplit('_', 1)[1]}: {rows[0][k]:.3f}->{rows[-1][k]:.3f}" for k in layers))
    shares = {k: v for k, v in rows[-1].items() if k.startswith("ctx_reliance/decline_share/")}
    print("decline shares at the last event: " + ", ".join(f"{k.split('/', 2)[2]} {v:+.2f}" for k, v in shares.items()))


if __name__ == "__main__":
    main()
