"""Exact float64 references used by the tests, ``matfn report`` and the notebooks.

Every function takes and returns numpy arrays (or anything ``np.asarray`` accepts) in float64,
with leading batch dims. They are slow and exact: SVD, eigendecomposition and scipy solvers.
scipy is imported lazily so that ``import matfn`` does not pull it in.
"""

from __future__ import annotations

import numpy as np

from .coefficients import Coefficients, scalar_map

__all__ = [
    "as_float64",
    "msign_oracle",
    "schedule_oracle",
    "mcsgn_oracle",
    "mclip_oracle",
    "polar_oracle",
    "sylvester_oracle",
    "rank_tolerance",
    "msign_jvp_oracle",
    "msign_vjp_oracle",
]


def as_float64(x: object) -> np.ndarray:
    """A float64 numpy copy of a tensor or array (detached, on the CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().to("cpu").double().numpy()
    return np.array(x, dtype=np.float64)


def rank_tolerance(s: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``max(n, m)·ε₆₄·σ₁``: singular values at or below it count as zero (docs/math.md §1.6)."""
    return max(shape[-2:]) * np.finfo(np.float64).eps * s[..., :1]


def _svd(M: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.linalg.svd(M, full_matrices=False)


def msign_oracle(M: object) -> np.ndarray:
    """``U_r V_rᵀ`` from a float64 SVD with the rank cut-off of :func:`rank_tolerance`.

    Unlike ``scipy.linalg.polar`` this is right for rank-deficient input (zero directions stay 0).
    """
    A = as_float64(M)
    if A.size == 0:
        return A
    U, s, Vh = _svd(A)
    keep = (s > rank_tolerance(s, A.shape)).astype(np.float64)
    return (U * keep[..., None, :]) @ Vh


def schedule_oracle(M: object, coeffs: list[Coefficients], factor: float) -> np.ndarray:
    """What the Newton–Schulz schedule computes in exact arithmetic: ``U f(Σ/(sf‖M‖_F)) Vᵀ``."""
    A = as_float64(M)
    U, s, Vh = _svd(A)
    norm = np.sqrt(np.sum(A * A, axis=(-2, -1), keepdims=True))[..., 0]
    x = s / np.maximum(factor * norm, 1e-300)
    return (U * scalar_map(coeffs, x)[..., None, :]) @ Vh


def polar_oracle(M: object) -> np.ndarray:
    """``scipy.linalg.polar(M)[0]`` per matrix (full-rank inputs only; see docs/math.md §1.6)."""
    from scipy.linalg import polar

    A = as_float64(M)
    flat = A.reshape(-1, *A.shape[-2:])
    return np.stack([polar(a)[0] for a in flat]).reshape(A.shape)


def mcsgn_oracle(M: object) -> np.ndarray:
    """Matrix sign ``P sign(Re Λ) P⁻¹`` (``eigh`` for symmetric input, ``eig`` otherwise).

    Agrees with ``scipy.linalg.signm`` on matrices with real nonzero eigenvalues and returns 0 for
    exactly zero eigenvalues.
    """
    A = as_float64(M)
    flat = A.reshape(-1, *A.shape[-2:])
    out = []
    for a in flat:
        if np.array_equal(a, a.T):
            w, V = np.linalg.eigh(a)
            out.append((V * np.sign(w)) @ V.T)
        else:
            w, P = np.linalg.eig(a)
            out.append(np.real((P * np.sign(w.real)) @ np.linalg.inv(P)))
    return np.stack(out).reshape(A.shape) if out else A


def mclip_oracle(M: object, max_sv: float = 1.0, min_sv: float = 0.0) -> np.ndarray:
    """``U clip(Σ, min_sv, max_sv) Vᵀ``; zero singular values stay 0 (rank preserved)."""
    A = as_float64(M)
    if A.size == 0:
        return A
    U, s, Vh = _svd(A)
    nonzero = s > rank_tolerance(s, A.shape)
    clipped = np.where(nonzero, np.clip(s, min_sv, max_sv), 0.0)
    return (U * clipped[..., None, :]) @ Vh


def sylvester_oracle(A: object, B: object, C: object) -> np.ndarray:
    """``X`` with ``A X + X B = C`` per matrix via ``scipy.linalg.solve_sylvester``."""
    from scipy.linalg import solve_sylvester

    a, b, c = as_float64(A), as_float64(B), as_float64(C)
    batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2], c.shape[:-2])
    fa = np.broadcast_to(a, batch + a.shape[-2:]).reshape(-1, *a.shape[-2:])
    fb = np.broadcast_to(b, batch + b.shape[-2:]).reshape(-1, *b.shape[-2:])
    fc = np.broadcast_to(c, batch + c.shape[-2:]).reshape(-1, *c.shape[-2:])
    out = [solve_sylvester(x, y, z) for x, y, z in zip(fa, fb, fc, strict=True)]
    return np.stack(out).reshape(batch + c.shape[-2:])


