r"""Scan solve: ``T⁻¹ V`` by a two-level scan over groups of chunks (``tri_solve``'s CUDA path).

Chunks form groups (:mod:`matfn.triangular.schedule`). With ``F = e + d``:

1. chunk kernel (:func:`matfn.triangular.chunk.tri_chunk_kernel`): ``W = [Y_cc V_c | Y_cc Q_c]``;
2. group kernel (:func:`_group_kernel`): inside each group, sequentially over its chunks, the
   chunk recursion (docs/math.md §5.2) on ``W``'s columns from a zero state (parallel over groups
   × column tiles), giving ``[X^{grp} | P^{grp}]`` and the group sums
   ``[K_gᵀ X^{grp} | K_gᵀ P^{grp}] = [B_g | G_g]``;
3. the state scan ``Z_{g+1} = (I − G_g) Z_g + B_g`` over groups;
4. the corrections ``X_g = X^{grp}_g − P^{grp}_g Z_g`` (parallel).

**Cost.** FLOPs ``≈ 4 n d F + 2 n d e``; what costs is the chain of dependent small products: a
group step (two products contracting over ``d`` and ``C``) and a state step (one over ``d``),
each a few µs of latency (docs/benchmarks.md).

**Fused** (the default where one group-kernel program per SM leaves enough groups): the ``U``
column tiles of the group kernel go on with the state step of their own columns once their
group's ``P`` tiles are done, and the corrections (:func:`_chain_correct_kernel`) are launched
with programmatic dependent launch while the group kernel runs and wait for their data instead
of for the launch before: a group's programs count themselves done in a flag (release), the
readers wait for it (acquire) and for ``Z_g``, which the chunk kernel filled with a sentinel NaN
(:data:`~matfn.triangular.chunk.SENTINEL`), to hold no sentinel. Each launch waits only for
programs of the launches before it, or of lower index in its own, which all run before it: no
deadlock, whatever runs at once. The chunk kernel also zeroes the flags (no memset). Without PDL
the launches run one after another and find every flag set.

**Unfused** (batched inputs, where fewer than ``min_groups_per_wave`` groups fit one program per
SM and the fused form measured slower): equal groups, then a state launch
(:func:`_state_kernel`) and a correction launch (:func:`_correct_kernel`) after the group kernel.

Every launch after the chunk kernel but the fused corrections waits for the one before
(``griddepcontrol.wait``, compute capability ≥ 9) and is launched early.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from matfn.kernels.launch import INTERPRET, pdl_flags, sm_count, use_pdl, wait_for_previous_launch

from .chunk import SENTINEL, chunk_pass, mm, pow2
from .config import TriSolveConfig
from .schedule import ScanPlan, scan_plan

__all__ = ["solve_scan", "plan_for", "group_start"]


@triton.jit
def group_start(g, S0, RNUM, RDEN, NC):
    """First chunk of group ``g`` (:func:`matfn.triangular.schedule.group_start` on the device)."""
    return tl.minimum(g * S0 + (g * (g - 1) * RNUM) // (2 * RDEN), NC)


@triton.jit
def _state_step(Z, sb, cd, ce, d, e):
    """``Z − G_g Z + B_g`` with ``[B_g | G_g]`` the group's sums at ``sb`` (row stride ``F``)."""
    md = (cd < d)[:, None]
    G = tl.load(sb + e + cd[None, :], mask=md & (cd < d)[None, :], other=0.0)
    Bg = tl.load(sb + ce[None, :], mask=md & (ce < e)[None, :], other=0.0)
    return Z - mm(G, Z) + Bg


@triton.jit
def _group_of(c, S0, RNUM, RDEN, NC):
    """The group that chunk ``c`` belongs to (:func:`group_start`)."""
    g = 0
    while group_start(g + 1, S0, RNUM, RDEN, NC) <= c:
        g += 1
    return g


