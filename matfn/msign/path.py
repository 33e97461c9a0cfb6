"""The path choice of the Newton–Schulz family: Triton on large CUDA batches, cuBLAS or torch else.

For a normalised wide batch ``X (B, s, L)``, ``s ≤ L``, one step function runs every step
(docs/math.md §1.4; the rules are the fields of :data:`matfn._backend.NEWTON_SCHULZ`):

* **Triton** (:func:`kernels_apply`): bf16/fp16 CUDA batches of at least
  ``min_triton_work`` multiply-adds per product whose short side is at least
  ``min_triton_side``, or of at least ``min_tma_batch_work`` on GPUs whose products load by
  TMA; every batch the TMA kernels can load while a CUDA graph records
  (:mod:`matfn.kernels.recording`). Symmetric products on half the tiles
  (:func:`matfn.msign.triton.ns_step_triton`).
* **folded cuBLAS** (:func:`matfn.msign.triton.ns_step_folded`): every other bf16/fp16 CUDA
  batch: ``(B + aI) X`` saves ``baddbmm``'s copy of X.
* **torch reference** (:func:`matfn.msign.reference.ns_step_torch`): CPU, float32/float64,
  ``MATFN_DISABLE_TRITON=1``.

bf16 batches iterate in fp16 on the Triton and folded paths (:func:`iteration_dtype`); the Gram
path (:func:`gram_newton_schulz`) always does. :func:`sign_step` is mcsgn's general-square step,
:func:`newton_schulz_grouped` runs a list of mixed shapes. The Triton modules are imported on
the first CUDA call through :func:`matfn._backend.triton_module` (``import matfn`` must not
import Triton); the normalisation (:func:`normalize`) and the final cast (:func:`cast`) choose
between one Triton element-wise pass and torch's launches the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .. import _backend
from .._backend import triton_module, use_triton
from ..coefficients import Coefficients
from ..kernels.recording import recording
from .reference import (
    accumulate_dtype,
    gram_newton_schulz_torch,
    gram_restarts,
    ns_step_torch,
    sign_step_torch,
)

__all__ = [
    "gpu_bound",
    "kernels_apply",
    "folded_applies",
    "iteration_dtype",
    "step_function",
    "ns_step",
    "newton_schulz",
    "gram_newton_schulz",
    "sign_step",
    "newton_schulz_grouped",
    "choose_algorithm",
    "run_newton_schulz",
    "normalize",
    "normalize_by",
    "normalize_for_iteration",
    "cast",
]

Step = Callable[..., torch.Tensor]

#: The dtypes the Triton products and the folded step take.
_KERNEL_DTYPES = (torch.bfloat16, torch.float16)


def _work(X: torch.Tensor) -> int:
    """Multiply-adds of one ``X Xᵀ`` of the wide batch ``X (B, s, L)``: ``B · s² · L``."""
    s, L = sorted(X.shape[-2:])
    return X[..., :1, :1].numel() * s * s * L


def gpu_bound(X: torch.Tensor) -> bool:
    """Whether ``X (B, s, L)`` has at least ``min_triton_work`` multiply-adds per product.

    Below it a CUDA Newton–Schulz run is bound by launches, not by the products.
    """
    return _work(X) >= _backend.NEWTON_SCHULZ.min_triton_work


def _kernel_batch(X: torch.Tensor) -> bool:
    """CUDA, bf16/fp16, Triton on, and :func:`gpu_bound`: the Triton products may run."""
    return X.dtype in _KERNEL_DTYPES and use_triton(X) and gpu_bound(X)


def _tma_batch(X: torch.Tensor) -> bool:
    """At least ``min_tma_batch_work`` multiply-adds per product, and TMA-loaded kernels.

    Any size while a CUDA graph records the launches. TMA needs compute capability ≥ 9 and
    16-byte rows: both sides a multiple of 8 (the iterates are dense, so every operand's strides
    then are). Only asked for CUDA batches with Triton on.
    """
    s, L = sorted(X.shape[-2:])
    if s % 8 or L % 8:
        return False
    if _work(X) < _backend.NEWTON_SCHULZ.min_tma_batch_work and not recording():
        return False
    launch = triton_module("kernels.launch")
    return _backend.MATMUL.tma != "never" and launch.capability(X.device.index)[0] >= 9


def kernels_apply(X: torch.Tensor) -> bool:
    """Whether the Newton–Schulz Triton kernels run for ``X (B, s, L)`` (see the module doc)."""
    if recording() and X.dtype in _KERNEL_DTYPES and use_triton(X) and _tma_batch(X):
        return True
    side = min(X.shape[-2:]) >= _backend.NEWTON_SCHULZ.min_triton_side
    return _kernel_batch(X) and (side or _tma_batch(X))


def folded_applies(X: torch.Tensor) -> bool:
    """Whether the folded cuBLAS step runs for ``X``: a bf16/fp16 CUDA batch off the kernels.

    Launch-bound batches take it only with ``fold_launch_bound`` (the shipped default).
    """
    if X.dtype not in _KERNEL_DTYPES or not use_triton(X) or kernels_apply(X):
        return False
    return _kernel_batch(X) or _backend.NEWTON_SCHULZ.fold_launch_bound


def step_function(X: torch.Tensor) -> Step:
    """The one-step function for ``X``: Triton, folded cuBLAS or the torch reference."""
    if kernels_apply(X):
        return triton_module("msign.triton").ns_step_triton
    if folded_applies(X):
        return triton_module("msign.triton").ns_step_folded
    return ns_step_torch


def _half_dtype(step: Step) -> torch.dtype | None:
    """The dtype bf16 batches iterate in with ``step`` (None: in bf16)."""
    config = _backend.NEWTON_SCHULZ
    return {
        "ns_step_folded": config.folded_half_dtype,
        "ns_step_triton": config.triton_half_dtype,
    }.get(step.__name__)


def iteration_dtype(X: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """The dtype a normalised batch of ``X``'s shape and device in ``dtype`` is iterated in.

    For bf16 batches, ``folded_half_dtype`` on the folded step and ``triton_half_dtype`` on the
    Triton kernels (fp16: same speed, every product rounded 8× more finely; docs/math.md
    §1.3(f)); else ``dtype``. Callers normalise straight into it (no extra cast pass) and cast
    the result back.
    """
    if dtype != torch.bfloat16:
        return dtype
    probe = torch.empty((), dtype=dtype, device=X.device).expand(X.shape)
    return _half_dtype(step_function(probe)) or dtype


def cast(X: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``X.to(dtype)``; one vectorised Triton pass for contiguous CUDA half-precision tensors."""
    if X.dtype != dtype and dtype in _KERNEL_DTYPES and X.dtype in _KERNEL_DTYPES and use_triton(X):
        return triton_module("kernels.elementwise").cast(X, dtype)
    return X.to(dtype)


