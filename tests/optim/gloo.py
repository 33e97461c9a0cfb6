"""Spawned gloo worlds for the distributed tests: one process group, several scenarios."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

Scenario = Callable[[int, int, str], None]
Batch = tuple[torch.Tensor, torch.Tensor]


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


def train_on_rank_slices(
    opt: torch.optim.Optimizer,
    steps: Iterable[int],
    world: int,
    rank: int,
    data: Callable[[int, int], Batch],
    loss: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
    *,
    batch: int,
    micro: int,
    before_micro: Callable[[int], None] | None = None,
) -> None:
    """Optimizer steps with gradient accumulation over ``micro`` micro-batches.

    ``data(step, m)`` gives the whole micro-batch ``(x, y)`` of ``batch`` rows; this rank trains
    on its slice of ``batch // world`` rows (world 1, rank 0: the single-process reference), with
    ``loss(x, y, step) / micro`` back-propagated; ``before_micro(m)`` runs first (e.g. to turn
    off gradient sync on all but the last micro-batch).
    """
    per = batch // world
    for step in steps:
        for m in range(micro):
            if before_micro is not None:
                before_micro(m)
            x, y = data(step, m)
            x, y = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
            (loss(x, y, step) / micro).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
