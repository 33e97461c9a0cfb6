"""solve_sylvester against scipy.linalg.solve_sylvester (float64 oracle), residuals, bad inputs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import matfn
from matfn import MatrixSignConvergenceError
from matfn.sylvester import _solve_flat
from tests.strategies import DTYPE_NAMES, fmt, haar_orthonormal


@dataclass(frozen=True)
class SylvesterCase:
    """``A``, ``B`` with real positive spectra ``scale·[1/cond, 1]``, Gaussian ``C``.

    ``kind="spd"``: symmetric positive definite A, B (the msign case); ``"eig"``:
    ``Q diag(λ) Q⁻¹`` with ``κ(Q) = 3`` (non-normal, still real positive spectrum).
    """

    batch: tuple[int, ...]
    n: int
    m: int
    cond_a: float
    cond_b: float
    scale_a: float
    scale_b: float
    scale_c: float
    kind: str
    dtype: torch.dtype
    seed: int

    def _pd(self, rng: np.random.Generator, k: int, cond: float, scale: float) -> np.ndarray:
        lam = scale * (np.geomspace(1.0, 1.0 / cond, k) if k > 1 else np.ones(k))
        W = haar_orthonormal(rng, k, k)
        if self.kind == "spd":
            A = (W * lam) @ W.T
            return (A + A.T) / 2
        Q = (W * np.geomspace(1.0, 3.0, k)) @ haar_orthonormal(rng, k, k).T
        return (Q * lam) @ np.linalg.inv(Q)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        count = math.prod(self.batch)
        As, Bs, Cs = [], [], []
        for _ in range(count):
            As.append(self._pd(rng, self.n, self.cond_a, self.scale_a))
            Bs.append(self._pd(rng, self.m, self.cond_b, self.scale_b))
            Cs.append(self.scale_c * rng.standard_normal((self.n, self.m)))
        shape = self.batch
        return (
            np.stack(As).reshape(*shape, self.n, self.n),
            np.stack(Bs).reshape(*shape, self.m, self.m),
            np.stack(Cs).reshape(*shape, self.n, self.m),
        )

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(torch.from_numpy(x).to(self.dtype) for x in self.arrays())

    def __repr__(self) -> str:
        b = ("b" + "x".join(map(str, self.batch)) + "-") if self.batch else ""
        return (
            f"SylvesterCase({b}{self.kind}-n{self.n}-m{self.m}-condA{fmt(self.cond_a)}-"
            f"condB{fmt(self.cond_b)}-sA{fmt(self.scale_a)}-sB{fmt(self.scale_b)}-"
            f"sC{fmt(self.scale_c)}-{DTYPE_NAMES[self.dtype]}-seed{self.seed})"
        )


def _decades(lo: int, hi: int) -> st.SearchStrategy[float]:
    return st.sampled_from(sorted(range(lo, hi + 1), key=abs)).map(lambda e: float(10.0**e))


@st.composite
def sylvester_cases(draw: st.DrawFn, max_side: int = 20, max_cond: int = 3) -> SylvesterCase:
    batch = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    return SylvesterCase(
        batch=batch,
        n=draw(st.integers(1, max_side)),
        m=draw(st.integers(1, max_side)),
        cond_a=draw(_decades(0, max_cond)),
        cond_b=draw(_decades(0, max_cond)),
        scale_a=draw(_decades(-2, 2)),
        scale_b=draw(_decades(-2, 2)),
        scale_c=draw(_decades(-6, 6)),
        kind=draw(st.sampled_from(["spd", "eig"])),
        dtype=draw(st.sampled_from([torch.float64, torch.float32])),
        seed=draw(st.integers(0, 2**16)),
    )


def sylvester_oracle(*abc: torch.Tensor) -> np.ndarray:
    """scipy.linalg.solve_sylvester per matrix in float64, batch dims broadcast (not n, m)."""
    from scipy.linalg import solve_sylvester

    a, b, c = (t.double().numpy() for t in abc)
    batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2], c.shape[:-2])
    a = np.broadcast_to(a, (*batch, *a.shape[-2:])).reshape(-1, *a.shape[-2:])
    b = np.broadcast_to(b, (*batch, *b.shape[-2:])).reshape(-1, *b.shape[-2:])
    c = np.broadcast_to(c, (*batch, *c.shape[-2:]))
    shape = c.shape
    c = c.reshape(-1, *shape[-2:])
    out = [solve_sylvester(x, y, z) for x, y, z in zip(a, b, c, strict=True)]
    return np.stack(out).reshape(shape) if out else np.zeros(shape)


def _rel(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-300))


def _kappa(case: SylvesterCase) -> float:
    """Condition of X ↦ AX + XB relative to the blocks' scale: (‖A‖ + ‖B‖)/(λ_min A + λ_min B)."""
    big = case.scale_a + case.scale_b
    return big / (case.scale_a / case.cond_a + case.scale_b / case.cond_b)


