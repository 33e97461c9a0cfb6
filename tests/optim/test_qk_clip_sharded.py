"""QK-Clip on sharded weights equals single-process QK-Clip: FSDP2, DDP, tensor-parallel heads.

Worlds of 2 and 3 CPU ranks (gloo) are spawned from pytest, each running every scenario in one
process group (startup dominates the cost), as tests/optim/test_distributed.py does:

* ``fsdp2``: ``fully_shard`` training with Muon + QKClip (two micro-batches per step) of a model
  with an MQA attention (one key head shared by all query heads, biases), an MLA attention and
  a GQA attention with QK-Norm (a shared q gain, per-key-head k gains): 25 and 5 rows are
  uneven on 2 and 3 ranks, 20 on 3, the (2, 6) k gain leaves a rank empty on 3, and heads
  straddle shard boundaries. Parameters, statistics and clip decisions equal the
  single-process run to float32 rounding; registering before ``fully_shard`` warns.
  A ``torch.distributed.checkpoint`` save at step 2 (model, optimizer and the QKClip as a
  ``Stateful``) resumes bit-identically.
* ``ddp``: the same model under ``DistributedDataParallel`` (plain replicated parameters).
* ``tp``: q/k/v projections ``ColwiseParallel`` and the output ``RowwiseParallel`` over a
  ``(dp=1, tp=world)`` mesh, with biases and shared QK-Norm gains; ``record`` sees each rank's
  heads, ``process_group`` is the data-parallel group; equal to single-process training.
  Megatron-style plain local weights clip as the DTensors do.
* ``layouts``: every supported placement on 1-D and 2-D meshes clips the right rows; plain
  replicas reduce with MAX; unsupported placements and misuse raise, naming the parameter and
  the placement.

A 4-rank world (skipped below 4 cores) checks FSDP2 over tensor parallelism on a 2×2 mesh.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.testing import assert_close

from optim import Muon, QKClip, muon_param_groups

from .gloo import run_scenarios, train_on_rank_slices
from .test_distributed import TRAIN_TOL, _full_state, _nullcontext
from .toy_attention import ToyAttention, ToyMLA

V, DIM, BATCH, MICRO, STEPS = 13, 16, 6, 2, 4
TAU = 3.0  # between the boosted heads' max-logits and the others'


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, DIM)
        self.attn = nn.ModuleList(
            [
                # MQA, odd head_dim (no RoPE): q rows 25, k rows 5, biases
                ToyAttention(DIM, 5, 1, head_dim=5, bias=True, use_rope=False),
                # MLA: q rows 5·(2+2) = 20, kv_b rows 5·(2+3) = 25
                ToyMLA(DIM, num_heads=5, nope_dim=2, rope_dim=2, v_dim=3, kv_rank=6),
                # GQA + QK-Norm: q gain (6,) shared, k gains (2, 6) per key head
                ToyAttention(DIM, 4, 2, head_dim=6, q_norm="shared", k_norm="per_head"),
            ]
        )
        self.head = nn.Linear(DIM, V, bias=False)
        with torch.no_grad():  # a few heads far above τ, the others below
            self.attn[0].q_proj.weight.view(5, 5, DIM)[[1, 3]] *= 6.0
            self.attn[1].q_proj.weight.view(5, 4, DIM)[2] *= 6.0
            self.attn[2].k_norm[1] *= 4.0
        # softmax is blind to a key bias (it adds q·b_k to a whole row of logits): its gradient
        # is rounding noise, which AdamW would blow up into rank-dependent updates
        self.attn[0].k_proj.bias.requires_grad_(False)

    def register(self, qk: QKClip) -> None:
        for i, a in enumerate(self.attn):
            a.register(qk, f"layer{i}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        for a in self.attn:
            h = h + a(h)
        return self.head(h)


def _data(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + micro)
    x = torch.randint(0, V, (BATCH, 7), generator=gen)
    return x, torch.roll(x, 1, 1)


def _train(model, opt, steps, world, rank, before_micro=None) -> None:
    """Gradient accumulation over MICRO micro-batches; this rank's slice of each batch."""

    def loss(x, y, step):
        return nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())

    train_on_rank_slices(
        opt, steps, world, rank, _data, loss, batch=BATCH, micro=MICRO, before_micro=before_micro
    )


