r"""Distributed Muon: DTensor (FSDP2) and DDP parameters, the orthogonalisation split across ranks.

msign needs whole matrices, but under FSDP2 (``torch.distributed.fsdp.fully_shard``) every rank
holds a slice of every matrix, and under DDP every rank holds every matrix. Doing all the
Newton–Schulz work on every rank wastes ``world_size``-fold compute; this module splits it.

:class:`optim.Muon` picks a :class:`Strategy` once, in its constructor
(:func:`choose_strategy`): ``"local"`` (single process), ``"replicated"`` (DDP: plain parameters
and ``process_group``) or ``"sharded"`` (DTensor parameters, FSDP2). The process group is
resolved then, and the orthogonalisation is a function the strategy holds
(``orthogonalize_fn``), so the collectives below never depend on which Newton–Schulz runs.

Per step, for the Muon parameters of a param group (momentum and the update are elementwise, so
they run on the local shards exactly as in single-process :func:`optim.muon.muon`):

* **Sharded** DTensor (one ``Shard(d)`` placement over a mesh dimension of size ``W``, ``d`` a
  matrix dimension; other mesh dimensions ``Replicate``): matrices are bucketed by their wide
  shape ``s×L``. Each matrix gets an *owner* rank (longest-processing-time greedy on the cost
  ``k·L·s²``, identical on every rank). One ``all_to_all_single`` per bucket turns "every rank
  holds a slice of every matrix" into "every rank holds its own matrices whole"; the owner
  orthogonalises them in one batched call (``orthogonalize_fn``, Triton kernels on CUDA) and a
  reverse ``all_to_all_single`` returns the slices. Shards may be uneven or empty
  (``torch.chunk`` sizes, as DTensor and FSDP2 use): split sizes are exact, nothing is padded.
* **Replicated** (plain parameters with ``Muon(..., process_group=...)`` under DDP, or
  ``Replicate()`` DTensors): the owner orthogonalises its matrices and one ``all_gather`` per
  bucket hands every rank all results (padded to the largest per-rank count of the bucket).
* **Local**: 3-D expert weights sharded on the expert (batch) dimension hold whole matrices, so
  each rank orthogonalises its own experts with no communication; plain parameters without a
  process group are single-process Muon.
* Anything else (``_StridedShard``, two sharded dimensions, ``Partial``) falls back to
  ``full_tensor()``, the whole orthogonalisation on every rank, and a local re-slice.

Communication is in the iteration's compute dtype (``ns_dtype``; bf16 on CUDA, float32 on CPU)
and is asynchronous: bucket ``k+1``'s all-to-all is in flight while bucket ``k`` is
orthogonalised, and unsharded work runs while the first all-to-all travels.

**Result equality.** With float32 iteration (CPU, or ``ns_dtype=torch.float32``) the result equals
single-process :class:`optim.Muon` given the same gradients, up to float32 rounding of the batched
matmuls: the owner sees the exact same matrix. With bf16 communication the matrix is rounded to bf16
*before* the Frobenius normalisation rather than after (≤ 1 bf16 ulp per entry).

**Requirements.** Every rank of a group must present the same Muon parameters with gradients
(true under FSDP2 and DDP, which make gradients and their ``None``-ness rank-symmetric); a
rank-asymmetric set would deadlock the collectives. State is created eagerly (at construction)
and has the parameters' placements, so ``torch.distributed.checkpoint`` saves and loads it.
"""

from __future__ import annotations

import heapq
import inspect
import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from ._math import (
    MUON_KEYS,
    adjust_lr_ratio,
    apply_,
    drop_empty,
    iteration_dtype_of,
    matrix_shape,
    momentum_inputs,
    orthogonalize,
    to_scalar,
    weight_decay_,
)

__all__ = [
    "Strategy",
    "assign_owners",
    "choose_strategy",
    "distributed_muon",
    "init_state",
    "resolve_process_group",
    "shard_sizes",
]


def _is_dtensor(t: object) -> bool:
    # torch.distributed.tensor is imported by anything that creates a DTensor; if it is not
    # loaded, no DTensor exists and we avoid importing it.
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


# --------------------------------------------------------------------------------------------
# Small pure helpers (tested on one process)
# --------------------------------------------------------------------------------------------


