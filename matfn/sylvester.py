r"""Sylvester equations ``A X + X B = C`` through the matrix sign of a block-triangular matrix."""

from __future__ import annotations

import torch

from ._autocast import no_autocast
from ._validation import check_matrix, check_same_device, float_result_dtype
from .coefficients import CONVERGENT_QUINTIC, Coefficients, auto_schedule
from .mcsgn import MatrixSignConvergenceError
from .msign import AUTO_MAX_POLISH, AUTO_TARGETS, AUTO_TOL

__all__ = ["solve_sylvester"]

#: The diagonal blocks of the converged iterate must be within this of ``±I`` (Frobenius):
#: converged float32 iterates sit near 1e-6·√n; a failure leaves an O(1) deviation.
_BLOCK_TOL = {torch.float64: 1e-6, torch.float32: 1e-2}


class _SignBlocks:
    """The block upper-triangular iterate ``[[P, R], [0, Q]]`` of the sign iteration.

    ``Q is None`` marks the Lyapunov case ``B = A``: the iteration is an odd polynomial, so the
    lower block is exactly ``−P`` at every step (negation is exact in floating point) and is not
    stored.
    """

    __slots__ = ("P", "Q", "R")

    def __init__(self, P: torch.Tensor, Q: torch.Tensor | None, R: torch.Tensor) -> None:
        self.P, self.Q, self.R = P, Q, R

    def step(self, a: float, b: float, c: float) -> _SignBlocks:
        """``Z ← a Z + (b Z² + c Z⁴) Z`` on the three blocks.

        Products of block upper-triangular matrices stay block upper-triangular:
        ``[[P₁, R₁], [0, Q₁]]·[[P₂, R₂], [0, Q₂]] = [[P₁P₂, P₁R₂ + R₁Q₂], [0, Q₁Q₂]]``, so a
        step costs ``6n³ + 6m³ + 6nm(n + m)`` FLOPs instead of ``6(n + m)³`` (``18n³`` instead
        of ``48n³`` for the Lyapunov case ``n = m``, ``Q = −P``).
        """
        P, R = self.P, self.R
        Q = -P if self.Q is None else self.Q
        P2 = torch.bmm(P, P)
        Q2 = P2 if self.Q is None else torch.bmm(Q, Q)
        R2 = torch.baddbmm(torch.bmm(P, R), R, Q)
        if c != 0:
            P4 = torch.bmm(P2, P2)
            Q4 = P4 if self.Q is None else torch.bmm(Q2, Q2)
            R4 = torch.baddbmm(torch.bmm(P2, R2), R2, Q2)
            EP = torch.add(b * P2, P4, alpha=c)
            EQ = EP if self.Q is None else torch.add(b * Q2, Q4, alpha=c)
            ER = torch.add(b * R2, R4, alpha=c)
        else:
            EP, EQ, ER = b * P2, (b * P2 if self.Q is None else b * Q2), b * R2
        P_new = torch.baddbmm(P, EP, P, beta=a)
        R_new = torch.baddbmm(torch.baddbmm(R, EP, R, beta=a), ER, Q)
        Q_new = None if self.Q is None else torch.baddbmm(Q, EQ, Q, beta=a)
        return _SignBlocks(P_new, Q_new, R_new)

    def change(self, other: _SignBlocks) -> float:
        """Largest relative Frobenius change of any block over the batch (one host sync)."""
        pairs = [(self.P, other.P), (self.R, other.R)]
        if self.Q is not None and other.Q is not None:
            pairs.append((self.Q, other.Q))
        worst = torch.zeros((), dtype=self.P.dtype, device=self.P.device)
        for new, old in pairs:
            if new.numel() == 0:
                continue
            diff = torch.linalg.matrix_norm(new - old)
            size = torch.linalg.matrix_norm(old).clamp_min(torch.finfo(old.dtype).tiny)
            worst = torch.maximum(worst, (diff / size).max())
        return float(worst)

    def finite(self) -> bool:
        parts = [self.P, self.R] + ([] if self.Q is None else [self.Q])
        return all(bool(torch.isfinite(t).all()) for t in parts)


def schedule_from(lower: float | None, compute_dtype: torch.dtype) -> list[Coefficients]:
    """The ``steps="auto"`` Polar-Express schedule for the dtype, from ``lower`` if given.

    ``lower`` (a known lower bound on the normalised spectrum) is floored at the dtype's
    resolution; should the generator fail for it, the default schedule is used.
    """
    floor, target = AUTO_TARGETS[compute_dtype]
    if lower is not None and lower > floor:
        try:
            return auto_schedule(lower, target)
        except ValueError:
            pass
    return auto_schedule(floor, target)


