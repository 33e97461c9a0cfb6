"""Hypothesis strategies for test matrices with controlled shape, spectrum, scale and dtype.

Every strategy draws *parameters* (shape, batch shape, dtype, seed, scale, condition number,
rank, number of singular values pinned at exactly 1) and builds the matrix deterministically from
them, so a failing example prints a short readable case (``MatrixCase(b2x3-n7-m12-cond1e4-…)``)
and shrinks towards small, well-conditioned matrices. Entries are never drawn one by one.

Two families:

* :class:`MatrixCase` / :func:`matrices` — ``(..., n, m)`` matrices ``scale · U diag(s) Vᵀ`` with
  ``U``, ``V`` Haar-distributed (QR of Gaussians, sign-fixed) and a prescribed spectrum
  ``s`` (:func:`spectrum`): log-spaced from 1 down to ``1/cond``, optional exact zeros (rank
  deficiency), optional values pinned at exactly 1 (clip boundaries). Used by msign, mclip and the
  derivative tests.
* :class:`SignCase` / :func:`sign_matrices` — square matrices with real eigenvalues bounded away
  from 0, for mcsgn and the Sylvester solver: ``Q diag(λ) Q⁻¹`` with a well-conditioned ``Q``
  (``kind="eig"``), symmetric ``Q diag(λ) Qᵀ`` (``"sym"``), and block upper-triangular
  ``[[A, C], [0, B]]`` with ``A`` SPD and ``B`` SND (``"block"``). The exact sign is known from
  the construction (:meth:`SignCase.exact_sign`).

Plain builders (:func:`haar_orthonormal`, :func:`prescribed_matrix`, :func:`spectrum`) are exported
for parametrized (non-hypothesis) tests; :func:`case_id` gives the pytest id of any case.

Sizes stay modest by default (sides ≤ 48, ≤ 3 batch elements per dim) so CI stays fast; pass
``max_side=256`` for the few large cases a test marks ``slow``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.linalg import solve_sylvester

__all__ = [
    "DTYPE_NAMES",
    "FLOAT_DTYPES",
    "MatrixCase",
    "SignCase",
    "SpectralCase",
    "case_id",
    "dtype_range",
    "fmt",
    "haar_orthonormal",
    "kronecker_condition",
    "matrices",
    "prescribed_matrix",
    "shapes",
    "sign_matrices",
    "spectral_matrices",
    "spectrum",
]

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
DTYPE_NAMES = {
    torch.float64: "f64",
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
}


def fmt(x: float) -> str:
    """Short readable number for ids: ``1e-06 → 1e-6``, ``1000.0 → 1e3``, ``0.5 → 0.5``."""
    if x == 0:
        return "0"
    e = math.log10(abs(x))
    if abs(e - round(e)) < 1e-9 and abs(e) >= 2:
        return f"{'-' if x < 0 else ''}1e{int(round(e))}"
    return f"{x:.3g}".replace("e-0", "e-").replace("e+0", "e").replace("e+", "e")


def dtype_range(dtype: torch.dtype) -> tuple[float, float]:
    """Scales ``[lo, hi]`` for which every entry of a scaled unit-spectrum matrix stays normal.

    fp16 holds 6.1e-5 … 6.5e4, so its matrices are kept within ``[1e-2, 1e2]`` (entries of a
    ``U diag(s) Vᵀ`` with ``cond ≤ 1e3`` then stay representable); the other dtypes take the full
    ``[1e-6, 1e6]`` the conventions ask for.
    """
    return (1e-2, 1e2) if dtype == torch.float16 else (1e-6, 1e6)


def haar_orthonormal(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """``n×k`` orthonormal columns, Haar-distributed (QR of a Gaussian, sign-fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((n, k)))
    d = np.sign(np.diag(r))
    d[d == 0] = 1
    return q * d