@triton.jit
def _group_rows(
    wg_ptr,
    b,
    c,
    et,
    n,
    d,
    e,
    stride_wb,
    stride_wn,
    BC: tl.constexpr,
    BE: tl.constexpr,
    DP: tl.constexpr,
    CACHE: tl.constexpr,
):
    """Chunk ``c``'s rows of ``X^{grp}`` (``BE``-column tile ``et``) and of ``P^{grp}`` (all).

    ``CACHE=".cg"`` reads around L1, for data that other programs of the same launch wrote.
    """
    rows = c.to(tl.int64) * BC + tl.arange(0, BC)
    rm = (rows < n)[:, None]
    ce = et * BE + tl.arange(0, BE)
    cd = tl.arange(0, DP)
    wrow = wg_ptr + b * stride_wb + rows[:, None] * stride_wn
    Xg = tl.load(wrow + ce[None, :], mask=rm & (ce < e)[None, :], other=0.0, cache_modifier=CACHE)
    Pg = tl.load(
        wrow + e + cd[None, :], mask=rm & (cd < d)[None, :], other=0.0, cache_modifier=CACHE
    )
    return Xg, Pg


@triton.jit
def _store_corrected(
    x_ptr, X, b, c, et, n, e, stride_xb, stride_xn, BC: tl.constexpr, BE: tl.constexpr
):
    """Store chunk ``c``'s corrected ``BE``-column tile ``et``, ``X = X^{grp} − P^{grp} Z_g``."""
    rows = c.to(tl.int64) * BC + tl.arange(0, BC)
    ce = et * BE + tl.arange(0, BE)
    mask = (rows < n)[:, None] & (ce < e)[None, :]
    tl.store(x_ptr + b * stride_xb + rows[:, None] * stride_xn + ce[None, :], X, mask=mask)


@triton.jit
def _group_tile_columns(y, d, e, ND, BF: tl.constexpr):
    """Columns of ``[U | P]`` (and their mask) of the group kernel's column tile ``y``.

    Tiles ``y < ND`` cover ``P``'s ``d`` columns, the rest ``U``'s ``e``: the ``P`` tiles come
    first, so the fused state step of a ``U`` tile only waits for programs of lower index.
    """
    is_p = y < ND
    cf = tl.where(is_p, e + y * BF, (y - ND) * BF) + tl.arange(0, BF)
    return cf, cf < tl.where(is_p, e + d, e)


