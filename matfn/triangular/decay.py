r"""Decayed systems on CUDA: the solve and the causal product of their backward (Triton).

The system is ``T_ij = λ_i δ_ij + [i > j] Σ_c Q_ic K_jc exp(G_ic − G_jc)`` with
``G = cumsum(ℓ)`` along the rows, one log-decay per row (``g = 1``, Gated DeltaNet) or per
channel (``g = d``, KDA); docs/math.md §5.6. Only chunk-relative exponents are formed:
``R = G − G_{l−1}``, the cumulative sum of ``ℓ`` inside each ``C``-row chunk starting at row
``l``, computed once in float64 (:func:`~matfn.triangular.reference.chunk_log_decay`) so
that differences of long sums do not cancel. Every exponent a kernel forms is a difference of
two ``R`` of one chunk taken in the order that makes it ``≤ 0`` for ``ℓ ≤ 0``, so no factor
exceeds 1 however strong the decay.

:func:`tri_solve_decay_triton` (``T⁻¹ V``), two launches:

1. chunk kernel, one program per chunk: the block
   ``A_ij = Σ_c Q_ic K_jc exp(R_ic − R_jc)`` (``i > j``), its inverse ``Y = (Λ_c + A)⁻¹``
   (:func:`matfn.triangular.chunk.chunk_inverse`), ``U = Y V_c``, ``P = Y (Q_c ⊙ e^{R})`` and
   ``K̃ = K_c ⊙ e^{R_last − R}``;
2. state pass, one program per batch entry and ``V`` column tile, over the chunks in order:
   ``X_c = U_c − P_c S``, ``S ← e^{R_last} ⊙ S + K̃_cᵀ X_c`` with the ``d×e`` state
   ``S = Σ_{j<l} exp(G_{l−1} − G_j) ⊙ K_j x_jᵀ``.

:func:`causal_product_decay_triton`: ``O_r = Σ_{s<r} (A_r·B_s) W_s ⊙ exp(G_r − G_s)``, the
decayed form of the backward's ``dQ = dL K`` (docs/math.md §5.6), with the ``e×d`` state
``H = Σ_{s<l} B_sᵀ (W_s ⊙ exp(G_{l−1} − G_s))``. Unlike the solve's, this state does not depend
on the result, so every chunk's write ``ΔH_c`` is formed at once (one program per chunk), the
states ``H_{c+1} = e^{R_last} ⊙ H_c + ΔH_c`` follow by an elementwise scan, and every chunk's rows
``O_c = [in-chunk part] + e^R ⊙ (A_c H_c)`` at once: three launches, parallel over the chunks.

With a decay per channel the block ``A`` (and the product's in-chunk part) is not one matrix
product: the 16-row sub-blocks below the diagonal take one product each through the last row
``b`` of the earlier sub-block, ``exp(R_i − R_j) = exp(R_i − R_b) exp(R_b − R_j)`` with both
exponents ``≤ 0`` (``j ≤ b < i``); inside a diagonal sub-block the pairs are summed row by row.

Every product is :func:`~matfn.triangular.chunk.mm` (fp32-accurate on tensor cores). Operands
are float32, ``d ≤ 128`` (the state pass keeps ``d``-row tiles on chip) and, for the causal
product, ``e ≤ 128``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunk import chunk_inverse, mm, pow2
from .config import SOLVE_MAX_D, TRI_DECAY_CONFIG, TriDecayConfig
from .reference import chunk_log_decay

__all__ = [
    "SUB",
    "tri_solve_decay_triton",
    "causal_product_decay_triton",
]

#: Rows of the sub-blocks of a per-channel decay (``tl.dot`` needs 16).
SUB = tl.constexpr(16)
_NEG_INF = tl.constexpr(float("-inf"))
#: The least width of a product's output tile: Triton 3.6 on the H100 gave wrong tensor-core
#: products for 64-row tiles by 16 columns at 8 warps (:class:`~matfn.triangular.config.
#: TriSolveConfig` refuses those shapes), so narrower operands are padded (masked) to 32.
_MIN_N = 32


@triton.jit
def _below(x):
    """``exp(x)`` of a float64 exponent ``≤ 0``, in float32 (``−∞`` gives 0)."""
    return tl.exp(x.to(tl.float32))


@triton.jit
def _through_row(R, rb, stride_rn, row0, J: tl.constexpr, cols, cm, BC: tl.constexpr):
    """The factors of ``exp(R_i − R_j)`` for ``j`` in sub-block ``J`` and ``i`` below it.

    Through the sub-block's last row ``b``: ``(exp(R_i − R_b)`` on the rows ``i > b``,
    ``exp(R_b − R_j)`` on the rows of sub-block ``J``), 0 elsewhere, both ``≤ 1``. ``R``
    ``(BC, ·)`` holds the chunk's rows (from row ``row0``) on the channels ``cols``.
    """
    ar = tl.arange(0, BC)
    ref_row = J * SUB + SUB - 1
    ref = tl.load(rb + (row0 + ref_row) * stride_rn + cols, mask=cm, other=0.0)
    after = _below(tl.where((ar > ref_row)[:, None], R - ref[None, :], _NEG_INF))
    before = _below(tl.where((ar // SUB == J)[:, None], ref[None, :] - R, _NEG_INF))
    return after, before


@triton.jit
def _diagonal_factor(R, rb, stride_rn, rj, jrow, cols, cm, BC: tl.constexpr):
    """``exp(R_i − R_j)`` for each row ``i`` and the row ``j = jrow[i]`` of its own sub-block.

    ``rj`` is ``jrow``'s row in the array; 0 where ``i ≤ j``.
    """
    ar = tl.arange(0, BC)
    Rj = tl.load(rb + rj[:, None] * stride_rn + cols[None, :], mask=cm[None, :], other=0.0)
    return _below(tl.where((ar > jrow)[:, None], R - Rj, _NEG_INF))


@triton.jit
def _decay_chunk_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    lam_ptr,
    r_ptr,
    u_ptr,
    p_ptr,
    kt_ptr,
    n,
    d,
    e,
    stride_qb,
    stride_qn,
    stride_vb,
    stride_vn,
    stride_lb,
    stride_rb,
    stride_rn,
    BC: tl.constexpr,
    BS: tl.constexpr,
    LOG_M: tl.constexpr,
    BK: tl.constexpr,
    BE: tl.constexpr,
    BP: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
):
    """Chunk ``c`` of batch entry ``b``: ``U = Y V_c``, ``P = Y (Q_c ⊙ e^R)``, ``K̃`` (module doc).

    ``U`` has the strides of ``V``; ``P`` and ``K̃`` those of ``Q``; ``R`` ``(B, NC·C, g)``
    float64 covers the padded rows, so its loads need no row mask. ``A`` is summed over
    ``BK``-channel slabs; ``U``, ``P`` and ``K̃`` are written in ``BE``/``BP``-column tiles.
    """
    c = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    ar = tl.arange(0, BC)
    rows = c * BC + ar
    rm = rows < n
    qb = q_ptr + b * stride_qb
    kb = k_ptr + b * stride_qb
    rb = r_ptr + b * stride_rb
    lam = tl.load(lam_ptr + b * stride_lb + rows, mask=rm, other=1.0)
    below = ar[:, None] > ar[None, :]
    last = c * BC + BC - 1
    A = tl.zeros((BC, BC), dtype=tl.float32)
    if PER_CHANNEL:
        sub = ar // SUB
        for k0 in range(0, d, BK):
            cols = k0 + tl.arange(0, BK)
            cm = cols < d
            m = rm[:, None] & cm[None, :]
            qt = tl.load(qb + rows[:, None] * stride_qn + cols[None, :], mask=m, other=0.0)
            kt = tl.load(kb + rows[:, None] * stride_qn + cols[None, :], mask=m, other=0.0)
            R = tl.load(rb + rows[:, None] * stride_rn + cols[None, :], mask=cm[None, :], other=0.0)
            # sub-blocks below the diagonal: through the last row of the earlier one
            for J in tl.static_range(BC // SUB - 1):
                after, before = _through_row(R, rb, stride_rn, c * BC, J, cols, cm, BC)
                A += mm(qt * after, tl.trans(kt * before))
            # diagonal sub-blocks: column j = jrow of every row at once
            for jj in range(SUB):
                jrow = sub * SUB + jj
                rj = c * BC + jrow
                mj = (rj < n)[:, None] & cm[None, :]
                kj = tl.load(kb + rj[:, None] * stride_qn + cols[None, :], mask=mj, other=0.0)
                w = qt * kj * _diagonal_factor(R, rb, stride_rn, rj, jrow, cols, cm, BC)
                A += tl.where(ar[None, :] == jrow[:, None], tl.sum(w, axis=1)[:, None], 0.0)
    else:
        for k0 in range(0, d, BK):
            cols = k0 + tl.arange(0, BK)
            m = rm[:, None] & (cols < d)[None, :]
            qt = tl.load(qb + rows[:, None] * stride_qn + cols[None, :], mask=m, other=0.0)
            kt = tl.load(kb + rows[:, None] * stride_qn + cols[None, :], mask=m, other=0.0)
            A += mm(qt, tl.trans(kt))
        R = tl.load(rb + rows * stride_rn)
        A = A * _below(tl.where(below, R[:, None] - R[None, :], _NEG_INF))
    A = tl.where(below, A, 0.0)
    Y = chunk_inverse(A, lam, BC, BS, LOG_M)

    for e0 in range(0, e, BE):
        ce = e0 + tl.arange(0, BE)
        mv = rm[:, None] & (ce < e)[None, :]
        voff = b * stride_vb + rows[:, None] * stride_vn + ce[None, :]
        vt = tl.load(v_ptr + voff, mask=mv, other=0.0)
        tl.store(u_ptr + voff, mm(Y, vt), mask=mv)
    if not PER_CHANNEL:
        gq = _below(R)[:, None]
        gk = _below(tl.load(rb + last * stride_rn) - R)[:, None]
    for k0 in range(0, d, BP):
        cols = k0 + tl.arange(0, BP)
        cm = cols < d
        m = rm[:, None] & cm[None, :]
        off = b * stride_qb + rows[:, None] * stride_qn + cols[None, :]
        qt = tl.load(q_ptr + off, mask=m, other=0.0)
        kt = tl.load(k_ptr + off, mask=m, other=0.0)
        if PER_CHANNEL:
            R = tl.load(rb + rows[:, None] * stride_rn + cols[None, :], mask=cm[None, :], other=0.0)
            rl = tl.load(rb + last * stride_rn + cols, mask=cm, other=0.0)
            gq = _below(R)
            gk = _below(rl[None, :] - R)
        tl.store(p_ptr + off, mm(Y, qt * gq), mask=m)
        tl.store(kt_ptr + off, kt * gk, mask=m)


@triton.jit
def _decay_state_kernel(
    u_ptr,
    p_ptr,
    kt_ptr,
    r_ptr,
    x_ptr,
    n,
    d,
    e,
    NC,
    stride_ub,
    stride_un,
    stride_pb,
    stride_pn,
    stride_rb,
    stride_rn,
    BC: tl.constexpr,
    DP: tl.constexpr,
    BE: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
):
    """Columns ``et·BE …`` of ``X`` for batch entry ``b``: the chain over the chunks (module doc).

    ``X`` has the strides of ``U``; ``K̃`` those of ``P``.
    """
    et = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    ar = tl.arange(0, BC)
    ce = et * BE + tl.arange(0, BE)
    cem = (ce < e)[None, :]
    cd = tl.arange(0, DP)
    cdm = (cd < d)[None, :]
    S = tl.zeros((DP, BE), dtype=tl.float32)
    for c in range(NC):
        rows = c * BC + ar
        rm = (rows < n)[:, None]
        uoff = b * stride_ub + rows[:, None] * stride_un + ce[None, :]
        poff = b * stride_pb + rows[:, None] * stride_pn + cd[None, :]
        Uc = tl.load(u_ptr + uoff, mask=rm & cem, other=0.0)
        Pc = tl.load(p_ptr + poff, mask=rm & cdm, other=0.0)
        Kc = tl.load(kt_ptr + poff, mask=rm & cdm, other=0.0)
        last = r_ptr + b * stride_rb + (c * BC + BC - 1) * stride_rn
        if PER_CHANNEL:
            step = _below(tl.load(last + cd, mask=cd < d, other=0.0))[:, None]
        else:
            step = _below(tl.load(last))
        X = Uc - mm(Pc, S)
        tl.store(x_ptr + uoff, X, mask=rm & cem)
        S = S * step + mm(tl.trans(Kc), X)


@triton.jit
def _product_delta_kernel(
    b_ptr,
    w_ptr,
    r_ptr,
    h_ptr,
    n,
    e,
    d,
    stride_bb,
    stride_bn,
    stride_wb,
    stride_wn,
    stride_rb,
    stride_rn,
    stride_hb,
    stride_hc,
    BC: tl.constexpr,
    EP: tl.constexpr,
    BD: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
):
    """Chunk ``c``'s write to the state, ``ΔH_c = B_cᵀ (W_c ⊙ e^{R_last − R})`` (channels ``dt``).

    ``H`` ``(b, NC, e, d)`` contiguous in its last two dims.
    """
    c = tl.program_id(0).to(tl.int64)
    dt = tl.program_id(1)
    bi = tl.program_id(2).to(tl.int64)
    rows = c * BC + tl.arange(0, BC)
    rm = (rows < n)[:, None]
    ce = tl.arange(0, EP)
    cd = dt * BD + tl.arange(0, BD)
    cdm = cd < d
    rb = r_ptr + bi * stride_rb
    Bc = tl.load(
        b_ptr + bi * stride_bb + rows[:, None] * stride_bn + ce[None, :],
        mask=rm & (ce < e)[None, :],
        other=0.0,
    )
    Wc = tl.load(
        w_ptr + bi * stride_wb + rows[:, None] * stride_wn + cd[None, :],
        mask=rm & cdm[None, :],
        other=0.0,
    )
    last = c * BC + BC - 1
    if PER_CHANNEL:
        R = tl.load(rb + rows[:, None] * stride_rn + cd[None, :], mask=cdm[None, :], other=0.0)
        rl = tl.load(rb + last * stride_rn + cd, mask=cdm, other=0.0)
        Wt = Wc * _below(rl[None, :] - R)
    else:
        Wt = Wc * _below(tl.load(rb + last * stride_rn) - tl.load(rb + rows * stride_rn))[:, None]
    hp = h_ptr + bi * stride_hb + c * stride_hc + ce[:, None] * d + cd[None, :]
    tl.store(hp, mm(tl.trans(Bc), Wt), mask=(ce < e)[:, None] & cdm[None, :])


@triton.jit
def _product_scan_kernel(
    h_ptr,
    r_ptr,
    e,
    d,
    NC,
    stride_rb,
    stride_rn,
    stride_hb,
    stride_hc,
    BC: tl.constexpr,
    BE: tl.constexpr,
    BD: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
):
    """In place, ``ΔH_c → H_c``: ``H_0 = 0``, ``H_{c+1} = e^{R_last} ⊙ H_c + ΔH_c`` (elementwise).

    One program per ``BE×BD`` tile of the ``e×d`` state: the only chain of the product, of
    ``NC`` elementwise steps.
    """
    et = tl.program_id(0)
    dt = tl.program_id(1)
    bi = tl.program_id(2).to(tl.int64)
    ce = et * BE + tl.arange(0, BE)
    cd = dt * BD + tl.arange(0, BD)
    m = (ce < e)[:, None] & (cd < d)[None, :]
    hp = h_ptr + bi * stride_hb + ce[:, None] * d + cd[None, :]
    rb = r_ptr + bi * stride_rb
    H = tl.zeros((BE, BD), dtype=tl.float32)
    for c in range(NC):
        dH = tl.load(hp + c * stride_hc, mask=m, other=0.0)
        tl.store(hp + c * stride_hc, H, mask=m)
        last = rb + (c * BC + BC - 1) * stride_rn
        if PER_CHANNEL:
            step = _below(tl.load(last + cd, mask=cd < d, other=0.0))[None, :]
        else:
            step = _below(tl.load(last))
        H = H * step + dH


@triton.jit
def _product_out_kernel(
    a_ptr,
    b_ptr,
    w_ptr,
    r_ptr,
    h_ptr,
    o_ptr,
    n,
    e,
    d,
    stride_ab,
    stride_an,
    stride_wb,
    stride_wn,
    stride_rb,
    stride_rn,
    stride_hb,
    stride_hc,
    BC: tl.constexpr,
    EP: tl.constexpr,
    BD: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
):
    """Chunk ``c``'s rows of ``O`` (channels ``dt``): the in-chunk part plus ``e^R ⊙ (A_c H_c)``.

    ``B`` has the strides of ``A``; ``O`` those of ``W``.
    """
    c = tl.program_id(0).to(tl.int64)
    dt = tl.program_id(1)
    bi = tl.program_id(2).to(tl.int64)
    ar = tl.arange(0, BC)
    rows = c * BC + ar
    rm = (rows < n)[:, None]
    below = ar[:, None] > ar[None, :]
    ce = tl.arange(0, EP)
    cem = ce < e
    cd = dt * BD + tl.arange(0, BD)
    cdm = cd < d
    rb = r_ptr + bi * stride_rb
    aoff = bi * stride_ab + rows[:, None] * stride_an + ce[None, :]
    woff = bi * stride_wb + rows[:, None] * stride_wn + cd[None, :]
    Ac = tl.load(a_ptr + aoff, mask=rm & cem[None, :], other=0.0)
    Bc = tl.load(b_ptr + aoff, mask=rm & cem[None, :], other=0.0)
    Wc = tl.load(w_ptr + woff, mask=rm & cdm[None, :], other=0.0)
    hp = h_ptr + bi * stride_hb + c * stride_hc + ce[:, None] * d + cd[None, :]
    H = tl.load(hp, mask=cem[:, None] & cdm[None, :], other=0.0)
    P = tl.where(below, mm(Ac, tl.trans(Bc)), 0.0)
    if PER_CHANNEL:
        R = tl.load(rb + rows[:, None] * stride_rn + cd[None, :], mask=cdm[None, :], other=0.0)
        O = _below(R) * mm(Ac, H)
        for J in tl.static_range(BC // SUB - 1):
            after, before = _through_row(R, rb, stride_rn, c * BC, J, cd, cdm, BC)
            O += after * mm(P, Wc * before)
        for jj in range(SUB):
            jrow = (ar // SUB) * SUB + jj
            p = tl.sum(tl.where(ar[None, :] == jrow[:, None], P, 0.0), axis=1)
            rj = c * BC + jrow
            wj = tl.load(
                w_ptr + bi * stride_wb + rj[:, None] * stride_wn + cd[None, :],
                mask=(rj < n)[:, None] & cdm[None, :],
                other=0.0,
            )
            O += p[:, None] * wj * _diagonal_factor(R, rb, stride_rn, rj, jrow, cd, cdm, BC)
    else:
        R = tl.load(rb + rows * stride_rn)
        Pd = P * _below(tl.where(below, R[:, None] - R[None, :], _NEG_INF))
        O = mm(Pd, Wc) + _below(R)[:, None] * mm(Ac, H)
    tl.store(o_ptr + woff, O, mask=rm & cdm[None, :])


def _flat_log_decay(log_decay: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """``R`` of :func:`~matfn.triangular.reference.chunk_log_decay` as ``(B, NC·C, g)`` rows."""
    R = chunk_log_decay(log_decay, chunk_size)
    return R.view(R.shape[0], -1, R.shape[-1])


def _check(name: str, x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if x.dtype != torch.float32 or tuple(x.shape) != shape:
        raise ValueError(f"expected float32 {name} {shape}, got {x.dtype} {tuple(x.shape)}")
    return x.contiguous()


def _check_decay(log_decay: torch.Tensor, B: int, n: int, d: int) -> bool:
    """Whether ``ℓ`` ``(B, n, g)`` is per channel (``g = d > 1``); raise unless ``g ∈ {1, d}``."""
    g = log_decay.shape[-1]
    if log_decay.ndim != 3 or log_decay.shape[:2] != (B, n) or g not in (1, d):
        raise ValueError(f"expected log_decay (B, n, 1) or (B, n, d), got {tuple(log_decay.shape)}")
    return g > 1


def tri_solve_decay_triton(
    Q: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor,
    lam: torch.Tensor,
    log_decay: torch.Tensor,
    *,
    config: TriDecayConfig = TRI_DECAY_CONFIG,
) -> torch.Tensor:
    """``T⁻¹ V`` for the decayed ``T`` (module doc): float32 ``(B, n, ·)`` operands, ``d ≤ 128``.

    ``log_decay`` is ``(B, n, 1)`` or ``(B, n, d)`` of any floating dtype. Cost
    ``≈ n (2 C d + 2 C e + 4 d e)`` FLOPs (plus ``C² d`` for a decay per channel), in
    ``n/C`` dependent steps of the state pass.
    """
    B, n, d = Q.shape
    e = V.shape[-1]
    if d > SOLVE_MAX_D:
        raise ValueError(f"tri_solve_decay_triton supports d ≤ {SOLVE_MAX_D}, got d = {d}")
    Q, K = _check("Q", Q, (B, n, d)), _check("K", K, (B, n, d))
    V, lam = _check("V", V, (B, n, e)), _check("lam", lam, (B, n))
    per_channel = _check_decay(log_decay, B, n, d)
    X = torch.empty((B, n, e), dtype=torch.float32, device=Q.device)
    if B == 0 or n == 0 or e == 0 or d == 0:
        return X if d else X.copy_(V / lam[..., None])
    C = config.chunk_size
    NC = triton.cdiv(n, C)
    R = _flat_log_decay(log_decay, C)
    U = torch.empty_like(X)
    P = torch.empty_like(Q)
    Kt = torch.empty_like(Q)
    _decay_chunk_kernel[(NC, B)](
        Q,
        K,
        V,
        lam,
        R,
        U,
        P,
        Kt,
        n,
        d,
        e,
        Q.stride(0),
        Q.stride(1),
        V.stride(0),
        V.stride(1),
        lam.stride(0),
        R.stride(0),
        R.stride(1),
        BC=C,
        BS=config.block_s,
        LOG_M=(C // config.block_s).bit_length() - 1,
        BK=min(config.slab, pow2(d)),
        BE=min(64, pow2(e, _MIN_N)),
        BP=min(64, pow2(d, _MIN_N)),
        PER_CHANNEL=per_channel,
        num_warps=config.chunk_warps,
    )
    BE = max(_MIN_N, min(config.state_block, pow2(e)))
    _decay_state_kernel[(triton.cdiv(e, BE), B)](
        U,
        P,
        Kt,
        R,
        X,
        n,
        d,
        e,
        NC,
        U.stride(0),
        U.stride(1),
        P.stride(0),
        P.stride(1),
        R.stride(0),
        R.stride(1),
        BC=C,
        DP=pow2(d, _MIN_N),
        BE=BE,
        PER_CHANNEL=per_channel,
        num_warps=config.state_warps,
    )
    return X


def causal_product_decay_triton(
    A: torch.Tensor,
    B: torch.Tensor,
    W: torch.Tensor,
    log_decay: torch.Tensor,
    *,
    config: TriDecayConfig = TRI_DECAY_CONFIG,
) -> torch.Tensor:
    """``O_r = Σ_{s<r} (A_r·B_s) W_s ⊙ exp(G_r − G_s)`` (module doc), ``G = cumsum(ℓ)``.

    ``A, B`` float32 ``(b, n, e)`` with ``e ≤ 128``, ``W`` ``(b, n, d)``, ``ℓ`` ``(b, n, 1)``
    or ``(b, n, d)``. Cost ``≈ n (2 C e + 2 C d + 4 e d)`` FLOPs (plus ``C² d`` per channel) in
    three launches: every chunk's write to the state, the scan of the state over the chunks
    (``n/C`` elementwise steps, the only chain), and every chunk's rows; ``n/C`` states of
    ``e×d`` are kept in between.
    """
    b, n, e = A.shape
    d = W.shape[-1]
    if e > SOLVE_MAX_D:
        raise ValueError(f"causal_product_decay_triton supports e ≤ {SOLVE_MAX_D}, got e = {e}")
    A, B = _check("A", A, (b, n, e)), _check("B", B, (b, n, e))
    W = _check("W", W, (b, n, d))
    per_channel = _check_decay(log_decay, b, n, d)
    if b == 0 or n == 0 or d == 0 or e == 0:
        return torch.zeros((b, n, d), dtype=torch.float32, device=A.device)
    C = config.chunk_size
    NC = triton.cdiv(n, C)
    R = _flat_log_decay(log_decay, C)
    O = torch.empty_like(W)
    H = torch.empty((b, NC, e, d), dtype=torch.float32, device=A.device)
    BD = max(_MIN_N, min(config.product_block, pow2(d)))
    EP = pow2(e, _MIN_N)
    common = dict(BC=C, PER_CHANNEL=per_channel)
    _product_delta_kernel[(NC, triton.cdiv(d, BD), b)](
        B,
        W,
        R,
        H,
        n,
        e,
        d,
        B.stride(0),
        B.stride(1),
        W.stride(0),
        W.stride(1),
        R.stride(0),
        R.stride(1),
        H.stride(0),
        H.stride(1),
        EP=EP,
        BD=BD,
        num_warps=config.product_warps,
        **common,
    )
    BS = 32
    _product_scan_kernel[(triton.cdiv(e, BS), triton.cdiv(d, BS), b)](
        H,
        R,
        e,
        d,
        NC,
        R.stride(0),
        R.stride(1),
        H.stride(0),
        H.stride(1),
        BE=BS,
        BD=BS,
        num_warps=4,
        **common,
    )
    _product_out_kernel[(NC, triton.cdiv(d, BD), b)](
        A,
        B,
        W,
        R,
        H,
        O,
        n,
        e,
        d,
        A.stride(0),
        A.stride(1),
        W.stride(0),
        W.stride(1),
        R.stride(0),
        R.stride(1),
        H.stride(0),
        H.stride(1),
        EP=EP,
        BD=BD,
        num_warps=config.product_warps,
        **common,
    )
    return O