def spectrum(
    k: int,
    cond: float = 1.0,
    rank: int | None = None,
    ones: int = 0,
    min_ratio: float = 0.0,
    scale: float = 1.0,
) -> np.ndarray:
    """Singular values, descending: ``rank`` values log-spaced in ``scale·[1/cond, 1]``, then zeros.

    Parameters
    ----------
    k : int
        Number of singular values (``min(n, m)``).
    cond : float
        Ratio of the largest to the smallest nonzero value.
    rank : int, optional
        Number of nonzero values (default ``k``); the rest are exactly 0.
    ones : int
        How many interior nonzero values (spread evenly through the range) are then replaced by
        exactly 1.0: clip boundaries when the spectrum straddles 1.
    min_ratio : float
        Floor every nonzero value at ``t`` with ``t ≥ min_ratio·‖s‖₂`` (fixed point), so that
        ``σ_min/‖M‖_F ≥ min_ratio`` (bf16 tests need 5e-3). Requires ``min_ratio·√k < 1``.
    scale : float
        The largest value.
    """
    rank = k if rank is None else rank
    s = np.zeros(k)
    if rank > 0:
        s[:rank] = np.geomspace(1.0, 1.0 / cond, rank) if rank > 1 else 1.0
        if min_ratio > 0:
            if min_ratio * math.sqrt(rank) >= 1:
                raise ValueError(f"min_ratio={min_ratio} impossible for rank {rank}")
            t = 0.0
            for _ in range(100):
                t = min_ratio * 1.0001 * float(np.linalg.norm(np.maximum(s[:rank], t)))
            s[:rank] = np.maximum(s[:rank], t)
        s *= scale
        if ones:
            idx = np.unique(np.linspace(0, rank - 1, ones + 2)[1:-1].round().astype(int))
            s[idx] = 1.0
    return np.sort(s)[::-1].copy()


def prescribed_matrix(
    shape: Sequence[int],
    singular_values: np.ndarray,
    seed: int,
    scale: float = 1.0,
    batch_spread: float = 0.0,
) -> np.ndarray:
    """``scale · U diag(s) Vᵀ`` in float64 for every batch element of ``shape = (..., n, m)``.

    Each batch element gets its own Haar ``U``, ``V`` and, with ``batch_spread = d``, its own scale
    factor ``10^u``, ``u ∈ [−d, d]`` (so batched code must use per-matrix norms).
    """
    *batch, n, m = shape
    k = min(n, m)
    s = np.asarray(singular_values, dtype=np.float64)
    assert s.shape == (k,), (s.shape, k)
    rng = np.random.default_rng(seed)
    count = int(np.prod(batch)) if batch else 1
    out = np.empty((count, n, m))
    for i in range(count):
        U = haar_orthonormal(rng, n, k) if k else np.zeros((n, 0))
        V = haar_orthonormal(rng, m, k) if k else np.zeros((m, 0))
        f = 10 ** rng.uniform(-batch_spread, batch_spread) if batch_spread else 1.0
        out[i] = (U * (scale * f * s)) @ V.T
    return out.reshape(*batch, n, m)


