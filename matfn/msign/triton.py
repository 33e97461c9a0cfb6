r"""Newton–Schulz launchers on the Triton products of :mod:`matfn.kernels.matmul`.

Each function mirrors a torch twin in :mod:`matfn.msign.reference` operation for operation,
with the symmetric products computed on the lower triangle of tiles only and every
``α·P + β·D`` formed in the product's epilogue:

* quintic step: ``A = X Xᵀ`` (symmetric, ``s² L``), ``B = c A A + b A`` (symmetric, ``s³``),
  ``X ← B X + a X`` (general, ``2 s² L``): ``3 s² L + s³`` FLOPs instead of ``4 s² L + 2 s³``;
* cubic step (``c = 0``): ``X ← b A X + a X``, no ``B``;
* Gram iteration: every s×s product is a product of commuting polynomials in ``R = X Xᵀ``,
  hence symmetric;
* the general-square sign step ``X ← a X + (b X² + c X⁴) X`` (mcsgn; no symmetry).

Inputs are 3-D batches; the whole batch is one launch per product. The folded step
:func:`ns_step_folded` (cuBLAS products, ``a`` folded into ``B``) is the path for smaller
batches. Importing this module imports Triton; :mod:`matfn.msign.path` chooses among these.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _backend
from ..kernels.matmul import gram_triton, matmul_triton

__all__ = [
    "ns_step_triton",
    "ns_step_folded",
    "newton_schulz_triton",
    "gram_newton_schulz_triton",
    "sign_step_triton",
]

Coefficients = tuple[float, float, float]


def _general(
    A: torch.Tensor,
    B: torch.Tensor,
    D: torch.Tensor | None = None,
    alpha: float = 1.0,
    beta: float = 0.0,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``α A B + β D`` for batches (general product), written in ``out_dtype`` (default A's).

    The Triton epilogue rounds the fp32 accumulator straight to ``out_dtype``: the cast of the
    iteration's last product to the caller's dtype costs no pass of its own.
    """
    out = None
    if out_dtype not in (None, A.dtype):
        out = torch.empty(A.shape[0], A.shape[1], B.shape[2], dtype=out_dtype, device=A.device)
    return matmul_triton(A, B, D, alpha=alpha, beta=beta, out=out)


def ns_step_triton(
    X: torch.Tensor, a: float, b: float, c: float, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """One step ``a X + (b A + c A²) X`` with ``A = X Xᵀ`` for ``X (Bt, s, L)``, s ≤ L.

    ``out_dtype``: the new iterate's dtype (default X's), rounded to in the last epilogue.
    """
    A = gram_triton(X)
    if c == 0:
        return _general(A, X, X, alpha=b, beta=a, out_dtype=out_dtype)
    B = matmul_triton(A, A, A, alpha=c, beta=b, symmetric=True)
    return _general(B, X, X, alpha=1.0, beta=a, out_dtype=out_dtype)


def ns_step_folded(X: torch.Tensor, a: float, b: float, c: float) -> torch.Tensor:
    """The torch step (``ns_step_torch``) on cuBLAS alone, ``a`` folded into B: ``(B + aI) X``.

    ``baddbmm(X, B, X, beta=a)`` first copies X into its output (a pass over the s×L iterate);
    adding ``a`` to B's diagonal instead costs s entries per matrix, and the last product is a
    plain ``bmm``. ``cA² + bA + aI`` is one Triton product with the polynomial in its epilogue
    from :attr:`matfn._backend.NewtonSchulzConfig.min_triton_poly_work` (``batch · s³``), cuBLAS
    ``baddbmm`` and a diagonal add below (a Triton launch costs more host time). The one extra
    rounding is of ``a + B_ii`` to the iteration dtype: relative ``2⁻⁹`` (bf16; ``2⁻¹¹`` in
    fp16, which the path choice iterates bf16 batches in) of the diagonal term, the size of the
    output's own rounding. Cost: ``4 s² L + 2 s³`` FLOPs, as the torch step.
    """
    A = torch.bmm(X, X.mT)
    poly_on_triton = X.shape[0] * X.shape[1] ** 3 >= _backend.NEWTON_SCHULZ.min_triton_poly_work
    if c != 0 and poly_on_triton:
        B = matmul_triton(A, A, A, alpha=c, beta=b, gamma=a)  # cA² + bA + aI, one pass
    else:
        B = torch.baddbmm(A, A, A, beta=b, alpha=c) if c != 0 else A.mul_(b)
        B.diagonal(dim1=-2, dim2=-1).add_(a)
    return torch.bmm(B, X)


def newton_schulz_triton(X: torch.Tensor, coeffs: Sequence[Coefficients]) -> torch.Tensor:
    """The standard iteration, one :func:`ns_step_triton` per triple."""
    for a, b, c in coeffs:
        X = ns_step_triton(X, a, b, c)
    return X


def _poly_gram(R: torch.Tensor, b: float, c: float) -> torch.Tensor:
    """``Z = b R + c R²`` (symmetric)."""
    if c == 0:
        return R * b
    return matmul_triton(R, R, R, alpha=c, beta=b, symmetric=True)


def gram_newton_schulz_triton(
    X: torch.Tensor,
    coeffs: Sequence[Coefficients],
    restarts: Sequence[int] = (),
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    r"""Gram Newton–Schulz on ``R = X Xᵀ`` (twin: ``reference.gram_newton_schulz_torch``).

    Per step ``Z = b R + c R²``, ``Q ← Q Z + a Q`` (or ``Z + a I`` after a (re)start),
    ``R ← (Z + aI) R (Z + aI)`` as ``RZ = R Z + a R``, ``R = Z·RZ + a RZ`` (skipped when the next
    step restarts or there is none); all symmetric. ``restarts``: steps before which
    ``X ← Q X``, ``R ← X Xᵀ``, ``Q ← I``. ``out_dtype``: the result's dtype (default X's),
    rounded to in the epilogue of the last ``Q X``.
    """
    T = len(coeffs)
    R = gram_triton(X)
    Q = None
    for t, (a, b, c) in enumerate(coeffs):
        if t in restarts and Q is not None:
            X = _general(Q, X)
            R = gram_triton(X)
            Q = None
        Z = _poly_gram(R, b, c)
        if Q is None:
            Q = Z.clone()
            Q.diagonal(dim1=-2, dim2=-1).add_(a)
        else:
            Q = matmul_triton(Q, Z, Q, beta=a, symmetric=True)
        if t + 1 < T and t + 1 not in restarts:
            RZ = matmul_triton(R, Z, R, beta=a, symmetric=True)
            R = matmul_triton(Z, RZ, RZ, beta=a, symmetric=True)
    if Q is None:
        return X if out_dtype is None else X.to(out_dtype)
    return _general(Q, X, out_dtype=out_dtype)


def sign_step_triton(X: torch.Tensor, a: float, b: float, c: float) -> torch.Tensor:
    """One matrix-sign step ``a X + (b X² + c X⁴) X`` for square ``X (Bt, N, N)`` (general)."""
    X2 = _general(X, X)
    if c == 0:
        return _general(X2, X, X, alpha=b, beta=a)
    B = _general(X2, X2, X2, alpha=c, beta=b)
    return _general(B, X, X, alpha=1.0, beta=a)