@triton.jit
def _group_kernel(
    w_ptr,
    k_ptr,
    wg_ptr,
    sg_ptr,
    z_ptr,
    done_ptr,
    n,
    d,
    e,
    F,
    NC,
    NG,
    ND,
    S0,
    RNUM,
    RDEN,
    stride_wb,
    stride_wn,
    stride_kb,
    stride_kn,
    stride_sb,
    stride_sg,
    stride_zb,
    stride_zg,
    BC: tl.constexpr,
    BF: tl.constexpr,
    DP: tl.constexpr,
    NS: tl.constexpr,
    FUSED: tl.constexpr,
    SLEEP: tl.constexpr = False,
    USE_PDL: tl.constexpr = False,
):
    """Chunk recursion from a zero state inside group ``g`` on ``BF`` columns of ``[U | P]``.

    Program ``(g, y, b)``; column tile ``y`` as :func:`_group_tile_columns` (``ND`` tiles of
    ``P`` first). The state is kept as ``NS`` slices of ``DP / NS`` rows, and the products
    contract over them with batched dots: ``NS`` short independent chains of tensor-core
    products instead of one long one (the step is latency-bound). Groups may grow with ``g``
    (:func:`group_start`).

    ``FUSED``: the program then counts its tile done (release) in ``done[0, b, g]`` (``P``
    tiles) or ``done[1, b, g]`` (``U`` tiles), for the corrections, and a ``U`` tile (columns
    ``J``) goes on with the state step of the scan across groups on its own columns,
    ``Z_{g+1}[:, J] = Z_g[:, J] − G_g Z_g[:, J] + B_g[:, J]``: its ``B_g[:, J]`` is the state
    it holds, it waits (acquire) until the group's ``P`` tiles are done and reads
    ``G_g = K_gᵀ P^{grp}`` (their sums), and ``Z_g[:, J]`` from the same tile of group
    ``g − 1`` once no element is :data:`SENTINEL` (the chunk kernel filled ``Z`` so;
    ``Z_0 = 0`` is not stored). Every wait is on programs of lower linear index (smaller
    ``g``, or smaller ``y`` in the same group), which are dispatched first, and in the
    interpreter run first: no deadlock.
    """
    g = tl.program_id(0).to(tl.int64)
    y = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    cf, mcf = _group_tile_columns(y, d, e, ND, BF)
    mf = mcf[None, :]
    wait_for_previous_launch(USE_PDL)
    KS: tl.constexpr = DP // NS
    sl = tl.arange(0, NS)[:, None, None]
    cP = sl * KS + tl.arange(0, KS)[None, None, :]  # (NS, 1, KS): column of P
    cK = sl * KS + tl.arange(0, KS)[None, :, None]  # (NS, KS, 1): column of K
    S = tl.zeros((NS, KS, BF), dtype=tl.float32)
    for c in range(group_start(g, S0, RNUM, RDEN, NC), group_start(g + 1, S0, RNUM, RDEN, NC)):
        rows = c * BC + tl.arange(0, BC)
        rm = (rows < n)[:, None]
        Wc = tl.load(
            w_ptr + b * stride_wb + rows[:, None] * stride_wn + cf[None, :], mask=rm & mf, other=0.0
        )
        r3 = rows[None, :, None]
        Pc = tl.load(
            w_ptr + b * stride_wb + r3 * stride_wn + e + cP, mask=(r3 < n) & (cP < d), other=0.0
        )
        r3t = rows[None, None, :]
        Kct = tl.load(
            k_ptr + b * stride_kb + r3t * stride_kn + cK, mask=(r3t < n) & (cK < d), other=0.0
        )
        Xc = Wc - tl.sum(mm(Pc, S), axis=0)
        tl.store(wg_ptr + b * stride_wb + rows[:, None] * stride_wn + cf[None, :], Xc, mask=rm & mf)
        S += mm(Kct, tl.broadcast_to(Xc[None, :, :], (NS, BC, BF)))
    cd = tl.arange(0, DP)
    md = (cd < d)[:, None]
    S2 = tl.reshape(S, (DP, BF))
    sp = sg_ptr + b * stride_sb + g * stride_sg + cd[:, None] * F
    tl.store(sp + cf[None, :], S2, mask=md & mf)
    if FUSED:
        is_u = (y >= ND).to(tl.int64)
        tl.debug_barrier()  # every thread's stores before the release
        tl.atomic_add(done_ptr + (is_u * NG + g) * tl.num_programs(2) + b, 1, sem="release")
        if (y >= ND) & (g + 1 < NG):
            zb = z_ptr + b * stride_zb
            zs = zb + cd[:, None] * e + cf[None, :]
            if g == 0:
                Z = S2  # Z_1 = B_0: Z_0 = 0
            else:
                _wait_flag(done_ptr + g * tl.num_programs(2) + b, ND, SLEEP)
                # transposed, Zᵀ Gᵀ: 16-row mma.sync products (the fastest form measured,
                # docs/benchmarks.md), G loaded before the wait for Z_g
                Gt = tl.load(
                    sg_ptr + b * stride_sb + g * stride_sg + cd[None, :] * F + e + cd[:, None],
                    mask=md & (cd < d)[None, :],
                    other=0.0,
                    cache_modifier=".cg",
                )
                _spin_until_written(zb + g * stride_zg + (y - ND) * BF, SLEEP)
                Z = _load_written(zs + g * stride_zg, md & mf)
                GZ = tl.trans(mm(tl.trans(Z), Gt))
                Z = Z - GZ + S2
            tl.store(zs + (g + 1) * stride_zg, Z, mask=md & mf)


@triton.jit
def _wait_flag(ptr, target, SLEEP: tl.constexpr = False):
    """Spin until ``*ptr ≥ target``, then acquire it for the whole program.

    Polls with plain volatile reads (no atomic traffic while waiting), then one acquire: polling
    with acquire atomics measured slower.
    """
    while tl.load(ptr, volatile=True) < target:
        _back_off(SLEEP)
    tl.atomic_add(ptr, 0, sem="acquire")
    tl.debug_barrier()