@dataclass(frozen=True)
class MatrixCase:
    """A reproducible test matrix ``scale · U diag(s) Vᵀ`` (float64 build, cast to ``dtype``)."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float64
    cond: float = 1.0
    rank: int | None = None
    ones: int = 0
    scale: float = 1.0
    seed: int = 0
    min_ratio: float = 0.0
    batch_spread: float = 0.0
    tags: tuple[str, ...] = field(default=(), compare=False)

    @property
    def n(self) -> int:
        return self.shape[-2]

    @property
    def m(self) -> int:
        return self.shape[-1]

    @property
    def k(self) -> int:
        return min(self.n, self.m)

    @property
    def batch(self) -> tuple[int, ...]:
        return tuple(self.shape[:-2])

    @property
    def effective_rank(self) -> int:
        return self.k if self.rank is None else self.rank

    @property
    def singular_values(self) -> np.ndarray:
        """The spectrum (scaled, with pinned ones; before the per-batch spread)."""
        return spectrum(self.k, self.cond, self.rank, self.ones, self.min_ratio, self.scale)

    def array(self) -> np.ndarray:
        """The exact float64 matrix (before casting to ``dtype``)."""
        return prescribed_matrix(
            self.shape, self.singular_values, self.seed, 1.0, self.batch_spread
        )

    def tensor(self, device: str | torch.device = "cpu") -> torch.Tensor:
        """The matrix as a ``dtype`` tensor; compare against oracles of *this* (rounded) tensor."""
        return torch.from_numpy(self.array()).to(device=device, dtype=self.dtype)

    @property
    def id(self) -> str:
        parts = []
        if self.batch:
            parts.append("b" + "x".join(map(str, self.batch)))
        parts += [f"n{self.n}", f"m{self.m}"]
        if self.cond != 1:
            parts.append(f"cond{fmt(self.cond)}")
        if self.rank is not None and self.rank < self.k:
            parts.append(f"rank{self.rank}")
        if self.ones:
            parts.append(f"ones{self.ones}")
        if self.scale != 1:
            parts.append(f"scale{fmt(self.scale)}")
        if self.min_ratio:
            parts.append(f"floor{fmt(self.min_ratio)}")
        parts.append(DTYPE_NAMES[self.dtype])
        parts.append(f"seed{self.seed}")
        return "-".join(parts + list(self.tags))

    def __repr__(self) -> str:
        return f"MatrixCase({self.id})"


Orientation = Literal["any", "tall", "wide", "square"]


@st.composite
def shapes(
    draw: st.DrawFn,
    *,
    min_side: int = 1,
    max_side: int = 48,
    max_batch_dims: int = 2,
    max_batch: int = 3,
    orientation: Orientation = "any",
) -> tuple[int, ...]:
    """Shapes ``(*batch, n, m)``: 0…``max_batch_dims`` batch dims of 1…``max_batch`` each."""
    batch = draw(
        hnp.array_shapes(min_dims=0, max_dims=max_batch_dims, min_side=1, max_side=max_batch)
    )
    side = st.integers(min_side, max_side)
    n = draw(side)
    if orientation == "square":
        m = n
    elif orientation == "tall":
        m = draw(st.integers(min_side, n))
    elif orientation == "wide":
        m = draw(st.integers(n, max(n, max_side)))
    else:
        m = draw(side)
    return (*batch, n, m)


def _log_uniform(lo: float, hi: float) -> st.SearchStrategy[float]:
    """Decades between lo and hi (both included, shrinking towards 1 when it is inside)."""
    lo_e, hi_e = round(math.log10(lo) * 2), round(math.log10(hi) * 2)
    exps = list(range(lo_e, hi_e + 1))
    exps.sort(key=abs)  # shrink towards scale 1
    return st.sampled_from(exps).map(lambda e: float(10 ** (e / 2)))


@st.composite
def matrices(
    draw: st.DrawFn,
    *,
    dtypes: Sequence[torch.dtype] = (torch.float64, torch.float32),
    min_side: int = 1,
    max_side: int = 48,
    max_batch_dims: int = 2,
    max_batch: int = 3,
    orientation: Orientation = "any",
    max_cond: float = 1e6,
    scales: tuple[float, float] | None = (1e-6, 1e6),
    rank_deficient: bool = False,
    ones: bool = False,
    min_ratio: float = 0.0,
    batch_spread: float = 1.0,
) -> MatrixCase:
    """Strategy for :class:`MatrixCase`.

    Parameters
    ----------
    dtypes : sequence of torch.dtype
        Candidate dtypes (fp16 cases get their scale clipped to :func:`dtype_range`).
    min_side, max_side, max_batch_dims, max_batch, orientation
        Shape controls (see :func:`shapes`).
    max_cond : float
        Largest condition number (ratio of the extreme *nonzero* singular values); drawn as a
        power of √10 from 1 up to it.
    scales : (float, float) or None
        Range of the overall scale (powers of √10); ``None`` means scale 1.
    rank_deficient : bool
        Allow rank ``< min(n, m)`` (exact zero singular values, rank ≥ 1).
    ones : bool
        Allow 0–3 singular values pinned at exactly 1 (the scale is then drawn from
        ``[1, min(max_cond, 1e3)]`` so that the spectrum straddles 1).
    min_ratio : float
        Lower bound on ``σ_min/‖M‖_F`` (see :func:`spectrum`); implies full rank.
    batch_spread : float
        Per-batch-element scale spread in decades.
    """
    shape = draw(
        shapes(
            min_side=min_side,
            max_side=max_side,
            max_batch_dims=max_batch_dims,
            max_batch=max_batch,
            orientation=orientation,
        )
    )
    dtype = draw(st.sampled_from(list(dtypes)))
    k = min(shape[-2:])
    cond = draw(_log_uniform(1.0, max_cond)) if max_cond > 1 and k > 1 else 1.0
    rank = None
    if rank_deficient and min_ratio == 0 and k > 1:
        r = draw(st.integers(1, k))
        rank = None if r == k else r
    n_ones = draw(st.integers(0, 3)) if ones else 0
    scale = 1.0
    if n_ones:
        # Pinned ones are absolute: let the spectrum straddle 1.
        scale = draw(_log_uniform(1.0, min(max_cond, 1e3)))
    elif scales is not None:
        lo, hi = scales
        dlo, dhi = dtype_range(dtype)
        scale = draw(_log_uniform(max(lo, dlo), min(hi, dhi)))
    if min_ratio and min_ratio * math.sqrt(k) >= 1:
        min_ratio = 0.9 / math.sqrt(k)
    seed = draw(st.integers(0, 2**16))
    spread = batch_spread if len(shape) > 2 and not n_ones else 0.0
    return MatrixCase(
        shape=shape,
        dtype=dtype,
        cond=cond,
        rank=rank,
        ones=n_ones,
        scale=scale,
        seed=seed,
        min_ratio=min_ratio,
        batch_spread=spread,
    )


SignKind = Literal["eig", "sym", "block"]


class _ConstructedSign:
    """A batch of square matrices built with their exact matrix sign (mixin of the cases below).

    Subclasses are dataclasses with ``n``, ``batch``, ``scale`` and ``dtype`` fields and a
    ``_parts()`` giving, per batch element, the float64 matrix and its exact sign.
    """

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.batch, self.n, self.n)

    def array(self) -> np.ndarray:
        """The float64 matrix, shape ``(*batch, n, n)`` (scaled)."""
        return self.scale * np.stack([m for m, _ in self._parts()]).reshape(self.shape)

    def exact_sign(self) -> np.ndarray:
        """``mcsgn`` of :meth:`array` from the construction (float64)."""
        return np.stack([s for _, s in self._parts()]).reshape(self.shape)

    def tensor(self, device: str | torch.device = "cpu") -> torch.Tensor:
        return torch.from_numpy(self.array()).to(device=device, dtype=self.dtype)


@dataclass(frozen=True)
class SignCase(_ConstructedSign):
    """A square matrix with real eigenvalues, magnitudes in ``[gap, 1]·scale``, and its exact sign.

    * ``eig``: ``Q diag(λ) Q⁻¹`` with ``Q = W₁ diag(d) W₂`` (Haar ``W``, ``d`` log-spaced in
      ``[1, q_cond]``, so ``κ(Q) = q_cond``);
    * ``sym``: ``W diag(λ) Wᵀ`` (then mcsgn = msign);
    * ``block``: ``[[A, C], [0, B]]``, ``A = W_A diag(λ_A) W_Aᵀ`` SPD, ``B`` SND likewise,
      ``C`` Gaussian of Frobenius norm ``coupling``·‖λ‖ (``q_cond`` unused).

    ``λ`` magnitudes are log-spaced in ``[gap, 1]`` with signs from the seed (``eig``/``sym``; both
    signs present when ``n ≥ 2``); ``zeros`` of them are set to exactly 0 (``sym`` and ``eig``).
    """

    n: int
    batch: tuple[int, ...] = ()
    kind: SignKind = "eig"
    gap: float = 0.1
    q_cond: float = 1.0
    coupling: float = 1.0
    zeros: int = 0
    scale: float = 1.0
    seed: int = 0
    dtype: torch.dtype = torch.float64

    def _parts(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per batch element: (matrix, exact sign), both float64."""
        rng = np.random.default_rng(self.seed)
        count = int(np.prod(self.batch)) if self.batch else 1
        n = self.n
        out = []
        for _ in range(count):
            mags = np.geomspace(1.0, self.gap, n) if n > 1 else np.ones(1)
            if self.kind == "block":
                n1 = int(rng.integers(0, n + 1)) if n > 1 else 1
                mags = rng.permutation(mags)
                WA, WB = haar_orthonormal(rng, n1, n1), haar_orthonormal(rng, n - n1, n - n1)
                A = (WA * mags[:n1]) @ WA.T
                B = -(WB * mags[n1:]) @ WB.T
                C = rng.standard_normal((n1, n - n1))
                C *= self.coupling * np.linalg.norm(mags) / max(np.linalg.norm(C), 1e-300)
                M = np.block([[A, C], [np.zeros((n - n1, n1)), B]])
                # mcsgn(M) = [[I, Y], [0, −I]]; S M = M S gives C + Y B = A Y − C, i.e.
                # A Y + Y (−B) = 2 C (docs/math.md §2.3(1) with the blocks' roles swapped).
                Y = solve_sylvester(A, -B, 2 * C) if n1 and n - n1 else C
                S = np.block([[np.eye(n1), Y], [np.zeros((n - n1, n1)), -np.eye(n - n1)]])
            else:
                signs = rng.choice([-1.0, 1.0], size=n)
                if n >= 2 and abs(signs.sum()) == n:
                    signs[rng.integers(n)] *= -1
                lam = signs * mags
                if self.zeros:
                    lam[rng.permutation(n)[: min(self.zeros, n)]] = 0.0
                sgn = np.sign(lam)
                W = haar_orthonormal(rng, n, n)
                if self.kind == "sym":
                    M = (W * lam) @ W.T
                    M = (M + M.T) / 2
                    S = (W * sgn) @ W.T
                else:
                    d = np.geomspace(1.0, self.q_cond, n) if n > 1 else np.ones(1)
                    Q = (W * d) @ haar_orthonormal(rng, n, n).T
                    Qi = np.linalg.inv(Q)
                    M = (Q * lam) @ Qi
                    S = (Q * sgn) @ Qi
            out.append((M, S))
        return out

    @property
    def id(self) -> str:
        parts = ["b" + "x".join(map(str, self.batch))] if self.batch else []
        parts += [self.kind, f"n{self.n}", f"gap{fmt(self.gap)}"]
        if self.kind == "eig" and self.q_cond != 1:
            parts.append(f"qcond{fmt(self.q_cond)}")
        if self.kind == "block" and self.coupling != 1:
            parts.append(f"coupling{fmt(self.coupling)}")
        if self.zeros:
            parts.append(f"zeros{self.zeros}")
        if self.scale != 1:
            parts.append(f"scale{fmt(self.scale)}")
        parts += [DTYPE_NAMES[self.dtype], f"seed{self.seed}"]
        return "-".join(parts)

    def __repr__(self) -> str:
        return f"SignCase({self.id})"


