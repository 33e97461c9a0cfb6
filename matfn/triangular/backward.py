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

**Decayed systems** (``T_ij = λ_i δ_ij + [i > j] Σ_c Q_ic K_jc exp(G_ic − G_jc)``): the same
formulas with the decay factors inside the products. The transposed system on reversed rows is
the decayed system of ``(JK, JQ)`` with the log-decays :func:`~matfn.triangular.reference.
reverse_log_decay`; ``dQ = dL ∘ K`` and ``dK = dLᵀ ∘ Q`` become decayed causal products
(:func:`matfn.triangular.paths.causal_decay_flat`, the anti-causal one on reversed rows); and
``dG = Q ⊙ dQ − K ⊙ dK`` (summed over the channels for one decay per row), whose reverse
cumulative sum along the rows is ``dℓ``. ``tri_inv`` takes the solve's backward with ``Z = T⁻¹``
and ``dZ = tril(dY)``: ``dL = −tril(W Yᵀ, −1)`` with ``W = T⁻ᵀ tril(dY)``.

The transposed solves run the forward's solver (:func:`matfn.triangular.paths.solve_flat`:
the Triton kernel on CUDA float32, the chunked torch form elsewhere), so they cost what a
forward solve costs; the causal products are a few batched torch products.
:mod:`matfn.triangular.ops` registers these functions as the backward of the custom ops (once
differentiable: no double backward).
"""

from __future__ import annotations

import torch

from .paths import causal_decay_flat, solve_flat
from .reference import reverse_log_decay, wide_dtype

__all__ = [
    "causal_products",
    "solve_transposed",
    "decay_grad",
    "tri_solve_backward",
    "tri_inv_backward",
]


def causal_products(
    dV: torch.Tensor,
    Z: torch.Tensor,
    Q: torch.Tensor,
    K: torch.Tensor,
    chunk_size: int,
    decay: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P ∘ K, Pᵀ ∘ Q)`` for ``P = tril(dV Zᵀ, −1)``, never formed.

    ``dV, Z`` are ``(b, n, e)``, ``Q, K`` ``(b, n, d)``: ``(P K)_i = Σ_{j<i} (dV_i·Z_j) K_j`` and
    ``(Pᵀ Q)_j = Σ_{i>j} (dV_i·Z_j) Q_i``, the strictly causal and anti-causal linear-attention
    products, in chunks of ``C`` rows. The ``C×C`` block ``P_cc = tril(dV_c Z_cᵀ, −1)`` of each
    chunk serves both; the other chunks enter through ``e×d`` states,
    ``dV_c Σ_{c' < c} Z_{c'}ᵀ K_{c'}`` and ``Z_c Σ_{c' > c} dV_{c'}ᵀ Q_{c'}``, exclusive prefix
    and suffix sums over the chunks. Cost ``O(n (C (e + d) + e d))``; no ``n×n`` matrix is
    formed. With ``decay`` ``(b, n, g)`` each term carries ``exp(G_i − G_j)`` (per channel of
    ``K``, ``Q`` for ``g = d``): the decayed causal product, and the anti-causal one as the
    causal one on reversed rows (:func:`~matfn.triangular.reference.reverse_log_decay`).
    """
    if decay is not None:
        PK = causal_decay_flat(dV, Z, K, decay, chunk_size)
        flipped = causal_decay_flat(
            Z.flip(1), dV.flip(1), Q.flip(1), reverse_log_decay(decay), chunk_size
        )
        return PK, flipped.flip(1)
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
    Q: torch.Tensor,
    K: torch.Tensor,
    W: torch.Tensor,
    lam: torch.Tensor,
    chunk_size: int,
    decay: torch.Tensor | None = None,
) -> torch.Tensor:
    """``T⁻ᵀ W`` as ``J · T'⁻¹ (J W)`` with ``T' = JΛJ + tril((JK)(JQ)ᵀ, −1)`` (decayed alike)."""
    flipped_decay = None if decay is None else reverse_log_decay(decay)
    flipped = solve_flat(
        K.flip(1), Q.flip(1), W.flip(1).contiguous(), lam.flip(1), chunk_size, flipped_decay
    )
    return flipped.flip(1)


