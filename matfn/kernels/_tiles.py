"""Tile helpers shared by the pointer and TMA product kernels (a leaf: Triton only)."""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["_tile_coords", "_store_lower_and_mirror"]


@triton.jit
def _tile_coords(
    pid,
    M,
    N,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
    TRIANGLE: tl.constexpr,
):
    if TRIANGLE:
        # Square tiles of a symmetric result: a linear index over the lower triangle, row by
        # row, t = i (i + 1) / 2 + j with j ≤ i (no program is launched for the upper half).
        i = ((tl.sqrt((8 * pid + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
        i = tl.where((i + 1) * (i + 2) // 2 <= pid, i + 1, i)
        i = tl.where(i * (i + 1) // 2 > pid, i - 1, i)
        pid_m = i
        pid_n = pid - i * (i + 1) // 2
    else:
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        in_group = GROUP_M * num_n
        group = pid // in_group
        first_m = group * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % in_group) % size_m
        pid_n = (pid % in_group) // size_m
    return pid_m, pid_n


@triton.jit
def _store_lower_and_mirror(c_base, out, rm, rn, M, N, stride_cm, stride_cn):
    """Store a tile of a symmetric result, once in each triangle.

    The part of ``out`` (rows ``rm``, columns ``rn``) on or below the diagonal is stored, then
    its strictly lower part transposed into the upper triangle: every element is written exactly
    once and the result is exactly symmetric.
    """
    lower = (rm[:, None] < M) & (rn[None, :] < N) & (rm[:, None] >= rn[None, :])
    tl.store(c_base + rm[:, None] * stride_cm + rn[None, :] * stride_cn, out, mask=lower)
    upper = (rn[:, None] < N) & (rm[None, :] < M) & (rm[None, :] > rn[:, None])
    tl.store(c_base + rn[:, None] * stride_cm + rm[None, :] * stride_cn, tl.trans(out), mask=upper)
