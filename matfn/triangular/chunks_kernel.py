r"""Fused Triton kernel for :func:`matfn.triangular.chunks.tri_inv_chunks` (CUDA float32).

One program per ``C``-row chunk of one batch entry, ``C ∈ {16, 32, 64}``, in ``16×16`` blocks
``I, J`` (``NB = C/16`` of them per side):

1. **Form** ``A_IJ = diag(β_I) (K_I ⊙ …)(K_J ⊘ …)ᵀ`` for ``I ≥ J`` in registers: the ten
   ``16×16`` accumulators take ``BK`` channels of ``K`` per step (``K`` is read once). Decays
   enter only as factors ``exp(x)`` with ``x ≤ 0`` for ``ℓ ≤ 0``, from cumulative sums inside
   the chunk in float64 (a difference of two sums over up to ``C`` rows cancels;
   docs/math.md §5.6):

   * per row (Gated DeltaNet): ``A_IJ ⊙ exp(R_i − R_j)`` with ``R`` the in-chunk cumulative sum;
   * per channel (KDA), ``I > J``: the reference row ``I₀ − 1`` (last row before block ``I``)
     splits every factor in two, ``exp(R_ic − R_{I₀−1,c}) · exp(R_{I₀−1,c} − R_jc)``, both
     ``≤ 1``, so the block is one dot of scaled tiles; the key side is carried from block to
     block by the per-block totals ``exp(Σ_{k∈M} ℓ_kc) ≤ 1``;
   * per channel, ``I = J``: the exact contraction ``Σ_c K_ic K_jc exp(R_ic − R_jc)`` over a
     ``16×16×BKD`` tile per ``BKD`` channels (no split has both factors ``≤ 1`` inside a block).

2. **Invert** ``I + tril(A, −1)``: each ``16×16`` diagonal block by forward substitution in
   registers (row ``i`` of ``X − I`` is ``−A_i − Σ_{k<i} A_ik (X − I)_k``), then the
   off-diagonal blocks by block forward substitution
   ``Y_IJ = −Y_II Σ_{J≤M<I} A_IM Y_MJ`` (fla-core's ``solve_tril`` scheme, docs/math.md §5.4).

3. **Store** the ``C×C`` inverse row-major at rows ``cC … cC + C − 1`` of the ``(B, n, C)``
   output, zeros above the diagonal blocks. Rows ``≥ n`` are identity rows, not stored.

``PREC_A`` / ``PREC_M``: the ``input_precision`` of the dots that form ``A`` / merge the blocks
(``"ieee"``: fp32 FMA; ``"tf32x3"``: three tf32 tensor-core passes, about 2⁻²² relative per
product; ``"fp64"`` for ``A`` only: float64 operands and accumulation, ``A`` rounded once,
which removes the length-``d`` fp32 accumulation error that dominates the result's).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["tri_inv_chunks_kernel", "tri_inv_chunks_triton"]

BS = tl.constexpr(16)


@triton.jit
def _vec(ptr, r0, n):
    """Entries ``r0 … r0 + 15`` of a row vector (zeros past ``n``)."""
    r = r0 + tl.arange(0, BS)
    return tl.load(ptr + r, mask=r < n, other=0.0)


@triton.jit
def _tile(ptr, r0, c0, n, stride_n, d, BK: tl.constexpr):
    """The ``(16, BK)`` tile at row ``r0``, column ``c0`` (zeros past ``n`` rows, ``d`` columns)."""
    r = r0 + tl.arange(0, BS)
    c = c0 + tl.arange(0, BK)
    m = (r < n)[:, None] & (c < d)[None, :]
    return tl.load(ptr + r[:, None] * stride_n + c[None, :], mask=m, other=0.0)


@triton.jit
def _zero(PREC: tl.constexpr):
    """A ``16×16`` accumulator: float64 for ``PREC="fp64"``, else float32."""
    if PREC == "fp64":
        return tl.zeros((BS, BS), dtype=tl.float64)
    else:
        return tl.zeros((BS, BS), dtype=tl.float32)


@triton.jit
def _cv(x, PREC: tl.constexpr):
    """A tile in the dots' operand dtype (float64 for ``PREC="fp64"``)."""
    if PREC == "fp64":
        return x.to(tl.float64)
    else:
        return x


