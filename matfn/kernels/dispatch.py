"""Kernel dispatch: Triton on CUDA tensors, the torch reference path everywhere else.

Importing this module never imports Triton; :func:`use_triton` probes it lazily once and the
kernel modules are imported on the first CUDA call.

Newton–Schulz entry points (each picks the Triton kernels of :mod:`matfn.kernels.ns_step` for
large bf16/fp16 CUDA batches, the folded step ``(B + aI) X`` — cuBLAS ``X Xᵀ`` and last product,
``cA² + bA + aI`` in a Triton epilogue for larger batches — for the other bf16/fp16 CUDA batches,
bf16 ones iterated in fp16 on both (:func:`iteration_dtype`), and the torch twins of
:mod:`matfn.msign` otherwise, e.g. on CPU, in float32/float64, or with ``MATFN_DISABLE_TRITON=1``):
:func:`ns_step`, :func:`newton_schulz`, :func:`gram_newton_schulz`, :func:`sign_step` (general
square, for mcsgn) and :func:`newton_schulz_grouped` (a list of matrices of mixed shapes).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from .._backend import triton_available, use_triton
from .recording import recording

__all__ = [
    "triton_available",
    "use_triton",
    "gpu_bound",
    "kernels_apply",
    "fused_update_applies",
    "gram_accurate",
    "ns_step",
    "newton_schulz",
    "gram_newton_schulz",
    "sign_step",
    "newton_schulz_grouped",
    "GRAM_HALF_DTYPE",
    "FOLDED_HALF_DTYPE",
    "TRITON_HALF_DTYPE",
    "MIN_TMA_BATCH_WORK",
    "GROUPED_MIN_SHAPES",
    "MIXED_UPDATE",
    "FOLD_LAUNCH_BOUND",
    "iteration_dtype",
    "cast",
    "GROUPED_LAUNCH",
    "switches",
]

Coefficients = tuple[float, float, float]

#: The Gram path iterates bf16 batches in this dtype:
#: R = X Xᵀ has entries in [−1, 1] and its fp16 rounding is 8× finer than bf16's (math spec
#: §1.3(f); the gram-newton-schulz project does the same). See docs/benchmarks.md for the
#: measured accuracy.
GRAM_HALF_DTYPE = torch.float16
_KERNEL_DTYPES = (torch.bfloat16, torch.float16)
#: Smallest problem (``batch · s² · L`` multiply-adds per product) sent to the Triton kernels.
#: Below it the Python launch overhead of Triton (about 50 µs a launch measured on the H100
#: host, against a few µs for a cuBLAS call) outweighs the halved symmetric products, so cuBLAS
#: through the torch path is faster: 1024² took 1.09 ms with the kernels against 0.30 ms.
MIN_TRITON_WORK = 2**34
#: Smallest short side ``s`` sent to the Triton kernels. Batches of many small matrices are
#: launch-bound too: GPT-2-small's Muon step (48 × 768² and 24 × 768×3072, above
#: MIN_TRITON_WORK) measured 7.29 ms with the kernels and 6.68 ms with cuBLAS on the H100, while a
#: single 4096² ran 3.11 ms with the kernels against 3.43 ms with cuBLAS (docs/benchmarks.md).
MIN_TRITON_SIDE = 2048
#: Batches with a short side below :data:`MIN_TRITON_SIDE` still take the Triton kernels from
#: this many multiply-adds per product on GPUs where they load by TMA (compute capability ≥ 9,
#: :mod:`matfn.kernels.matmul_tma`): the TMA symmetric products beat cuBLAS there (1.3× for
#: 128×768×2048's ``X Xᵀ``), and each launch's GPU time covers its larger host time (about
#: 0.15 ms on the H100 host). Measured end to end on the H100 (docs/benchmarks.md): 128 ×
#: 768×2048 (2³⁷·²) 6.86 ms against 7.92 on the folded cuBLAS path; 24 × 768×3072 (2³⁵·³) 1.90
#: against 2.10 eager, 48 × 768² (2³⁴·³) 3.02 against 1.49 (host-bound) — kept below.
MIN_TMA_BATCH_WORK = 2**36


def gpu_bound(X: torch.Tensor) -> bool:
    """Whether ``X (B, s, L)`` has at least :data:`MIN_TRITON_WORK` multiply-adds per product.

    Below it a CUDA Newton–Schulz run is bound by launches, not by the products.
    """
    s, L = sorted(X.shape[-2:])
    return X[..., :1, :1].numel() * s * s * L >= MIN_TRITON_WORK


def _kernel_batch(X: torch.Tensor) -> bool:
    """CUDA, bf16/fp16, Triton on, and :func:`gpu_bound`: the Triton products may run."""
    return X.dtype in _KERNEL_DTYPES and use_triton(X) and gpu_bound(X)


def _tma_batch(X: torch.Tensor) -> bool:
    """At least :data:`MIN_TMA_BATCH_WORK` multiply-adds per product, and TMA-loaded kernels.

    Any size while a CUDA graph records the launches (:mod:`matfn.kernels.recording`). TMA
    needs compute capability ≥ 9 and 16-byte rows: both sides a multiple of 8 (the iterates are
    dense, so every operand's strides then are).
    """
    s, L = sorted(X.shape[-2:])
    if s % 8 or L % 8:
        return False
    if X[..., :1, :1].numel() * s * s * L < MIN_TMA_BATCH_WORK and not recording():
        return False
    from . import gram

    return gram.TMA != "never" and gram._capability(X.device.index)[0] >= 9


def kernels_apply(X: torch.Tensor) -> bool:
    """Whether the Newton–Schulz Triton kernels run for ``X (B, s, L)``.

    CUDA, bf16/fp16, Triton on, at least :data:`MIN_TRITON_WORK` multiply-adds per product and
    a short side of at least :data:`MIN_TRITON_SIDE`, or :data:`MIN_TMA_BATCH_WORK`
    multiply-adds on a GPU where the kernels load by TMA. While a CUDA graph records the
    launches (:mod:`matfn.kernels.recording`), launch cost is no reason to avoid them: every
    batch the TMA kernels can load takes them.
    """
    if recording() and X.dtype in _KERNEL_DTYPES and use_triton(X) and _tma_batch(X):
        return True
    return _kernel_batch(X) and (min(X.shape[-2:]) >= MIN_TRITON_SIDE or _tma_batch(X))


def fused_update_applies(X: torch.Tensor) -> bool:
    """Whether the mixed path runs for ``X (B, s, L)`` (its last product: :data:`MIXED_UPDATE`).

    For GPU-bound batches of matrices with a short side below :data:`MIN_TRITON_SIDE` (Muon's
    buckets): cuBLAS is faster for ``X Xᵀ`` and ``cA² + bA`` there, but ``baddbmm`` first copies
    X into its output, and the Triton product with the ``+ aX`` epilogue measured 0.70–0.78× of
    cuBLAS's time for that last product (48×768², 24×768×3072, 64×512² on the H100; see
    docs/benchmarks.md, "Per product"), unless the batch takes the Triton kernels
    (:func:`kernels_apply`).
    """
    return _kernel_batch(X) and min(X.shape[-2:]) < MIN_TRITON_SIDE and not _tma_batch(X)


def gram_accurate(X: torch.Tensor) -> bool:
    """Whether ``algorithm="auto"`` may pick the Gram path for ``X`` (a hook per dtype/device).

    Always true now: bf16 batches run Gram NS in fp16 (:func:`gram_newton_schulz`), which with
    the restarts of :func:`matfn.msign.gram_restarts` was measured at least as accurate as
    standard bf16 NS (docs/benchmarks.md, "Newton–Schulz kernels"); fp16/fp32/fp64 iterate in
    their own dtype with the same restarts.
    """
    return True


#: The last product ``X ← B X + a X`` of the mixed path (:func:`fused_update_applies`):
#: ``"triton"`` (the fused ``+ aX`` epilogue) or ``"folded"`` (cuBLAS ``(B + aI) X``,
#: :func:`matfn.kernels.ns_step.ns_step_folded`).
MIXED_UPDATE = "folded"
#: Whether launch-bound CUDA bf16/fp16 batches (below :func:`gpu_bound`) take the folded
#: cuBLAS step instead of the torch reference's ``baddbmm`` (which copies X first).
FOLD_LAUNCH_BOUND = True


#: bf16 batches on the folded path iterate in this dtype (None: in bf16). Folding rounds
#: ``a + B_ii`` to the iteration dtype; in bf16 that measured 1.1–1.3× the relative error of the
#: torch path (docs/benchmarks.md), in fp16 (2⁻¹¹, 8× finer) every product is rounded more
#: finely too. Normalised iterates stay within |x| ≤ 1.2 and ``|B| < 100``, far inside fp16's
#: range; the Gram path iterates in fp16 for the same reason (:data:`GRAM_HALF_DTYPE`).
FOLDED_HALF_DTYPE: torch.dtype | None = torch.float16
#: bf16 batches on the Triton path (:func:`kernels_apply`) iterate in this dtype (None: in
#: bf16), for the same reason: the kernels run fp16 and bf16 operands at one speed, and every
#: product rounds 8× more finely (docs/benchmarks.md, "Accuracy").
TRITON_HALF_DTYPE: torch.dtype | None = torch.float16


def iteration_dtype(X: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """The dtype a normalised batch of ``X``'s shape and device in ``dtype`` is iterated in.

    For bf16 batches, :data:`FOLDED_HALF_DTYPE` on the folded step and
    :data:`TRITON_HALF_DTYPE` on the Triton kernels (when set); else ``dtype``. Callers
    normalise straight into it (no extra cast pass) and cast the result back.
    """
    if dtype != torch.bfloat16:
        return dtype
    probe = torch.empty((), dtype=dtype, device=X.device).expand(X.shape)
    return _half_dtype(_step_function(probe)) or dtype


def switches() -> tuple:
    """Every module-level switch that changes which kernels a Newton–Schulz call launches.

    Part of the key of a captured CUDA graph (:mod:`matfn._graphs`, the optimizer's
    :mod:`optim._graphs`): a graph captured under other switches replays other kernels.
    """
    own = (
        os.environ.get("MATFN_DISABLE_TRITON") == "1",
        GRAM_HALF_DTYPE,
        MIN_TRITON_WORK,
        MIN_TRITON_SIDE,
        MIN_TMA_BATCH_WORK,
        MIXED_UPDATE,
        FOLD_LAUNCH_BOUND,
        FOLDED_HALF_DTYPE,
        TRITON_HALF_DTYPE,
        GROUPED_LAUNCH,
        GROUPED_MIN_SHAPES,
    )
    if not triton_available():
        return own
    from . import gram, ns_step

    kernels = (
        gram.TMA,
        gram.TMA_MIN_WORK,
        gram.PDL,
        ns_step.GENERAL_BACKEND,
        ns_step.FOLDED_POLY_BACKEND,
        ns_step.MIN_TRITON_POLY_WORK,
    )
    return own + kernels


def _half_dtype(step) -> torch.dtype | None:
    """The dtype bf16 batches iterate in with ``step`` (None: in bf16)."""
    return {"ns_step_folded": FOLDED_HALF_DTYPE, "ns_step_triton": TRITON_HALF_DTYPE}.get(
        step.__name__
    )


def cast(X: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``X.to(dtype)``; one vectorised Triton pass for contiguous CUDA half-precision tensors."""
    if X.dtype != dtype and dtype in _KERNEL_DTYPES and X.dtype in _KERNEL_DTYPES and use_triton(X):
        from .elementwise import cast as cast_triton

        return cast_triton(X, dtype)
    return X.to(dtype)


