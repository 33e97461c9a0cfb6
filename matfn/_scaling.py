r"""Power-of-two rescaling: what makes msign, mclip and the derivative safe at any scale.

Frobenius norms are sums of squares: in float32 they overflow for entries above about
``1.8e19/√(nm)`` and lose their small terms below about ``1e-19`` (squares under float32's
smallest normal), and an absolute floor such as msign's ``eps`` stops normalising tiny inputs.
Multiplying a matrix by ``2^{-e}``, with ``2^e`` its largest entry's binade, is exact and brings
it into ``[½, 1)`` where none of that happens; and since every rounding is exactly equivariant
under powers of two (no under/overflow), a function computed on ``2^{-e} M`` and scaled back is
*bitwise* the function computed on ``M`` whenever the latter was in range. So:

* :func:`exponents` — per matrix ``e`` with ``max|M_b| = m·2^e``, ``m ∈ [½, 1)`` (0 for zero or
  non-finite matrices), one max-abs reduction;
* :func:`scale_pow2` — ``M_b·2^{k_b}``, exact (two multiplies, so the factors stay in range);
* :func:`in_range` — whether the plain norms of a batch are trustworthy and above a floor, as a
  device flag (one norm pass, no sync); :func:`norms_in_range` reads it on the host (callers
  rescale only when not).

Imports only torch and :mod:`matfn._validation`.
"""

from __future__ import annotations

import math

import torch

from ._validation import assert_finite

__all__ = [
    "accumulate_dtype",
    "exponents",
    "in_range",
    "norm_range",
    "norms_in_range",
    "scale_pow2",
]


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64, else float32: the dtype norms are taken in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def norm_range(dtype: torch.dtype) -> tuple[float, float]:
    """``(lo, hi)``: Frobenius norms, accumulated in ``dtype``, that are correct to rounding.

    ``lo = √(tiny/ε)``: squares flushed or rounded below ``tiny`` lose at most ``nm·tiny``, i.e.
    ``nm·ε`` relative to ``lo²`` (harmless for a normalisation, which the schedules' 1 % safety
    margin covers); ``hi = √max/2``: the sum of squares did not overflow and ``1.01·‖M‖_F`` is
    finite.
    """
    info = torch.finfo(dtype)
    return math.sqrt(info.tiny / info.eps), math.sqrt(info.max) / 2


def exponents(M: torch.Tensor) -> torch.Tensor:
    """Per matrix of ``M (..., n, m)`` the exponent ``e`` with ``max|M_b| = m·2^e``, ``m ∈ [½, 1)``.

    int32, shape ``M.shape[:-2]``; 0 for all-zero matrices and for those with NaN/Inf (their
    values then pass through a rescale unchanged, so NaN propagates). No host sync.
    """
    amax = M.detach().abs().amax(dim=(-2, -1)).to(accumulate_dtype(M.dtype))
    _, e = torch.frexp(amax)
    return torch.where(torch.isfinite(amax) & (amax > 0), e, torch.zeros_like(e))


def scale_pow2(M: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``M_b · 2^{k_b}`` for each matrix (``k`` of shape ``M.shape[:-2]``), exact in M's dtype.

    Two multiplies by ``2^{⌊k/2⌋}`` and ``2^{k − ⌊k/2⌋}``: each factor is representable in M's
    dtype (|k| ≤ 2·(emax + mantissa bits)), and the intermediate lies between M and the result,
    so nothing under- or overflows that the result itself does not. Differentiable (autograd
    sees two multiplies by constants).
    """
    k = k.to(torch.int64)
    half = torch.div(k, 2, rounding_mode="floor")
    shape = (*k.shape, 1, 1)
    f1 = torch.exp2(half.to(torch.float64)).to(M.dtype).reshape(shape)
    f2 = torch.exp2((k - half).to(torch.float64)).to(M.dtype).reshape(shape)
    return M * f1 * f2


def in_range(M: torch.Tensor, floor: float) -> torch.Tensor:
    """A 0-dim bool tensor: every matrix of ``M`` has a Frobenius norm in range and ``≥ floor``.

    In range: within :func:`norm_range` of the accumulate dtype (so the plain norm is correct to
    rounding). False for NaN/Inf entries (their norms are NaN/Inf). No host sync: a caller may
    launch the work that assumes the answer and read it afterwards.
    """
    acc = accumulate_dtype(M.dtype)
    lo, hi = norm_range(acc)
    norms = torch.linalg.matrix_norm(M.detach(), dtype=acc)
    smallest, largest = torch.aminmax(norms.reshape(-1))  # NaN fails both comparisons
    return (smallest >= max(lo, floor)) & (largest <= hi)


def norms_in_range(M: torch.Tensor, floor: float, *, check_finite: bool, name: str = "M") -> bool:
    """:func:`in_range`, read on the host (one sync).

    With ``check_finite`` a failure also checks ``M`` for NaN/Inf and raises ``ValueError``
    naming ``name``: the norms are NaN/Inf exactly when M has NaN/Inf or they overflow, so this
    one pass replaces the finiteness check's pass in the common case.
    """
    ok = bool(in_range(M, floor))
    if not ok and check_finite:
        assert_finite(M, name)
    return ok
