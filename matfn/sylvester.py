r"""Sylvester equations ``A X + X B = C`` through the matrix sign of a block-triangular matrix.

:func:`solve_sylvester` runs the scaled Newton sign iteration on the blocks, refines with float64
residuals, accepts only a verified residual and otherwise falls back to Bartels–Stewart
(scipy, imported lazily) or raises. :func:`_solve_flat`, the Newton–Schulz block iteration (matrix
products only), serves the msign derivative's Lyapunov solve with a symmetric positive definite
coefficient. docs/math.md §2.3 and §4.3. The checked solve is the custom op
``torch.ops.matfn.solve_sylvester`` (fake implementation, autograd through the adjoint
equation), so :func:`solve_sylvester` compiles and exports.
"""

from __future__ import annotations

import torch

from ._autocast import no_autocast
from ._newton import NEWTON_MAX_STEPS, NewtonProgress, newton_inverse, relative_change
from ._validation import (
    assert_all_finite,
    check_matrix,
    check_same_device,
    float_result_dtype,
)
from .coefficients import CONVERGENT_QUINTIC, Coefficients, auto_schedule
from .mcsgn import MatrixSignConvergenceError, is_meta
from .msign import AUTO_MAX_POLISH, AUTO_TARGETS, AUTO_TOL

__all__ = ["SylvesterSolveError", "solve_sylvester"]

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


#: :func:`_solve_flat`'s residual check: ``‖AX + XB − C‖_F ≤ this·‖C‖_F`` per accumulation
#: dtype. Loose (a gross-failure guard for the derivative's internal Lyapunov solve, whose
#: caller falls back to the SVD route on the error), far above a converged solve's 1e-15 / 1e-6.
_FLAT_RTOL = {torch.float64: 1e-8, torch.float32: 1e-3}


def _solve_flat(
    A: torch.Tensor,
    B: torch.Tensor | None,
    C: torch.Tensor,
    compute_dtype: torch.dtype,
    refine: int = 0,
    lower: float | None = None,
) -> torch.Tensor:
    """Solve ``A X + X B = C`` for flattened batches ``(K, n, n)``, ``(K, m, m)``, ``(K, n, m)``.

    The Newton–Schulz block iteration (matrix products only), for symmetric positive definite
    coefficients such as the msign derivative's Lyapunov equation. ``B=None`` solves the
    Lyapunov-type equation ``A X + X A = C``. ``refine`` steps of iterative refinement
    ``X ← X + solve(C − A X − X B)`` follow. No validation; returns ``compute_dtype``.
    ``lower``: a known lower bound on ``min Re λ / (1.01·√(‖A‖²_F + ‖B‖²_F))`` that shortens the
    schedule (default: the dtype's resolution, 1e-6 in float32). Raises ``ValueError`` /
    :class:`MatrixSignConvergenceError` when the precondition fails (see
    :func:`solve_sylvester`) or the relative residual exceeds :data:`_FLAT_RTOL` (one host sync).
    """
    acc = torch.float64 if compute_dtype == torch.float64 else torch.float32
    A, C = A.to(acc), C.to(acc)
    B = None if B is None else B.to(acc)
    X = _solve_once(A, B, C, compute_dtype, lower)

    def residual_of(X: torch.Tensor) -> torch.Tensor:
        Xa = X.to(C.dtype)
        return torch.baddbmm(
            torch.baddbmm(C, A, Xa, alpha=-1.0), Xa, A if B is None else B, alpha=-1.0
        )

    for _ in range(refine):
        X = X + _solve_once(A, B, residual_of(X), compute_dtype, lower)
    res = torch.linalg.matrix_norm(residual_of(X))
    c_norm = torch.linalg.matrix_norm(C)
    rel = torch.nan_to_num(res / c_norm.clamp_min(torch.finfo(acc).tiny), nan=float("inf"))
    rel = torch.where(c_norm > 0, rel, res)
    if not bool((rel <= _FLAT_RTOL[acc]).all()):
        raise MatrixSignConvergenceError(
            "the Newton–Schulz block Sylvester solve reached only a relative residual of "
            f"{float(rel.max()):.3g} (the coefficients are too non-normal or ill-conditioned "
            "for the compute dtype)"
        )
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


