"""solve_sylvester against scipy.linalg.solve_sylvester (float64 oracle), residuals, bad inputs."""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import matfn
from matfn import MatrixSignConvergenceError
from matfn import sylvester as sylvester_module
from matfn.sylvester import SylvesterSolveError, _solve_flat
from tests.strategies import (
    DTYPE_NAMES,
    SpectralCase,
    fmt,
    haar_orthonormal,
    kronecker_condition,
    spectral_matrices,
)


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
    # The issue's target: ~1e-6 relative in float32 on well-conditioned SPD problems.
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


def test_singular_equation_raises_with_residual() -> None:
    # A = B = rotation: λ(A) + λ(B) = i − i = 0, the equation is singular. The Newton iteration
    # breaks down on the axis eigenvalues, Bartels–Stewart returns garbage: a clear error that
    # states the achieved residual (never the backward-stable 1e16-sized "solution").
    rot = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    C = torch.ones(2, 2, dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):
        with pytest.raises(SylvesterSolveError, match="relative residual") as info:
            matfn.solve_sylvester(rot.to(dtype), rot.to(dtype), C.to(dtype))
        assert isinstance(info.value, MatrixSignConvergenceError)
        assert "imaginary axis" in str(info.value) and info.value.residual > 1e-3


def test_left_half_plane_solvable_equation_uses_fallback() -> None:
    # A with an eigenvalue −1, B with spectrum {2, 3}: outside the sign route, but no eigenvalue
    # of A is minus one of B, so the equation is solvable and the verified fallback returns it
    # (scipy solves it too). The same path takes a singular A whose zero eigenvalue rounding
    # moved to either side of the imaginary axis.
    A = _spd(4, [2.0, 1.0, 0.5, -1.0])
    B = _spd(2, [2.0, 3.0], seed=1)
    C = torch.ones(4, 2, dtype=torch.float64)
    X = matfn.solve_sylvester(A, B, C)
    np.testing.assert_allclose(X.numpy(), sylvester_oracle(A, B, C), rtol=1e-12, atol=1e-12)
    with pytest.MonkeyPatch.context() as mp:  # the sign route reads "left half-plane" for A
        mp.setattr(sylvester_module, "_left_half_plane", lambda block: True)
        singular = _spd(3, [1.0, 0.5, 0.0])
        B2 = _spd(2, [1.0, 2.0])
        C2 = torch.ones(3, 2, dtype=torch.float64)
        X2 = matfn.solve_sylvester(singular, B2, C2)
        np.testing.assert_allclose(X2.numpy(), sylvester_oracle(singular, B2, C2), atol=1e-12)


def test_axis_or_singular_A_solvable_equation_uses_fallback() -> None:
    # Outside the sign route's precondition (A singular, or eigenvalues ±i) but a solvable
    # equation: the Newton iteration breaks down and Bartels–Stewart's verified result returns.
    rot = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    singular = _spd(3, [1.0, 0.5, 0.0])
    for A, B in ((rot, torch.eye(2, dtype=torch.float64)), (singular, _spd(2, [1.0, 2.0]))):
        C = torch.ones(A.shape[-1], B.shape[-1], dtype=torch.float64)
        X = matfn.solve_sylvester(A, B, C)
        np.testing.assert_allclose(X.numpy(), sylvester_oracle(A, B, C), rtol=1e-12, atol=1e-12)


def test_missing_scipy_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    # Without scipy the fallback cannot run: the error names the `oracles` extra and the cause.
    monkeypatch.setitem(sys.modules, "scipy.linalg", None)
    rot = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    with pytest.raises(SylvesterSolveError, match=r"matfn\[oracles\]"):
        matfn.solve_sylvester(rot, torch.eye(2, dtype=torch.float64), torch.ones(2, 2))


def test_import_does_not_import_scipy() -> None:
    code = "import sys, matfn; assert 'scipy' not in sys.modules, 'scipy imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


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


def _relative_residual(A: np.ndarray, B: np.ndarray, C: np.ndarray, X: np.ndarray) -> float:
    return float(np.linalg.norm(A @ X + X @ B - C) / np.linalg.norm(C))


