"""The frozen tuning of the triangular Triton kernels: one config per op (pure Python, no Triton).

The launchers take ``config=`` (default :data:`TRI_INV_CONFIG` / :data:`TRI_SOLVE_CONFIG`);
tests and benchmarks vary a value with ``dataclasses.replace(TRI_SOLVE_CONFIG, ...)``. The
values are the fastest measured on the H100 and H200 at n = 4096, d = e = 128
(docs/benchmarks.md). Every product runs as three tf32 tensor-core products of a hi/lo split
(``"3xtf32"``, :func:`matfn.triangular.chunk.mm`): fp32-accurate at tensor-core speed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

__all__ = [
    "TriInvConfig",
    "TriSolveConfig",
    "TriDecayConfig",
    "TRI_INV_CONFIG",
    "TRI_SOLVE_CONFIG",
    "TRI_DECAY_CONFIG",
    "SOLVE_MAX_D",
    "kernel_chunk",
    "inv_config",
    "solve_config",
    "decay_config",
]

#: The solve's kernels keep ``d``-wide tiles on chip: above 128 they need more than the 227 KB
#: of shared memory of an H100/H200, so larger ``d`` takes the torch path.
SOLVE_MAX_D = 128

_TILES = (16, 32, 64)
_WARPS = (1, 2, 4, 8)


def _check_chunk(chunk_size: int, block_s: int) -> None:
    if chunk_size not in _TILES or block_s not in (1, 2, 4, 8, 16, 32) or block_s > chunk_size:
        raise ValueError(
            f"chunk_size must be 16/32/64 and block_s 1/2/4/8/16/32 ≤ chunk_size, got "
            f"{chunk_size}, {block_s}"
        )


def _check_in(name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


@dataclass(frozen=True)
class TriInvConfig:
    """How :func:`matfn.triangular.inverse.tri_inv_triton` runs."""

    #: Rows ``C`` of a chunk (16/32/64), the largest the public ``tri_inv`` uses; a smaller
    #: ``chunk_size`` request is honoured. 64: the off-diagonal tiles are ``C×C`` rank-``d``
    #: products, and larger tiles make fewer, better-fed ones.
    chunk_size: int = 64
    #: Rows of the diagonal blocks that the chunk kernel inverts by forward substitution before
    #: it doubles them up to ``C`` (1–32, ≤ ``C``). 16: one tensor-core tile per block.
    block_s: int = 16
    #: Warps of the chunk kernel (1/2/4/8). 4: the chunk's ``C×C`` dots fit 4 warps.
    chunk_warps: int = 4
    #: Row tile of a level's ``P, R`` updates (16/32/64, at most ``C``). 32: at B = 1 a level
    #: has only ``n/rows × d/64`` tiles, and smaller tiles give the SMs more programs.
    level_rows: int = 32
    #: Tile of the ``d×d`` Gram products and combines (16/32/64, at most the padded ``d``).
    gram_block: int = 32
    #: Warps of the Gram, level and off-diagonal kernels (1/2/4/8).
    warps: int = 4

    def __post_init__(self) -> None:
        _check_chunk(self.chunk_size, self.block_s)
        _check_in("level_rows", self.level_rows, _TILES)
        _check_in("gram_block", self.gram_block, _TILES)
        for name in ("chunk_warps", "warps"):
            _check_in(name, getattr(self, name), _WARPS)


@dataclass(frozen=True)
class TriSolveConfig:
    """How :func:`matfn.triangular.solve.tri_solve_triton` runs (scan and tree solves)."""

    #: Rows ``C`` of a chunk (16/32/64), the largest the public ``tri_solve`` uses. 32: the
    #: scan's chain is of ``C``-row steps, and 32 balances the step's latency against the
    #: number of steps.
    chunk_size: int = 32
    #: Rows of the chunk kernel's diagonal blocks (1–32, ≤ ``C``). 4: three doubling levels,
    #: the fastest chunk kernel for 32-row chunks.
    block_s: int = 4
    #: Warps of the chunk kernel (1/2/4/8).
    chunk_warps: int = 4
    #: ``algorithm="auto"`` solves by the tree up to this many rows ``B·n``, and only while a
    #: CUDA graph is being captured: graph-replayed the tree wins up to 1024 rows (no chain);
    #: eager, its ``⌈log₂(n/C)⌉ + 1`` launches cost more than its shorter chain saves.
    tree_max_rows: int = 1024
    #: Tree: row tile of the level updates (16/32/64, at most ``2C``).
    tree_rows: int = 32
    #: Tree: column tile of the level updates and of the first level's pair kernel (16/32/64).
    tree_cols: int = 32
    #: Tree: tile of the ``M = M₁ + M₂ − G₂ M₁`` combines (16/32/64).
    tree_gram_block: int = 32
    #: Tree: warps of its kernels (1/2/4/8).
    tree_warps: int = 4
    #: Scan: column tile of the group kernel (16/32/64). 16: the group step is latency-bound,
    #: and narrow tiles give more independent programs.
    scan_block: int = 16
    #: Scan: warps of the group kernel (1/2/4/8).
    scan_warps: int = 4
    #: Scan: the group kernel keeps its ``d×BF`` state as at most this many slices of ≥ 16 rows
    #: (1/2/4/8) and contracts over them with batched dots: that many short independent chains
    #: of tensor-core products instead of one long one.
    scan_slices: int = 4
    #: Scan: the cost of a state step in group steps (> 0); it sets how fast the groups grow
    #: (:func:`matfn.triangular.schedule.chain_schedule`); measured (docs/benchmarks.md).
    scan_ratio: float = 1.4
    #: Scan: the fused form keeps one group-kernel program per SM, which leaves
    #: ``SMs // programs per group`` groups; below this many (batched inputs) the unfused form
    #: runs, since a fused program that shares its SM steps ≈ 1.7× slower.
    min_groups_per_wave: int = 6
    #: Scan: column tile of the state scan and of the fused corrections (16/32/64).
    state_block: int = 32
    #: Scan, unfused: warps of the state kernel (1/2/4/8).
    state_warps: int = 8

    def __post_init__(self) -> None:
        _check_chunk(self.chunk_size, self.block_s)
        if self.tree_rows not in _TILES or self.tree_rows > 2 * self.chunk_size:
            raise ValueError(
                f"tree_rows must be 16/32/64 and ≤ 2·chunk_size, got {self.tree_rows} "
                f"(chunk_size = {self.chunk_size})"
            )
        for name in ("tree_cols", "tree_gram_block", "scan_block", "state_block"):
            _check_in(name, getattr(self, name), _TILES)
        for name in ("chunk_warps", "tree_warps", "scan_warps", "state_warps"):
            _check_in(name, getattr(self, name), _WARPS)
        _check_in("scan_slices", self.scan_slices, (1, 2, 4, 8))
        ratio = self.scan_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not ratio > 0:
            raise ValueError(f"scan_ratio must be a positive number, got {ratio!r}")
        if self.tree_max_rows < 0 or self.min_groups_per_wave < 1:
            raise ValueError("tree_max_rows must be ≥ 0 and min_groups_per_wave ≥ 1")
        # Triton 3.6 on the H100: a tensor-core dot of a 64-row tile by a 16-column tile in a
        # kernel of 8 warps returned wrong results (0.6 relative error; 4 warps, 32 columns or
        # 32-row chunks are right), so these shapes are refused
        if self.tree_cols == 16 and self.tree_warps == 8:
            raise ValueError(
                "tree_cols=16 with 8 tree warps gives wrong tensor-core products on the H100 "
                "with Triton 3.6; use tree_cols ≥ 32 or tree_warps ≤ 4"
            )
        if self.chunk_size >= 64 and self.scan_block == 16 and self.scan_warps == 8:
            raise ValueError(
                "chunk_size=64 with scan_block=16 and 8 scan warps gives wrong tensor-core "
                "products on the H100 with Triton 3.6; use scan_block=32 or scan_warps=4"
            )


@dataclass(frozen=True)
class TriDecayConfig:
    """How the decayed kernels of :mod:`matfn.triangular.decay` run (solve and causal product)."""

    #: Rows ``C`` of a chunk (16/32/64): the state pass is a chain of ``n/C`` dependent steps,
    #: so the largest chunk; the chunk kernel inverts it in parallel over all chunks.
    chunk_size: int = 64
    #: Rows of the chunk kernel's diagonal blocks before doubling (as :class:`TriInvConfig`).
    block_s: int = 16
    #: Warps of the chunk kernel (1/2/4/8). 8: the 64×64 inverse and the ``C×d`` products
    #: of 3xTF32 splits need the registers (sm90 ahead-of-time compile: 4 warps spill twice
    #: as much).
    chunk_warps: int = 8
    #: Channels of ``Q, K`` per slab of the chunk kernel's block ``A`` (16/32/64). 16: the
    #: fewest spills.
    slab: int = 16
    #: Columns of ``V`` per program of the state pass (16/32/64).
    state_block: int = 32
    #: Warps of the state pass (1/2/4/8). 8: its ``C×d`` tile of ``P`` spills at 4.
    state_warps: int = 8
    #: Channels of ``W`` per program of the causal product (16/32/64).
    product_block: int = 32
    #: Warps of the causal product (1/2/4/8), 8 as the state pass.
    product_warps: int = 8

    def __post_init__(self) -> None:
        _check_chunk(self.chunk_size, self.block_s)
        for name in ("slab", "state_block", "product_block"):
            _check_in(name, getattr(self, name), _TILES)
        for name in ("chunk_warps", "state_warps", "product_warps"):
            _check_in(name, getattr(self, name), _WARPS)


TRI_INV_CONFIG = TriInvConfig()
TRI_SOLVE_CONFIG = TriSolveConfig()
TRI_DECAY_CONFIG = TriDecayConfig()


def kernel_chunk(chunk_size: int, largest: int) -> int:
    """The kernels' chunk for a requested ``chunk_size``: a power of two in ``[16, largest]``.

    The kernels' tiles are powers of two of at least 16 rows (``tl.dot``); a request is rounded
    up to one, and capped at the config's chunk.
    """
    c = 1 << max(0, (chunk_size - 1).bit_length())
    return min(largest, max(16, c))


@functools.lru_cache(maxsize=16)
def inv_config(chunk_size: int) -> TriInvConfig:
    """:data:`TRI_INV_CONFIG` with the kernel chunk for a requested ``chunk_size``."""
    C = kernel_chunk(chunk_size, TRI_INV_CONFIG.chunk_size)
    base = TRI_INV_CONFIG
    return base if C == base.chunk_size else replace(base, chunk_size=C)


@functools.lru_cache(maxsize=16)
def solve_config(chunk_size: int) -> TriSolveConfig:
    """:data:`TRI_SOLVE_CONFIG` with the kernel chunk for a requested ``chunk_size``."""
    base = TRI_SOLVE_CONFIG
    C = kernel_chunk(chunk_size, base.chunk_size)
    if C == base.chunk_size:
        return base
    return replace(base, chunk_size=C, tree_rows=min(base.tree_rows, 2 * C))


@functools.lru_cache(maxsize=16)
def decay_config(chunk_size: int) -> TriDecayConfig:
    """:data:`TRI_DECAY_CONFIG` with the kernel chunk for a requested ``chunk_size``."""
    base = TRI_DECAY_CONFIG
    C = kernel_chunk(chunk_size, base.chunk_size)
    if C == base.chunk_size:
        return base
    return replace(base, chunk_size=C, block_s=min(base.block_s, C))