@st.composite
def sign_matrices(
    draw: st.DrawFn,
    *,
    kinds: Sequence[SignKind] = ("eig", "sym", "block"),
    dtypes: Sequence[torch.dtype] = (torch.float64, torch.float32),
    min_side: int = 1,
    max_side: int = 32,
    max_batch_dims: int = 1,
    max_batch: int = 3,
    min_gap: float = 1e-2,
    max_q_cond: float = 10.0,
    max_coupling: float = 10.0,
    scales: tuple[float, float] | None = (1e-3, 1e3),
) -> SignCase:
    """Strategy for :class:`SignCase` (real eigenvalues, ``|λ|/max|λ| ≥ gap ≥ min_gap``)."""
    batch = draw(
        hnp.array_shapes(min_dims=0, max_dims=max_batch_dims, min_side=1, max_side=max_batch)
    )
    n = draw(st.integers(min_side, max_side))
    kind = draw(st.sampled_from(list(kinds)))
    gap = draw(_log_uniform(min_gap, 1.0))
    q_cond = draw(_log_uniform(1.0, max_q_cond)) if kind == "eig" and max_q_cond > 1 else 1.0
    coupling = draw(_log_uniform(0.1, max_coupling)) if kind == "block" else 1.0
    dtype = draw(st.sampled_from(list(dtypes)))
    scale = 1.0
    if scales is not None:
        lo, hi = scales
        dlo, dhi = dtype_range(dtype)
        scale = draw(_log_uniform(max(lo, dlo), min(hi, dhi)))
    seed = draw(st.integers(0, 2**16))
    return SignCase(
        n=n,
        batch=tuple(batch),
        kind=kind,
        gap=gap,
        q_cond=q_cond,
        coupling=coupling,
        scale=scale,
        seed=seed,
        dtype=dtype,
    )


