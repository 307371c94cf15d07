"""Probing under several processes (DDP, FSDP, DeepSpeed): who runs which probes, and agreeing on the result.

Two cases, decided from the trainer:

- **Replicated parameters** (DDP, or several processes without sharding): every rank holds the whole model, and a
  forward pass of the *unwrapped* module (what the callback receives) runs no collective. The probes are split
  round-robin over the ranks, each rank scores its shard (possibly empty), and the per-probe results are gathered
  on every rank and merged by probe index, so the metrics equal a one-process run on the same probes.
- **Sharded parameters** (FSDP, DeepSpeed ZeRO-3): every forward pass all-gathers parameters, so every rank must
  make the same forward calls in the same order or training hangs. Every rank scores *all* probes in the same
  batches (generation runs with ``synced_gpus=True``), and rank 0's result is broadcast so all ranks log and decide
  on identical numbers.

Either way the outcome (the result, or "this round failed") is exchanged with a collective that every rank
reaches, so a probe that raises on one rank cannot leave the others waiting in the next collective. A failure
*inside* a sharded forward pass (an out-of-memory error on one rank under FSDP) can still hang the other ranks in
that forward's own collective; that is a property of sharded training, not something a callback can undo.

Aggregation uses ``torch.distributed.all_gather_object`` on small per-probe arrays, not
``accelerator.gather_for_metrics``, which during training truncates to the train dataloader's remainder.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["ProbePlan", "broadcast_from_main", "gather_outcomes", "plan_probes", "world"]


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def params_are_sharded(trainer: Any) -> bool:
    """Whether every rank must take part in every forward pass (FSDP or DeepSpeed ZeRO-3)."""
    if trainer is None:
        return False
    if getattr(trainer, "is_fsdp_enabled", False):
        return True
    if getattr(trainer, "is_deepspeed_enabled", False):
        plugin = getattr(getattr(trainer.accelerator, "state", None), "deepspeed_plugin", None)
        return getattr(plugin, "zero_stage", None) == 3
    return False


@dataclass(frozen=True)
class ProbePlan:
    """What this rank scores in one probe round."""

    indices: list[int]  #: probe indices this rank scores
    rank: int
    world_size: int
    sharded_params: bool  #: every rank scores everything (FSDP / ZeRO-3)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def plan_probes(indices: Sequence[int], trainer: Any = None) -> ProbePlan:
    """Split ``indices`` round-robin over the ranks, unless parameters are sharded (then every rank scores all)."""
    rank, size = world()
    indices = list(indices)
    sharded = size > 1 and params_are_sharded(trainer)
    mine = indices if (size == 1 or sharded) else indices[rank::size]
    return ProbePlan(indices=mine, rank=rank, world_size=size, sharded_params=sharded)


def gather_outcomes(outcome: Any, plan: ProbePlan) -> list[Any]:
    """Every rank's outcome, on every rank (a single-element list without distribution)."""
    if not plan.distributed:
        return [outcome]
    import torch.distributed as dist

    outcomes: list[Any] = [None] * plan.world_size
    dist.all_gather_object(outcomes, outcome)
    return outcomes


def broadcast_from_main(value: Any, plan: ProbePlan) -> Any:
    """Rank 0's ``value`` on every rank (decisions are taken once and shared)."""
    if not plan.distributed:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_round(score: Callable[[list[int]], Any], merge: Callable[[list[Any]], Any], plan: ProbePlan):
    """Score this rank's share and combine the ranks' results.

    Returns:
        The merged result (the same on every rank).

    Raises:
        Exception: On *every* rank if scoring failed on any rank: the original error where it happened, a
            ``RuntimeError`` naming the failing rank elsewhere. The callback logs it (or re-raises in strict mode)
            identically everywhere, so no rank trains on while another waits.
    """
    try:
        outcome: Any = ("ok", score(plan.indices))
    except Exception as err:  # noqa: BLE001 - reported to every rank below, re-raised by the caller if strict
        outcome = ("error", f"rank {plan.rank}: {type(err).__name__}: {err}", err)
    outcomes = gather_outcomes(outcome if outcome[0] == "ok" else outcome[:2], plan)
    errors = [o[1] for o in outcomes if o[0] == "error"]
    if errors:
        if outcome[0] == "error":
            raise outcome[2]
        raise RuntimeError("probe round failed on another rank: " + "; ".join(errors))
    results = [o[1] for o in outcomes]
    if plan.sharded_params:
        return results[0]  # every rank scored everything; rank 0's numbers are the ones everyone uses
    return merge(results)
