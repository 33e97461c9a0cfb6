r"""Grouped products: matrices of mixed shapes multiplied in one Triton launch.

:func:`grouped_matmul` computes, for every group ``i`` of a list,

.. math:: C_i = \alpha A_i B_i + \beta D_i + \gamma I, \qquad A_i \in ℝ^{M_i×K_i},\;
          B_i \in ℝ^{K_i×N_i},

in **one** launch: each program owns one ``BLOCK_M × BLOCK_N`` output tile of one group, found
from a prefix sum of the groups' tile counts; operands are read through tables of their
addresses and strides (any strides, e.g. ``X.mT`` in place), outputs are slices of one buffer.
Float32 accumulation, output in the operands' dtype, the whole ``αAB + βD + γI`` in the epilogue.
When every operand list shares a layout (which stride is 1) and its addresses, strides and dims
are 16-byte / 8-element aligned, the kernel is told so (constexpr layout, ``tl.multiple_of``)
and loads with 16-byte ``cp.async`` in 3 stages; otherwise it reads element by element.

:func:`newton_schulz_grouped_launch` runs the standard iteration on a list of wide matrices of
mixed shapes with three grouped launches per step (``A = X Xᵀ``; ``B = cA² + bA + aI``;
``X ← B X``), where stacking by shape (:func:`matfn.msign.path.newton_schulz_grouped`)
needs three launches per step *per distinct shape*. Cost: the plain algorithm's FLOPs; no
symmetric savings. It beats the stacked path from about 16 distinct shapes
(:attr:`matfn._backend.NewtonSchulzConfig.grouped_min_shapes`). Importing this module imports
Triton.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ..kernels._tables import int64_table, table_pointer
from ..kernels.launch import INTERPRET

__all__ = ["grouped_matmul", "newton_schulz_grouped_launch"]

Coefficients = tuple[float, float, float]

#: Tile shape: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Not autotuned (the shapes
#: differ per group); small tiles under the interpreter.
BLOCKS = (16, 16, 16, 1, 1) if INTERPRET else (128, 128, 64, 8, 3)

_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _offsets(rows, cols, s_rows, s_cols, LAYOUT: tl.constexpr):
    """Element offsets of a tile.

    ``LAYOUT`` ``"row"``/``"col"`` says which stride is 1 (for every group), so the compiler sees
    contiguous, vectorisable rows/columns; ``"any"``: both strides are runtime values.
    """
    if LAYOUT == "row":
        return rows[:, None] * s_rows + cols[None, :]
    elif LAYOUT == "col":
        return rows[:, None] + cols[None, :] * s_cols
    else:
        return rows[:, None] * s_rows + cols[None, :] * s_cols


@triton.jit
def _grouped_mm_kernel(
    a_table,
    b_table,
    d_table,
    c_table,
    dims,  # int64 (G, 3): M, N, K
    strides,  # int64 (G, 8): A (m, k), B (k, n), D (m, n), C (m, n)
    tile_start,  # int64 (G + 1,): prefix sum of the groups' tile counts
    G,
    alpha,
    beta,
    gamma,
    HAS_D: tl.constexpr,
    DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    A_LAYOUT: tl.constexpr,
    B_LAYOUT: tl.constexpr,
    D_LAYOUT: tl.constexpr,
    ALIGNED: tl.constexpr,
    LOG_G: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    # the group owning this tile: the last g with tile_start[g] ≤ pid, by binary search
    # (⌈log₂ G⌉ dependent loads per program; a linear scan costs up to G)
    g = pid * 0
    hi = pid * 0 + G - 1
    for _ in tl.static_range(LOG_G):
        mid = (g + hi + 1) // 2
        below = tl.load(tile_start + mid) <= pid
        g = tl.where(below, mid, g)
        hi = tl.where(below, hi, mid - 1)
    M = tl.load(dims + 3 * g)
    N = tl.load(dims + 3 * g + 1)
    K = tl.load(dims + 3 * g + 2)
    if ALIGNED:  # dims multiples of 8 (checked on the host): masks constant over 8 elements
        M = tl.multiple_of(M, 8)
        N = tl.multiple_of(N, 8)
        K = tl.multiple_of(K, 8)
    local = pid - tl.load(tile_start + g)
    tiles_n = tl.cdiv(N, BLOCK_N)
    rm = (local // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (local % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    s = strides + 8 * g
    a_ptr = table_pointer(a_table, g, DTYPE, ALIGNED)
    b_ptr = table_pointer(b_table, g, DTYPE, ALIGNED)
    c_ptr = table_pointer(c_table, g, DTYPE, ALIGNED)
    # strides; with ALIGNED the non-unit ones are multiples of 8 (hinted here, in the kernel
    # body: a hint inside a helper function did not reach the loads' alignment analysis)
    a_sm, a_sk = tl.load(s), tl.load(s + 1)
    b_sk, b_sn = tl.load(s + 2), tl.load(s + 3)
    c_sm = tl.load(s + 6)
    if ALIGNED:
        c_sm = tl.multiple_of(c_sm, 8)
        if A_LAYOUT == "row":
            a_sm = tl.multiple_of(a_sm, 8)
        else:
            a_sk = tl.multiple_of(a_sk, 8)
        if B_LAYOUT == "row":
            b_sk = tl.multiple_of(b_sk, 8)
        else:
            b_sn = tl.multiple_of(b_sn, 8)
    a_ptrs = a_ptr + _offsets(rm, rk, a_sm, a_sk, A_LAYOUT)
    b_ptrs = b_ptr + _offsets(rk, rn, b_sk, b_sn, B_LAYOUT)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k0 * BLOCK_K
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(rk[:, None] < k_left) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * (1 if A_LAYOUT == "row" else a_sk)
        b_ptrs += BLOCK_K * (1 if B_LAYOUT == "col" else b_sk)
    acc = acc * alpha
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if HAS_D:
        d_ptr = table_pointer(d_table, g, DTYPE, ALIGNED)
        d_sm, d_sn = tl.load(s + 4), tl.load(s + 5)
        if ALIGNED:
            if D_LAYOUT == "row":
                d_sm = tl.multiple_of(d_sm, 8)
            else:
                d_sn = tl.multiple_of(d_sn, 8)
        d_ptrs = d_ptr + _offsets(rm, rn, d_sm, d_sn, D_LAYOUT)
        acc += beta * tl.load(d_ptrs, mask=mask, other=0.0).to(tl.float32)
    acc += tl.where(rm[:, None] == rn[None, :], gamma, 0.0)
    c_ptrs = c_ptr + _offsets(rm, rn, c_sm, 1, "row")
    tl.store(c_ptrs, acc.to(DTYPE), mask=mask)


def _describe(mats: Sequence[torch.Tensor]) -> tuple[list[int], list[int], str, bool]:
    """Addresses, flattened strides, shared layout and alignment of one operand list.

    Layout: ``"row"`` (every column stride 1), ``"col"`` (every row stride 1) or ``"any"``.
    Aligned: the layout is not ``"any"``, every base is 16-byte aligned, and the non-unit
    stride and both dims are multiples of 8 (so every row or column start is 16-byte aligned
    and masks are constant over 8 elements): the kernel's hints hold.
    """
    ptrs = [x.data_ptr() for x in mats]
    strides = [x.stride() for x in mats]
    if all(st[1] == 1 for st in strides):
        layout, lead = "row", 0
    elif all(st[0] == 1 for st in strides):
        layout, lead = "col", 1
    else:
        return ptrs, [v for st in strides for v in st], "any", False
    aligned = all(p % 16 == 0 for p in ptrs) and all(
        st[lead] % 8 == 0 and sh[0] % 8 == 0 and sh[1] % 8 == 0
        for st, sh in zip(strides, (x.shape for x in mats), strict=True)
    )
    return ptrs, [v for st in strides for v in st], layout, aligned


def _tables(parts: list[list[int]], device: torch.device) -> list[torch.Tensor]:
    """The kernel's int64 tables in one host-to-device copy."""
    flat = int64_table([v for part in parts for v in part], device)
    return list(flat.split([len(part) for part in parts]))


