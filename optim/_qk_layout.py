r"""Where the rows of a tensor registered with QK-Clip live, and their in-place scaling.

QK-Clip rescales the rows of one attention head (or one QK-Norm gain) in place. This module turns
a registration into :class:`_Attention` records whose :class:`_Part` entries map each head (unit)
to row indices of the tensor this rank holds: head-major row selections of fused projections
(:func:`_rows`, :func:`_check_disjoint`), DTensor placements and shard offsets
(:func:`_held_rows`: ``Replicate``, ``Shard``, ``_StridedShard``), tensor-parallel head ranges
(:func:`_tp_info`, :func:`_listed`, :func:`_local_heads`), QK-Norm gain rows
(:func:`_gain_rows`) and the MHA/GQA and MLA records (:func:`_mha_attention`,
:func:`_mla_attention`). Then the scaling: each unit's factor from γ (:func:`_factors`), applied
in place to the rows this rank holds (:func:`_apply`, :func:`_scale_rows`). A leaf of
:mod:`optim.qk_clip`, which holds the QKClip API (docs/math.md §6).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .distributed import resolve_process_group

RowSpec = slice | Sequence[int] | torch.Tensor | None


# --------------------------------------------------------------------------- records, rows


@dataclass
class _Part:
    """One tensor the clip may scale, cut into units (a head's rows, or one shared gain).

    ``units[i]`` is the global unit id (query head for q roles, key head for k roles, 0 for a
    gain shared by all heads) of the rows ``rows[i]``: indices into the *local* tensor along
    ``dim``, ``-1`` where the row lives on another rank.
    """

    role: str  # "q", "k", "q_nope", "k_nope", "q_rope"
    tensor: torch.Tensor  # the registered tensor: plain or DTensor
    dim: int
    units: torch.Tensor  # (n,) int64, CPU
    rows: torch.Tensor  # (n, rows_per_unit) int64, CPU


@dataclass
class _Attention:
    kind: Literal["mha", "mla"]
    num_heads: int
    num_kv_heads: int
    parts: list[_Part]
    gqa: Literal["per_head", "group"]
    alpha: float | None
    stats: torch.Tensor  # (num_heads,) float32 running max, global head order
    units: dict[str, int]  # role -> global unit count (heads, key heads, or 1 for a shared gain)
    tp: tuple[Any, int, int] | None = None  # (group, rank, size): heads split over the group
    sharded: bool = False  # some tensor is a DTensor: the MAX reduction is required
    frozen: list[torch.Tensor] = field(default_factory=list)  # shared k_rope: never written


def _is_dtensor(t: object) -> bool:
    # anything that creates a DTensor has imported torch.distributed.tensor; when it is not
    # loaded no DTensor exists, and single-process users skip its ~1 s import
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor to write in place: a DTensor's local shard, else the tensor's data."""
    return t.to_local() if _is_dtensor(t) else t.data


def _check_param(t: object, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor (a Parameter), got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"`{name}` must have a floating dtype, got {t.dtype}")
    if t.ndim != 2:
        raise ValueError(f"`{name}` must be a 2-D weight, got shape {tuple(t.shape)}")
    return t


def _rows(spec: RowSpec, size: int, heads: int, per_head: int, name: str) -> torch.Tensor:
    """``(heads, per_head)`` int64 CPU row indices selected by ``spec`` out of ``size`` rows."""
    n = heads * per_head
    if spec is None:
        idx = torch.arange(size)
    elif isinstance(spec, slice):
        idx = torch.arange(size)[spec]
    else:
        idx = torch.as_tensor(spec)
        if idx.dtype in (torch.bool,) or idx.is_floating_point() or idx.ndim != 1:
            raise TypeError(f"`{name}` must be a slice or a 1-D sequence of int row indices")
        idx = idx.to(torch.int64).cpu()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= size):
            raise ValueError(f"`{name}` holds row indices outside [0, {size})")
    if idx.numel() != n:
        raise ValueError(
            f"`{name}` selects {idx.numel()} rows, expected heads·head_dim = {heads}·{per_head}"
            f" = {n} (weight has {size} output rows)"
        )
    if torch.unique(idx).numel() != n:
        raise ValueError(f"`{name}` selects some rows twice")
    return idx.view(heads, per_head)