@triton.jit
def _written(x):
    """Whether no element of tile ``x`` is still :data:`SENTINEL` (one program-wide test)."""
    unwritten = tl.where(x.to(tl.int32, bitcast=True) == SENTINEL, 1, 0)
    if len(x.shape) == 3:
        unwritten = tl.max(unwritten, axis=2)
    return tl.max(tl.max(unwritten, axis=1), axis=0) == 0


@triton.jit
def _load_written(ptrs, mask, SLEEP: tl.constexpr = False):
    """Load tile ``ptrs`` once other programs (running at the same time) have written all of it.

    The buffer was filled with :data:`SENTINEL` by the solve's first launch and each element is
    written once, with its final value, so a tile with no sentinel left is complete, whatever
    the order in which the writes land: no fence or barrier between writer and reader. The
    first load is a plain one around L1 (``.cg``); the retries are ``volatile``, which the
    compiler cannot hoist out of the loop, but are ≈ 3× slower on a 64 KB tile, so callers
    first wait on a cheap hint (a flag or one element) that the tile is there.
    """
    x = tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")
    while not _written(x):
        _back_off(SLEEP)
        x = tl.load(ptrs, mask=mask, other=0.0, volatile=True)
    return x


@triton.jit
def _back_off(SLEEP: tl.constexpr):
    """With ``SLEEP`` (not in the interpreter): pause ≈ 0.1 µs (``nanosleep``) between polls.

    Waiting programs then leave the issue slots and L2 to the group kernel's programs beside
    them.
    """
    if SLEEP:
        tl.inline_asm_elementwise(
            "nanosleep.u32 100;", "=r", [], dtype=tl.int32, is_pure=False, pack=1
        )


@triton.jit
def _spin_until_written(ptr, SLEEP: tl.constexpr):
    """Spin (volatile reads) until the float at ``ptr`` is no longer :data:`SENTINEL`."""
    while tl.load(ptr, volatile=True).to(tl.int32, bitcast=True) == SENTINEL:
        _back_off(SLEEP)


@triton.jit
def _chain_correct_kernel(
    wg_ptr,
    z_ptr,
    x_ptr,
    done_ptr,
    n,
    d,
    e,
    NC,
    NG,
    ND,
    NU,
    S0,
    RNUM,
    RDEN,
    stride_wb,
    stride_wn,
    stride_zb,
    stride_zg,
    stride_xb,
    stride_xn,
    BC: tl.constexpr,
    BE: tl.constexpr,
    DP: tl.constexpr,
    SLEEP: tl.constexpr,
):
    """``X = X^{grp} − P^{grp} Z_g`` on chunk ``c``'s ``BE``-column tile, as soon as it can.

    Waits until its group's ``ND`` ``P`` tiles and ``NU`` ``U`` tiles are counted done
    (acquire, :func:`_group_kernel` with ``FUSED``), loads its rows of the group
    solution, then (``g > 0``; ``Z_0 = 0``) waits for ``Z_g`` (:func:`_spin_until_written`,
    :func:`_load_written`). Launched with programmatic dependent launch after the group
    kernel, whose programs all run before this launch starts: no deadlock. Its programs are
    small (4 warps, 32-column tiles), so they fit beside the group kernel's and wait there.

    Programs are launched chunk by chunk (the column tile varies fastest), so the early groups'
    corrections, which can run first, are not queued behind the late ones'. ``SLEEP``: back off
    between polls (:func:`_back_off`).
    """
    et = tl.program_id(0)
    c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    B = tl.num_programs(2)
    g = _group_of(c, S0, RNUM, RDEN, NC)
    _wait_flag(done_ptr + g * B + b, ND, SLEEP)
    _wait_flag(done_ptr + (NG + g) * B + b, NU, SLEEP)
    # the group's rows first: only the product waits for Z_g
    Xg, Pg = _group_rows(wg_ptr, b, c, et, n, d, e, stride_wb, stride_wn, BC, BE, DP, ".cg")
    if g == 0:
        X = Xg
    else:
        cd = tl.arange(0, DP)
        ce = et * BE + tl.arange(0, BE)
        zb = z_ptr + b * stride_zb + g * stride_zg
        _spin_until_written(zb + et * BE, SLEEP)
        Zg = _load_written(
            zb + cd[:, None] * e + ce[None, :], (cd < d)[:, None] & (ce < e)[None, :]
        )
        X = Xg - mm(Pg, Zg)
    _store_corrected(x_ptr, X, b, c, et, n, e, stride_xb, stride_xn, BC, BE)


