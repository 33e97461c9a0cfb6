r"""``tri_inv_chunks`` on CUDA float32: one Triton program per 64-row chunk, from ``K`` to ``Y_c``.

For the chunk of rows ``[cC, cC + C)``, ``C = 64``, of batch entry ``b`` the program forms

    A = tril(diag(β) (K_c K_cᵀ ⊙ D), −1),   D_ij = exp(R_i − R_j)   (D = 1 without decay),

and writes ``Y_c = (I + A)⁻¹`` at rows ``cC … cC + C − 1`` of the ``(B, n, C)`` result
(:func:`matfn.triangular.chunks.tri_inv_chunks`).

1. **Row grids.** A first pass over the chunk's keys gives each row a power of two
   ``σ_i ≥ ‖k_i‖`` (from the exponent bits of ``‖k_i‖²``).
2. **Exact Gram on tensor cores.** Each key splits into three parts that TF32 holds exactly,
   ``k = h + l₁ + l₂``: ``h`` is ``k`` rounded to the grid ``2⁻¹⁰σ_i``, ``l₁`` the rest rounded
   to ``2⁻²¹σ_i``, ``l₂`` what remains (``|l₂| ≤ 2⁻²²σ_i``, exact in fp32; TF32 keeps its top
   11 bits). Each rounding is ``(x + M) − M`` with ``M = 1.5·2^{23}`` times the grid, whose
   fp32 spacing is that grid. ``|h| ≤ σ_i`` on a ``2⁻¹⁰σ_i`` grid and ``|l₁| ≤ 2⁻¹¹σ_i`` on a
   ``2⁻²¹σ_i`` grid have at most 11 significant bits: TF32 operands without rounding. Then,
   one ``BK``-channel slab at a time, with TF32 products (``tl.dot``, ``input_precision=
   "tf32"``) of the whole ``C×C`` chunk,

       H = h hᵀ,   X = l₁hᵀ + h l₁ᵀ + l₂hᵀ + h l₂ᵀ + l₁l₁ᵀ + l₁l₂ᵀ + l₂l₁ᵀ.

   Every product ``h_im h_jm`` and every partial sum of ``H`` is a multiple of
   ``2⁻²⁰σ_iσ_j`` below ``‖h_i‖‖h_j‖ < 4σ_iσ_j``, i.e. fits fp32's 24 bits: ``H`` is exact in
   any order of summation (checked on an H100: its tensor cores keep every bit of ``H``).
   ``|X| ≲ 2⁻¹⁰σ_iσ_j``, and the dropped ``l₂l₂ᵀ`` is ``≤ 2⁻⁴⁴d σ_iσ_j``; the terms ``l₁l₂ᵀ``
   are kept (about ``2⁻²⁹σ_iσ_j`` at ``d = 128``, a rounding of a typical entry
   ``k_i·k_j ≈ d^{-1/2}``). Rounded to nearest, ``X``'s errors would be below
   ``2⁻³⁰σ_iσ_j``; the H100's tensor cores truncate as they accumulate, and reach about
   ``2⁻²⁷σ_iσ_j``, so ``A`` is within about one rounding of the exact one rather than exactly
   rounded. The result's error is nonetheless that of fla-core's ``solve_tril`` from an
   exactly rounded ``A`` (2.8e-8 against 2.7e-8 relative in the DeltaNet case,
   docs/benchmarks.md). Then
   ``A = (H + X) ⊙ β_i D`` is rounded once (``H + X`` kept as a two-sum pair, one ``fma``):
   without decay, ``β_i k_i·k_j`` to about one rounding. Why not plain fp32 (or 3×TF32)
   accumulation of ``K Kᵀ``: over ``d = 128`` channels its roundings about double the error
   of ``Y`` (5e-8 instead of 3e-8 relative in the DeltaNet case), whatever the order.
3. **Per-row decay** (Gated DeltaNet; one ``ℓ`` per row): ``R`` is the cumulative sum of ``ℓ``
   inside the chunk in float64 (one ``tl.cumsum``), ``D_ij = exp(fp32(R_i − R_j))`` with the
   exponent ``−∞`` on and above the diagonal (docs/math.md §5.6): no ``exp(±R)`` on its own,
   so no overflow however strong the decay. A per-channel decay (KDA) runs the torch form.
4. **Inverse by 16×16 blocks** (the scheme of fla-core's ``solve_tril``, docs/math.md §5.4).
   ``A`` is stored to the chunk's rows of the result (L1/L2-resident scratch) and its ten
   lower ``16×16`` blocks are loaded back. The four diagonal blocks are inverted by forward
   substitution, ``z_i = −a_i − Σ_{j<i} a_ij z_j`` for rows ``i = 2 … 15``, the four chains
   interleaved in one loop; the blocks below the diagonal follow from
   ``Y_IJ = −Y_II Σ_{J≤M<I} A_IM Y_MJ`` by fp32 products (``input_precision="ieee"``), and
   the ten blocks overwrite ``A``'s (the zeros above the diagonal are ``A``'s too).

Rows past ``n`` load zero keys and ``β = 0`` and are neither stored nor read back.
Memory: ``K`` is read twice (the second pass from L2), ``C²`` floats per chunk are written
twice (``A``, then ``Y``). Work: eight ``C×C×d`` TF32 products per chunk (``8 C d`` per row),
``O(n C²)`` fp32 for the inverse. ``BK`` and the warps come from a small autotune per
``(d, decay)``; the interpreter runs one plain launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from matfn.kernels.launch import INTERPRET

from .chunks import KERNEL_CHUNK

__all__ = ["tri_inv_chunks_kernel", "tri_inv_chunks_triton"]

#: Rows of a chunk (the row stride of the result), as the kernels see it.
C = tl.constexpr(KERNEL_CHUNK)


@triton.jit
def _load_keys(k_ptr, row, n, d, cols, ROWS: tl.constexpr):
    """``K[row : row + ROWS, cols]`` (zeros past ``n`` rows and ``d`` channels)."""
    rows = row + tl.arange(0, ROWS)
    mask = (rows < n)[:, None] & (cols < d)[None, :]
    return tl.load(k_ptr + rows[:, None] * d + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _grid_shifts(ss):
    """``(M_h, M_l) = 1.5·2²³ · (2⁻¹⁰σ, 2⁻²¹σ)`` per row, ``σ`` a power of two ``≥ ‖k‖``.

    ``ss = ‖k‖² ∈ [2^e, 2^{e+1})`` with ``e`` its exponent field, so ``σ = 2^{⌈(e+1)/2⌉}``
    bounds the norm; both shifts are built from their bits (no ``log2``/``exp2``
    approximations).
    """
    e = ((ss.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    s = (e + 2) >> 1  # ⌈(e + 1)/2⌉
    M_h = (((127 + 13 + s) << 23) | (1 << 22)).to(tl.float32, bitcast=True)
    M_l = (((127 + 2 + s) << 23) | (1 << 22)).to(tl.float32, bitcast=True)
    return M_h, M_l


@triton.jit
def _split(k, M_h, M_l):
    """``k = h + l₁ + l₂`` (step 2): ``h``, ``l₁`` exact TF32 operands, ``l₂`` the small rest."""
    h = (k + M_h[:, None]) - M_h[:, None]
    lo = k - h
    l1 = (lo + M_l[:, None]) - M_l[:, None]
    return h, l1, lo - l1


@triton.jit
def _gram_slab(H, X, h, l1, l2):
    """One slab of ``K Kᵀ``: ``H += h hᵀ`` (exact), ``X +=`` the rest but ``l₂l₂ᵀ`` (step 2)."""
    hT = tl.trans(h)
    l1T = tl.trans(l1)
    l2T = tl.trans(l2)
    H = tl.dot(h, hT, H, input_precision="tf32")
    X = tl.dot(l1, hT, X, input_precision="tf32")
    X = tl.dot(h, l1T, X, input_precision="tf32")
    X = tl.dot(l2, hT, X, input_precision="tf32")
    X = tl.dot(h, l2T, X, input_precision="tf32")
    X = tl.dot(l1, l1T, X, input_precision="tf32")
    X = tl.dot(l1, l2T, X, input_precision="tf32")
    X = tl.dot(l2, l1T, X, input_precision="tf32")
    return H, X


@triton.jit
def _round_a(H, X, beta, R, rows, DECAY: tl.constexpr):
    """``A_ij = (H + X)_ij β_i D_ij``, zero for ``j ≥ i``; each entry rounded once."""
    lower = rows[:, None] > rows[None, :]
    f = tl.broadcast_to(beta[:, None], H.shape)
    if DECAY:
        x = tl.where(lower, (R[:, None] - R[None, :]).to(tl.float32), float("-inf"))
        f = f * tl.exp(x)
    G = H + X
    bp = G - H
    err = (H - (G - bp)) + (X - bp)  # two-sum: G + err = H + X exactly
    return tl.where(lower, tl.fma(G, f, err * f), 0.0)


@triton.jit
def _block_ptrs(y_ptr, c0, n, I: tl.constexpr, J: tl.constexpr):
    """Pointers and row mask of block ``(I, J)`` of the chunk starting at row ``c0``."""
    r = tl.arange(0, 16)
    rows = c0 + I * 16 + r
    return y_ptr + rows[:, None] * C + (J * 16 + r)[None, :], (rows < n)[:, None]


@triton.jit
def _load_block(y_ptr, c0, n, I: tl.constexpr, J: tl.constexpr):
    ptrs, mask = _block_ptrs(y_ptr, c0, n, I, J)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _store_block(y_ptr, c0, n, I: tl.constexpr, J: tl.constexpr, Y):
    ptrs, mask = _block_ptrs(y_ptr, c0, n, I, J)
    tl.store(ptrs, Y, mask=mask)


@triton.jit
def _substitute_row(y_ptr, c0, n, i, I: tl.constexpr, Z):
    """Row ``i`` of ``(I + A_II)⁻¹ − I`` into ``Z``: ``z_i = −a_i − Σ_{j<i} a_ij z_j``.

    ``Z`` holds ``−A_II`` in rows ``≥ i`` and the finished rows above (``a_ij = 0`` for
    ``j ≥ i``, so the sum over all 16 rows of ``Z`` is the sum over ``j < i``).
    """
    r = tl.arange(0, 16)
    row = c0 + I * 16 + i
    a = -tl.load(y_ptr + row * C + I * 16 + r, mask=row + 0 * r < n, other=0.0)
    z = a + tl.sum(a[:, None] * Z, 0)
    return tl.where((r == i)[:, None], z[None, :], Z)


@triton.jit
def _mm(a, b):
    """``a @ b`` in fp32 FMAs."""
    return tl.dot(a, b, input_precision="ieee")


_CONFIGS = [
    triton.Config({"BK": bk}, num_warps=w, num_stages=s)
    for bk in (32, 64)
    for w in (4, 8)
    for s in (1, 2)
]


@triton.autotune(configs=_CONFIGS, key=["d", "DECAY"])
@triton.jit
def tri_inv_chunks_kernel(
    k_ptr, beta_ptr, l_ptr, y_ptr, n, d, BK: tl.constexpr, DECAY: tl.constexpr
):
    """Chunk ``pid mod ⌈n/64⌉`` of batch entry ``pid div ⌈n/64⌉`` (module docstring, steps 1–4).

    ``K`` ``(B, n, d)``, ``β`` and ``ℓ`` ``(B, n)`` (``ℓ`` read only with ``DECAY``), ``Y``
    ``(B, n, 64)``, all contiguous float32; ``BK`` channels per slab.
    """
    nc = tl.cdiv(n, C)
    pid = tl.program_id(0).to(tl.int64)
    b = pid // nc
    c0 = (pid % nc) * C  # the chunk's first row
    kb = k_ptr + b * n * d
    yb = y_ptr + b * n * C
    rows = c0 + tl.arange(0, C)
    in_n = rows < n

    # 1. row grids; R in float64 (the in-chunk cumulative log-decay)
    ss = tl.zeros((C,), dtype=tl.float32)
    for k0 in tl.range(0, d, BK):
        k = _load_keys(kb, c0, n, d, k0 + tl.arange(0, BK), C)
        ss += tl.sum(k * k, 1)
    M_h, M_l = _grid_shifts(ss)
    R = tl.zeros((C,), dtype=tl.float64)
    if DECAY:
        R = tl.cumsum(tl.load(l_ptr + b * n + rows, mask=in_n, other=0.0).to(tl.float64), 0)

    # 2.–3. A = tril((H + X) ⊙ β D, −1), stored to the chunk's rows of Y (zeros above the diagonal)
    H = tl.zeros((C, C), dtype=tl.float32)
    X = tl.zeros((C, C), dtype=tl.float32)
    for k0 in tl.range(0, d, BK):
        h, l1, l2 = _split(_load_keys(kb, c0, n, d, k0 + tl.arange(0, BK), C), M_h, M_l)
        H, X = _gram_slab(H, X, h, l1, l2)
    beta = tl.load(beta_ptr + b * n + rows, mask=in_n, other=0.0)
    A = _round_a(H, X, beta, R, tl.arange(0, C), DECAY)
    tl.store(yb + rows[:, None] * C + tl.arange(0, C)[None, :], A, mask=in_n[:, None])
    tl.debug_barrier()

    # 4. the inverse by 16×16 blocks: diagonal blocks by forward substitution (rows 0 and 1 of
    # Z = −A_II are final), the four chains interleaved
    Z0 = -_load_block(yb, c0, n, 0, 0)
    Z1 = -_load_block(yb, c0, n, 1, 1)
    Z2 = -_load_block(yb, c0, n, 2, 2)
    Z3 = -_load_block(yb, c0, n, 3, 3)
    for i in range(2, 16):
        Z0 = _substitute_row(yb, c0, n, i, 0, Z0)
        Z1 = _substitute_row(yb, c0, n, i, 1, Z1)
        Z2 = _substitute_row(yb, c0, n, i, 2, Z2)
        Z3 = _substitute_row(yb, c0, n, i, 3, Z3)
    r = tl.arange(0, 16)
    eye = (r[:, None] == r[None, :]).to(tl.float32)
    Y00 = Z0 + eye
    Y11 = Z1 + eye
    Y22 = Z2 + eye
    Y33 = Z3 + eye
    A10 = _load_block(yb, c0, n, 1, 0)
    A20 = _load_block(yb, c0, n, 2, 0)
    A21 = _load_block(yb, c0, n, 2, 1)
    A30 = _load_block(yb, c0, n, 3, 0)
    A31 = _load_block(yb, c0, n, 3, 1)
    A32 = _load_block(yb, c0, n, 3, 2)
    # below the diagonal: Y_IJ = −Y_II Σ_{J≤M<I} A_IM Y_MJ
    Y10 = -_mm(Y11, _mm(A10, Y00))
    Y21 = -_mm(Y22, _mm(A21, Y11))
    Y32 = -_mm(Y33, _mm(A32, Y22))
    Y20 = -_mm(Y22, _mm(A20, Y00) + _mm(A21, Y10))
    Y31 = -_mm(Y33, _mm(A31, Y11) + _mm(A32, Y21))
    Y30 = -_mm(Y33, _mm(A30, Y00) + _mm(A31, Y10) + _mm(A32, Y20))
    tl.debug_barrier()  # every warp has read A
    _store_block(yb, c0, n, 0, 0, Y00)
    _store_block(yb, c0, n, 1, 1, Y11)
    _store_block(yb, c0, n, 2, 2, Y22)
    _store_block(yb, c0, n, 3, 3, Y33)
    _store_block(yb, c0, n, 1, 0, Y10)
    _store_block(yb, c0, n, 2, 1, Y21)
    _store_block(yb, c0, n, 3, 2, Y32)
    _store_block(yb, c0, n, 2, 0, Y20)
    _store_block(yb, c0, n, 3, 1, Y31)
    _store_block(yb, c0, n, 3, 0, Y30)


def tri_inv_chunks_triton(
    K: torch.Tensor,
    beta: torch.Tensor,
    log_decay: torch.Tensor | None,
    *,
    out: torch.Tensor | None = None,
    slab: int | None = None,
) -> torch.Tensor:
    """Chunk inverses ``(B, n, 64)`` of float32 ``K`` ``(B, n, d)``, ``β`` ``(B, n)``, ``ℓ``.

    The layout and meaning of :func:`matfn.triangular.chunks.tri_inv_chunks_torch` with
    ``C = 64``. ``log_decay``: None or one decay per row, ``(B, n)`` or ``(B, n, 1)``.
    ``out``: an optional contiguous float32 ``(B, n, 64)`` result buffer (the tests poison
    it). ``slab``: channels per Gram slab (32 or 64) for one plain launch instead of the
    autotuned one (tests); the interpreter always runs one plain launch (32 by default), as it
    cannot time configs.
    """
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
    shape = (B, n, KERNEL_CHUNK)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=K.device)
    elif out.shape != shape or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"`out` must be a contiguous float32 tensor of shape {shape}")
    if B == 0 or n == 0:
        return out
    decay = log_decay is not None
    K, beta = K.contiguous(), beta.contiguous()
    L = log_decay.contiguous() if decay else beta  # not read without decay
    grid = (B * triton.cdiv(n, KERNEL_CHUNK),)
    if INTERPRET or slab is not None:
        tri_inv_chunks_kernel.fn[grid](
            K, beta, L, out, n, d, BK=slab or 32, DECAY=decay, num_warps=4
        )
    else:
        tri_inv_chunks_kernel[grid](K, beta, L, out, n, d, DECAY=decay)
    return out