def _check_bias(b: object, weight: torch.Tensor, out_dim: int, name: str) -> torch.Tensor | None:
    if b is None:
        return None
    if not isinstance(b, torch.Tensor) or not b.is_floating_point():
        raise TypeError(f"`{name}` must be a floating torch.Tensor or None")
    if b.ndim != 1 or b.shape[0] != weight.shape[out_dim]:
        raise ValueError(
            f"`{name}` must have shape ({weight.shape[out_dim]},) to match its weight's output "
            f"rows, got {tuple(b.shape)}"
        )
    if _is_dtensor(b) != _is_dtensor(weight):
        raise TypeError(f"`{name}` and its weight must both be DTensors or both plain tensors")
    return b


def _held_rows(t: torch.Tensor, dim: int, name: str) -> torch.Tensor:
    """Global indices (along ``dim``) of the rows of DTensor ``t``'s local shard, in order.

    ``Replicate`` keeps every row, ``Shard(dim)`` takes this rank's ``torch.chunk`` piece (mesh
    dims left to right, DTensor's default order), ``Shard`` of another dim keeps every row (of
    fewer columns). ``_StridedShard`` (FSDP2 over tensor-parallel weights) is resolved by
    DTensor itself, by distributing an index tensor the same way (no communication; memory:
    the local shard's rows, or its elements where other dims are sharded too). ``Partial`` and
    other placements raise: writing rows needs to know exactly where they are.
    """
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    n, nd = t.shape[dim], t.ndim
    mesh, placements = t.device_mesh, tuple(t.placements)
    coord = mesh.get_coordinate()
    supported = (
        "QKClip supports Replicate, Shard(d) and _StridedShard placements (FSDP2, HSDP, "
        "tensor-parallel Shard(0)/Shard(1), FSDP2 over tensor parallelism)"
    )
    for md, pl in enumerate(placements):
        if not isinstance(pl, (Replicate, Shard, _StridedShard)):
            raise ValueError(
                f"`{name}` is a DTensor with placement {pl!r} on mesh dim {md} (placements "
                f"{placements}): {supported}"
            )
    held = torch.arange(n)
    if coord is None:
        held = held[:0]
    elif all(type(pl) in (Replicate, Shard) for pl in placements):
        spec = getattr(t, "_spec", None)
        order = getattr(spec, "shard_order", None)
        default = getattr(type(spec), "compute_default_shard_order", None)
        if order is not None and default is not None and tuple(order) != tuple(default(placements)):
            raise ValueError(
                f"`{name}` is a DTensor with a non-default shard order {order}: {supported} "
                "in DTensor's default mesh-dim order"
            )
        for md, pl in enumerate(placements):
            if isinstance(pl, Shard) and pl.dim % nd == dim:
                chunks = held.chunk(mesh.size(md))
                held = chunks[coord[md]] if coord[md] < len(chunks) else held[:0]
    else:
        sharded = {pl.dim % nd for pl in placements if isinstance(pl, (Shard, _StridedShard))}
        shape = [t.shape[d] if d == dim or d in sharded else 1 for d in range(nd)]
        index = torch.arange(n, device=_local(t).device).view(
            [n if d == dim else 1 for d in range(nd)]
        )
        local = distribute_tensor(index.expand(shape), mesh, placements, src_data_rank=None)
        rows = local.to_local().movedim(dim, 0).reshape(local.to_local().shape[dim], -1)
        held = rows[:, 0].cpu() if rows.numel() else held[:0]
    if t.to_local().numel() == 0:
        return held[:0]  # nothing local to write (an empty piece of some dim)
    if t.to_local().shape[dim] != held.numel():
        raise ValueError(
            f"`{name}`'s local shard has {t.to_local().shape[dim]} rows along dim {dim}, but its "
            f"placements {placements} give {held.numel()}: {supported}"
        )
    return held


def _part(role: str, t: torch.Tensor, dim: int, rows: torch.Tensor, unit0: int, name: str) -> _Part:
    """A part whose ``rows`` (global for a DTensor, local otherwise) start at unit ``unit0``."""
    units = unit0 + torch.arange(rows.shape[0])
    if _is_dtensor(t):
        held = _held_rows(t, dim, name)
        where = torch.full((t.shape[dim],), -1, dtype=torch.int64)
        where[held] = torch.arange(held.numel())
        rows = where[rows]
    return _Part(role, t, dim, units, rows)


