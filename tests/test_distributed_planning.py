"""distributed: who scores which probes, and how outcomes are combined (one process; the two-process runs are in
test_distributed.py)."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import numpy as np
import pytest
import torch.distributed as dist

from ctx_callback.distributed import (
    ProbePlan,
    broadcast_from_main,
    gather_outcomes,
    params_are_sharded,
    plan_probes,
    run_round,
    world,
)


def _trainer(fsdp=False, deepspeed_stage=None):
    """The two trainer attributes the planner reads (a real Trainer needs accelerate's FSDP/DeepSpeed set-up)."""
    plugin = SimpleNamespace(zero_stage=deepspeed_stage)
    return SimpleNamespace(is_fsdp_enabled=fsdp, is_deepspeed_enabled=deepspeed_stage is not None,
                           accelerator=SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin)))


def test_sharded_parameters_are_recognised():
    assert not params_are_sharded(None)
    assert not params_are_sharded(_trainer())
    assert params_are_sharded(_trainer(fsdp=True))
    assert params_are_sharded(_trainer(deepspeed_stage=3))
    assert not params_are_sharded(_trainer(deepspeed_stage=2))


def test_single_process_plan_scores_everything():
    assert world() == (0, 1)
    plan = plan_probes(range(5), _trainer(fsdp=True))
    assert plan == ProbePlan(indices=[0, 1, 2, 3, 4], rank=0, world_size=1, sharded_params=False)
    assert not plan.distributed


def test_single_process_collectives_are_identities():
    plan = plan_probes([0])
    assert gather_outcomes("x", plan) == ["x"]
    assert broadcast_from_main({"a": 1}, plan) == {"a": 1}


def test_run_round_merges_and_reraises_the_original_error():
    plan = plan_probes([3, 1, 2])
    seen = []

    def score(indices):
        seen.append(list(indices))
        return np.asarray(indices) * 10

    merged = run_round(score, lambda results: np.concatenate(results), plan)
    assert seen == [[3, 1, 2]] and merged.tolist() == [30, 10, 20]

    def fail(indices):
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        run_round(fail, lambda r: r, plan)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def gloo_world_of_one(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_round_robin_shards_with_a_process_group(gloo_world_of_one, monkeypatch):
    """With a real process group the planner reads rank and size from it; shards are round-robin."""
    assert world() == (0, 1)
    plan = plan_probes(range(7), None)
    assert plan.indices == list(range(7)) and plan.world_size == 1
    # The rank arithmetic for larger worlds, with world() as the process group would report it:
    shards = {}
    for rank in range(3):
        monkeypatch.setattr("ctx_callback.distributed.world", lambda rank=rank: (rank, 3))
        shards[rank] = plan_probes(range(7), None).indices
        sharded = plan_probes(range(7), _trainer(fsdp=True))
        assert sharded.indices == list(range(7)) and sharded.sharded_params and sharded.distributed
    assert shards == {0: [0, 3, 6], 1: [1, 4], 2: [2, 5]}
    assert sorted(i for s in shards.values() for i in s) == list(range(7))