def case_id(case: object) -> str:
    """pytest id for a :class:`MatrixCase` / :class:`SignCase` (or ``str`` of anything else)."""
    return getattr(case, "id", None) or str(case)


HalfPlane = Literal["both", "right"]


@dataclass(frozen=True)
class SpectralCase(_ConstructedSign):
    """``Q D Q⁻¹`` with complex spectra at controlled angles and controlled eigenvector condition.

    ``D`` is real block-diagonal: 1×1 blocks ``±r`` and 2×2 blocks
    ``±r·[[cos θ, sin θ], [−sin θ, cos θ]]`` (eigenvalues ``±r·e^{±iθ}``, ``θ`` from the
    imaginary-axis-safe range ``[0, max_angle]`` degrees), moduli ``r`` log-spaced in
    ``[1/spread, 1]``. ``Q = W₁ diag(d) W₂ᵀ`` with Haar ``W`` and ``d`` log-spaced in
    ``[1, q_cond]``, so ``κ₂(Q) = q_cond`` exactly: the non-normality is controlled.
    ``half_plane="right"`` keeps every sign +1 (spectrum in the open right half-plane, as
    :func:`matfn.solve_sylvester` needs); ``"both"`` draws signs (both present when ``n ≥ 2``).
    ``complex_pairs``: how many 2×2 blocks (at most ``n // 2``). Angles are spread evenly
    over ``[0, max_angle]`` with the largest always present, so ``max_angle`` is attained.
    The exact sign is ``Q diag(±1) Q⁻¹`` from the construction, and
    ``min |Re λ| ≥ cos(max_angle)/spread``.
    """

    n: int
    batch: tuple[int, ...] = ()
    q_cond: float = 1.0
    max_angle: float = 60.0
    complex_pairs: int = 0
    spread: float = 10.0
    half_plane: HalfPlane = "both"
    scale: float = 1.0
    seed: int = 0
    dtype: torch.dtype = torch.float64

    def _one(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        n = self.n
        pairs = min(self.complex_pairs, n // 2)
        sizes = [2] * pairs + [1] * (n - 2 * pairs)
        sizes = [sizes[i] for i in rng.permutation(len(sizes))]
        mods = np.geomspace(1.0, 1.0 / self.spread, len(sizes)) if len(sizes) > 1 else [1.0]
        mods = rng.permutation(mods)
        if self.half_plane == "right":
            signs = np.ones(len(sizes))
        else:
            signs = rng.choice([-1.0, 1.0], size=len(sizes))
            if len(sizes) >= 2 and abs(signs.sum()) == len(sizes):
                signs[0] *= -1
        angles = np.deg2rad(np.linspace(0.0, self.max_angle, pairs)[::-1]) if pairs else []
        D, E = np.zeros((n, n)), np.zeros((n, n))
        i = k = 0
        for size, r, s in zip(sizes, mods, signs, strict=True):
            if size == 2:
                c, t = math.cos(angles[k]), math.sin(angles[k])
                D[i : i + 2, i : i + 2] = s * r * np.array([[c, t], [-t, c]])
                k += 1
            else:
                D[i, i] = s * r
            E[i : i + size, i : i + size] = s * np.eye(size)
            i += size
        d = np.geomspace(1.0, self.q_cond, n) if n > 1 else np.ones(1)
        Q = (haar_orthonormal(rng, n, n) * d) @ haar_orthonormal(rng, n, n).T
        Qi = np.linalg.inv(Q)
        return Q @ D @ Qi, Q @ E @ Qi

    def _parts(self) -> list[tuple[np.ndarray, np.ndarray]]:
        rng = np.random.default_rng(self.seed)
        return [self._one(rng) for _ in range(math.prod(self.batch))]

    @property
    def id(self) -> str:
        parts = ["b" + "x".join(map(str, self.batch))] if self.batch else []
        parts += [f"n{self.n}", f"qcond{fmt(self.q_cond)}", f"pairs{self.complex_pairs}"]
        parts += [f"angle{fmt(self.max_angle)}", f"spread{fmt(self.spread)}", self.half_plane]
        if self.scale != 1:
            parts.append(f"scale{fmt(self.scale)}")
        parts += [DTYPE_NAMES[self.dtype], f"seed{self.seed}"]
        return "-".join(parts)

    def __repr__(self) -> str:
        return f"SpectralCase({self.id})"


@st.composite
def spectral_matrices(
    draw: st.DrawFn,
    *,
    dtypes: Sequence[torch.dtype] = (torch.float64,),
    min_side: int = 1,
    max_side: int = 24,
    max_batch_dims: int = 1,
    max_batch: int = 2,
    max_q_cond: float = 1e3,
    max_angle: float = 87.0,
    max_spread: float = 1e2,
    half_plane: HalfPlane = "both",
    scales: tuple[float, float] | None = (1e-3, 1e3),
) -> SpectralCase:
    """Strategy for :class:`SpectralCase`: non-normal, complex spectra, scale sweeps.

    ``q_cond`` (eigenvector condition) and ``spread`` are drawn in half decades up to their
    maxima, the angle among 0°, 30°, 60°, 80° and ``max_angle`` (shrinking towards real
    spectra), the number of complex pairs from 0 to ``n // 2``.
    """
    batch = draw(
        hnp.array_shapes(min_dims=0, max_dims=max_batch_dims, min_side=1, max_side=max_batch)
    )
    n = draw(st.integers(min_side, max_side))
    angles = sorted({a for a in (0.0, 30.0, 60.0, 80.0, max_angle) if a <= max_angle})
    dtype = draw(st.sampled_from(list(dtypes)))
    scale = 1.0
    if scales is not None:
        lo, hi = scales
        dlo, dhi = dtype_range(dtype)
        scale = draw(_log_uniform(max(lo, dlo), min(hi, dhi)))
    return SpectralCase(
        n=n,
        batch=tuple(batch),
        q_cond=draw(_log_uniform(1.0, max_q_cond)),
        max_angle=draw(st.sampled_from(angles)),
        complex_pairs=draw(st.integers(0, n // 2)),
        spread=draw(_log_uniform(1.0, max_spread)),
        half_plane=half_plane,
        scale=scale,
        seed=draw(st.integers(0, 2**16)),
        dtype=dtype,
    )


def kronecker_condition(A: np.ndarray, B: np.ndarray) -> float:
    """2-norm condition of ``X ↦ A X + X B`` (the ``nm × nm`` Kronecker form; small sides)."""
    n, m = A.shape[-1], B.shape[-1]
    T = np.kron(np.eye(m), A) + np.kron(B.T, np.eye(n))
    return float(np.linalg.cond(T))
