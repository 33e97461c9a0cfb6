r"""Per-chunk inverses (one Triton program per ``C``-row chunk) and the launch helpers they share.

:func:`tri_chunk_kernel`: ``A = tril(Q_c K_cᵀ, −1)``, ``N = Λ_c⁻¹ A`` and
``Y_cc = (I + N)⁻¹ Λ_c⁻¹``. The inverse is built from ``BS×BS`` diagonal blocks (row-by-row
forward substitution, all blocks at once as a 3-D tile) merged by doubling,
``Y_{2s} = Y_s − Y_s (N ⊙ M_s) Y_s`` with ``M_s`` the off-diagonal ``s``-blocks inside each
``2s``-block (the block formula ``[[A,0],[C,B]]⁻¹ = [[A⁻¹,0],[−B⁻¹CA⁻¹,B⁻¹]]``,
docs/math.md §5.2). The doubling uses full ``C×C×C`` dots masked to the off-diagonal blocks:
mostly zeros, but each level is two tensor-core products. The kernel also writes, where asked,
``P = Y_cc Q_c``, ``R = Y_ccᵀ K_c`` and ``U = Y_cc V_c``, the products the inverse's levels and
the solves start from. Rows ``≥ n`` behave as identity rows.

Every product is :func:`mm`: three tf32 tensor-core products of a hi/lo split, fp32-accurate
(≈ 1e-6 relative at n = 4096 against float64) and faster than fp32 FMA or Triton's own
``"tf32x3"`` (docs/benchmarks.md). All offsets are 64-bit; ``tl.dot`` needs every block dim
≥ 16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = [
    "SENTINEL",
    "init_scratch",
    "tf32_split",
    "mm",
    "chunk_inverse",
    "tri_chunk_kernel",
    "pow2",
    "chunk_pass",
]

#: Bit pattern (a NaN with a payload that arithmetic never produces: NVIDIA GPUs return the
#: canonical NaN ``0x7FFFFFFF``) that marks the scan's buffers not yet written.
SENTINEL = tl.constexpr(0x7FC0DEAD)
_INIT_BLOCK = tl.constexpr(1024)


@triton.jit
def init_scratch(ptr, n_zero, n_fill, INIT: tl.constexpr):
    """With ``INIT``: ``n_zero`` zeros, then ``n_fill`` :data:`SENTINEL` at int32 ``ptr``.

    The work is split over all programs of the launch. The scan solve's flags and its
    not-yet-written marks are set so by its first launch instead of a memset of their own: the
    later launches start after this one has ended.
    """
    if INIT:
        pid = tl.program_id(0) + tl.program_id(1) * tl.num_programs(0)
        nprog = tl.num_programs(0) * tl.num_programs(1)
        total = n_zero + n_fill
        per = tl.cdiv(tl.cdiv(total, nprog), _INIT_BLOCK) * _INIT_BLOCK
        for i0 in range(pid * per, tl.minimum(pid * per + per, total), _INIT_BLOCK):
            i = i0 + tl.arange(0, _INIT_BLOCK)
            val = tl.where(i < n_zero, 0, SENTINEL)
            tl.store(ptr + i, val, mask=i < total)


@triton.jit
def tf32_split(x):
    """``(hi, lo)`` with ``hi`` = ``x`` truncated to tf32 (10 mantissa bits) and ``lo = x − hi``."""
    hi = (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return hi, x - hi


@triton.jit
def mm(a, b):
    """``a @ b`` in fp32 as three tf32 tensor-core products (CUTLASS's 3xTF32).

    ``a = a_hi + a_lo`` with ``a_hi`` the top 11 significant bits (a tf32 value, exact) and
    ``a_lo = a − a_hi`` (exact in fp32), then ``a_hi b_lo + a_lo b_hi + a_hi b_hi`` with fp32
    accumulation. The dropped ``a_lo b_lo`` and the tf32 rounding of the ``lo`` parts are
    ≈ 2⁻²¹ relative, so the product is fp32-accurate (≈ 1e-6) at tensor-core speed; one tf32
    product would be ≈ 1e-4. The split is done here rather than by Triton's ``"tf32x3"``, which
    measured up to 2× slower in the chunk kernel.
    """
    a_hi, a_lo = tf32_split(a)
    b_hi, b_lo = tf32_split(b)
    # one accumulator: Triton folds ``dot(a, b) + c`` into ``dot(a, b, c)`` anyway
    acc = tl.dot(a_hi, b_lo, input_precision="tf32")
    acc = tl.dot(a_lo, b_hi, acc, input_precision="tf32")
    return tl.dot(a_hi, b_hi, acc, input_precision="tf32")


@triton.jit
def chunk_inverse(A, lam, BC: tl.constexpr, BS: tl.constexpr, LOG_M: tl.constexpr):
    """``(Λ + A)⁻¹`` for a strictly lower ``BC×BC`` tile ``A`` and the diagonal ``lam``."""
    N = A / lam[:, None]
    rows = tl.arange(0, BC)
    if BS == 1:
        Y = (rows[:, None] == rows[None, :]).to(tl.float32)
    else:
        Y = _diag_block_inverse(N, BC, BS)
    for lv in tl.static_range(LOG_M):
        s = BS * (1 << lv)
        pair = (rows[:, None] // (2 * s)) == (rows[None, :] // (2 * s))
        off = pair & ((rows[:, None] // s) != (rows[None, :] // s))
        NY = mm(tl.where(off, N, 0.0), Y)
        Y = Y - mm(Y, NY)
    return Y / lam[None, :]


@triton.jit
def _diag_block_inverse(N, BC: tl.constexpr, BS: tl.constexpr):
    """``(I + N)⁻¹`` on the ``BS×BS`` diagonal blocks of ``N`` (zero elsewhere), all at once."""
    NB: tl.constexpr = BC // BS
    bi = tl.arange(0, NB)
    same = bi[:, None, None, None] == bi[None, None, :, None]
    N3 = tl.sum(tl.where(same, tl.reshape(N, (NB, BS, NB, BS)), 0.0), axis=2)
    r = tl.arange(0, BS)
    eye = (r[:, None] == r[None, :]).to(tl.float32)
    Z3 = tl.zeros((NB, BS, BS), dtype=tl.float32) + eye[None, :, :]
    # forward substitution in every BS-block at once: Z_i = e_i − Σ_{j<i} N_ij Z_j
    for i in range(1, BS):
        sel = (r == i)[None, :, None]
        n_i = tl.sum(tl.where(sel, N3, 0.0), axis=1)
        z_i = tl.sum(n_i[:, :, None] * Z3, axis=1)
        Z3 = tl.where(sel, Z3 - z_i[:, None, :], Z3)
    return tl.reshape(tl.where(same, Z3[:, :, None, :], 0.0), (BC, BC))


@triton.jit
def tri_chunk_kernel(
    q_ptr,
    k_ptr,
    lam_ptr,
    v_ptr,
    y_ptr,
    p_ptr,
    r_ptr,
    u_ptr,
    n,
    d,
    e,
    stride_qb,
    stride_qn,
    stride_lb,
    stride_vb,
    stride_vn,
    stride_yb,
    stride_yn,
    stride_pb,
    stride_pn,
    stride_ub,
    stride_un,
    BC: tl.constexpr,
    BS: tl.constexpr,
    LOG_M: tl.constexpr,
    BD: tl.constexpr,
    BE: tl.constexpr,
    STORE_Y: tl.constexpr,
    STORE_P: tl.constexpr,
    STORE_R: tl.constexpr,
    HAS_V: tl.constexpr,
    scratch_ptr=None,
    n_zero=0,
    n_fill=0,
    INIT: tl.constexpr = False,
    WHOLE: tl.constexpr = False,
):
    """Chunk ``c`` of batch entry ``b`` (module docstring): ``Y_cc`` and, by flag, ``P, R, U``.

    ``STORE_Y/P/R``, ``HAS_V``: which outputs are written; ``WHOLE``: ``Q, K, V`` as one tile
    each (``BD ≥ d``, ``BE ≥ e``), else loops over ``BD``/``BE`` column tiles; ``INIT``: also
    initialise the scan's scratch (:func:`init_scratch`).
    """
    c = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    init_scratch(scratch_ptr, n_zero, n_fill, INIT)
    ar = tl.arange(0, BC)
    rows = c * BC + ar
    rm = rows < n
    qb = q_ptr + b * stride_qb
    kb = k_ptr + b * stride_qb
    lam = tl.load(lam_ptr + b * stride_lb + rows, mask=rm, other=1.0)
    if WHOLE:
        # every operand in one tile, all loaded first: their memory latencies overlap, and
        # each product below is one dot
        cols = tl.arange(0, BD)
        m = rm[:, None] & (cols < d)[None, :]
        qt = tl.load(qb + rows[:, None] * stride_qn + cols[None, :], mask=m, other=0.0)
        kt = tl.load(kb + rows[:, None] * stride_qn + cols[None, :], mask=m, other=0.0)
        if HAS_V:
            ce = tl.arange(0, BE)
            mv = rm[:, None] & (ce < e)[None, :]
            vt = tl.load(
                v_ptr + b * stride_vb + rows[:, None] * stride_vn + ce[None, :], mask=mv, other=0.0
            )
        A = mm(qt, tl.trans(kt))
    else:
        A = tl.zeros((BC, BC), dtype=tl.float32)
        for d0 in range(0, d, BD):
            cols = d0 + tl.arange(0, BD)
            m = rm[:, None] & (cols < d)[None, :]
            qt = tl.load(qb + rows[:, None] * stride_qn + cols[None, :], mask=m, other=0.0)
            kt = tl.load(kb + rows[:, None] * stride_qn + cols[None, :], mask=m, other=0.0)
            A += mm(qt, tl.trans(kt))
    A = tl.where(ar[:, None] > ar[None, :], A, 0.0)
    Y = chunk_inverse(A, lam, BC, BS, LOG_M)
    if STORE_Y:
        yp = y_ptr + b * stride_yb + rows[:, None] * stride_yn + rows[None, :]
        tl.store(yp, Y, mask=rm[:, None] & rm[None, :])
    if WHOLE:
        off = b * stride_pb + rows[:, None] * stride_pn + cols[None, :]
        if STORE_P:
            tl.store(p_ptr + off, mm(Y, qt), mask=m)
        if STORE_R:
            tl.store(r_ptr + off, mm(tl.trans(Y), kt), mask=m)
        if HAS_V:
            up = u_ptr + b * stride_ub + rows[:, None] * stride_un + ce[None, :]
            tl.store(up, mm(Y, vt), mask=mv)
    else:
        if STORE_P or STORE_R:
            for d0 in range(0, d, BD):
                cols = d0 + tl.arange(0, BD)
                m = rm[:, None] & (cols < d)[None, :]
                off = b * stride_pb + rows[:, None] * stride_pn + cols[None, :]
                if STORE_P:
                    qt = tl.load(qb + rows[:, None] * stride_qn + cols[None, :], mask=m, other=0.0)
                    tl.store(p_ptr + off, mm(Y, qt), mask=m)
                if STORE_R:
                    kt = tl.load(kb + rows[:, None] * stride_qn + cols[None, :], mask=m, other=0.0)
                    tl.store(r_ptr + off, mm(tl.trans(Y), kt), mask=m)
        if HAS_V:
            for e0 in range(0, e, BE):
                cols = e0 + tl.arange(0, BE)
                m = rm[:, None] & (cols < e)[None, :]
                vt = tl.load(
                    v_ptr + b * stride_vb + rows[:, None] * stride_vn + cols[None, :],
                    mask=m,
                    other=0.0,
                )
                up = u_ptr + b * stride_ub + rows[:, None] * stride_un + cols[None, :]
                tl.store(up, mm(Y, vt), mask=m)


def pow2(x: int, lo: int = 16) -> int:
    """The smallest power of two ``≥ x`` and ``≥ lo`` (a tile dimension)."""
    return max(lo, 1 << max(0, (x - 1).bit_length()))


def chunk_pass(
    Q: torch.Tensor,
    K: torch.Tensor,
    lam: torch.Tensor,
    *,
    chunk_size: int,
    block_s: int,
    warps: int,
    V: torch.Tensor | None = None,
    Y: torch.Tensor | None = None,
    P: torch.Tensor | None = None,
    R: torch.Tensor | None = None,
    U: torch.Tensor | None = None,
    BE: int,
    scratch: tuple[torch.Tensor, int] | None = None,
    whole: bool = False,
) -> None:
    """One launch of :func:`tri_chunk_kernel` over every ``C``-row chunk of every batch entry.

    Stores, where given: ``Y`` the chunk inverses ``Y_cc = T_cc⁻¹`` (in place in the ``n×n``
    result), ``P = Y_cc Q_c``, ``R = Y_ccᵀ K_c`` (same strides as ``P``), ``U = Y_cc V_c``
    (``BE``-column tiles). ``whole``: ``Q, K, V`` as whole tiles, all loaded first, so their
    memory latencies overlap (the scan, ``e ≤ 128``). ``scratch = (buffer, n_zero)``: also set
    the int32 ``buffer``'s first ``n_zero`` elements to 0 and the rest to :data:`SENTINEL`.
    """
    B, n, d = Q.shape
    if P is not None and R is not None and P.stride()[:2] != R.stride()[:2]:
        raise ValueError("P and R share their strides in the chunk kernel")

    def strides(T: torch.Tensor | None) -> tuple[int, int]:
        return (T.stride(0), T.stride(1)) if T is not None else (0, 0)

    def ptr(T: torch.Tensor | None) -> torch.Tensor:
        return T if T is not None else Q  # never read or written (its STORE/HAS flag is off)

    tri_chunk_kernel[(triton.cdiv(n, chunk_size), B)](
        Q,
        K,
        lam,
        ptr(V),
        ptr(Y),
        ptr(P),
        ptr(R),
        ptr(U),
        n,
        d,
        V.shape[-1] if V is not None else 0,
        Q.stride(0),
        Q.stride(1),
        lam.stride(0),
        *strides(V),
        *strides(Y),
        *strides(P if P is not None else R),
        *strides(U),
        BC=chunk_size,
        BS=block_s,
        LOG_M=(chunk_size // block_s).bit_length() - 1,
        BD=pow2(d) if whole else min(64, pow2(d)),
        BE=pow2(V.shape[-1]) if whole and V is not None else BE,
        WHOLE=whole,
        STORE_Y=Y is not None,
        STORE_P=P is not None,
        STORE_R=R is not None,
        HAS_V=V is not None,
        num_warps=warps,
        scratch_ptr=None if scratch is None else scratch[0],
        n_zero=0 if scratch is None else scratch[1],
        n_fill=0 if scratch is None else scratch[0].numel() - scratch[1],
        INIT=scratch is not None,
    )