def _setup(shard=None, **qk_kw) -> tuple[_Model, Muon, QKClip]:
    torch.manual_seed(0)
    model = _Model()
    if shard is not None:
        shard(model)
    opt = Muon(muon_param_groups(model), lr=0.05, adamw_lr=2e-2)
    qk = QKClip(tau=TAU, alpha=0.4, **qk_kw)
    model.register(qk)  # after sharding: fully_shard replaces the parameters
    qk.attach(opt)
    return model, opt, qk


def _reference(steps: int) -> tuple[dict[str, torch.Tensor], dict, list]:
    model, opt, qk = _setup(distributed=False)
    seen = []
    for s in range(steps):
        _train(model, opt, [s], 1, 0)
        seen.append(qk.last_stats())
    return _full_state(model), qk.last_stats(), seen


def _check_stats(got: dict, want: dict) -> None:
    for n in want:
        assert torch.equal(got[n]["clipped"], want[n]["clipped"]), n
        assert_close(got[n]["max_logits"], want[n]["max_logits"], rtol=1e-5, atol=1e-6)
        assert_close(got[n]["gamma"], want[n]["gamma"], rtol=1e-5, atol=1e-6)


# ---- scenario: FSDP2 + DCP -------------------------------------------------------------------


def _fsdp2(mesh):
    from torch.distributed.fsdp import fully_shard

    def shard(model: _Model) -> None:
        for m in (model.emb, *model.attn, model.head):
            fully_shard(m, mesh=mesh)
        fully_shard(model, mesh=mesh)

    return _setup(shard)


