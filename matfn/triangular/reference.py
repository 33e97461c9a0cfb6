r"""Torch forms of ``tri_inv`` / ``tri_solve`` for ``T = Λ + tril(Q Kᵀ, −1)`` (docs/math.md §5).

Each form is the blueprint of the next:

:func:`tri_inv_torch` / :func:`tri_solve_torch`
    The row recursion (forward substitution through the ``d``-dimensional state
    ``S_i = K[:i]ᵀ Y[:i]``): readable, one Python step per row; the tests' oracle.
:func:`tri_inv_chunked_torch` / :func:`tri_solve_chunked_torch`
    Chunks of ``C`` rows: a dense ``C×C`` triangular inverse inside a chunk and a ``d×n``
    (``d×e``) state passed across chunks. The CPU (and float64) path of the public functions.
:mod:`matfn.triangular.inverse`, :mod:`matfn.triangular.solve`
    The Triton kernels for CUDA float32, built on the chunked form.

All take ``Q, K`` ``(B, n, d)``, ``V`` ``(B, n, e)`` and ``λ`` ``(B, n)`` of one dtype.
"""

from __future__ import annotations

import torch

__all__ = [
    "DEFAULT_CHUNK",
    "tri_inv_torch",
    "tri_solve_torch",
    "tri_inv_chunked_torch",
    "tri_solve_chunked_torch",
]

#: Default chunk size ``C`` of the chunked forms.
DEFAULT_CHUNK = 64


def tri_inv_torch(Q: torch.Tensor, K: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Row recursion for ``T⁻¹``; ``Q, K`` are ``(B, n, d)``, ``λ`` is ``(B, n)``.

    Row ``i`` of ``T Y = I`` reads ``λ_i Y_i + q_iᵀ S_i = e_i`` with the state
    ``S_i = Σ_{j<i} k_j Y_j`` (``d×n``), so ``Y_i = (e_i − q_iᵀ S_i)/λ_i`` and
    ``S_{i+1} = S_i + k_i Y_i``. Cost ``4 n² d`` FLOPs, ``n`` sequential steps.
    """
    B, n, d = Q.shape
    Y = Q.new_zeros(B, n, n)
    S = Q.new_zeros(B, d, n)
    for i in range(n):
        row = -(Q[:, i, None, :] @ S).squeeze(1)
        row[:, i] += 1
        row = row / lam[:, i, None]
        Y[:, i] = row
        S += K[:, i, :, None] * row[:, None, :]
    return Y


def tri_solve_torch(
    Q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, lam: torch.Tensor
) -> torch.Tensor:
    """Row recursion for ``T⁻¹ V``: ``x_i = (v_i − q_iᵀ S)/λ_i``, ``S += k_i x_iᵀ`` (d×e state)."""
    B, n, d = Q.shape
    X = V.new_zeros(V.shape)
    S = V.new_zeros(B, d, V.shape[-1])
    for i in range(n):
        x = (V[:, i] - (Q[:, i, None, :] @ S).squeeze(1)) / lam[:, i, None]
        X[:, i] = x
        S += K[:, i, :, None] * x[:, None, :]
    return X


def chunk_blocks(
    Q: torch.Tensor, K: torch.Tensor, lam: torch.Tensor, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All chunks at once: ``Q_c, K_c`` ``(B, NC, C, d)`` and ``Y_cc = T_cc⁻¹`` ``(B, NC, C, C)``.

    ``n`` is padded to ``NC·C`` with zero rows of ``Q, K`` and ``λ = 1``; padding sits after the
    real rows of the last chunk, so the top-left block of its inverse is the real one.
    """
    B, n, d = Q.shape
    C = chunk_size
    NC = -(-n // C)
    pad = NC * C - n
    Qc = torch.nn.functional.pad(Q, (0, 0, 0, pad)).view(B, NC, C, d)
    Kc = torch.nn.functional.pad(K, (0, 0, 0, pad)).view(B, NC, C, d)
    lc = torch.nn.functional.pad(lam, (0, pad), value=1.0).view(B, NC, C)
    Tcc = torch.diag_embed(lc) + torch.tril(Qc @ Kc.mT, -1)
    eye = torch.eye(C, dtype=Q.dtype, device=Q.device)
    return Qc, Kc, torch.linalg.solve_triangular(Tcc, eye, upper=False)


def tri_inv_chunked_torch(
    Q: torch.Tensor, K: torch.Tensor, lam: torch.Tensor, chunk_size: int = DEFAULT_CHUNK
) -> torch.Tensor:
    """Chunked ``T⁻¹`` (docs/math.md §5.2): ``C×C`` inverses and a ``d×n`` state across chunks.

    All chunk inverses ``Y_cc`` and ``P_c = Y_cc Q_c`` are formed in one batched call; then for
    the chunk ``[l, e)``: ``Y[l:e, :l] = −P_c Z[:, :l]`` and ``Z[:, :e] += K_cᵀ Y[l:e, :e]`` with
    ``Z = K[:l]ᵀ T[:l,:l]⁻¹``. Cost ``≈ (2d + C) n²`` FLOPs.
    """
    B, n, d = Q.shape
    C = chunk_size
    Qc, Kc, Ycc = chunk_blocks(Q, K, lam, C)
    Pc = Ycc @ Qc
    Y = Q.new_zeros(B, n, n)
    Z = Q.new_zeros(B, d, n)
    for c in range(Ycc.shape[1]):
        l, e = c * C, min(c * C + C, n)
        if l:
            Y[:, l:e, :l] = -Pc[:, c, : e - l] @ Z[:, :, :l]
        Y[:, l:e, l:e] = Ycc[:, c, : e - l, : e - l]
        if e < n:
            Z[:, :, :e] += Kc[:, c, : e - l].mT @ Y[:, l:e, :e]
    return Y


def tri_solve_chunked_torch(
    Q: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor,
    lam: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Chunked ``T⁻¹ V``: ``X_c = U_c − P_c Z``, ``Z += K_cᵀ X_c`` (``Z`` is d×e).

    The chunk-local ``U_c = Y_cc V_c`` and ``P_c = Y_cc Q_c`` are formed for all chunks in one
    batch; the loop is two small products per chunk. Cost ``≈ n (4 d e + 2 C e + 2 C d)``.
    """
    B, n, d = Q.shape
    C = chunk_size
    Qc, Kc, Ycc = chunk_blocks(Q, K, lam, C)
    NC = Ycc.shape[1]
    Vc = torch.nn.functional.pad(V, (0, 0, 0, NC * C - n)).view(B, NC, C, V.shape[-1])
    Uc, Pc = Ycc @ Vc, Ycc @ Qc
    X = torch.empty_like(Uc)
    Z = V.new_zeros(B, d, V.shape[-1])
    for c in range(NC):
        X[:, c] = Uc[:, c] - Pc[:, c] @ Z
        if c + 1 < NC:
            Z += Kc[:, c].mT @ X[:, c]
    return X.view(B, NC * C, -1)[:, :n]