@triton.jit
def _state_kernel(
    sg_ptr,
    z_ptr,
    d,
    e,
    F,
    NG,
    stride_sb,
    stride_sg,
    stride_zb,
    stride_zg,
    BE: tl.constexpr,
    DP: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """The state scan across groups (unfused): store ``Z_g``, then ``Z ← Z − G_g Z + B_g``.

    One program per batch entry and ``BE``-column tile of ``e``, after the group kernel
    (``griddepcontrol.wait``). The fused scan does these steps in the group kernel instead.
    """
    et = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    wait_for_previous_launch(USE_PDL)
    cd = tl.arange(0, DP)
    md = (cd < d)[:, None]
    ce = et * BE + tl.arange(0, BE)
    me = (ce < e)[None, :]
    Z = tl.zeros((DP, BE), dtype=tl.float32)
    for g in range(0, NG):
        tl.store(
            z_ptr + b * stride_zb + g * stride_zg + cd[:, None] * e + ce[None, :], Z, mask=md & me
        )
        if g + 1 < NG:  # the last group's outgoing state is not needed
            Z = _state_step(Z, sg_ptr + b * stride_sb + g * stride_sg + cd[:, None] * F,
                            cd, ce, d, e)  # fmt: skip


@triton.jit
def _correct_kernel(
    wg_ptr,
    z_ptr,
    x_ptr,
    n,
    d,
    e,
    NC,
    S0,
    RNUM,
    RDEN,
    stride_wb,
    stride_wn,
    stride_zb,
    stride_zg,
    stride_xb,
    stride_xn,
    BC: tl.constexpr,
    BE: tl.constexpr,
    DP: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    """``X = X^{grp} − P^{grp} Z_g`` on chunk ``c``'s ``BE``-column tile (unfused scan)."""
    c = tl.program_id(0)
    et = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    g = _group_of(c, S0, RNUM, RDEN, NC)
    wait_for_previous_launch(USE_PDL)
    cd = tl.arange(0, DP)
    ce = et * BE + tl.arange(0, BE)
    Zg = tl.load(
        z_ptr + b * stride_zb + g * stride_zg + cd[:, None] * e + ce[None, :],
        mask=(cd < d)[:, None] & (ce < e)[None, :],
        other=0.0,
    )
    Xg, Pg = _group_rows(wg_ptr, b, c, et, n, d, e, stride_wb, stride_wn, BC, BE, DP, "")
    _store_corrected(x_ptr, Xg - mm(Pg, Zg), b, c, et, n, e, stride_xb, stride_xn, BC, BE)


def plan_for(Q: torch.Tensor, e: int, config: TriSolveConfig) -> ScanPlan:
    """The scan's plan (:func:`matfn.triangular.schedule.scan_plan`) for ``Q`` ``(B, n, d)``.

    The SM count caps the fused scan's groups on CUDA; the interpreter and CPU have no cap.
    """
    B, n, d = Q.shape
    BF = config.scan_block
    programs = B * (triton.cdiv(d, BF) + triton.cdiv(e, BF))
    sms = None if INTERPRET or not Q.is_cuda else sm_count(Q.device.index)
    NC = triton.cdiv(n, config.chunk_size)
    return scan_plan(
        NC, config.chunk_size, d, programs, sms, config.scan_ratio, config.min_groups_per_wave
    )


def solve_scan(
    Q: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor,
    lam: torch.Tensor,
    X: torch.Tensor,
    config: TriSolveConfig,
    plan: ScanPlan | None = None,
) -> torch.Tensor:
    """The scan solve (module docstring) into ``X``; ``plan`` defaults to :func:`plan_for`'s.

    Takes checked, contiguous float32 operands (:func:`matfn.triangular.solve.tri_solve_triton`).
    """
    C = config.chunk_size
    B, n, d = Q.shape
    e = V.shape[-1]
    NC = triton.cdiv(n, C)
    F = e + d
    DP = pow2(d)
    BF = config.scan_block
    ND, NU = triton.cdiv(d, BF), triton.cdiv(e, BF)  # column tiles of P and of U
    NFT = ND + NU
    fused, S0, RNUM, RDEN, NG = plan or plan_for(Q, e, config)
    NS = max(1, min(config.scan_slices, DP // 16))
    W = torch.empty(B, n, F, dtype=torch.float32, device=Q.device)
    Wg = torch.empty_like(W)
    Sg = torch.empty(B, NG, d, F, dtype=torch.float32, device=Q.device)
    # fused: [done (2, NG, B) | pad | Z] in one buffer, which the chunk kernel zeroes (the
    # flags) and fills with SENTINEL (Z: not yet written)
    n_zero = 32 * triton.cdiv(2 * NG * B, 32)
    scratch = torch.empty(n_zero + B * NG * d * e, dtype=torch.int32, device=Q.device)
    done = scratch[:n_zero]
    Z = scratch[n_zero:].view(torch.float32).view(B, NG, d, e)
    chunk_pass(
        Q,
        K,
        lam,
        chunk_size=C,
        block_s=config.block_s,
        warps=config.chunk_warps,
        V=V,
        P=W[..., e:],
        U=W,
        BE=32,
        scratch=(scratch, n_zero) if fused else None,
        whole=e <= 128,
    )
    pdl_on = use_pdl(Q)
    pdl = pdl_flags(pdl_on)  # every launch after the chunk kernel waits for the one before
    _group_kernel[(NG, NFT, B)](
        W,
        K,
        Wg,
        Sg,
        Z,
        done,
        n,
        d,
        e,
        F,
        NC,
        NG,
        ND,
        S0,
        RNUM,
        RDEN,
        W.stride(0),
        W.stride(1),
        K.stride(0),
        K.stride(1),
        Sg.stride(0),
        Sg.stride(1),
        Z.stride(0),
        Z.stride(1),
        BC=C,
        BF=BF,
        DP=DP,
        NS=NS,
        FUSED=fused,
        SLEEP=not INTERPRET,
        num_warps=config.scan_warps,
        **pdl,
    )
    if NG == 1:
        X.copy_(Wg[..., :e])
        return X
    BE = config.state_block
    NE = triton.cdiv(e, BE)
    if fused:
        # no griddepcontrol.wait: the flags and sentinels order every access (docstrings)
        _chain_correct_kernel[(NE, NC, B)](
            Wg,
            Z,
            X,
            done,
            n,
            d,
            e,
            NC,
            NG,
            ND,
            NU,
            S0,
            RNUM,
            RDEN,
            Wg.stride(0),
            Wg.stride(1),
            Z.stride(0),
            Z.stride(1),
            X.stride(0),
            X.stride(1),
            BC=C,
            BE=BE,
            DP=DP,
            SLEEP=not INTERPRET,
            num_warps=4,
            **({"launch_pdl": True} if pdl_on else {}),
        )
        return X
    _state_kernel[(NE, B)](
        Sg,
        Z,
        d,
        e,
        F,
        NG,
        Sg.stride(0),
        Sg.stride(1),
        Z.stride(0),
        Z.stride(1),
        BE=BE,
        DP=DP,
        num_warps=config.state_warps,
        **pdl,
    )
    BEc = 32
    _correct_kernel[(NC, triton.cdiv(e, BEc), B)](
        Wg,
        Z,
        X,
        n,
        d,
        e,
        NC,
        S0,
        RNUM,
        RDEN,
        Wg.stride(0),
        Wg.stride(1),
        Z.stride(0),
        Z.stride(1),
        X.stride(0),
        X.stride(1),
        BC=C,
        BE=BEc,
        DP=DP,
        num_warps=4,
        **pdl,
    )
    return X