def _scenario_fsdp2(rank: int, world: int, tmp: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.tensor import DTensor, init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    ref, ref_last, ref_seen = _reference(STEPS)
    # the clip acts on some heads of every layer and leaves others alone
    assert all(any(d[n]["clipped"].any() for d in ref_seen) for n in ref_seen[0]), ref_seen
    assert not all(d[n]["clipped"].all() for d in ref_seen for n in d)

    model, opt, qk = _fsdp2(mesh)
    assert isinstance(model.attn[0].q_proj.weight, DTensor)
    # registered before fully_shard replaced the parameters: attach warns
    stale, _, _ = _setup()
    early = QKClip()
    stale.register(early)
    with pytest.warns(UserWarning, match=r"layer0.*Register after sharding"):
        early.attach(opt)
    early.detach()

    def sync(micro: int) -> None:  # reduce-scatter once per step, after the last micro-batch
        model.set_requires_gradient_sync(micro == MICRO - 1)

    for s in range(STEPS):
        _train(model, opt, [s], world, rank, sync)
        _check_stats(qk.last_stats(), ref_seen[s])
        if s == 1:
            msd, osd = get_state_dict(model, opt)
            dcp.save({"model": msd, "optim": osd, "qk": qk}, checkpoint_id=f"{tmp}/ckpt")
    got = _full_state(model)
    for k in ref:
        assert_close(got[k], ref[k], **TRAIN_TOL, msg=lambda m, k=k: f"{k}: {m}")
    assert qk.num_clips == STEPS

    # resume: fresh model, optimizer and QKClip (registered), load, then attach
    model2, opt2, qk2 = _fsdp2(mesh)
    qk2.detach()
    qk2.tau = 99.0
    msd2, osd2 = get_state_dict(model2, opt2)
    state = {"model": msd2, "optim": osd2, "qk": qk2}
    dcp.load(state, checkpoint_id=f"{tmp}/ckpt")
    set_state_dict(model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    assert (qk2.tau, qk2.alpha, qk2.num_clips) == (TAU, 0.4, 2)
    _check_stats(qk2.last_stats(), ref_seen[1])
    qk2.attach(opt2)

    def sync2(micro: int) -> None:
        model2.set_requires_gradient_sync(micro == MICRO - 1)

    _train(model2, opt2, range(2, STEPS), world, rank, sync2)
    resumed = _full_state(model2)
    for k in got:
        assert_close(resumed[k], got[k], rtol=0, atol=0, msg=lambda m, k=k: f"resume {k}: {m}")
    assert qk2.num_clips == STEPS
    _check_stats(qk2.last_stats(), qk.last_stats())


# ---- scenario: DDP ---------------------------------------------------------------------------


def _scenario_ddp(rank: int, world: int, tmp: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    ref, ref_last, _ = _reference(STEPS)
    model, opt, qk = _setup()
    ddp = DDP(model)
    per = BATCH // world
    for step in range(STEPS):
        for micro in range(MICRO):
            x, y = _data(step, micro)
            x, y = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
            with ddp.no_sync() if micro < MICRO - 1 else _nullcontext():
                loss = nn.functional.cross_entropy(ddp(x).flatten(0, 1), y.flatten()) / MICRO
                loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    got = model.state_dict()
    for k in ref:
        assert_close(got[k], ref[k], **TRAIN_TOL, msg=lambda m, k=k: f"{k}: {m}")
    _check_stats(qk.last_stats(), ref_last)
    del ddp, opt
    gc.collect()


# ---- scenario: tensor-parallel heads ---------------------------------------------------------


class _TPModel(nn.Module):
    def __init__(self, world: int) -> None:
        super().__init__()
        H, Hkv = 2 * world, world  # GQA, heads split evenly over the tp ranks
        self.emb = nn.Embedding(V, DIM)
        self.attn = nn.ModuleList(
            [
                ToyAttention(DIM, H, Hkv, head_dim=4, bias=True),
                ToyAttention(DIM, H, H, head_dim=4, q_norm="shared", k_norm="shared"),
            ]
        )
        self.head = nn.Linear(DIM, V, bias=False)
        for a in self.attn:  # replicated gains would need a TP-aware gradient all-reduce
            for g in (a.q_norm, a.k_norm):
                if g is not None:
                    g.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        for a in self.attn:
            h = h + a(h)
        return self.head(h)


def _tp_run(tp: int, mesh=None, fsdp: bool = False) -> tuple[_TPModel, QKClip]:
    """Train ``_TPModel`` single-process, or tensor parallel over ``mesh["tp"]`` (and FSDP2 over
    ``mesh["dp"]`` when ``fsdp``), with QK-Clip; data split over the dp ranks."""
    torch.manual_seed(0)
    model = _TPModel(tp)
    kw: dict = {"distributed": False}
    dp, dp_rank = 1, 0
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            RowwiseParallel,
            parallelize_module,
        )

        plan = {n: ColwiseParallel() for n in ("q_proj", "k_proj", "v_proj")}
        for a in model.attn:
            parallelize_module(a, mesh["tp"], {**plan, "o_proj": RowwiseParallel()})
        if fsdp:
            for a in model.attn:
                fully_shard(a, mesh=mesh["dp"])
            fully_shard(model, mesh=mesh["dp"])
        kw = {"process_group": mesh["dp"]}
        dp, dp_rank = mesh["dp"].size(), mesh.get_coordinate()[0]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    qk = QKClip(tau=1.2, **kw)
    for i, a in enumerate(model.attn):
        a.register(qk, f"layer{i}", **({} if mesh is None else {"tp_group": mesh["tp"]}))
    qk.attach(opt)
    for s in range(STEPS):  # the tp ranks of a dp rank see the same tokens
        _train(model, opt, [s], dp, dp_rank)
    return model, qk


def _scenario_fsdp2_tp(rank: int, world: int, tmp: str) -> None:
    """FSDP2 over tensor parallelism on a 2×2 mesh: q/k weights are (_StridedShard, Shard)."""
    from torch.distributed.tensor import init_device_mesh

    ref_model, ref_qk = _tp_run(2)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model, qk = _tp_run(2, mesh, fsdp=True)
    assert "StridedShard" in repr(model.attn[0].q_proj.weight.placements[0])
    ref, got = _full_state(ref_model), _full_state(model)
    for k in ref:
        assert_close(got[k], ref[k], **TRAIN_TOL, msg=lambda m, k=k: f"{k}: {m}")
    _check_stats(qk.last_stats(), ref_qk.last_stats())


def _scenario_tp(rank: int, world: int, tmp: str) -> None:
    from torch.distributed.tensor import init_device_mesh

    ref_model, ref_qk = _tp_run(world)
    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "tp"))
    model, qk = _tp_run(world, mesh)
    assert model.attn[0].q_proj.weight.placements[0].is_shard(0)
    ref, got = _full_state(ref_model), _full_state(model)
    for k in ref:
        assert_close(got[k], ref[k], **TRAIN_TOL, msg=lambda m, k=k: f"{k}: {m}")
    # every rank ends with every head's statistic (reduced over dp, then tp)
    _check_stats(qk.last_stats(), ref_qk.last_stats())
    assert any(d["clipped"].any() for d in ref_qk.last_stats().values())

    # Megatron-style plain local weights (this rank's heads only) clip as the DTensors do
    a, H, Hkv, Hl = model.attn[0], 2 * world, world, 2
    wq, wk, bq = (t.to_local().detach().clone() for t in (a.q_proj.weight, a.k_proj.weight,
                                                          a.q_proj.bias))  # fmt: skip
    plain, dt = QKClip(tau=1.5, process_group=mesh["dp"]), QKClip(tau=1.5, process_group=mesh["dp"])
    plain.add_attention("p", wq, wk, H, 4, Hkv, q_bias=bq, tp_group=mesh["tp"])
    dt.add_attention("p", a.q_proj.weight, a.k_proj.weight, H, 4, Hkv, q_bias=a.q_proj.bias,
                     tp_group=mesh["tp"])  # fmt: skip
    local = torch.tensor([1.0, 2.0]) * (rank + 1)  # this rank's heads' maxima
    for c in (plain, dt):
        c.record_max_logits("p", local)
    s_plain, s_dt = plain.clip_()["p"], dt.clip_()["p"]
    want = torch.tensor([[1.0, 2.0]]) * torch.arange(1, world + 1.0)[:, None]
    assert s_plain["max_logits"].tolist() == want.flatten().tolist()  # all heads, every rank
    assert torch.equal(s_plain["gamma"], s_dt["gamma"]) and Hl * world == H
    assert torch.equal(wq, a.q_proj.weight.to_local())
    assert torch.equal(bq, a.q_proj.bias.to_local())
    assert torch.equal(wk, a.k_proj.weight.to_local())


