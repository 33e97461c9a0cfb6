r"""msign: the polar factor ``U Vᵀ`` of a real matrix by Newton–Schulz iteration."""

from __future__ import annotations

import functools
import itertools
import math
import warnings
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch

from . import _graphs
from ._batching import flatten_batch, to_wide, unflatten_batch
from ._validation import check_matrix
from .coefficients import (
    CONVERGENT_QUINTIC,
    DEFAULT_STEPS,
    Coefficients,
    auto_schedule,
    schedule,
)
from .kernels import recording

__all__ = ["msign"]

Method = Literal["polar_express", "tuned", "keller", "cubic", "svd"]
Algorithm = Literal["auto", "standard", "gram"]
Steps = int | Literal["auto"] | None

METHODS = ("polar_express", "tuned", "keller", "cubic", "svd")
ALGORITHMS = ("auto", "standard", "gram")

#: steps="auto": the lower bound ℓ the schedule resolves and the target scalar error, per
#: compute dtype (ℓ·‖M‖_F is the smallest singular value that converges).
AUTO_TARGETS: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-7, 1e-12),
    torch.float32: (1e-6, 1e-6),
    torch.float16: (1e-3, 4e-3),
    torch.bfloat16: (1e-3, 4e-3),
}
#: steps="auto": stop polishing when a step moves X by less than this (relative Frobenius).
AUTO_TOL: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 2e-2,
}
AUTO_MAX_POLISH = 12


def default_compute_dtype(M: torch.Tensor) -> torch.dtype:
    """bf16 on CUDA, float32 on CPU; float64 inputs iterate in float64."""
    if M.dtype == torch.float64:
        return torch.float64
    return torch.bfloat16 if M.is_cuda else torch.float32


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


#: Entries from which :func:`normalize` divides a CUDA batch by a Triton pass (4096²: 16.8 M).
TRITON_DIVIDE_SIZE = 2**22