def _gain_rows(g: object, units: int, head_dim: int, name: str) -> tuple[torch.Tensor, int]:
    """Rows of a QK-Norm gain and its unit count: 1 (shared by all heads) or ``units``.

    ``(head_dim,)`` is shared; ``(units·head_dim,)`` or ``(units, head_dim)`` is per head.
    """
    if not isinstance(g, torch.Tensor) or not g.is_floating_point():
        raise TypeError(f"`{name}` must be a floating torch.Tensor (the norm's weight)")
    shape = tuple(g.shape)
    if shape == (head_dim,):
        return torch.arange(head_dim).view(1, head_dim), 1
    if shape == (units * head_dim,):
        return torch.arange(units * head_dim).view(units, head_dim), units
    if shape == (units, head_dim):
        return torch.arange(units).view(units, 1), units
    raise ValueError(
        f"`{name}` must have shape ({head_dim},) (shared by all heads), ({units * head_dim},) "
        f"or ({units}, {head_dim}) (per head), got {shape}"
    )


def _scale_rows(t: torch.Tensor, rows: torch.Tensor, factors: torch.Tensor, dim: int) -> None:
    """``t[rows] *= factors`` along ``dim``, in float32 or better, cast back once."""
    view = t.transpose(0, 1) if (t.ndim == 2 and dim == 1) else t
    cdt = torch.promote_types(t.dtype, torch.float32)
    rows = rows.to(t.device)
    sel = view[rows]
    f = factors.to(device=t.device, dtype=cdt).view(-1, *([1] * (sel.ndim - 1)))
    view[rows] = (sel.to(cdt) * f).to(t.dtype)


def _tp_info(tp_group: Any, heads: dict[str, int]) -> tuple[Any, int, int] | None:
    """``(group, rank, size)`` of the tensor-parallel group; every head count divisible."""
    if tp_group is None:
        return None
    try:
        group = resolve_process_group(tp_group)
    except (TypeError, ValueError) as e:
        raise type(e)(str(e).replace("`process_group`", "`tp_group`")) from None
    dist = torch.distributed
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError("this rank is not a member of `tp_group`")
    for nm, h in heads.items():
        if h % size:
            raise ValueError(
                f"`{nm}`={h} is not divisible by the tensor-parallel size {size}: heads must be "
                "split evenly over `tp_group` (replicated key heads are not supported)"
            )
    return group, rank, size


# --------------------------------------------------------------------------- registration


def _check_heads(num_heads: int, head_dim: int, num_kv_heads: int | None) -> tuple[int, int, int]:
    for nm, v in (("num_heads", num_heads), ("head_dim", head_dim)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"`{nm}` must be an int, got {type(v).__name__}")
        if v < 1:
            raise ValueError(f"`{nm}` must be >= 1, got {v}")
    Hkv = num_heads if num_kv_heads is None else num_kv_heads
    if isinstance(Hkv, bool) or not isinstance(Hkv, int):
        raise TypeError(f"`num_kv_heads` must be an int, got {type(Hkv).__name__}")
    if Hkv < 1 or num_heads % Hkv:
        raise ValueError(f"`num_kv_heads` must be >= 1 and divide num_heads={num_heads}, got {Hkv}")
    return num_heads, head_dim, Hkv


def _check_disjoint(parts: list[tuple[str, torch.Tensor, torch.Tensor]]) -> None:
    """Refuse overlapping row selections of one fused weight (compared as registered)."""
    for a in range(len(parts)):
        for b in range(a + 1, len(parts)):
            (ra, ta, rows_a), (rb, tb, rows_b) = parts[a], parts[b]
            if ta is tb and bool(torch.isin(rows_a.flatten(), rows_b.flatten()).any()):
                raise ValueError(
                    f"the {ra} and {rb} rows of a fused weight overlap; pass disjoint row "
                    "selections"
                )


def _listed(t: torch.Tensor, heads: int, tp: tuple[Any, int, int] | None) -> tuple[int, int]:
    """(heads whose rows ``t`` lists, first global head) of a registered tensor.

    A plain tensor under tensor parallelism holds this rank's heads only; a DTensor is
    indexed globally.
    """
    if tp is None or _is_dtensor(t):
        return heads, 0
    per = heads // tp[2]
    return per, tp[1] * per


