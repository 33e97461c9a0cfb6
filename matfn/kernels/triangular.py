r"""Triton kernels for ``tri_inv`` / ``tri_solve`` on ``T = Λ + tril(Q Kᵀ, −1)`` (math spec §5).

Torch twins: :mod:`matfn.triangular` (``_tri_inv_torch`` and the chunked forms). Everything runs in
float32. ``precision`` / ``scan_precision`` pick how the products are done: ``"3xtf32"`` (the
default) splits each fp32 operand into a tf32 ``hi`` and a ``lo`` part in the kernel and adds three
tf32 tensor-core products (:func:`matfn.kernels.triangular_chunk._mm`), fp32-accurate (≈ 1e-6
relative at n = 4096 against float64) and the fastest measured; ``"tf32x3"`` is Triton's own
version of it; ``"ieee"`` is fp32 FMA (3–4× slower); ``"tf32"`` is one tf32 product (≈ 1e-4
relative, as fla's ``chunk_scaled_dot_kkt``; an option for speed, never a default).

Known trap (H100, Triton 3.6): a tensor-core ``tl.dot`` of a 64-row tile by a 16-column tile in a
kernel launched with 8 warps returned wrong results in the solve's group kernel (0.6 relative
error, with ``"tf32x3"`` and ``"3xtf32"`` alike; the interpreter and ``"ieee"`` were right). The
same kernel with 4 warps, with 32 columns, or with 32-row chunks is right (errors ≤ 1.5e-6), so
the launcher never picks that shape (``scan_block`` is 32 for 64-row chunks with 8 warps).

**Chunk kernel** (one program per ``C``-row chunk, :mod:`matfn.kernels.triangular_chunk`):
``Y_cc = (Λ_c + tril(Q_c K_cᵀ, −1))⁻¹`` and the products ``P = Y_cc Q_c``, ``R = Y_ccᵀ K_c``,
``U = Y_cc V_c`` that the levels below start from.

**Inverse** (divide and conquer). With ``P^{(s)} = blkdiag_s(T)⁻¹ Q`` and
``R^{(s)} = blkdiag_s(T)⁻ᵀ K`` (blocks of ``s`` rows), the off-diagonal block of a ``2s``-block
``[[A,0],[C,B]]`` (``C = Q₂K₁ᵀ`` is rank ``d``) is ``−B⁻¹Q₂K₁ᵀA⁻¹ = −P₂^{(s)} R₁^{(s)ᵀ}``.
Levels are built bottom-up, each fully parallel: ``G_b = K_bᵀ P_b^{(s)}`` (``d×d`` per block),
then ``P₂^{(2s)} = P₂^{(s)} (I − G₁)`` and ``R₁^{(2s)} = R₁^{(s)} (I − G₂)ᵀ``. Only the chunks'
Grams contract over rows (one launch); a parent's Gram follows from its children's,
``G = G₁ + G₂ − G₂ G₁`` (``d³`` per pair), computed by extra programs of the level launch before
it, so each level is one launch. One last launch writes every ``C×C`` tile ``(I, J)``, ``I > J``,
as ``−P_I^{(s)} R_J^{(s)ᵀ}`` at the level ``s = C·2^{⌊log₂(I xor J)⌋}`` where the two chunks
first share a block. Launches: ``L + 2`` with ``L = ⌈log₂(n/C)⌉`` (8 at n = 4096, C = 64;
contracting each level's Grams over its ``s`` rows took ``2L + 2`` launches and 72 µs of the
230 µs on the H100); FLOPs ``d n² + 2 n d² L + (n/C) d³`` plus the chunk inverses.

**Solve** (two-level scan, 4 launches). Chunks form ``NG ≈ √(n/C)`` groups. (1) chunk kernel:
``W = [Y_cc V_c | Y_cc Q_c]``; (2) inside each group, sequentially over its chunks, the chunk
recursion on ``W``'s columns from a zero state (parallel over groups × column tiles), giving
``[X^{grp} | P^{grp}]`` and the group sums ``[K_gᵀ X^{grp} | K_gᵀ P^{grp}] = [B_g | G_g]``;
(3) the state scan ``Z_{g+1} = (I − G_g) Z_g + B_g`` over groups (parallel over ``e`` tiles);
(4) ``X_g = X^{grp}_g − P^{grp}_g Z_g`` (parallel).

All offsets are 64-bit. ``tl.dot`` needs every block dim ≥ 16.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .triangular_chunk import _mm, _tri_chunk_blocked_kernel, _tri_chunk_kernel

__all__ = ["tri_inv_triton", "tri_solve_triton", "PRECISIONS", "CHUNK_IMPLS"]

PRECISIONS = ("ieee", "tf32x3", "3xtf32", "tf32")
CHUNK_IMPLS = ("dense", "blocked")


@triton.jit
def _tri_gram_kernel(
    k_ptr,
    p_ptr,
    g_ptr,
    n,
    d,
    stride_kb,
    stride_kn,
    stride_pb,
    stride_pn,
    stride_gb,
    stride_gk,
    BT: tl.constexpr,
    BG: tl.constexpr,
    PREC: tl.constexpr,
):
    """``G_c = K_cᵀ P_c`` over the ``BT`` rows of chunk ``c`` (one ``BG×BG`` tile).

    Only the chunks' Grams contract over rows; the levels above combine them
    (:func:`_gram_combine_tile`).
    """
    blk = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    ng = tl.cdiv(d, BG)
    ci = (t // ng) * BG + tl.arange(0, BG)
    cj = (t % ng) * BG + tl.arange(0, BG)
    rows = blk * BT + tl.arange(0, BT)
    rm = rows < n
    kt = tl.load(
        k_ptr + b * stride_kb + rows[:, None] * stride_kn + ci[None, :],
        mask=rm[:, None] & (ci < d)[None, :],
        other=0.0,
    )
    pt = tl.load(
        p_ptr + b * stride_pb + rows[:, None] * stride_pn + cj[None, :],
        mask=rm[:, None] & (cj < d)[None, :],
        other=0.0,
    )
    acc = _mm(tl.trans(kt), pt, PREC)
    gp = g_ptr + b * stride_gb + blk * stride_gk + ci[:, None] * d + cj[None, :]
    tl.store(gp, acc, mask=(ci < d)[:, None] & (cj < d)[None, :])


@triton.jit
def _update_tile(
    t,
    jt,
    b,
    pin_ptr,
    rin_ptr,
    g_ptr,
    pout_ptr,
    rout_ptr,
    n,
    d,
    s,
    stride_pb,
    stride_pn,
    stride_gb,
    stride_gk,
    BT: tl.constexpr,
    BD: tl.constexpr,
    PREC: tl.constexpr,
):
    """Level ``s → 2s`` on one ``BT×BD`` tile of ``P`` and ``R``.

    ``P₂ ← P₂ (I − G₁)`` on second halves, ``R₁ ← R₁ (I − G₂)ᵀ`` on first halves (``BT`` divides
    ``s``, so a tile lies in one block).
    """
    rows = t * BT + tl.arange(0, BT)
    rm = rows < n
    blk = (t * BT) // s
    odd = (blk % 2) == 1
    partner = (blk + 1) * s < n
    base = b * stride_pb + rows[:, None] * stride_pn
    cj = jt * BD + tl.arange(0, BD)
    mj = rm[:, None] & (cj < d)[None, :]
    accP = tl.load(pin_ptr + base + cj[None, :], mask=mj, other=0.0)
    accR = tl.load(rin_ptr + base + cj[None, :], mask=mj, other=0.0)
    if odd:
        gb = g_ptr + b * stride_gb + (blk - 1) * stride_gk
        for k0 in range(0, d, BD):
            ck = k0 + tl.arange(0, BD)
            mk = rm[:, None] & (ck < d)[None, :]
            xk = tl.load(pin_ptr + base + ck[None, :], mask=mk, other=0.0)
            gt = tl.load(
                gb + ck[:, None] * d + cj[None, :],
                mask=(ck < d)[:, None] & (cj < d)[None, :],
                other=0.0,
            )
            accP -= _mm(xk, gt, PREC)
    elif partner:
        gb = g_ptr + b * stride_gb + (blk + 1) * stride_gk
        for k0 in range(0, d, BD):
            ck = k0 + tl.arange(0, BD)
            mk = rm[:, None] & (ck < d)[None, :]
            xk = tl.load(rin_ptr + base + ck[None, :], mask=mk, other=0.0)
            gt = tl.load(
                gb + cj[None, :] * d + ck[:, None],
                mask=(ck < d)[:, None] & (cj < d)[None, :],
                other=0.0,
            )
            accR -= _mm(xk, gt, PREC)
    tl.store(pout_ptr + base + cj[None, :], accP, mask=mj)
    tl.store(rout_ptr + base + cj[None, :], accR, mask=mj)


@triton.jit
def _gram_combine_tile(
    pair,
    tile,
    b,
    gin_ptr,
    gout_ptr,
    nblk,
    d,
    stride_gb,
    stride_gk,
    BG: tl.constexpr,
    PREC: tl.constexpr,
):
    """One ``BG×BG`` tile of the parent Gram ``G = G₁ + G₂ − G₂ G₁``.

    The children are blocks ``2·pair`` and ``2·pair + 1`` (``G₂ = 0`` when the second lies past
    ``n``): with ``P₂^{(2s)} = P₂ (I − G₁)``, ``K_bᵀ P_b^{(2s)} = G₁ + G₂ (I − G₁)``.
    """
    ng = tl.cdiv(d, BG)
    ci = (tile // ng) * BG + tl.arange(0, BG)
    cj = (tile % ng) * BG + tl.arange(0, BG)
    mij = (ci < d)[:, None] & (cj < d)[None, :]
    g1 = gin_ptr + b * stride_gb + (2 * pair) * stride_gk
    g2 = g1 + stride_gk
    acc = tl.load(g1 + ci[:, None] * d + cj[None, :], mask=mij, other=0.0)
    if 2 * pair + 1 < nblk:
        acc += tl.load(g2 + ci[:, None] * d + cj[None, :], mask=mij, other=0.0)
        for k0 in range(0, d, BG):
            ck = k0 + tl.arange(0, BG)
            a = tl.load(
                g2 + ci[:, None] * d + ck[None, :],
                mask=(ci < d)[:, None] & (ck < d)[None, :],
                other=0.0,
            )
            c = tl.load(
                g1 + ck[:, None] * d + cj[None, :],
                mask=(ck < d)[:, None] & (cj < d)[None, :],
                other=0.0,
            )
            acc -= _mm(a, c, PREC)
    tl.store(
        gout_ptr + b * stride_gb + pair * stride_gk + ci[:, None] * d + cj[None, :], acc, mask=mij
    )


@triton.jit
def _tri_level_kernel(
    pin_ptr,
    rin_ptr,
    gin_ptr,
    pout_ptr,
    rout_ptr,
    gout_ptr,
    n,
    d,
    s,
    n_update,
    stride_pb,
    stride_pn,
    stride_gb,
    stride_gk,
    BT: tl.constexpr,
    BD: tl.constexpr,
    BG: tl.constexpr,
    COMBINE: tl.constexpr,
    PREC: tl.constexpr,
):
    """One level ``s → 2s`` in one launch.

    Programs ``< n_update`` update ``P, R`` tiles (:func:`_update_tile`); with ``COMBINE`` the
    rest build the next level's Grams from this level's (:func:`_gram_combine_tile`).
    """
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    if pid < n_update:
        ntj = tl.cdiv(d, BD)
        _update_tile(
            (pid // ntj).to(tl.int64),
            (pid % ntj).to(tl.int64),
            b,
            pin_ptr,
            rin_ptr,
            gin_ptr,
            pout_ptr,
            rout_ptr,
            n,
            d,
            s,
            stride_pb,
            stride_pn,
            stride_gb,
            stride_gk,
            BT,
            BD,
            PREC,
        )
    elif COMBINE:
        q = pid - n_update
        ngt = tl.cdiv(d, BG) * tl.cdiv(d, BG)
        _gram_combine_tile(
            (q // ngt).to(tl.int64),
            q % ngt,
            b,
            gin_ptr,
            gout_ptr,
            tl.cdiv(n, s),
            d,
            stride_gb,
            stride_gk,
            BG,
            PREC,
        )


@triton.jit
def _tri_offdiag_kernel(
    p_ptr,
    r_ptr,
    y_ptr,
    n,
    d,
    stride_pl,
    stride_pb,
    stride_pn,
    stride_yb,
    stride_yn,
    BT: tl.constexpr,
    BD: tl.constexpr,
    PREC: tl.constexpr,
):
    """Tile ``(I, J)``: zeros above the diagonal, ``−P_I^{(s)} R_J^{(s)ᵀ}`` below it."""
    ti = tl.program_id(0)
    tj = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    ri = ti.to(tl.int64) * BT + tl.arange(0, BT)
    rj = tj.to(tl.int64) * BT + tl.arange(0, BT)
    mi = ri < n
    mj = rj < n
    yp = y_ptr + b * stride_yb + ri[:, None] * stride_yn + rj[None, :]
    if ti < tj:
        tl.store(yp, tl.zeros((BT, BT), dtype=tl.float32), mask=mi[:, None] & mj[None, :])
    elif ti > tj:
        x = ti ^ tj
        lvl = 0
        for k in tl.static_range(1, 31):
            lvl += ((x >> k) > 0).to(tl.int32)
        pb = p_ptr + lvl.to(tl.int64) * stride_pl + b * stride_pb
        rb = r_ptr + lvl.to(tl.int64) * stride_pl + b * stride_pb
        acc = tl.zeros((BT, BT), dtype=tl.float32)
        for d0 in range(0, d, BD):
            cd = d0 + tl.arange(0, BD)
            md = (cd < d)[None, :]
            pt = tl.load(
                pb + ri[:, None] * stride_pn + cd[None, :], mask=mi[:, None] & md, other=0.0
            )
            rt = tl.load(
                rb + rj[:, None] * stride_pn + cd[None, :], mask=mj[:, None] & md, other=0.0
            )
            acc -= _mm(pt, tl.trans(rt), PREC)
        tl.store(yp, acc, mask=mi[:, None] & mj[None, :])


@triton.jit
def _tri_group_kernel(
    w_ptr,
    k_ptr,
    wg_ptr,
    sg_ptr,
    n,
    d,
    e,
    F,
    GS,
    stride_wb,
    stride_wn,
    stride_kb,
    stride_kn,
    stride_sb,
    stride_sg,
    BC: tl.constexpr,
    BF: tl.constexpr,
    DP: tl.constexpr,
    PREC: tl.constexpr,
):
    """Chunk recursion from a zero state inside group ``g`` on ``BF`` columns of ``[U | P]``."""
    g = tl.program_id(0).to(tl.int64)
    ft = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    cf = ft * BF + tl.arange(0, BF)
    mf = (cf < F)[None, :]
    cd = tl.arange(0, DP)
    md = (cd < d)[None, :]
    S = tl.zeros((DP, BF), dtype=tl.float32)
    for c in range(0, GS):
        rows = (g * GS + c) * BC + tl.arange(0, BC)
        rm = (rows < n)[:, None]
        wrow = w_ptr + b * stride_wb + rows[:, None] * stride_wn
        Wc = tl.load(wrow + cf[None, :], mask=rm & mf, other=0.0)
        Pc = tl.load(wrow + e + cd[None, :], mask=rm & md, other=0.0)
        Kc = tl.load(
            k_ptr + b * stride_kb + rows[:, None] * stride_kn + cd[None, :], mask=rm & md, other=0.0
        )
        Xc = Wc - _mm(Pc, S, PREC)
        tl.store(wg_ptr + b * stride_wb + rows[:, None] * stride_wn + cf[None, :], Xc, mask=rm & mf)
        S += _mm(tl.trans(Kc), Xc, PREC)
    sp = sg_ptr + b * stride_sb + g * stride_sg + cd[:, None] * F + cf[None, :]
    tl.store(sp, S, mask=(cd < d)[:, None] & mf)


@triton.jit
def _tri_state_kernel(
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
    DP: tl.constexpr,
    BE: tl.constexpr,
    PREC: tl.constexpr,
):
    """Across groups: store the incoming state ``Z_g``, then ``Z ← Z − G_g Z + B_g``."""
    et = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    ce = et * BE + tl.arange(0, BE)
    me = (ce < e)[None, :]
    cd = tl.arange(0, DP)
    md = (cd < d)[:, None]
    Z = tl.zeros((DP, BE), dtype=tl.float32)
    for g in range(0, NG):
        tl.store(
            z_ptr + b * stride_zb + g * stride_zg + cd[:, None] * e + ce[None, :], Z, mask=md & me
        )
        sb = sg_ptr + b * stride_sb + g * stride_sg + cd[:, None] * F
        G = tl.load(sb + e + cd[None, :], mask=md & (cd < d)[None, :], other=0.0)
        Bg = tl.load(sb + ce[None, :], mask=md & me, other=0.0)
        Z = Z - _mm(G, Z, PREC) + Bg


@triton.jit
def _tri_correct_kernel(
    wg_ptr,
    z_ptr,
    x_ptr,
    n,
    d,
    e,
    GROUP_ROWS,
    stride_wb,
    stride_wn,
    stride_zb,
    stride_zg,
    stride_xb,
    stride_xn,
    BT: tl.constexpr,
    BE: tl.constexpr,
    DP: tl.constexpr,
    PREC: tl.constexpr,
):
    """``X = X^{grp} − P^{grp} Z_g`` for one ``BT×BE`` tile."""
    t = tl.program_id(0).to(tl.int64)
    et = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    rows = t * BT + tl.arange(0, BT)
    rm = (rows < n)[:, None]
    ce = et * BE + tl.arange(0, BE)
    me = (ce < e)[None, :]
    cd = tl.arange(0, DP)
    g = (t * BT) // GROUP_ROWS
    wrow = wg_ptr + b * stride_wb + rows[:, None] * stride_wn
    Xg = tl.load(wrow + ce[None, :], mask=rm & me, other=0.0)
    Pg = tl.load(wrow + e + cd[None, :], mask=rm & (cd < d)[None, :], other=0.0)
    Zg = tl.load(
        z_ptr + b * stride_zb + g * stride_zg + cd[:, None] * e + ce[None, :],
        mask=(cd < d)[:, None] & me,
        other=0.0,
    )
    X = Xg - _mm(Pg, Zg, PREC)
    tl.store(x_ptr + b * stride_xb + rows[:, None] * stride_xn + ce[None, :], X, mask=rm & me)


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, 1 << max(0, (x - 1).bit_length()))


def _check(
    Q: torch.Tensor,
    K: torch.Tensor,
    lam: torch.Tensor,
    chunk_size: int,
    block_s: int,
    precision: str,
) -> None:
    if Q.dtype != torch.float32 or K.dtype != torch.float32 or lam.dtype != torch.float32:
        raise TypeError("the triangular kernels take float32 Q, K and diag")
    if Q.ndim != 3 or K.shape != Q.shape or lam.shape != Q.shape[:2]:
        raise ValueError(
            f"expected Q, K (B, n, d) and diag (B, n), got {Q.shape}, {K.shape}, {lam.shape}"
        )
    if chunk_size not in (16, 32, 64) or block_s not in (1, 16, 32) or block_s > chunk_size:
        raise ValueError(
            f"chunk_size must be 16/32/64 and block_s 1/16/32 ≤ chunk_size, got "
            f"{chunk_size}, {block_s}"
        )
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def _out(out: torch.Tensor | None, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=torch.float32, device=device)
    if out.shape != shape or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"`out` must be a contiguous float32 tensor of shape {shape}")
    return out


def _chunk_kernel(chunk_impl: str, chunk_size: int, block_s: int):
    """The chunk kernel and its ``BC/BS/LOG_M`` meta-parameters for ``chunk_impl``."""
    if chunk_impl not in CHUNK_IMPLS:
        raise ValueError(f"chunk_impl must be one of {CHUNK_IMPLS}, got {chunk_impl!r}")
    if chunk_impl == "blocked":
        if chunk_size != 64:
            raise ValueError(f"chunk_impl='blocked' needs chunk_size=64, got {chunk_size}")
        return _tri_chunk_blocked_kernel, {"BC": 64, "BS": 16, "LOG_M": 2}  # block_s unused
    meta = {"BC": chunk_size, "BS": block_s, "LOG_M": int(math.log2(chunk_size // block_s))}
    return _tri_chunk_kernel, meta


def tri_inv_triton(
    Q: torch.Tensor,
    K: torch.Tensor,
    lam: torch.Tensor,
    *,
    chunk_size: int = 64,
    block_s: int = 16,
    precision: str = "3xtf32",
    chunk_impl: str = "dense",
    chunk_warps: int = 4,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``T⁻¹`` for float32 ``Q, K`` ``(B, n, d)`` and ``λ`` ``(B, n)``; returns ``(B, n, n)``.

    ``out``: an optional contiguous float32 ``(B, n, n)`` result buffer (tests poison it);
    ``chunk_warps``: warps of the chunk kernel (a tuning knob for the benchmark);
    ``chunk_impl``: ``"dense"`` (``_tri_chunk_kernel``) or ``"blocked"``
    (``_tri_chunk_blocked_kernel``, ``chunk_size = 64`` only, ``block_s`` ignored).
    """
    _check(Q, K, lam, chunk_size, block_s, precision)
    chunk_kernel, chunk_meta = _chunk_kernel(chunk_impl, chunk_size, block_s)
    Q, K, lam = Q.contiguous(), K.contiguous(), lam.contiguous()
    B, n, d = Q.shape
    Y = _out(out, (B, n, n), Q.device)
    if B == 0 or n == 0:
        return Y
    C = chunk_size
    NC = triton.cdiv(n, C)
    L = (NC - 1).bit_length()
    BD = min(64, _pow2(d))
    if L:
        P_all = torch.empty(L, B, n, d, dtype=torch.float32, device=Q.device)
        R_all = torch.empty_like(P_all)
        G_cur = torch.empty(B, NC, d, d, dtype=torch.float32, device=Q.device)
        G_next = torch.empty_like(G_cur) if L > 2 else G_cur  # L ≤ 2: no level combines
        p0, r0 = P_all[0], R_all[0]
    else:
        P_all = R_all = p0 = r0 = Y
    chunk_kernel[(NC, B)](
        Q,
        K,
        lam,
        Q,
        Y,
        p0,
        r0,
        Q,
        n,
        d,
        0,
        Q.stride(0),
        Q.stride(1),
        lam.stride(0),
        0,
        0,
        Y.stride(0),
        Y.stride(1),
        n * d,
        d,
        0,
        0,
        BD=BD,
        BE=16,
        STORE_Y=True,
        STORE_P=L > 0,
        STORE_R=L > 0,
        HAS_V=False,
        PREC=precision,
        num_warps=chunk_warps,
        **chunk_meta,
    )
    if L == 0:
        return Y
    # Grams of the chunks, G_c = K_cᵀ P_c; each level's launch also combines its Grams into
    # the next level's (G = G₁ + G₂ − G₂ G₁), so no launch contracts over more than C rows
    BG = min(32, _pow2(d))
    ngt = triton.cdiv(d, BG) ** 2
    _tri_gram_kernel[(NC, ngt, B)](
        K,
        P_all[0],
        G_cur,
        n,
        d,
        K.stride(0),
        K.stride(1),
        n * d,
        d,
        G_cur.stride(0),
        G_cur.stride(1),
        BT=C,
        BG=BG,
        PREC=precision,
        num_warps=4,
    )
    BTu = min(32, C)  # more programs: at B = 1 a level is only n/BTu × d/BD tiles
    n_update = triton.cdiv(n, BTu) * triton.cdiv(d, BD)
    for lv in range(L - 1):
        s = C << lv
        combine = lv < L - 2  # the last level's Grams are not used
        n_combine = triton.cdiv(triton.cdiv(n, s), 2) * ngt if combine else 0
        _tri_level_kernel[(n_update + n_combine, B)](
            P_all[lv],
            R_all[lv],
            G_cur,
            P_all[lv + 1],
            R_all[lv + 1],
            G_next,
            n,
            d,
            s,
            n_update,
            n * d,
            d,
            G_cur.stride(0),
            G_cur.stride(1),
            BT=BTu,
            BD=BD,
            BG=BG,
            COMBINE=combine,
            PREC=precision,
            num_warps=4,
        )
        G_cur, G_next = G_next, G_cur
    _tri_offdiag_kernel[(NC, NC, B)](
        P_all,
        R_all,
        Y,
        n,
        d,
        P_all.stride(0),
        P_all.stride(1),
        P_all.stride(2),
        Y.stride(0),
        Y.stride(1),
        BT=C,
        BD=BD,
        PREC=precision,
        num_warps=4,
    )
    return Y


