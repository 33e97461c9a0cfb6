"""Spawned gloo worlds for the distributed tests: one process group, several scenarios."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

Scenario = Callable[[int, int, str], None]


def run_scenarios(rank: int, world: int, tmp: str, scenarios: Sequence[Scenario]) -> None:
    """Join a ``world``-rank gloo group through ``tmp``, run each scenario, leave the group.

    Process start-up dominates these tests, so one group serves every scenario; a failure is
    re-raised naming the world size, the rank and the scenario.
    """
    torch.set_num_threads(1)  # 3 ranks share CI's 2 cores
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp}/rendezvous",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=120),
    )
    try:
        for scenario in scenarios:
            try:
                scenario(rank, world, tmp)
            except Exception as e:
                raise AssertionError(
                    f"[world {world}, rank {rank}] {scenario.__name__}: {e}"
                ) from e
            dist.barrier()
    finally:
        dist.destroy_process_group()
