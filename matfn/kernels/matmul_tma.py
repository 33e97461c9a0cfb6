r"""The Newton–Schulz products with tensor-memory-accelerator (TMA) loads (Hopper and newer).

Same contract as :func:`matfn.kernels.matmul.matmul_triton` — ``C = α A B + β D + γ I`` for
batches, one launch, the symmetric tiling computing only the lower triangle of tiles — but the
operand tiles are fetched by TMA descriptors (``triton.tools.tensor_descriptor``) instead of
pointer arithmetic: one asynchronous bulk copy per tile into shared memory, no address registers,
out-of-range rows, columns and ``K`` filled with zeros by the copy engine (no masks in the K
loop). Results are stored by TMA too: for a symmetric result, each tile below the diagonal and
its transpose, each square tile on the diagonal after mirroring its lower part in registers;
rectangular tiles crossing the diagonal keep the masked pointer stores of
:mod:`matfn.kernels.matmul`. Every element is written exactly once and the result is exactly
symmetric.

Operands are 3-D descriptors ``(batch, rows, cols)`` over a row-major view: a column-major
operand (``X.mT`` in ``X Xᵀ``) is described through its transpose and the loaded tile is
transposed in shared memory (``A_T`` / ``B_T``), which the Hopper tensor cores read directly.
TMA needs 16-byte aligned bases and batch/row strides and a unit last stride; the kernel takes
bf16/fp16 operands (float32 accumulation) only (:func:`tma_applies`). Other operands take the
pointer kernel.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ._tiles import _store_lower_and_mirror, _tile_coords
from .launch import pdl_flags as _pdl_flags
from .launch import wait_for_previous_launch as _wait_for_previous_launch

__all__ = ["tma_applies", "launch_tma", "set_block_shapes"]


@triton.jit
def _load_tile(desc, bid, r0, c0, BR: tl.constexpr, BC: tl.constexpr, TRANS: tl.constexpr):
    """The ``BR×BC`` tile at ``(r0, c0)`` of matrix ``bid``; read transposed when ``TRANS``."""
    if TRANS:
        return desc.load([bid, c0, r0]).reshape(BC, BR).T
    return desc.load([bid, r0, c0]).reshape(BR, BC)


@triton.jit
def _tile(
    a_desc,
    b_desc,
    d_desc,
    c_desc,
    ct_desc,
    c_ptr,
    bid,
    r0,
    c0,
    M,
    N,
    K,
    stride_cb,
    stride_cm,
    stride_cn,
    alpha,
    beta,
    gamma,
    A_T: tl.constexpr,
    B_T: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_DIAG: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Output tile ``(r0, c0)`` of matrix ``bid``: the K loop, the epilogue and the stores."""
    _wait_for_previous_launch(USE_PDL)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a = _load_tile(a_desc, bid, r0, k * BLOCK_K, BLOCK_M, BLOCK_K, A_T)
        b = _load_tile(b_desc, bid, k * BLOCK_K, c0, BLOCK_K, BLOCK_N, B_T)
        acc = tl.dot(a, b, acc)

    out = acc * alpha
    if HAS_D:
        out += beta * d_desc.load([bid, r0, c0]).reshape(BLOCK_M, BLOCK_N).to(tl.float32)
    rm = r0 + tl.arange(0, BLOCK_M)
    rn = c0 + tl.arange(0, BLOCK_N)
    if HAS_DIAG:
        out += tl.where(rm[:, None] == rn[None, :], gamma, 0.0)
    out = out.to(c_ptr.dtype.element_ty)
    if not SYMMETRIC:
        c_desc.store([bid, r0, c0], out.reshape(1, BLOCK_M, BLOCK_N))
    elif c0 + BLOCK_N <= r0:
        # Strictly below the diagonal: the tile and its transpose, both by TMA (the copy engine
        # clips rows and columns past the matrix).
        c_desc.store([bid, r0, c0], out.reshape(1, BLOCK_M, BLOCK_N))
        ct_desc.store([bid, c0, r0], tl.trans(out).reshape(1, BLOCK_N, BLOCK_M))
    elif BLOCK_M == BLOCK_N and r0 == c0:
        # A square tile on the diagonal: its lower part mirrored in registers, one TMA store.
        out = tl.where(rm[:, None] >= rn[None, :], out, tl.trans(out))
        c_desc.store([bid, r0, c0], out.reshape(1, BLOCK_M, BLOCK_N))
    else:  # a rectangular tile crossing the diagonal: masked pointer stores
        c_base = c_ptr + bid.to(tl.int64) * stride_cb
        _store_lower_and_mirror(c_base, out, rm, rn, M, N, stride_cm, stride_cn)


