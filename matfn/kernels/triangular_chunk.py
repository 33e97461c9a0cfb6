r"""Per-chunk Triton kernels of :mod:`matfn.kernels.triangular` (one program per ``C``-row chunk).

**Dense kernel** (``_tri_chunk_kernel``): ``A = tril(Q_c K_cᵀ, −1)``,
``N = Λ_c⁻¹ A`` and ``Y_cc = (I + N)⁻¹ Λ_c⁻¹``. The inverse is built from ``BS×BS`` diagonal
blocks (row-by-row forward substitution, all blocks at once as a 3-D tile) merged by doubling:
``Y_{2s} = Y_s − Y_s (N ⊙ M_s) Y_s`` with ``M_s`` the off-diagonal ``s``-blocks inside each
``2s``-block (the block formula ``[[A,0],[C,B]]⁻¹ = [[A⁻¹,0],[−B⁻¹CA⁻¹,B⁻¹]]``). It also writes
``P = Y_cc Q_c``, ``R = Y_ccᵀ K_c`` and, for the solve, ``U = Y_cc V_c``. The doubling uses
full ``C×C×C`` dots masked to the off-diagonal blocks, mostly multiplying zeros;
``chunk_impl="blocked"`` (``C = 64`` only) selects ``_tri_chunk_blocked_kernel`` instead, same
arguments and outputs, which works on explicit ``16×16`` blocks as fla's ``solve_tril`` does:
the 10 blocks ``A_ij`` (``i ≥ j``), the 4 diagonal inverses by doubling inside the block, the 6
off-diagonal blocks of the inverse by ``16×16`` dots (``Z_21 = −Z_22 N_21 Z_11``, …), and
``P``, ``R``, ``U`` by block rows.

Both kernels take the same arguments and flags (``STORE_Y``, ``STORE_P``, ``STORE_R``, ``HAS_V``)
so the launchers call either one; rows ``≥ n`` behave as identity rows. On the H100 (8192
independent 64-row chunks, d = 128; docs/benchmarks.md) the dense kernel took 0.635 ms with
``"3xtf32"`` dots, 1.14 ms with Triton's ``"tf32x3"``, 5.2 ms with ``"ieee"`` and 0.47 ms with
one-pass ``"tf32"`` (3.5e-4 error); the blocked kernel 0.90 ms with ``"ieee"`` and 0.86–3.2 ms
with three-pass products (many small dots).
"""

from __future__ import annotations

import triton
import triton.language as tl

#: Bit pattern (a NaN with a payload that arithmetic never produces: NVIDIA GPUs return the
#: canonical NaN ``0x7FFFFFFF``) that marks scan buffers not yet written (:func:`_init_scratch`).
SENTINEL = tl.constexpr(0x7FC0DEAD)
_INIT_BLOCK = tl.constexpr(1024)


