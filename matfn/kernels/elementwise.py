r"""Muon's element-wise passes as two Triton kernels over lists of same-shape matrices.

Muon's CUDA step (:func:`optim._fused.fused_muon`) runs its element-wise work here instead of in
``torch._foreach_*`` passes and a stacking copy, which are a third of a GPT-2-small step
(docs/benchmarks.md). Each kernel does one pass, reading the parameters, gradients and momentum
buffers where they live through a table of their addresses (no stacking copy):

* :func:`momentum_stack` — for each matrix ``b`` of a run (gradient ``G``, buffer ``M``, both
  ``(n, m)`` and contiguous)::

      M ← M + (1 − μ)(G − M)                     (EMA momentum, torch's lerp; written back)
      U ← G + μ(M − G)    if nesterov else M
      out[b] ← U (or Uᵀ when n > m) rounded to out's dtype
      partial[b, t] = Σ over tile t of out[b]²  (float32; the caller sums to ‖out[b]‖²_F)

  Traffic: read G and M, write M and the (bf16) stack: 3.5 passes over float32 data instead of
  7.5 for ``lerp_``, ``lerp`` and ``cat``. The partial sums are per tile, not atomics, so the
  norm (hence the whole Muon step) is deterministic.
* :func:`apply_update` — ``W ← f·W + s·O`` for each matrix: decoupled weight decay ``f = 1 − ηλ``
  and the scaled orthogonalised update in one pass (read W and O, write W) instead of two.

Two streaming helpers of msign's CUDA path live here too: :func:`divide_by_norms` (the
normalisation ``X / max(c·‖X‖_F, eps)``) and :func:`cast`.

The torch twins are ``optim._math.momentum_inputs`` / ``optim.muon._stack`` /
``optim._math.weight_decay_`` / ``optim._math.apply_``. Launch shapes are
:class:`ElementwiseConfig` (every launcher takes ``config=``). Importing this module imports
Triton.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._tables import int64_table, table_pointer

__all__ = [
    "CONFIG",
    "ElementwiseConfig",
    "apply_update",
    "cast",
    "divide_by_norms",
    "momentum_stack",
    "num_tiles",
]


@dataclass(frozen=True)
class ElementwiseConfig:
    """Launch shapes of the element-wise kernels.

    Attributes
    ----------
    block : int
        Square tile edge of :func:`momentum_stack` and :func:`apply_update`: ``block × block``
        elements per program. Square, so that a matrix and its transpose have the same number of
        tiles (the partial-sum layout of a bucket whose runs differ in orientation).
    stream_block : int
        Elements per program of the streaming passes :func:`divide_by_norms` and :func:`cast`.
    """

    block: int = 64
    stream_block: int = 4096


#: The configuration every launcher uses unless given another.
CONFIG = ElementwiseConfig()

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def num_tiles(n: int, m: int, config: ElementwiseConfig = CONFIG) -> int:
    """Tiles per ``(n, m)`` matrix, the second dimension of :func:`momentum_stack`'s partials."""
    return triton.cdiv(n, config.block) * triton.cdiv(m, config.block)