#: Whether :func:`newton_schulz_grouped` may run lists of mixed shapes on the grouped kernel
#: (:mod:`matfn.kernels.grouped`: three launches per step for all shapes) instead of one
#: stacked batch per shape; it does when they have at least :data:`GROUPED_MIN_SHAPES` distinct
#: shapes. H100, 5 bf16 steps, graph-replayed (docs/benchmarks.md): 16 shapes (2 each,
#: 128…1088 × 2048) 2.46 ms against 2.69 stacked; 4 shapes 0.70 against 0.54 and 2 shapes
#: (GPT-2) 5.07 against 3.59. Eager, the grouped path's per-group host work adds more.
GROUPED_LAUNCH = True
GROUPED_MIN_SHAPES = 16


def _step_function(X: torch.Tensor):
    """The one-step function for ``X``: Triton, mixed, folded cuBLAS or the torch reference."""
    if kernels_apply(X):
        from .ns_step import ns_step_triton

        return ns_step_triton
    if fused_update_applies(X):
        from .ns_step import ns_step_folded, ns_step_fused_update

        return ns_step_fused_update if MIXED_UPDATE == "triton" else ns_step_folded
    if FOLD_LAUNCH_BOUND and X.dtype in _KERNEL_DTYPES and use_triton(X):
        from .ns_step import ns_step_folded

        return ns_step_folded
    from ..msign import ns_step_torch

    return ns_step_torch