#: Acceptance: relative residual ``‖AX + XB − C‖_F/‖C‖_F`` of the float64 result, per compute
#: dtype. Checked before the cast to the output dtype (refinement runs on float64 residuals, so a
#: float32 solve usually lands far below its bound).
ACCEPT_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}
#: Default most refinement steps (``refine=None``); refinement also stops once the residual
#: reaches the float64 rounding level or stops halving.
_MAX_REFINE = 5


class SylvesterSolveError(MatrixSignConvergenceError):
    """No method reached the accuracy contract; ``residual`` is the best relative residual."""

    def __init__(self, message: str, residual: float) -> None:
        super().__init__(message)
        self.residual = residual


class _NewtonSylvester:
    """Scaled Newton sign iteration on ``Z = [[A, −C], [0, −B]]`` (normalised), replayable.

    With ``Z⁻¹ = [[A⁻¹, −A⁻¹ C B⁻¹], [0, −B⁻¹]]`` the step ``Z ← (μZ + (μZ)⁻¹)/2`` acts on the
    blocks as ``A ← (μA + (μA)⁻¹)/2``, ``B`` likewise, and ``C ← (μC + μ⁻¹ A⁻¹ C B⁻¹)/2``; then
    ``A_k → I``, ``B_k → I`` and ``C_k → 2X`` (Roberts 1980; Benner–Quintana-Ortí 1999). The
    diagonal blocks never see ``C``, so the run records ``(μ_k, A_k⁻¹, B_k⁻¹)`` and
    :meth:`apply` replays the off-diagonal recursion for any right-hand side at
    ``2nm(n + m)`` FLOPs per step: iterative refinement costs no further inversion.
    """

    def __init__(self, A: torch.Tensor, B: torch.Tensor) -> None:
        self.steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        tiny = torch.finfo(A.dtype).tiny
        progress = NewtonProgress(
            4 * torch.finfo(A.dtype).eps * max(A.shape[-1], B.shape[-1]) ** 0.5
        )
        a_limit = b_limit = None
        for _ in range(NEWTON_MAX_STEPS):
            Ai, a_norm, ai_norm, a_limit, a_ok = newton_inverse(A, a_limit)
            Bi, b_norm, bi_norm, b_limit, b_ok = newton_inverse(B, b_limit)
            if not (a_ok and b_ok):
                progress.stop_singular()
                break
            if progress.scaled:
                # One μ for the whole block matrix (it must stay block-triangular), from the
                # diagonal blocks only: C does not affect the spectrum.
                num = ai_norm**2 + bi_norm**2
                den = (a_norm**2 + b_norm**2).clamp_min(tiny)
                mu = (num / den) ** 0.25
            else:
                mu = torch.ones_like(a_norm)
            self.steps.append((mu, Ai, Bi))
            A_next = 0.5 * (mu * A + Ai / mu)
            B_next = 0.5 * (mu * B + Bi / mu)
            change = max(relative_change(A_next, A), relative_change(B_next, B))
            A, B = A_next, B_next
            if progress.update(change):
                break
        self.A, self.B = A, B
        self.singular, self.converged = progress.singular, progress.converged
        self.last_change = progress.last_change

    def apply(self, C: torch.Tensor) -> torch.Tensor:
        """``X`` with ``A X + X B = C`` for the recorded ``A``, ``B`` (any ``(K, n, m)`` C)."""
        Y = C
        for mu, Ai, Bi in self.steps:
            Y = 0.5 * (mu * Y + torch.bmm(torch.bmm(Ai, Y), Bi) / mu)
        return 0.5 * Y


def _scaled_problem(
    A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 ``A/ν, B/ν, C/(ν·γ)`` with ``ν`` of order ``‖A‖ + ‖B‖`` and ``γ`` of ``‖C‖``.

    ``ν = β·ν'`` where ``β = max |entry|`` of A and B (exact rescaling first, so no norm
    overflows) and ``ν' = √(‖A/β‖²_F + ‖B/β‖²_F)``; ``γ = max |Cᵢⱼ|``. The solution of the
    scaled equation is ``X·β/γ``; returns the three and the factor ``γ/β`` (``(K, 1, 1)``) that
    maps it back.
    """
    A, B, C = A.to(torch.float64), B.to(torch.float64), C.to(torch.float64)

    def amax(t: torch.Tensor) -> torch.Tensor:
        return t.abs().amax(dim=(-2, -1), keepdim=True)

    big = torch.maximum(amax(A), amax(B))
    big = torch.where(big > 0, big, torch.ones_like(big))
    A, B = A / big, B / big
    nu = torch.sqrt(
        torch.linalg.matrix_norm(A, keepdim=True) ** 2
        + torch.linalg.matrix_norm(B, keepdim=True) ** 2
    )
    A, B = A / nu, B / nu
    gamma = amax(C)
    gamma = torch.where(gamma > 0, gamma, torch.ones_like(gamma))
    C = C / gamma
    return A, B, C / nu, gamma / big


def _residual(A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``C − A X − X B`` (float64)."""
    return torch.baddbmm(torch.baddbmm(C, A, X, alpha=-1.0), X, B, alpha=-1.0)