@pytest.mark.parametrize("coupling", [0.1, 0.3, 0.5, 1.0, 2.0, 3.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_issue_nonnormal_example(coupling: float, dtype: torch.dtype) -> None:
    # A = diag(1…3) + coupling·(strictly upper N(0, 1)), n = 30, B = 2I: strongly
    # non-normal A, well-conditioned equation (Kronecker condition 1.7 … 2.6e3). A polynomial
    # sign iteration loses accuracy like the non-normality (relative residual 50 at coupling 1).
    rng = np.random.default_rng(0)
    n = 30
    A = np.diag(np.linspace(1, 3, n)) + coupling * np.triu(rng.standard_normal((n, n)), 1)
    B, C = 2 * np.eye(n), rng.standard_normal((n, n))
    tA, tB, tC = (torch.from_numpy(t).to(dtype) for t in (A, B, C))
    X = matfn.solve_sylvester(tA, tB, tC)
    a, b, c = (t.double().numpy() for t in (tA, tB, tC))
    res = _relative_residual(a, b, c, X.double().numpy())
    if dtype == torch.float64:
        assert res <= 1e-13, res
    else:
        # The float32 output's rounding: u·(‖A‖ + ‖B‖)‖X‖/‖C‖ (the float64 result before the
        # cast meets 1e-5 by the acceptance test).
        x = X.double().numpy()
        floor = 4 * 2**-24 * (np.linalg.norm(a) + np.linalg.norm(b)) * np.linalg.norm(x)
        assert res <= 1e-5 + floor / np.linalg.norm(c), res


@st.composite
def sylvester_spectral_problems(
    draw: st.DrawFn, dtypes: tuple[torch.dtype, ...] = (torch.float64,)
) -> tuple[SpectralCase, SpectralCase, float, int]:
    """Right-half-plane ``A``, ``B`` (complex, non-normal), a scale for ``C`` and a seed."""
    common = dict(
        max_side=12, max_batch_dims=0, half_plane="right", max_q_cond=1e3, scales=(1e-2, 1e2)
    )
    dtype = draw(st.sampled_from(list(dtypes)))
    A = draw(spectral_matrices(dtypes=[dtype], **common))
    B = draw(spectral_matrices(dtypes=[dtype], **common))
    return A, B, draw(st.sampled_from([1e-6, 1.0, 1e6])), draw(st.integers(0, 2**16))


# Tested envelope: A, B of side ≤ 12 with eigenvector condition κ₂(Q) ≤ 1e3 each, complex
# pairs at 0°–87°, moduli spread ≤ 1e2, scales 1e-2…1e2 (A and B independently), ‖C‖ scale
# 1e-6…1e6; cases with Kronecker condition above 1e4 are skipped. float64: the 1e-10 target
# (measured ≤ 1e-13). float32: 1e-5 plus the float32 output's own rounding
# u·(‖A‖ + ‖B‖)‖X‖/‖C‖; the float64 result of a float32 solve meets 1e-5 itself.
@given(sylvester_spectral_problems(dtypes=(torch.float64, torch.float32)))
def test_complex_nonnormal_spectra(problem: tuple) -> None:
    case_a, case_b, c_scale, seed = problem
    A, B = case_a.tensor(), case_b.tensor()
    a, b = A.double().numpy(), B.double().numpy()
    kappa = kronecker_condition(a, b)
    assume(kappa <= 1e4)
    rng = np.random.default_rng(seed)
    C = torch.from_numpy(c_scale * rng.standard_normal((case_a.n, case_b.n))).to(A.dtype)
    X = matfn.solve_sylvester(A, B, C)
    c, x = C.double().numpy(), X.double().numpy()
    res = _relative_residual(a, b, c, x)
    if A.dtype == torch.float64:
        assert res <= 1e-10, (res, kappa)
        ref = sylvester_oracle(A, B, C)
        assert _rel(x, ref) <= 1e-14 * kappa * max(case_a.q_cond, case_b.q_cond) ** 2 + 1e-13
    else:
        floor = 4 * 2**-24 * (np.linalg.norm(a) + np.linalg.norm(b)) * np.linalg.norm(x)
        assert res <= 1e-5 + floor / np.linalg.norm(c), (res, kappa)
        # Computed in float32 with float64 residuals, returned in float64: the target itself.
        X64 = matfn.solve_sylvester(A.double(), B.double(), C.double(), compute_dtype=torch.float32)
        assert _relative_residual(a, b, c, X64.numpy()) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_scale_sweep(dtype: torch.dtype) -> None:
    # X(sA, sB, tC) = (t/s)·X(A, B, C) for s, t across the dtype's range (no overflow in norms).
    case_a = SpectralCase(n=6, q_cond=10.0, complex_pairs=2, max_angle=80.0, half_plane="right")
    case_b = SpectralCase(n=5, q_cond=3.0, complex_pairs=1, max_angle=60.0, half_plane="right")
    A, B = case_a.tensor().to(dtype), case_b.tensor().to(dtype)
    C = torch.from_numpy(np.random.default_rng(1).standard_normal((6, 5))).to(dtype)
    X0 = matfn.solve_sylvester(A, B, C).double()
    exps = (-30, -15, 15, 30) if dtype == torch.float32 else (-150, -75, 75, 150)
    for es in exps:
        for et in exps:
            s, t = 10.0**es, 10.0**et
            if dtype == torch.float32 and abs(et - es) > 30:
                continue  # X itself would leave the float32 range
            X = matfn.solve_sylvester(A * s, B * s, C * t).double() * (s / t)
            assert _rel(X.numpy(), X0.numpy()) <= (1e-12 if dtype == torch.float64 else 1e-5)


def test_refinement_replays_without_reinverting(monkeypatch: pytest.MonkeyPatch) -> None:
    # The Newton run's inverses are recorded: refinement steps invert nothing.
    calls = {"inv": 0}
    real = torch.linalg.inv_ex

    def counting(*args, **kwargs):
        calls["inv"] += 1
        return real(*args, **kwargs)

    case = SylvesterCase((), 20, 15, 100.0, 100.0, 1.0, 1.0, 1.0, "eig", torch.float32, 3)
    A, B, C = case.tensors()
    monkeypatch.setattr(torch.linalg, "inv_ex", counting)
    matfn.solve_sylvester(A, B, C, refine=0)
    without = calls["inv"]
    calls["inv"] = 0
    X = matfn.solve_sylvester(A, B, C, refine=3)
    assert calls["inv"] == without
    assert _rel(X.double().numpy(), sylvester_oracle(A, B, C)) <= 1e-6


def test_fallback_only_for_the_failing_batch_members(monkeypatch: pytest.MonkeyPatch) -> None:
    # Only the members that fail the residual test go to Bartels–Stewart; the others keep the
    # sign route's result.
    sizes: list[int] = []
    real = matfn.sylvester._bartels_stewart

    def spy(A: torch.Tensor, *rest: object) -> torch.Tensor:
        sizes.append(A.shape[0])
        return real(A, *rest)

    monkeypatch.setattr(matfn.sylvester, "_bartels_stewart", spy)
    case = SylvesterCase((3,), 4, 3, 10.0, 10.0, 1.0, 1.0, 1.0, "eig", torch.float64, 5)
    A, B, C = case.tensors()
    X = matfn.solve_sylvester(A, B, C)
    assert sizes == []
    np.testing.assert_allclose(X.numpy(), sylvester_oracle(A, B, C), rtol=0, atol=1e-12)
    # Spoil member 1's sign-route result (and every refinement correction of it): exactly that
    # member is handed to Bartels–Stewart.
    real_apply = matfn.sylvester._NewtonSylvester.apply

    def spoiled(self: object, rhs: torch.Tensor) -> torch.Tensor:
        out = real_apply(self, rhs)
        out[1] = 0
        return out

    monkeypatch.setattr(matfn.sylvester._NewtonSylvester, "apply", spoiled)
    X = matfn.solve_sylvester(A, B, C)
    assert sizes == [1]
    np.testing.assert_allclose(X.numpy(), sylvester_oracle(A, B, C), rtol=0, atol=1e-12)


def test_block_newton_schulz_solve_checks_its_residual() -> None:
    # The products-only block iteration (the msign derivative's Lyapunov solve) on the issue's
    # strongly non-normal A: it must raise (its caller then takes the SVD route), not return X
    # with relative residual 5.
    rng = np.random.default_rng(0)
    n = 30
    A = np.diag(np.linspace(1, 3, n)) + np.triu(rng.standard_normal((n, n)), 1)
    B, C = 2 * np.eye(n), rng.standard_normal((n, n))
    tA, tB, tC = (torch.from_numpy(t)[None] for t in (A, B, C))
    with pytest.raises(MatrixSignConvergenceError, match="relative residual"):
        _solve_flat(tA, tB, tC, torch.float64)
    # Symmetric positive definite coefficients: accurate, and the check passes.
    case = SylvesterCase((2,), 7, 7, 100.0, 100.0, 1.0, 1.0, 1.0, "spd", torch.float64, 2)
    A2, _, C2 = case.tensors()
    X = _solve_flat(A2, None, C2, torch.float64)
    np.testing.assert_allclose(X.numpy(), sylvester_oracle(A2, A2, C2), rtol=0, atol=1e-11)