def _identity_deviation(X: torch.Tensor, sign: float) -> torch.Tensor:
    """``‖X − sign·I‖_F`` per matrix."""
    eye = torch.eye(X.shape[-1], dtype=X.dtype, device=X.device)
    return torch.linalg.matrix_norm(X - sign * eye)


def _precondition_error(name: str, block: torch.Tensor) -> Exception:
    """Classify a diagonal block that did not converge to ``I``.

    A block that converged to *some* sign matrix (``X² ≈ I``) but not ``±I`` means eigenvalues
    in the wrong half-plane: ``ValueError``. Anything else (eigenvalues on or too near the
    imaginary axis, complex eigenvalues the real polynomial cannot move):
    :class:`MatrixSignConvergenceError`.
    """
    sq = torch.bmm(block, block)
    is_sign = bool((_identity_deviation(sq, 1.0) < 0.1 * max(1.0, block.shape[-1] ** 0.5)).all())
    if is_sign:
        return ValueError(
            f"`{name}` has eigenvalues in the left half-plane: solve_sylvester needs the spectra "
            "of A and B in the open right half-plane (e.g. symmetric positive definite A and B)"
        )
    return MatrixSignConvergenceError(
        f"solve_sylvester: the sign iteration did not converge for `{name}`: it has eigenvalues "
        "on or too close to the imaginary axis (relative to its norm), or complex eigenvalues; "
        "the spectra of A and B must lie in the open right half-plane"
    )


def _solve_flat(
    A: torch.Tensor,
    B: torch.Tensor | None,
    C: torch.Tensor,
    compute_dtype: torch.dtype,
    refine: int = 0,
    lower: float | None = None,
) -> torch.Tensor:
    """Solve ``A X + X B = C`` for flattened batches ``(K, n, n)``, ``(K, m, m)``, ``(K, n, m)``.

    ``B=None`` solves the Lyapunov-type equation ``A X + X A = C``. ``refine`` steps of
    iterative refinement ``X ← X + solve(C − A X − X B)`` follow. No validation; returns
    ``compute_dtype``. ``lower``: a known lower bound on ``min Re λ / (1.01·√(‖A‖²_F + ‖B‖²_F))``
    that shortens the schedule (default: the dtype's resolution, 1e-6 in float32). Raises
    ``ValueError`` / :class:`MatrixSignConvergenceError` when the precondition fails (see
    :func:`solve_sylvester`).
    """
    acc = torch.float64 if compute_dtype == torch.float64 else torch.float32
    A, C = A.to(acc), C.to(acc)
    B = None if B is None else B.to(acc)
    X = _solve_once(A, B, C, compute_dtype, lower)
    for _ in range(refine):
        Xa = X.to(C.dtype)
        residual = torch.baddbmm(
            torch.baddbmm(C, A, Xa, alpha=-1.0), Xa, A if B is None else B, alpha=-1.0
        )
        X = X + _solve_once(A, B, residual, compute_dtype, lower)
    return X