# Relative-error tolerance against scipy, per unit of the equation's condition number κ
# (rounding of the dtype amplified by κ and the non-normality of the block matrix). Measured
# over 300 examples: err/κ ≤ 1.2e-14 (float64) and ≤ 8e-8 (float32, with the default
# refinement step); ~10× margin. A wrong block or sign gives O(1).
REL_TOL = {torch.float64: 1e-13, torch.float32: 1e-6}


@given(sylvester_cases())
def test_matches_scipy(case: SylvesterCase) -> None:
    A, B, C = case.tensors()
    X = matfn.solve_sylvester(A, B, C)
    assert X.shape == C.shape and X.dtype == case.dtype
    ref = sylvester_oracle(A, B, C)  # oracle of the dtype-rounded inputs
    err = _rel(X.double().numpy(), ref)
    assert err <= REL_TOL[case.dtype] * max(1.0, _kappa(case)), err
    # Residual relative to the terms' size: the backward-error view, independent of κ.
    a, b, c, x = (t.double().numpy() for t in (A, B, C, X))
    res = np.linalg.norm(a @ x + x @ b - c)
    size = np.linalg.norm(a) * np.linalg.norm(x) + np.linalg.norm(x) * np.linalg.norm(b)
    assert res <= REL_TOL[case.dtype] * max(size, np.linalg.norm(c)), res


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_well_conditioned_float32_accuracy(dtype: torch.dtype) -> None:
    # The target: ~1e-6 relative in float32 on well-conditioned SPD problems.
    case = SylvesterCase((), 48, 40, 10.0, 10.0, 1.0, 1.0, 1.0, "spd", dtype, 7)
    A, B, C = case.tensors()
    err = _rel(matfn.solve_sylvester(A, B, C).double().numpy(), sylvester_oracle(A, B, C))
    assert err <= (1e-6 if dtype == torch.float32 else 1e-13), err
    # Refinement is what brings float32 there (about 5e-6 without it).
    if dtype == torch.float32:
        raw = matfn.solve_sylvester(A, B, C, refine=0).double().numpy()
        assert _rel(raw, sylvester_oracle(A, B, C)) >= err


def test_broadcasting_and_batch_equals_loop() -> None:
    case = SylvesterCase((3,), 6, 5, 10.0, 10.0, 1.0, 1.0, 1.0, "spd", torch.float64, 1)
    A, B, C = case.tensors()
    X = matfn.solve_sylvester(A[0], B[:1], C)  # A unbatched, B batch 1, C batch 3
    assert X.shape == (3, 6, 5)
    for i in range(3):
        torch.testing.assert_close(X[i], matfn.solve_sylvester(A[0], B[0], C[i]))


def test_lyapunov_shortcut_equals_general() -> None:
    case = SylvesterCase((2,), 7, 7, 100.0, 1.0, 1.0, 1.0, 1.0, "spd", torch.float64, 2)
    A, _, C = case.tensors()
    lyap = _solve_flat(A, None, C, torch.float64)
    general = _solve_flat(A, A, C, torch.float64)
    torch.testing.assert_close(lyap, general, rtol=1e-12, atol=1e-14)


def test_zero_rhs_and_empty() -> None:
    case = SylvesterCase((), 4, 3, 10.0, 10.0, 1.0, 1.0, 1.0, "spd", torch.float32, 3)
    A, B, C = case.tensors()
    X = matfn.solve_sylvester(A, B, torch.zeros_like(C))
    assert torch.equal(X, torch.zeros_like(C))
    assert matfn.solve_sylvester(A, torch.zeros(0, 0), torch.zeros(4, 0)).shape == (4, 0)
    assert matfn.solve_sylvester(torch.zeros(0, 0), B, torch.zeros(0, 3)).shape == (0, 3)
    empty = matfn.solve_sylvester(A.expand(0, 4, 4), B, C.expand(0, 4, 3))
    assert empty.shape == (0, 4, 3) and empty.dtype == torch.float32


