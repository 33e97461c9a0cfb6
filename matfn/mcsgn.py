r"""mcsgn: the classic matrix sign function of a square matrix, by Newton–Schulz iteration."""

from __future__ import annotations

import functools

import numpy as np
import torch

from . import _graphs
from ._autocast import no_autocast
from ._batching import flatten_batch, unflatten_batch
from ._validation import check_matrix
from .coefficients import (
    CONVERGENT_QUINTIC,
    DEFAULT_STEPS,
    Coefficients,
    auto_schedule,
    scalar_map,
    schedule,
)
from .msign import AUTO_TARGETS, AUTO_TOL, Method, Steps, check_options
from .msign.path import sign_step
from .msign.reference import polish_until_converged, sign_step_torch

__all__ = ["mcsgn", "MatrixSignConvergenceError", "sign_step_torch"]


class MatrixSignConvergenceError(ArithmeticError):
    """The sign iteration did not converge (eigenvalues on or near the imaginary axis or 0)."""


def _run_sign_iteration(X: torch.Tensor, coeffs: list[Coefficients]) -> torch.Tensor:
    """The iteration, each step on the path :func:`matfn.msign.path.sign_step` picks."""
    for a, b, c in coeffs:
        X = sign_step(X, a, b, c)
    return X


def _normalized_sign_iteration(
    X: torch.Tensor,
    *,
    coeffs: tuple[Coefficients, ...],
    factor: float,
    eps: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Normalise by the trace, then iterate (a fixed schedule; what ``cuda_graph`` captures)."""
    return _run_sign_iteration(_normalize_trace(X, factor, eps, dtype), coeffs)


def _normalize_trace(
    X: torch.Tensor, factor: float, eps: float, dtype: torch.dtype
) -> torch.Tensor:
    """``X / (factor·√tr(X²))``: with real eigenvalues ``tr(X²) = Σλ² ≥ max λ²``.

    Unlike ``‖X‖_F`` it ignores the off-diagonal block of a block-triangular matrix. Where
    ``tr(X²) ≤ 0`` (complex eigenvalues) fall back to the Frobenius norm (docs/math.md §2.2).
    """
    acc = X.to(torch.float64 if X.dtype == torch.float64 else torch.float32)
    trace_sq = (acc * acc.mT).sum(dim=(-2, -1), keepdim=True)
    fro = torch.linalg.matrix_norm(acc, keepdim=True)
    scale = torch.where(trace_sq > 0, trace_sq.clamp_min(0).sqrt(), fro)
    return (acc / (scale * factor).clamp_min(eps)).to(dtype)


def _power_norm(S: torch.Tensor, cubic_residual: bool, iters: int = 12) -> torch.Tensor:
    """Power-iteration estimate of ``‖S³ − S‖₂`` (or ``‖S‖₂``) per matrix, ``O(n²)`` per step.

    ``csgn`` takes values in {−1, 0, 1}, so an exact sign satisfies ``S³ = S`` even when M has
    zero eigenvalues; an unconverged or complex eigenvalue leaves a residual of order 1.
    """
    acc = S.to(torch.float64)  # S³ of a diverged iterate overflows float32
    gen = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(acc.shape[0], acc.shape[-1], 4, generator=gen, dtype=acc.dtype)
    v = v.to(acc.device)

    def apply(w: torch.Tensor, mat: torch.Tensor) -> torch.Tensor:
        sw = mat @ w
        return mat @ (mat @ sw) - sw if cubic_residual else sw

    est = torch.zeros(acc.shape[0], dtype=acc.dtype, device=acc.device)
    for _ in range(iters):
        v = v / torch.linalg.vector_norm(v, dim=-2, keepdim=True).clamp_min(1e-30)
        w = apply(v, acc)
        w_norm = torch.linalg.vector_norm(w, dim=-2, keepdim=True)
        est = w_norm.squeeze(-2).amax(dim=-1)
        v = apply(w / w_norm.clamp_min(1e-300), acc.mT)
    return torch.nan_to_num(est, nan=float("inf"))


#: Residual slack added to the schedule's scalar bound, per compute dtype (rounding of 3n³
#: products at unit scale, amplified by mild non-normality).
_RESIDUAL_SLACK = {
    torch.float64: 1e-6,
    torch.float32: 1e-3,
    torch.float16: 0.1,
    torch.bfloat16: 0.15,
}


def _scalar_residual_bound(coeffs: list[Coefficients], factor: float, lower: float) -> float:
    """``max |f³ − f|`` over normalised eigenvalue magnitudes in ``[lower, 1]``."""
    x = np.geomspace(lower / factor, 1 / factor, 4001)
    f = scalar_map(coeffs, x)
    return float(np.max(np.abs(f**3 - f)))


def _mcsgn_eig(X: torch.Tensor) -> torch.Tensor:
    """Exact ``P sign(Re Λ) P⁻¹`` through ``torch.linalg.eig`` (sign(0) = 0)."""
    work = X.to(torch.float64)
    lam, P = torch.linalg.eig(work)
    signs = torch.sgn(lam.real).to(P.dtype)
    S = P @ torch.diag_embed(signs) @ torch.linalg.inv(P)
    return S.real


@no_autocast
def mcsgn(
    M: torch.Tensor,
    *,
    method: Method = "polar_express",
    steps: Steps = None,
    eps: float = 1e-30,
    compute_dtype: torch.dtype | None = None,
    check_finite: bool = True,
    check_convergence: bool = True,
    cuda_graph: bool = False,
) -> torch.Tensor:
    r"""Matrix sign function ``mcsgn(M) = M (M²)^{-1/2}`` of square matrices.

    For ``M = P Λ P⁻¹`` with real eigenvalues, ``mcsgn(M) = P sign(Λ) P⁻¹``: every eigenvalue
    becomes ±1 (0 stays 0). Unlike msign (orthogonally invariant, acts on singular values) it is
    similarity-invariant and acts on eigenvalues; the two agree for symmetric M.

    Parameters
    ----------
    M : torch.Tensor
        Real square ``(..., n, n)`` tensor, any batch dims. Its eigenvalues should be real (or
        have real parts well away from 0) for the iteration to converge.
    method : {"polar_express", "tuned", "keller", "cubic", "svd"}
        Newton–Schulz schedule as in :func:`matfn.msign`; ``"svd"`` means the exact
        eigendecomposition reference (``torch.linalg.eig``, float64).
    steps : int, "auto" or None
        As in :func:`matfn.msign`, except that ``None`` with ``polar_express`` means ``"auto"``:
        mcsgn is used to solve equations, so by default it iterates until converged for the
        compute dtype and raises :class:`MatrixSignConvergenceError` if it does not. Pass an
        int for a fixed cost (then only gross failures raise).
    eps : float
        Floor of the normaliser ``√tr(M²)``; mcsgn(0) = 0.
    compute_dtype : torch.dtype, optional
        Iteration dtype. Default float64 for float64 input, else float32 (also on CUDA:
        mcsgn solves equations, where bf16 is too coarse).
    check_finite : bool
        Raise on NaN/Inf input.
    check_convergence : bool
        Verify the result: ``‖S³ − S‖₂`` (power iteration, ``O(n²)``, one host sync) must lie
        within the schedule's scalar bound plus rounding slack.
    cuda_graph : bool
        Replay the normalisation and the iteration from a CUDA graph captured for this input
        geometry and these options (see :func:`matfn.msign`; the convergence check, if any,
        runs after it). Ignored (eager) on CPU, for ``steps="auto"`` (the default with
        ``polar_express``: its polishing syncs with the host), ``method="svd"`` and GPU-bound
        inputs (see :func:`matfn.msign`).

    Returns
    -------
    torch.Tensor
        ``S ≈ mcsgn(M)``, same shape and dtype as ``M``.

    Raises
    ------
    TypeError, ValueError
        Bad input (see :func:`matfn.msign`); non-square ``M``.
    MatrixSignConvergenceError
        The iteration did not converge: eigenvalues on or near the imaginary axis, or nonzero
        eigenvalues smaller than the schedule resolves (about ``1e-3·√tr(M²)`` for 5 steps).

    Notes
    -----
    ``X₀ = M / (sf·√tr(M²))`` puts real eigenvalues in ``[−1, 1]`` (docs/math.md §2.2), then
    ``X ← a X + (b X² + c X⁴) X`` per step: 3 dense products, ``6 n³`` FLOPs per step.
    In exact arithmetic the result is ``P f(Λ/(sf√tr M²)) P⁻¹`` with f the scalar composition,
    so the schedule's accuracy on ``[ℓ, 1]`` carries over to eigenvalues; rounding is amplified by
    ``κ(P)`` for non-normal M. float32 with ``steps="auto"``: relative error about 1e-6 on
    well-conditioned problems.

    References
    ----------
    N. J. Higham, "Functions of Matrices", SIAM 2008, ch. 5.
    Su Jianlin, kexue.fm/archives/11056 (2025).

    Examples
    --------
    >>> import torch, matfn
    >>> M = torch.tensor([[2.0, 1.0], [0.0, -3.0]], dtype=torch.float64)
    >>> matfn.mcsgn(M, steps="auto")
    tensor([[ 1.0000,  0.4000],
            [ 0.0000, -1.0000]], dtype=torch.float64)
    """
    check_matrix(M, "M", square=True, check_finite=check_finite)
    check_options(method, steps, "auto")
    if M.numel() == 0:
        return torch.empty_like(M)
    X, batch_shape = flatten_batch(M)
    if method == "svd":
        return unflatten_batch(_mcsgn_eig(X).to(M.dtype), batch_shape)
    if compute_dtype is None:
        compute_dtype = torch.float64 if M.dtype == torch.float64 else torch.float32

    if steps is None and method == "polar_express":
        steps = "auto"
    if steps == "auto":
        if method != "polar_express":
            raise ValueError(f"steps='auto' uses the Polar-Express schedule; got method={method!r}")
        lower, target = AUTO_TARGETS[compute_dtype]
        X = _normalize_trace(X, 1.01, eps, compute_dtype)
        X = _run_sign_iteration(X, auto_schedule(lower, target))
        tol = AUTO_TOL[compute_dtype]
        X, converged = polish_until_converged(
            X, lambda Y: _run_sign_iteration(Y, [CONVERGENT_QUINTIC]), tol
        )
        if not converged and check_convergence:
            raise MatrixSignConvergenceError(
                f"mcsgn(steps='auto') did not converge to tol={tol:g}: M has eigenvalues on or "
                "near the imaginary axis, or eigenvalues below "
                f"{lower:g}·√tr(M²) (for exact zeros, which map to 0, pass an int `steps`)"
            )
        bound = 0.0
    else:
        coeffs, factor = schedule(method, DEFAULT_STEPS[method] if steps is None else steps)
        iterate = functools.partial(
            _normalized_sign_iteration,
            coeffs=tuple(map(tuple, coeffs)), factor=factor, eps=eps, dtype=compute_dtype,
        )  # fmt: skip
        if cuda_graph and _graphs.ns_graph_applies(X):
            X = _graphs.replay_or_capture(iterate, X)
        else:
            X = iterate(X)
        bound = _scalar_residual_bound(coeffs, factor, 1e-3)

    if check_convergence:
        if not bool(torch.isfinite(X).all()):
            raise MatrixSignConvergenceError(
                "mcsgn diverged (non-finite iterate): M has eigenvalues on or near the imaginary "
                "axis, or is too non-normal for the compute dtype (try float64)"
            )
        residual = _power_norm(X, cubic_residual=True)
        # S³ − S = P (f³ − f)(Λ) P⁻¹: non-normal M amplifies the scalar residual by up to κ(P),
        # of which ‖S‖₂ is a proxy, so a fixed step count is judged relative to it.
        scale = _power_norm(X, cubic_residual=False).clamp_min(1) if bound else 1.0
        limit = (bound + _RESIDUAL_SLACK[compute_dtype]) * scale
        bad = ~(residual <= limit)
        if bool(bad.any()):
            worst = float(residual.max())
            raise MatrixSignConvergenceError(
                f"mcsgn did not converge: ‖S³ − S‖₂ ≈ {worst:.3g} exceeds its bound for "
                f"{int(bad.sum())} of {bad.numel()} matrices; M has eigenvalues on or near the "
                "imaginary axis or too close to 0 for this schedule (try steps='auto')"
            )
    return unflatten_batch(X.to(M.dtype), batch_shape)