# ---- scenario: layouts, replicas and refusals ------------------------------------------------


def _scenario_layouts(rank: int, world: int, tmp: str) -> None:
    from torch.distributed.tensor import (
        DTensor,
        Partial,
        Replicate,
        Shard,
        distribute_tensor,
        init_device_mesh,
    )
    from torch.distributed.tensor.placement_types import _StridedShard

    mesh = init_device_mesh("cpu", (world,))
    gen = torch.Generator().manual_seed(0)
    wq, wk = torch.randn(8, 5, generator=gen), torch.randn(8, 5, generator=gen)
    k = nn.Parameter(distribute_tensor(wk.clone(), mesh, [Replicate()], src_data_rank=None))
    for pl in (Partial(), Partial("max")):
        local = DTensor.from_local(
            wq.clone(), mesh, [pl], run_check=False, shape=wq.shape, stride=wq.stride()
        )  # only the placement matters: it is refused before the local shard is read
        q = nn.Parameter(local)
        with pytest.raises(ValueError, match=r"attn\.q_weight.*placement"):
            QKClip().add_attention("attn", q, k, 2, 4)
    # every supported layout, on 1-D and 2-D meshes: 9-row weights, q = rows 1..8, k = rows
    # 0..7, so head boundaries fall inside shards; 5 columns: Shard(1) is uneven too
    mesh2 = init_device_mesh("cpu", (1, world))
    layouts = [
        (mesh, [Shard(1)], [Replicate()]),
        (mesh, [Shard(0)], [Shard(0)]),
        (mesh2, [Shard(0), Shard(0)], [Replicate(), Shard(0)]),
        (mesh2, [Replicate(), Shard(1)], [Shard(0), Replicate()]),
        # strided rows (FSDP2 over tensor parallelism declares _StridedShard on its dp dim)
        (mesh, [_StridedShard(0, split_factor=2)], [_StridedShard(1, split_factor=2)]),
        (mesh2, [_StridedShard(0, split_factor=2), Shard(0)], [Shard(1), Shard(0)]),
    ]
    wq9, wk9 = torch.randn(9, 5, generator=gen), torch.randn(9, 5, generator=gen)
    for m, pq, pk in layouts:
        q = nn.Parameter(distribute_tensor(wq9.clone(), m, pq, src_data_rank=None))
        k9 = nn.Parameter(distribute_tensor(wk9.clone(), m, pk, src_data_rank=None))
        qk = QKClip(tau=1.0)
        qk.add_attention("a", q, k9, 2, 4, q_rows=slice(1, 9), k_rows=slice(0, 8))
        qk.record_max_logits("a", torch.tensor([4.0, 0.5]) if rank == 0 else torch.zeros(2))
        assert qk.clip_()["a"]["clipped"].tolist() == [True, False]
        want_q, want_k = wq9.clone(), wk9.clone()
        want_q[1:5] *= 0.5  # head 0: γ = 1/4, α = 1/2
        want_k[0:4] *= 0.5
        msg = f"{pq} / {pk}"
        assert_close(q.full_tensor(), want_q, rtol=1e-7, atol=0, msg=msg)
        assert_close(k9.full_tensor(), want_k, rtol=1e-7, atol=0, msg=msg)
    # plain replicas (DDP): each rank saw a different max; all end with the MAX and clip alike
    torch.manual_seed(0)
    lin_q, lin_k = nn.Linear(4, 8, bias=False), nn.Linear(4, 8, bias=False)
    w0 = lin_q.weight.detach().clone()
    qk = QKClip(tau=5.0)
    qk.add_attention("a", lin_q.weight, lin_k.weight, 2, 4)
    qk.record_max_logits("a", torch.tensor([[10.0, 1.0], [2.0, 20.0], [3.0, 3.0]][rank]))
    assert qk.clip_()["a"]["max_logits"].tolist() == [10.0, 20.0]
    assert_close(lin_q.weight[:4], w0[:4] * (5 / 10) ** 0.5)
    assert_close(lin_q.weight[4:], w0[4:] * (5 / 20) ** 0.5)
    everyone = [torch.empty_like(w0) for _ in range(world)]
    dist.all_gather(everyone, lin_q.weight.detach())
    assert all(torch.equal(w, everyone[0]) for w in everyone)
    # DTensors without the reduction: refused, not clipped rank by rank
    qk = QKClip(distributed=False)
    qk.add_attention("attn", q, k9, 2, 4, q_rows=slice(1, 9), k_rows=slice(0, 8))
    with pytest.raises(RuntimeError, match="MAX all-reduce"):
        qk.clip_()
    # per-rank statistics are not checkpointed silently
    qk = QKClip()
    qk.add_attention("attn", nn.Parameter(wq.clone()), nn.Parameter(wk.clone()), 2, 4)
    qk.record_max_logits("attn", torch.tensor([1.0, float(rank)]))
    with pytest.raises(RuntimeError, match="reduce_"):
        qk.state_dict()
    qk.reduce_()
    assert qk.state_dict()["stats"]["attn"].tolist() == [1.0, float(world - 1)]
    with pytest.raises(ValueError, match="tensor-parallel size"):
        QKClip().add_attention("t", wq, wk, 5, 4, tp_group=mesh)


# ---- the spawned worlds ----------------------------------------------------------------------


def _entry(rank: int, world: int, tmp: str, scenarios: tuple = ()) -> None:
    default = (_scenario_layouts, _scenario_fsdp2, _scenario_ddp, _scenario_tp)
    run_scenarios(rank, world, tmp, scenarios or default)


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 3])
def test_qk_clip_sharded_equals_single_process(world: int, tmp_path) -> None:
    mp.spawn(_entry, args=(world, str(tmp_path)), nprocs=world, join=True)


@pytest.mark.distributed
@pytest.mark.skipif((os.cpu_count() or 1) < 4, reason="4 ranks: too slow on CI's 2 cores")
def test_qk_clip_fsdp2_over_tensor_parallel(tmp_path) -> None:
    mp.spawn(_entry, args=(4, str(tmp_path), (_scenario_fsdp2_tp,)), nprocs=4, join=True)