def _local_heads(attn: _Attention) -> tuple[int, int, int]:
    """(first query head, query heads, key heads) that this rank's ``record`` receives."""
    if attn.tp is None:
        return 0, attn.num_heads, attn.num_kv_heads
    _, r, T = attn.tp
    hq = attn.num_heads // T
    return r * hq, hq, (attn.num_kv_heads // T if attn.kind == "mha" else 1)


def _fresh_stats(H: int, device: torch.device) -> torch.Tensor:
    return torch.full((H,), float("-inf"), dtype=torch.float32, device=device)


def _mha_attention(
    name: str,
    qw: torch.Tensor,
    kw: torch.Tensor,
    qb: torch.Tensor | None,
    kb: torch.Tensor | None,
    q_rows: RowSpec,
    k_rows: RowSpec,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    *,
    H: int,
    D: int,
    Hkv: int,
    out_dim: int,
    tp: tuple[Any, int, int] | None,
    gqa: Literal["per_head", "group"],
    alpha: float | None,
) -> _Attention:
    """The record of an MHA / GQA / MQA attention: its parts and each role's unit count.

    Per side, the weight's (and bias's) head-major rows, or with a QK-Norm gain the gain's rows
    instead (one unit where the gain is shared by every head of that side). Arguments as
    ``QKClip.add_attention`` takes them, the weights and biases validated.
    """
    (hq, q0), (hk, k0) = _listed(qw, H, tp), _listed(kw, Hkv, tp)
    qr = _rows(q_rows, qw.shape[out_dim], hq, D, "q_rows")
    kr = _rows(k_rows, kw.shape[out_dim], hk, D, "k_rows")
    _check_disjoint([("q", qw, qr), ("k", kw, kr)])
    if q_norm_weight is not None and q_norm_weight is k_norm_weight:
        raise ValueError("`q_norm_weight` and `k_norm_weight` must be different tensors")
    parts: list[_Part] = []
    units = {"q": H, "k": Hkv}
    for role, w, b, rows, heads, first, g in (
        ("q", qw, qb, qr, H, q0, q_norm_weight),
        ("k", kw, kb, kr, Hkv, k0, k_norm_weight),
    ):
        if g is None:
            parts.append(_part(role, w, out_dim, rows, first, f"{name}.{role}_weight"))
            if b is not None:
                parts.append(_part(role, b, 0, rows, first, f"{name}.{role}_bias"))
            continue
        gname = f"{role}_norm_weight"
        n, first = _listed(g, heads, tp)
        grows, u = _gain_rows(g, n, D, gname)
        if u == 1 and not (tp is not None and heads > 1 and g.ndim == 2):
            units[role], first = 1, 0  # one gain shared by all heads of this side
        parts.append(_part(role, g, 0, grows, first, f"{name}.{gname}"))
    return _Attention(
        "mha", H, Hkv, parts, gqa, alpha, _fresh_stats(H, _local(qw).device), units,
        tp=tp, sharded=any(_is_dtensor(t) for t in (qw, kw, *(p.tensor for p in parts))),
    )  # fmt: skip


def _mla_attention(
    name: str,
    qn: torch.Tensor,
    kn: torch.Tensor,
    qr: torch.Tensor,
    kr: torch.Tensor | None,
    q_nope_rows: RowSpec,
    k_nope_rows: RowSpec,
    q_rope_rows: RowSpec,
    q_nope_bias: torch.Tensor | None,
    k_nope_bias: torch.Tensor | None,
    q_rope_bias: torch.Tensor | None,
    *,
    H: int,
    dn: int,
    dr: int,
    out_dim: int,
    tp: tuple[Any, int, int] | None,
    alpha: float | None,
) -> _Attention:
    """The record of an MLA attention: the per-head rows of ``q_c``, ``k_c`` and ``q_r``.

    Default layouts: a fused query projection holds, per head, the ``nope`` rows then the
    ``rope`` rows; a key projection wider than ``H·dn`` holds, per head, the key rows then the
    value rows. Arguments as ``QKClip.add_mla`` takes them, the weights validated.
    """
    (hqn, q0), (hkn, k0), (hqr, r0) = (_listed(t, H, tp) for t in (qn, kn, qr))
    if qn is qr and q_nope_rows is None and q_rope_rows is None:
        if qn.shape[out_dim] != hqn * (dn + dr):
            raise ValueError(
                f"fused `q_nope_weight`/`q_rope_weight` must have num_heads·(nope+rope) = "
                f"{hqn * (dn + dr)} output rows, got {qn.shape[out_dim]}"
            )
        per = torch.arange(hqn)[:, None]
        q_nope_rows = (per * (dn + dr) + torch.arange(dn)).flatten()
        q_rope_rows = (per * (dn + dr) + dn + torch.arange(dr)).flatten()
    if k_nope_rows is None and kn.shape[out_dim] != hkn * dn:
        if kn.shape[out_dim] % hkn or kn.shape[out_dim] // hkn <= dn:
            raise ValueError(
                f"`k_nope_weight` has {kn.shape[out_dim]} output rows: expected "
                f"num_heads·qk_nope_head_dim = {hkn * dn} or num_heads·(qk_nope_head_dim + "
                "v_head_dim); pass `k_nope_rows` for other layouts"
            )
        per = torch.arange(hkn)[:, None]
        k_nope_rows = (per * (kn.shape[out_dim] // hkn) + torch.arange(dn)).flatten()
    specs = [
        ("q_nope", qn, q_nope_bias, _rows(q_nope_rows, qn.shape[out_dim], hqn, dn,
                                          "q_nope_rows"), q0),
        ("k_nope", kn, k_nope_bias, _rows(k_nope_rows, kn.shape[out_dim], hkn, dn,
                                          "k_nope_rows"), k0),
        ("q_rope", qr, q_rope_bias, _rows(q_rope_rows, qr.shape[out_dim], hqr, dr,
                                          "q_rope_rows"), r0),
    ]  # fmt: skip
    _check_disjoint([(role, w, rows) for role, w, _, rows, _ in specs])
    if kr is not None and any(w is kr for _, w, _, _, _ in specs):
        raise ValueError(
            "`k_rope_weight` (the shared RoPE key) must not be one of the per-head weights; "
            "register only the rows of its own projection"
        )
    parts: list[_Part] = []
    for role, w, b, rows, first in specs:
        parts.append(_part(role, w, out_dim, rows, first, f"{name}.{role}_weight"))
        b = _check_bias(b, w, out_dim, f"{role}_bias")
        if b is not None:
            parts.append(_part(role, b, 0, rows, first, f"{name}.{role}_bias"))
    return _Attention(
        "mla", H, 1, parts, "per_head", alpha, _fresh_stats(H, _local(qn).device),
        {"q_nope": H, "k_nope": H, "q_rope": H}, tp=tp,
        sharded=any(_is_dtensor(p.tensor) for p in parts),
        frozen=[] if kr is None else [kr],
    )  # fmt: skip


# --------------------------------------------------------------------------- scaling


def _factors(attn: _Attention, gamma: torch.Tensor, alpha: float) -> dict[str, torch.Tensor]:
    """Per role, the factor of each global unit (docs/math.md §6); ``alpha``: QKClip's split."""
    a = alpha if attn.alpha is None else attn.alpha
    if attn.kind == "mla":
        return {"q_nope": gamma**a, "k_nope": gamma ** (1 - a), "q_rope": gamma}
    H, Uq, Uk = attn.num_heads, attn.units["q"], attn.units["k"]
    Gq, Gk = H // Uq, H // Uk  # query heads sharing one q unit / one k unit
    if Gq == 1 and Gk == 1:
        return {"q": gamma**a, "k": gamma ** (1 - a)}
    g_k = gamma.view(Uk, Gk).amin(dim=1)  # the smallest γ of the heads sharing a k unit
    if Gq == 1:
        if attn.gqa == "per_head":
            return {"q": gamma}
        return {"q": (g_k**a).repeat_interleave(Gk), "k": g_k ** (1 - a)}
    if Uk > 1:  # one q gain for all heads: the k units separate them, or their groups
        return {"k": g_k}
    return {"q": g_k**a, "k": g_k ** (1 - a)}  # both gains shared by every head


def _apply(attn: _Attention, facs: dict[str, torch.Tensor]) -> None:
    """Scale the rows this rank holds of every unit with a factor < 1."""
    for p in attn.parts:
        f = facs.get(p.role)
        if f is None:
            continue
        f = f[p.units]
        touch = f < 1
        if not bool(touch.any()):
            continue
        rows = p.rows[touch]
        fr = f[touch].repeat_interleave(rows.shape[1])
        rows = rows.flatten()
        here = rows >= 0
        if not bool(here.any()):
            continue
        _scale_rows(_local(p.tensor), rows[here], fr[here], p.dim)
