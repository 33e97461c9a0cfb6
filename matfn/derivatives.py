r"""The derivative of msign: JVP and VJP through a Lyapunov equation, and the autograd Function.

For ``M = U Σ Vᵀ`` of rank r the derivative of ``O = msign(M) = U_r V_rᵀ`` is the linear map
(docs/math.md §4.2, Daleckii–Krein divided differences)

.. math:: J[dM] = U\,Y\,Vᵀ, \quad
          Y_{ij} = \begin{cases}
          (X̃_{ij} − X̃_{ji})/(σ_i + σ_j) & i, j ≤ r \\
          X̃_{ij}/(σ_i + σ_j) & \text{exactly one of } i, j ≤ r \\
          0 & i, j > r\end{cases}, \qquad X̃ = Uᵀ\,dM\,V.

``J`` is self-adjoint (msign is the gradient of the nuclear norm ``‖M‖_*``, so ``J`` is its
Hessian): :func:`msign_vjp` and :func:`msign_jvp` compute the same map, and both are provided
for readability at call sites.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch.autograd.function import once_differentiable

from . import _scaling
from ._autocast import autocast_disabled, no_autocast
from ._batching import flatten_batch, to_wide, unflatten_batch
from ._validation import (
    assert_all_finite,
    check_compute_dtype,
    check_matrix,
    check_rank_tol,
    check_same_device,
)
from .coefficients import CONVERGENT_QUINTIC
from .mcsgn import MatrixSignConvergenceError
from .msign import (
    AUTO_TOL,
    Method,
    Steps,
    forward_is_exact,
    in_result_layout,
    msign,
    newton_schulz_torch,
    normalize,
    polish_until_converged,
    register_autograd,
    result_like,
    run_newton_schulz,
)
from .sylvester import _solve_flat, schedule_from

__all__ = ["msign_jvp", "msign_vjp", "msign_jvp_op", "msign_vjp_op", "MsignFunction"]

Route = Literal["auto", "sylvester", "svd"]
ROUTES = ("auto", "sylvester", "svd")


def _compute_dtype(dtype: torch.dtype, compute_dtype: torch.dtype | None) -> torch.dtype:
    if compute_dtype is None:
        return torch.float64 if dtype == torch.float64 else torch.float32
    return compute_dtype


def _default_rank_tol(n: int, m: int, dtype: torch.dtype) -> float:
    """``max(n, m)·ε``: singular values ``≤ rank_tol·σ₁`` count as zero, as in msign's SVD."""
    return max(n, m) * torch.finfo(dtype).eps


def _derivative_svd(M: torch.Tensor, D: torch.Tensor, rank_tol: float) -> torch.Tensor:
    """``J[D]`` at wide ``M`` ``(B, n, m)``, ``n ≤ m``, by the SVD (pseudo-inverse convention).

    With the rank-r parts ``U_r, V_r, Σ_r`` (masked columns, so r may vary over the batch) and
    ``X̃ = U_rᵀ D V_r``:
    ``J[D] = U_r [Γ ∘ (X̃ − X̃ᵀ)] V_rᵀ + U_r Σ_r⁻¹ (U_rᵀ D − X̃ V_rᵀ) + (D V_r − U_r X̃) Σ_r⁻¹ V_rᵀ``
    with ``Γᵢⱼ = 1/(σᵢ + σⱼ)``: the range–range, range–null and null–range blocks of
    docs/math.md §4.2; the null–null block is 0. Cost: one thin SVD plus ``O(n²m)`` products.
    """
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    keep = S > rank_tol * S[..., :1]
    S_safe = torch.where(keep, S, torch.ones_like(S))
    inv = torch.where(keep, 1.0 / S_safe, torch.zeros_like(S))
    Ur = U * keep.unsqueeze(-2).to(U.dtype)
    Vr = Vh.mT * keep.unsqueeze(-2).to(U.dtype)
    pair = keep.unsqueeze(-1) & keep.unsqueeze(-2)
    gamma = torch.where(pair, 1.0 / (S_safe.unsqueeze(-1) + S_safe.unsqueeze(-2)), 0.0)
    UtD = Ur.mT @ D  # (B, n, m)
    Xt = UtD @ Vr  # (B, n, n)
    Y = gamma * (Xt - Xt.mT)
    out = Ur @ Y @ Vr.mT
    out = out + (Ur * inv.unsqueeze(-2)) @ (UtD - Xt @ Vr.mT)
    out = out + ((D @ Vr - Ur @ Xt) * inv.unsqueeze(-2)) @ Vr.mT
    return out


