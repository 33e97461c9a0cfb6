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
:func:`tri_solve_decay_chunked_torch`, :func:`causal_product_decay_torch`
    The decayed systems ``T_ij = λ_i δ_ij + [i > j] Σ_c Q_ic K_jc exp(G_ic − G_jc)`` with
    ``G = cumsum(ℓ)`` (docs/math.md §5.6) and the decayed causal product of their backward,
    chunked with chunk-relative exponents only (:func:`chunk_log_decay`); the path off CUDA
    float32 (the inverse is the solve on ``V = I``, :func:`matfn.triangular.paths.inv_flat`).

All take ``Q, K`` ``(B, n, d)``, ``V`` ``(B, n, e)`` and ``λ`` ``(B, n)`` of one dtype; the
decayed forms also take ``ℓ`` ``(B, n, 1)`` (one decay per row) or ``(B, n, d)`` (per channel).
"""

from __future__ import annotations

import torch

__all__ = [
    "DEFAULT_CHUNK",
    "tri_inv_torch",
    "tri_solve_torch",
    "tri_inv_chunked_torch",
    "tri_solve_chunked_torch",
    "wide_dtype",
    "chunk_log_decay",
    "tri_solve_decay_chunked_torch",
    "causal_product_decay_torch",
    "reverse_log_decay",
    "decay_dense_torch",
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


def _chunk_rows(x: torch.Tensor, NC: int, C: int) -> torch.Tensor:
    """``(B, n, m)`` → ``(B, NC, C, m)``, zero rows appended."""
    B, n, m = x.shape
    return torch.nn.functional.pad(x, (0, 0, 0, NC * C - n)).reshape(B, NC, C, m)


def decay_factors(R: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``exp(R_i − R_j)`` for ``i > j`` inside each chunk, 0 on and above the diagonal.

    ``R`` ``(..., C, g)``: the in-chunk cumulative log-decays (``g = 1``: one per row, giving
    ``(..., C, C)``; ``g = d``: per channel, giving ``(..., C, C, d)``). The exponents are formed
    in ``R``'s dtype (float64: differences of large sums) and rounded to ``dtype`` before
    ``exp``; for ``ℓ ≤ 0`` they are ``≤ 0`` below the diagonal, and ``−∞`` above it.
    """
    C = R.shape[-2]
    below = torch.ones(C, C, dtype=torch.bool, device=R.device).tril(-1)
    if R.shape[-1] == 1:
        D = R[..., :, None, 0] - R[..., None, :, 0]
        return torch.where(below, D, -torch.inf).to(dtype).exp()
    D = R[..., :, None, :] - R[..., None, :, :]
    return torch.where(below[..., None], D, -torch.inf).to(dtype).exp()