def _solve_once(
    A: torch.Tensor,
    B: torch.Tensor | None,
    C: torch.Tensor,
    compute_dtype: torch.dtype,
    lower: float | None = None,
) -> torch.Tensor:
    acc = torch.float64 if compute_dtype == torch.float64 else torch.float32
    A = A.to(acc)
    C = C.to(acc)
    B = None if B is None else B.to(acc)
    # X is linear in C and the diagonal blocks never see C, so scaling C changes nothing but
    # the range: C / ‖C‖ keeps the off-diagonal block O(‖X‖/‖C‖) away from over/underflow.
    c_norm = torch.linalg.matrix_norm(C, keepdim=True)
    c_scale = torch.where(c_norm > 0, c_norm, torch.ones_like(c_norm))
    # ‖A‖_F bounds every |λ(A)| (also for complex eigenvalues) and equals √tr(A²) for symmetric
    # A; unlike ‖Z‖_F of the block matrix it ignores C (docs/math.md §2.2).
    a_sq = torch.linalg.matrix_norm(A, keepdim=True) ** 2
    b_sq = a_sq if B is None else torch.linalg.matrix_norm(B, keepdim=True) ** 2
    nu = 1.01 * torch.sqrt(a_sq + b_sq).clamp_min(torch.finfo(acc).tiny)
    Z = _SignBlocks(
        (A / nu).to(compute_dtype),
        None if B is None else (-B / nu).to(compute_dtype),
        (-(C / c_scale) / nu).to(compute_dtype),
    )
    coeffs = schedule_from(lower, compute_dtype)
    for a, b, c in coeffs:
        Z = Z.step(a, b, c)
    converged = False
    tol = AUTO_TOL[compute_dtype]
    previous = float("inf")
    for _ in range(AUTO_MAX_POLISH):
        Z_next = Z.step(*CONVERGENT_QUINTIC)
        change = Z_next.change(Z)
        Z = Z_next
        if change <= tol or (previous < 1e-2 and change > 0.5 * previous):
            converged = True
            break
        previous = change
    if not Z.finite():
        raise MatrixSignConvergenceError(
            "solve_sylvester: the sign iteration diverged (non-finite iterate): A or B has "
            "eigenvalues on or near the imaginary axis, or complex eigenvalues; the spectra of A "
            "and B must lie in the open right half-plane"
        )
    block_tol = _BLOCK_TOL[acc]
    P = Z.P.to(acc)
    if not bool((_identity_deviation(P, 1.0) <= block_tol * max(1.0, P.shape[-1]) ** 0.5).all()):
        raise _precondition_error("A", P)
    if Z.Q is not None:
        Q = Z.Q.to(acc)
        dev = _identity_deviation(Q, -1.0)
        if not bool((dev <= block_tol * max(1.0, Q.shape[-1]) ** 0.5).all()):
            raise _precondition_error("B", -Q)
    if not converged:
        raise MatrixSignConvergenceError(
            "solve_sylvester: the sign iteration did not settle; the spectra of A and B must lie "
            "in the open right half-plane, well away from the imaginary axis"
        )
    return (-0.5 * Z.R.to(acc) * c_scale).to(compute_dtype)


