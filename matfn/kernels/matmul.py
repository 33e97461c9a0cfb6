r"""Triton matrix products for the Newton–Schulz family (batched, fused epilogue).

One kernel, two tilings:

* **symmetric** (``SYMMETRIC=True``, :func:`gram_triton` and ``matmul_triton(...,
  symmetric=True)``): the output ``C = α A B + β D + γ I`` is known to be symmetric (``X Xᵀ``,
  ``A²`` of a symmetric A, products of commuting polynomials in a Gram matrix). Only the
  lower-triangle tiles ``i ≥ j`` are computed; each off-diagonal tile is stored twice, at
  ``(i, j)`` and transposed at ``(j, i)``. That halves the FLOPs of the product.
* **general**: every tile, grouped ("super-grouped") tile order for L2 reuse.

The epilogue ``α·acc + β·D + γ·I`` runs in float32 on the accumulator before the single store,
so ``bA + cA²`` and ``aX + BX`` cost no extra pass through memory. Operands are bf16/fp16 (fp32
works, with IEEE-exact dots); accumulation is float32. A batch ``(Bt, M, K) @ (Bt, K, N)`` is
one launch: the batch index and the tile index share grid axis 0 (no 65535 limit), and the
batch offset is 64-bit (offsets inside one matrix are 32-bit: up to 2³¹ elements a matrix).
Every operand is addressed through its strides, so ``X.mT`` views need no copy; a batch stride
of 0 broadcasts.

On GPUs of compute capability ≥ 9 large products load by TMA (:mod:`matfn.kernels.matmul_tma`)
and short ones use programmatic dependent launch; the rules are :data:`matfn._backend.MATMUL`.
The torch twins are in :mod:`matfn.msign.reference`. Importing this module imports Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph

from .. import _backend
from ._tiles import _store_lower_and_mirror, _tile_coords
from .launch import INTERPRET, use_pdl
from .launch import capability as _capability
from .launch import pdl_flags as _pdl_flags
from .launch import wait_for_previous_launch as _wait_for_previous_launch
from .matmul_tma import _mm_tma_kernel, launch_tma, set_block_shapes, tma_applies
from .recording import recording

__all__ = ["INTERPRET", "gram_triton", "matmul_triton"]


@triton.jit
def _mm_kernel(
    a_ptr,
    b_ptr,
    d_ptr,
    c_ptr,
    M,
    N,
    K,
    BATCH,
    stride_ab,
    stride_am,
    stride_ak,
    stride_bb,
    stride_bk,
    stride_bn,
    stride_db,
    stride_dm,
    stride_dn,
    stride_cb,
    stride_cm,
    stride_cn,
    alpha,
    beta,
    gamma,
    SYMMETRIC: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_DIAG: tl.constexpr,
    IEEE: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    # Symmetric results with square tiles launch only the lower triangle of tiles; with
    # rectangular tiles (wider ones run faster) the full grid is launched and tiles lying wholly
    # above the diagonal skip their K loop and store nothing.
    TRIANGLE = SYMMETRIC and BLOCK_M == BLOCK_N
    num_m = tl.cdiv(M, BLOCK_M)
    if TRIANGLE:
        tiles = num_m * (num_m + 1) // 2
    else:
        tiles = num_m * tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    bid = (pid // tiles).to(tl.int64)
    pid_m, pid_n = _tile_coords(pid % tiles, M, N, BLOCK_M, BLOCK_N, GROUP_M, TRIANGLE)
    k_tiles = tl.cdiv(K, BLOCK_K)
    if SYMMETRIC and not TRIANGLE:
        # A tile wholly above the diagonal skips its K loop; the `rm ≥ rn` store masks below
        # keep it from storing anything.
        k_tiles = tl.where(pid_n * BLOCK_N <= pid_m * BLOCK_M + BLOCK_M - 1, k_tiles, 0)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Out-of-range rows/columns wrap to valid ones (their results are never stored), so the
    # operand loads need no M/N mask.
    am = tl.max_contiguous(tl.multiple_of(rm % M, BLOCK_M), BLOCK_M)
    bn = tl.max_contiguous(tl.multiple_of(rn % N, BLOCK_N), BLOCK_N)
    a_ptrs = a_ptr + bid * stride_ab + am[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + bid * stride_bb + rk[:, None] * stride_bk + bn[None, :] * stride_bn

    _wait_for_previous_launch(USE_PDL)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, k_tiles):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=rk[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=rk[:, None] < k_left, other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    out = acc * alpha
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if SYMMETRIC:  # D is symmetric: only its lower part is read (_store_lower_and_mirror)
        mask = mask & (rm[:, None] >= rn[None, :])
    if HAS_D:
        d_ptrs = d_ptr + bid * stride_db + rm[:, None] * stride_dm + rn[None, :] * stride_dn
        out += beta * tl.load(d_ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_DIAG:
        out += tl.where(rm[:, None] == rn[None, :], gamma, 0.0)
    out = out.to(c_ptr.dtype.element_ty)
    c_base = c_ptr + bid * stride_cb
    if SYMMETRIC:
        _store_lower_and_mirror(c_base, out, rm, rn, M, N, stride_cm, stride_cn)
    else:
        tl.store(c_base + rm[:, None] * stride_cm + rn[None, :] * stride_cn, out, mask=mask)


def _config(bm: int, bn: int, bk: int, stages: int, warps: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
        num_stages=stages,
        num_warps=warps,
    )


# Short Hopper lists (H100/H200, bf16); small tiles keep small matrices from running on a few
# SMs. Symmetric results take square tiles (triangle grid); the kernel also runs rectangular
# symmetric tiles (full grid, upper tiles idle), which the TMA lists use.
_SYMMETRIC_CONFIGS = [
    _config(128, 128, 64, 4, 8),
    _config(128, 128, 64, 3, 4),
    _config(64, 64, 64, 4, 4),
]
_GENERAL_CONFIGS = [
    _config(128, 256, 64, 3, 8),
    _config(128, 128, 64, 4, 8),
    _config(64, 128, 64, 4, 4),
    _config(64, 64, 64, 4, 4),
]


def _tma_config(
    bm: int, bn: int, bk: int, stages: int, warps: int, persistent: bool = False
) -> triton.Config:
    config = _config(bm, bn, bk, stages, warps)
    # persistent: one program per SM, each looping over tiles (matmul_tma's PROGRAMS)
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    config.kwargs["PROGRAMS"] = sms if persistent else 0
    config.pre_hook = set_block_shapes
    return config


# TMA lists (bm, bn, bk, stages, warps, persistent), from the per-config timings of
# docs/benchmarks.md (H100): square symmetric tiles (triangle grid) win up to 4096 rows (5 stages
# for long products), 128×256 ones (full grid, the tiles above the diagonal return at once) at
# 8192; the general product prefers 128×256 tiles, persistent. Persistent 128×256 symmetric tiles
# need more shared memory than the H100 has and are left out. Small products (1024², launch-free
# under a CUDA graph) run best on 64×64 symmetric / 64×128 general tiles.
_TMA_SYMMETRIC_BLOCKS = [
    (128, 128, 64, 4, 8, False),
    (128, 128, 64, 5, 8, False),
    (128, 128, 64, 4, 8, True),
    (128, 128, 64, 3, 4, False),
    (128, 256, 64, 3, 8, False),
    (256, 128, 64, 3, 8, False),
    (64, 64, 64, 4, 4, False),
]
_TMA_GENERAL_BLOCKS = [
    (128, 256, 64, 3, 8, True),
    (128, 256, 64, 3, 8, False),
    (256, 128, 64, 3, 8, False),
    (128, 128, 64, 4, 8, False),
    (64, 128, 64, 4, 4, False),
]


def _prune(configs, named_args, **kwargs):
    # Tiles far larger than the matrix only waste work: keep those that fit (or the smallest).
    m, n = named_args["M"], named_args["N"]
    fit = [
        c
        for c in configs
        if c.kwargs["BLOCK_M"] <= max(m, 64) and c.kwargs["BLOCK_N"] <= max(n, 64)
    ]
    return fit or configs[-1:]


def _graph_bench(kernel_call, quantiles):
    """The autotuner's timer: GPU time of CUDA-graph replays.

    Why: Triton's default times each eager call between CUDA events, so a launch's host time
    counts wherever it exceeds the cache flush before it, and that noise picks slower configs.
    """
    return do_bench_cudagraph(kernel_call, rep=25, quantiles=quantiles)


_mm_heuristic = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})(
    _mm_kernel
)
_KEY = ["M", "N", "K", "BATCH", "SYMMETRIC", "HAS_D"]
_TUNING = {"prune_configs_by": {"early_config_prune": _prune}, "do_bench": _graph_bench}
_sym_tuned = triton.autotune(_SYMMETRIC_CONFIGS, key=_KEY, **_TUNING)(_mm_heuristic)
_gen_tuned = triton.autotune(_GENERAL_CONFIGS, key=_KEY, **_TUNING)(_mm_heuristic)
_tma_tuned: dict[bool, object] = {}  # symmetric → autotuned TMA kernel, built on first use


def _tma_prune(configs, named_args, **kwargs):
    # the autotuner passes positional arguments in named_args, keyword ones (the flags) apart
    if kwargs.get("SYMMETRIC", named_args.get("SYMMETRIC")):
        wide = named_args["M"] >= _backend.MATMUL.tma_wide_symmetric_rows
        configs = [c for c in configs if (c.kwargs["BLOCK_M"] != c.kwargs["BLOCK_N"]) == wide]
    return _prune(configs, named_args)


def _tma_kernel(symmetric: bool):
    if symmetric not in _tma_tuned:
        blocks = _TMA_SYMMETRIC_BLOCKS if symmetric else _TMA_GENERAL_BLOCKS
        key = ["M", "N", "K", "BATCH", "SYMMETRIC", "HAS_D", "A_T", "B_T"]
        _tma_tuned[symmetric] = triton.autotune(
            [_tma_config(*b) for b in blocks],
            key=key,
            prune_configs_by={"early_config_prune": _tma_prune},
            do_bench=_graph_bench,
        )(_mm_tma_kernel)
    return _tma_tuned[symmetric]


def _use_tma(A: torch.Tensor, B: torch.Tensor, D: torch.Tensor | None, out: torch.Tensor) -> bool:
    """Whether this product takes :mod:`matfn.kernels.matmul_tma` (:attr:`MatmulConfig.tma`)."""
    config = _backend.MATMUL
    if config.tma == "never":
        return False
    work = A.shape[0] * A.shape[1] * A.shape[2] * B.shape[2]
    small = work < config.tma_min_work and not recording()
    if config.tma == "auto" and (
        INTERPRET or not A.is_cuda or small or _capability(A.device.index)[0] < 9
    ):
        return False
    return tma_applies(A, B, D, out)


#: Autotuned config per problem (shape, batch, flags, dtypes), filled on first use.
_BEST_CONFIG: dict[tuple, triton.Config] = {}

#: Fixed tiles under the CPU interpreter (no autotuning there); 16 is tl.dot's minimum.
INTERPRET_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}


def _grid_size(M: int, N: int, batch: int, bm: int, bn: int, symmetric: bool) -> int:
    if symmetric and bm == bn:
        t = triton.cdiv(M, bm)
        return batch * (t * (t + 1) // 2)
    return batch * triton.cdiv(M, bm) * triton.cdiv(N, bn)


def _grid(M: int, N: int, batch: int, symmetric: bool):
    """The launch grid as a function of the meta-parameters.

    One program per tile, or ``PROGRAMS`` persistent ones (TMA kernel) when fewer.
    """

    def grid(meta: dict) -> tuple[int]:
        tiles = _grid_size(M, N, batch, meta["BLOCK_M"], meta["BLOCK_N"], symmetric)
        return (min(tiles, meta.get("PROGRAMS") or tiles),)

    return grid


def _launch_tuned(key: tuple, kernel, launch_autotuned, launch_config) -> None:
    """Autotune ``kernel`` on the first call for ``key``, then launch the chosen config directly.

    The autotuner's per-call Python (key, cache lookup, config merge) is a large part of a
    launch's host time at Muon's sizes, hence the cache in :data:`_BEST_CONFIG`.
    """
    best = _BEST_CONFIG.get(key)
    if best is not None:
        launch_config(best)
        return
    launch_autotuned(kernel)
    if getattr(kernel, "best_config", None) is not None:
        _BEST_CONFIG[key] = kernel.best_config


def _launch(
    A: torch.Tensor,
    B: torch.Tensor,
    D: torch.Tensor | None,
    out: torch.Tensor,
    alpha: float,
    beta: float,
    gamma: float,
    symmetric: bool,
) -> torch.Tensor:
    batch, M, K = A.shape
    N = B.shape[-1]
    if batch == 0 or M == 0 or N == 0:
        return out
    if K == 0:
        # Empty inner dimension: the product is zero, only the epilogue remains.
        res = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
        if D is not None:
            res += beta * D.float()
        if gamma:
            res.diagonal(dim1=-2, dim2=-1).add_(gamma)
        return out.copy_(res)
    grid = _grid(M, N, batch, symmetric)
    key = (symmetric, M, N, K, batch, D is not None, A.dtype, out.dtype)
    pdl = _pdl(A, tiles=batch * triton.cdiv(M, 128) * triton.cdiv(N, 128))
    if _use_tma(A, B, D, out):
        tma_args = (A, B, D, out, alpha, beta, gamma, symmetric, grid)
        if INTERPRET:
            launch_tma(*tma_args, config=INTERPRET_BLOCKS)
            return out
        _launch_tuned(
            ("tma", A.stride(), B.stride(), *key),
            _tma_kernel(symmetric),
            lambda kernel: launch_tma(*tma_args, kernel=kernel, pdl=pdl),
            lambda best: launch_tma(*tma_args, config=best.all_kwargs(), pdl=pdl),
        )
        return out
    d = D if D is not None else out
    args = (
        A,
        B,
        d,
        out,
        M,
        N,
        K,
        batch,
        *A.stride(),
        *B.stride(),
        *d.stride(),
        *out.stride(),
        float(alpha),
        float(beta),
        float(gamma),
    )
    flags = dict(
        SYMMETRIC=symmetric,
        HAS_D=D is not None,
        HAS_DIAG=gamma != 0,
        IEEE=A.dtype == torch.float32,
        **_pdl_flags(pdl),
    )
    if INTERPRET:
        _mm_heuristic[grid(INTERPRET_BLOCKS)](*args, **flags, **INTERPRET_BLOCKS)
        return out
    _launch_tuned(
        key,
        _sym_tuned if symmetric else _gen_tuned,
        lambda kernel: kernel[grid](*args, **flags),
        lambda best: _mm_heuristic[grid(best.kwargs)](*args, **flags, **best.all_kwargs()),
    )
    return out


def _pdl(A: torch.Tensor, tiles: int) -> bool:
    """Whether a product of ``tiles`` 128×128 tiles uses PDL (:func:`matfn.kernels.launch.use_pdl`).

    At most :attr:`matfn._backend.MatmulConfig.pdl_max_tiles_per_sm` tiles per SM (0: never).
    """
    limit = _backend.MATMUL.pdl_max_tiles_per_sm
    return limit > 0 and use_pdl(A, tiles, limit)


def _check(name: str, T: torch.Tensor) -> None:
    if T.dim() != 3:
        raise ValueError(f"`{name}` must be a 3-D batch (B, n, m), got shape {tuple(T.shape)}")


def _out_like(A: torch.Tensor, M: int, N: int, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty(A.shape[0], M, N, dtype=A.dtype, device=A.device)
    return out


def matmul_triton(
    A: torch.Tensor,
    B: torch.Tensor,
    D: torch.Tensor | None = None,
    *,
    alpha: float = 1.0,
    beta: float = 0.0,
    gamma: float = 0.0,
    symmetric: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""``C = α A B + β D + γ I`` for batches ``A (Bt, M, K)``, ``B (Bt, K, N)``, one launch.

    ``symmetric=True`` promises that the result is symmetric (``M = N``): only the lower
    triangle of tiles is computed and mirrored, half the FLOPs of the product (``M K N`` instead
    of ``2 M K N``). The caller guarantees symmetry (``X Xᵀ``, ``A A`` with A symmetric,
    ``P(R) Q(R)`` for polynomials of one symmetric R); the upper triangle is otherwise the
    transpose of the lower one, not ``A B``. Output dtype = ``A.dtype``; float32 accumulation;
    any strides (views such as ``X.mT`` are read in place).
    """
    _check("A", A)
    _check("B", B)
    if A.shape[0] != B.shape[0] or A.shape[2] != B.shape[1]:
        raise ValueError(f"shapes {tuple(A.shape)} and {tuple(B.shape)} cannot be multiplied")
    M, N = A.shape[1], B.shape[2]
    if symmetric and M != N:
        raise ValueError(f"symmetric=True needs a square result, got {M}×{N}")
    if D is not None:
        _check("D", D)
        D = D.expand(A.shape[0], M, N) if D.shape[0] == 1 else D
        if tuple(D.shape) != (A.shape[0], M, N):
            raise ValueError(f"`D` must have shape {(A.shape[0], M, N)}, got {tuple(D.shape)}")
    out = _out_like(A, M, N, out)
    return _launch(A, B, D, out, alpha, beta, gamma, symmetric)


def gram_triton(
    X: torch.Tensor,
    D: torch.Tensor | None = None,
    *,
    alpha: float = 1.0,
    beta: float = 0.0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Symmetric Gram product ``α X Xᵀ + β D`` of a batch ``X (Bt, s, L)``: lower tiles only.

    Cost ``s² L`` FLOPs (half of ``2 s² L``).
    """
    _check("X", X)
    return matmul_triton(X, X.mT, D, alpha=alpha, beta=beta, symmetric=True, out=out)
