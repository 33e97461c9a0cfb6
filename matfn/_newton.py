"""The scaled Newton sign iteration ``X ← (μX + (μX)⁻¹)/2`` and its stopping rule.

Shared by :mod:`matfn.mcsgn` (general square matrices) and :mod:`matfn.sylvester` (the block
iteration of a Sylvester equation). docs/math.md §2.6.
"""

from __future__ import annotations

import torch

__all__ = [
    "NEWTON_MAX_STEPS",
    "NEWTON_SINGULAR_COND",
    "NEWTON_UNSCALED_BELOW",
    "NewtonProgress",
    "NewtonSign",
    "newton_inverse",
    "relative_change",
]

#: Scaled Newton: the most steps before giving up (eigenvalues within about 1e-12·‖M‖ of the
#: imaginary axis need ~40; the scaled iteration needs ≤ 12 for anything farther than 1e-4).
NEWTON_MAX_STEPS = 60
#: Scaled Newton: stop scaling (μ = 1) once a step moves X by less than this (relative), so
#: the quadratic convergence of the unscaled iteration is not disturbed.
NEWTON_UNSCALED_BELOW = 1e-2


#: A Newton iterate whose Frobenius condition number ``κ_F(X) = ‖X‖_F‖X⁻¹‖_F`` exceeds this
#: (per compute dtype) and ``10·κ_F(X₀)`` counts as numerically singular. The Newton map keeps
#: the sign of real parts, ``Re((z + 1/z)/2) = Re z·(1 + |z|⁻²)/2``, and shrinks a near-axis
#: eigenvalue ``δ ± i`` (δ ≪ 1) to ``≈ δ`` in one step, so the iterate's condition jumps to
#: about ``1/δ``: an eigenvalue on or within about ``1/limit`` (relative to the norm) of the
#: imaginary axis, where the sign is undefined or too ill-conditioned for the dtype. The
#: ``κ_F(X₀)`` term keeps strongly non-normal (ill-conditioned) but well-posed inputs going.
NEWTON_SINGULAR_COND = {torch.float64: 1e13, torch.float32: 1e6}


def newton_inverse(
    X: torch.Tensor, limit: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """``(X⁻¹, ‖X‖_F, ‖X⁻¹‖_F, limit, ok)`` for a batch ``(K, n, n)`` (norms ``(K, 1, 1)``).

    ``ok`` is False when an iterate is numerically singular (see :data:`NEWTON_SINGULAR_COND`);
    ``limit=None`` (the first step) sets the per-matrix condition limit, returned for the next
    calls. One host sync.
    """
    inv, info = torch.linalg.inv_ex(X)
    x_norm = torch.linalg.matrix_norm(X, keepdim=True)
    inv_norm = torch.linalg.matrix_norm(inv, keepdim=True)
    cond = x_norm * inv_norm
    if limit is None:
        limit = torch.nan_to_num(10 * cond, nan=0.0).clamp_min(NEWTON_SINGULAR_COND[X.dtype])
    ok = bool(((info.view(-1, 1, 1) == 0) & (cond <= limit)).all())
    return inv, x_norm, inv_norm, limit, ok


def relative_change(new: torch.Tensor, old: torch.Tensor) -> float:
    """Largest ``‖new − old‖_F/‖new‖_F`` over the batch (NaN propagates; one host sync)."""
    tiny = torch.finfo(new.dtype).tiny
    diff = torch.linalg.matrix_norm(new - old)
    return float((diff / torch.linalg.matrix_norm(new).clamp_min(tiny)).max())


class NewtonProgress:
    """The stopping rule of a scaled Newton sign iteration, fed one relative change per step.

    :meth:`update` returns whether to stop: ``singular`` is set for a NaN change (or by the
    caller, :meth:`stop_singular`, when an iterate cannot be inverted), ``converged`` once the
    change is below ``tol`` or stops decreasing at the rounding floor (below 1e-3 and no longer
    halving); ``last_change`` is the latest change. :attr:`scaled` turns off once a step moves
    the iterate by less than :data:`NEWTON_UNSCALED_BELOW`, so the unscaled iteration's
    quadratic convergence is kept. Shared by :class:`NewtonSign` and the Sylvester solve's
    block iteration.
    """

    def __init__(self, tol: float) -> None:
        self.tol = tol
        self.previous = float("inf")
        self.scaled = True
        self.last_change = float("inf")
        self.singular = False
        self.converged = False

    def stop_singular(self) -> None:
        """Record a numerically singular iterate (the iteration stops)."""
        self.singular = True

    def update(self, change: float) -> bool:
        """Record a step's relative change; True when the iteration should stop."""
        self.last_change = change
        if change != change:  # NaN
            self.singular = True
            return True
        if change <= self.tol or (self.previous < 1e-3 and change > 0.5 * self.previous):
            self.converged = True
            return True
        if change < NEWTON_UNSCALED_BELOW:
            self.scaled = False
        self.previous = change
        return False


class NewtonSign:
    """The scaled Newton sign iteration ``X ← (μX + (μX)⁻¹)/2`` on a batch ``(B, n, n)``.

    ``run`` iterates to convergence and records ``steps`` (used), ``converged`` (the relative
    change fell below the tolerance or stopped decreasing at the rounding floor),
    ``singular`` (an iterate was numerically singular, :data:`NEWTON_SINGULAR_COND`: an
    eigenvalue on or too near the imaginary axis) and ``last_change``.
    """

    def __init__(self, X: torch.Tensor) -> None:
        self.X = X
        self.steps = 0
        self.converged = False
        self.singular = False
        self.last_change = float("inf")

    def run(self, max_steps: int = NEWTON_MAX_STEPS) -> torch.Tensor:
        X = self.X
        progress = NewtonProgress(4 * torch.finfo(X.dtype).eps * max(1, X.shape[-1]) ** 0.5)
        tiny = torch.finfo(X.dtype).tiny
        limit = None
        for _ in range(max_steps):
            inv, x_norm, inv_norm, limit, ok = newton_inverse(X, limit)
            if not ok:
                progress.stop_singular()
                break
            # Frobenius-norm scaling μ = (‖X⁻¹‖/‖X‖)^{1/2} balances the eigenvalue moduli about
            # 1 (Higham, Functions of Matrices, §5.5), per matrix; off near convergence.
            mu = torch.sqrt(inv_norm / x_norm.clamp_min(tiny)) if progress.scaled else 1.0
            X_next = 0.5 * (mu * X + inv / mu)
            change = relative_change(X_next, X)
            X = X_next
            self.steps += 1
            if progress.update(change):
                break
        self.X = X
        self.singular, self.converged = progress.singular, progress.converged
        self.last_change = progress.last_change
        return X
