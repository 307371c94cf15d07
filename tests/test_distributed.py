"""A real two-process run (torch.distributed.run, gloo on CPU): sharded probing equals one process, decisions agree."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import METRIC_ATOL

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "workers" / "ddp_probe.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: Every configuration the tests below check (mode:sharded), trained one after the other in one two-process launch.
CONFIGS = ("loglik:replicated", "mixed:replicated", "generate:replicated", "generate:sharded",
           "loglik:fail_on_rank1")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, smollm2_dir):
    """One ``torch.distributed.run`` launch of two processes for all :data:`CONFIGS` (start-up paid once)."""
    out = tmp_path_factory.mktemp("ddp")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(WORKER), str(smollm2_dir), str(out), *CONFIGS]
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired as err:  # a hang is a failure, not a stuck CI
        pytest.fail(f"two-process run timed out (hang?):\n{(err.stderr or b'')[-3000:]}")
    return out, proc


def launch(runs, mode, sharded="replicated"):
    out, proc = runs
    config = f"{mode}-{sharded}"
    paths = [out / f"{config}.rank{r}.json" for r in (0, 1)]
    assert all(path.exists() for path in paths), (config, proc.returncode, proc.stderr[-4000:])
    ranks = [json.loads(path.read_text()) for path in paths]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["synced_gpus"] for r in ranks] == [sharded == "sharded"] * 2
    assert ranks[0].get("failed_steps") == ranks[1].get("failed_steps")
    return ranks


def test_the_launch_of_every_configuration_succeeds(runs):
    assert runs[1].returncode == 0, runs[1].stderr[-4000:]


def assert_rows_equal_one_process(ranks, num_probes=7):
    for rank in ranks:
        assert rank["rows"], "no probe rows logged"
        for row in rank["rows"]:
            single = rank["rescored"][str(row["step"])]
            assert row["ctx_reliance/num_probes"] == num_probes  # all probes, although each rank scored its share
            # Replicated parameters: each rank scored its round-robin share in other batches than the one-process
            # re-score, so the metrics agree up to float32 summation order (see METRIC_ATOL), not bit for bit.
            for key, value in single.items():
                if key.endswith("/seconds"):  # the diagnostics' cost, per process
                    continue
                assert row[key] == pytest.approx(value, abs=METRIC_ATOL, nan_ok=True), (rank["rank"], row["step"], key)
    # Both ranks logged identical numbers at identical steps. Exact by construction: every rank computes the metrics
    # from the same gathered per-probe arrays (sharded path: rank 0's result, broadcast).
    strip = lambda rows: [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rows]  # noqa: E731
    assert strip(ranks[0]["rows"]) == strip(ranks[1]["rows"])


def test_two_process_ddp_loglik_sharded_probing_and_early_stop(runs):
    ranks = launch(runs, "loglik")
    assert_rows_equal_one_process(ranks)
    # The stop was decided once and taken by both ranks at the same step.
    assert [r["stop_step"] for r in ranks] == [4, 4]
    assert [r["global_step"] for r in ranks] == [4, 4]
    assert [row["step"] for row in ranks[0]["rows"]] == [0, 2, 4]
    # The label check at every event, the attention share at events 0 and 2 (steps 0 and 4), on 5 probes split
    # over the ranks: equal to one process above.
    rows = ranks[0]["rows"]
    assert [r.get("ctx_reliance/label_check/probes") for r in rows] == [5, 5, 5]
    assert [r.get("ctx_reliance/attention/probes") for r in rows] == [5, None, 5]


def test_two_process_ddp_mixed_multiple_choice_and_two_answer_round(runs):
    """7 two-answer + 4 four-way multiple-choice probes split 6/5 over the ranks: the same metrics as one process."""
    ranks = launch(runs, "mixed")
    assert_rows_equal_one_process(ranks, num_probes=11)
    row = ranks[0]["rows"][0]
    assert row["ctx_reliance/mc/num_probes"] == 4 and row["ctx_reliance/capitals/num_probes"] == 7
    for key in ("counterfactual_accuracy", "parametric_accuracy", "closed_book_accuracy", "logprob_margin",
                "irrelevant_robustness"):
        assert row[f"ctx_reliance/mc/{key}"] == row[f"ctx_reliance/mc/{key}"], key  # not NaN
    # The two-sided metrics were sharded and merged like the others (compared with one process above).
    for key in ("irrelevant_robustness", "utilisation", "ambiguous_rate"):
        assert row[f"ctx_reliance/capitals/{key}"] == row[f"ctx_reliance/capitals/{key}"], key
    assert [r["global_step"] for r in ranks] == [8, 8]


def test_two_process_ddp_generation_mode(runs):
    ranks = launch(runs, "generate")
    assert_rows_equal_one_process(ranks)
    assert [r["global_step"] for r in ranks] == [8, 8]


def test_two_process_sharded_parameter_path_scores_everything_in_lock_step(runs):
    """The FSDP / ZeRO-3 rank logic (every rank scores all probes, synced generation, rank 0's result shared)."""
    ranks = launch(runs, "generate", sharded="sharded")
    assert_rows_equal_one_process(ranks)
    assert [r["global_step"] for r in ranks] == [8, 8]


def test_a_probe_failure_on_one_rank_is_handled_on_every_rank(runs):
    """Rank 1's probes raise; both ranks log the failure at the same steps and train on (no hang, no divergence)."""
    ranks = launch(runs, "loglik", sharded="fail_on_rank1")
    assert ranks[0]["rows"] == ranks[1]["rows"] == []
    assert [r["failed_steps"] for r in ranks] == [[0, 2, 4, 6, 8]] * 2
    assert [r["global_step"] for r in ranks] == [8, 8]