def ns_step(X: torch.Tensor, a: float, b: float, c: float) -> torch.Tensor:
    """One Newton–Schulz step ``a X + (b A + c A²) X``, ``A = X Xᵀ``, ``X (B, s, L)``, s ≤ L."""
    return _step_function(X)(X, a, b, c)


def newton_schulz(
    X: torch.Tensor, coeffs: Sequence[Coefficients], out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The standard iteration on a normalised wide batch ``(B, s, L)``.

    The result is in ``out_dtype`` (default X's dtype); on the Triton path the last product's
    epilogue writes it directly (no cast pass).
    """
    step = _step_function(X)
    out_dtype = out_dtype or X.dtype
    half = _half_dtype(step) if X.dtype == torch.bfloat16 else None
    if half:
        X = X.to(half)  # what iteration_dtype(X, bf16) says for this step
    if not coeffs:
        return cast(X, out_dtype)
    *body, last = coeffs
    for a, b, c in body:
        X = step(X, a, b, c)
    if step.__name__ == "ns_step_triton":
        return step(X, *last, out_dtype=out_dtype)
    return cast(step(X, *last), out_dtype)


def gram_newton_schulz(
    X: torch.Tensor,
    coeffs: Sequence[Coefficients],
    restarts: Sequence[int] | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Gram Newton–Schulz on a normalised wide batch; bf16 batches iterate in fp16.

    bf16 Gram NS is not stable (R ← Z R Z compounds bf16's 2⁻⁸ rounding: σ up to 11 after 8
    Polar-Express steps on a 32×96 input); :data:`GRAM_HALF_DTYPE` (fp16, 8× finer, ample range
    for the normalised R) is, on every device. The result is in ``out_dtype`` (default X's
    dtype), written by the last product's epilogue on the Triton path.
    """
    from ..msign import gram_newton_schulz_torch, gram_restarts

    coeffs = list(coeffs)
    restarts = tuple(gram_restarts(coeffs) if restarts is None else restarts)
    out_dtype = out_dtype or X.dtype
    if X.dtype == torch.bfloat16:
        X = X.to(GRAM_HALF_DTYPE)
    if kernels_apply(X):
        from .ns_step import gram_newton_schulz_triton

        return gram_newton_schulz_triton(X, coeffs, restarts, out_dtype=out_dtype)
    return gram_newton_schulz_torch(X, coeffs, restarts).to(out_dtype)


def sign_step(X: torch.Tensor, a: float, b: float, c: float) -> torch.Tensor:
    """One matrix-sign step ``a X + (b X² + c X⁴) X`` for square ``X (B, N, N)`` (mcsgn)."""
    if kernels_apply(X):
        from .ns_step import sign_step_triton

        return sign_step_triton(X, a, b, c)
    from ..mcsgn import sign_step_torch

    return sign_step_torch(X, a, b, c)


def _recast(Xs: Sequence[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """``[X.to(dtype) for X in Xs]`` in two launches (a concatenation and a cast).

    Not one launch per matrix: the grouped path's lists are long and its launches host-bound.
    """
    flat = torch.cat([X.reshape(-1) for X in Xs]).to(dtype)
    parts = flat.split([X.numel() for X in Xs])
    return [p.view(X.shape) for p, X in zip(parts, Xs, strict=True)]


def newton_schulz_grouped(
    Xs: Sequence[torch.Tensor], coeffs: Sequence[Coefficients], algorithm: str = "auto"
) -> list[torch.Tensor]:
    """Run the iteration on many normalised wide matrices ``(s_i, L_i)`` of mixed shapes.

    Matrices of one shape (and dtype/device) are stacked and run as one batch, so each product
    is one launch per distinct shape; results come back in input order. With
    :data:`GROUPED_LAUNCH` (CUDA, bf16/fp16, standard algorithm) every product is instead one
    grouped launch for all shapes once there are :data:`GROUPED_MIN_SHAPES` distinct shapes;
    bf16 matrices then iterate in :data:`FOLDED_HALF_DTYPE` as the stacked folded step does.
    """
    from ..msign import run_newton_schulz

    if (
        GROUPED_LAUNCH
        and algorithm in ("auto", "standard")
        and len({tuple(X.shape) for X in Xs}) >= GROUPED_MIN_SHAPES
        and len({X.dtype for X in Xs}) == 1
        and Xs[0].dtype in _KERNEL_DTYPES
        and use_triton(*Xs)
    ):
        from .grouped import newton_schulz_grouped_launch

        dtype = Xs[0].dtype
        if dtype != torch.bfloat16 or not FOLDED_HALF_DTYPE:
            return newton_schulz_grouped_launch(Xs, coeffs)
        return _recast(newton_schulz_grouped_launch(_recast(Xs, FOLDED_HALF_DTYPE), coeffs), dtype)
    groups: dict[tuple, list[int]] = {}
    for i, X in enumerate(Xs):
        groups.setdefault((tuple(X.shape), X.dtype, X.device), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(Xs)
    for idx in groups.values():
        batch = torch.stack([Xs[i] for i in idx])
        res = run_newton_schulz(batch, list(coeffs), algorithm)
        for j, i in enumerate(idx):
            out[i] = res[j]
    return out  # type: ignore[return-value]
