r"""``tri_inv`` on CUDA: ``T⁻¹`` for ``T = Λ + tril(Q Kᵀ, −1)`` by divide and conquer.

With ``P^{(s)} = blkdiag_s(T)⁻¹ Q`` and ``R^{(s)} = blkdiag_s(T)⁻ᵀ K`` (blocks of ``s`` rows;
docs/math.md §5.2),
the off-diagonal block of a ``2s``-block ``[[A,0],[C,B]]`` (``C = Q₂K₁ᵀ`` is rank ``d``) is
``−B⁻¹Q₂K₁ᵀA⁻¹ = −P₂^{(s)} R₁^{(s)ᵀ}``. Launches:

1. the chunk kernel (:func:`matfn.triangular.chunk.tri_chunk_kernel`): the ``C×C`` diagonal
   tiles ``Y_cc`` into the result, and ``P^{(C)}``, ``R^{(C)}``;
2. the chunks' Grams ``G_c = K_cᵀ P_c^{(C)}`` (``d×d``): the only contraction over rows;
3. one launch per level ``s → 2s``, fully parallel: ``P₂^{(2s)} = P₂^{(s)} (I − G₁)`` and
   ``R₁^{(2s)} = R₁^{(s)} (I − G₂)ᵀ``, and by extra programs the next level's Grams from this
   level's, ``G = G₁ + G₂ − G₂ G₁`` (:func:`gram_combine_tile`, ``d³`` per pair);
4. every ``C×C`` tile ``(I, J)``, ``I > J``, as ``−P_I^{(s)} R_J^{(s)ᵀ}`` at the level
   ``s = C·2^{⌊log₂(I xor J)⌋}`` where the two chunks first share a block; zeros above.

**Cost.** ``L + 2`` launches with ``L = ⌈log₂(n/C)⌉`` (8 at n = 4096, C = 64); FLOPs
``d n² + 2 n d² L + (n/C) d³`` plus the chunk inverses, every step parallel. Combining Grams
instead of contracting each level's over its ``s`` rows halves the launches.

**Programmatic dependent launch** (compute capability ≥ 9, :func:`matfn.kernels.launch.use_pdl`):
every launch after the chunk kernel waits for the one before (``griddepcontrol.wait``) before
any memory access and is launched early, which hides part of each launch's start.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from matfn.kernels.launch import pdl_flags, use_pdl, wait_for_previous_launch

from .chunk import chunk_pass, mm, pow2
from .config import TRI_INV_CONFIG, TriInvConfig

__all__ = ["tri_inv_triton", "gram_combine_tile", "check_operands", "out_buffer"]


@triton.jit
def _gram_kernel(
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
    USE_PDL: tl.constexpr = False,
):
    """``G_c = K_cᵀ P_c`` over the ``BT`` rows of chunk ``c`` (one ``BG×BG`` tile).

    Only the chunks' Grams contract over rows; the levels above combine them
    (:func:`gram_combine_tile`).
    """
    wait_for_previous_launch(USE_PDL)
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
    acc = mm(tl.trans(kt), pt)
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
            accP -= mm(xk, gt)
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
            accR -= mm(xk, gt)
    tl.store(pout_ptr + base + cj[None, :], accP, mask=mj)
    tl.store(rout_ptr + base + cj[None, :], accR, mask=mj)


@triton.jit
def gram_combine_tile(
    pair,
    tile,
    b,
    gin_ptr,
    gout_ptr,
    nblk,
    d,
    e,
    stride_gb,
    stride_gk,
    BG: tl.constexpr,
):
    """One ``BG×BG`` tile of the parent ``M = M₁ + M₂ − G₂ M₁`` (``d×(e+d)`` per block).

    ``M_b = K_bᵀ [X_b | P_b]`` with the Gram ``G_b = K_bᵀ P_b`` in its last ``d`` columns; the
    inverse has ``e = 0`` (``M = G``), the solve carries ``e`` right-hand-side columns in front.
    The children are blocks ``2·pair`` and ``2·pair + 1`` (``M₂ = 0`` when the second lies past
    ``n``): with ``W₂^{(2s)} = W₂ − P₂ M₁`` (``W = [X | P]``),
    ``K_bᵀ W_b^{(2s)} = M₁ + K₂ᵀ W₂ − G₂ M₁ = M₁ + M₂ − G₂ M₁``.
    """
    F = e + d
    ngj = tl.cdiv(F, BG)
    ci = (tile // ngj) * BG + tl.arange(0, BG)
    cj = (tile % ngj) * BG + tl.arange(0, BG)
    mij = (ci < d)[:, None] & (cj < F)[None, :]
    g1 = gin_ptr + b * stride_gb + (2 * pair) * stride_gk
    g2 = g1 + stride_gk
    acc = tl.load(g1 + ci[:, None] * F + cj[None, :], mask=mij, other=0.0)
    if 2 * pair + 1 < nblk:
        acc += tl.load(g2 + ci[:, None] * F + cj[None, :], mask=mij, other=0.0)
        for k0 in range(0, d, BG):
            ck = k0 + tl.arange(0, BG)
            a = tl.load(
                g2 + ci[:, None] * F + e + ck[None, :],
                mask=(ci < d)[:, None] & (ck < d)[None, :],
                other=0.0,
            )
            c = tl.load(
                g1 + ck[:, None] * F + cj[None, :],
                mask=(ck < d)[:, None] & (cj < F)[None, :],
                other=0.0,
            )
            acc -= mm(a, c)
    tl.store(
        gout_ptr + b * stride_gb + pair * stride_gk + ci[:, None] * F + cj[None, :], acc, mask=mij
    )


@triton.jit
def _level_kernel(
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
    USE_PDL: tl.constexpr = False,
):
    """One level ``s → 2s`` in one launch.

    Programs ``< n_update`` update ``P, R`` tiles (:func:`_update_tile`); with ``COMBINE`` the
    rest build the next level's Grams from this level's (:func:`gram_combine_tile`).
    """
    wait_for_previous_launch(USE_PDL)
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
        )
    elif COMBINE:
        q = pid - n_update
        ngt = tl.cdiv(d, BG) * tl.cdiv(d, BG)
        gram_combine_tile(
            (q // ngt).to(tl.int64),
            q % ngt,
            b,
            gin_ptr,
            gout_ptr,
            tl.cdiv(n, s),
            d,
            0,
            stride_gb,
            stride_gk,
            BG,
        )


@triton.jit
def _offdiag_kernel(
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
    USE_PDL: tl.constexpr = False,
):
    """Tile ``(I, J)``: zeros above the diagonal, ``−P_I^{(s)} R_J^{(s)ᵀ}`` below it."""
    wait_for_previous_launch(USE_PDL)
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
            acc -= mm(pt, tl.trans(rt))
        tl.store(yp, acc, mask=mi[:, None] & mj[None, :])


def check_operands(Q: torch.Tensor, K: torch.Tensor, lam: torch.Tensor) -> None:
    """Float32 ``Q, K`` ``(B, n, d)`` and ``λ`` ``(B, n)``, or raise."""
    if Q.dtype != torch.float32 or K.dtype != torch.float32 or lam.dtype != torch.float32:
        raise TypeError("the triangular kernels take float32 Q, K and diag")
    if Q.ndim != 3 or K.shape != Q.shape or lam.shape != Q.shape[:2]:
        raise ValueError(
            f"expected Q, K (B, n, d) and diag (B, n), got {Q.shape}, {K.shape}, {lam.shape}"
        )


def out_buffer(
    out: torch.Tensor | None, shape: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """``out`` (checked: contiguous float32 of ``shape``) or a new result buffer."""
    if out is None:
        return torch.empty(shape, dtype=torch.float32, device=device)
    if out.shape != shape or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"`out` must be a contiguous float32 tensor of shape {shape}")
    return out


def tri_inv_triton(
    Q: torch.Tensor,
    K: torch.Tensor,
    lam: torch.Tensor,
    *,
    config: TriInvConfig = TRI_INV_CONFIG,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``T⁻¹`` for float32 ``Q, K`` ``(B, n, d)`` and ``λ`` ``(B, n)``; returns ``(B, n, n)``.

    ``config``: the tuning (:class:`~matfn.triangular.config.TriInvConfig`); ``out``: an
    optional contiguous float32 ``(B, n, n)`` result buffer (tests poison it). The steps are
    in the module docstring. Error ≈ 1e-6 relative (fp32 forward substitution) on
    well-conditioned ``T``.
    """
    check_operands(Q, K, lam)
    Q, K, lam = Q.contiguous(), K.contiguous(), lam.contiguous()
    B, n, d = Q.shape
    Y = out_buffer(out, (B, n, n), Q.device)
    if B == 0 or n == 0:
        return Y
    C = config.chunk_size
    chunk = dict(chunk_size=C, block_s=config.block_s, warps=config.chunk_warps)
    NC = triton.cdiv(n, C)
    L = (NC - 1).bit_length()
    if L == 0:  # one chunk: its inverse is the result
        chunk_pass(Q, K, lam, Y=Y, BE=16, **chunk)
        return Y
    BD = min(64, pow2(d))
    P_all = torch.empty(L, B, n, d, dtype=torch.float32, device=Q.device)
    R_all = torch.empty_like(P_all)
    G_cur = torch.empty(B, NC, d, d, dtype=torch.float32, device=Q.device)
    G_next = torch.empty_like(G_cur) if L > 2 else G_cur  # L ≤ 2: no level combines
    chunk_pass(Q, K, lam, Y=Y, P=P_all[0], R=R_all[0], BE=16, **chunk)
    BG = min(config.gram_block, pow2(d))
    ngt = triton.cdiv(d, BG) ** 2
    pdl = pdl_flags(use_pdl(Q))  # every launch after the chunk kernel waits for the one before
    _gram_kernel[(NC, ngt, B)](
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
        num_warps=config.warps,
        **pdl,
    )
    BTu = min(config.level_rows, C)
    n_update = triton.cdiv(n, BTu) * triton.cdiv(d, BD)
    for lv in range(L - 1):
        s = C << lv
        combine = lv < L - 2  # the last level's Grams are not used
        n_combine = triton.cdiv(triton.cdiv(n, s), 2) * ngt if combine else 0
        _level_kernel[(n_update + n_combine, B)](
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
            num_warps=config.warps,
            **pdl,
        )
        G_cur, G_next = G_next, G_cur
    _offdiag_kernel[(NC, NC, B)](
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
        num_warps=config.warps,
        **pdl,
    )
    return Y