def normalize(X: torch.Tensor, factor: float, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """``X / max(factor·‖X‖_F, eps)`` per matrix, the norm in float32 or better, cast last.

    One read of X for the norm and one fused divide-and-cast pass (no float32 copy of X). A
    dense CUDA batch ``(B, s, L)`` of at least :data:`TRITON_DIVIDE_SIZE` entries, or its
    transpose, is divided by :func:`normalize_by`'s Triton pass: torch's broadcast divide by a
    ``(B, 1, 1)`` denominator runs its non-vectorised kernel (68 µs for a 4096² bf16 matrix on
    the H100, 3× the bandwidth time). Smaller batches keep torch's launches (a multiply, a clamp
    and the divide), cheaper on the host, except while a CUDA graph records them
    (:mod:`matfn.kernels.recording`): there the one Triton pass is cheaper on the GPU.
    """
    norm = torch.linalg.matrix_norm(X, ord="fro", keepdim=True, dtype=_accumulate_dtype(X.dtype))
    if X.requires_grad and torch.is_grad_enabled():  # out= does not record autograd
        return (X / (norm * factor).clamp_min(eps)).to(dtype)
    triton_divide = X.numel() >= TRITON_DIVIDE_SIZE or recording.recording()
    if X.dim() == 3 and (triton_divide or not X.is_cuda):
        for view, transposed in ((X, False), (X.mT, True)):
            if view.is_contiguous():
                out = normalize_by(view, norm.reshape(-1), factor, eps, dtype)
                return out.mT if transposed else out
    denom = (norm * factor).clamp_min(eps)
    return torch.div(X, denom, out=torch.empty_like(X, dtype=dtype))


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
    from .kernels.dispatch import use_triton

    out = torch.empty_like(X, dtype=dtype, memory_format=torch.contiguous_format)
    kernel_dtypes = (torch.float32, torch.bfloat16, torch.float16)  # the kernel divides in fp32
    if use_triton(X) and X.is_contiguous() and {X.dtype, dtype} <= set(kernel_dtypes):
        from .kernels.elementwise import divide_by_norms

        return divide_by_norms(X, norms, factor, eps, out)
    denom = (norms.reshape(-1, 1, 1) * factor).clamp_min(eps)
    return torch.div(X, denom, out=out)


def normalize_for_iteration(
    X: torch.Tensor,
    factor: float,
    eps: float,
    compute_dtype: torch.dtype,
    norms: torch.Tensor | None = None,
) -> torch.Tensor:
    """``X₀ = X / max(factor·‖X‖_F, eps)`` in the dtype the iteration will run in.

    That is ``compute_dtype``, or fp16 for bf16 batches on the folded CUDA path
    (:func:`matfn.kernels.dispatch.iteration_dtype`): normalising straight into it saves a cast
    pass. ``norms``: the Frobenius norms when the caller already has them (:func:`normalize_by`).
    """
    from .kernels.dispatch import iteration_dtype

    dtype = iteration_dtype(X, compute_dtype)
    if norms is None:
        return normalize(X, factor, eps, dtype)
    return normalize_by(X, norms, factor, eps, dtype)


def ns_step_torch(X: torch.Tensor, a: float, b: float, c: float) -> torch.Tensor:
    """One step ``a X + (b A + c A²) X`` with ``A = X Xᵀ``; ``X`` is ``(B, s, L)`` with s ≤ L.

    Cost ``4 s² L + 2 s³`` FLOPs (``4 s² L`` for a cubic step, ``c = 0``).
    """
    if X.shape[0] == 1 and X.shape[1] > 1:
        # One matrix: 2-D GEMMs (cuBLASLt, epilogue fused) instead of batched ones. Row vectors
        # (s = 1) stay batched: a 1×L view has orientation-dependent strides, and mm rounds
        # differently for them, which would break msign(Mᵀ) == msign(M)ᵀ bit for bit.
        Y = X[0].contiguous()
        A = Y @ Y.mT
        B = torch.addmm(A, A, A, beta=b, alpha=c) if c != 0 else A * b
        return torch.addmm(Y, B, Y, beta=a).unsqueeze(0)
    A = torch.bmm(X, X.mT)
    B = torch.baddbmm(A, A, A, beta=b, alpha=c) if c != 0 else A * b
    return torch.baddbmm(X, B, X, beta=a, alpha=1.0)


def newton_schulz_torch(X: torch.Tensor, coeffs: list[Coefficients]) -> torch.Tensor:
    """The plain (standard) iteration on a normalised wide batch ``(B, s, L)``."""
    for a, b, c in coeffs:
        X = ns_step_torch(X, a, b, c)
    return X


#: Gram restarts: a restart set is acceptable when the scalar Gram iteration keeps |Q| below this
#: for every normalised singular value in [1e-10, 1]. Calibrated on 192×768 and 256×1024 inputs
#: with condition numbers 10, 1e3, 1e5 and rank 64: at 60 the fp16 Gram path is at least as
#: accurate as standard bf16 NS for every schedule (polar_express 5 and 8, tuned, keller,
#: cubic); at 1e3, Polar Express 5 steps gets one restart, (1,), and is 2–3× less accurate than
#: standard on the ill-conditioned inputs (2–3× more accurate on well-conditioned ones).
GRAM_Q_MAX = 60.0
#: The Gram eigenvalue perturbation the restart search guards against: rounding X Xᵀ in half
#: precision leaves eigenvalues down to about −4e-4 (the gram-newton-schulz project's default).
GRAM_NEGATIVE_EIGENVALUE = -4e-4


def _gram_max_q(coeffs: tuple[Coefficients, ...], restarts: tuple[int, ...]) -> float:
    """max |q| of the scalar Gram iteration over x ∈ [1e-10, 1], with r = x² − 4e-4 (float64)."""
    x = np.logspace(0, -10, 2000)
    q = np.ones_like(x)
    r = x * x + GRAM_NEGATIVE_EIGENVALUE
    worst = 0.0
    with np.errstate(all="ignore"):
        for t, (a, b, c) in enumerate(coeffs):
            if t in restarts:
                x = q * x
                r = x * x + GRAM_NEGATIVE_EIGENVALUE
                q = np.ones_like(x)
            z = a + r * (b + c * r)
            q = q * z
            r = r * z * z
            m = float(np.max(np.abs(q)))
            worst = max(worst, m if math.isfinite(m) else math.inf)
    return worst


@functools.lru_cache(maxsize=256)
def _gram_restarts_cached(coeffs: tuple[Coefficients, ...]) -> tuple[int, ...]:
    steps = range(1, len(coeffs))
    best: tuple[float, tuple[int, ...]] = (_gram_max_q(coeffs, ()), ())
    for k in range(0, len(coeffs)):
        if 0 < k <= 2:
            best = min((_gram_max_q(coeffs, r), r) for r in itertools.combinations(steps, k))
        elif k > 2:
            # Exhaustive search is C(T−1, k) simulations (seconds for a 15-step "auto"
            # schedule); beyond two restarts extend the best set greedily instead.
            best = min(
                (_gram_max_q(coeffs, tuple(sorted((*best[1], t)))), tuple(sorted((*best[1], t))))
                for t in steps
                if t not in best[1]
            )
        if best[0] <= GRAM_Q_MAX:
            return best[1]
    return best[1]


def gram_restarts(coeffs: list[Coefficients]) -> tuple[int, ...]:
    r"""Restart points for Gram Newton–Schulz that keep it stable in half precision.

    Rounding makes some eigenvalues of ``R = X Xᵀ`` slightly negative (about −4e-4 in fp16);
    the Gram recurrence ``R ← Z R Z`` amplifies them and ``Q`` drifts or overflows. Following the
    gram-newton-schulz project (Zhang, Amsel, Chen, Dao 2026, ``restart_autotune``), simulate
    the scalar iteration ``q ← q z(r)``, ``r ← r z(r)²`` with ``r = x² − 4·10⁻⁴`` for
    ``x ∈ [10⁻¹⁰, 1]`` and pick the fewest restarts, placed where ``max |q|`` is smallest,
    such that ``max |q| ≤`` :data:`GRAM_Q_MAX` ``= 60``. Polar Express 5 steps → ``(1, 3)``;
    8 steps → ``(1, 4)``; tuned and Keller 5 steps → ``(2,)``; cubic 12 steps → ``(6,)``.
    Cached per schedule.
    """
    return _gram_restarts_cached(tuple(tuple(float(v) for v in c) for c in coeffs))


def gram_newton_schulz_torch(
    X: torch.Tensor, coeffs: list[Coefficients], restarts: tuple[int, ...] | None = None
) -> torch.Tensor:
    r"""Gram Newton–Schulz: iterate on ``R = X Xᵀ`` (s×s) and apply the product to X once.

    With ``Z_t = b_t R + c_t R²``: ``Q ← Q Z_t + a_t Q`` (``Q = Z_t + a_t I`` after a start) and
    ``R ← (Z_t + a_t I) R (Z_t + a_t I)``; the result is ``Q X``. Everything is a polynomial in
    the first ``R``, so in exact arithmetic this equals the standard iteration (and every s×s
    product is symmetric). The R update is skipped when the next step restarts or there is
    none. Cost ``(4 + 4k) s² L + 8 T s³`` for ``k`` restarts instead of ``T (4 s² L + 2 s³)``:
    cheaper when ``L ≳ 2 s``. ``restarts`` lists steps before which ``X ← Q X; R ← X Xᵀ;
    Q ← I`` is redone, which limits the growth of rounding errors in half precision; ``None``
    picks them with :func:`gram_restarts`.
    """
    if restarts is None:
        restarts = gram_restarts(coeffs)
    T = len(coeffs)
    R = torch.bmm(X, X.mT)
    Q = None
    for t, (a, b, c) in enumerate(coeffs):
        if t in restarts and Q is not None:
            X = torch.bmm(Q, X)
            R = torch.bmm(X, X.mT)
            Q = None
        Z = torch.baddbmm(R, R, R, beta=b, alpha=c) if c != 0 else R * b
        if Q is None:
            Q = Z.clone()
            Q.diagonal(dim1=-2, dim2=-1).add_(a)
        else:
            Q = torch.baddbmm(Q, Q, Z, beta=a)
        if t + 1 < T and t + 1 not in restarts:
            RZ = torch.baddbmm(R, R, Z, beta=a)
            R = torch.baddbmm(RZ, Z, RZ, beta=a)
    return X if Q is None else torch.bmm(Q, X)


def choose_algorithm(
    algorithm: str,
    s: int,
    L: int,
    steps: int,
    *,
    restarts: int = 1,
    symmetric: bool = False,
    gram_ok: bool = True,
) -> str:
    r"""``auto`` → ``gram`` when its FLOP count is below a margin times the standard one.

    FLOPs with general products: standard ``T (4 s² L + 2 s³)``, Gram ``(4 + 4k) s² L + 8 T s³``
    (``k`` restarts), margin 0.8 (the small s×s products run less efficiently). With the
    symmetric kernels (``symmetric=True``) every symmetric product costs half:
    ``T (3 s² L + s³)`` against ``(3 + 3k) s² L + 4 T s³``, margin 0.9: on the H100 the Gram path
    ran at a higher rate than the standard one (4096×16384: 7.08 against 8.70 ms; 4096×14336:
    6.64 against 8.02 ms, Polar Express 5 steps, two restarts, where the FLOP ratios are 0.86 and
    0.89). ``gram_ok=False`` (the Gram path is not accurate enough for this dtype/device) always
    answers ``standard``.
    """
    if algorithm != "auto":
        return algorithm
    if not gram_ok:
        return "standard"
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
    """Dispatch one normalised wide batch to the chosen algorithm (Triton kernels on CUDA).

    See :mod:`matfn.kernels.dispatch`: bf16/fp16 CUDA batches run the Triton kernels; the Gram
    path runs in fp16 on CUDA; everything else runs the torch twins above. The result is in
    ``out_dtype`` (default X's dtype).
    """
    from .kernels import dispatch

    s, L = X.shape[-2], X.shape[-1]
    if algorithm == "auto":
        symmetric = dispatch.kernels_apply(X)
        gram_ok = dispatch.gram_accurate(X)
        if X.is_cuda and not dispatch.gpu_bound(X):
            # Launch-bound: Gram NS issues more launches per step (32×128×4096: Gram 0.79 ms
            # against 0.54 ms standard on the H100).
            algorithm = "standard"
        # Gram without restarts is its cheapest case: when even that loses, skip the (cached
        # but, for long schedules, slow) restart search.
        elif choose_algorithm("auto", s, L, len(coeffs), restarts=0, symmetric=symmetric,
                              gram_ok=gram_ok) == "gram":  # fmt: skip
            algorithm = choose_algorithm(
                "auto",
                s,
                L,
                len(coeffs),
                restarts=len(gram_restarts(coeffs)),
                symmetric=symmetric,
                gram_ok=gram_ok,
            )
        else:
            algorithm = "standard"
    if algorithm == "gram":
        return dispatch.gram_newton_schulz(X, coeffs, gram_restarts(coeffs), out_dtype)
    return dispatch.newton_schulz(X, coeffs, out_dtype)


def _msign_svd(X: torch.Tensor) -> torch.Tensor:
    """Exact ``U_r V_rᵀ`` with rank cut-off ``σ > max(n, m)·ε·σ₁`` (batched ``(B, n, m)``)."""
    work = X.to(_accumulate_dtype(X.dtype))
    U, S, Vh = torch.linalg.svd(work, full_matrices=False)
    tol = max(X.shape[-2:]) * torch.finfo(work.dtype).eps * S[..., :1]
    keep = (S > tol).to(work.dtype)
    return (U * keep.unsqueeze(-2)) @ Vh


def polish_until_converged(
    X: torch.Tensor, step: Callable[[torch.Tensor], torch.Tensor], tol: float
) -> tuple[torch.Tensor, bool]:
    """Apply ``step`` until it moves X by ≤ ``tol`` (relative Frobenius, worst matrix).

    Also stops once the change has fallen below 1e-2 and then fails to halve: the iterate has
    reached its rounding floor (non-normal input in float32, for example). One host sync per step.

    A change that *grows* by more than 1.5× means values below the schedule's lower bound are
    being lifted towards 1 (the polishing quintic multiplies small values by 15/8 per step):
    rounding noise of a rank-deficient input or an eigenvalue at 0. Then it stops, returns the
    iterate before that step and reports failure, instead of silently lifting noise to 1.
    """
    acc = _accumulate_dtype(X.dtype)
    previous = float("inf")
    for _ in range(AUTO_MAX_POLISH):
        X_next = step(X)
        diff = torch.linalg.matrix_norm((X_next - X).to(acc))
        size = torch.linalg.matrix_norm(X.to(acc)).clamp_min(torch.finfo(acc).tiny)
        change = float((diff / size).max())
        if change <= tol:
            return X_next, True
        if change > 1.5 * previous:
            return X, False
        X = X_next
        if previous < 1e-2 and change > 0.5 * previous:
            return X, True
        previous = change
    return X, False


def _iterate_auto(X: torch.Tensor, algorithm: str) -> torch.Tensor:
    lower, target = AUTO_TARGETS[X.dtype]
    X = run_newton_schulz(X, auto_schedule(lower, target), algorithm)
    tol = AUTO_TOL[X.dtype]
    X, converged = polish_until_converged(
        X, lambda Y: run_newton_schulz(Y, [CONVERGENT_QUINTIC], "standard"), tol
    )
    if not converged:
        warnings.warn(
            f"msign(steps='auto') did not converge to tol={tol:g} after the schedule and "
            f"{AUTO_MAX_POLISH} polishing steps: singular values below about "
            f"{lower:g}·‖M‖_F converge slowly (numerically rank-deficient input?)",
            RuntimeWarning,
            stacklevel=3,
        )
    return X


def _check_options(method: str, steps: object, algorithm: str) -> None:
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"`algorithm` must be one of {ALGORITHMS}, got {algorithm!r}")
    if steps is None or steps == "auto":
        return
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"`steps` must be a positive int, 'auto' or None, got {steps!r}")


