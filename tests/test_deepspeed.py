"""DeepSpeed ZeRO-3 on CPU: a real ``SFTTrainer.train()`` over two gloo processes, with the callback's sharded path.

Runs where DeepSpeed is installed (it is not a project dependency; CI skips this file). How it was run here::

    pip download --no-deps deepspeed==0.19.8 && pip install --no-deps --target /tmp/ds deepspeed-0.19.8.tar.gz
    pip install --target /tmp/ds_deps einops hjson msgpack ninja py-cpuinfo
    DS_ACCELERATOR=cpu PYTHONPATH=/tmp/ds:/tmp/ds_deps pytest tests/test_deepspeed.py

The Trainer reports ``is_deepspeed_enabled`` with ZeRO stage 3, so the callback chooses the sharded path by itself
(every rank scores every probe; ``synced_gpus=True``); the weights are really partitioned (each rank holds half);
the logged metrics equal a one-process score of the gathered weights at every probe event.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

from tests.helpers import METRIC_ATOL  # noqa: E402
from tests.test_fsdp2 import free_port, tail  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "workers" / "deepspeed_zero3_probe.py"


def test_zero3_on_cpu_probes_in_lockstep_and_matches_one_process(tmp_path, smollm2_dir):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", DS_ACCELERATOR="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(WORKER), str(smollm2_dir), str(tmp_path)]
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"ZeRO-3 run timed out (hang?):\n{tail(err.stderr)}")
    assert proc.returncode == 0, tail(proc.stderr)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and all(r["synced_gpus"] for r in ranks)
    for rank in ranks:
        assert [row["step"] for row in rank["rows"]] == [0, 2, 4]
        for info in rank["partitioned"].values():  # partitioned: nothing visible, half held locally
            assert info["numel_visible"] == 0 and info["numel_local"] * 2 == info["numel_full"]
        for row in rank["rows"]:  # the same batches through ZeRO-3's partitioned modules: see METRIC_ATOL
            for key, value in rank["reference"][str(row["step"])].items():
                assert row[key] == pytest.approx(value, abs=METRIC_ATOL, nan_ok=True), (rank["rank"], row["step"], key)
    # Exact by construction: both ranks log rank 0's broadcast result.
    timing = "ctx_reliance/probe_seconds"
    strip = [[{k: v for k, v in r.items() if k != timing} for r in rank["rows"]] for rank in ranks]
    assert strip[0] == strip[1]
    assert ranks[0]["stop_step"] == ranks[1]["stop_step"] and ranks[0]["global_step"] == ranks[1]["global_step"]