@triton.jit
def _dot_acc(a, b, acc, PREC: tl.constexpr):
    """``acc + a bᵀ`` for two ``(16, BK)`` tiles (``PREC="fp64"``: in float64)."""
    if PREC == "fp64":
        return tl.dot(a.to(tl.float64), tl.trans(b.to(tl.float64)), acc)
    else:
        return tl.dot(a, tl.trans(b), acc, input_precision=PREC)


@triton.jit
def _last(x):
    """The last entry of a 16-vector."""
    return tl.sum(tl.where(tl.arange(0, BS) == BS - 1, x, 0.0), 0)


@triton.jit
def _strict_lower(A):
    r = tl.arange(0, BS)
    return tl.where(r[:, None] > r[None, :], A, 0.0)


@triton.jit
def _row_gate(Ri, Rj, DIAG: tl.constexpr):
    """``exp(R_i − R_j)`` for float64 cumulative sums (masked to 0 on/above the diagonal)."""
    D = Ri[:, None] - Rj[None, :]
    if DIAG:
        r = tl.arange(0, BS)
        D = tl.where(r[:, None] > r[None, :], D, float("-inf"))
    return tl.exp(D.to(tl.float32))


@triton.jit
def _diag_channel(kb, lb, r0, n, stride_kn, stride_ln, d, BKD: tl.constexpr):
    """``Σ_c K_ic K_jc exp(R_ic − R_jc)`` for ``i > j`` in the block at ``r0`` (per channel).

    ``R`` is the float64 cumulative sum of ``ℓ`` from row ``r0``; ``BKD`` channels at a time
    (re-read from cache: the tile is ``16×16×BKD``). The float64 ``R`` is split into float32
    ``hi + lo`` so that the tile's differences run in float32 to about ``u·|R_i − R_j|``.
    """
    r = r0 + tl.arange(0, BS)
    i = tl.arange(0, BS)
    below = (i[:, None] > i[None, :])[:, :, None]
    A = tl.zeros((BS, BS), dtype=tl.float32)
    for c0 in range(0, d, BKD):
        c = c0 + tl.arange(0, BKD)
        m = (r < n)[:, None] & (c < d)[None, :]
        k = tl.load(kb + r[:, None] * stride_kn + c[None, :], mask=m, other=0.0)
        ell = tl.load(lb + r[:, None] * stride_ln + c[None, :], mask=m, other=0.0)
        R = tl.cumsum(ell.to(tl.float64), 0)
        hi = R.to(tl.float32)
        lo = (R - hi.to(tl.float64)).to(tl.float32)
        D = (hi[:, None, :] - hi[None, :, :]) + (lo[:, None, :] - lo[None, :, :])
        D = tl.where(below, D, float("-inf"))
        A += tl.sum(k[:, None, :] * k[None, :, :] * tl.exp(D), 2)
    return A


@triton.jit
def _inv_diag(A):
    """``(I + A)⁻¹`` of a strictly lower ``16×16`` tile, by forward substitution on ``X − I``."""
    r = tl.arange(0, BS)
    X = -A  # rows 0 and 1 of X − I are already final
    for i in tl.static_range(2, BS):
        sel = r[:, None] == i
        a = -tl.sum(tl.where(sel, A, 0.0), 0)
        a = a + tl.sum(a[:, None] * X, 0)
        X = tl.where(sel, a[None, :], X)
    return X + (r[:, None] == r[None, :]).to(tl.float32)


@triton.jit
def _store(ob, r0, c0, n, stride_on, Y):
    r = r0 + tl.arange(0, BS)
    c = c0 + tl.arange(0, BS)
    tl.store(ob + r[:, None] * stride_on + c[None, :], Y, mask=(r < n)[:, None])