def msign_wide(
    X: torch.Tensor,
    *,
    method: str,
    steps: Steps,
    algorithm: str,
    eps: float,
    compute_dtype: torch.dtype,
    norms: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """msign of a flattened wide batch ``(B, s, L)``, ``s ≤ L``, in the iteration dtype.

    The building block shared by msign, mclip and the optimizer (no validation, no reshape).
    The result is in ``compute_dtype``, or in fp16 where a bf16 batch took the folded CUDA path
    (:func:`matfn.kernels.dispatch.iteration_dtype`); callers cast it (to save a pass when the
    next consumer reads any float dtype, as the optimizer's update does).
    ``norms``: ``‖X_b‖_F`` when the caller already has them (:func:`normalize_by` then skips
    the read of X for the norm). ``out_dtype``: ask for the result in this dtype instead, for
    fixed schedules (the Triton path rounds its last product to it: no cast pass).
    """

    def normalized(factor: float) -> torch.Tensor:
        return normalize_for_iteration(X, factor, eps, compute_dtype, norms)

    if method == "svd":
        return _msign_svd(X).to(compute_dtype)
    if steps == "auto":
        if method != "polar_express":
            raise ValueError(f"steps='auto' uses the Polar-Express schedule; got method={method!r}")
        return _iterate_auto(normalized(1.01), algorithm)
    coeffs, factor = schedule(method, DEFAULT_STEPS[method] if steps is None else steps)
    return run_newton_schulz(normalized(factor), coeffs, algorithm, out_dtype)


def msign(
    M: torch.Tensor,
    *,
    method: Method = "polar_express",
    steps: Steps = None,
    algorithm: Algorithm = "auto",
    eps: float = 1e-7,
    compute_dtype: torch.dtype | None = None,
    check_finite: bool = True,
    cuda_graph: bool = False,
) -> torch.Tensor:
    r"""Matrix sign (polar factor) ``msign(M) = U_r V_rᵀ`` by Newton–Schulz iteration.

    For ``M = U Σ Vᵀ`` of rank ``r``, every nonzero singular value becomes 1 and zeros stay 0.
    Equivalently ``msign(M) = (M Mᵀ)^{-1/2} M``, the orthogonal factor of the polar
    decomposition for full-rank M, and the steepest-descent direction of Muon.

    Parameters
    ----------
    M : torch.Tensor
        Real ``(..., n, m)`` tensor (float64/32/16 or bfloat16), any leading batch dims,
        any strides. Never modified.
    method : {"polar_express", "tuned", "keller", "cubic", "svd"}
        Coefficient schedule (see :mod:`matfn.coefficients`), or ``"svd"`` for the exact
        result through ``torch.linalg.svd``.
    steps : int, "auto" or None
        Number of iterations; ``None`` is the method's default (5; 12 for ``cubic``).
        ``"auto"`` runs the shortest Polar-Express schedule that resolves singular values down to
        ``ℓ·‖M‖_F`` for the compute dtype (ℓ = 1e-7 in float64, 1e-6 in float32, 1e-3 in
        half precision), then convergent quintic steps ``(15/8, −10/8, 3/8)`` until a step moves
        X by less than the dtype's tolerance (1e-10, 1e-5, 2e-2). One host sync per polishing
        step; warns if it does not converge.
    algorithm : {"auto", "standard", "gram"}
        ``standard`` forms ``X Xᵀ`` every step; ``gram`` iterates on the s×s Gram matrix and
        applies the product once (cheaper for rectangular inputs; restarted where
        :func:`gram_restarts` says, and iterated in fp16 for bf16 inputs); ``auto`` picks Gram
        when its FLOP count, restarts included, is below 0.8× the standard one with general
        products and 0.9× with the symmetric CUDA kernels (for 5 Polar-Express steps with their
        two restarts: ``L > 8 s`` and ``L > 3.45 s``; see :func:`choose_algorithm`), and never
        for CUDA problems below the kernels' size threshold (launch-bound).
    eps : float
        Normalisation floor: ``X₀ = M / max(sf·‖M‖_F, eps)``. msign(0) = 0 exactly.
    compute_dtype : torch.dtype, optional
        Dtype of the iteration. Default: bfloat16 on CUDA (fp32 accumulation in the matmuls),
        float32 on CPU, float64 for float64 inputs. Norms are always taken in float32 or better.
        CUDA bf16 batches with a short side below 2048 iterate in fp16 (same speed, 3× smaller
        error; :func:`matfn.kernels.dispatch.iteration_dtype`), the Gram path always does.
    check_finite : bool
        Raise on NaN/Inf (one host sync). The optimizer passes ``False``; NaN then propagates.
    cuda_graph : bool
        Replay the call from a CUDA graph captured for this input geometry and these options
        (:mod:`matfn._graphs`): for small CUDA inputs, whose eager calls are bound by the host
        issuing 17–20 kernels. The first call per geometry runs eagerly and captures; later
        calls issue three operations (copy in, replay, copy out). Ignored (eager) on CPU, for
        GPU-bound inputs (above 2³⁴ multiply-adds per product, e.g. 4096²), ``steps="auto"``
        (host syncs), ``method="svd"`` and under autograd. Combine with
        ``check_finite=False`` to avoid the host sync of the check.

    Returns
    -------
    torch.Tensor
        Approximately ``U_r V_rᵀ``, same shape and dtype as ``M``. Differentiable: when
        autograd tracks ``M`` the backward pass is :func:`matfn.msign_vjp`, the derivative of
        the exact ``msign(M)`` through a Lyapunov equation (not of the truncated polynomial the
        forward evaluated; see :class:`matfn.derivatives.MsignFunction`).

    Raises
    ------
    TypeError
        ``M`` is not a dense real floating tensor.
    ValueError
        ``M`` has fewer than 2 dims or non-finite entries; unknown method/algorithm; bad steps.

    Notes
    -----
    The iteration (math spec §1.2): transpose to the wide orientation (``s = min(n, m)`` rows),
    ``X₀ = M / (sf ‖M‖_F)`` with ``sf = 1.01`` for Polar Express and 1 otherwise, then
    ``A = X Xᵀ``, ``X ← a X + (b A + c A²) X`` per step. On singular values this is the scalar
    composition ``f = p_T ∘ … ∘ p_1`` applied to ``σᵢ / (sf ‖M‖_F)``, so the output is exactly
    ``U f(Σ/(sf‖M‖_F)) Vᵀ`` up to rounding.

    Cost per quintic step: ``4 s² L + 2 s³`` FLOPs (``L = max(n, m)``), e.g. 2.06 TFLOP for
    5 steps at 4096².

    Accuracy (max ``|σᵢ(X) − 1|`` for normalised singular values in ``[ℓ, 1]``): Polar Express
    5 steps 0.14 (ℓ = 1e-3), 8 steps 1e-15; tuned 0.05 (ℓ = 1e-2); Keller's quintic does not
    converge (output singular values in [0.68, 1.13] for ℓ = 1e-2). Add about 1e-2 for bf16
    rounding and 1e-5 for float32. Singular values below ℓ·‖M‖_F are not lifted to 1.

    References
    ----------
    K. Jordan et al., "Muon: An optimizer for hidden layers in neural networks" (2024).
    N. Amsel et al., "The Polar Express", arXiv:2505.16932 (2025).
    Su Jianlin, kexue.fm/archives/10922 and 10996 (2025).

    Examples
    --------
    >>> import torch, matfn
    >>> M = torch.randn(64, 32, dtype=torch.float64)
    >>> O = matfn.msign(M, steps="auto")
    >>> torch.allclose(O.mT @ O, torch.eye(32, dtype=torch.float64), atol=1e-9)
    True
    """
    check_matrix(M, "M", check_finite=check_finite)
    _check_options(method, steps, algorithm)
    from .derivatives import MsignFunction, wants_derivative  # lazy: it imports this module

    if wants_derivative(M):
        return MsignFunction.apply(M, method, steps, algorithm, eps, compute_dtype)
    if M.numel() == 0:
        return torch.empty_like(M)
    compute_dtype = compute_dtype or default_compute_dtype(M)
    call = functools.partial(
        _msign, method=method, steps=steps, algorithm=algorithm, eps=eps,
        compute_dtype=compute_dtype,
    )  # fmt: skip
    if cuda_graph and steps != "auto" and method != "svd" and _graphs.ns_graph_applies(M):
        return _graphs.replay_or_capture(call, M)
    return call(M)


def _msign(M: torch.Tensor, **options) -> torch.Tensor:
    """msign of a validated, non-empty ``M`` (the part a CUDA graph captures)."""
    from .kernels import dispatch

    X, batch_shape = flatten_batch(M)
    X, transposed = to_wide(X)
    out = msign_wide(X, **options, out_dtype=M.dtype)
    out = dispatch.cast(out, M.dtype)  # svd and steps="auto" return the compute dtype
    if transposed:
        out = out.mT
    return unflatten_batch(out, batch_shape)