def ns_step(X: torch.Tensor, a: float, b: float, c: float) -> torch.Tensor:
    """One Newton–Schulz step ``a X + (b A + c A²) X``, ``A = X Xᵀ``, ``X (B, s, L)``, s ≤ L."""
    return step_function(X)(X, a, b, c)


def newton_schulz(
    X: torch.Tensor, coeffs: Sequence[Coefficients], out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The standard iteration on a normalised wide batch ``(B, s, L)`` (docs/math.md §1.2).

    The result is in ``out_dtype`` (default X's dtype); on the Triton path the last product's
    epilogue writes it directly (no cast pass).
    """
    step = step_function(X)
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

    bf16 Gram NS is not stable (``R ← Z R Z`` compounds bf16's 2⁻⁸ rounding: σ up to 11 after 8
    Polar-Express steps on a 32×96 input); ``gram_half_dtype`` (fp16, 8× finer, ample range for
    the normalised R) is, on every device (docs/math.md §1.3(f)). The result is in ``out_dtype``
    (default X's dtype), written by the last product's epilogue on the Triton path.
    """
    coeffs = list(coeffs)
    restarts = tuple(gram_restarts(coeffs) if restarts is None else restarts)
    out_dtype = out_dtype or X.dtype
    if X.dtype == torch.bfloat16:
        X = X.to(_backend.NEWTON_SCHULZ.gram_half_dtype)
    if kernels_apply(X):
        launch = triton_module("msign.triton").gram_newton_schulz_triton
        return launch(X, coeffs, restarts, out_dtype=out_dtype)
    return gram_newton_schulz_torch(X, coeffs, restarts).to(out_dtype)


def sign_step(X: torch.Tensor, a: float, b: float, c: float) -> torch.Tensor:
    """One matrix-sign step ``a X + (b X² + c X⁴) X`` for square ``X (B, N, N)`` (mcsgn)."""
    if kernels_apply(X):
        return triton_module("msign.triton").sign_step_triton(X, a, b, c)
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
    is one launch per distinct shape; results come back in input order. With ``grouped_launch``
    (CUDA, bf16/fp16, standard algorithm) every product is instead one grouped launch for all
    shapes (:mod:`matfn.msign.grouped`) once there are ``grouped_min_shapes`` distinct shapes;
    bf16 matrices then iterate in ``folded_half_dtype`` as the stacked folded step does.
    """
    config = _backend.NEWTON_SCHULZ
    if (
        config.grouped_launch
        and algorithm in ("auto", "standard")
        and len({tuple(X.shape) for X in Xs}) >= config.grouped_min_shapes
        and len({X.dtype for X in Xs}) == 1
        and Xs[0].dtype in _KERNEL_DTYPES
        and use_triton(*Xs)
    ):
        launch = triton_module("msign.grouped").newton_schulz_grouped_launch
        dtype = Xs[0].dtype
        half = config.folded_half_dtype
        if dtype != torch.bfloat16 or not half:
            return launch(Xs, coeffs)
        return _recast(launch(_recast(Xs, half), coeffs), dtype)
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


def choose_algorithm(
    algorithm: str, s: int, L: int, steps: int, *, restarts: int = 1, symmetric: bool = False
) -> str:
    r"""``auto`` → ``gram`` when its FLOP count is below a margin times the standard one.

    FLOPs with general products: standard ``T (4 s² L + 2 s³)``, Gram ``(4 + 4k) s² L + 8 T s³``
    (``k`` restarts), margin 0.8 (the small s×s products run less efficiently). With the
    symmetric kernels (``symmetric=True``) every symmetric product costs half:
    ``T (3 s² L + s³)`` against ``(3 + 3k) s² L + 4 T s³``, margin 0.9 (the Gram path's s×s
    products ran at a higher rate than the standard ones on the H100; docs/benchmarks.md).
    """
    if algorithm != "auto":
        return algorithm
    if symmetric:
        standard = steps * (3 * s * s * L + s**3)
        gram = (3 + 3 * restarts) * s * s * L + 4 * steps * s**3
        margin = 0.9
    else:
        standard = steps * (4 * s * s * L + 2 * s**3)
        gram = (4 + 4 * restarts) * s * s * L + 8 * steps * s**3
        margin = 0.8
    return "gram" if gram < margin * standard else "standard"


def run_newton_schulz(
    X: torch.Tensor,
    coeffs: list[Coefficients],
    algorithm: str,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Run one normalised wide batch on the chosen algorithm (Triton kernels on CUDA).

    ``algorithm="auto"`` takes Gram NS where :func:`choose_algorithm` says, never for
    launch-bound CUDA batches (Gram NS issues more launches per step). The result is in
    ``out_dtype`` (default X's dtype).
    """
    s, L = X.shape[-2], X.shape[-1]
    if algorithm == "auto":
        symmetric = kernels_apply(X)
        if X.is_cuda and not gpu_bound(X):
            algorithm = "standard"
        # Gram without restarts is its cheapest case: when even that loses, skip the (cached
        # but, for long schedules, slow) restart search.
        elif choose_algorithm("auto", s, L, len(coeffs), restarts=0, symmetric=symmetric) == "gram":
            restarts = len(gram_restarts(coeffs))
            algorithm = choose_algorithm(
                "auto", s, L, len(coeffs), restarts=restarts, symmetric=symmetric
            )
        else:
            algorithm = "standard"
    if algorithm == "gram":
        return gram_newton_schulz(X, coeffs, gram_restarts(coeffs), out_dtype)
    return newton_schulz(X, coeffs, out_dtype)


def normalize(X: torch.Tensor, factor: float, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """``X / max(factor·‖X‖_F, eps)`` per matrix, the norm in float32 or better, cast last.

    A plain sum of squares: callers bring X into range first where it may not be
    (:func:`matfn.msign.rescale_if_needed`); an overflowed norm gives NaN, not zeros
    (:func:`matfn.kernels.elementwise.divide_by_norms`).

    One read of X for the norm and one fused divide-and-cast pass (no float32 copy of X). A
    dense CUDA batch ``(B, s, L)`` of at least ``min_triton_divide`` entries, or its transpose,
    is divided by :func:`normalize_by`'s Triton pass (torch's broadcast divide by a
    ``(B, 1, 1)`` denominator is not vectorised); smaller batches keep torch's launches (a
    multiply, a clamp and the divide), cheaper on the host, except while a CUDA graph records
    them: there the one Triton pass is cheaper on the GPU.
    """
    norm = torch.linalg.matrix_norm(X, ord="fro", keepdim=True, dtype=accumulate_dtype(X.dtype))
    if X.requires_grad and torch.is_grad_enabled():  # out= does not record autograd
        return (X / (norm * factor).clamp_min(eps)).to(dtype)
    triton_divide = X.numel() >= _backend.NEWTON_SCHULZ.min_triton_divide or recording()
    if X.dim() == 3 and (triton_divide or not X.is_cuda):
        for view, transposed in ((X, False), (X.mT, True)):
            if view.is_contiguous():
                out = normalize_by(view, norm.reshape(-1), factor, eps, dtype)
                return out.mT if transposed else out
    denom = _poison_overflow((norm * factor).clamp_min(eps))
    return torch.div(X, denom, out=torch.empty_like(X, dtype=dtype))


def _poison_overflow(denom: torch.Tensor) -> torch.Tensor:
    """``denom`` with inf replaced by NaN off CUDA: an overflowed norm never gives silent zeros.

    On CUDA the torch path keeps its launches (the Triton divide does this for free); callers
    that need scale safety there rescale first (:func:`matfn.msign`'s check).
    """
    if denom.is_cuda:
        return denom
    return torch.where(denom < torch.inf, denom, torch.nan)


def normalize_by(
    X: torch.Tensor,
    norms: torch.Tensor,
    factor: float,
    eps: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``X / max(factor·norms, eps)`` in ``dtype`` for a batch whose norms are already known.

    ``norms`` holds ``‖X_b‖_F`` for each matrix (shape ``(B,)``, float32 or better), e.g. from
    the kernel that wrote X (:func:`matfn.kernels.elementwise.momentum_stack`); this saves
    :func:`normalize`'s read of X for the norm. One Triton pass on CUDA; X is not modified.
    """
    out = torch.empty_like(X, dtype=dtype, memory_format=torch.contiguous_format)
    kernel_dtypes = (torch.float32, torch.bfloat16, torch.float16)  # the kernel divides in fp32
    if use_triton(X) and X.is_contiguous() and {X.dtype, dtype} <= set(kernel_dtypes):
        divide_by_norms = triton_module("kernels.elementwise").divide_by_norms
        return divide_by_norms(X, norms, factor, eps, out)
    denom = _poison_overflow((norms.reshape(-1, 1, 1) * factor).clamp_min(eps))
    return torch.div(X, denom, out=out)


def normalize_for_iteration(
    X: torch.Tensor,
    factor: float,
    eps: float,
    compute_dtype: torch.dtype,
    norms: torch.Tensor | None = None,
) -> torch.Tensor:
    """``X₀ = X / max(factor·‖X‖_F, eps)`` in the dtype the iteration will run in.

    That is ``compute_dtype``, or fp16 for bf16 batches on the Triton or folded CUDA path
    (:func:`iteration_dtype`): normalising straight into it saves a cast pass. ``norms``: the
    Frobenius norms when the caller already has them (:func:`normalize_by`).
    """
    dtype = iteration_dtype(X, compute_dtype)
    if norms is None:
        return normalize(X, factor, eps, dtype)
    return normalize_by(X, norms, factor, eps, dtype)