@triton.jit
def _mm(a, b, PREC: tl.constexpr):
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def tri_inv_chunks_kernel(
    k_ptr,
    beta_ptr,
    l_ptr,
    o_ptr,
    n,
    d,
    stride_kb,
    stride_kn,
    stride_bb,
    stride_lb,
    stride_ln,
    stride_ob,
    stride_on,
    NB: tl.constexpr,
    BK: tl.constexpr,
    BKD: tl.constexpr,
    DECAY: tl.constexpr,
    PREC_A: tl.constexpr,
    PREC_M: tl.constexpr,
):
    """Chunk ``program_id(0)`` of batch entry ``program_id(1)`` (module docstring).

    ``DECAY``: 0 none, 1 one log-decay per row (``ℓ`` is ``(B, n)``), 2 per channel
    (``(B, n, d)``). ``NB``: 16-row blocks per chunk (1, 2 or 4); ``BK``: channels per step of
    ``A``.
    """
    c = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    r0 = c * (NB * BS)
    kb = k_ptr + b * stride_kb
    bb = beta_ptr + b * stride_bb
    lb = l_ptr + b * stride_lb
    ob = o_ptr + b * stride_ob

    # ---- the blocks of A, accumulated over BK channels at a time --------------------------
    A00 = _zero(PREC_A)
    A10 = _zero(PREC_A)
    A11 = _zero(PREC_A)
    A20 = _zero(PREC_A)
    A21 = _zero(PREC_A)
    A22 = _zero(PREC_A)
    A30 = _zero(PREC_A)
    A31 = _zero(PREC_A)
    A32 = _zero(PREC_A)
    A33 = _zero(PREC_A)
    last = (tl.arange(0, BS) == BS - 1)[:, None]
    for c0 in range(0, d, BK):
        k0 = _tile(kb, r0, c0, n, stride_kn, d, BK)
        if NB > 1:
            k1 = _tile(kb, r0 + BS, c0, n, stride_kn, d, BK)
        if NB > 2:
            k2 = _tile(kb, r0 + 2 * BS, c0, n, stride_kn, d, BK)
            k3 = _tile(kb, r0 + 3 * BS, c0, n, stride_kn, d, BK)
        if DECAY == 2:
            # per block: the queries' factor exp(R_i − R_{I₀−1}), the keys' exp(R_{end} − R_j)
            # and the block total exp(Σ ℓ), all ≤ 1; cumulative sums in float64. The diagonal
            # blocks are formed exactly after the loop.
            if NB > 1:
                S0 = tl.cumsum(_tile(lb, r0, c0, n, stride_ln, d, BK).to(tl.float64), 0)
                t0 = tl.sum(tl.where(last, S0, 0.0), 0)
                p0 = k0 * tl.exp((t0[None, :] - S0).to(tl.float32))
                S1 = tl.cumsum(_tile(lb, r0 + BS, c0, n, stride_ln, d, BK).to(tl.float64), 0)
                A10 = _dot_acc(k1 * tl.exp(S1.to(tl.float32)), p0, A10, PREC_A)
            if NB > 2:
                t1 = tl.sum(tl.where(last, S1, 0.0), 0)
                p1 = k1 * tl.exp((t1[None, :] - S1).to(tl.float32))
                w1 = tl.exp(t1.to(tl.float32))[None, :]
                S2 = tl.cumsum(_tile(lb, r0 + 2 * BS, c0, n, stride_ln, d, BK).to(tl.float64), 0)
                t2 = tl.sum(tl.where(last, S2, 0.0), 0)
                p2 = k2 * tl.exp((t2[None, :] - S2).to(tl.float32))
                w2 = tl.exp(t2.to(tl.float32))[None, :]
                S3 = tl.cumsum(_tile(lb, r0 + 3 * BS, c0, n, stride_ln, d, BK).to(tl.float64), 0)
                q2 = k2 * tl.exp(S2.to(tl.float32))
                q3 = k3 * tl.exp(S3.to(tl.float32))
                A20 = _dot_acc(q2, p0 * w1, A20, PREC_A)
                A21 = _dot_acc(q2, p1, A21, PREC_A)
                A30 = _dot_acc(q3, p0 * (w1 * w2), A30, PREC_A)
                A31 = _dot_acc(q3, p1 * w2, A31, PREC_A)
                A32 = _dot_acc(q3, p2, A32, PREC_A)
        else:
            k0 = _cv(k0, PREC_A)
            A00 = _dot_acc(k0, k0, A00, PREC_A)
            if NB > 1:
                k1 = _cv(k1, PREC_A)
                A10 = _dot_acc(k1, k0, A10, PREC_A)
                A11 = _dot_acc(k1, k1, A11, PREC_A)
            if NB > 2:
                k2 = _cv(k2, PREC_A)
                k3 = _cv(k3, PREC_A)
                A20 = _dot_acc(k2, k0, A20, PREC_A)
                A21 = _dot_acc(k2, k1, A21, PREC_A)
                A22 = _dot_acc(k2, k2, A22, PREC_A)
                A30 = _dot_acc(k3, k0, A30, PREC_A)
                A31 = _dot_acc(k3, k1, A31, PREC_A)
                A32 = _dot_acc(k3, k2, A32, PREC_A)
                A33 = _dot_acc(k3, k3, A33, PREC_A)

    # ---- β, the decay factors, the strictly lower mask -------------------------------------
    b0 = _vec(bb, r0, n)[:, None]
    if DECAY == 2:
        A00 = _diag_channel(kb, lb, r0, n, stride_kn, stride_ln, d, BKD)
    if DECAY == 1:
        R0 = tl.cumsum(_vec(lb, r0, n).to(tl.float64), 0)
        A00 = A00.to(tl.float32) * _row_gate(R0, R0, True)
    A00 = _strict_lower(b0 * A00.to(tl.float32))
    Y00 = _inv_diag(A00)
    _store(ob, r0, 0, n, stride_on, Y00)
    zero = tl.zeros((BS, BS), dtype=tl.float32)
    if NB > 1:
        b1 = _vec(bb, r0 + BS, n)[:, None]
        A10 = A10.to(tl.float32)
        if DECAY == 2:
            A11 = _diag_channel(kb, lb, r0 + BS, n, stride_kn, stride_ln, d, BKD)
        if DECAY == 1:
            R1 = tl.cumsum(_vec(lb, r0 + BS, n).to(tl.float64), 0) + _last(R0)
            A11 = A11.to(tl.float32) * _row_gate(R1, R1, True)
            A10 = A10 * _row_gate(R1, R0, False)
        A10 = b1 * A10
        Y11 = _inv_diag(_strict_lower(b1 * A11.to(tl.float32)))
        Y10 = -_mm(Y11, _mm(A10, Y00, PREC_M), PREC_M)
        _store(ob, r0, BS, n, stride_on, zero)
        _store(ob, r0 + BS, 0, n, stride_on, Y10)
        _store(ob, r0 + BS, BS, n, stride_on, Y11)
    if NB > 2:
        _store(ob, r0, 2 * BS, n, stride_on, zero)
        _store(ob, r0, 3 * BS, n, stride_on, zero)
        _store(ob, r0 + BS, 2 * BS, n, stride_on, zero)
        _store(ob, r0 + BS, 3 * BS, n, stride_on, zero)
        b2 = _vec(bb, r0 + 2 * BS, n)[:, None]
        b3 = _vec(bb, r0 + 3 * BS, n)[:, None]
        A20 = A20.to(tl.float32)
        A21 = A21.to(tl.float32)
        A30 = A30.to(tl.float32)
        A31 = A31.to(tl.float32)
        A32 = A32.to(tl.float32)
        if DECAY == 2:
            A22 = _diag_channel(kb, lb, r0 + 2 * BS, n, stride_kn, stride_ln, d, BKD)
            A33 = _diag_channel(kb, lb, r0 + 3 * BS, n, stride_kn, stride_ln, d, BKD)
        if DECAY == 1:
            R2 = tl.cumsum(_vec(lb, r0 + 2 * BS, n).to(tl.float64), 0) + _last(R1)
            R3 = tl.cumsum(_vec(lb, r0 + 3 * BS, n).to(tl.float64), 0) + _last(R2)
            A22 = A22.to(tl.float32) * _row_gate(R2, R2, True)
            A33 = A33.to(tl.float32) * _row_gate(R3, R3, True)
            A20 = A20 * _row_gate(R2, R0, False)
            A21 = A21 * _row_gate(R2, R1, False)
            A30 = A30 * _row_gate(R3, R0, False)
            A31 = A31 * _row_gate(R3, R1, False)
            A32 = A32 * _row_gate(R3, R2, False)
        A20 = b2 * A20
        A21 = b2 * A21
        A30 = b3 * A30
        A31 = b3 * A31
        A32 = b3 * A32
        Y22 = _inv_diag(_strict_lower(b2 * A22.to(tl.float32)))
        Y33 = _inv_diag(_strict_lower(b3 * A33.to(tl.float32)))
        Y21 = -_mm(Y22, _mm(A21, Y11, PREC_M), PREC_M)
        Y32 = -_mm(Y33, _mm(A32, Y22, PREC_M), PREC_M)
        Y20 = -_mm(Y22, _mm(A20, Y00, PREC_M) + _mm(A21, Y10, PREC_M), PREC_M)
        Y31 = -_mm(Y33, _mm(A31, Y11, PREC_M) + _mm(A32, Y21, PREC_M), PREC_M)
        Y30 = -_mm(
            Y33,
            _mm(A30, Y00, PREC_M) + _mm(A31, Y10, PREC_M) + _mm(A32, Y20, PREC_M),
            PREC_M,
        )
        _store(ob, r0 + 2 * BS, 0, n, stride_on, Y20)
        _store(ob, r0 + 2 * BS, BS, n, stride_on, Y21)
        _store(ob, r0 + 2 * BS, 2 * BS, n, stride_on, Y22)
        _store(ob, r0 + 2 * BS, 3 * BS, n, stride_on, zero)
        _store(ob, r0 + 3 * BS, 0, n, stride_on, Y30)
        _store(ob, r0 + 3 * BS, BS, n, stride_on, Y31)
        _store(ob, r0 + 3 * BS, 2 * BS, n, stride_on, Y32)
        _store(ob, r0 + 3 * BS, 3 * BS, n, stride_on, Y33)


