r"""Triton kernels for ``tri_inv`` / ``tri_solve`` on ``T = Λ + tril(Q Kᵀ, −1)`` (math spec §5).

Torch twins: :mod:`matfn.triangular` (``_tri_inv_torch`` and the chunked forms). Everything runs in
float32; ``precision`` picks the ``tl.dot`` mode of the chunk and inverse kernels (``"tf32x3"``,
the default: three tf32 tensor-core products, about fp32 accuracy, measured 3× faster than
``"ieee"`` on the H100 at n = 4096 with 3.6e-7 relative error against float64; ``"ieee"``: fp32
FMA). The solve's scan kernels always use ``"ieee"``: with tf32x3 there (dots contracting over
``d`` = 100 or 128 in one ``tl.dot``) the H100 run with Triton 3.6 returned wrong solves (0.3–1.1
relative error) while the same launch with ``"ieee"`` was exact to 3e-7; they do ``O(n d e)``
work, so the cost is small.

**Chunk kernel** (one program per ``C``-row chunk): ``A = tril(Q_c K_cᵀ, −1)``,
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

**Inverse** (divide and conquer). With ``P^{(s)} = blkdiag_s(T)⁻¹ Q`` and
``R^{(s)} = blkdiag_s(T)⁻ᵀ K`` (blocks of ``s`` rows), the off-diagonal block of a ``2s``-block
``[[A,0],[C,B]]`` (``C = Q₂K₁ᵀ`` is rank ``d``) is ``−B⁻¹Q₂K₁ᵀA⁻¹ = −P₂^{(s)} R₁^{(s)ᵀ}``.
Levels are built bottom-up, each fully parallel: ``G_b = K_bᵀ P_b^{(s)}`` (``d×d`` per block),
then ``P₂^{(2s)} = P₂^{(s)} (I − G₁)`` and ``R₁^{(2s)} = R₁^{(s)} (I − G₂)ᵀ``. One last launch
writes every ``C×C`` tile ``(I, J)``, ``I > J``, as ``−P_I^{(s)} R_J^{(s)ᵀ}`` at the level
``s = C·2^{⌊log₂(I xor J)⌋}`` where the two chunks first share a block. Launches:
``2 + 2(L − 1)`` with ``L = ⌈log₂(n/C)⌉``; FLOPs ``d n² + 4 n d² L`` plus the chunk inverses.

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

__all__ = ["tri_inv_triton", "tri_solve_triton", "PRECISIONS", "CHUNK_IMPLS"]

PRECISIONS = ("ieee", "tf32x3")
CHUNK_IMPLS = ("dense", "blocked")


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
        NY = tl.dot(tl.where(off, N, 0.0), Y, input_precision=PREC)
        Y = Y - tl.dot(Y, NY, input_precision=PREC)
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
):
    c = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    ar = tl.arange(0, BC)
    rows = c * BC + ar
    rm = rows < n
    qb = q_ptr + b * stride_qb
    kb = k_ptr + b * stride_qb
    A = tl.zeros((BC, BC), dtype=tl.float32)
    for d0 in range(0, d, BD):
        cols = d0 + tl.arange(0, BD)
        m = rm[:, None] & (cols < d)[None, :]
        qt = tl.load(qb + rows[:, None] * stride_qn + cols[None, :], mask=m, other=0.0)
        kt = tl.load(kb + rows[:, None] * stride_qn + cols[None, :], mask=m, other=0.0)
        A += tl.dot(qt, tl.trans(kt), input_precision=PREC)
    A = tl.where(ar[:, None] > ar[None, :], A, 0.0)
    lam = tl.load(lam_ptr + b * stride_lb + rows, mask=rm, other=1.0)
    Y = _chunk_inverse(A, lam, BC, BS, LOG_M, PREC)
    if STORE_Y:
        yp = y_ptr + b * stride_yb + rows[:, None] * stride_yn + rows[None, :]
        tl.store(yp, Y, mask=rm[:, None] & rm[None, :])
    if STORE_P or STORE_R:
        for d0 in range(0, d, BD):
            cols = d0 + tl.arange(0, BD)
            m = rm[:, None] & (cols < d)[None, :]
            off = b * stride_pb + rows[:, None] * stride_pn + cols[None, :]
            if STORE_P:
                qt = tl.load(qb + rows[:, None] * stride_qn + cols[None, :], mask=m, other=0.0)
                tl.store(p_ptr + off, tl.dot(Y, qt, input_precision=PREC), mask=m)
            if STORE_R:
                kt = tl.load(kb + rows[:, None] * stride_qn + cols[None, :], mask=m, other=0.0)
                tl.store(r_ptr + off, tl.dot(tl.trans(Y), kt, input_precision=PREC), mask=m)
    if HAS_V:
        for e0 in range(0, e, BE):
            cols = e0 + tl.arange(0, BE)
            m = rm[:, None] & (cols < e)[None, :]
            vt = tl.load(
                v_ptr + b * stride_vb + rows[:, None] * stride_vn + cols[None, :], mask=m, other=0.0
            )
            up = u_ptr + b * stride_ub + rows[:, None] * stride_un + cols[None, :]
            tl.store(up, tl.dot(Y, vt, input_precision=PREC), mask=m)


# ---------------------------------------------------------------------------------------------
# Blocked chunk kernel (C = 64 as explicit 16×16 blocks)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _mm(a, b, PREC: tl.constexpr):
    return tl.dot(a, b, input_precision=PREC)


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


@triton.jit
def _tri_gram_kernel(
    k_ptr,
    p_ptr,
    g_ptr,
    n,
    d,
    s,
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
    """``G_blk = K_blkᵀ P_blk`` over the ``s`` rows of block ``blk`` (one ``BG×BG`` tile)."""
    blk = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    ng = tl.cdiv(d, BG)
    ci = (t // ng) * BG + tl.arange(0, BG)
    cj = (t % ng) * BG + tl.arange(0, BG)
    start = blk * s
    end = tl.minimum(start + s, n)
    acc = tl.zeros((BG, BG), dtype=tl.float32)
    for it in range(0, tl.cdiv(end - start, BT)):
        rows = start + it * BT + tl.arange(0, BT)
        rm = rows < end
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
        acc += tl.dot(tl.trans(kt), pt, input_precision=PREC)
    gp = g_ptr + b * stride_gb + blk * stride_gk + ci[:, None] * d + cj[None, :]
    tl.store(gp, acc, mask=(ci < d)[:, None] & (cj < d)[None, :])


@triton.jit
def _tri_update_kernel(
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
    """Level ``s → 2s``: ``P₂ ← P₂ (I − G₁)`` on second halves, ``R₁ ← R₁ (I − G₂)ᵀ`` on first.

    One ``BT×BD`` output tile per program; ``BT`` divides ``s``, so a tile lies in one block.
    """
    t = tl.program_id(0).to(tl.int64)
    jt = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
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
            accP -= tl.dot(xk, gt, input_precision=PREC)
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
            accR -= tl.dot(xk, gt, input_precision=PREC)
    tl.store(pout_ptr + base + cj[None, :], accP, mask=mj)
    tl.store(rout_ptr + base + cj[None, :], accR, mask=mj)


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
            acc -= tl.dot(pt, tl.trans(rt), input_precision=PREC)
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
        Xc = Wc - tl.dot(Pc, S, input_precision=PREC)
        tl.store(wg_ptr + b * stride_wb + rows[:, None] * stride_wn + cf[None, :], Xc, mask=rm & mf)
        S += tl.dot(tl.trans(Kc), Xc, input_precision=PREC)
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
        Z = Z - tl.dot(G, Z, input_precision=PREC) + Bg


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
    X = Xg - tl.dot(Pg, Zg, input_precision=PREC)
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
    precision: str = "tf32x3",
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
    BG = min(32, _pow2(d))
    ngt = triton.cdiv(d, BG) ** 2
    G = torch.empty(B, triton.cdiv(n, C), d, d, dtype=torch.float32, device=Q.device)
    for lv in range(L - 1):
        s = C << lv
        nblk = triton.cdiv(n, s)
        _tri_gram_kernel[(nblk, ngt, B)](
            K,
            P_all[lv],
            G,
            n,
            d,
            s,
            K.stride(0),
            K.stride(1),
            n * d,
            d,
            G.stride(0),
            G.stride(1),
            BT=C,
            BG=BG,
            PREC=precision,
            num_warps=4,
        )
        BTu = min(32, C)  # more programs: at B = 1 a level is only n/BTu × d/BD tiles
        _tri_update_kernel[(triton.cdiv(n, BTu), triton.cdiv(d, BD), B)](
            P_all[lv],
            R_all[lv],
            G,
            P_all[lv + 1],
            R_all[lv + 1],
            n,
            d,
            s,
            n * d,
            d,
            G.stride(0),
            G.stride(1),
            BT=BTu,
            BD=BD,
            PREC=precision,
            num_warps=4,
        )
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
    chunk_size: int = 64,
    block_s: int = 16,
    group_size: int | None = None,
    precision: str = "tf32x3",
    chunk_impl: str = "dense",
    chunk_warps: int = 4,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``T⁻¹ V`` for float32 ``Q, K`` ``(B, n, d)``, ``V`` ``(B, n, e)``, ``λ`` ``(B, n)``.

    ``group_size``: chunks per group of the two-level scan (default ``≈ √(n/C)``); ``out``: an
    optional contiguous float32 ``(B, n, e)`` result buffer; ``chunk_impl``: as in
    :func:`tri_inv_triton`.
    """
    _check(Q, K, lam, chunk_size, block_s, precision)
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
    W = torch.empty(B, n, F, dtype=torch.float32, device=Q.device)
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
    Wg = torch.empty_like(W)
    Sg = torch.empty(B, NG, d, F, dtype=torch.float32, device=Q.device)
    BF = 16
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
        PREC="ieee",
        num_warps=4 if DP <= 64 else 8,
    )
    if NG == 1:
        X.copy_(Wg[..., :e])
        return X
    Z = torch.empty(B, NG, d, e, dtype=torch.float32, device=Q.device)
    BE = 16
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
        PREC="ieee",
        num_warps=4 if DP <= 64 else 8,
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
        PREC="ieee",
        num_warps=4,
    )
    return X