def _full_svd_parts(M: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Full SVD ``M = U Σ Vᵀ`` (U n×n, V m×m), σ padded with zeros to length n and m, rank r."""
    U, s, Vh = np.linalg.svd(M, full_matrices=True)
    r = int(np.sum(s > rank_tolerance(s, M.shape))) if s.size else 0
    s = np.where(np.arange(s.size) < r, s, 0.0)
    n, m = M.shape
    sn = np.zeros(n)
    sm = np.zeros(m)
    sn[: s.size] = s
    sm[: s.size] = s
    return U, Vh.T, np.add.outer(sn, sm), r


def _divided(num: np.ndarray, denom: np.ndarray) -> np.ndarray:
    """``num / denom``, 0 where ``denom = 0`` (the pseudo-inverse convention, docs/math.md §4.4)."""
    out = np.zeros_like(num)
    np.divide(num, denom, out=out, where=denom > 0)
    return out


def msign_jvp_oracle(M: object, dM: object) -> np.ndarray:
    """Directional derivative of msign at M along dM, by the SVD closed form (docs/math.md §4.2).

    With the full SVD ``M = U Σ Vᵀ`` of rank r and ``X̃ = Uᵀ dM V``: range–range entries
    ``(X̃ᵢⱼ − X̃ⱼᵢ)/(σᵢ + σⱼ)``, range–null and null–range entries ``X̃ᵢⱼ/(σᵢ + σⱼ)``, null–null
    entries 0; ``dO = U Y Vᵀ``. Exact for full-rank M; for rank-deficient M it is the derivative
    along rank-preserving directions only (the pseudo-inverse convention). Batched, float64.
    """
    A, D = np.broadcast_arrays(as_float64(M), as_float64(dM))
    flat_a = A.reshape(-1, *A.shape[-2:])
    flat_d = D.reshape(-1, *A.shape[-2:])
    out = np.zeros_like(flat_a)
    for k, (a, d) in enumerate(zip(flat_a, flat_d, strict=True)):
        if a.size == 0:
            continue
        U, V, denom, r = _full_svd_parts(a)
        Xt = U.T @ d @ V
        num = Xt.copy()
        num[:r, :r] = Xt[:r, :r] - Xt[:r, :r].T
        num[r:, r:] = 0.0
        out[k] = U @ _divided(num, denom) @ V.T
    return out.reshape(A.shape)


def msign_vjp_oracle(M: object, G: object) -> np.ndarray:
    """Gradient at M of ``⟨G, msign(M)⟩`` by the SVD closed form (docs/math.md §4.2).

    ``Y = (Uᵀ G V) ⊘ (σᵢ + σⱼ)`` (0 where both σ are 0), then ``U (Y − [Yᵀ]_{r×r}) Vᵀ``: the
    Sylvester solution ``X`` of ``(M Oᵀ) X + X (Oᵀ M) = G`` mapped by ``X − O Xᵀ O``. Batched,
    float64.
    """
    A, C = np.broadcast_arrays(as_float64(M), as_float64(G))
    flat_a = A.reshape(-1, *A.shape[-2:])
    flat_c = C.reshape(-1, *A.shape[-2:])
    out = np.zeros_like(flat_a)
    for k, (a, c) in enumerate(zip(flat_a, flat_c, strict=True)):
        if a.size == 0:
            continue
        U, V, denom, r = _full_svd_parts(a)
        Y = _divided(U.T @ c @ V, denom)
        Y[:r, :r] -= Y[:r, :r].T.copy()
        out[k] = U @ Y @ V.T
    return out.reshape(A.shape)