def wide_dtype(device: torch.device) -> torch.dtype:
    """float64 for sums that must not cancel or drift; float32 on MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def chunk_log_decay(log_decay: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """``R`` ``(B, NC, C, g)``: the cumulative sum of ``ℓ`` ``(B, n, g)`` inside each chunk.

    ``R_i = G_i − G_{l−1}`` for the chunk starting at row ``l``: every exponent the decayed forms
    and kernels use is a difference of two of these. In :func:`wide_dtype`, so that differences
    of large sums do not cancel. Padded rows have ``ℓ = 0``, so their ``R`` repeats the chunk's
    last real one.
    """
    NC = -(-log_decay.shape[1] // chunk_size)
    wide = wide_dtype(log_decay.device)
    return _chunk_rows(log_decay.to(wide), NC, chunk_size).cumsum(2)


def tri_solve_decay_chunked_torch(
    Q: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor,
    lam: torch.Tensor,
    log_decay: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    r"""Chunked ``T⁻¹ V`` for the decayed ``T`` (docs/math.md §5.6), stable for any ``ℓ ≤ 0``.

    ``ℓ`` is ``(B, n, 1)`` (one decay per row) or ``(B, n, d)`` (one per channel). Only
    chunk-relative log-decays are formed (:func:`chunk_log_decay`, in float64) and cast to the
    compute dtype before ``exp``: with ``R`` the cumulative sum of ``ℓ`` inside a chunk
    (``R_i = G_i − G_{l−1}``, the last row of the previous chunk as reference, ``G_{−1} = 0``),

    * the chunk block ``A_ij = Σ_c Q_ic K_jc exp(R_ic − R_jc)`` for ``i > j`` (exponent masked
      to ``−∞`` on and above the diagonal before ``exp``),
    * ``Q̃ = Q ⊙ exp(R)`` reads the state, ``K̃ = K ⊙ exp(R_last − R)`` writes it, and the state
      ``S = Σ_{j<l} exp(G_{l−1} − G_j) ⊙ K_j x_jᵀ`` (``d×e``) is carried by
      ``S ← exp(R_last) ⊙ S + K̃_cᵀ X_c``;

    for ``ℓ ≤ 0`` every exponent is ``≤ 0``, so no factor exceeds 1 however strong the decay.
    Cost ``≈ n (4 d e + 2 C e + 2 C d)`` plus the ``C×C×d`` block for per-channel decay.
    """
    B, n, d = Q.shape
    C = chunk_size
    NC = -(-n // C)
    Qc, Kc, Vc = _chunk_rows(Q, NC, C), _chunk_rows(K, NC, C), _chunk_rows(V, NC, C)
    lc = torch.nn.functional.pad(lam, (0, NC * C - n), value=1.0).reshape(B, NC, C)
    dt = Q.dtype
    R = chunk_log_decay(log_decay, C)  # (B, NC, C, g)
    last = R[:, :, -1:]  # (B, NC, 1, g)
    Qt = Qc * R.to(dt).exp()
    Kt = Kc * (last - R).to(dt).exp()
    step = last.squeeze(2).to(dt).exp()  # (B, NC, g): the state's decay across a chunk
    E = decay_factors(R, dt)  # (B, NC, C, C) or (B, NC, C, C, d)
    if log_decay.shape[-1] == 1:
        A = (Qc @ Kc.mT) * E
    else:
        A = torch.einsum("bnic,bnjc,bnijc->bnij", Qc, Kc, E)
    Tcc = torch.diag_embed(lc) + A
    Uc = torch.linalg.solve_triangular(Tcc, Vc, upper=False)
    Pc = torch.linalg.solve_triangular(Tcc, Qt, upper=False)
    S = V.new_zeros(B, d, V.shape[-1])
    X = []
    for c in range(NC):
        Xc = Uc[:, c] - Pc[:, c] @ S if c else Uc[:, c]
        X.append(Xc)
        if c + 1 < NC:
            S = step[:, c, :, None] * S + Kt[:, c].mT @ Xc
    return torch.stack(X, 1).reshape(B, NC * C, -1)[:, :n]


def causal_product_decay_torch(
    A: torch.Tensor,
    B: torch.Tensor,
    W: torch.Tensor,
    log_decay: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    r"""``O_r = Σ_{s<r} (A_r·B_s) W_s ⊙ exp(G_r − G_s)``, ``G = cumsum(ℓ)``, in chunks.

    ``A, B`` ``(b, n, e)``, ``W`` ``(b, n, d)``, ``ℓ`` ``(b, n, 1)`` or ``(b, n, d)`` (a decay per
    channel of ``W``). The strictly causal, decayed linear-attention product of the backward
    (docs/math.md §5.6): inside a chunk ``P = tril(A_c B_cᵀ, −1)`` weighted by the chunk-relative
    factors of :func:`decay_factors`; across chunks the ``e×d`` state
    ``H = Σ_{s<l} B_sᵀ (W_s ⊙ exp(G_{l−1} − G_s))`` enters as ``e^{R} ⊙ (A_c H)`` and is carried by
    ``H ← e^{R_last} ⊙ H + B_cᵀ (W_c ⊙ e^{R_last − R})``; every exponent is ``≤ 0`` for ``ℓ ≤ 0``.
    Cost ``≈ n (2 C e + 2 C d + 4 e d)`` (plus the ``C×C×d`` factors per channel).
    """
    b, n, _ = A.shape
    C = chunk_size
    NC = -(-n // C)
    dt = A.dtype
    Ac, Bc, Wc = _chunk_rows(A, NC, C), _chunk_rows(B, NC, C), _chunk_rows(W, NC, C)
    R = chunk_log_decay(log_decay, C)  # (b, NC, C, g)
    last = R[:, :, -1:]
    P = torch.tril(Ac @ Bc.mT, -1)
    E = decay_factors(R, dt)
    if log_decay.shape[-1] == 1:
        O = (P * E) @ Wc
    else:
        O = torch.einsum("bnij,bnjc,bnijc->bnic", P, Wc, E)
    Wt = Wc * (last - R).to(dt).exp()
    Rq = R.to(dt).exp()
    step = last.to(dt).exp()  # (b, NC, 1, g)
    H = A.new_zeros(b, A.shape[-1], W.shape[-1])
    out = [O[:, 0]]
    for c in range(1, NC):
        H = step[:, c - 1] * H + Bc[:, c - 1].mT @ Wt[:, c - 1]
        out.append(O[:, c] + Rq[:, c] * (Ac[:, c] @ H))
    return torch.stack(out, 1).reshape(b, NC * C, -1)[:, :n]


def reverse_log_decay(log_decay: torch.Tensor) -> torch.Tensor:
    """``ℓ' = [0, ℓ_{n−1}, …, ℓ_1]``, the log-decays of the reversed rows (``G' = −flip(G)``).

    With ``G'_k = −G_{n−1−k}``, ``G_i − G_j = G'_{j'} − G'_{i'}`` (``i' = n−1−i``): the transposed
    decayed system and the anti-causal product are the causal ones on reversed rows with this
    decay; ``ℓ'_0`` only shifts ``G'`` and cancels, and ``ℓ' ≤ 0`` where ``ℓ ≤ 0``.
    """
    return torch.cat([torch.zeros_like(log_decay[:, :1]), log_decay.flip(1)[:, :-1]], 1)


def decay_dense_torch(
    Q: torch.Tensor, K: torch.Tensor, lam: torch.Tensor, log_decay: torch.Tensor
) -> torch.Tensor:
    """The dense decayed ``T`` ``(B, n, n)`` from its definition, pairwise exponents only.

    ``O(n² d)`` memory for per-channel decay: the tests' oracle, not a solver.
    """
    G = log_decay.to(torch.float64).cumsum(1)  # (B, n, g)
    n = Q.shape[1]
    below = torch.ones(n, n, dtype=torch.bool, device=Q.device).tril(-1)
    D = torch.where(below[..., None], G[:, :, None, :] - G[:, None, :, :], -torch.inf)
    E = D.to(Q.dtype).exp()  # (B, n, n, g)
    if E.shape[-1] == 1:
        L = (Q @ K.mT) * E[..., 0]
    else:
        L = torch.einsum("bic,bjc,bijc->bij", Q, K, E)
    return torch.diag_embed(lam) + L
