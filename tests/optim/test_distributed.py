"""Distributed Muon (optim/distributed.py) equals single-process Muon.

The contract: FSDP2 (DTensor ``Shard``) and DDP (replicated parameters) runs give the same
parameters as single-process :class:`optim.Muon`. Worlds of 2 and 3 CPU ranks (gloo) are spawned
from pytest, each running every scenario in one process group (startup dominates the cost):

* ``optimizer``: the optimizer alone, fed identical gradients, over awkward placements — rows
  not divisible by the world size (uneven and empty shards), ``Shard(1)``, a tall matrix, a conv
  weight (flatten view), 3-D expert stacks sharded on the expert dim (no communication) and on a
  matrix dim, ``Replicate`` DTensors and plain DDP-style parameters, zero-size parameters,
  ``grad=None`` on one step, and a few update configurations (a per-step table among them).
* ``fsdp2``: ``fully_shard`` training with gradient accumulation (two micro-batches, Muon once
  per step), a branch unused on odd steps (``grad=None``), an embedding and biases on AdamW;
  then a ``torch.distributed.checkpoint`` save at step 2 and a resumed run.
* ``ddp``: the same training under ``DistributedDataParallel`` with ``Muon(process_group=True)``.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.testing import assert_close

from optim import Muon, muon_param_groups
from optim.distributed import assign_owners, resolve_process_group, shard_sizes

from .gloo import run_scenarios, train_on_rank_slices

# Tolerances. Optimizer alone: the owner orthogonalises exactly the single-process matrix in
# float32; only the batch composition of the batched matmuls differs, so agreement is at float32
# rounding (measured max |diff| 2.4e-7 on entries of size ~1, i.e. a few ulps). Training:
# gradients are averaged by a reduce-scatter / all-reduce instead of one mean over the batch
# (float32 summation order); measured max |diff| 2.2e-7 after 4 steps. 2e-6 leaves a 10× margin
# and still catches a wrong shard, owner, scale or a per-micro-batch step (those are O(1e-2)
# at lr 0.02).
OPT_TOL = dict(rtol=1e-6, atol=1e-6)
TRAIN_TOL = dict(rtol=2e-6, atol=2e-6)


# --------------------------------------------------------------------------------------------
# Single-process unit tests of the pure helpers
# --------------------------------------------------------------------------------------------


@given(size=st.integers(0, 40), world=st.integers(1, 9))
def test_shard_sizes_match_torch_chunk_rule(size: int, world: int) -> None:
    sizes = shard_sizes(size, world)
    chunks = [c.shape[0] for c in torch.arange(size).chunk(world)] if size else []
    assert sizes[: len(chunks)] == chunks
    assert sum(sizes) == size and len(sizes) == world and all(s >= 0 for s in sizes)


@given(costs=st.lists(st.integers(0, 1000), max_size=40), world=st.integers(1, 6))
def test_assign_owners_balanced(costs: list[int], world: int) -> None:
    owners = assign_owners(costs, world)
    assert len(owners) == len(costs) and all(0 <= o < world for o in owners)
    loads = [sum(c for c, o in zip(costs, owners, strict=True) if o == r) for r in range(world)]
    # Graham's list-scheduling bound (any greedy order): makespan ≤ mean + (1 − 1/W)·largest
    largest = max(costs, default=0)
    assert max(loads) <= sum(costs) / world + (1 - 1 / world) * largest + 1e-9
    if len(costs) <= 7 and world <= 3:
        # LPT: makespan ≤ (4/3 − 1/(3W))·OPT, OPT by brute force over all assignments
        opt = min(
            max(sum(c for c, o in zip(costs, assign, strict=True) if o == r) for r in range(world))
            for assign in itertools.product(range(world), repeat=len(costs))
        )
        assert max(loads) <= (4 / 3 - 1 / (3 * world)) * opt + 1e-9


@given(count=st.integers(0, 30), world=st.integers(1, 6))
def test_assign_owners_equal_costs_round_robin(count: int, world: int) -> None:
    owners = assign_owners([7.0] * count, world)
    counts = [owners.count(r) for r in range(world)]
    assert max(counts) - min(counts) <= 1


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="world_size"):
        shard_sizes(3, 0)
    with pytest.raises(ValueError, match="world_size"):
        assign_owners([1.0], 0)
    if not dist.is_initialized():
        with pytest.raises(ValueError, match="process_group"):
            resolve_process_group(True)
        with pytest.raises(ValueError, match="process_group"):
            Muon([nn.Parameter(torch.randn(3, 3))], process_group=True)
    assert resolve_process_group(None) is None


def test_single_process_unchanged() -> None:
    """No DTensor, no process group: lazy state, the single-process path."""
    p = nn.Parameter(torch.randn(4, 3))
    opt = Muon([p], lr=0.02)
    assert opt._strategy.kind == "local" and not opt.state
    p.grad = torch.randn(4, 3)
    opt.step()
    assert set(opt.state[p]) == {"momentum_buffer"}


# --------------------------------------------------------------------------------------------
# Spawned worlds
# --------------------------------------------------------------------------------------------


def _entry(rank: int, world: int, tmp: str) -> None:
    run_scenarios(rank, world, tmp, (_scenario_optimizer, _scenario_fsdp2, _scenario_ddp))


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 3])
def test_distributed_equals_single_process(world: int, tmp_path) -> None:
    mp.spawn(_entry, args=(world, str(tmp_path)), nprocs=world, join=True)


# ---- scenario: the optimizer alone ----------------------------------------------------------


def _placements():
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    # (global shape, placement or None for a plain DDP-style parameter)
    return [
        ((6, 4), Shard(0)),
        ((6, 4), Shard(0)),
        ((5, 7), Shard(0)),  # uneven rows
        ((2, 9), Shard(0)),  # an empty shard on 3 ranks
        ((9, 2), Shard(0)),  # tall: transposed into the 2×9 bucket
        ((7, 5), Shard(1)),
        ((5, 3, 2, 2), Shard(0)),  # conv weight, flattened to 5×12
        ((3, 4, 6), Shard(0)),  # experts sharded on the expert dim: local
        ((2, 5, 3), Shard(0)),  # ... with an empty shard on 3 ranks
        ((3, 5, 4), Shard(1)),  # experts sharded on a matrix dim
        ((6, 4), Replicate()),
        ((4, 6), None),
        ((8, 3), None),
        ((0, 5), Shard(0)),  # empty matrix
        ((5, 0), Shard(0)),  # zero-size dimensions: skipped (r(A, B) would divide by 0)
        ((4, 0), None),
        ((8, 3), _StridedShard(0, split_factor=2)),  # the full_tensor() fallback
    ]


CONFIGS = [
    dict(lr=0.02, weight_decay=0.1),
    dict(lr=0.05, weight_decay=0.0, ns_coefficients=(3.4445, -4.7750, 2.0315), nesterov=False),
    dict(lr=torch.tensor(0.03), update="mclip", adjust_lr_fn="match_rms_adamw"),
    # a per-step table (ns_steps resolved to its length)
    dict(lr=0.02, ns_coefficients=[(3.4445, -4.7750, 2.0315)] * 3 + [(1.875, -1.25, 0.375)]),
]


def _shard(t: torch.Tensor, mesh, placement):
    from torch.distributed.tensor import distribute_tensor

    # src_data_rank=None: every rank slices its own copy (all ranks hold the same t), no comm
    return distribute_tensor(t, mesh, [placement], src_data_rank=None)


def _scenario_optimizer(rank: int, world: int, tmp: str) -> None:
    from torch.distributed.tensor import Shard, init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    specs = _placements()
    for cfg in CONFIGS:
        gen = torch.Generator().manual_seed(0)
        full = [torch.randn(shape, generator=gen) for shape, _ in specs]
        bias = torch.randn(5, generator=gen)
        ref = [nn.Parameter(t.clone()) for t in full]
        ref_bias = nn.Parameter(bias.clone())
        mine = [
            nn.Parameter(t.clone() if pl is None else _shard(t.clone(), mesh, pl))
            for t, (_, pl) in zip(full, specs, strict=True)
        ]
        my_bias = nn.Parameter(_shard(bias.clone(), mesh, Shard(0)))
        opt_ref = Muon([{"params": ref}, {"params": [ref_bias], "use_muon": False}], **cfg)
        opt = Muon(
            [{"params": mine}, {"params": [my_bias], "use_muon": False}],
            process_group=True,
            **cfg,
        )
        assert len(opt.state) == len(mine) + 1  # eager state
        for step in range(3):
            grads = [torch.randn(shape, generator=gen) for shape, _ in specs]
            gb = torch.randn(5, generator=gen)
            for i, (p, q) in enumerate(zip(ref, mine, strict=True)):
                if step == 1 and i in (1, 5, 11):  # grad=None on this step
                    p.grad = q.grad = None
                    continue
                pl = specs[i][1]
                p.grad = grads[i].clone()
                q.grad = grads[i].clone() if pl is None else _shard(grads[i], mesh, pl)
            ref_bias.grad, my_bias.grad = gb.clone(), _shard(gb, mesh, Shard(0))
            opt_ref.step()
            if step == 0:
                _check_work_split(opt, world)
            else:
                opt.step()
            for i, (p, q) in enumerate(zip(ref, mine, strict=True)):
                got = q.full_tensor() if specs[i][1] is not None else q
                assert_close(got, p, **OPT_TOL, msg=lambda m, i=i: f"param {specs[i]}: {m}")
                buf = opt.state[q]["momentum_buffer"]
                got = buf.full_tensor() if specs[i][1] is not None else buf
                assert_close(got, opt_ref.state[p]["momentum_buffer"], **OPT_TOL)
            assert_close(my_bias.full_tensor(), ref_bias, **OPT_TOL)


def _check_work_split(opt: Muon, world: int) -> None:
    """Each matrix is orthogonalised once over all ranks (not once per rank), balanced."""
    counted = [0]
    strategy = opt._strategy
    assert strategy.kind == "sharded"

    def counting(X: torch.Tensor, group) -> torch.Tensor:
        counted[0] += X.shape[0] if X.numel() else 0
        return strategy.orthogonalize_fn(X, group)

    # the strategy's injected orthogonalisation, instrumented
    opt._strategy = dataclasses.replace(strategy, orthogonalize_fn=counting)
    try:
        opt.step()
    finally:
        opt._strategy = strategy
    counts = [None] * world
    dist.all_gather_object(counts, counted[0])
    # 18 matrices in _placements() (experts count per expert, the empty one 0), done once in
    # total; the _StridedShard fallback does its one matrix on every rank
    assert sum(counts) == 18 + world, counts
    assert max(counts) <= 18 // world + 4, counts  # split, not everything on every rank


# ---- training scenarios ---------------------------------------------------------------------


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 8)  # AdamW
        self.fc1 = nn.Linear(8, 10)  # 10 rows: 4/4/2 on 3 ranks
        self.fc2 = nn.Linear(10, 7)  # 7 rows: 4/3 and 3/3/1
        self.branch = nn.Linear(7, 2, bias=False)  # 1/1/0 on 3 ranks; unused on odd steps
        self.head = nn.Linear(7, 5)  # the last Linear: AdamW

    def forward(self, x: torch.Tensor, use_branch: bool) -> torch.Tensor:
        h = self.emb(x).mean(1)
        h = torch.tanh(self.fc1(h))
        h = torch.tanh(self.fc2(h))
        if use_branch:
            h = h + self.branch(h).sum(-1, keepdim=True)
        return self.head(h)


STEPS, MICRO, BATCH = 4, 2, 6


def _data(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + micro)
    return torch.randint(0, 11, (BATCH, 3), generator=gen), torch.randint(
        0, 5, (BATCH,), generator=gen
    )


def _train(model, opt, steps, world, rank, before_micro=None) -> None:
    """Gradient accumulation over MICRO micro-batches; this rank's slice of each batch."""

    def loss(x, y, step):
        return nn.functional.cross_entropy(model(x, step % 2 == 0), y)

    train_on_rank_slices(
        opt, steps, world, rank, _data, loss, batch=BATCH, micro=MICRO, before_micro=before_micro
    )


