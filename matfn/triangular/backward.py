r"""Backward of ``tri_inv`` / ``tri_solve`` for ``T = Λ + tril(Q Kᵀ, −1)`` (docs/math.md §5.6).

For ``Z = T⁻¹ V`` and an upstream gradient ``dZ``:

* ``dV = T⁻ᵀ dZ``. ``Tᵀ = Λ + triu(K Qᵀ, 1)`` is upper triangular; reversing the row and
  column order, ``J Tᵀ J = JΛJ + tril((JK)(JQ)ᵀ, −1)`` (``J`` the flip), so
  ``T⁻ᵀ W = J · tri_solve(JK, JQ, JW, Jλ)``: the forward solver with ``Q`` and ``K`` swapped on
  reversed rows (:func:`solve_transposed`).
* ``dT = −dV Zᵀ``, so ``dλ = −Σ_e dV ⊙ Z`` (row sums), and with ``dL = tril(dT, −1)``
  (rank ``e``, never formed): ``dQ_i = −Σ_{j<i} (dV_i·Z_j) K_j`` and
  ``dK_j = −Σ_{i>j} (dV_i·Z_j) Q_i`` — causal and anti-causal linear-attention products
  (:func:`causal_products`), ``O(n (C (d + e) + d e))``.

For ``Y = T⁻¹`` and ``dY``: ``dT = −T⁻ᵀ dY T⁻ᵀ`` by two structured solves
(``W = T⁻ᵀ tril(dY)``, ``dT = −(T⁻¹ Wᵀ)ᵀ``), ``O(n² d)``, then ``dλ = diag(dT)``,
``dQ = dL K``, ``dK = dLᵀ Q``.

The transposed solves run the forward's solver (:func:`matfn.triangular.paths.solve_flat`:
the Triton kernel on CUDA float32, the chunked torch form elsewhere), so they cost what a
forward solve costs; the causal products are a few batched torch products.
:mod:`matfn.triangular.ops` registers these functions as the backward of the custom ops (once
differentiable: no double backward).
"""

from __future__ import annotations

import torch

from .paths import solve_flat

__all__ = [
    "causal_products",
    "solve_transposed",
    "tri_solve_backward",
    "tri_inv_backward",
]


def causal_products(
    dV: torch.Tensor, Z: torch.Tensor, Q: torch.Tensor, K: torch.Tensor, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P K, Pᵀ Q)`` for ``P = tril(dV Zᵀ, −1)``, never formed.

    ``dV, Z`` are ``(b, n, e)``, ``Q, K`` ``(b, n, d)``: ``(P K)_i = Σ_{j<i} (dV_i·Z_j) K_j`` and
    ``(Pᵀ Q)_j = Σ_{i>j} (dV_i·Z_j) Q_i``, the strictly causal and anti-causal linear-attention
    products, in chunks of ``C`` rows. The ``C×C`` block ``P_cc = tril(dV_c Z_cᵀ, −1)`` of each
    chunk serves both; the other chunks enter through ``e×d`` states,
    ``dV_c Σ_{c' < c} Z_{c'}ᵀ K_{c'}`` and ``Z_c Σ_{c' > c} dV_{c'}ᵀ Q_{c'}``, exclusive prefix
    and suffix sums over the chunks. Cost ``O(n (C (e + d) + e d))``; no ``n×n`` matrix is
    formed.
    """
    b, n, e = dV.shape
    d = Q.shape[-1]
    C = chunk_size
    NC = -(-n // C)
    pad = NC * C - n

    def rows(x: torch.Tensor) -> torch.Tensor:
        if pad:
            x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        return x.reshape(b, NC, C, x.shape[-1])

    dVc, Zc, Qc, Kc = rows(dV), rows(Z), rows(Q), rows(K)
    P = torch.tril(dVc @ Zc.mT, -1)
    dQ = P @ Kc
    dK = P.mT @ Qc
    if NC > 1:
        before = (Zc[:, :-1].mT @ Kc[:, :-1]).cumsum(1)  # Σ_{c' < c}, for c = 1 … NC − 1
        after = (dVc[:, 1:].mT @ Qc[:, 1:]).flip(1).cumsum(1).flip(1)  # Σ_{c' > c}, c < NC − 1
        dQ[:, 1:] += dVc[:, 1:] @ before
        dK[:, :-1] += Zc[:, :-1] @ after
    return dQ.reshape(b, NC * C, d)[:, :n], dK.reshape(b, NC * C, d)[:, :n]


def solve_transposed(
    Q: torch.Tensor, K: torch.Tensor, W: torch.Tensor, lam: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """``T⁻ᵀ W`` as ``J · T'⁻¹ (J W)`` with ``T' = JΛJ + tril((JK)(JQ)ᵀ, −1)``."""
    flipped = solve_flat(K.flip(1), Q.flip(1), W.flip(1).contiguous(), lam.flip(1), chunk_size)
    return flipped.flip(1)


def tri_solve_backward(
    Q: torch.Tensor,
    K: torch.Tensor,
    lam: torch.Tensor,
    Z: torch.Tensor,
    dZ: torch.Tensor,
    chunk_size: int,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """``(dQ, dK, dV, dλ)`` of ``Z = T⁻¹ V`` (flattened ``(B, n, ·)`` operands, one dtype).

    ``needs`` says which of ``dQ, dK, dλ`` to compute (``dV`` is always needed by the others).
    """
    need_q, need_k, need_lam = needs
    dV = solve_transposed(Q, K, dZ, lam, chunk_size)
    dlam = -(dV * Z).sum(-1) if need_lam else None
    dQ = dK = None
    if need_q or need_k:
        PK, PtQ = causal_products(dV, Z, Q, K, chunk_size)
        dQ = -PK if need_q else None
        dK = -PtQ if need_k else None
    return dQ, dK, dV, dlam


def tri_inv_backward(
    Q: torch.Tensor,
    K: torch.Tensor,
    lam: torch.Tensor,
    dY: torch.Tensor,
    chunk_size: int,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(dQ, dK, dλ)`` of ``Y = T⁻¹``: ``dT = −T⁻ᵀ dY T⁻ᵀ`` by two solves, ``O(n² d)``.

    Only ``tril(dY)`` matters (the upper part of ``Y`` is constant zero), so it is masked first.
    """
    need_q, need_k, need_lam = needs
    W = solve_transposed(Q, K, torch.tril(dY), lam, chunk_size)  # T⁻ᵀ dY
    dT = -solve_flat(Q, K, W.mT.contiguous(), lam, chunk_size).mT  # −W T⁻ᵀ
    dlam = torch.diagonal(dT, dim1=-2, dim2=-1) if need_lam else None
    dL = torch.tril(dT, -1)
    dQ = dL @ K if need_q else None
    dK = dL.mT @ Q if need_k else None
    return dQ, dK, dlam