def tri_inv_chunks_triton(
    K: torch.Tensor,
    beta: torch.Tensor,
    log_decay: torch.Tensor | None,
    *,
    chunk_size: int,
    num_warps: int,
    prec_a: str,
    prec_m: str,
    block_k: int,
    block_channels: int,
) -> torch.Tensor:
    """One launch over every chunk; returns the ``(B, n, C)`` chunk inverses (float32).

    ``K`` is ``(B, n, d)``, ``β`` ``(B, n)``, ``ℓ`` None, ``(B, n)`` or ``(B, n, d)``, all
    float32. ``chunk_size ∈ {16, 32, 64}``; ``block_k``: channels per step of ``A``;
    ``block_channels``: channels per step of the exact per-channel diagonal blocks (powers of
    two).
    """
    B, n, d = K.shape
    if chunk_size not in (16, 32, 64):
        raise ValueError(f"the chunk kernel takes chunk_size 16, 32 or 64, got {chunk_size}")
    K = K if K.stride(-1) == 1 else K.contiguous()
    beta = beta.contiguous()
    out = torch.empty(B, n, chunk_size, dtype=torch.float32, device=K.device)
    if log_decay is None:
        decay, L, sl = 0, K, (0, 0)
    else:
        L = log_decay.contiguous()
        decay = 1 if L.ndim == 2 else 2
        sl = (L.stride(0), L.stride(1) if L.ndim == 3 else 1)
    BD = max(16, triton.next_power_of_2(d))
    tri_inv_chunks_kernel[(triton.cdiv(n, chunk_size), B)](
        K,
        beta,
        L,
        out,
        n,
        d,
        K.stride(0),
        K.stride(1),
        beta.stride(0),
        *sl,
        out.stride(0),
        out.stride(1),
        NB=chunk_size // 16,
        BK=min(block_k, BD),
        BKD=min(block_channels, BD),
        DECAY=decay,
        PREC_A=prec_a,
        PREC_M=prec_m,
        num_warps=num_warps,
    )
    return out