def _sigma_min_estimate(M: torch.Tensor) -> float | None:
    """A lower-bound guess of ``σ_min`` over a unit-Frobenius wide batch, or None.

    Inverse iteration on the Gram matrix ``M Mᵀ`` through its Cholesky factor (``n³/3`` plus
    ``O(n²)`` per iteration): the Rayleigh quotient converges to ``σ_min²`` from above, so the
    result is divided by 4 for safety. None when the Gram matrix is not numerically positive
    definite (``σ_max/σ_min ≳ 1/√ε``): the caller then assumes the dtype's resolution.
    """
    gram = M @ M.mT
    L, info = torch.linalg.cholesky_ex(gram)
    if bool((info != 0).any()):
        return None
    gen = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(M.shape[0], M.shape[-2], 2, generator=gen, dtype=M.dtype).to(M.device)
    for _ in range(6):
        v = torch.cholesky_solve(v, L)
        v = v / torch.linalg.vector_norm(v, dim=-2, keepdim=True).clamp_min(1e-30)
    rayleigh = (v * (gram @ v)).sum(dim=-2).amin()
    est = float(rayleigh.clamp_min(0).sqrt()) / 4
    return est if est > 0 and est == est else None


def _quantized(lower: float) -> float:
    """Round down to a power of 10^(1/4) in ``[1e-7, 1e-2]``, so cached schedules are reused.

    Capped at 1e-2: the schedules are short there already, and the generator is only
    exercised on that range here.
    """
    return 10.0 ** (min(-8, max(-28, math.floor(4 * math.log10(lower)))) / 4)


def _exact_msign_wide(
    M: torch.Tensor, compute_dtype: torch.dtype, lower: float | None = None
) -> torch.Tensor:
    """msign of a unit-Frobenius wide batch, iterated to convergence for the dtype.

    ``lower``: a lower bound on ``σ_min/‖M‖_F`` that shortens the Polar-Express schedule
    (default: the dtype's resolution, as ``steps="auto"``), then convergent quintic polishing.
    """
    X = normalize(M, 1.01, torch.finfo(compute_dtype).tiny, compute_dtype)
    X = run_newton_schulz(X, schedule_from(lower, compute_dtype), "auto")
    # Non-convergence means numerical rank deficiency, which the caller detects itself.
    X, _ = polish_until_converged(
        X, lambda Y: newton_schulz_torch(Y, [CONVERGENT_QUINTIC]), AUTO_TOL[compute_dtype]
    )
    return X.to(M.dtype)


def _derivative_sylvester(
    M: torch.Tensor,
    D: torch.Tensor,
    O: torch.Tensor,
    compute_dtype: torch.dtype,
    lower: float | None = None,
) -> torch.Tensor:
    """``J[D]`` at full-rank wide ``M`` ``(B, n, m)`` by the short-side Lyapunov route.

    With ``P = M Oᵀ = (M Mᵀ)^{1/2}`` (n×n, SPD) and ``L_P(W) = P W + W P``:
    ``J[D] = L_P⁻¹(D Oᵀ − O Dᵀ)·O + P⁻¹ D (I − Oᵀ O)``. Raises ``ValueError`` /
    :class:`MatrixSignConvergenceError` from the solver when ``P`` is too ill-conditioned, and
    ``torch.linalg.LinAlgError`` when the Cholesky factorisation of ``P`` fails.
    """
    P = M @ O.mT
    P = 0.5 * (P + P.mT)
    DOt = D @ O.mT
    # The block [[P, ·], [0, −P]] is normalised by 1.01·√2·‖P‖_F = 1.01·√2 (unit ‖M‖_F).
    lyap_lower = None if lower is None else _quantized(lower / math.sqrt(2))
    W = _solve_flat(P, None, DOt - DOt.mT, compute_dtype, lower=lyap_lower)
    out = (0.5 * (W - W.mT)) @ O
    if M.shape[-2] < M.shape[-1]:
        L, info = torch.linalg.cholesky_ex(P)
        if bool((info != 0).any()):
            raise torch.linalg.LinAlgError("P = (M Mᵀ)^{1/2} is not positive definite")
        out = out + torch.cholesky_solve(D - DOt @ O, L)
    return out


