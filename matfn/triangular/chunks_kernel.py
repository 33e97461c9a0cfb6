r"""``tri_inv_chunks`` on CUDA float32: one Triton program per 64-row chunk, from ``K`` to ``Y_c``.

For the chunk of rows ``[cC, cC + C)``, ``C = 64``, of batch entry ``b`` the program forms

    A = tril(diag(β) (K_c K_cᵀ ⊙ D), −1),   D_ij = exp(R_i − R_j)   (D = 1 without decay),

and writes ``Y_c = (I + A)⁻¹`` at rows ``cC … cC + C − 1`` of the ``(B, n, C)`` result
(:func:`matfn.triangular.chunks.tri_inv_chunks`).

1. **Row scales.** A first pass over the chunk's keys gives each row a power of two
   ``σ_i ≥ ‖k_i‖`` (from the exponent bits of ``‖k_i‖²``); ``k̃ = k/σ_i`` is exact and
   ``‖k̃‖ ≤ 1``.
2. **Exact Gram on fp16 tensor cores.** Each scaled key splits as ``k̃ = h + l₁ + l₂``: ``h`` is
   ``k̃`` rounded to the grid ``2⁻¹⁰``, ``l₁`` the rest rounded to ``2⁻²¹``, ``l₂`` what
   remains (``|l₂| ≤ 2⁻²²``). Each rounding is ``(x + M) − M`` with ``M = 1.5·2^{23}`` times
   the grid, whose fp32 spacing is that grid. The fp16 operands of the products are

       h,   2¹¹l₁,   2¹¹l₂,   m = ½l₁ + l₂.

   ``h`` (``|h| ≤ 1`` on ``2⁻¹⁰``) and ``2¹¹l₁`` (``≤ 1`` on ``2⁻¹⁰``) are multiples of
   ``2⁻¹⁰`` up to ``2¹⁰`` of them: 11 significant bits, so fp16 holds them exactly; rounding
   ``2¹¹l₂`` and ``m`` to fp16 costs at most ``2⁻³⁴`` and ``2⁻²³`` in ``l₂`` and ``m``. One
   ``BK``-channel slab at a time, with fp16 products accumulated in fp32 (``tl.dot``),

       H = h hᵀ,   S = (2¹¹l₁) hᵀ + (2¹¹l₂) hᵀ + (2¹¹l₁) mᵀ,

   and ``X = 2⁻¹¹(S + Sᵀ) = l₁hᵀ + h l₁ᵀ + l₂hᵀ + h l₂ᵀ + l₁l₁ᵀ + l₁l₂ᵀ + l₂l₁ᵀ``: every
   term of ``k̃_i·k̃_j`` but ``l₂l₂ᵀ ≤ 2⁻⁴⁴d``, from three products a slab besides ``H``. Every
   product ``h_im h_jm`` and every partial sum of ``H`` is a multiple of ``2⁻²⁰`` below
   ``‖h_i‖‖h_j‖ < 4``, i.e. fits fp32's 24 bits: ``H`` is exact in any order of summation
   (checked on an H100, whose tensor cores keep every bit of it). ``|X| ≲ 2⁻¹⁰``; rounded to
   nearest its accumulation errs by below ``2⁻³⁰``, and the H100's tensor cores, which truncate
   as they accumulate, reach about ``2⁻²⁷``: ``A`` is within about one rounding of the exact
   one. The result's error is that of fla-core's ``solve_tril`` from an exactly rounded ``A``
   (2.75e-8 against 2.74e-8 relative in the DeltaNet case, docs/benchmarks.md). Then
   ``A = (H + X) ⊙ β_i σ_iσ_j D`` is rounded once (``H + X`` kept as a two-sum pair, one
   ``fma``; ``σ_iσ_j`` is a power of two): without decay, ``β_i k_i·k_j`` to about one
   rounding. Why not plain fp32 (or 3×TF32) accumulation of ``K Kᵀ``: over ``d = 128``
   channels its roundings about double the error of ``Y`` (5e-8 instead of 3e-8 relative in
   the DeltaNet case), whatever the order. Why fp16 rather than TF32 operands of the same 11
   bits: twice the tensor-core rate and half the operand traffic (the ``σ`` scaling keeps
   them in fp16's range).
3. **Per-row decay** (Gated DeltaNet; one ``ℓ`` per row): ``R`` is the cumulative sum of ``ℓ``
   inside the chunk in float64 (one ``tl.cumsum``), ``D_ij = exp(fp32(R_i − R_j))`` with the
   exponent ``−∞`` on and above the diagonal (docs/math.md §5.6): no ``exp(±R)`` on its own,
   so no overflow however strong the decay. A per-channel decay (KDA) runs the torch form.
4. **Inverse by 16×16 blocks** (the scheme of fla-core's ``solve_tril``, docs/math.md §5.4).
   ``A`` is stored to the chunk's rows of the result (L1/L2-resident scratch). The four
   diagonal blocks, one ``(4, 16, 16)`` tile, are inverted together by forward substitution,
   ``z_i = −a_i − Σ_{j<i} a_ij z_j`` for rows ``i = 2 … 15`` (the sums run inside a block, so
   they stay within a warp), and stored; the blocks below the diagonal follow from
   ``Y_IJ = −Y_II Σ_{J≤M<I} A_IM Y_MJ`` by fp32 products (``input_precision="ieee"``) and
   overwrite ``A``'s (the zeros above the diagonal are ``A``'s too).

Rows past ``n`` load zero keys and ``β = 0`` and are neither stored nor read back.
Memory: ``K`` is read twice (the second pass from L2), ``C²`` floats per chunk are written
twice (``A``, then ``Y``). Work: four ``C×C×d`` fp16 products per chunk (``4 C d`` per row),
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
#: Diagonal 16×16 blocks of a chunk.
NB = tl.constexpr(KERNEL_CHUNK // 16)


@triton.jit
def _load_keys(k_ptr, row, n, d, cols, ROWS: tl.constexpr):
    """``K[row : row + ROWS, cols]`` (zeros past ``n`` rows and ``d`` channels)."""
    rows = row + tl.arange(0, ROWS)
    mask = (rows < n)[:, None] & (cols < d)[None, :]
    return tl.load(k_ptr + rows[:, None] * d + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _row_scales(ss):
    """``(σ, 1/σ)`` per row: ``σ`` a power of two ``≥ ‖k‖`` from ``ss = ‖k‖²`` (step 1).

    ``ss ∈ [2^e, 2^{e+1})`` with ``e`` its exponent field, so ``σ = 2^{⌈(e+1)/2⌉}`` bounds the
    norm; both are built from their bits (no ``log2``/``exp2`` approximations).
    """
    e = ((ss.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    s = (e + 2) >> 1  # ⌈(e + 1)/2⌉
    sigma = ((127 + s) << 23).to(tl.float32, bitcast=True)
    inv_sigma = ((127 - s) << 23).to(tl.float32, bitcast=True)
    return sigma, inv_sigma


@triton.jit
def _split(k, inv_sigma):
    """The fp16 operands ``h, 2¹¹l₁, 2¹¹l₂, ½l₁ + l₂`` of ``k/σ = h + l₁ + l₂`` (step 2)."""
    k = k * inv_sigma[:, None]
    h = (k + 12288.0) - 12288.0  # 1.5·2²³ · 2⁻¹⁰
    lo = k - h
    l1 = (lo + 6.0) - 6.0  # 1.5·2²³ · 2⁻²¹
    l2 = lo - l1
    return (
        h.to(tl.float16),
        (l1 * 2048.0).to(tl.float16),
        (l2 * 2048.0).to(tl.float16),
        (l1 * 0.5 + l2).to(tl.float16),
    )


@triton.jit
def _gram_slab(H, S, h, l1, l2, m):
    """One slab: ``H += h hᵀ`` (exact), ``S += (2¹¹l₁) hᵀ + (2¹¹l₂) hᵀ + (2¹¹l₁) mᵀ`` (step 2)."""
    hT = tl.trans(h)
    H = tl.dot(h, hT, H)
    S = tl.dot(l1, hT, S)
    S = tl.dot(l2, hT, S)
    return H, tl.dot(l1, tl.trans(m), S)


@triton.jit
def _round_a(H, S, beta, sigma, R, rows, DECAY: tl.constexpr):
    """``A_ij = (H + 2⁻¹¹(S + Sᵀ))_ij σ_j · β_i σ_i D_ij``, zero for ``j ≥ i``; rounded once.

    The powers of two ``σ_j`` and ``σ_i`` scale exactly, one per side, so ``σ_iσ_j`` cannot
    overflow or underflow where ``A_ij`` does not.
    """
    lower = rows[:, None] > rows[None, :]
    f = tl.broadcast_to((beta * sigma)[:, None], H.shape)
    if DECAY:
        x = tl.where(lower, (R[:, None] - R[None, :]).to(tl.float32), float("-inf"))
        f = f * tl.exp(x)
    X = (S + tl.trans(S)) * (1.0 / 2048.0)
    G = H + X
    bp = G - H
    err = (H - (G - bp)) + (X - bp)  # two-sum: G + err = H + X exactly
    G = G * sigma[None, :]
    err = err * sigma[None, :]
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
def _diagonal_ptrs(y_ptr, c0, n):
    """Pointers and row mask of the diagonal blocks as one ``(NB, 16, 16)`` tile."""
    blk = tl.arange(0, NB)[:, None, None]
    r = tl.arange(0, 16)
    rows = c0 + blk * 16 + r[None, :, None]
    return y_ptr + rows * C + blk * 16 + r[None, None, :], rows < n


@triton.jit
def _invert_diagonal(y_ptr, c0, n):
    """``(I + A_II)⁻¹`` of the ``NB`` diagonal blocks, one ``(NB, 16, 16)`` tile (step 4).

    ``Z`` starts as ``−A_II``; row ``i`` becomes ``z_i = −a_i − Σ_{j<i} a_ij z_j``. Rows ``≥ i``
    still hold ``−A_II`` and ``a_ij = 0`` for ``j ≥ i``, so the sum over all 16 rows of ``Z``
    is the sum over ``j < i``; rows 0 and 1 are final from the start.
    """
    ptrs, mask = _diagonal_ptrs(y_ptr, c0, n)
    Z = -tl.load(ptrs, mask=mask, other=0.0)
    blk = tl.arange(0, NB)[:, None]
    r = tl.arange(0, 16)
    for i in range(2, 16):
        row = c0 + blk * 16 + i
        a = -tl.load(y_ptr + row * C + blk * 16 + r[None, :], mask=row < n, other=0.0)
        z = a + tl.sum(a[:, :, None] * Z, 1)
        Z = tl.where((r == i)[None, :, None], z[:, None, :], Z)
    return Z + (r[:, None] == r[None, :]).to(tl.float32)[None, :, :]


@triton.jit
def _mm(a, b):
    """``a @ b`` in fp32 FMAs."""
    return tl.dot(a, b, input_precision="ieee")


# Two warps hold the two 64×64 fp32 accumulators in 255 registers (sm90: no spills at
# BK = 16, a few bytes at 32); four warps take 214 for BK up to 64.
_CONFIGS = [
    triton.Config({"BK": bk}, num_warps=w, num_stages=s)
    for bk, w, s in ((16, 2, 1), (16, 2, 2), (32, 2, 1), (32, 2, 2), (32, 4, 1), (64, 4, 1))
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

    # 1. row scales; R in float64 (the in-chunk cumulative log-decay)
    ss = tl.zeros((C,), dtype=tl.float32)
    for k0 in tl.range(0, d, BK):
        k = _load_keys(kb, c0, n, d, k0 + tl.arange(0, BK), C)
        ss += tl.sum(k * k, 1)
    sigma, inv_sigma = _row_scales(ss)
    R = tl.zeros((C,), dtype=tl.float64)
    if DECAY:
        R = tl.cumsum(tl.load(l_ptr + b * n + rows, mask=in_n, other=0.0).to(tl.float64), 0)

    # 2.–3. A = tril((H + X) ⊙ β σσᵀ D, −1), stored to the chunk's rows of Y (zeros above the
    # diagonal)
    H = tl.zeros((C, C), dtype=tl.float32)
    S = tl.zeros((C, C), dtype=tl.float32)
    for k0 in tl.range(0, d, BK):
        h, l1, l2, m = _split(_load_keys(kb, c0, n, d, k0 + tl.arange(0, BK), C), inv_sigma)
        H, S = _gram_slab(H, S, h, l1, l2, m)
    beta = tl.load(beta_ptr + b * n + rows, mask=in_n, other=0.0)
    A = _round_a(H, S, beta, sigma, R, tl.arange(0, C), DECAY)
    tl.store(yb + rows[:, None] * C + tl.arange(0, C)[None, :], A, mask=in_n[:, None])
    tl.debug_barrier()

    # 4. the inverse by 16×16 blocks: the diagonal ones by forward substitution, stored over
    # A's; then those below the diagonal, Y_IJ = −Y_II Σ_{J≤M<I} A_IM Y_MJ
    Yd = _invert_diagonal(yb, c0, n)
    tl.debug_barrier()  # every warp has read A's diagonal blocks
    ptrs, mask = _diagonal_ptrs(yb, c0, n)
    tl.store(ptrs, Yd, mask=mask)
    tl.debug_barrier()
    Y00 = _load_block(yb, c0, n, 0, 0)
    Y11 = _load_block(yb, c0, n, 1, 1)
    Y22 = _load_block(yb, c0, n, 2, 2)
    Y33 = _load_block(yb, c0, n, 3, 3)
    A10 = _load_block(yb, c0, n, 1, 0)
    A20 = _load_block(yb, c0, n, 2, 0)
    A21 = _load_block(yb, c0, n, 2, 1)
    A30 = _load_block(yb, c0, n, 3, 0)
    A31 = _load_block(yb, c0, n, 3, 1)
    A32 = _load_block(yb, c0, n, 3, 2)
    Y10 = -_mm(Y11, _mm(A10, Y00))
    Y21 = -_mm(Y22, _mm(A21, Y11))
    Y32 = -_mm(Y33, _mm(A32, Y22))
    Y20 = -_mm(Y22, _mm(A20, Y00) + _mm(A21, Y10))
    Y31 = -_mm(Y33, _mm(A31, Y11) + _mm(A32, Y21))
    Y30 = -_mm(Y33, _mm(A30, Y00) + _mm(A31, Y10) + _mm(A32, Y20))
    tl.debug_barrier()  # every warp has read A
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
    it). ``slab``: channels per Gram slab (16, 32 or 64) for one plain launch instead of the
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
            K, beta, L, out, n, d, BK=slab or 32, DECAY=decay, num_warps=2
        )
    else:
        tri_inv_chunks_kernel[grid](K, beta, L, out, n, d, DECAY=decay)
    return out