def test_inputs_not_mutated_and_half_precision() -> None:
    case = SylvesterCase((2,), 5, 4, 10.0, 10.0, 1.0, 1.0, 1.0, "spd", torch.float16, 4)
    A, B, C = case.tensors()
    copies = [t.clone() for t in (A, B, C)]
    X = matfn.solve_sylvester(A, B, C)
    for t, c in zip((A, B, C), copies, strict=True):
        assert torch.equal(t, c)
    assert X.dtype == torch.float16  # computed in float32, cast back
    err = _rel(X.double().numpy(), sylvester_oracle(A, B, C))
    assert err <= 5e-3, err  # fp16 output rounding (2⁻¹¹) times κ ≤ 10


def _spd(n: int, eigs: list[float], seed: int = 0) -> torch.Tensor:
    W = torch.from_numpy(haar_orthonormal(np.random.default_rng(seed), n, n))
    return (W * torch.tensor(eigs, dtype=torch.float64)) @ W.T


def test_left_half_plane_is_a_clear_error() -> None:
    A = _spd(4, [2.0, 1.0, 0.5, -1.0])
    B = _spd(3, [1.0, 2.0, 3.0])
    C = torch.ones(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="`A` has eigenvalues in the left half-plane"):
        matfn.solve_sylvester(A, B, C)
    with pytest.raises(ValueError, match="`B` has eigenvalues in the left half-plane"):
        matfn.solve_sylvester(B, -A, C.mT)


def test_imaginary_axis_raises_convergence_error() -> None:
    rot = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)  # eigenvalues ±i
    B = torch.eye(2, dtype=torch.float64)
    with pytest.raises(MatrixSignConvergenceError, match="imaginary axis"):
        matfn.solve_sylvester(rot, B, torch.ones(2, 2, dtype=torch.float64))


def test_singular_A_raises() -> None:
    A = _spd(3, [1.0, 0.5, 0.0])
    B = _spd(2, [1.0, 2.0])
    with pytest.raises((ValueError, MatrixSignConvergenceError), match="`A`"):
        matfn.solve_sylvester(A, B, torch.ones(3, 2, dtype=torch.float64))


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((torch.ones(3), torch.eye(2), torch.ones(3, 2)), ValueError, "`A` must have at least"),
        ((torch.ones(3, 2), torch.eye(2), torch.ones(3, 2)), ValueError, "`A` must be square"),
        ((torch.eye(3), torch.ones(2, 3), torch.ones(3, 2)), ValueError, "`B` must be square"),
        ((torch.eye(3), torch.eye(2), torch.ones(2, 3)), ValueError, "`C` must have shape"),
        (
            (torch.eye(3).expand(2, 3, 3), torch.eye(2).expand(3, 2, 2), torch.ones(3, 2)),
            ValueError,
            "do not broadcast",
        ),
        ((torch.eye(3, dtype=torch.int64), torch.eye(2), torch.ones(3, 2)), TypeError, "`A`"),
        ((torch.eye(3), torch.eye(2, dtype=torch.complex64), torch.ones(3, 2)), TypeError, "`B`"),
        ((torch.eye(3), torch.eye(2), torch.full((3, 2), math.nan)), ValueError, "`C` contains"),
        ((torch.eye(3).to_sparse(), torch.eye(2), torch.ones(3, 2)), TypeError, "dense"),
    ],
    ids=["1d", "A-nonsquare", "B-nonsquare", "C-shape", "batch", "int", "complex", "nan", "sparse"],
)
def test_bad_inputs(args: tuple, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        matfn.solve_sylvester(*args)


def test_bad_options() -> None:
    A, B, C = torch.eye(2), torch.eye(2), torch.ones(2, 2)
    with pytest.raises(ValueError, match="`compute_dtype`"):
        matfn.solve_sylvester(A, B, C, compute_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="`refine`"):
        matfn.solve_sylvester(A, B, C, refine=-1)