def shard_sizes(size: int, world_size: int) -> list[int]:
    """Sizes of the ``world_size`` pieces of a dimension of ``size`` (``torch.chunk`` rule).

    DTensor's ``Shard`` and FSDP2 split a dimension into chunks of ``ceil(size / world_size)``;
    trailing ranks get a smaller or an empty piece (e.g. 4 over 3 ranks: ``[2, 2, 0]``).
    """
    if world_size < 1:
        raise ValueError(f"`world_size` must be >= 1, got {world_size}")
    if size < 0:
        raise ValueError(f"`size` must be >= 0, got {size}")
    chunk = -(-size // world_size)
    return [max(0, min(size, (r + 1) * chunk) - r * chunk) for r in range(world_size)]


def assign_owners(costs: Sequence[float], world_size: int) -> list[int]:
    """Owner rank of each item: longest-processing-time greedy on ``costs``.

    Items are taken in decreasing cost (ties: original order) and each goes to the currently
    least-loaded rank (ties: the lowest rank). The result depends only on ``costs`` and
    ``world_size``, so every rank computes the same assignment without communicating. The
    largest load is at most ``4/3`` of the optimum (Graham's bound), and equal costs are dealt
    round-robin (per-rank counts differ by at most one).

    Parameters
    ----------
    costs : sequence of float
        Non-negative cost per item (Muon uses ``k·max(n, m)·min(n, m)²``).
    world_size : int
        Number of ranks.

    Returns
    -------
    list of int
        ``owners[i]`` in ``range(world_size)``.
    """
    if world_size < 1:
        raise ValueError(f"`world_size` must be >= 1, got {world_size}")
    order = sorted(range(len(costs)), key=lambda i: -costs[i])
    heap = [(0.0, r) for r in range(world_size)]
    owners = [0] * len(costs)
    for i in order:
        load, r = heapq.heappop(heap)
        owners[i] = r
        heapq.heappush(heap, (load + float(costs[i]), r))
    return owners


def resolve_process_group(process_group: Any) -> Any:
    """``None``/``False`` → None; ``True`` → the default group; a 1-D DeviceMesh → its group."""
    if process_group is None or process_group is False:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "`process_group` needs torch.distributed to be initialised "
            "(torch.distributed.init_process_group) before the optimizer is built"
        )
    if process_group is True:
        return dist.group.WORLD
    if isinstance(process_group, dist.ProcessGroup):
        return process_group
    mesh_mod = sys.modules.get("torch.distributed.device_mesh")
    if mesh_mod is not None and isinstance(process_group, mesh_mod.DeviceMesh):
        if process_group.ndim != 1:
            raise ValueError(
                f"`process_group` as a DeviceMesh must be 1-D, got {process_group.ndim}-D"
            )
        return process_group.get_group()
    raise TypeError(
        "`process_group` must be None, True (the default group), a ProcessGroup or a 1-D "
        f"DeviceMesh, got {type(process_group).__name__}"
    )


def init_state(optimizer: Any) -> None:
    """Create every parameter's optimizer state now (zeros), the same on every rank.

    Lazy state (created at a parameter's first gradient) can differ between ranks and is absent
    before the first step, which ``torch.distributed.checkpoint`` cannot load into. This runs
    the optimizer's own ``_init_group`` with temporary zero gradients, so the state layout is
    exactly the single-process one (DTensor state for DTensor parameters).
    """
    n_lists = len(inspect.signature(optimizer._init_group).parameters) - 1
    for group in optimizer.param_groups:
        temporary = []
        for p in group["params"]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
                temporary.append(p)
        try:
            optimizer._init_group(group, *([] for _ in range(n_lists)))
        finally:
            for p in temporary:
                p.grad = None


# --------------------------------------------------------------------------------------------
# The strategy, chosen once by optim.Muon.__init__
# --------------------------------------------------------------------------------------------

Kind = Literal["local", "replicated", "sharded"]