def _reference(steps: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = _Net()
    opt = Muon(muon_param_groups(model), lr=0.02, adamw_lr=1e-2)
    _train(model, opt, range(steps), 1, 0)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _fresh_fsdp2(mesh):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = _Net()
    for m in (model.emb, model.fc1, model.fc2, model.branch, model.head):
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, Muon(muon_param_groups(model), lr=0.02, adamw_lr=1e-2)


def _full_state(model) -> dict[str, torch.Tensor]:
    return {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
        for k, v in model.state_dict().items()
    }


def _scenario_fsdp2(rank: int, world: int, tmp: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.tensor import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    model, opt = _fresh_fsdp2(mesh)

    def sync(micro: int) -> None:  # reduce-scatter once per step, after the last micro-batch
        model.set_requires_gradient_sync(micro == MICRO - 1)

    _train(model, opt, range(2), world, rank, sync)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=f"{tmp}/ckpt")
    _train(model, opt, range(2, STEPS), world, rank, sync)
    got = _full_state(model)
    ref = _reference(STEPS)
    for k in ref:
        assert_close(got[k], ref[k], **TRAIN_TOL, msg=lambda m, k=k: f"{k}: {m}")

    # resume from the checkpoint in a fresh model and optimizer: identical continuation
    model2, opt2 = _fresh_fsdp2(mesh)
    msd2, osd2 = get_state_dict(model2, opt2)
    state = {"model": msd2, "optim": osd2}
    dcp.load(state, checkpoint_id=f"{tmp}/ckpt")
    set_state_dict(model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def sync2(micro: int) -> None:
        model2.set_requires_gradient_sync(micro == MICRO - 1)

    _train(model2, opt2, range(2, STEPS), world, rank, sync2)
    resumed = _full_state(model2)
    for k in got:
        assert_close(resumed[k], got[k], rtol=0, atol=0, msg=lambda m, k=k: f"resume {k}: {m}")


def _scenario_ddp(rank: int, world: int, tmp: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    net = _Net()
    ddp = DDP(net, find_unused_parameters=True)
    opt = Muon(muon_param_groups(net), lr=0.02, adamw_lr=1e-2, process_group=True)
    assert opt._strategy.kind == "replicated" and opt._strategy.process_group is dist.group.WORLD
    per = BATCH // world
    for step in range(STEPS):
        for micro in range(MICRO):
            x, y = _data(step, micro)
            x, y = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
            ctx = ddp.no_sync() if micro < MICRO - 1 else _nullcontext()
            with ctx:
                loss = nn.functional.cross_entropy(ddp(x, step % 2 == 0), y) / MICRO
                loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    ref = _reference(STEPS)
    got = net.state_dict()
    for k in ref:
        assert_close(got[k], ref[k], **TRAIN_TOL, msg=lambda m, k=k: f"{k}: {m}")
    # every rank holds the same parameters (the all-gathered results)
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    others = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(others, flat)
    for o in others:
        assert torch.equal(o, flat)
    # Free DDP's reducer (it holds gloo work and threads) before the process group goes: torn
    # down at interpreter exit instead, it aborted a rank about once in 15 runs ("terminate
    # called without an active exception").
    del ddp, opt
    gc.collect()


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