def grouped_matmul(
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    Ds: Sequence[torch.Tensor] | None = None,
    *,
    alpha: float = 1.0,
    beta: float = 0.0,
    gamma: float = 0.0,
) -> list[torch.Tensor]:
    r"""``[α A_i B_i + β D_i + γ I for i]`` for 2-D matrices of mixed shapes, one launch.

    All operands share one dtype (float32/bf16/fp16) and device; any strides. ``γ I`` adds γ to
    the main diagonal (square or not). Returns contiguous outputs in the operands' dtype (slices
    of one buffer). Cost: ``Σ 2 M_i N_i K_i`` FLOPs.
    """
    if len(As) != len(Bs) or (Ds is not None and len(Ds) != len(As)):
        raise ValueError("`As`, `Bs` (and `Ds`) must have the same length")
    if not As:
        return []
    # this host loop runs once per product for every group (Newton–Schulz: 3 per step), so it
    # keeps to cheap tensor accessors (get_device, not .device; no triton.cdiv)
    dtype, device, dev_index = As[0].dtype, As[0].device, As[0].get_device()
    for name, group in (("As", As), ("Bs", Bs), ("Ds", Ds or [])):
        for x in group:
            if x.dim() != 2 or x.dtype != dtype or x.get_device() != dev_index:
                raise ValueError(f"`{name}` must be 2-D {dtype} tensors on {device}")
    if dtype not in _TL:
        raise TypeError(f"grouped_matmul supports float32/bf16/fp16, got {dtype}")
    dims, starts, sizes = [], [0], []
    BM, BN, BK, warps, stages = BLOCKS
    for i, (A, B) in enumerate(zip(As, Bs, strict=True)):
        (M, K), (K2, N) = A.shape, B.shape
        if K != K2:
            raise ValueError(f"group {i}: {tuple(A.shape)} @ {tuple(B.shape)} do not multiply")
        if Ds is not None and Ds[i].shape != (M, N):
            raise ValueError(f"group {i}: `Ds[{i}]` must have shape {(M, N)}")
        dims += (M, N, K)
        starts.append(starts[-1] + (-(-M // BM)) * (-(-N // BN)))
        sizes.append(M * N)
    flat = torch.empty(sum(sizes), dtype=dtype, device=device)
    outs = [
        c.view(A.shape[0], B.shape[1]) for c, A, B in zip(flat.split(sizes), As, Bs, strict=True)
    ]
    if starts[-1] == 0:
        return outs
    described = [_describe(xs) for xs in (As, Bs, Ds if Ds is not None else outs, outs)]
    ptrs = [d[0] for d in described]
    per_role = [d[1] for d in described]  # (m, k), (k, n), (m, n), (m, n) strides per group
    strides = [v for i in range(len(As)) for st in per_role for v in st[2 * i : 2 * i + 2]]
    layouts = [d[2] for d in described[:3]]
    aligned = all(d[3] for d in described)
    _grouped_mm_kernel[(starts[-1],)](
        *_tables([*ptrs, dims, strides, starts], device),
        len(As),
        float(alpha),
        float(beta),
        float(gamma),
        HAS_D=Ds is not None and beta != 0,
        DTYPE=_TL[dtype],
        A_LAYOUT=layouts[0],
        B_LAYOUT=layouts[1],
        D_LAYOUT=layouts[2],
        ALIGNED=aligned,
        LOG_G=max(1, (len(As) - 1).bit_length()),
        PRECISION="ieee" if dtype == torch.float32 else "tf32",  # fp32: no silent tf32
        BLOCK_M=BM,
        BLOCK_N=BN,
        BLOCK_K=BK,
        num_warps=warps,
        num_stages=stages,
    )
    return outs


def newton_schulz_grouped_launch(
    Xs: Sequence[torch.Tensor], coeffs: Sequence[Coefficients]
) -> list[torch.Tensor]:
    """The standard iteration on normalised wide matrices ``(s_i, L_i)`` of mixed shapes.

    Per step three grouped launches for all matrices: ``A = X Xᵀ``, ``B = cA² + bA + aI``,
    ``X ← B X`` (for a cubic step, ``X ← b A X + a X``). Same polynomial as
    :func:`matfn.msign.reference.newton_schulz_torch`, one rounding more (``a + B_ii``, as in
    :func:`matfn.msign.triton.ns_step_folded`).
    """
    Xs = list(Xs)
    for a, b, c in coeffs:
        As = grouped_matmul(Xs, [X.mT for X in Xs])
        if c == 0:
            Xs = grouped_matmul(As, Xs, Xs, alpha=b, beta=a)
            continue
        Bs = grouped_matmul(As, As, As, alpha=c, beta=b, gamma=a)
        Xs = grouped_matmul(Bs, Xs)
    return Xs