@triton.jit
def _tile_at(
    t,
    tiles,
    a_desc,
    b_desc,
    d_desc,
    c_desc,
    ct_desc,
    c_ptr,
    M,
    N,
    K,
    stride_cb,
    stride_cm,
    stride_cn,
    alpha,
    beta,
    gamma,
    A_T: tl.constexpr,
    B_T: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_DIAG: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    TRIANGLE: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Tile number ``t`` of the launch (``tiles`` a matrix): its matrix, row and column."""
    bid = t // tiles
    pid_m, pid_n = _tile_coords(t % tiles, M, N, BLOCK_M, BLOCK_N, GROUP_M, TRIANGLE)
    r0 = pid_m * BLOCK_M
    c0 = pid_n * BLOCK_N
    # A symmetric result's tile wholly above the diagonal (rectangular tiles only) is the mirror
    # of tiles below it: nothing to do.
    if not SYMMETRIC or c0 <= r0 + BLOCK_M - 1:
        _tile(
            a_desc,
            b_desc,
            d_desc,
            c_desc,
            ct_desc,
            c_ptr,
            bid,
            r0,
            c0,
            M,
            N,
            K,
            stride_cb,
            stride_cm,
            stride_cn,
            alpha,
            beta,
            gamma,
            A_T,
            B_T,
            SYMMETRIC,
            HAS_D,
            HAS_DIAG,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            USE_PDL,
        )


@triton.jit
def _mm_tma_kernel(
    a_desc,
    b_desc,
    d_desc,
    c_desc,
    ct_desc,
    c_ptr,
    M,
    N,
    K,
    BATCH,
    stride_cb,
    stride_cm,
    stride_cn,
    alpha,
    beta,
    gamma,
    A_T: tl.constexpr,
    B_T: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_DIAG: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PROGRAMS: tl.constexpr = 0,
    USE_PDL: tl.constexpr = False,
):
    """``C = α A B + β D + γ I`` by TMA tiles (module docstring).

    One program per output tile, or, with ``PROGRAMS > 0``, that many persistent programs, each
    looping over the tiles ``pid, pid + PROGRAMS, …``.
    """
    TRIANGLE = SYMMETRIC and BLOCK_M == BLOCK_N
    num_m = tl.cdiv(M, BLOCK_M)
    if TRIANGLE:
        tiles = num_m * (num_m + 1) // 2
    else:
        tiles = num_m * tl.cdiv(N, BLOCK_N)
    if PROGRAMS == 0:
        _tile_at(
            tl.program_id(0),
            tiles,
            a_desc,
            b_desc,
            d_desc,
            c_desc,
            ct_desc,
            c_ptr,
            M,
            N,
            K,
            stride_cb,
            stride_cm,
            stride_cn,
            alpha,
            beta,
            gamma,
            A_T,
            B_T,
            SYMMETRIC,
            HAS_D,
            HAS_DIAG,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            GROUP_M,
            TRIANGLE,
            USE_PDL,
        )
    else:
        for t in range(tl.program_id(0), BATCH * tiles, PROGRAMS):
            _tile_at(
                t,
                tiles,
                a_desc,
                b_desc,
                d_desc,
                c_desc,
                ct_desc,
                c_ptr,
                M,
                N,
                K,
                stride_cb,
                stride_cm,
                stride_cn,
                alpha,
                beta,
                gamma,
                A_T,
                B_T,
                SYMMETRIC,
                HAS_D,
                HAS_DIAG,
                BLOCK_M,
                BLOCK_N,
                BLOCK_K,
                GROUP_M,
                TRIANGLE,
                USE_PDL,
            )


def _row_major(T: torch.Tensor) -> tuple[torch.Tensor, bool] | None:
    """``(view, transposed)``: a view of ``T`` with unit last stride, or None when none is."""
    if T.stride(-1) == 1 or T.shape[-1] == 1:
        return T, False
    if T.stride(-2) == 1 or T.shape[-2] == 1:
        return T.mT, True
    return None


def _tma_ok(T: torch.Tensor) -> bool:
    """TMA's rules for a row-major 3-D view: 16-byte base and strides, no zero strides."""
    size = T.element_size()
    return (
        T.data_ptr() % 16 == 0
        and all(st > 0 and (st * size) % 16 == 0 for st in T.stride()[:-1])
        and T.stride(-1) == 1
    )


def tma_applies(
    A: torch.Tensor, B: torch.Tensor, D: torch.Tensor | None, out: torch.Tensor
) -> bool:
    """Whether every operand of ``α A B + β D`` and the output ``out`` can be read by TMA.

    16-bit operands only (bf16/fp16, the Newton–Schulz dtypes): float32 tiles would need IEEE
    FMA dots from transposed shared-memory tiles and twice the shared memory of the tile configs.
    """
    if A.element_size() != 2:
        return False
    for T, may_transpose in ((A, True), (B, True), (D, False), (out, False)):
        if T is None:
            continue
        view = _row_major(T) if may_transpose else (T, False)
        if view is None or not _tma_ok(view[0]):
            return False
    return True


class _Descriptors(threading.local):
    """Descriptors of earlier launches, by operand slot and geometry (one table per thread).

    Building and validating five ``TensorDescriptor`` objects was about half of this module's
    host time per launch; a launch whose slot, shape, strides, dtype and block match an earlier
    one reuses that object with its ``base`` set to the new tensor (whose 16-byte alignment
    :func:`tma_applies` checked), and drops the tensor after the launch.
    """

    def __init__(self) -> None:
        self.table: dict[tuple, TensorDescriptor] = {}


_DESCRIPTORS = _Descriptors()


def _descriptor(
    T: torch.Tensor, block: tuple[int, int], slot: str | None = None
) -> tuple[TensorDescriptor, bool]:
    """The TMA descriptor of ``T``'s row-major view and ``block`` tiles (rows, columns of T).

    ``slot`` (the kernel argument it is passed as): reuse a cached descriptor of that slot.
    """
    view, trans = _row_major(T)
    rows, cols = (block[1], block[0]) if trans else block
    if slot is None:
        return TensorDescriptor(view, list(view.shape), list(view.stride()), [1, rows, cols]), trans
    key = (slot, view.shape, view.stride(), view.dtype, rows, cols)
    desc = _DESCRIPTORS.table.get(key)
    if desc is None:
        desc = TensorDescriptor(view, list(view.shape), list(view.stride()), [1, rows, cols])
        _DESCRIPTORS.table[key] = desc
    else:
        desc.base = view
    return desc, trans


def set_block_shapes(nargs: dict) -> None:
    """Autotuner pre-hook: the descriptors' block shapes follow the config's tile sizes."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["a_desc"].block_shape = [1, bk, bm] if nargs["A_T"] else [1, bm, bk]
    nargs["b_desc"].block_shape = [1, bn, bk] if nargs["B_T"] else [1, bk, bn]
    for name, shape in (("d_desc", [1, bm, bn]), ("c_desc", [1, bm, bn]), ("ct_desc", [1, bn, bm])):
        nargs[name].block_shape = shape


def launch_tma(
    A: torch.Tensor,
    B: torch.Tensor,
    D: torch.Tensor | None,
    out: torch.Tensor,
    alpha: float,
    beta: float,
    gamma: float,
    symmetric: bool,
    grid: Callable[[dict], tuple[int]],
    config: dict | None = None,
    kernel=None,
    pdl: bool = False,
) -> None:
    """Launch :func:`_mm_tma_kernel` on ``(batch, M, K) @ (batch, K, N)``.

    ``grid(meta)`` gives the launch grid from the meta-parameters; ``config`` the meta-parameters
    (a Triton config's ``all_kwargs()``), or ``kernel`` an autotuned wrapper of the kernel whose
    configs' pre-hook (:func:`set_block_shapes`) sets the descriptors' block shapes. ``pdl``:
    programmatic dependent launch (:func:`matfn.kernels.matmul._pdl`).
    """
    blocks = config or {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}
    bm, bn, bk = blocks["BLOCK_M"], blocks["BLOCK_N"], blocks["BLOCK_K"]
    # the autotuner's pre-hook reshapes its descriptors' blocks: fresh ones for it
    cached = kernel is None
    a_desc, a_t = _descriptor(A, (bm, bk), "a" if cached else None)
    b_desc, b_t = _descriptor(B, (bk, bn), "b" if cached else None)
    c_desc, _ = _descriptor(out, (bm, bn), "c" if cached else None)
    ct_desc, _ = _descriptor(out, (bn, bm), "ct" if cached else None)
    d_desc = _descriptor(D, (bm, bn), "d" if cached else None)[0] if D is not None else c_desc
    M, K = A.shape[1:]
    N = B.shape[2]
    args = (a_desc, b_desc, d_desc, c_desc, ct_desc, out, M, N, K, A.shape[0], *out.stride())
    args += (float(alpha), float(beta), float(gamma))
    flags = dict(
        A_T=a_t,
        B_T=b_t,
        SYMMETRIC=symmetric,
        HAS_D=D is not None,
        HAS_DIAG=gamma != 0,
        **_pdl_flags(pdl),
    )
    if kernel is not None:
        kernel[grid](*args, **flags)
        return
    try:
        _mm_tma_kernel[grid(config)](*args, **flags, **config)
    finally:  # the launch has encoded the addresses: keep no tensor alive in the cache
        for desc in (a_desc, b_desc, c_desc, ct_desc, d_desc):
            desc.base = None