def _acceptance(
    A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, X: torch.Tensor, compute_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per matrix: (relative residual, accepted?) under the contract of :func:`solve_sylvester`.

    Only the residual relative to ``‖C‖`` is accepted, never a small backward error alone: a
    singular equation has backward-stable "solutions" of norm ``1/u``.
    """
    res = torch.linalg.matrix_norm(_residual(A, B, C, X))
    c_norm = torch.linalg.matrix_norm(C)
    rel = res / c_norm.clamp_min(torch.finfo(torch.float64).tiny)
    rel = torch.nan_to_num(torch.where(c_norm > 0, rel, res), nan=float("inf"))
    return rel, rel <= ACCEPT_RTOL[compute_dtype]


def _left_half_plane(block: torch.Tensor) -> bool:
    """Whether the Newton iteration of a diagonal block settled on a sign matrix other than I.

    ``ρ(S − I) ≤ ‖S − I‖_F``: a sign matrix with an eigenvalue −1 (an eigenvalue of the block
    in the left half-plane) is at least 2 from ``I``, while ``S² ≈ I`` says it did settle.
    """
    eye = torch.eye(block.shape[-1], dtype=block.dtype, device=block.device)
    far = torch.linalg.matrix_norm(block - eye) > 1.0
    settled = torch.linalg.matrix_norm(torch.bmm(block, block) - eye) < 0.1
    return bool((far & settled).any())


def _bartels_stewart(
    A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, cause: str, residual: float
) -> torch.Tensor:
    """``scipy.linalg.solve_sylvester`` per matrix (float64, on the host), lazily imported."""
    try:
        from scipy.linalg import solve_sylvester as scipy_solve
    except ImportError as err:
        raise SylvesterSolveError(
            f"solve_sylvester: {cause}"
            + (f" (relative residual {residual:.3g})" if residual < float("inf") else "")
            + ", and the Bartels–Stewart fallback needs scipy, which is not installed "
            "(pip install 'matfn[oracles]')",
            residual,
        ) from err
    a, b, c = (t.detach().cpu().numpy() for t in (A, B, C))
    out = [scipy_solve(x, y, z) for x, y, z in zip(a, b, c, strict=True)]
    return torch.stack([torch.from_numpy(x) for x in out]).to(C.device)


def _solve_newton(
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    compute_dtype: torch.dtype,
    refine: int | None,
) -> torch.Tensor:
    """Checked solve of flattened ``(K, n, n)``, ``(K, m, m)``, ``(K, n, m)``; float64 result.

    Scaled Newton (compute dtype) → refinement with float64 residuals → acceptance test →
    Bartels–Stewart for the matrices that fail it → acceptance test → error.
    """
    A64, B64, C64, gamma = _scaled_problem(A, B, C)
    newton = _NewtonSylvester(A64.to(compute_dtype), B64.to(compute_dtype))
    K = C64.shape[0]
    cause = ""
    left = None  # the block whose Newton iteration settled in the left half-plane
    if newton.singular or not newton.converged:
        what = "was numerically singular" if newton.singular else "did not converge"
        cause = (
            f"the Newton sign iteration of A and B {what} (A or B has eigenvalues on or too "
            "near the imaginary axis, or is too ill-conditioned for the compute dtype)"
        )
    else:
        blocks = (("A", newton.A), ("B", newton.B))
        left = next((n for n, b in blocks if _left_half_plane(b.to(torch.float64))), None)
    if left is not None:
        # Outside the sign route (which would solve another equation); a solvable equation is
        # still solved by the fallback, as scipy does. A singular A or B lands here or above
        # depending on rounding, so both must reach the fallback.
        cause = (
            f"`{left}` has eigenvalues in the left half-plane: the sign route needs the spectra "
            "of A and B in the open right half-plane (e.g. symmetric positive definite A and B)"
        )
    if cause:
        X = torch.zeros_like(C64)
        best = torch.full((K,), float("inf"), dtype=torch.float64, device=C64.device)
        ok = torch.zeros(K, dtype=torch.bool, device=C64.device)
    else:
        X = newton.apply(C64.to(compute_dtype)).to(torch.float64)
        best, ok = _acceptance(A64, B64, C64, X, compute_dtype)
        goal = 4 * torch.finfo(torch.float64).eps
        for _ in range(_MAX_REFINE if refine is None else refine):
            R = _residual(A64, B64, C64, X)
            X_new = X + newton.apply(R.to(compute_dtype)).to(torch.float64)
            rel_new, ok_new = _acceptance(A64, B64, C64, X_new, compute_dtype)
            better = rel_new < best
            X = torch.where(better.view(-1, 1, 1), X_new, X)
            ok = torch.where(better, ok_new, ok)
            improved = float((best / rel_new.clamp_min(1e-300)).min())
            best = torch.minimum(best, rel_new)
            if refine is None and (float(best.max()) <= goal or improved < 2.0):
                break
        cause = "the sign iteration and refinement did not reach the tolerance"
    if not bool(ok.all()):
        idx = (~ok).nonzero().squeeze(-1)
        worst = float(best[idx].max())
        fallback = _bartels_stewart(A64[idx], B64[idx], C64[idx], cause, worst)
        rel_bs, ok_bs = _acceptance(A64[idx], B64[idx], C64[idx], fallback, compute_dtype)
        if not bool(ok_bs.all()):
            achieved = float(torch.minimum(rel_bs, best[idx]).max())
            sign_part = f" (relative residual {worst:.3g})" if worst < float("inf") else ""
            if left is not None:
                raise ValueError(
                    f"{cause}; the Bartels–Stewart fallback reached only a relative residual of "
                    f"{float(rel_bs.max()):.3g} (an eigenvalue of A near minus one of B)"
                )
            raise SylvesterSolveError(
                f"solve_sylvester: {cause}{sign_part}, and the "
                "Bartels–Stewart fallback reached only a relative residual of "
                f"{float(rel_bs.max()):.3g}: the equation is singular or too ill-conditioned "
                "for the compute dtype (an eigenvalue of A near minus one of B)",
                achieved,
            )
        X = X.index_put((idx,), fallback)
    return X * gamma


@torch.library.custom_op("matfn::solve_sylvester", mutates_args=())
def solve_sylvester_op(
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    compute_dtype: torch.dtype,
    refine: int | None,
    check_finite: bool,
) -> torch.Tensor:
    """The compute path of :func:`solve_sylvester` as one opaque op (``torch.ops.matfn``).

    ``A (K, n, n)``, ``B (K, m, m)``, ``C (K, n, m)``: flattened, already broadcast batches
    (``K, n, m ≥ 1``), any real floating dtypes; ``compute_dtype`` float64 or float32;
    ``refine`` as in :func:`solve_sylvester`. Returns ``X (K, n, m)`` in float64 (the public
    function casts it). Everything that reads values runs here: the finiteness check, the
    Newton iteration to its tolerance, refinement, the acceptance test, the Bartels–Stewart
    fallback on the host and the errors (``ValueError``, :class:`SylvesterSolveError`),
    raised unchanged to the caller. Differentiable in A, B and C (see :func:`solve_sylvester`).
    """
    if check_finite:
        assert_all_finite(A=A, B=B, C=C)
    return _solve_newton(A, B, C, compute_dtype, refine).contiguous()


@solve_sylvester_op.register_fake
def _solve_sylvester_fake(A, B, C: torch.Tensor, *options) -> torch.Tensor:
    return C.new_empty(C.shape, dtype=torch.float64)


def _sylvester_setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    A, B, C, compute_dtype, refine, _check_finite = inputs
    ctx.save_for_backward(A, B, output)
    ctx.c_dtype = C.dtype
    ctx.compute_dtype = compute_dtype
    ctx.refine = refine


def _sylvester_backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN202
    """The backward pass of :func:`solve_sylvester` through the adjoint equation.

    ``Y`` with ``Aᵀ Y + Y Bᵀ = G`` (same spectra as the forward equation), then ``∂C = Y``,
    ``∂A = −Y Xᵀ``, ``∂B = −Xᵀ Y`` (from ``dA X + A dX + dX B + X dB = dC``).
    """
    A, B, X = ctx.saved_tensors
    Y = torch.ops.matfn.solve_sylvester(
        A.mT, B.mT, grad.to(torch.float64), ctx.compute_dtype, ctx.refine, False
    )
    need_A, need_B, need_C = ctx.needs_input_grad[:3]
    grad_A = -torch.bmm(Y, X.mT).to(A.dtype) if need_A else None
    grad_B = -torch.bmm(X.mT, Y).to(B.dtype) if need_B else None
    grad_C = Y.to(ctx.c_dtype) if need_C else None
    return grad_A, grad_B, grad_C, None, None, None


solve_sylvester_op.register_autograd(_sylvester_backward, setup_context=_sylvester_setup_context)


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
    r"""Solve the Sylvester equation ``A X + X B = C`` by the matrix sign function, verified.

    Same convention as ``scipy.linalg.solve_sylvester(A, B, C)``. Meant for spectra of ``A``
    and ``B`` in the open right half-plane (then the solution is unique), complex and
    non-normal included; the case met by the msign derivative is ``A``, ``B`` symmetric positive
    (semi)definite. Every result is residual-checked: it is returned only if
    ``‖AX + XB − C‖_F ≤ rtol·‖C‖_F`` in float64, with ``rtol`` = 1e-10 (float64 compute) or
    1e-5 (float32 compute), before the cast to the output dtype.

    Parameters
    ----------
    A : torch.Tensor
        ``(..., n, n)`` real matrix with eigenvalues of positive real part.
    B : torch.Tensor
        ``(..., m, m)`` real matrix with eigenvalues of positive real part.
    C : torch.Tensor
        ``(..., n, m)`` right-hand side. Batch dims of A, B and C broadcast against each other.
    compute_dtype : torch.dtype, optional
        Dtype of the Newton iteration: float64 (default for float64 inputs) or float32
        (default otherwise, also for half-precision inputs: bf16 is too coarse to solve
        equations). Residuals, refinement and the acceptance test are float64 either way.
    refine : int, optional
        Iterative refinement ``X ← X + solve(C − A X − X B)`` (float64 residual and
        accumulation), each step replaying the recorded Newton inverses (no new inversion).
        ``None`` (default): up to 5 steps, stopping once the residual reaches float64 rounding
        or stops halving. An int: exactly that many steps (keeping the best iterate).
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
        broadcast; mixed devices; NaN/Inf; unsupported ``compute_dtype`` or ``refine``; ``A`` or
        ``B`` has eigenvalues in the left half-plane (its Newton iteration settles on a sign
        matrix other than ``I``) and the Bartels–Stewart fallback cannot solve the equation
        either (a solvable one is solved there, as by scipy).
    SylvesterSolveError
        (a :class:`MatrixSignConvergenceError`) Neither the sign iteration nor the
        Bartels–Stewart fallback reached the residual bound (the equation is singular or too
        ill-conditioned: an eigenvalue of ``A`` at or near minus one of ``B``), or the fallback
        was needed and scipy is not installed (``pip install 'matfn[oracles]'``). The message
        states the cause and the achieved relative residual; ``.residual`` holds it.

    Notes
    -----
    With ``A X + X B = C`` the block matrix is similar to a block-diagonal one,
    ``Z = [[A, −C], [0, −B]] = T diag(A, −B) T⁻¹`` with ``T = [[I, X], [0, I]]``, so
    (docs/math.md §2.3(1))

    .. math:: \operatorname{mcsgn}(Z) = T \operatorname{diag}(I, −I) T^{-1}
              = \begin{bmatrix} I & −2X \\ 0 & −I \end{bmatrix}.

    **Algorithm.** ``A``, ``B``, ``C`` are rescaled first (by the largest entries, then
    ``√(‖A‖²_F + ‖B‖²_F)``), so any finite scaling works. The scaled Newton iteration
    ``Z ← (μZ + (μZ)⁻¹)/2`` keeps ``Z`` block upper-triangular; with
    ``Z⁻¹ = [[A⁻¹, −A⁻¹CB⁻¹], [0, −B⁻¹]]`` it acts on the blocks as

    .. math:: A ← (μA + (μA)^{-1})/2,\quad B ← (μB + (μB)^{-1})/2,\quad
              C ← (μC + μ^{-1} A^{-1} C B^{-1})/2,

    ``A_k, B_k → I`` and ``C_k → 2X`` (one ``μ`` per matrix from the diagonal blocks'
    Frobenius norms, ``μ = 1`` near convergence). Newton converges for any spectrum off the
    imaginary axis, so complex eigenvalues and strongly non-normal ``A``, ``B`` converge (a
    real polynomial iteration does not, and loses accuracy with the non-normality). The
    diagonal blocks never see ``C``: the run records ``(μ_k, A_k⁻¹, B_k⁻¹)`` and replays the
    ``C`` recursion for the refinement right-hand sides. Matrices whose result misses the
    residual bound after refinement, and every matrix when the Newton iteration breaks down
    (a numerically singular iterate: eigenvalues on or near the axis, or a singular ``A``),
    go to ``scipy.linalg.solve_sylvester`` (Bartels–Stewart via the real Schur form, float64,
    on the host, also for CUDA tensors), whose result must pass the same test. So an equation
    outside the sign route's precondition but solvable (``A`` singular, ``B`` in the right
    half-plane) still gets its verified solution; a singular equation raises.

    **Cost.** Per Newton step: two inversions (``≈ 2n³ + 2m³`` FLOPs) and ``2nm(n + m)``;
    about 8–15 steps. Per refinement step: ``≈ 2nm(n + m)`` per recorded step plus the
    float64 residual. Memory: the recorded inverses, ``steps·(n² + m²)`` per matrix.

    **Accuracy** (tested with hypothesis: ``A``, ``B`` of side ≤ 12 built as ``Q D Q⁻¹`` with
    ``κ₂(Q) ≤ 1e3``, complex pairs at 0°–87°, moduli spread ≤ 1e2, scales 1e-2…1e2, ``‖C‖``
    1e-6…1e6, Kronecker condition ≤ 1e4; the issue's non-normal example; scale sweeps to
    1e±150 in float64, 1e±30 in float32): float64 relative residual ≤ 1e-13 (measured, bound
    1e-10); float32 compute with float64 refinement reaches float64-level residuals before the
    cast, and a float32 *output* carries its own rounding, ``≲ u·(‖A‖ + ‖B‖)‖X‖/‖C‖``
    (measured ≤ 3e-6 for Kronecker condition ≤ 1e3, ≤ 6e-5 up to 1e4).

    **Host synchronisation.** Every call synchronises with the host, whatever the options: the
    Newton iteration stops on a tolerance, refinement and the acceptance test decide from
    residuals, and the matrices that fail go to scipy on the host. So it cannot be captured in
    a CUDA graph. ``torch.compile`` (``fullgraph=True``) and ``torch.export`` keep the solve as
    one opaque node, the custom op ``torch.ops.matfn.solve_sylvester``.

    **Autograd** (reverse mode, in ``A``, ``B`` and ``C``). With ``Y`` solving the adjoint
    equation ``Aᵀ Y + Y Bᵀ = G`` (same spectra, same options), ``∂C = Y``, ``∂A = −Y Xᵀ``,
    ``∂B = −Xᵀ Y`` (from ``dA X + A dX + dX B + X dB = dC``): one more solve. Forward-mode AD
    is not supported.

    References
    ----------
    J. D. Roberts, "Linear model reduction and solution of the algebraic Riccati equation by use
    of the sign function", Int. J. Control 32 (1980).
    P. Benner, E. S. Quintana-Ortí, "Solving stable generalized Lyapunov equations with the
    matrix sign function", Numer. Algorithms 20 (1999).
    R. H. Bartels, G. W. Stewart, "Solution of the matrix equation AX + XB = C", Comm. ACM 15
    (1972).
    N. J. Higham, "Functions of Matrices", SIAM 2008, §2.4 and ch. 5.

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
    # Options and shapes only (traceable); the values are read inside the op. A meta tensor
    # has no values to check: check_matrix names it.
    check_matrix(A, "A", square=True, check_finite=check_finite and is_meta(A))
    check_matrix(B, "B", square=True, check_finite=check_finite and is_meta(B))
    check_matrix(C, "C", check_finite=check_finite and is_meta(C))
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
    if refine is not None and (
        isinstance(refine, bool) or not isinstance(refine, int) or refine < 0
    ):
        raise ValueError(f"`refine` must be a non-negative int or None, got {refine!r}")
    X = torch.ops.matfn.solve_sylvester(A_f, B_f, C_f, compute_dtype, refine, bool(check_finite))
    return X.reshape(out_shape).to(out_dtype)