def _derivative(
    M: torch.Tensor,
    D: torch.Tensor,
    *,
    method: Route,
    compute_dtype: torch.dtype | None,
    rank_tol: float | None,
    O: torch.Tensor | None = None,
) -> torch.Tensor:
    """The shared core of msign_jvp / msign_vjp (inputs validated)."""
    out_dtype = torch.promote_types(M.dtype, D.dtype)
    if M.is_meta or D.is_meta:
        return torch.empty(M.shape, dtype=out_dtype, device="meta")
    if M.numel() == 0:
        return torch.zeros(M.shape, dtype=out_dtype, device=M.device)
    cdt = _compute_dtype(out_dtype, compute_dtype)
    # J is homogeneous of degree −1 in M and linear in D: J_M[D] = 2^{e_D − e_M} J_{M'}[D'] with
    # M' = 2^{−e_M} M, D' = 2^{−e_D} D (largest entries in [½, 1), exact), so no product or
    # norm below over- or underflows for any finite input; bitwise neutral for in-range ones.
    Mf, batch_shape = flatten_batch(M)
    Df, _ = flatten_batch(D.expand(M.shape))
    e_M, e_D = _scaling.exponents(Mf), _scaling.exponents(Df)
    Mf = _scaling.scale_pow2(Mf, -e_M).to(cdt)
    Df = _scaling.scale_pow2(Df, -e_D).to(cdt)
    Mf, transposed = to_wide(Mf)
    Df = Df.mT if transposed else Df
    n, m = Mf.shape[-2:]
    tol = _default_rank_tol(n, m, cdt) if rank_tol is None else float(rank_tol)
    # msign(cM) = msign(M), so J_M[D] = J_{M/s}[D/s]. Working at unit norm keeps the
    # iteration and the products in range for any scale.
    scale = torch.linalg.matrix_norm(Mf, keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    Mu, Du = Mf / scale, Df / scale

    def svd_route(idx: torch.Tensor | None = None) -> torch.Tensor:
        if idx is None:
            return _derivative_svd(Mu, Du, tol)
        return _derivative_svd(Mu[idx], Du[idx], tol)

    if method == "svd":
        out = svd_route()
    else:
        lower = _sigma_min_estimate(Mu)
        if O is None:
            Ow = _exact_msign_wide(Mu, cdt, None if lower is None else _quantized(lower))
        else:
            Ow, _ = flatten_batch(O.to(cdt))
            Ow = Ow.mT if transposed else Ow
        # After steps="auto" every singular value above the dtype's resolution is 1 and the
        # rest stay far below it, so ‖O‖²_F counts the numerical rank.
        deficient = (n - Ow.square().sum(dim=(-2, -1))) > 0.5
        if method == "sylvester" and bool(deficient.any()):
            raise ValueError(
                "`M` is numerically rank-deficient (singular values below the dtype's "
                "resolution); method='sylvester' needs full rank: use method='auto' or 'svd'"
            )
        full = ~deficient
        try:
            if bool(full.all()):
                out = _derivative_sylvester(Mu, Du, Ow, cdt, lower)
            else:
                out = torch.empty_like(Mu)
                if bool(full.any()):
                    out[full] = _derivative_sylvester(Mu[full], Du[full], Ow[full], cdt, lower)
                out[deficient] = svd_route(deficient)
        except (MatrixSignConvergenceError, ValueError, torch.linalg.LinAlgError) as err:
            if method == "sylvester":
                raise ValueError(
                    f"method='sylvester' failed ({err}); `M` is too ill-conditioned for the "
                    "compute dtype: use method='auto' or 'svd'"
                ) from err
            out = svd_route()
    if transposed:
        out = out.mT
    out = _scaling.scale_pow2(out.to(out_dtype), e_D - e_M)
    return unflatten_batch(out, batch_shape)


def _check(
    M: object,
    D: object,
    name: str,
    method: str,
    compute_dtype: object,
    rank_tol: object,
) -> float | None:
    """Validate in pure Python (traceable); return ``rank_tol`` as a float or None."""
    # The finiteness check needs the values (a host sync): the op body runs it.
    check_matrix(M, "M", check_finite=False)
    check_matrix(D, name, check_finite=False)
    check_same_device(M=M, **{name: D})
    assert isinstance(M, torch.Tensor) and isinstance(D, torch.Tensor)
    try:
        shape = torch.broadcast_shapes(M.shape, D.shape)
    except RuntimeError:
        shape = None
    if shape != M.shape or D.shape[-2:] != M.shape[-2:]:
        raise ValueError(
            f"`{name}` must have the shape of `M` {tuple(M.shape)} (or broadcast to it), "
            f"got {tuple(D.shape)}"
        )
    if method not in ROUTES:
        raise ValueError(f"`method` must be one of {ROUTES}, got {method!r}")
    check_compute_dtype(compute_dtype, allowed=(torch.float64, torch.float32))
    return check_rank_tol(rank_tol)


@no_autocast
def msign_jvp(
    M: torch.Tensor,
    dM: torch.Tensor,
    *,
    method: Route = "auto",
    compute_dtype: torch.dtype | None = None,
    rank_tol: float | None = None,
    check_finite: bool = True,
) -> torch.Tensor:
    r"""Directional derivative ``dO = J_M[dM]`` of ``O = msign(M)`` (Jacobian-vector product).

    Parameters
    ----------
    M : torch.Tensor
        Real ``(..., n, m)`` tensor, tall, wide or square, any batch dims.
    dM : torch.Tensor
        Tangent of ``M``'s shape (or broadcastable to it).
    method : {"auto", "sylvester", "svd"}
        ``"sylvester"``: the short-side Lyapunov route through the sign iteration (full-rank
        M only); ``"svd"``: the closed form with the SVD (any rank, pseudo-inverse convention);
        ``"auto"``: the first with the second as fallback for rank-deficient M.
    compute_dtype : torch.dtype, optional
        torch.float64 or torch.float32 (default: float64 for float64 inputs, else float32).
    rank_tol : float, optional
        A finite number ≥ 0: singular values ``≤ rank_tol·σ₁`` count as zero in the SVD route
        (default ``max(n, m)·ε`` of the compute dtype, as ``msign(method="svd")``).
    check_finite : bool
        Raise on NaN/Inf (one host sync).

    Returns
    -------
    torch.Tensor
        ``dO``, shape of ``M``, promoted dtype of ``M`` and ``dM``. Zero for ``M = 0``.

    Raises
    ------
    TypeError
        ``M`` or ``dM`` is not a dense real floating tensor; ``compute_dtype`` is not a
        ``torch.dtype``; ``rank_tol`` is not a number.
    ValueError
        Fewer than 2 dims, mismatched shapes, mixed devices, NaN/Inf, unknown ``method``,
        ``compute_dtype`` other than float64/float32, ``rank_tol`` negative or not finite;
        ``method="sylvester"`` with numerically rank-deficient ``M``.

    Notes
    -----
    Let ``O = msign(M)``, wide orientation ``n ≤ m`` (tall inputs are transposed), ``M`` full
    rank, ``P = M Oᵀ = (M Mᵀ)^{1/2}`` (n×n, symmetric positive definite) and
    ``L_P(W) = P W + W P``. Differentiating ``M = P O`` with ``O Oᵀ = I`` gives
    (a variant of docs/math.md §4.3 that needs no ``P⁻¹`` for square M):

    .. math:: J[D] = L_P^{-1}(D Oᵀ − O Dᵀ)\, O + P^{-1} D (I − Oᵀ O),

    the second term only for ``n < m``. Route ``"sylvester"``: ``O`` by a Polar-Express msign
    iterated to convergence for the compute dtype, the Lyapunov equation by
    :func:`matfn.solve_sylvester`'s block sign iteration on the short side (``2n × 2n``, no ε:
    ``P`` is nonsingular), ``P⁻¹`` by a Cholesky solve. Both schedules start from a lower bound
    on ``σ_min/‖M‖_F`` estimated by inverse iteration on the Cholesky factor of ``M Mᵀ``
    (divided by 4 for safety; the dtype's resolution when ``M Mᵀ`` is not numerically positive
    definite), then polish with ``(15/8, −10/8, 3/8)`` steps until converged. Cost: the msign
    (``T`` steps of ``4n²m + 2n³``) + the Lyapunov solve (``T'`` steps of ``18 n³``) +
    ``n³/3 + O(n²m)``, with ``T, T' ≈ 9–11`` in float32 for σ₁/σ_min ≤ 1e2 (14 at the float32
    resolution); no intermediates are stored. Backprop through ``T`` unrolled Newton–Schulz
    steps costs about ``3T`` steps' FLOPs, stores ``T`` iterates, and differentiates the
    truncated polynomial instead of msign.

    Route ``"svd"``: the closed form above with the thin SVD, rank cut-off
    ``σ > rank_tol·σ₁`` and the **pseudo-inverse convention** for rank-deficient ``M``
    (docs/math.md §4.4): range–null and null–range entries ``X̃ᵢⱼ/σ_{nonzero}``, null–null entries 0.
    msign is discontinuous at rank-deficient M; this is its exact derivative along
    rank-preserving directions (``dM = U_r K Vᵀ`` or ``U K V_rᵀ``) and equals Su's ``ε → 0``
    limit of the ε-regularised Sylvester solve whenever that limit exists. No ε bias.

    Route ``"auto"`` (default): ``"sylvester"`` for the matrices of the batch whose msign has
    full numerical rank (``min(n, m) − ‖O‖²_F ≤ 0.5``), ``"svd"`` for the others, and ``"svd"``
    for the whole batch if the Lyapunov solve or the Cholesky factorisation fails.

    Accuracy against the float64 SVD formula (relative Frobenius error): float64 about
    1e-12–1e-10; float32 about 1e-6·(σ₁/σ_min) for well-conditioned M (σ₁/σ_min ≤ 1e2:
    1e-5 checked in the tests). ``J`` is homogeneous of degree −1 (``J_{cM} = J_M / c``) and
    ``J_M[M] = 0``.

    Scale: any finite ``M`` and ``dM`` (1e-30 … 1e30 in float32): both are rescaled by powers of
    two to largest entry in ``[½, 1)`` first and the result scaled back by ``2^{e_D − e_M}``
    (exact; bitwise neutral for in-range inputs), so no product or norm over- or underflows
    unless the result itself does. Meta tensors propagate shape and dtype; autocast is off
    inside.

    Synchronisation: routes ``"sylvester"`` and ``"auto"`` iterate to a tolerance, so they
    synchronise with the host (the σ_min estimate, the rank test, one sync per polishing step
    of the msign and Lyapunov iterations); route ``"svd"`` with ``check_finite=False`` issues
    no host sync of its own. The computation is the custom op ``torch.ops.matfn.msign_jvp``
    (one node under ``torch.compile(fullgraph=True)`` and ``torch.export``), differentiable in
    ``dM`` (``J`` is linear and self-adjoint) but not in ``M``.

    References
    ----------
    Su Jianlin, "msign的导数" (kexue.fm/archives/11025) and "SVD的导数" (10878), 2025.
    N. J. Higham, "Functions of Matrices", SIAM 2008, §8.1 (Fréchet derivative of the polar
    factor).

    Examples
    --------
    >>> import torch, matfn
    >>> M = torch.tensor([[3.0, 1.0], [0.0, 2.0]], dtype=torch.float64)
    >>> dM = torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    >>> h = 1e-6
    >>> plus, minus = matfn.msign(M + h * dM, method="svd"), matfn.msign(M - h * dM, method="svd")
    >>> fd = (plus - minus) / (2 * h)
    >>> torch.allclose(matfn.msign_jvp(M, dM), fd, atol=1e-8)
    True
    """
    rank_tol = _check(M, dM, "dM", method, compute_dtype, rank_tol)
    if M.is_meta or dM.is_meta:
        return torch.empty(M.shape, dtype=torch.promote_types(M.dtype, dM.dtype), device="meta")
    return torch.ops.matfn.msign_jvp(M, dM, method, compute_dtype, rank_tol, check_finite)


@no_autocast
def msign_vjp(
    M: torch.Tensor,
    G: torch.Tensor,
    *,
    method: Route = "auto",
    compute_dtype: torch.dtype | None = None,
    rank_tol: float | None = None,
    check_finite: bool = True,
) -> torch.Tensor:
    r"""Gradient with respect to ``M`` of a loss whose gradient at ``O = msign(M)`` is ``G``.

    The vector-Jacobian product ``J_Mᵀ[G]``, i.e. the backward pass of msign. ``J`` is
    self-adjoint (the Hessian of the nuclear norm), so this is the same linear map as
    :func:`msign_jvp`; docs/math.md §4.1's Sylvester form ``(M Oᵀ) X + X (Oᵀ M) = G``,
    ``∇_M = X − O Xᵀ O`` agrees with it (checked in the tests).

    Parameters
    ----------
    M : torch.Tensor
        Real ``(..., n, m)`` tensor, tall, wide or square, any batch dims.
    G : torch.Tensor
        Cotangent ``∂L/∂O`` of ``M``'s shape (or broadcastable to it).
    method : {"auto", "sylvester", "svd"}
        As in :func:`msign_jvp`.
    compute_dtype : torch.dtype, optional
        float64 or float32 (default: float64 for float64 inputs, else float32).
    rank_tol : float, optional
        As in :func:`msign_jvp`.
    check_finite : bool
        Raise on NaN/Inf (one host sync).

    Returns
    -------
    torch.Tensor
        ``∂L/∂M``, shape of ``M``, promoted dtype of ``M`` and ``G``. Zero for ``M = 0``.

    Raises
    ------
    TypeError
        ``M`` or ``G`` is not a dense real floating tensor.
    ValueError
        As in :func:`msign_jvp`.

    Notes
    -----
    Routes, cost, accuracy and host syncs as in :func:`msign_jvp` (the same linear map; the
    custom op is ``torch.ops.matfn.msign_vjp``, which is also msign's backward).

    Examples
    --------
    >>> import torch, matfn
    >>> M = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]], dtype=torch.float64)
    >>> G = torch.ones(2, 3, dtype=torch.float64)
    >>> dM = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    >>> lhs = (matfn.msign_vjp(M, G) * dM).sum()
    >>> rhs = (G * matfn.msign_jvp(M, dM)).sum()
    >>> bool(torch.isclose(lhs, rhs))
    True
    """
    rank_tol = _check(M, G, "G", method, compute_dtype, rank_tol)
    if M.is_meta or G.is_meta:
        return torch.empty(M.shape, dtype=torch.promote_types(M.dtype, G.dtype), device="meta")
    return torch.ops.matfn.msign_vjp(M, G, method, compute_dtype, rank_tol, check_finite)


def _derivative_op(
    M: torch.Tensor,
    D: torch.Tensor,
    name: str,
    method: str,
    compute_dtype: torch.dtype | None,
    rank_tol: float | None,
    check_finite: bool,
    O: torch.Tensor | None = None,
) -> torch.Tensor:
    """The body of both ops: the finiteness check, then :func:`_derivative`.

    The result has :func:`matfn.msign.result_like`'s layout (what the fake implementation gives).
    """
    with autocast_disabled():
        if check_finite:
            assert_all_finite(M=M, **{name: D})
        route: Route = method  # type: ignore[assignment]
        out = _derivative(M, D, method=route, compute_dtype=compute_dtype, rank_tol=rank_tol, O=O)
        return in_result_layout(out)


@torch.library.custom_op("matfn::msign_jvp", mutates_args=())
def msign_jvp_op(
    M: torch.Tensor,
    dM: torch.Tensor,
    method: str,
    compute_dtype: torch.dtype | None,
    rank_tol: float | None,
    check_finite: bool,
) -> torch.Tensor:
    """``torch.ops.matfn.msign_jvp``: :func:`msign_jvp` of validated options, one graph node.

    The arguments are :func:`msign_jvp`'s (``rank_tol`` None: the default). The finiteness check,
    the σ_min estimate, the rank test and the iterations to a tolerance run here (host syncs;
    see :func:`msign_jvp`). Linear in ``dM``: its backward with respect to ``dM`` is ``J[grad]``
    (J is self-adjoint); with respect to ``M`` (a second derivative of msign) it raises.
    """
    return _derivative_op(M, dM, "dM", method, compute_dtype, rank_tol, check_finite)


@torch.library.custom_op("matfn::msign_vjp", mutates_args=())
def msign_vjp_op(
    M: torch.Tensor,
    G: torch.Tensor,
    method: str,
    compute_dtype: torch.dtype | None,
    rank_tol: float | None,
    check_finite: bool,
    O: torch.Tensor | None = None,
) -> torch.Tensor:
    """``torch.ops.matfn.msign_vjp``: :func:`msign_vjp` of validated options, one graph node.

    As :func:`msign_jvp_op` (the same linear map), plus ``O``: ``msign(M)`` when it is already
    known to the dtype's accuracy (msign's backward passes its ``steps="auto"`` or ``"svd"``
    output), which saves the msign iteration of the ``"sylvester"`` route. This op is msign's
    backward.
    """
    return _derivative_op(M, G, "G", method, compute_dtype, rank_tol, check_finite, O)


@msign_jvp_op.register_fake
def _jvp_fake(M, dM, method, compute_dtype, rank_tol, check_finite):
    return result_like(M, torch.promote_types(M.dtype, dM.dtype))


@msign_vjp_op.register_fake
def _vjp_fake(M, G, method, compute_dtype, rank_tol, check_finite, O=None):
    return result_like(M, torch.promote_types(M.dtype, G.dtype))


def _linear_setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    M, D, method, compute_dtype, rank_tol = inputs[:5]
    ctx.options = (method, compute_dtype, rank_tol)
    ctx.direction = (D.shape, D.dtype)
    ctx.save_for_backward(M)


def _linear_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """``J_Mᵀ[grad] = J_M[grad]`` for the direction; a second derivative of msign raises."""
    if ctx.needs_input_grad[0]:
        raise RuntimeError(
            "msign's derivative is not differentiable with respect to M: trying to "
            "differentiate twice (msign_jvp / msign_vjp, msign's backward)"
        )
    (M,) = ctx.saved_tensors
    shape, dtype = ctx.direction
    method, compute_dtype, rank_tol = ctx.options
    gD = torch.ops.matfn.msign_vjp(M, grad, method, compute_dtype, rank_tol, False, None)
    return (None, gD.sum_to_size(shape).to(dtype)) + (None,) * (len(ctx.needs_input_grad) - 2)


msign_jvp_op.register_autograd(_linear_backward, setup_context=_linear_setup_context)
msign_vjp_op.register_autograd(_linear_backward, setup_context=_linear_setup_context)


class MsignFunction(torch.autograd.Function):
    r"""``msign`` with the exact derivative: forward by any method, backward by :func:`msign_vjp`.

    The backward pass is the derivative of the exact polar factor ``msign(M)``, **not** of the
    truncated Newton–Schulz polynomial the forward may have evaluated (for a default 5-step
    forward the two differ wherever the polynomial has not converged; they agree to the
    forward's accuracy with ``steps="auto"`` or ``method="svd"``). Forward-mode AD uses
    :func:`msign_jvp`. Double backward is not supported (``once_differentiable``).
    """

    @staticmethod
    def forward(
        M: torch.Tensor,
        method: Method,
        steps: Steps,
        algorithm: str,
        eps: float,
        compute_dtype: torch.dtype | None,
    ) -> torch.Tensor:
        """msign by the requested method (grad mode is off here, so no recursion)."""
        return msign(
            M,
            method=method,
            steps=steps,
            algorithm=algorithm,  # type: ignore[arg-type]
            eps=eps,
            compute_dtype=compute_dtype,
            check_finite=False,
        )

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        """Save M, and the output when it is exact enough to reuse in the derivative."""
        M, method, steps, _, _, compute_dtype = inputs
        reuse = forward_is_exact(method, steps, compute_dtype, M)
        ctx.reuse = reuse
        ctx.save_for_backward(M, output if reuse else None)
        ctx.save_for_forward(M, output if reuse else None)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """``msign_vjp(M, grad)``."""
        M, O = ctx.saved_tensors
        with autocast_disabled():
            G = _derivative(M.detach(), grad, method="auto", compute_dtype=None, rank_tol=None, O=O)
        return G.to(M.dtype), None, None, None, None, None

    @staticmethod
    def jvp(ctx: Any, dM: torch.Tensor, *_: Any) -> torch.Tensor:
        """``msign_jvp(M, dM)``."""
        M, O = ctx.saved_tensors
        with autocast_disabled():
            dO = _derivative(M, dM, method="auto", compute_dtype=None, rank_tol=None, O=O)
        return dO.to(M.dtype)


# msign cannot import this module (it imports matfn.sylvester, which imports msign): it defers
# to the Function registered here while autograd tracks its input.
register_autograd(MsignFunction)