@dataclass(frozen=True)
class Strategy:
    """How a Muon optimizer's matrices reach an orthogonaliser; chosen once, at construction.

    Attributes
    ----------
    kind : {"local", "replicated", "sharded"}
        ``"local"``: single process (:func:`optim.muon.muon`). ``"replicated"``: plain
        parameters replicated over ``process_group`` (DDP): each rank orthogonalises its share,
        one all-gather per bucket. ``"sharded"``: DTensor parameters (FSDP2), each on its own
        mesh (all-to-all per bucket; see the module docstring); plain parameters as under
        ``"replicated"`` when ``process_group`` is set, else local.
    process_group : ProcessGroup or None
        The group plain parameters are replicated over (resolved once, see
        :func:`resolve_process_group`).
    orthogonalize_fn : callable
        ``(X (B, n, m), group) -> O``, the orthogonalisation every rank runs on its matrices
        (default :func:`optim._math.orthogonalize`); injected, so a caller may swap the
        Newton–Schulz implementation or instrument it.
    """

    kind: Kind = "local"
    process_group: Any = None
    orthogonalize_fn: Callable[[Tensor, Mapping[str, Any]], Tensor] = orthogonalize

    @property
    def distributed(self) -> bool:
        """Whether steps go through :func:`distributed_muon` (state is then created eagerly)."""
        return self.kind != "local"

    def step(
        self,
        group: Mapping[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        momentum_bufs: list[Tensor],
    ) -> None:
        """One param group's Muon parameters through :func:`distributed_muon`.

        For the distributed kinds; :class:`optim.Muon` calls :func:`optim.muon.muon` itself
        under ``"local"``.
        """
        distributed_muon(
            params,
            grads,
            momentum_bufs,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            nesterov=group["nesterov"],
            adjust_lr_fn=group["adjust_lr_fn"],
            group={k: group[k] for k in MUON_KEYS},
            process_group=self.process_group,
            orthogonalize_fn=self.orthogonalize_fn,
        )


def choose_strategy(params: Iterable[Tensor], process_group: Any) -> Strategy:
    """The :class:`Strategy` for these parameters and ``Muon(process_group=...)``.

    ``"sharded"`` if any parameter is a DTensor, else ``"replicated"`` if a process group is
    given (``True``: the default group), else ``"local"``. Raises as
    :func:`resolve_process_group` does.
    """
    pg = resolve_process_group(process_group)
    if any(_is_dtensor(p) for p in params):
        return Strategy("sharded", pg)
    if pg is not None:
        return Strategy("replicated", pg)
    return Strategy("local")


# --------------------------------------------------------------------------------------------
# The plan: how each parameter's matrices reach an orthogonaliser
# --------------------------------------------------------------------------------------------


@dataclass
class _Item:
    index: int
    kind: str  # "local" | "sharded" | "replicated" | "fallback"
    shape: tuple[int, ...]  # global parameter shape
    k: int
    n: int
    m: int
    pg: Any = None
    shard_dim: int = 0
    sizes: list[int] = field(default_factory=list)  # shard sizes along shard_dim, per rank
    owner: int = -1

    @property
    def wide(self) -> tuple[int, int]:
        return min(self.n, self.m), max(self.n, self.m)

    @property
    def cost(self) -> float:
        s, L = self.wide
        return float(self.k) * L * s * s

    def piece_shape(self, rank: int) -> tuple[int, ...]:
        shape = list(self.shape)
        shape[self.shard_dim] = self.sizes[rank]
        return tuple(shape)

    def piece_numel(self, rank: int) -> int:
        return math.prod(self.piece_shape(rank))

    def to_wide(self, full: Tensor) -> Tensor:
        X = full.reshape(self.k, self.n, self.m)
        return X.mT if self.n > self.m else X

    def from_wide(self, O: Tensor) -> Tensor:
        return (O.mT if self.n > self.m else O).reshape(self.shape)


def _flattens(ndim: int, view: str) -> bool:
    return ndim >= 3 and (view == "flatten" or (view == "auto" and ndim >= 4))


def _classify(index: int, p: Tensor, view: str, pg: Any) -> _Item:
    k, n, m = matrix_shape(p.shape, view)
    item = _Item(index, "local", tuple(p.shape), k, n, m)
    if p.numel() == 0:
        return item
    if not _is_dtensor(p):
        if pg is not None and dist.get_world_size(pg) > 1:
            item.kind, item.pg = "replicated", pg
        return item
    from torch.distributed.tensor import Shard

    mesh, placements = p.device_mesh, p.placements
    active = [(i, pl) for i, pl in enumerate(placements) if mesh.size(i) > 1]
    nonrep = [(i, pl) for i, pl in active if not pl.is_replicate()]
    if not nonrep:
        if mesh.ndim == 1 and mesh.size() > 1:
            item.kind, item.pg = "replicated", mesh.get_group(0)
        return item
    if len(nonrep) == 1 and type(nonrep[0][1]) is Shard:
        mesh_dim, pl = nonrep[0]
        d = pl.dim % p.ndim
        if not _flattens(p.ndim, view) and d < p.ndim - 2:
            return item  # sharded on a batch (expert) dim: local pieces are whole matrices
        pg_d = mesh.get_group(mesh_dim)
        world, rank = dist.get_world_size(pg_d), dist.get_rank(pg_d)
        sizes = shard_sizes(p.shape[d], world)
        if p.to_local().shape[d] == sizes[rank]:
            item.kind, item.pg, item.shard_dim, item.sizes = "sharded", pg_d, d, sizes
            return item
    item.kind = "fallback"
    return item


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------


def _local(t: Tensor) -> Tensor:
    return t.to_local() if _is_dtensor(t) else t


@torch.no_grad()
def distributed_muon(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_bufs: list[Tensor],
    *,
    lr: float | Tensor,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
    adjust_lr_fn: str | None,
    group: Mapping[str, Any],
    process_group: Any = None,
    orthogonalize_fn: Callable[[Tensor, Mapping[str, Any]], Tensor] = orthogonalize,
) -> None:
    r"""Muon on DTensor / DDP-replicated parameters with the orthogonalisation split over ranks.

    The same update as :func:`optim.muon.muon` (``B ← μB + (1−μ)G``; ``U`` = Nesterov input;
    ``W ← (1 − ηλ)W − η·r(A, B)·orth(U)``), computed on local shards; see the module docstring for
    how ``orth(U)`` reaches whole matrices.

    Parameters
    ----------
    params, grads, momentum_bufs : list of Tensor
        Same-length lists; DTensors (any mix of placements) or plain tensors. ``params`` and
        ``momentum_bufs`` are updated in place; ``grads`` are not modified. Parameters with a
        zero-size (global) dimension are skipped.
    lr, weight_decay, momentum, nesterov, adjust_lr_fn
        As in :class:`optim.Muon`.
    group : mapping
        The orthogonalisation keys of a Muon param group (``msign, ns_coefficients, ns_steps, eps,
        ns_algorithm, ns_dtype, update, mclip_scale, matrix_view``).
    process_group : ProcessGroup, optional
        Group over which plain (non-DTensor) parameters are replicated (DDP); ``None``: plain
        parameters are orthogonalised locally. DTensors use their own mesh's groups.
    orthogonalize_fn : callable
        ``(X (B, n, m), group) -> O`` run on each rank's matrices; default
        :func:`optim._math.orthogonalize`.

    Notes
    -----
    **Cost.** Per rank, about ``1/W`` of the Newton–Schulz FLOPs of the group (``T(4s²L + 2s³)``
    per ``s×L`` matrix), balanced by the greedy owner assignment. **Communication** per step and
    rank, in the compute dtype: sharded parameters send and receive their local shard twice (all-
    to-all out and back: ``2·numel/W`` elements per matrix); replicated parameters all-gather
    ``numel`` elements per matrix. 3-D expert weights sharded on the expert dimension: none.
    """
    params, grads, momentum_bufs = drop_empty(params, grads, momentum_bufs)
    if not params:
        return
    lr = to_scalar(lr)
    view = group.get("matrix_view", "auto")

    local_params = [_local(p) for p in params]
    local_grads = []
    for p, g in zip(params, grads, strict=True):
        if _is_dtensor(p) and _is_dtensor(g) and g.placements != p.placements:
            g = g.redistribute(p.device_mesh, p.placements)
        local_grads.append(_local(g))
    local_bufs = [_local(b) for b in momentum_bufs]
    updates = momentum_inputs(local_grads, local_bufs, momentum, nesterov)

    items = [_classify(i, p, view, process_group) for i, p in enumerate(params)]
    results: dict[int, Tensor] = {}  # index -> orth(U) as the local piece, compute dtype

    def cdt_of(u: Tensor) -> torch.dtype:
        return iteration_dtype_of(group, u)

    # ---- owners: one greedy assignment per process group over all its items -----------------
    by_pg: dict[int, list[_Item]] = {}
    for it in items:
        if it.kind in ("sharded", "replicated"):
            by_pg.setdefault(id(it.pg), []).append(it)
    for its in by_pg.values():
        owners = assign_owners([it.cost for it in its], dist.get_world_size(its[0].pg))
        for it, o in zip(its, owners, strict=True):
            it.owner = o

    # ---- buckets: (kind, group, wide shape, compute dtype, device), largest first ------------
    buckets: dict[tuple, list[_Item]] = {}
    for it in items:
        u = updates[it.index]
        key = (it.kind, id(it.pg), it.wide, cdt_of(u), u.device)
        buckets.setdefault(key, []).append(it)
    ordered = sorted(buckets.items(), key=lambda kv: -sum(it.cost for it in kv[1]))
    sharded = [its for key, its in ordered if key[0] == "sharded"]
    replicated = [(key[3], its) for key, its in ordered if key[0] == "replicated"]
    local = [(key[3], its) for key, its in ordered if key[0] == "local"]
    fallback = [it for it in items if it.kind == "fallback"]

    # ---- sharded: forward all-to-all (async), built per bucket ------------------------------
    def start_forward(its: list[_Item]) -> dict[str, Any]:
        pg = its[0].pg
        world, rank = dist.get_world_size(pg), dist.get_rank(pg)
        cdt = cdt_of(updates[its[0].index])
        device = updates[its[0].index].device
        send_parts: list[Tensor] = []
        in_splits = [0] * world
        for o in range(world):
            for it in its:
                if it.owner == o:
                    piece = updates[it.index].to(cdt).reshape(-1)
                    send_parts.append(piece)
                    in_splits[o] += piece.numel()
        mine = [it for it in its if it.owner == rank]
        out_splits = [sum(it.piece_numel(s) for it in mine) for s in range(world)]
        send = torch.cat(send_parts) if send_parts else torch.empty(0, dtype=cdt, device=device)
        recv = torch.empty(sum(out_splits), dtype=cdt, device=device)
        work = dist.all_to_all_single(recv, send, out_splits, in_splits, group=pg, async_op=True)
        return dict(
            its=its,
            pg=pg,
            world=world,
            rank=rank,
            mine=mine,
            cdt=cdt,
            device=device,
            in_splits=in_splits,
            out_splits=out_splits,
            send=send,
            recv=recv,
            work=work,
        )

    def finish_forward(st: dict[str, Any]) -> dict[str, Any]:
        st["work"].wait()
        world, mine = st["world"], st["mine"]
        chunks = st["recv"].split(st["out_splits"])
        per_source = [c.split([it.piece_numel(s) for it in mine]) for s, c in enumerate(chunks)]
        send_back: list[Tensor] = []
        if mine:
            mats = []
            for j, it in enumerate(mine):
                pieces = [per_source[s][j].view(it.piece_shape(s)) for s in range(world)]
                mats.append(it.to_wide(torch.cat(pieces, dim=it.shard_dim)))
            O = orthogonalize_fn(torch.cat(mats), group).to(st["cdt"])
            outs, start = [], 0
            for it in mine:
                outs.append(it.from_wide(O[start : start + it.k]))
                start += it.k
            for s in range(world):
                for it, full in zip(mine, outs, strict=True):
                    off = sum(it.sizes[:s])
                    send_back.append(full.narrow(it.shard_dim, off, it.sizes[s]).reshape(-1))
        send = (
            torch.cat(send_back)
            if send_back
            else torch.empty(0, dtype=st["cdt"], device=st["device"])
        )
        recv = torch.empty(sum(st["in_splits"]), dtype=st["cdt"], device=st["device"])
        work = dist.all_to_all_single(
            recv, send, st["in_splits"], st["out_splits"], group=st["pg"], async_op=True
        )
        return dict(st, send=send, recv=recv, work=work)

    def finish_backward(st: dict[str, Any]) -> None:
        st["work"].wait()
        chunks = st["recv"].split(st["in_splits"])
        rank = st["rank"]
        for o, chunk in enumerate(chunks):
            its = [it for it in st["its"] if it.owner == o]
            pieces = chunk.split([it.piece_numel(rank) for it in its])
            for it, piece in zip(its, pieces, strict=True):
                results[it.index] = piece.view(it.piece_shape(rank))

    pending_forward = start_forward(sharded[0]) if sharded else None

    # ---- local buckets: no communication (overlaps the first all-to-all) --------------------
    for _, its in local:
        # local pieces are whole matrices; a sharded expert stack holds only its own experts
        mats = []
        for it in its:
            u = updates[it.index]
            kl = u.numel() // (it.n * it.m) if it.n * it.m else 0
            X = u.reshape(kl, it.n, it.m)
            mats.append(X.mT if it.n > it.m else X)
        O = orthogonalize_fn(torch.cat(mats), group)
        start = 0
        for it, X in zip(its, mats, strict=True):
            blk = O[start : start + X.shape[0]]
            start += X.shape[0]
            blk = blk.mT if it.n > it.m else blk
            results[it.index] = blk.reshape(updates[it.index].shape)

    # ---- replicated buckets: own share, then all-gather (async) -----------------------------
    gathers = []
    for cdt, its in replicated:
        pg = its[0].pg
        world, rank = dist.get_world_size(pg), dist.get_rank(pg)
        s, L = its[0].wide
        counts = [sum(it.k for it in its if it.owner == r) for r in range(world)]
        mine = [it for it in its if it.owner == rank]
        buf = torch.zeros(max(counts), s, L, dtype=cdt, device=updates[its[0].index].device)
        if mine:
            X = torch.cat([it.to_wide(updates[it.index]) for it in mine])
            buf[: counts[rank]] = orthogonalize_fn(X, group)
        out = [torch.empty_like(buf) for _ in range(world)]
        work = dist.all_gather(out, buf, group=pg, async_op=True)
        gathers.append((its, world, out, buf, work))

    # ---- sharded pipeline: all-to-all of bucket k+1 in flight while bucket k computes -------
    backward = []
    for b in range(len(sharded)):
        current = pending_forward
        pending_forward = start_forward(sharded[b + 1]) if b + 1 < len(sharded) else None
        backward.append(finish_forward(current))

    # ---- fallback: whole tensor on every rank ----------------------------------------------
    for it in fallback:
        from torch.distributed.tensor import DTensor, Replicate

        p = params[it.index]
        u = DTensor.from_local(
            updates[it.index].to(cdt_of(updates[it.index])),
            p.device_mesh,
            p.placements,
            run_check=False,
            shape=p.shape,
            stride=p.stride(),
        ).full_tensor()
        O = it.from_wide(orthogonalize_fn(it.to_wide(u), group))
        back = DTensor.from_local(
            O.contiguous(), p.device_mesh, [Replicate()] * p.device_mesh.ndim, run_check=False
        ).redistribute(p.device_mesh, p.placements)
        results[it.index] = back.to_local()

    for its, world, out, _buf, work in gathers:
        work.wait()
        for r in range(world):
            start = 0
            for it in its:
                if it.owner == r:
                    results[it.index] = it.from_wide(out[r][start : start + it.k])
                    start += it.k
    for st in backward:
        finish_backward(st)

    # ---- apply: decoupled decay, then W += -lr·r(A, B)·O, grouped by scale ------------------
    weight_decay_(local_params, lr, weight_decay)
    groups: dict[tuple, tuple[list[Tensor], list[Tensor]]] = {}
    for it in items:
        p = local_params[it.index]
        upd = results[it.index].to(dtype=p.dtype).reshape(p.shape)
        if not p.is_contiguous():
            p.add_(upd * (-lr * adjust_lr_ratio(adjust_lr_fn, it.n, it.m)))
            continue
        key = (it.n, it.m, p.device, p.dtype)
        targets, ups = groups.setdefault(key, ([], []))
        targets.append(p)
        ups.append(upd.contiguous())
    for (n, m, _, _), (targets, ups) in groups.items():
        apply_(targets, ups, -lr * adjust_lr_ratio(adjust_lr_fn, n, m))