def decay_grad(
    Q: torch.Tensor, K: torch.Tensor, dQ: torch.Tensor, dK: torch.Tensor, groups: int
) -> torch.Tensor:
    """``dℓ`` ``(b, n, g)``: the reverse cumulative sum of ``dG = Q ⊙ dQ − K ⊙ dK``.

    ``G = cumsum(ℓ)``; with one decay per row (``g = 1``) ``dG`` is summed over the channels.
    The sum runs in float64 (:func:`~matfn.triangular.reference.wide_dtype`): over thousands of
    rows a float32 sum would add ``n·u`` relative error to ``dℓ``'s small entries.
    """
    dG = Q * dQ - K * dK
    if groups == 1:
        dG = dG.sum(-1, keepdim=True)
    return dG.to(wide_dtype(dG.device)).flip(1).cumsum(1).flip(1).to(dG.dtype)


def tri_solve_backward(
    Q: torch.Tensor,
    K: torch.Tensor,
    lam: torch.Tensor,
    Z: torch.Tensor,
    dZ: torch.Tensor,
    chunk_size: int,
    needs: tuple[bool, bool, bool, bool],
    decay: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """``(dQ, dK, dV, dλ, dℓ)`` of ``Z = T⁻¹ V`` (flattened ``(B, n, ·)`` operands, one dtype).

    ``needs`` says which of ``dQ, dK, dλ, dℓ`` to compute (``dV`` is always needed by the
    others); ``dℓ`` only with ``decay``, and it is ``None`` without.
    """
    need_q, need_k, need_lam, need_decay = needs
    need_decay = need_decay and decay is not None
    dV = solve_transposed(Q, K, dZ, lam, chunk_size, decay)
    dlam = -(dV * Z).sum(-1) if need_lam else None
    dQ = dK = ddecay = None
    if need_q or need_k or need_decay:
        PK, PtQ = causal_products(dV, Z, Q, K, chunk_size, decay)
        dQ, dK = -PK, -PtQ
        if need_decay:
            ddecay = decay_grad(Q, K, dQ, dK, decay.shape[-1])
        dQ = dQ if need_q else None
        dK = dK if need_k else None
    return dQ, dK, dV, dlam, ddecay


def tri_inv_backward(
    Q: torch.Tensor,
    K: torch.Tensor,
    lam: torch.Tensor,
    dY: torch.Tensor,
    chunk_size: int,
    needs: tuple[bool, bool, bool, bool],
    decay: torch.Tensor | None = None,
    Y: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """``(dQ, dK, dλ, dℓ)`` of ``Y = T⁻¹``: ``dT = −T⁻ᵀ dY T⁻ᵀ``, ``O(n² d)``.

    Only ``tril(dY)`` matters (the upper part of ``Y`` is constant zero), so it is masked first.
    Without ``decay``: two solves, ``W = T⁻ᵀ dY`` and ``dT = −W T⁻ᵀ``, then ``dQ = dL K`` and
    ``dK = dLᵀ Q`` for ``dL = tril(dT, −1)``. With ``decay``: the solve's backward with
    ``Z = Y`` (required) and ``dZ = tril(dY)``, through the decayed causal products.
    """
    need_q, need_k, need_lam, _ = needs
    if decay is not None:
        if Y is None:
            raise ValueError("the decayed backward of tri_inv needs Y = T⁻¹")
        dQ, dK, _, dlam, ddecay = tri_solve_backward(
            Q, K, lam, Y, torch.tril(dY), chunk_size, needs, decay
        )
        return dQ, dK, dlam, ddecay
    W = solve_transposed(Q, K, torch.tril(dY), lam, chunk_size)  # T⁻ᵀ dY
    dT = -solve_flat(Q, K, W.mT.contiguous(), lam, chunk_size).mT  # −W T⁻ᵀ
    dlam = torch.diagonal(dT, dim1=-2, dim2=-1) if need_lam else None
    dL = torch.tril(dT, -1)
    dQ = dL @ K if need_q else None
    dK = dL.mT @ Q if need_k else None
    return dQ, dK, dlam, None
