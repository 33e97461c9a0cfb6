r"""Tree solve: ``T⁻¹ V`` by divide and conquer over ``⌈log₂(n/C)⌉`` parallel levels.

Reached from :func:`matfn.triangular.solve.tri_solve_triton` while a CUDA graph is being
captured and the batch has at most ``TriSolveConfig.tree_max_rows`` rows (``B·n``): replayed
from a graph its levels have no launch gaps and it has no sequential chain, so it beats the scan
there (docs/benchmarks.md).

With ``W^{(s)} = blkdiag_s(T)⁻¹ [V | Q] = [X^{(s)} | P^{(s)}]`` (``n × F``, ``F = e + d``) and
``M_b = K_bᵀ W_b^{(s)}`` (``d × F`` per block, the Gram ``G_b = K_bᵀ P_b`` in its last ``d``
columns), the block formula (docs/math.md §5.2) gives, for a ``2s``-block,
``W₂^{(2s)} = W₂^{(s)} − P₂^{(s)} M₁`` (first half unchanged) and
``M = M₁ + K₂ᵀ W₂^{(2s)} = M₁ + M₂ − G₂ M₁``. Launches:

1. the chunk kernel writes ``X^{(C)}`` into the output and ``P^{(C)}``;
2. level ``C → 2C`` per chunk pair and column tile (:func:`_pair_kernel`): ``M₁ = K₁ᵀ W₁``,
   ``W₂ −= P₂ M₁`` and the pair's ``M = M₁ + K₂ᵀ W₂`` contracted over its ``2C`` rows
   (``3 n d F`` FLOPs; chunk ``M``s and a combine would take ``n d² F / C`` more and a launch);
3. one launch per level ``s → 2s``, ``s ≥ 2C`` (:func:`_level_kernel`): ``W₂ −= P₂ M₁`` on
   ``rows × columns`` tiles of the odd blocks (``X`` in place, ``P`` into a second buffer, even
   blocks copied, since every tile reads all ``d`` columns of the old ``P₂``) and, by extra
   programs, the next level's ``M = M₁ + M₂ − G₂ M₁`` (``2 d² F`` per pair). The last level
   updates only ``X``.

**Cost.** ``L + 1`` launches (``L = ⌈log₂(n/C)⌉``; 1 for n ≤ C), each parallel over row tiles ×
column tiles × batch; FLOPs ``≈ n d F (L + 1 + d/C) + n d e`` (1.7 GFLOP at n = 4096,
d = e = 128, C = 32) plus the chunk inverses: 2.4× the scan's, but no sequential chain. Every
launch after the chunk kernel waits for the one before (programmatic dependent launch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from matfn.kernels.launch import pdl_flags, use_pdl, wait_for_previous_launch

from .chunk import chunk_pass, mm, pow2
from .config import TriSolveConfig
from .inverse import gram_combine_tile

__all__ = ["solve_tree"]


@triton.jit
def _pair_kernel(
    k_ptr,
    x_ptr,
    pin_ptr,
    pout_ptr,
    m_ptr,
    n,
    d,
    e,
    stride_kb,
    stride_kn,
    stride_xb,
    stride_xn,
    stride_pb,
    stride_pn,
    stride_mb,
    stride_mk,
    BC: tl.constexpr,
    BF: tl.constexpr,
    DP: tl.constexpr,
    STORE: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    """Tree solve, level ``C → 2C`` for chunk pair ``p`` on ``BF`` columns of ``W = [X | P]``.

    ``M₁ = K₁ᵀ W₁``, ``W₂ ← W₂ − P₂ M₁`` and (``STORE``: levels follow) the pair's
    ``M = M₁ + K₂ᵀ W₂``, contracted over the pair's ``2C`` rows: the chunks' ``M`` never reach
    memory and need no ``d×d @ d×(e+d)`` combine. Column tiles ``< cdiv(e, BF)`` update ``X`` in
    place; the others write ``P`` to ``pout`` (both chunks: the next level reads all rows).
    """
    wait_for_previous_launch(USE_PDL)
    p = tl.program_id(0).to(tl.int64)
    jt = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    ntu = tl.cdiv(e, BF)
    if jt < ntu:
        c0 = jt * BF
        ncols = e
        moff = 0
        src = x_ptr + b * stride_xb
        dst = src
        stride_sn = stride_xn
    else:
        c0 = (jt - ntu) * BF
        ncols = d
        moff = e
        src = pin_ptr + b * stride_pb
        dst = pout_ptr + b * stride_pb
        stride_sn = stride_pn
    cj = c0 + tl.arange(0, BF)
    mj = (cj < ncols)[None, :]
    cd = tl.arange(0, DP)
    md = (cd < d)[None, :]
    r1 = 2 * p * BC + tl.arange(0, BC)
    r2 = r1 + BC
    m1 = (r1 < n)[:, None]
    m2 = (r2 < n)[:, None]
    kb = k_ptr + b * stride_kb
    W1 = tl.load(src + r1[:, None] * stride_sn + cj[None, :], mask=m1 & mj, other=0.0)
    K1 = tl.load(kb + r1[:, None] * stride_kn + cd[None, :], mask=m1 & md, other=0.0)
    M = mm(tl.trans(K1), W1)
    if (2 * p + 1) * BC < n:
        W2 = tl.load(src + r2[:, None] * stride_sn + cj[None, :], mask=m2 & mj, other=0.0)
        P2 = tl.load(
            pin_ptr + b * stride_pb + r2[:, None] * stride_pn + cd[None, :],
            mask=m2 & md,
            other=0.0,
        )
        W2 -= mm(P2, M)
        tl.store(dst + r2[:, None] * stride_sn + cj[None, :], W2, mask=m2 & mj)
        if STORE:
            K2 = tl.load(kb + r2[:, None] * stride_kn + cd[None, :], mask=m2 & md, other=0.0)
            M += mm(tl.trans(K2), W2)
    if STORE:
        if jt >= ntu:
            tl.store(dst + r1[:, None] * stride_sn + cj[None, :], W1, mask=m1 & mj)
        mp = m_ptr + b * stride_mb + p * stride_mk + cd[:, None] * (e + d) + moff + cj[None, :]
        tl.store(mp, M, mask=(cd < d)[:, None] & mj)


@triton.jit
def _update_tile(
    r0,
    c0,
    b,
    src_ptr,
    dst_ptr,
    pin_ptr,
    m_ptr,
    ncols,
    moff,
    odd,
    n,
    d,
    e,
    stride_sb,
    stride_sn,
    stride_pb,
    stride_pn,
    BT: tl.constexpr,
    BF: tl.constexpr,
    BD: tl.constexpr,
):
    """``dst = src − P_in M₁[:, moff + c]`` on rows ``r0 : r0 + BT`` (``odd``), else a copy.

    ``m_ptr`` points at ``M₁``, the ``d×(e+d)`` ``M`` of the even partner block.
    """
    rows = r0 + tl.arange(0, BT)
    rm = (rows < n)[:, None]
    cj = c0 + tl.arange(0, BF)
    mj = rm & (cj < ncols)[None, :]
    acc = tl.load(
        src_ptr + b * stride_sb + rows[:, None] * stride_sn + cj[None, :], mask=mj, other=0.0
    )
    if odd:
        pb = pin_ptr + b * stride_pb + rows[:, None] * stride_pn
        for k0 in range(0, d, BD):
            ck = k0 + tl.arange(0, BD)
            pk = tl.load(pb + ck[None, :], mask=rm & (ck < d)[None, :], other=0.0)
            mt = tl.load(
                m_ptr + ck[:, None] * (e + d) + moff + cj[None, :],
                mask=(ck < d)[:, None] & (cj < ncols)[None, :],
                other=0.0,
            )
            acc -= mm(pk, mt)
    tl.store(dst_ptr + b * stride_sb + rows[:, None] * stride_sn + cj[None, :], acc, mask=mj)


@triton.jit
def _level_kernel(
    x_ptr,
    pin_ptr,
    pout_ptr,
    min_ptr,
    mout_ptr,
    n,
    d,
    e,
    s,
    n_x,
    n_p,
    stride_xb,
    stride_xn,
    stride_pb,
    stride_pn,
    stride_mb,
    stride_mk,
    BT: tl.constexpr,
    BF: tl.constexpr,
    BD: tl.constexpr,
    BG: tl.constexpr,
    COMBINE: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    """Tree solve, one level ``s → 2s`` (``s ≥ 2C``) in one launch.

    Programs ``< n_x``: ``X₂ ← X₂ − P₂ M₁[:, :e]`` in place on the row tiles of odd blocks;
    the next ``n_p``: ``P_out = P_in − P₂ G₁`` on odd blocks, a copy on even ones (``n_p = 0`` on
    the last level); with ``COMBINE`` the rest build the next level's ``M``
    (:func:`~matfn.triangular.inverse.gram_combine_tile`).
    """
    wait_for_previous_launch(USE_PDL)
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    if pid < n_x:
        ntj = tl.cdiv(e, BF)
        tile = (pid // ntj).to(tl.int64)
        tpb = s // BT  # row tiles per block
        blk = 2 * (tile // tpb) + 1
        _update_tile(
            blk * s + (tile % tpb) * BT,
            (pid % ntj) * BF,
            b,
            x_ptr,
            x_ptr,
            pin_ptr,
            min_ptr + b * stride_mb + (blk - 1) * stride_mk,
            e,
            0,
            True,
            n,
            d,
            e,
            stride_xb,
            stride_xn,
            stride_pb,
            stride_pn,
            BT,
            BF,
            BD,
        )
    elif pid < n_x + n_p:
        qp = pid - n_x
        ntj = tl.cdiv(d, BF)
        r0 = (qp // ntj).to(tl.int64) * BT
        blk = r0 // s
        _update_tile(
            r0,
            (qp % ntj) * BF,
            b,
            pin_ptr,
            pout_ptr,
            pin_ptr,
            min_ptr + b * stride_mb + (blk - 1) * stride_mk,
            d,
            e,
            (blk % 2) == 1,
            n,
            d,
            e,
            stride_pb,
            stride_pn,
            stride_pb,
            stride_pn,
            BT,
            BF,
            BD,
        )
    elif COMBINE:
        qc = pid - n_x - n_p
        ngt = tl.cdiv(d, BG) * tl.cdiv(e + d, BG)
        gram_combine_tile(
            (qc // ngt).to(tl.int64),
            qc % ngt,
            b,
            min_ptr,
            mout_ptr,
            tl.cdiv(n, s),
            d,
            e,
            stride_mb,
            stride_mk,
            BG,
        )


def solve_tree(
    Q: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor,
    lam: torch.Tensor,
    X: torch.Tensor,
    config: TriSolveConfig,
) -> torch.Tensor:
    """The tree solve (module docstring) into ``X``, which holds ``W``'s first ``e`` columns.

    Takes checked, contiguous float32 operands (:func:`matfn.triangular.solve.tri_solve_triton`).
    """
    C = config.chunk_size
    BT, BF, BG = config.tree_rows, config.tree_cols, config.tree_gram_block
    warps = config.tree_warps
    chunk = dict(chunk_size=C, block_s=config.block_s, warps=config.chunk_warps)
    B, n, d = Q.shape
    e = V.shape[-1]
    F = e + d
    NC = triton.cdiv(n, C)
    L = (NC - 1).bit_length()
    if L == 0:  # one chunk: its solve is the result
        chunk_pass(Q, K, lam, V=V, U=X, BE=32, **chunk)
        return X
    DP = pow2(d)
    BD = min(64, DP)
    P_cur = torch.empty(B, n, d, dtype=torch.float32, device=Q.device)
    P_next = torch.empty_like(P_cur)
    # M of the 2C-blocks (from the pair kernel), then of each level's parents: two ping-pong
    # views of one buffer (same strides), NC2 and ⌈NC2 / 2⌉ blocks
    NC2 = triton.cdiv(NC, 2)
    M_buf = torch.empty(B, NC2 + triton.cdiv(NC2, 2), d, F, dtype=torch.float32, device=Q.device)
    M_cur, M_next = M_buf[:, :NC2], M_buf[:, NC2:]
    chunk_pass(Q, K, lam, V=V, P=P_cur, U=X, BE=32, **chunk)
    pdl = pdl_flags(use_pdl(Q))  # every launch after the chunk kernel waits for the one before
    # level C → 2C, the M of the 2C-blocks contracted over their rows (no chunk M / combine);
    # on the last level only X's columns
    n_cols = triton.cdiv(e, BF) + (triton.cdiv(d, BF) if L > 1 else 0)
    _pair_kernel[(NC2, n_cols, B)](
        K,
        X,
        P_cur,
        P_next,
        M_cur,
        n,
        d,
        e,
        K.stride(0),
        K.stride(1),
        X.stride(0),
        X.stride(1),
        n * d,
        d,
        M_buf.stride(0),
        M_buf.stride(1),
        BC=C,
        BF=BF,
        DP=DP,
        STORE=L > 1,
        num_warps=warps,
        **pdl,
    )
    P_cur, P_next = P_next, P_cur
    ngt = triton.cdiv(d, BG) * triton.cdiv(F, BG)
    for lv in range(1, L):
        s = C << lv
        last = lv == L - 1
        nb = triton.cdiv(n, s)
        n_x = (nb // 2) * (s // BT) * triton.cdiv(e, BF)
        n_p = 0 if last else triton.cdiv(n, BT) * triton.cdiv(d, BF)
        n_combine = 0 if last else triton.cdiv(nb, 2) * ngt
        _level_kernel[(n_x + n_p + n_combine, B)](
            X,
            P_cur,
            P_next,
            M_cur,
            M_next,
            n,
            d,
            e,
            s,
            n_x,
            n_p,
            X.stride(0),
            X.stride(1),
            n * d,
            d,
            M_buf.stride(0),
            M_buf.stride(1),
            BT=BT,
            BF=BF,
            BD=BD,
            BG=BG,
            COMBINE=not last,
            num_warps=warps,
            **pdl,
        )
        P_cur, P_next = P_next, P_cur
        M_cur, M_next = M_next, M_cur
    return X
