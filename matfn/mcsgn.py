r"""mcsgn: the classic matrix sign function of a square matrix.

Two iterations: the scaled Newton iteration ``X ← (μX + (μX)⁻¹)/2`` for general (non-symmetric)
input with ``steps="auto"``, which converges for every eigenvalue off the imaginary axis, complex
ones included; and the Newton–Schulz polynomial schedules shared with msign for symmetric input
and for fixed step counts (matrix products only). docs/math.md §2.

The compute path is the custom op ``torch.ops.matfn.mcsgn`` (fake implementation, autograd
through the sign of a block matrix), so :func:`mcsgn` compiles and exports; the public function
validates the options and calls it.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from . import _graphs
from ._autocast import no_autocast
from ._batching import flatten_batch, unflatten_batch
from ._newton import NewtonSign
from ._validation import assert_finite, check_matrix
from .coefficients import (
    CONVERGENT_QUINTIC,
    Coefficients,
    Table,
    auto_schedule,
    scalar_map,
    schedule,
)
from .msign import (
    AUTO_TARGETS,
    AUTO_TOL,
    Method,
    Steps,
    check_options,
    from_op,
    op_method,
    op_steps,
)
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


def _prescale(X: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``X / max|Xᵢⱼ|`` per matrix in ``acc``, so that no later norm or product overflows.

    The sign is scale-invariant, so this changes nothing but the range; all-zero matrices stay
    zero.
    """
    X = X.to(acc)
    amax = X.abs().amax(dim=(-2, -1), keepdim=True)
    return X / torch.where(amax > 0, amax, torch.ones_like(amax))


def _normalize_trace(
    X: torch.Tensor, factor: float, eps: float, dtype: torch.dtype
) -> torch.Tensor:
    """``X / (factor·√tr(X²))``: with real eigenvalues ``tr(X²) = Σλ² ≥ max λ²``.

    Unlike ``‖X‖_F`` it ignores the off-diagonal block of a block-triangular matrix. Where
    ``tr(X²) ≤ 0`` (complex eigenvalues) fall back to the Frobenius norm (docs/math.md §2.2).
    ``X`` is first divided by its largest entry (in the accumulation dtype), so that
    ``tr(X²)`` cannot overflow or underflow for any finite input.
    """
    acc = _prescale(X, torch.float64 if X.dtype == torch.float64 else torch.float32)
    trace_sq = (acc * acc.mT).sum(dim=(-2, -1), keepdim=True)
    fro = torch.linalg.matrix_norm(acc, keepdim=True)
    scale = torch.where(trace_sq > 0, trace_sq.clamp_min(0).sqrt(), fro)
    return (acc / (scale * factor).clamp_min(eps)).to(dtype)


#: Exact residual check of the Newton result: ``‖S² − I‖_F ≤ limit·max(1, ‖S‖_F²)`` per
#: compute dtype (a converged result sits at about ``u·n``; any eigenvalue whose scalar iterate
#: has not reached ±1 leaves an O(1) residual, since ``ρ(S² − I) ≤ ‖S² − I‖_F``).
_NEWTON_CHECK = {torch.float64: 1e-8, torch.float32: 1e-3}


def _involution_residual(S: torch.Tensor) -> torch.Tensor:
    """``‖S² − I‖_F / max(1, ‖S‖²_F)`` per matrix, in float64 (the exact check)."""
    S = S.to(torch.float64)
    eye = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device)
    res = torch.linalg.matrix_norm(S @ S - eye)
    size = torch.linalg.matrix_norm(S).square().clamp_min(1.0)
    return torch.nan_to_num(res / size, nan=float("inf"))