@triton.jit
def _init_scratch(ptr, n_zero, n_fill, INIT: tl.constexpr):
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
def _tf32_split(x):
    """``(hi, lo)`` with ``hi`` = ``x`` truncated to tf32 (10 mantissa bits) and ``lo = x − hi``."""
    hi = (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return hi, x - hi


@triton.jit
def _mm(a, b, PREC: tl.constexpr):
    """``a @ b`` in fp32 with ``tl.dot`` mode ``PREC``, or ``"3xtf32"``: the hi/lo split done here.

    ``"3xtf32"`` (CUTLASS's 3xTF32): ``a = a_hi + a_lo`` with ``a_hi`` the top 11 significant bits
    (a tf32 value, exact) and ``a_lo = a − a_hi`` (exact in fp32), then
    ``a_hi b_lo + a_lo b_hi + a_hi b_hi`` as three tf32 tensor-core products with fp32 accumulation.
    The dropped ``a_lo b_lo`` and the tf32 rounding of the ``lo`` parts are ≈ 2⁻²¹ relative, so the
    product is fp32-accurate (≈ 1e-6) at tensor-core speed. Triton's own ``"tf32x3"`` does the
    same split inside the compiler; this one measured up to 2× faster in the chunk kernel.
    """
    if PREC == "3xtf32":
        a_hi, a_lo = _tf32_split(a)
        b_hi, b_lo = _tf32_split(b)
        # one accumulator: Triton folds ``dot(a, b) + c`` into ``dot(a, b, c)`` anyway (three
        # accumulators gave the same PTX, session 11)
        acc = tl.dot(a_hi, b_lo, input_precision="tf32")
        acc = tl.dot(a_lo, b_hi, acc, input_precision="tf32")
        return tl.dot(a_hi, b_hi, acc, input_precision="tf32")
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _chunk_inverse(
    A, lam, BC: tl.constexpr, BS: tl.constexpr, LOG_M: tl.constexpr, PREC: tl.constexpr
):
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
        NY = _mm(tl.where(off, N, 0.0), Y, PREC)
        Y = Y - _mm(Y, NY, PREC)
    return Y / lam[None, :]


@triton.jit
def _diag_block_inverse(N, BC: tl.constexpr, BS: tl.constexpr):
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
def _tri_chunk_kernel(
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
    PREC: tl.constexpr,
    scratch_ptr=None,
    n_zero=0,
    n_fill=0,
    INIT: tl.constexpr = False,
    WHOLE: tl.constexpr = False,
):
    c = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    _init_scratch(scratch_ptr, n_zero, n_fill, INIT)
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
        A = _mm(qt, tl.trans(kt), PREC)
    else:
        A = tl.zeros((BC, BC), dtype=tl.float32)
        for d0 in range(0, d, BD):
            cols = d0 + tl.arange(0, BD)
            m = rm[:, None] & (cols < d)[None, :]
            qt = tl.load(qb + rows[:, None] * stride_qn + cols[None, :], mask=m, other=0.0)
            kt = tl.load(kb + rows[:, None] * stride_qn + cols[None, :], mask=m, other=0.0)
            A += _mm(qt, tl.trans(kt), PREC)
    A = tl.where(ar[:, None] > ar[None, :], A, 0.0)
    Y = _chunk_inverse(A, lam, BC, BS, LOG_M, PREC)
    if STORE_Y:
        yp = y_ptr + b * stride_yb + rows[:, None] * stride_yn + rows[None, :]
        tl.store(yp, Y, mask=rm[:, None] & rm[None, :])
    if WHOLE:
        off = b * stride_pb + rows[:, None] * stride_pn + cols[None, :]
        if STORE_P:
            tl.store(p_ptr + off, _mm(Y, qt, PREC), mask=m)
        if STORE_R:
            tl.store(r_ptr + off, _mm(tl.trans(Y), kt, PREC), mask=m)
        if HAS_V:
            up = u_ptr + b * stride_ub + rows[:, None] * stride_un + ce[None, :]
            tl.store(up, _mm(Y, vt, PREC), mask=mv)
    else:
        if STORE_P or STORE_R:
            for d0 in range(0, d, BD):
                cols = d0 + tl.arange(0, BD)
                m = rm[:, None] & (cols < d)[None, :]
                off = b * stride_pb + rows[:, None] * stride_pn + cols[None, :]
                if STORE_P:
                    qt = tl.load(qb + rows[:, None] * stride_qn + cols[None, :], mask=m, other=0.0)
                    tl.store(p_ptr + off, _mm(Y, qt, PREC), mask=m)
                if STORE_R:
                    kt = tl.load(kb + rows[:, None] * stride_qn + cols[None, :], mask=m, other=0.0)
                    tl.store(r_ptr + off, _mm(tl.trans(Y), kt, PREC), mask=m)
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
                tl.store(up, _mm(Y, vt, PREC), mask=m)


# ---------------------------------------------------------------------------------------------
# Blocked chunk kernel (C = 64 as explicit 16×16 blocks)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _load_tile(base, rows, stride, cols, n, ncols):
    """``base[rows, cols]`` (row stride ``stride``), zero outside ``rows < n``, ``cols < ncols``."""
    m = (rows < n)[:, None] & (cols < ncols)[None, :]
    return tl.load(base + rows[:, None] * stride + cols[None, :], mask=m, other=0.0)


@triton.jit
def _store_tile(base, rows, stride, cols, val, n, ncols):
    m = (rows < n)[:, None] & (cols < ncols)[None, :]
    tl.store(base + rows[:, None] * stride + cols[None, :], val, mask=m)


@triton.jit
def _unit_lower_inv16(N, PREC: tl.constexpr):
    """``(I + N)⁻¹`` for a strictly lower ``16×16`` ``N`` by doubling inside the block.

    ``Z_{2s} = Z_s − Z_s (N ⊙ M_s) Z_s`` for ``s = 2, 4, 8`` (``M_s``: the off-diagonal
    ``s``-blocks of each ``2s``-block) from ``Z_2 = I − N ⊙ M_1`` (``Z_1 = I``): 6 dots.
    """
    r = tl.arange(0, 16)
    ri = r[:, None]
    rj = r[None, :]
    Z = (ri == rj).to(tl.float32) - tl.where((ri // 2) == (rj // 2), N, 0.0)
    for lv in tl.static_range(1, 4):
        s = 1 << lv
        off = ((ri // (2 * s)) == (rj // (2 * s))) & ((ri // s) != (rj // s))
        NZ = _mm(tl.where(off, N, 0.0), Z, PREC)
        Z = Z - _mm(Z, NZ, PREC)
    return Z


@triton.jit
def _lower_mul(
    Y11, Y21, Y22, Y31, Y32, Y33, Y41, Y42, Y43, Y44, x1, x2, x3, x4, PREC: tl.constexpr
):
    """Row blocks of ``Y X`` for a block lower ``Y`` and the row blocks ``x_j`` of ``X``."""
    o1 = _mm(Y11, x1, PREC)
    o2 = _mm(Y21, x1, PREC) + _mm(Y22, x2, PREC)
    o3 = _mm(Y31, x1, PREC) + _mm(Y32, x2, PREC) + _mm(Y33, x3, PREC)
    o4 = _mm(Y41, x1, PREC) + _mm(Y42, x2, PREC) + _mm(Y43, x3, PREC) + _mm(Y44, x4, PREC)
    return o1, o2, o3, o4


@triton.jit
def _lower_t_mul(
    Y11, Y21, Y22, Y31, Y32, Y33, Y41, Y42, Y43, Y44, x1, x2, x3, x4, PREC: tl.constexpr
):
    """Row blocks of ``Yᵀ X`` for a block lower ``Y``: ``(Yᵀ X)_j = Σ_{i≥j} Y_ijᵀ x_i``."""
    o1 = (
        _mm(tl.trans(Y11), x1, PREC)
        + _mm(tl.trans(Y21), x2, PREC)
        + _mm(tl.trans(Y31), x3, PREC)
        + _mm(tl.trans(Y41), x4, PREC)
    )
    o2 = _mm(tl.trans(Y22), x2, PREC) + _mm(tl.trans(Y32), x3, PREC) + _mm(tl.trans(Y42), x4, PREC)
    o3 = _mm(tl.trans(Y33), x3, PREC) + _mm(tl.trans(Y43), x4, PREC)
    o4 = _mm(tl.trans(Y44), x4, PREC)
    return o1, o2, o3, o4


@triton.jit
def _tri_chunk_blocked_kernel(
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
    PREC: tl.constexpr,
    scratch_ptr=None,
    n_zero=0,
    n_fill=0,
    INIT: tl.constexpr = False,
    WHOLE: tl.constexpr = False,
):
    """``_tri_chunk_kernel`` for ``BC = 64`` on explicit ``16×16`` blocks.

    Same arguments and outputs (``BS``, ``LOG_M`` unused); blocks ``i, j = 1..4`` of the chunk:

    * ``A_ij = Q_i K_jᵀ`` (``i > j``; strictly lower part for ``i = j``), ``N_ij = Λ_i⁻¹ A_ij``;
    * ``Z_ii = (I + N_ii)⁻¹`` (``_unit_lower_inv16``); off-diagonal blocks of
      ``Z = (I + N)⁻¹`` as in fla's ``merge_16x16_to_64x64_inverse_kernel``:
      ``Z_21 = −Z_22 N_21 Z_11``, ``Z_32 = −Z_33 N_32 Z_22``, ``Z_43 = −Z_44 N_43 Z_33``,
      ``Z_31 = −Z_33 (N_31 Z_11 + N_32 Z_21)``, ``Z_42 = −Z_44 (N_42 Z_22 + N_43 Z_32)``,
      ``Z_41 = −Z_44 (N_41 Z_11 + N_42 Z_21 + N_43 Z_31)``;
    * ``Y_ij = Z_ij Λ_j⁻¹``; ``Y`` (zeros in the upper blocks), ``P = Y Q_c``, ``R = Yᵀ K_c``
      and ``U = Y V_c`` are written block by block.

    Rows ``≥ n`` are identity rows (``Q = K = 0``, ``λ = 1``).
    """
    tl.static_assert(BC == 64, "the blocked chunk kernel is written for BC = 64")
    c = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    _init_scratch(scratch_ptr, n_zero, n_fill, INIT)
    r = tl.arange(0, 16)
    r1 = c * BC + r
    r2 = r1 + 16
    r3 = r1 + 32
    r4 = r1 + 48
    qb = q_ptr + b * stride_qb
    kb = k_ptr + b * stride_qb

    # ---- A_ij = Q_i K_jᵀ, i ≥ j (10 blocks)
    A11 = tl.zeros((16, 16), dtype=tl.float32)
    A21 = tl.zeros((16, 16), dtype=tl.float32)
    A22 = tl.zeros((16, 16), dtype=tl.float32)
    A31 = tl.zeros((16, 16), dtype=tl.float32)
    A32 = tl.zeros((16, 16), dtype=tl.float32)
    A33 = tl.zeros((16, 16), dtype=tl.float32)
    A41 = tl.zeros((16, 16), dtype=tl.float32)
    A42 = tl.zeros((16, 16), dtype=tl.float32)
    A43 = tl.zeros((16, 16), dtype=tl.float32)
    A44 = tl.zeros((16, 16), dtype=tl.float32)
    for d0 in range(0, d, BD):
        cols = d0 + tl.arange(0, BD)
        q1 = _load_tile(qb, r1, stride_qn, cols, n, d)
        q2 = _load_tile(qb, r2, stride_qn, cols, n, d)
        q3 = _load_tile(qb, r3, stride_qn, cols, n, d)
        q4 = _load_tile(qb, r4, stride_qn, cols, n, d)
        k1 = tl.trans(_load_tile(kb, r1, stride_qn, cols, n, d))
        k2 = tl.trans(_load_tile(kb, r2, stride_qn, cols, n, d))
        k3 = tl.trans(_load_tile(kb, r3, stride_qn, cols, n, d))
        k4 = tl.trans(_load_tile(kb, r4, stride_qn, cols, n, d))
        A11 += _mm(q1, k1, PREC)
        A21 += _mm(q2, k1, PREC)
        A22 += _mm(q2, k2, PREC)
        A31 += _mm(q3, k1, PREC)
        A32 += _mm(q3, k2, PREC)
        A33 += _mm(q3, k3, PREC)
        A41 += _mm(q4, k1, PREC)
        A42 += _mm(q4, k2, PREC)
        A43 += _mm(q4, k3, PREC)
        A44 += _mm(q4, k4, PREC)

    # ---- N = Λ⁻¹ A (row-wise)
    lb = lam_ptr + b * stride_lb
    l1 = tl.load(lb + r1, mask=r1 < n, other=1.0)
    l2 = tl.load(lb + r2, mask=r2 < n, other=1.0)
    l3 = tl.load(lb + r3, mask=r3 < n, other=1.0)
    l4 = tl.load(lb + r4, mask=r4 < n, other=1.0)
    strict = r[:, None] > r[None, :]
    N11 = tl.where(strict, A11, 0.0) / l1[:, None]
    N22 = tl.where(strict, A22, 0.0) / l2[:, None]
    N33 = tl.where(strict, A33, 0.0) / l3[:, None]
    N44 = tl.where(strict, A44, 0.0) / l4[:, None]
    N21 = A21 / l2[:, None]
    N31 = A31 / l3[:, None]
    N32 = A32 / l3[:, None]
    N41 = A41 / l4[:, None]
    N42 = A42 / l4[:, None]
    N43 = A43 / l4[:, None]

    # ---- Z = (I + N)⁻¹: diagonal blocks, then the off-diagonal ones
    Z11 = _unit_lower_inv16(N11, PREC)
    Z22 = _unit_lower_inv16(N22, PREC)
    Z33 = _unit_lower_inv16(N33, PREC)
    Z44 = _unit_lower_inv16(N44, PREC)
    Z21 = -_mm(Z22, _mm(N21, Z11, PREC), PREC)
    Z32 = -_mm(Z33, _mm(N32, Z22, PREC), PREC)
    Z43 = -_mm(Z44, _mm(N43, Z33, PREC), PREC)
    Z31 = -_mm(Z33, _mm(N31, Z11, PREC) + _mm(N32, Z21, PREC), PREC)
    Z42 = -_mm(Z44, _mm(N42, Z22, PREC) + _mm(N43, Z32, PREC), PREC)
    Z41 = -_mm(Z44, _mm(N41, Z11, PREC) + _mm(N42, Z21, PREC) + _mm(N43, Z31, PREC), PREC)

    # ---- Y = Z Λ⁻¹ (column-wise)
    Y11 = Z11 / l1[None, :]
    Y21 = Z21 / l1[None, :]
    Y31 = Z31 / l1[None, :]
    Y41 = Z41 / l1[None, :]
    Y22 = Z22 / l2[None, :]
    Y32 = Z32 / l2[None, :]
    Y42 = Z42 / l2[None, :]
    Y33 = Z33 / l3[None, :]
    Y43 = Z43 / l3[None, :]
    Y44 = Z44 / l4[None, :]

    if STORE_Y:
        yb = y_ptr + b * stride_yb
        zero = tl.zeros((16, 16), dtype=tl.float32)
        _store_tile(yb, r1, stride_yn, r1, Y11, n, n)
        _store_tile(yb, r1, stride_yn, r2, zero, n, n)
        _store_tile(yb, r1, stride_yn, r3, zero, n, n)
        _store_tile(yb, r1, stride_yn, r4, zero, n, n)
        _store_tile(yb, r2, stride_yn, r1, Y21, n, n)
        _store_tile(yb, r2, stride_yn, r2, Y22, n, n)
        _store_tile(yb, r2, stride_yn, r3, zero, n, n)
        _store_tile(yb, r2, stride_yn, r4, zero, n, n)
        _store_tile(yb, r3, stride_yn, r1, Y31, n, n)
        _store_tile(yb, r3, stride_yn, r2, Y32, n, n)
        _store_tile(yb, r3, stride_yn, r3, Y33, n, n)
        _store_tile(yb, r3, stride_yn, r4, zero, n, n)
        _store_tile(yb, r4, stride_yn, r1, Y41, n, n)
        _store_tile(yb, r4, stride_yn, r2, Y42, n, n)
        _store_tile(yb, r4, stride_yn, r3, Y43, n, n)
        _store_tile(yb, r4, stride_yn, r4, Y44, n, n)
    if STORE_P or STORE_R:
        pb = p_ptr + b * stride_pb
        rb = r_ptr + b * stride_pb
        for d0 in range(0, d, BD):
            cols = d0 + tl.arange(0, BD)
            if STORE_P:
                P1, P2, P3, P4 = _lower_mul(
                    Y11, Y21, Y22, Y31, Y32, Y33, Y41, Y42, Y43, Y44,
                    _load_tile(qb, r1, stride_qn, cols, n, d),
                    _load_tile(qb, r2, stride_qn, cols, n, d),
                    _load_tile(qb, r3, stride_qn, cols, n, d),
                    _load_tile(qb, r4, stride_qn, cols, n, d),
                    PREC,
                )  # fmt: skip
                _store_tile(pb, r1, stride_pn, cols, P1, n, d)
                _store_tile(pb, r2, stride_pn, cols, P2, n, d)
                _store_tile(pb, r3, stride_pn, cols, P3, n, d)
                _store_tile(pb, r4, stride_pn, cols, P4, n, d)
            if STORE_R:
                R1, R2, R3, R4 = _lower_t_mul(
                    Y11, Y21, Y22, Y31, Y32, Y33, Y41, Y42, Y43, Y44,
                    _load_tile(kb, r1, stride_qn, cols, n, d),
                    _load_tile(kb, r2, stride_qn, cols, n, d),
                    _load_tile(kb, r3, stride_qn, cols, n, d),
                    _load_tile(kb, r4, stride_qn, cols, n, d),
                    PREC,
                )  # fmt: skip
                _store_tile(rb, r1, stride_pn, cols, R1, n, d)
                _store_tile(rb, r2, stride_pn, cols, R2, n, d)
                _store_tile(rb, r3, stride_pn, cols, R3, n, d)
                _store_tile(rb, r4, stride_pn, cols, R4, n, d)
    if HAS_V:
        vb = v_ptr + b * stride_vb
        ub = u_ptr + b * stride_ub
        for e0 in range(0, e, BE):
            cols = e0 + tl.arange(0, BE)
            U1, U2, U3, U4 = _lower_mul(
                Y11, Y21, Y22, Y31, Y32, Y33, Y41, Y42, Y43, Y44,
                _load_tile(vb, r1, stride_vn, cols, n, e),
                _load_tile(vb, r2, stride_vn, cols, n, e),
                _load_tile(vb, r3, stride_vn, cols, n, e),
                _load_tile(vb, r4, stride_vn, cols, n, e),
                PREC,
            )  # fmt: skip
            _store_tile(ub, r1, stride_un, cols, U1, n, e)
            _store_tile(ub, r2, stride_un, cols, U2, n, e)
            _store_tile(ub, r3, stride_un, cols, U3, n, e)
            _store_tile(ub, r4, stride_un, cols, U4, n, e)