@no_autocast
def solve_sylvester(
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    compute_dtype: torch.dtype | None = None,
    refine: int | None = None,
    check_finite: bool = True,
) -> torch.Tensor:
    r"""Solve the Sylvester equation ``A X + X B = C`` by the matrix sign function.

    Same convention as ``scipy.linalg.solve_sylvester(A, B, C)``. Requires the spectra of
    ``A`` and ``B`` to lie in the open right half-plane (then the solution is unique); the case
    met by the msign derivative is ``A``, ``B`` symmetric positive (semi)definite.

    Parameters
    ----------
    A : torch.Tensor
        ``(..., n, n)`` real matrix with eigenvalues of positive real part.
    B : torch.Tensor
        ``(..., m, m)`` real matrix with eigenvalues of positive real part.
    C : torch.Tensor
        ``(..., n, m)`` right-hand side. Batch dims of A, B and C broadcast against each other.
    compute_dtype : torch.dtype, optional
        Iteration dtype: float64 (default for float64 inputs) or float32 (default otherwise,
        also for half-precision inputs: bf16 is too coarse to solve equations).
    refine : int, optional
        Steps of iterative refinement ``X ← X + solve(C − A X − X B)``, each costing one more
        solve. Default 1 in float32 (relative error about 5e-6 → 2e-7 on well-conditioned
        problems) and 0 in float64.
    check_finite : bool
        Raise on NaN/Inf input (one host sync).

    Returns
    -------
    torch.Tensor
        ``X`` of shape ``(..., n, m)`` (the broadcast batch shape) in the promoted dtype of
        the inputs.

    Raises
    ------
    TypeError
        An input is not a dense real floating tensor.
    ValueError
        Fewer than 2 dims; ``A``/``B`` not square; ``C`` not ``n×m``; batch dims that do not
        broadcast; mixed devices; NaN/Inf; unsupported ``compute_dtype``; ``A`` or ``B`` has
        eigenvalues in the left half-plane (detected: the iteration converges to a sign
        matrix other than ``±I``).
    MatrixSignConvergenceError
        The sign iteration did not converge: an eigenvalue of ``A`` or ``B`` on or too near the
        imaginary axis (below about ``1e-6·√(‖A‖²_F + ‖B‖²_F)`` in float32, ``1e-7`` in
        float64, after polishing somewhat lower), or complex eigenvalues the real polynomial
        iteration cannot move to ``±1``.

    Notes
    -----
    With ``A X + X B = C`` the block matrix is similar to a block-diagonal one,
    ``Z = [[A, −C], [0, −B]] = T diag(A, −B) T⁻¹`` with ``T = [[I, X], [0, I]]``, so
    (docs/math.md §2.3(1))

    .. math:: \operatorname{mcsgn}(Z) = T \operatorname{diag}(I, −I) T^{-1}
              = \begin{bmatrix} I & −2X \\ 0 & −I \end{bmatrix}.

    The Newton–Schulz sign iteration ``Z ← a Z + (b Z² + c Z⁴) Z`` (the Polar-Express schedule
    of ``steps="auto"`` for the compute dtype, then convergent quintic steps
    ``(15/8, −10/8, 3/8)`` until a step moves every block by less than 1e-5 in float32 /
    1e-10 in float64) runs on the three blocks ``P, R, Q`` of ``Z`` only: block
    upper-triangularity is preserved and the diagonal blocks evolve as independent sign
    iterations of ``A`` and ``−B``. ``Z`` is normalised by ``1.01·√(‖A‖²_F + ‖B‖²_F)``, which
    ignores ``C``; and since the iterate's off-diagonal block is linear in ``C`` and the rest
    never sees it, ``C`` is divided by ``‖C‖_F`` first (only to stay in range: the result is
    otherwise unchanged). The converged diagonal blocks are checked against ``±I``, which
    detects every violated precondition.

    Cost per step: ``6n³ + 6m³ + 6nm(n + m)`` FLOPs (the dense ``2(n+m)``-square iteration
    costs ``6(n + m)³``, twice as much for ``n = m``); the number of steps grows like
    ``log κ``, with ``κ = √(‖A‖²_F + ‖B‖²_F)/min Re λ``: about 10–20 in float32.

    Accuracy: in exact arithmetic the result is exact once the scalar map converged; rounding
    is amplified by the non-normality of ``Z`` (``κ(T) ≈ (1 + ‖X‖)²`` relative to the scale of
    the blocks) and by the conditioning of the equation ``‖X‖·(λ_min(A) + λ_min(B))/‖C‖``.
    Measured on symmetric positive definite A, B (n = m = 128…256) against
    ``scipy.linalg.solve_sylvester``: float32 relative error 2e-6–9e-6 without refinement,
    2e-7 (condition number 10) to 3e-6 (1e3) with the default single refinement step;
    float64 1e-14–1e-13.

    References
    ----------
    J. D. Roberts, "Linear model reduction and solution of the algebraic Riccati equation by use
    of the sign function", Int. J. Control 32 (1980).
    N. J. Higham, "Functions of Matrices", SIAM 2008, §2.4 and ch. 5.
    Su Jianlin, kexue.fm/archives/11025 and 11056 (2025).

    Examples
    --------
    >>> import torch, matfn
    >>> A = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    >>> B = torch.tensor([[3.0]], dtype=torch.float64)
    >>> C = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    >>> X = matfn.solve_sylvester(A, B, C)
    >>> torch.allclose(A @ X + X @ B, C, atol=1e-12)
    True
    """
    check_matrix(A, "A", square=True, check_finite=check_finite)
    check_matrix(B, "B", square=True, check_finite=check_finite)
    check_matrix(C, "C", check_finite=check_finite)
    check_same_device(A=A, B=B, C=C)
    n, m = A.shape[-1], B.shape[-1]
    if C.shape[-2:] != (n, m):
        raise ValueError(
            f"`C` must have shape (..., {n}, {m}) to match A (..., {n}, {n}) and "
            f"B (..., {m}, {m}), got {tuple(C.shape)}"
        )
    try:
        batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2], C.shape[:-2])
    except RuntimeError as err:
        raise ValueError(
            f"batch dims of `A` {tuple(A.shape[:-2])}, `B` {tuple(B.shape[:-2])} and "
            f"`C` {tuple(C.shape[:-2])} do not broadcast"
        ) from err
    out_dtype = float_result_dtype(A, B, C)
    if compute_dtype is None:
        compute_dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
    if compute_dtype not in (torch.float64, torch.float32):
        raise ValueError(
            f"`compute_dtype` must be torch.float64 or torch.float32, got {compute_dtype}"
        )
    out_shape = (*batch, n, m)
    if n == 0 or m == 0 or batch.numel() == 0:
        return torch.zeros(out_shape, dtype=out_dtype, device=C.device)
    A_f = A.expand(*batch, n, n).reshape(-1, n, n)
    B_f = B.expand(*batch, m, m).reshape(-1, m, m)
    C_f = C.expand(*batch, n, m).reshape(-1, n, m)
    if refine is None:
        refine = 0 if compute_dtype == torch.float64 else 1
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        raise ValueError(f"`refine` must be a non-negative int or None, got {refine!r}")
    X = _solve_flat(A_f, B_f, C_f, compute_dtype, refine)
    return X.reshape(out_shape).to(out_dtype)
