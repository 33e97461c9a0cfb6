r"""The torch reference of the Newton–Schulz family: every step in plain ``bmm``/``baddbmm``.

The leaves of :mod:`matfn.msign` (docs/math.md §1.2): the standard quintic step
(:func:`ns_step_torch`), the Gram iteration (:func:`gram_newton_schulz_torch`) with its restart
search (:func:`gram_restarts`), the general-square sign step of mcsgn (:func:`sign_step_torch`),
the exact SVD result and the polishing loop of ``steps="auto"``. These run on CPU, in
float32/float64, with ``MATFN_DISABLE_TRITON=1``, and are the twins the Triton launchers of
:mod:`matfn.msign.triton` are tested against. Imports only torch and numpy.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable

import numpy as np
import torch

from ..coefficients import Coefficients

__all__ = [
    "AUTO_MAX_POLISH",
    "AUTO_TARGETS",
    "AUTO_TOL",
    "GRAM_NEGATIVE_EIGENVALUE",
    "GRAM_Q_MAX",
    "accumulate_dtype",
    "gram_newton_schulz_torch",
    "gram_restarts",
    "msign_svd",
    "newton_schulz_torch",
    "ns_step_torch",
    "polish_until_converged",
    "sign_step_torch",
]

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


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64, else float32: the dtype norms and exact results are taken in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def sign_step_torch(X: torch.Tensor, a: float, b: float, c: float) -> torch.Tensor:
    """One matrix-sign step ``a X + (b X² + c X⁴) X`` for square, generally non-symmetric ``X``.

    ``X`` is ``(B, n, n)`` (mcsgn, docs/math.md §2). Cost ``6 n³`` FLOPs (``4 n³`` when ``c = 0``).
    """
    X2 = torch.bmm(X, X)
    B = torch.baddbmm(X2, X2, X2, beta=b, alpha=c) if c != 0 else X2 * b
    return torch.baddbmm(X, B, X, beta=a, alpha=1.0)


def msign_svd(X: torch.Tensor) -> torch.Tensor:
    """Exact ``U_r V_rᵀ`` with rank cut-off ``σ > max(n, m)·ε·σ₁`` (batched ``(B, n, m)``)."""
    work = X.to(accumulate_dtype(X.dtype))
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
    acc = accumulate_dtype(X.dtype)
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