def tri_solve_triton(
    Q: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor,
    lam: torch.Tensor,
    *,
    chunk_size: int = 32,
    block_s: int = 16,
    group_size: int | None = None,
    precision: str = "3xtf32",
    chunk_impl: str = "dense",
    chunk_warps: int = 4,
    scan_precision: str = "3xtf32",
    scan_warps: int | None = None,
    scan_block: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``T⁻¹ V`` for float32 ``Q, K`` ``(B, n, d)``, ``V`` ``(B, n, e)``, ``λ`` ``(B, n)``.

    ``group_size``: chunks per group of the two-level scan (default ``≈ √(n/C)``); ``out``: an
    optional contiguous float32 ``(B, n, e)`` result buffer; ``chunk_impl``: as in
    :func:`tri_inv_triton`; ``scan_precision``: the dot mode of the group, state and correction
    kernels; ``scan_warps`` / ``scan_block``: warps and column-tile width of the group and state
    kernels (tuning knobs for the benchmark; default 4 warps for ``d ≤ 64``, else 8, and 16
    columns, or 32 for 64-row chunks with 8 warps: the module docstring's known trap).
    """
    _check(Q, K, lam, chunk_size, block_s, precision)
    if scan_precision not in PRECISIONS:
        raise ValueError(f"scan_precision must be one of {PRECISIONS}, got {scan_precision!r}")
    if scan_block not in (None, 16, 32, 64) or scan_warps not in (None, 1, 2, 4, 8):
        raise ValueError(
            f"scan_block must be 16/32/64 and scan_warps 1/2/4/8, got {scan_block}, {scan_warps}"
        )
    chunk_kernel, chunk_meta = _chunk_kernel(chunk_impl, chunk_size, block_s)
    if V.dtype != torch.float32 or V.ndim != 3 or V.shape[:2] != Q.shape[:2]:
        raise ValueError(f"expected float32 V (B, n, e), got {V.dtype} {tuple(V.shape)}")
    if Q.shape[-1] > 128:
        # the group/state kernels keep d-wide tiles in shared memory (> 227 KB for d = 256)
        raise ValueError(f"tri_solve_triton supports d ≤ 128, got d = {Q.shape[-1]}")
    Q, K, V, lam = Q.contiguous(), K.contiguous(), V.contiguous(), lam.contiguous()
    B, n, d = Q.shape
    e = V.shape[-1]
    X = _out(out, (B, n, e), Q.device)
    if B == 0 or n == 0 or e == 0:
        return X
    C = chunk_size
    NC = triton.cdiv(n, C)
    # balance the two sequential parts: a group step costs ≈ 4·C·d per column, a state step
    # ≈ 2·d² per column, so GS ≈ √(NC · d / 2C) chunks per group (8 for n = 4096, d = 128, C = 64)
    GS = group_size or max(1, round(math.sqrt(NC * d / (2 * C))))
    NG = triton.cdiv(NC, GS)
    F = e + d
    DP = _pow2(d)
    BD = min(64, DP)
    warps = scan_warps or (4 if DP <= 64 else 8)
    BF = scan_block or (32 if C >= 64 and warps == 8 else 16)
    if C >= 64 and BF == 16 and warps == 8 and scan_precision != "ieee":
        raise ValueError(
            "chunk_size=64 with scan_block=16 and 8 scan warps gives wrong tensor-core products "
            "on the H100 with Triton 3.6 (module docstring); use scan_block=32 or scan_warps=4"
        )
    W = torch.empty(B, n, F, dtype=torch.float32, device=Q.device)
    Wg = torch.empty_like(W)
    Sg = torch.empty(B, NG, d, F, dtype=torch.float32, device=Q.device)
    Z = torch.empty(B, NG, d, e, dtype=torch.float32, device=Q.device)
    chunk_kernel[(NC, B)](
        Q,
        K,
        lam,
        V,
        W,
        W[..., e:],
        W,
        W,
        n,
        d,
        e,
        Q.stride(0),
        Q.stride(1),
        lam.stride(0),
        V.stride(0),
        V.stride(1),
        0,
        0,
        W.stride(0),
        W.stride(1),
        W.stride(0),
        W.stride(1),
        BD=BD,
        BE=32,
        STORE_Y=False,
        STORE_P=True,
        STORE_R=False,
        HAS_V=True,
        PREC=precision,
        num_warps=chunk_warps,
        **chunk_meta,
    )
    _tri_group_kernel[(NG, triton.cdiv(F, BF), B)](
        W,
        K,
        Wg,
        Sg,
        n,
        d,
        e,
        F,
        GS,
        W.stride(0),
        W.stride(1),
        K.stride(0),
        K.stride(1),
        Sg.stride(0),
        Sg.stride(1),
        BC=C,
        BF=BF,
        DP=DP,
        PREC=scan_precision,
        num_warps=warps,
    )
    if NG == 1:
        X.copy_(Wg[..., :e])
        return X
    BE = BF
    _tri_state_kernel[(triton.cdiv(e, BE), B)](
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
        DP=DP,
        BE=BE,
        PREC=scan_precision,
        num_warps=warps,
    )
    BEc = 32
    _tri_correct_kernel[(NC, triton.cdiv(e, BEc), B)](
        Wg,
        Z,
        X,
        n,
        d,
        e,
        GS * C,
        Wg.stride(0),
        Wg.stride(1),
        Z.stride(0),
        Z.stride(1),
        X.stride(0),
        X.stride(1),
        BT=C,
        BE=BEc,
        DP=DP,
        PREC=scan_precision,
        num_warps=4,
    )
    return X