@triton.jit
def _tile(t, tiles_m, n, m, BLOCK: tl.constexpr):
    """Rows, columns and in-bounds mask of tile ``t`` of an ``(n, m)`` matrix (row-major tiles)."""
    rows = (t // tiles_m) * BLOCK + tl.arange(0, BLOCK)
    cols = (t % tiles_m) * BLOCK + tl.arange(0, BLOCK)
    return rows, cols, (rows[:, None] < n) & (cols[None, :] < m)


@triton.jit
def _momentum_stack_kernel(
    grad_table,
    buf_table,
    out_ptr,
    partial_ptr,
    n,
    m,
    tiles_m,
    weight,
    GRAD_DTYPE: tl.constexpr,
    BUF_DTYPE: tl.constexpr,
    NESTEROV: tl.constexpr,
    TRANSPOSED: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t = tl.program_id(0)
    b = tl.program_id(1)
    rows, cols, mask = _tile(t, tiles_m, n, m, BLOCK)
    src = rows[:, None] * m + cols[None, :]

    g_ptr = table_pointer(grad_table, b, GRAD_DTYPE, ALIGNED)
    m_ptr = table_pointer(buf_table, b, BUF_DTYPE, ALIGNED)
    g = tl.load(g_ptr + src, mask=mask, other=0.0).to(tl.float32)
    buf = tl.load(m_ptr + src, mask=mask, other=0.0).to(tl.float32)
    # weight = 1 − μ; torch.lerp's forms for μ ≥ 1/2: start + w(end − start) for w < 1/2 and
    # end − (1 − w)(end − start) for w ≥ 1/2 (here: lerp(M, G, 1 − μ) and lerp(G, M, μ))
    buf = buf + weight * (g - buf)
    tl.store(m_ptr + src, buf.to(BUF_DTYPE), mask=mask)
    if NESTEROV:
        u = buf - weight * (buf - g)
    else:
        u = buf
    u = u.to(out_ptr.dtype.element_ty)
    u32 = u.to(tl.float32)
    tl.store(partial_ptr + b * tl.num_programs(0) + t, tl.sum(tl.sum(u32 * u32, axis=1), axis=0))

    out = out_ptr + b.to(tl.int64) * n * m
    if TRANSPOSED:  # out[b] is (m, n)
        tl.store(out + cols[None, :] * n + rows[:, None], u, mask=mask)
    else:
        tl.store(out + src, u, mask=mask)


@triton.jit
def _apply_update_kernel(
    param_table,
    upd_ptr,
    n,
    m,
    tiles_m,
    stride_ub,
    stride_un,
    stride_um,
    factor,
    scale,
    PARAM_DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t = tl.program_id(0)
    b = tl.program_id(1)
    rows, cols, mask = _tile(t, tiles_m, n, m, BLOCK)
    w_ptr = table_pointer(param_table, b, PARAM_DTYPE, ALIGNED)
    w_ptr += rows[:, None] * m
    w_ptr += cols[None, :]
    u_ptr = upd_ptr + b.to(tl.int64) * stride_ub + rows[:, None] * stride_un
    u_ptr += cols[None, :] * stride_um
    w = tl.load(w_ptr, mask=mask, other=0.0).to(tl.float32)
    o = tl.load(u_ptr, mask=mask, other=0.0).to(tl.float32)
    tl.store(w_ptr, (factor * w + scale * o).to(PARAM_DTYPE), mask=mask)


@triton.jit
def _divide_by_norms_kernel(
    x_ptr, out_ptr, norms_ptr, size, factor, eps, BLOCK: tl.constexpr
):  # fmt: skip
    t = tl.program_id(0)
    b = tl.program_id(1)
    offs = t * BLOCK + tl.arange(0, BLOCK)
    mask = offs < size
    scaled = tl.load(norms_ptr + b).to(tl.float32) * factor
    # an overflowed (inf) or NaN norm gives NaN, never a silent x / inf = 0 (or x / eps: max
    # does not propagate NaN)
    denom = tl.where(scaled < float("inf"), tl.maximum(scaled, eps), float("nan"))
    x = tl.load(x_ptr + b.to(tl.int64) * size + offs, mask=mask, other=0.0).to(tl.float32)
    # correctly rounded, as torch's divide (Triton's `/` is the 2-ulp approximation): the same
    # values as `normalize`'s torch path, also for float32 iterates
    y = tl.math.div_rn(x, denom)
    tl.store(out_ptr + b.to(tl.int64) * size + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def divide_by_norms(
    X: torch.Tensor,
    norms: torch.Tensor,
    factor: float,
    eps: float,
    out: torch.Tensor,
    config: ElementwiseConfig = CONFIG,
) -> torch.Tensor:
    r"""``out[b] = X[b] / max(factor·norms[b], eps)`` for a contiguous batch ``X (B, s, L)``.

    ``out`` may be ``X`` (in place) or a contiguous tensor of another float dtype. One pass,
    correctly rounded like torch's division; torch's broadcast ``X.div_(denom)`` of a bf16
    batch by float32 norms takes 2.5× the bandwidth time (docs/benchmarks.md). A norm that is
    inf (a float32 sum of squares that overflowed) or NaN makes its matrix NaN, not zeros:
    the callers' norms are plain sums of squares, and scale-safe callers
    (:func:`matfn.msign`, :func:`matfn.mclip`) rescale such inputs before they get here.
    """
    if not (X.is_contiguous() and out.is_contiguous() and out.shape == X.shape):
        raise ValueError("`X` and `out` must be contiguous batches of one shape")
    B = X.shape[0]
    size = X[0].numel() if B else 0
    if B and size:
        block = config.stream_block
        _divide_by_norms_kernel[(triton.cdiv(size, block), B)](
            X, out, norms.contiguous(), size, float(factor), float(eps), BLOCK=block
        )
    return out


@triton.jit
def _cast_kernel(x_ptr, out_ptr, size, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < size
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=mask)


def cast(X: torch.Tensor, dtype: torch.dtype, config: ElementwiseConfig = CONFIG) -> torch.Tensor:
    """``X.to(dtype)`` for a contiguous tensor in one vectorised pass.

    A plain streaming copy: torch's fp16 → bf16 copy runs its unrolled (non-vectorised) kernel
    at about half the bandwidth (docs/benchmarks.md). A non-contiguous ``X`` takes torch's copy.
    """
    if X.dtype == dtype:
        return X
    out = torch.empty_like(X, dtype=dtype)
    if not X.is_contiguous():
        return out.copy_(X)
    block = config.stream_block
    if X.numel():
        _cast_kernel[(triton.cdiv(X.numel(), block),)](X, out, X.numel(), BLOCK=block)
    return out


@functools.lru_cache(maxsize=256)
def _table_on(addresses: tuple[int, ...], device: torch.device) -> torch.Tensor:
    # cached: parameter and buffer tables (stable addresses) are not rebuilt every step
    return int64_table(addresses, device)


def _matrix_addresses(tensors: Sequence[torch.Tensor], n: int, m: int) -> tuple[int, ...]:
    """Address of every ``(n, m)`` matrix of each contiguous tensor (``k`` per tensor)."""
    out = []
    for x in tensors:
        step = n * m * x.element_size()
        out.extend(x.data_ptr() + j * step for j in range(x.numel() // (n * m)))
    return tuple(out)


def _aligned(addresses: tuple[int, ...]) -> bool:
    return all(a % 16 == 0 for a in addresses)


def _check_run(tensors: Sequence[torch.Tensor], name: str, n: int, m: int) -> None:
    for x in tensors:
        if not x.is_contiguous() or x.numel() % (n * m) or x.dtype not in _TL_DTYPES:
            raise ValueError(
                f"`{name}` must be contiguous float32/bf16/fp16 stacks of ({n}, {m}) matrices, "
                f"got shape {tuple(x.shape)}, dtype {x.dtype}, strides {x.stride()}"
            )


def momentum_stack(
    grads: Sequence[torch.Tensor],
    bufs: Sequence[torch.Tensor],
    out: torch.Tensor,
    partials: torch.Tensor,
    *,
    n: int,
    m: int,
    momentum: float,
    nesterov: bool,
    config: ElementwiseConfig = CONFIG,
) -> None:
    r"""Momentum update of ``bufs`` and the stacked, wide Muon input written to ``out``.

    Parameters
    ----------
    grads, bufs:
        Contiguous tensors holding ``k`` row-major ``(n, m)`` matrices each (same ``k`` per
        pair; ``k = 1`` for a 2-D weight). All grads share one dtype, all bufs one dtype.
    out:
        ``(K, s, L)`` with ``K = Σ k``, ``s = min(n, m)``, ``L = max(n, m)``; matrix ``b`` gets
        ``U_b`` (``U_bᵀ`` when ``n > m``) in ``out``'s dtype.
    partials:
        ``(K, num_tiles(n, m))`` float32: per-tile sums of squares of ``out[b]``'s entries
        (after rounding), so ``partials.sum(1).sqrt()`` is ``‖out[b]‖_F``.

    Cost: one read of grads and bufs, one write of bufs and ``out``.
    """
    _check_run(grads, "grads", n, m)
    _check_run(bufs, "bufs", n, m)
    K = out.shape[0]
    tiles = num_tiles(n, m, config)
    if out.shape != (K, min(n, m), max(n, m)) or not out.is_contiguous():
        raise ValueError(f"`out` must be a contiguous ({K}, {min(n, m)}, {max(n, m)}) stack")
    if partials.shape != (K, tiles) or partials.dtype != torch.float32:
        raise ValueError(f"`partials` must be float32 of shape ({K}, {tiles})")
    device = out.device
    g_addresses = _matrix_addresses(grads, n, m)
    b_addresses = _matrix_addresses(bufs, n, m)
    g_table = _table_on(g_addresses, device)
    b_table = _table_on(b_addresses, device)
    if g_table.numel() != K or b_table.numel() != K:
        raise ValueError(f"`grads` and `bufs` must hold {K} matrices each")
    _momentum_stack_kernel[(tiles, K)](
        g_table,
        b_table,
        out,
        partials,
        n,
        m,
        triton.cdiv(m, config.block),
        1.0 - float(momentum),
        GRAD_DTYPE=_TL_DTYPES[grads[0].dtype],
        BUF_DTYPE=_TL_DTYPES[bufs[0].dtype],
        NESTEROV=bool(nesterov),
        TRANSPOSED=n > m,
        ALIGNED=_aligned(g_addresses + b_addresses),
        BLOCK=config.block,
    )


def apply_update(
    params: Sequence[torch.Tensor],
    update: torch.Tensor,
    *,
    factor: float,
    scale: float,
    config: ElementwiseConfig = CONFIG,
) -> None:
    r"""``W ← factor·W + scale·O_b`` in place for every ``(n, m)`` matrix of ``params``.

    ``update`` is ``(K, n, m)`` (any strides, e.g. a transposed view of the wide Muon output);
    the arithmetic is float32, rounded once to the parameter's dtype. Cost: one read of W and
    O, one write of W.
    """
    K, n, m = update.shape
    _check_run(params, "params", n, m)
    addresses = _matrix_addresses(params, n, m)
    table = _table_on(addresses, update.device)
    if table.numel() != K:
        raise ValueError(f"`params` must hold {K} matrices of shape ({n}, {m})")
    if len({p.dtype for p in params}) != 1:
        raise ValueError("`params` must share one dtype")
    _apply_update_kernel[(num_tiles(n, m, config), K)](
        table,
        update,
        n,
        m,
        triton.cdiv(m, config.block),
        *update.stride(),
        float(factor),
        float(scale),
        PARAM_DTYPE=_TL_DTYPES[params[0].dtype],
        ALIGNED=_aligned(addresses),
        BLOCK=config.block,
    )
