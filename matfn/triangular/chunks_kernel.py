r"""``tri_inv_chunks`` on CUDA float32: one Triton program per chunk, from ``K`` to ``Y_c``.

For the chunk of rows ``[cC, cC + C)`` of batch entry ``b`` the program forms

    A = tril(diag(β) (K_c K_cᵀ ⊙ D), −1),   D_ij = exp(R_i − R_j)   (D = 1 without decay),

and writes ``Y_c = (I + A)⁻¹`` at rows ``cC … cC + C − 1`` of the ``(B, n, C)`` result
(:func:`matfn.triangular.chunks.tri_inv_chunks`). ``C ∈ {16, 32, 64}``; the work is done on
``16×16`` blocks: the chunk's rows and columns split into ``NB = C/16`` blocks ``I, J``, and
only the blocks ``I ≥ J`` of ``A`` and ``Y`` are formed (zeros are stored above them).

1. **Row grids.** A first pass over the chunk's keys gives each row a power of two
   ``σ_i ≥ ‖k_i‖`` (from the exponent bits of ``‖k_i‖²``).
2. **Exact Gram blocks.** Each key splits as ``k = h + l``, ``h`` rounded to the grid
   ``2⁻¹¹σ_i`` (``(k + M) − M`` with ``M = 1.5·2¹²σ_i``, whose fp32 spacing is that grid) and
   ``l = k − h`` exact. For the blocks ``I ≥ J``, slab of ``BK`` channels by slab,

       K_I K_Jᵀ = H + X,   H = h_I h_Jᵀ,   X = l_I h_Jᵀ + k_I l_Jᵀ,

   three ``tl.dot`` with ``input_precision="ieee"`` (fp32 FMAs, no tf32). Every product
   ``h_im h_jm`` and every partial sum of ``H`` is a multiple of ``2⁻²²σ_iσ_j`` smaller than
   ``‖h_i‖‖h_j‖ < 4σ_iσ_j``, i.e. fits fp32's 24 bits: ``H`` is exact whatever the order of
   the sums. ``|X| ≤ 2⁻¹⁰√d σ_iσ_j`` (typically a thousandth of ``|A|``), so its roundings
   are small next to the one of ``A``. Then ``A_IJ = (H + X) ⊙ β_I D_IJ`` is rounded once
   (``H + X`` kept as a two-sum pair, one ``fma``): without decay, the exact ``β_i k_i·k_j``
   rounded to fp32.

   Why not the cheaper two-sum of 16-channel slab products (one dot per slab, the slab sums
   added to a double-float pair): the rounding inside each slab product remains. Relative
   Frobenius error against the float64 torch form, batch·heads 4, n = 256, d = 128, C = 64,
   unit keys, β ∈ (0, 1), three seeds: in the interpreter (numpy's dots, more accurate than a
   GPU's) plain fp32 accumulation 3.4e-8, two-sum 3.0e-8, split 2.1e-8; with the GPU's
   arithmetic emulated in float64 (each ``tl.dot`` one sequential fp32 FMA chain over ``k``, as
   Triton lowers FMA dots; reductions as binary trees) 6.6e-8, 3.5e-8 and 2.8e-8 — only the
   split meets 3e-8. It costs three dots per slab instead of one plus a two-sum, and reads
   the chunk's keys twice (the second time from L2); ``SPLIT=False`` (the launcher's
   ``exact_gram=False``) runs the two-sum instead, to weigh the two on a GPU. Float64 dots
   would be simpler but do not compile on sm90.
3. **Per-row decay** (Gated DeltaNet; ``ℓ`` one per row): ``R`` is the cumulative sum of ``ℓ``
   inside the chunk in float64 (each block's ``tl.cumsum`` plus the last entry of the block
   before), ``D_IJ = exp(fp32(R_I − R_J))`` with the exponent ``−∞`` on and above the diagonal
   (docs/math.md §5.6): no ``exp(±R)`` on its own, so no overflow however strong the decay. A
   per-channel decay (KDA) is not handled here; it runs the torch form.
4. **Diagonal blocks** ``Y_II = I + Z`` by forward substitution in registers,
   ``z_i = −A_i − Σ_{j<i} A_ij z_j`` for ``i = 2 … 15`` (rows 0 and 1 are ``−A``), the ``NB``
   blocks side by side; the row ``A_i`` is read from ``A_IIᵀ``, so it comes out along the rows
   of ``Z``.
5. **Blocks below the diagonal** by block forward substitution, block row by block row,
   ``Y_IJ = −Y_II Σ_{J≤M<I} A_IM Y_MJ`` (``input_precision="ieee"`` dots; fla-core's
   ``solve_tril`` uses the same scheme on a precomputed ``A``, docs/math.md §5.4).

Rows past ``n`` load zero keys and ``β = 0``: identity rows after the real ones, not stored.
Memory: ``K`` is read from DRAM once (``n d`` floats), ``Y`` written once (``n C``). Work: the
three Gram dots, ``3 · 16² · d`` FMAs per block pair, ``3 d (C + 16)/2`` per row; ``O(n C²)``
for the inverse. ``BK`` and ``num_warps`` come from a small autotune per
``(C, d, decay)``; the interpreter runs one plain launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from matfn.kernels.launch import INTERPRET

from .chunks import KERNEL_CHUNK_SIZES

__all__ = ["tri_inv_chunks_kernel", "tri_inv_chunks_triton"]

#: Rows (and columns) of one block; ``tl.dot`` needs every dim ≥ 16.
BLOCK = tl.constexpr(16)


@triton.jit
def _load_keys(k_ptr, row, n, d, cols):
    """``K[row : row + 16, cols]`` (zeros past ``n`` rows and ``d`` channels)."""
    rows = row + tl.arange(0, BLOCK)
    mask = (rows < n)[:, None] & (cols < d)[None, :]
    return tl.load(k_ptr + rows[:, None] * d + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _load_rows(ptr, row, n):
    """``x[row : row + 16]`` of a per-row vector (zeros past ``n``)."""
    rows = row + tl.arange(0, BLOCK)
    return tl.load(ptr + rows, mask=rows < n, other=0.0)


@triton.jit
def _grid_shift(ss):
    """``M = 1.5 · 2¹² σ`` per row, ``σ`` a power of two ``≥ ‖k‖``, from ``ss = ‖k‖²``.

    ``ss ∈ [2^e, 2^{e+1})`` with ``e`` its exponent field, so ``σ = 2^{⌈(e+1)/2⌉}`` bounds the
    norm; ``M`` is built from its bits (no ``log2``/``exp2`` approximations).
    """
    e = ((ss.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    s = (e + 2) >> 1  # ⌈(e + 1)/2⌉
    return (((127 + 12 + s) << 23) | (1 << 22)).to(tl.float32, bitcast=True)


@triton.jit
def _load_split(k_ptr, row, n, d, cols, M, SPLIT: tl.constexpr):
    """Keys ``k`` of one block and slab, and ``k = hi + lo`` (``h``, ``l`` of step 2).

    ``(k + M) − M`` rounds ``k`` to the spacing of fp32 numbers near ``M``, ``2⁻¹¹σ``
    (``|k| ≤ ‖k‖ ≲ σ`` keeps ``k + M`` in ``M``'s binade); ``lo = k − hi`` is exact. Without
    ``SPLIT``: ``hi = lo = k`` (unused).
    """
    k = _load_keys(k_ptr, row, n, d, cols)
    hi = k
    lo = k
    if SPLIT:
        hi = (k + M[:, None]) - M[:, None]
        lo = k - hi
    return k, hi, lo


@triton.jit
def _add_slab(H, X, k_i, hi_i, lo_i, hi_j, lo_j, SPLIT: tl.constexpr):
    """One slab of ``K_I K_Jᵀ``, added to the pair ``(H, X)``.

    ``SPLIT``: ``H += hi_i hi_jᵀ`` (exact) and ``X += lo_i hi_jᵀ + k_i lo_jᵀ``. Otherwise the
    slab product ``P = k_i k_jᵀ`` (``hi_j = k_j``) is added to the double-float ``(H, X)`` by an
    error-free two-sum (the cheaper scheme of step 2, rounded inside each slab).
    """
    if SPLIT:
        H_new = tl.dot(hi_i, tl.trans(hi_j), H, input_precision="ieee")
        X = tl.dot(lo_i, tl.trans(hi_j), X, input_precision="ieee")
        X = tl.dot(k_i, tl.trans(lo_j), X, input_precision="ieee")
    else:
        p = tl.dot(k_i, tl.trans(hi_j), input_precision="ieee")
        H_new = H + p
        bp = H_new - H
        X += (H - (H_new - bp)) + (p - bp)
    return H_new, X


@triton.jit
def _cumulative(l_ptr, row, n, offset):
    """``R`` of one block in float64: ``offset`` plus the block's cumulative sum of ``ℓ``.

    Returns ``R`` and its last entry (the next block's offset).
    """
    R = offset + tl.cumsum(_load_rows(l_ptr, row, n).to(tl.float64), 0)
    last = tl.sum(tl.where(tl.arange(0, BLOCK) == BLOCK - 1, R, 0.0), 0)
    return R, last


@triton.jit
def _block(H, X, beta, R_i, R_j, DECAY: tl.constexpr, DIAG: tl.constexpr):
    """``A_IJ = (H + X) ⊙ β_I D_IJ``, rounded once; strictly lower on a diagonal block."""
    r = tl.arange(0, BLOCK)
    lower = r[:, None] > r[None, :]
    f = tl.broadcast_to(beta[:, None], (BLOCK, BLOCK))
    if DECAY:
        x = (R_i[:, None] - R_j[None, :]).to(tl.float32)
        if DIAG:
            x = tl.where(lower, x, float("-inf"))
        f = f * tl.exp(x)
    G = H + X
    bp = G - H
    err = (H - (G - bp)) + (X - bp)  # two-sum: G + err = H + X exactly
    A = tl.fma(G, f, err * f)
    if DIAG:
        A = tl.where(lower, A, 0.0)
    return A


@triton.jit
def _substitute_row(Z, At, i):
    """Row ``i`` of the forward substitution: ``z_i ← z_i − Σ_{j<i} A_ij z_j``.

    ``Z`` holds the finished rows ``< i`` and ``−A`` from row ``i`` on; ``At = A_IIᵀ``, so its
    column ``i`` is the row ``A_i`` laid out along the rows of ``Z``.
    """
    r = tl.arange(0, BLOCK)
    a_i = tl.sum(tl.where(r[None, :] == i, At, 0.0), 1)
    z_i = tl.sum(a_i[:, None] * Z, 0)  # A_ij = 0 for j ≥ i: the rows not yet done add nothing
    return tl.where(r[:, None] == i, Z - z_i[None, :], Z)


@triton.jit
def _mm(a, b, acc=None):
    """``a @ b (+ acc)`` in fp32 FMAs."""
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _store(y_ptr, row, col, n, C: tl.constexpr, Y):
    """Block ``Y`` at rows ``row …`` (those ``< n``) and columns ``col …`` of the result."""
    r = tl.arange(0, BLOCK)
    rows = row + r
    cols = r + col
    tl.store(y_ptr + rows[:, None] * C + cols[None, :], Y, mask=(rows < n)[:, None])


# Slab width and warps: the twenty 16×16 Gram accumulators of C = 64 want 4 or more warps; the
# autotune compiles each config once per (C, d, decay), so the list stays short.
_CONFIGS = [triton.Config({"BK": bk}, num_warps=w, num_stages=2) for bk in (16, 32) for w in (4, 8)]


@triton.autotune(configs=_CONFIGS, key=["C", "d", "DECAY", "SPLIT"])
@triton.jit
def tri_inv_chunks_kernel(
    k_ptr,
    beta_ptr,
    l_ptr,
    y_ptr,
    n,
    d,
    C: tl.constexpr,
    BK: tl.constexpr,
    DECAY: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """Chunk ``pid mod ⌈n/C⌉`` of batch entry ``pid div ⌈n/C⌉`` (module docstring, steps 1–5).

    ``K`` ``(B, n, d)``, ``β`` and ``ℓ`` ``(B, n)`` (``ℓ`` read only with ``DECAY``), ``Y``
    ``(B, n, C)``, all contiguous float32; ``BK`` channels per slab; ``SPLIT``: the exact Gram
    of step 2 (else the two-sum of slab products). Blocks are named by (block row, block
    column).
    """
    NB: tl.constexpr = C // BLOCK
    nc = tl.cdiv(n, C)
    pid = tl.program_id(0).to(tl.int64)
    b = pid // nc
    c0 = (pid % nc) * C  # the chunk's first row
    kb = k_ptr + b * n * d

    # 1. the grid of each row: σ ≥ ‖k‖ from a first pass over the chunk's keys
    M0 = 0.0
    M1 = 0.0
    M2 = 0.0
    M3 = 0.0
    if SPLIT:
        ss0 = tl.zeros((BLOCK,), dtype=tl.float32)
        ss1 = ss0
        ss2 = ss0
        ss3 = ss0
        for k0 in range(0, d, BK):
            cols = k0 + tl.arange(0, BK)
            k_0 = _load_keys(kb, c0, n, d, cols)
            ss0 += tl.sum(k_0 * k_0, 1)
            if NB > 1:
                k_1 = _load_keys(kb, c0 + BLOCK, n, d, cols)
                ss1 += tl.sum(k_1 * k_1, 1)
            if NB > 2:
                k_2 = _load_keys(kb, c0 + 2 * BLOCK, n, d, cols)
                k_3 = _load_keys(kb, c0 + 3 * BLOCK, n, d, cols)
                ss2 += tl.sum(k_2 * k_2, 1)
                ss3 += tl.sum(k_3 * k_3, 1)
        M0 = _grid_shift(ss0)
        M1 = _grid_shift(ss1)
        M2 = _grid_shift(ss2)
        M3 = _grid_shift(ss3)

    # 2. K_I K_Jᵀ = H + X for the blocks I ≥ J, one BK-channel slab at a time
    zero = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    H00, X00 = zero, zero
    if NB > 1:
        H10, X10, H11, X11 = zero, zero, zero, zero
    if NB > 2:
        H20, X20, H21, X21, H22, X22 = zero, zero, zero, zero, zero, zero
        H30, X30, H31, X31, H32, X32, H33, X33 = zero, zero, zero, zero, zero, zero, zero, zero
    for k0 in range(0, d, BK):
        cols = k0 + tl.arange(0, BK)
        k_0, h_0, l_0 = _load_split(kb, c0, n, d, cols, M0, SPLIT)
        H00, X00 = _add_slab(H00, X00, k_0, h_0, l_0, h_0, l_0, SPLIT)
        if NB > 1:
            k_1, h_1, l_1 = _load_split(kb, c0 + BLOCK, n, d, cols, M1, SPLIT)
            H10, X10 = _add_slab(H10, X10, k_1, h_1, l_1, h_0, l_0, SPLIT)
            H11, X11 = _add_slab(H11, X11, k_1, h_1, l_1, h_1, l_1, SPLIT)
        if NB > 2:
            k_2, h_2, l_2 = _load_split(kb, c0 + 2 * BLOCK, n, d, cols, M2, SPLIT)
            k_3, h_3, l_3 = _load_split(kb, c0 + 3 * BLOCK, n, d, cols, M3, SPLIT)
            H20, X20 = _add_slab(H20, X20, k_2, h_2, l_2, h_0, l_0, SPLIT)
            H21, X21 = _add_slab(H21, X21, k_2, h_2, l_2, h_1, l_1, SPLIT)
            H22, X22 = _add_slab(H22, X22, k_2, h_2, l_2, h_2, l_2, SPLIT)
            H30, X30 = _add_slab(H30, X30, k_3, h_3, l_3, h_0, l_0, SPLIT)
            H31, X31 = _add_slab(H31, X31, k_3, h_3, l_3, h_1, l_1, SPLIT)
            H32, X32 = _add_slab(H32, X32, k_3, h_3, l_3, h_2, l_2, SPLIT)
            H33, X33 = _add_slab(H33, X33, k_3, h_3, l_3, h_3, l_3, SPLIT)

    # 3. A_IJ = (H + X) ⊙ β_I D_IJ, R in float64 (the in-chunk cumulative log-decay)
    bb = beta_ptr + b * n
    lb = l_ptr + b * n
    R0 = 0.0
    R1 = 0.0
    R2 = 0.0
    R3 = 0.0
    if DECAY:
        R0, last = _cumulative(lb, c0, n, 0.0)
        if NB > 1:
            R1, last = _cumulative(lb, c0 + BLOCK, n, last)
        if NB > 2:
            R2, last = _cumulative(lb, c0 + 2 * BLOCK, n, last)
            R3, last = _cumulative(lb, c0 + 3 * BLOCK, n, last)
    beta0 = _load_rows(bb, c0, n)
    A00 = _block(H00, X00, beta0, R0, R0, DECAY, True)
    if NB > 1:
        beta1 = _load_rows(bb, c0 + BLOCK, n)
        A10 = _block(H10, X10, beta1, R1, R0, DECAY, False)
        A11 = _block(H11, X11, beta1, R1, R1, DECAY, True)
    if NB > 2:
        beta2 = _load_rows(bb, c0 + 2 * BLOCK, n)
        beta3 = _load_rows(bb, c0 + 3 * BLOCK, n)
        A20 = _block(H20, X20, beta2, R2, R0, DECAY, False)
        A21 = _block(H21, X21, beta2, R2, R1, DECAY, False)
        A22 = _block(H22, X22, beta2, R2, R2, DECAY, True)
        A30 = _block(H30, X30, beta3, R3, R0, DECAY, False)
        A31 = _block(H31, X31, beta3, R3, R1, DECAY, False)
        A32 = _block(H32, X32, beta3, R3, R2, DECAY, False)
        A33 = _block(H33, X33, beta3, R3, R3, DECAY, True)

    # 4. diagonal blocks Y_II = I + Z by forward substitution, side by side
    Z00 = -A00
    At00 = tl.trans(A00)
    if NB > 1:
        Z11 = -A11
        At11 = tl.trans(A11)
    if NB > 2:
        Z22 = -A22
        Z33 = -A33
        At22 = tl.trans(A22)
        At33 = tl.trans(A33)
    for i in tl.static_range(2, BLOCK):  # rows 0 and 1 of Z are −A already
        Z00 = _substitute_row(Z00, At00, i)
        if NB > 1:
            Z11 = _substitute_row(Z11, At11, i)
        if NB > 2:
            Z22 = _substitute_row(Z22, At22, i)
            Z33 = _substitute_row(Z33, At33, i)
    r = tl.arange(0, BLOCK)
    eye = (r[:, None] == r[None, :]).to(tl.float32)

    # 5. below the diagonal, Y_IJ = −Y_II Σ_{J≤M<I} A_IM Y_MJ; and the stores
    yb = y_ptr + b * n * C
    Y00 = Z00 + eye
    _store(yb, c0, 0, n, C, Y00)
    if NB > 1:
        Y11 = Z11 + eye
        Y10 = -_mm(Y11, _mm(A10, Y00))
        _store(yb, c0, BLOCK, n, C, zero)
        _store(yb, c0 + BLOCK, 0, n, C, Y10)
        _store(yb, c0 + BLOCK, BLOCK, n, C, Y11)
    if NB > 2:
        Y22 = Z22 + eye
        Y33 = Z33 + eye
        Y20 = -_mm(Y22, _mm(A21, Y10, _mm(A20, Y00)))
        Y21 = -_mm(Y22, _mm(A21, Y11))
        Y30 = -_mm(Y33, _mm(A32, Y20, _mm(A31, Y10, _mm(A30, Y00))))
        Y31 = -_mm(Y33, _mm(A32, Y21, _mm(A31, Y11)))
        Y32 = -_mm(Y33, _mm(A32, Y22))
        _store(yb, c0, 2 * BLOCK, n, C, zero)
        _store(yb, c0, 3 * BLOCK, n, C, zero)
        _store(yb, c0 + BLOCK, 2 * BLOCK, n, C, zero)
        _store(yb, c0 + BLOCK, 3 * BLOCK, n, C, zero)
        _store(yb, c0 + 2 * BLOCK, 0, n, C, Y20)
        _store(yb, c0 + 2 * BLOCK, BLOCK, n, C, Y21)
        _store(yb, c0 + 2 * BLOCK, 2 * BLOCK, n, C, Y22)
        _store(yb, c0 + 2 * BLOCK, 3 * BLOCK, n, C, zero)
        _store(yb, c0 + 3 * BLOCK, 0, n, C, Y30)
        _store(yb, c0 + 3 * BLOCK, BLOCK, n, C, Y31)
        _store(yb, c0 + 3 * BLOCK, 2 * BLOCK, n, C, Y32)
        _store(yb, c0 + 3 * BLOCK, 3 * BLOCK, n, C, Y33)


def tri_inv_chunks_triton(
    K: torch.Tensor,
    beta: torch.Tensor,
    log_decay: torch.Tensor | None,
    chunk_size: int,
    *,
    out: torch.Tensor | None = None,
    slab: int | None = None,
    exact_gram: bool = True,
) -> torch.Tensor:
    """Chunk inverses ``(B, n, C)`` of float32 ``K`` ``(B, n, d)``, ``β`` ``(B, n)``, ``ℓ``.

    The layout and meaning of :func:`matfn.triangular.chunks.tri_inv_chunks_torch`.
    ``log_decay``: None or one decay per row, ``(B, n)`` or ``(B, n, 1)``; ``chunk_size`` in
    :data:`~matfn.triangular.chunks.KERNEL_CHUNK_SIZES`. ``out``: an optional contiguous
    float32 ``(B, n, C)`` result buffer (the tests poison it). ``slab``: channels per Gram slab
    (16 or 32) for one plain launch instead of the autotuned one (tests, benchmarks); the
    interpreter always runs one plain launch (16 by default), as it cannot time configs.
    ``exact_gram=False``: the two-sum Gram instead of the split (module docstring, step 2), to
    compare their cost and error on a GPU.
    """
    C = chunk_size
    if C not in KERNEL_CHUNK_SIZES:
        raise ValueError(f"chunk_size must be one of {KERNEL_CHUNK_SIZES}, got {C}")
    if log_decay is not None and log_decay.ndim == 3:
        if log_decay.shape[-1] != 1:
            raise ValueError("the kernel takes one decay per row, (B, n) or (B, n, 1)")
        log_decay = log_decay[..., 0]
    operands = [K, beta] + ([] if log_decay is None else [log_decay])
    if any(x.dtype != torch.float32 for x in operands):
        raise TypeError("the chunk kernel takes float32 K, beta and log_decay")
    B, n, d = K.shape
    if beta.shape != (B, n) or (log_decay is not None and log_decay.shape != (B, n)):
        raise ValueError(f"expected K (B, n, d) and beta, log_decay (B, n), got {K.shape}")
    if out is None:
        out = torch.empty(B, n, C, dtype=torch.float32, device=K.device)
    elif out.shape != (B, n, C) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"`out` must be a contiguous float32 tensor of shape {(B, n, C)}")
    if B == 0 or n == 0:
        return out
    decay = log_decay is not None
    K, beta = K.contiguous(), beta.contiguous()
    L = log_decay.contiguous() if decay else beta  # not read without decay
    grid = (B * triton.cdiv(n, C),)
    if INTERPRET or slab is not None:
        tri_inv_chunks_kernel.fn[grid](
            K, beta, L, out, n, d, C=C, BK=slab or 16, DECAY=decay, SPLIT=exact_gram, num_warps=4
        )
    else:
        tri_inv_chunks_kernel[grid](K, beta, L, out, n, d, C=C, DECAY=decay, SPLIT=exact_gram)
    return out