def _cubic_residual(S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``‖S³ − S‖_F`` per matrix, in float64 (an overflowing norm or product reads as inf).

    Exact (up to float64 rounding), unlike a power-iteration estimate: ``csgn`` takes values in
    {−1, 0, 1}, so an exact sign satisfies ``S³ = S`` even when M has zero eigenvalues, and
    ``ρ(S³ − S) = max |f(λ)³ − f(λ)| ≤ ‖S³ − S‖_F`` for the iterate ``S = f(M)``: no
    eigenvalue whose scalar iterate missed {−1, 0, 1} can hide. Returned with
    ``max(1, ‖S‖²_F / n)``, the non-normality factor the caller's limit is multiplied by.
    """
    S = S.to(torch.float64)
    n = S.shape[-1]
    norm = torch.linalg.matrix_norm(S, keepdim=True)
    if not bool(torch.isfinite(norm).all()):
        inf = torch.full((S.shape[0],), float("inf"), dtype=S.dtype, device=S.device)
        return inf, torch.ones_like(inf)
    res = torch.linalg.matrix_norm(S @ (S @ S) - S)
    growth = (norm.squeeze(-1).squeeze(-1) ** 2 / n).clamp_min(1.0)
    return torch.nan_to_num(res, nan=float("inf")), growth


#: The axis-distance test of the Newton path: every eigenvalue must have ``|Re λ| ≥ τ·‖M‖_F``
#: (per compute dtype), or mcsgn raises. Closer eigenvalues are within rounding (times the
#: eigenvector condition) of changing sign, so no dtype-accurate answer exists.
AXIS_DISTANCE = {torch.float64: 1e-10, torch.float32: 1e-4}


def _mcsgn_newton(
    X: torch.Tensor, compute_dtype: torch.dtype, check_convergence: bool
) -> torch.Tensor | None:
    """mcsgn of a flattened batch by the scaled Newton iteration, checked (docs/math.md §2.6).

    Zero matrices give exact zeros. Returns ``None`` when an iterate is numerically singular
    (a singular M, or an eigenvalue on or near the imaginary axis): the caller then runs the
    polynomial path, which maps exact zero eigenvalues to 0 where the structure keeps them exact
    and otherwise raises.

    With ``check_convergence`` it also runs the *shift test*: ``S`` commutes with ``M``, so
    ``M − τ‖M‖_F·S = P (Λ − τ‖M‖_F·sign(Re Λ)) P⁻¹`` moves every eigenvalue exactly ``τ‖M‖_F``
    towards the imaginary axis, also for non-normal M. Its sign equals ``S`` unless an eigenvalue
    had ``|Re λ| < τ‖M‖_F``, which then crosses the axis and changes ``S`` by at least 2 in
    Frobenius norm (``ρ(S' − S) = 2``). A second Newton run, so the check doubles the cost.
    """
    X0 = _prescale(X, compute_dtype)
    norm = torch.linalg.matrix_norm(X0, keepdim=True)
    zero = norm == 0
    eye = torch.eye(X0.shape[-1], dtype=X0.dtype, device=X0.device)
    X0 = torch.where(zero, eye, X0 / torch.where(zero, torch.ones_like(norm), norm))
    newton = NewtonSign(X0)
    S = newton.run()
    if newton.singular:
        return None
    S = torch.where(zero, torch.zeros_like(S), S)
    if not check_convergence:
        return S
    if not newton.converged:
        raise MatrixSignConvergenceError(
            f"mcsgn: the scaled Newton iteration did not converge in {newton.steps} steps (last "
            f"relative change {newton.last_change:.3g}): M has eigenvalues on or extremely "
            "near the imaginary axis (relative to its norm), or eigenvectors too ill-conditioned "
            "for the compute dtype (try float64)"
        )
    residual = torch.where(zero.flatten(), 0.0, _involution_residual(S))
    limit = _NEWTON_CHECK[compute_dtype]
    bad = ~(residual <= limit)
    if bool(bad.any()):
        raise MatrixSignConvergenceError(
            f"mcsgn: the Newton iteration settled, but ‖S² − I‖_F/max(1, ‖S‖²_F) = "
            f"{float(residual.max()):.3g} exceeds {limit:g} for {int(bad.sum())} of "
            f"{bad.numel()} matrices: M's eigenvectors are too ill-conditioned (or an "
            "eigenvalue too close to the imaginary axis) for the compute dtype; try float64"
        )
    tau = AXIS_DISTANCE[compute_dtype]
    shifted = NewtonSign(torch.where(zero, eye, X0 - tau * S))
    S_shift = shifted.run()
    moved = torch.linalg.matrix_norm((S_shift - S).to(torch.float64))
    moved = torch.where(zero.flatten(), 0.0, moved)
    near = ~(moved <= 0.5) | shifted.singular
    if bool(near.any()):
        raise MatrixSignConvergenceError(
            f"mcsgn: M has eigenvalues on or too near the imaginary axis: |Re λ| < {tau:g}·‖M‖_F "
            f"for {int(near.sum())} of {near.numel()} matrices (the sign changes when they "
            f"move {tau:g}·‖M‖_F towards the axis), which is within rounding of the axis for "
            "the compute dtype (for non-normal M, whose ‖M‖_F exceeds its eigenvalues by up to "
            "the eigenvector condition, eigenvalues are that sensitive; try float64)"
        )
    return S


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


def _mcsgn_compute(
    M: torch.Tensor,
    method: str | Table,
    steps: int | str | None,
    eps: float,
    compute_dtype: torch.dtype,
    check_convergence: bool,
    cuda_graph: bool,
) -> torch.Tensor:
    """mcsgn of a non-empty ``M`` with validated options: the body of the ``matfn::mcsgn`` op.

    ``steps`` is resolved: ``"auto"``, an int, or None for a table.
    """
    X, batch_shape = flatten_batch(M)
    if method == "svd":
        return unflatten_batch(_mcsgn_eig(X).to(M.dtype), batch_shape)
    singular = False  # the Newton path broke down: a singular M or an eigenvalue on the axis
    if steps == "auto":
        if not bool((X == X.mT).all()):
            # Inversions need float32 at least: a half-precision compute_dtype runs in float32.
            newton_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
            S = _mcsgn_newton(X, newton_dtype, check_convergence)
            if S is not None:
                return unflatten_batch(S.to(M.dtype), batch_shape)
            singular = True
        lower, target = AUTO_TARGETS[compute_dtype]
        X = _normalize_trace(X, 1.01, eps, compute_dtype)
        X = _run_sign_iteration(X, auto_schedule(lower, target))
        tol = AUTO_TOL[compute_dtype]
        X, converged = polish_until_converged(
            X, lambda Y: _run_sign_iteration(Y, [CONVERGENT_QUINTIC]), tol
        )
        if not converged and check_convergence:
            if singular:
                raise MatrixSignConvergenceError(
                    "mcsgn: M has eigenvalues on or too near the imaginary axis, or is singular: "
                    "a Newton iterate was numerically singular, and the polynomial iteration "
                    f"did not converge to tol={tol:g} either (for exact zero eigenvalues, which "
                    "map to 0, pass an int `steps`)"
                )
            raise MatrixSignConvergenceError(
                f"mcsgn(steps='auto') did not converge to tol={tol:g}: the symmetric M has "
                f"eigenvalues below {lower:g}·√tr(M²) (for exact zeros, which map to 0, pass an "
                "int `steps`)"
            )
        bound = 0.0
    else:
        coeffs, factor = schedule(method, steps)
        iterate = functools.partial(
            _normalized_sign_iteration,
            coeffs=tuple(map(tuple, coeffs)), factor=factor, eps=eps, dtype=compute_dtype,
        )  # fmt: skip
        if cuda_graph and _graphs.ns_graph_applies(X):
            X = _graphs.replay_or_capture(iterate, X)
        else:
            X = iterate(X)
        bound = _scalar_residual_bound(coeffs, factor, 1e-3) if check_convergence else 0.0

    if check_convergence:
        cause = (
            "M is singular or has eigenvalues on or too near the imaginary axis (a Newton "
            "iterate was numerically singular; the polynomial iteration run instead handles "
            "exact zero eigenvalues only)"
            if singular
            else "M has complex eigenvalues or eigenvalues on or near the imaginary axis, "
            "which this polynomial schedule cannot map to ±1 (steps='auto' handles complex "
            "eigenvalues)"
        )
        if not bool(torch.isfinite(X).all()):
            raise MatrixSignConvergenceError(f"mcsgn diverged (non-finite iterate): {cause}")
        residual, growth = _cubic_residual(X)
        # ρ(S³ − S) ≤ ‖S³ − S‖_F, so every eigenvalue's scalar residual |f³ − f| is below the
        # limit; √n sums the n eigenvalues' residuals, and ‖S‖²_F/n measures the non-normality
        # that amplifies them and the rounding.
        n = X.shape[-1]
        limit = (bound + _RESIDUAL_SLACK[compute_dtype]) * n**0.5 * growth
        bad = ~(residual <= limit)
        if bool(bad.any()):
            worst = float((residual / limit).max())
            detail = (
                cause
                if singular
                else "M has complex eigenvalues, eigenvalues near the imaginary axis, or "
                "nonzero eigenvalues too small for this schedule (try steps='auto')"
            )
            raise MatrixSignConvergenceError(
                f"mcsgn did not converge: ‖S³ − S‖_F is {worst:.3g}× its limit for "
                f"{int(bad.sum())} of {bad.numel()} matrices; {detail}"
            )
    return unflatten_batch(X.to(M.dtype), batch_shape)


def is_meta(x: object) -> bool:
    """Whether ``x`` is a meta tensor (shape only), whose finiteness cannot be checked.

    The public functions test this before the op, whose fake implementation would otherwise
    answer for a meta tensor without the error the finiteness check gives.
    """
    return isinstance(x, torch.Tensor) and x.is_meta


@torch.library.custom_op("matfn::mcsgn", mutates_args=())
def mcsgn_op(
    M: torch.Tensor,
    method: str,
    table: list[float],
    steps: int | None,
    auto: bool,
    eps: float,
    compute_dtype: torch.dtype,
    check_finite: bool,
    check_convergence: bool,
    cuda_graph: bool,
) -> torch.Tensor:
    """The compute path of :func:`mcsgn` as one opaque op (``torch.ops.matfn.mcsgn``).

    Arguments are :func:`mcsgn`'s after validation, ``method``/``table`` and ``steps``/``auto``
    encoded as for ``torch.ops.matfn.msign`` (:func:`matfn.msign.op_method`,
    :func:`matfn.msign.op_steps`); ``compute_dtype`` resolved.
    Everything that reads values runs here: the finiteness check, the symmetry test that picks
    the path, the Newton iteration and the polishing to a tolerance, the convergence checks and
    their :class:`MatrixSignConvergenceError` (raised unchanged to the caller). Needs a
    non-empty ``M``; returns a new contiguous tensor of ``M``'s shape and dtype.
    """
    if check_finite:
        assert_finite(M, "M")
    chosen, steps_ = from_op(method, table, steps, auto)
    out = _mcsgn_compute(M, chosen, steps_, eps, compute_dtype, check_convergence, cuda_graph)
    return out.contiguous()


@mcsgn_op.register_fake
def _mcsgn_fake(M: torch.Tensor, *options) -> torch.Tensor:
    return M.new_empty(M.shape)


def _mcsgn_setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    M, _method, _table, _steps, _auto, eps, compute_dtype, _finite, check_convergence, _ = inputs
    ctx.save_for_backward(M)
    ctx.eps = eps
    ctx.compute_dtype = compute_dtype
    ctx.check_convergence = check_convergence


def _mcsgn_vjp(
    M: torch.Tensor,
    G: torch.Tensor,
    *,
    eps: float = 1e-30,
    compute_dtype: torch.dtype | None = None,
    check_convergence: bool = True,
) -> torch.Tensor:
    r"""The backward pass of :func:`mcsgn`: ``L(Mᵀ, G)``, the adjoint Fréchet derivative.

    ``L(M, E)`` is the Fréchet derivative of the exact sign at ``M`` in the direction ``E``.

    ``mcsgn([[X, E], [0, X]]) = [[mcsgn(X), L(X, E)], [0, mcsgn(X)]]`` (Higham, Functions of
    Matrices, Thm 3.6), and ``L(M, ·)* = L(Mᵀ, ·)`` since the sign has a real power series
    about each eigenvalue: so the gradient is the top-right block of mcsgn (``steps="auto"``)
    of the ``2n × 2n`` block matrix ``[[Mᵀ, αG], [0, Mᵀ]]``, divided by ``α``. ``α =
    max|Mᵢⱼ|/max|Gᵢⱼ|`` (float64) brings ``G`` to ``M``'s scale (L is linear in G), so the
    blocks are balanced for any scaling of either. Cost: one mcsgn of side ``2n`` (Newton
    path: about 8× the forward's Newton path, whose inversions cost ``n³``). Raises
    :class:`MatrixSignConvergenceError` where the derivative does not exist (an eigenvalue on
    the imaginary axis, a singular M). Calls ``torch.ops.matfn.mcsgn``, so it compiles.
    """
    if compute_dtype is None:
        compute_dtype = torch.float64 if M.dtype == torch.float64 else torch.float32
    n = M.shape[-1]
    Mt = M.mT
    m_max = M.abs().amax(dim=(-2, -1), keepdim=True).to(torch.float64)
    g_max = G.abs().amax(dim=(-2, -1), keepdim=True).to(torch.float64)
    alpha = torch.where((g_max > 0) & (m_max > 0), m_max / g_max, torch.ones_like(g_max))
    top = torch.cat([Mt, (G.to(torch.float64) * alpha).to(M.dtype)], dim=-1)
    bottom = torch.cat([torch.zeros_like(Mt), Mt], dim=-1)
    Z = torch.cat([top, bottom], dim=-2)
    S = torch.ops.matfn.mcsgn(
        Z, "polar_express", [], None, True, eps, compute_dtype, False, check_convergence, False
    )
    return (S[..., :n, n:].to(torch.float64) / alpha).to(M.dtype)


def _mcsgn_backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN202
    (M,) = ctx.saved_tensors
    grad_M = None
    if ctx.needs_input_grad[0]:
        grad_M = _mcsgn_vjp(
            M,
            grad,
            eps=ctx.eps,
            compute_dtype=ctx.compute_dtype,
            check_convergence=ctx.check_convergence,
        )
    return (grad_M,) + (None,) * 9


mcsgn_op.register_autograd(_mcsgn_backward, setup_context=_mcsgn_setup_context)


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

    For ``M = P Λ P⁻¹``, ``mcsgn(M) = P sign(Re Λ) P⁻¹``: every eigenvalue becomes ±1 by the
    sign of its real part (complex eigenvalues included; 0 stays 0 on the fixed-step path). Unlike
    msign (orthogonally invariant, acts on singular values) it is similarity-invariant and acts on
    eigenvalues; the two agree for symmetric M. It is scale-invariant, ``mcsgn(sM) = mcsgn(M)``
    for ``s > 0``, for any finite scaling (the input is divided by its largest entry first).

    Parameters
    ----------
    M : torch.Tensor
        Real square ``(..., n, n)`` tensor, any batch dims, no eigenvalue on the imaginary axis
        (exact zeros are allowed with an int ``steps``).
    method : str or sequence of (a, b, c)
        Newton–Schulz schedule as in :func:`matfn.msign`, a per-step table ``[(a, b, c), …]``
        included, for symmetric input and for int ``steps``; ``"svd"`` means the exact
        eigendecomposition reference (``torch.linalg.eig``, float64). A table runs from
        ``X₀ = M / √tr(M²)`` (``sf = 1``): each step is the same odd quintic
        ``a x + b x³ + c x⁵``, applied to the eigenvalues (docs/math.md §2.2), so an msign table
        lifts ``|λ|`` as it lifts ``σ``.
    steps : int, "auto" or None
        ``None`` with ``polar_express`` means ``"auto"``: iterate until converged for the
        compute dtype, check, and raise :class:`MatrixSignConvergenceError` if not (the path is
        chosen from the input, see Notes). An int runs that many steps of the polynomial
        schedule (fixed cost, real eigenvalues only) and then checks the result exactly; it
        raises where the schedule did not converge. With ``check_finite=False`` and
        ``check_convergence=False`` an int needs no host sync (CUDA-graph capturable). A table
        (or a named table) runs its own length: ``steps`` must be None or that length.
    eps : float
        Floor of the polynomial path's normaliser ``√tr(M²)``; mcsgn(0) = 0 there. The Newton
        path has no normaliser to floor (a singular M raises).
    compute_dtype : torch.dtype, optional
        Iteration dtype. Default float64 for float64 input, else float32 (also on CUDA:
        mcsgn solves equations, where bf16 is too coarse). The Newton path inverts matrices,
        which needs float32 at least: there a half-precision ``compute_dtype`` means float32.
    check_finite : bool
        Raise on NaN/Inf input (one host sync).
    check_convergence : bool
        Verify the result (see Raises; the checks cost a few products, and on the Newton path
        a second Newton run for the axis-distance test). ``False`` returns the last iterate
        unchecked, possibly non-finite.
    cuda_graph : bool
        Replay the normalisation and the iteration from a CUDA graph captured for this input
        geometry and these options (see :func:`matfn.msign`; the convergence check, if any,
        runs after it). Ignored (eager) on CPU, for ``steps="auto"`` (the default with
        ``polar_express``: it syncs with the host), ``method="svd"`` and GPU-bound inputs.

    Returns
    -------
    torch.Tensor
        ``S ≈ mcsgn(M)``, same shape and dtype as ``M``.

    Raises
    ------
    TypeError, ValueError
        Bad input or a malformed table (see :func:`matfn.msign`); non-square ``M``;
        ``steps="auto"`` with a method other than ``polar_express``.
    MatrixSignConvergenceError
        The message names the cause. ``steps="auto"``, non-symmetric M: an eigenvalue on or
        within ``τ·‖M‖_F`` of the imaginary axis (``τ`` = 1e-10 in float64, 1e-4 in float32;
        :data:`AXIS_DISTANCE`), no convergence in :data:`matfn._newton.NEWTON_MAX_STEPS` steps,
        or ``‖S² − I‖_F > 1e-8·max(1, ‖S‖²_F)`` (float32: 1e-3; eigenvectors too
        ill-conditioned for the dtype); a singular M goes to the polynomial path, which keeps
        exact zero eigenvalues at 0 only where the structure keeps them exact (e.g. a rank-one
        ``v 1ᵀ``) and raises otherwise. ``steps="auto"``, symmetric M: nonzero eigenvalues
        below the schedule's resolution (about 1e-7·√tr(M²) in float64, 1e-6 in float32) or
        exact zeros. Int ``steps``: a non-finite iterate, or ``‖S³ − S‖_F`` above the schedule's
        own accuracy, ``max |f³ − f|`` of its scalar map f on ``[1e-3, 1]`` plus rounding slack,
        times ``√n·max(1, ‖S‖²_F/n)`` (complex eigenvalues, eigenvalues near the axis or just
        below the schedule's range). That scalar bound is 1e-15 for 8 or more Polar-Express
        steps but about 0.3 for the 5-step tables, which are approximate by design and raise
        only on gross failure; eigenvalues far below the range are mapped towards 0, as exact
        zeros are, and are not distinguished from them.

    Notes
    -----
    **Paths.** ``steps="auto"`` (the default) looks at the input once (``M == Mᵀ``, exact):

    * *non-symmetric M*: the scaled Newton iteration ``X₀ = M/‖M‖_F``,
      ``X ← (μX + (μX)⁻¹)/2`` with Frobenius-norm scaling ``μ = (‖X⁻¹‖_F/‖X‖_F)^{1/2}``
      (per matrix; ``μ = 1`` once a step moves X by less than 1e-2), until the relative change
      is below ``4u√n`` or stops halving. Each eigenvalue follows the scalar map
      ``z ← (μz + 1/(μz))/2``, which keeps the sign of ``Re z`` and converges to it from
      anywhere off the imaginary axis, so complex spectra converge (a real polynomial cannot
      move a complex eigenvalue to ±1). Cost per step: one inversion (``≈ 2n³`` FLOPs by LU)
      and a few norms; about 8–15 steps for eigenvalues at up to 87° from the real axis,
      ``~log₂(1/δ)`` for relative distance δ from the axis. The checks: ``‖S² − I‖_F``
      computed exactly, then the *shift test*: ``S`` commutes with ``M``, so
      ``M − τ‖M‖_F·S`` has the eigenvalues ``λ − τ‖M‖_F·sign(Re λ)`` (also for non-normal
      M); its sign equals ``S`` unless some ``|Re λ| < τ‖M‖_F``, which then crosses the axis
      and moves the sign by at least 2 (``ρ(S' − S) = 2``). It costs a second Newton run.
      Zero matrices give exact zeros; if an iterate is numerically singular (a singular M, or
      an eigenvalue on the axis) the polynomial path below runs instead, with its checks.
    * *symmetric M* (real eigenvalues, orthogonal eigenvectors: the msign-derived uses such
      as ``[[0, C], [Cᵀ, 0]]``): the Polar-Express Newton–Schulz schedule
      ``X ← a X + (b X² + c X⁴) X`` of :func:`matfn.msign` (``steps="auto"``) from
      ``X₀ = M/(1.01·√tr(M²))``, then convergent quintic polishing; matrix products only
      (``6n³`` FLOPs per step, fast on GPUs), accuracy about ``u·n``.

    An int ``steps`` always runs the polynomial schedule (eigenvalues must be real), then
    computes ``‖S³ − S‖_F`` in float64: ``S³ − S = P (f³ − f)(Λ) P⁻¹`` for the scalar
    composition f, so ``max_λ |f(λ)³ − f(λ)| = ρ(S³ − S) ≤ ‖S³ − S‖_F`` and no unconverged
    eigenvalue can hide (``csgn`` takes values in {−1, 0, 1}, so exact zeros pass).

    **Accuracy** (relative Frobenius error against the exact ``P sign(Λ) P⁻¹``, tested with
    hypothesis on ``Q D Q⁻¹``, ``κ₂(Q)`` controlled, complex pairs at 0°–87°, moduli spread
    ≤ 1e2, scales 1e-3–1e3, n ≤ 24): float64 Newton ≤ 1e-10 for ``κ₂(Q) ≤ 1e3`` (measured
    ≤ 4e-12); for ``κ₂(Q) ≤ 1e5`` within 10× of ``scipy.linalg.signm`` or below the
    inversion floor ``u·‖S‖²_F`` (of 400 random cases one was 13× signm's error, at 8e-10;
    signm itself was off by more than 1e-6 in 39); float32 Newton about ``u·κ₂(Q)²``
    (measured 3e-7–2e-6 for ``κ₂(Q) ≤ 10``, 3e-5 for 1e2). Scale invariance tested from
    1e-300 to 1e300 (float64) and 1e-30 to 1e30 (float32) on all three paths.

    **Host synchronisation.** ``steps="auto"`` (the default with ``polar_express``) always
    synchronises with the host: the symmetry test picks the path, and the Newton iteration and
    the polishing stop on a tolerance. ``check_convergence=True`` synchronises (its tests decide
    from the values whether to raise, which no deferred device-side flag can do without
    returning unchecked results), and so does ``check_finite=True``. An int ``steps`` (or a
    table) with ``check_finite=False`` and ``check_convergence=False`` only launches work: no
    host sync, so the call can be captured in the caller's ``torch.cuda.graph``.

    **torch.compile and torch.export.** The compute path is the custom op
    ``torch.ops.matfn.mcsgn`` (one opaque node); the option checks above it are traced, so
    ``torch.compile(mcsgn, fullgraph=True)`` and ``torch.export`` work, with the Triton kernels
    and every data-dependent step inside the op.

    **Autograd** (reverse mode). The backward pass is the adjoint Fréchet derivative of the
    exact sign, ``∂M = L(Mᵀ, G)``, the top-right block of the sign of
    ``[[Mᵀ, G], [0, Mᵀ]]`` (Higham, Thm 3.6; ``G`` rescaled to ``M``'s size), computed by this
    function with ``steps="auto"`` whatever schedule the forward ran: for a short fixed
    schedule it is the derivative of the sign the schedule approximates, not of the
    polynomial. It raises :class:`MatrixSignConvergenceError` where the sign is not
    differentiable (an eigenvalue on or near the imaginary axis, a singular M). Cost: one
    mcsgn of side 2n. Forward-mode AD (dual tensors, ``torch.func.jvp``) is not supported.

    References
    ----------
    N. J. Higham, "Functions of Matrices", SIAM 2008, ch. 5 (§5.3 Newton, §5.5 scaling).
    C. Kenney, A. J. Laub, "The matrix sign function", IEEE Trans. Autom. Control 40 (1995).
    Su Jianlin, kexue.fm/archives/11056 (2025).

    Examples
    --------
    >>> import torch, matfn
    >>> M = torch.tensor([[2.0, 1.0], [0.0, -3.0]], dtype=torch.float64)
    >>> matfn.mcsgn(M, steps="auto")
    tensor([[ 1.0000,  0.4000],
            [ 0.0000, -1.0000]], dtype=torch.float64)
    >>> R = torch.tensor([[1.0, -2.0], [2.0, 1.0]], dtype=torch.float64)  # eigenvalues 1 ± 2i
    >>> matfn.mcsgn(R)
    tensor([[1., 0.],
            [0., 1.]], dtype=torch.float64)
    """
    # Options and shapes only (traceable); the values are read inside the op. A meta tensor
    # has no values to check: check_matrix names it.
    check_matrix(M, "M", square=True, check_finite=check_finite and is_meta(M))
    method = check_options(method, steps, "auto")
    if M.numel() == 0:
        return torch.empty_like(M)
    if method != "svd":
        if compute_dtype is None:
            compute_dtype = torch.float64 if M.dtype == torch.float64 else torch.float32
        if steps is None and method == "polar_express":
            steps = "auto"
        if steps == "auto" and method != "polar_express":
            raise ValueError(f"steps='auto' uses the Polar-Express schedule; got method={method!r}")
    elif compute_dtype is None:
        compute_dtype = torch.float64
    name, table = op_method(method)
    return torch.ops.matfn.mcsgn(
        M,
        name,
        table,
        *op_steps(steps),
        float(eps),
        compute_dtype,
        bool(check_finite),
        bool(check_convergence),
        bool(cuda_graph),
    )
