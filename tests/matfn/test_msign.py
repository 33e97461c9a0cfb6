"""msign against float64 oracles (SVD, scipy polar, the schedule-exact map) and its invariants.

Tolerances (docs/math.md §1.6, derived here, checked by ``explore`` runs noted below):

* **Schedule-exact** (:func:`schedule_tolerance`). In exact arithmetic Newton–Schulz returns
  ``S = U f(Σ/(sf‖M‖_F)) Vᵀ``. Rounding (unit roundoff ``u`` of the compute dtype) perturbs the
  iterate by ``O(u √L)`` per step in spectral norm; an error made before step ``t`` is amplified by
  the tail map ``g_t = p_T ∘ … ∘ p_{t+1}``: by ``|g_t′|`` along singular values and by
  ``(g_t(x) + g_t(y))/(x + y) ≤ max g_t(x)/x`` across pairs of singular directions (the polar
  factor's 1/σ sensitivity). Hence ``‖X − S‖₂ ≤ C u √L Σ_t max(1, |g_t′|, g_t(x)/x)`` over the
  hull of the step-``t`` values, plus the output cast ``u_out · max f · √k``. Over 7 schedules ×
  4 dtypes × 10 shapes/spectra (cond ≤ 1e6, rank-deficient) the worst measured ratio was 1.3, so
  ``C = 8``.
* **Against the SVD oracle** ``U_r V_rᵀ``: ``‖X − U_r V_rᵀ‖₂ ≤ max_{x∈[x_r, x_1]} |f(x) − 1| +
  max_{i>r} |f(x_i)| + schedule tolerance``, the scalar bound on the actual normalised spectrum
  (docs/math.md §1.6) plus the rounding slack above.
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import matfn
from matfn.coefficients import (
    CONVERGENT_QUINTIC,
    CUBIC,
    DEFAULT_STEPS,
    KELLER,
    POLAR_EXPRESS_MODDED,
    TUNED_5,
    TUNED_6,
    YOUJIACHENG_6,
    auto_schedule,
    max_scalar_error,
    polar_express_coefficients,
    scalar_map,
    schedule,
)
from matfn.msign import AUTO_MAX_POLISH, AUTO_TARGETS, gram_restarts, path
from matfn.oracles import as_float64, msign_oracle, polar_oracle, schedule_oracle
from tests.strategies import (
    DTYPE_NAMES,
    MatrixCase,
    case_id,
    haar_orthonormal,
    matrices,
)

NS_METHODS = ("polar_express", "tuned", "keller", "cubic")
#: C in the schedule tolerance (worst measured ratio 1.3, see the module docstring).
ROUNDING_FACTOR = 8.0


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def _dmap(coeffs, x):
    y, d = np.asarray(x, dtype=np.float64), np.ones_like(np.asarray(x, dtype=np.float64))
    for a, b, c in coeffs:
        d = d * (a + 3 * b * y * y + 5 * c * y**4)
        y = y * (a + y * y * (b + c * y * y))
    return d


def amplification(coeffs, x: np.ndarray) -> float:
    """``Σ_t max(1, |g_t′|, g_t(y)/y)`` over the hull of the step-t values of ``x`` (docstring)."""
    x = np.asarray(x, dtype=np.float64).ravel()
    total = 0.0
    for t in range(len(coeffs)):
        y = scalar_map(coeffs[:t], x) if t else x
        lo, hi = float(y.min()), float(y.max())
        grid = np.concatenate([np.linspace(lo, hi, 400), np.geomspace(max(lo, 1e-14), hi, 400)])
        tail = coeffs[t:]
        pos = grid[grid > 0]
        ratio = np.abs(scalar_map(tail, pos) / pos).max() if pos.size else 1.0
        total += max(1.0, float(np.abs(_dmap(tail, grid)).max()), float(ratio))
    return total


def normalised_singular_values(A: np.ndarray, factor: float) -> np.ndarray:
    """``σ(A)/(factor·‖A‖_F)`` per matrix, float64, shape ``(..., k)``."""
    s = np.linalg.svd(A, compute_uv=False)
    norm = np.sqrt(np.sum(A * A, axis=(-2, -1)))[..., None]
    return s / np.maximum(factor * norm, 1e-300)


def schedule_tolerance(
    coeffs, factor: float, A: np.ndarray, compute_dtype: torch.dtype, out_dtype: torch.dtype
) -> np.ndarray:
    """Per-matrix bound on ``‖X − U f(Σ/(sf‖A‖_F)) Vᵀ‖₂`` (module docstring), shape ``batch``."""
    xs = normalised_singular_values(A, factor)
    flat = xs.reshape(-1, xs.shape[-1])
    L, k = max(A.shape[-2:]), min(A.shape[-2:])
    u = unit_roundoff(compute_dtype)
    u_out = unit_roundoff(out_dtype) if unit_roundoff(out_dtype) > u else 0.0
    tol = []
    for x in flat:
        f_max = float(np.abs(scalar_map(coeffs, x)).max())
        tol.append(
            ROUNDING_FACTOR * u * np.sqrt(L) * amplification(coeffs, x) + u_out * f_max * np.sqrt(k)
        )
    return np.array(tol).reshape(xs.shape[:-1])


def spectral_error(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    return np.linalg.norm(X - Y, ord=2, axis=(-2, -1)) if X.size else np.zeros(X.shape[:-2])


def compute_dtype_for(M: torch.Tensor, compute_dtype: torch.dtype | None) -> torch.dtype:
    if compute_dtype is not None:
        return compute_dtype
    return torch.float64 if M.dtype == torch.float64 else torch.float32


def range_oracle(A: np.ndarray, rank: int) -> np.ndarray:
    """``U_r V_rᵀ`` with the *known* rank (the cut-off oracle misjudges rounded half inputs)."""
    U, _, Vh = np.linalg.svd(A, full_matrices=False)
    return U[..., :rank] @ Vh[..., :rank, :]


@st.composite
def ns_configs(draw, dtypes=(torch.float64, torch.float32, torch.float16, torch.bfloat16)):
    """(case, method, steps, compute_dtype, algorithm) for the schedule-exact tests."""
    method = draw(st.sampled_from(NS_METHODS))
    lo = 5 if method == "tuned" else 1
    steps = draw(st.one_of(st.none(), st.integers(lo, 10)))
    dtype = draw(st.sampled_from(dtypes))
    half = dtype in (torch.float16, torch.bfloat16)
    # fp32: cond ≤ 1e4 keeps the 1/σ_min sensitivity below the tolerance's informative range.
    max_cond = {torch.float64: 1e6, torch.float32: 1e4}.get(dtype, 1e2)
    case = draw(
        matrices(
            dtypes=[dtype],
            max_cond=max_cond,
            rank_deficient=not half,
            min_ratio=5e-3 if half else 0.0,
        )
    )
    compute = draw(st.sampled_from([None, dtype])) if half else None
    return case, method, steps, compute


@given(config=ns_configs())
def test_schedule_exact_oracle(config):
    # ‖msign(M) − U f(Σ/(sf‖M‖_F)) Vᵀ‖₂ ≤ schedule_tolerance, per method × dtype × steps.
    case, method, steps, compute = config
    M = case.tensor()
    X = matfn.msign(M, method=method, steps=steps, compute_dtype=compute, algorithm="standard")
    assert X.dtype == M.dtype and X.shape == M.shape
    coeffs, factor = schedule(method, DEFAULT_STEPS[method] if steps is None else steps)
    A = as_float64(M)
    err = spectral_error(as_float64(X), schedule_oracle(A, coeffs, factor))
    tol = schedule_tolerance(coeffs, factor, A, compute_dtype_for(M, compute), M.dtype)
    assert np.all(err <= tol), (err.max(), tol.min())


@given(config=ns_configs(dtypes=(torch.float64, torch.float32)))
def test_against_svd_oracle_scalar_bound(config):
    # ‖X − U_r V_rᵀ‖₂ ≤ max_{[x_r, x_1]} |f − 1| + max_{i>r} |f(x_i)| + rounding slack (§1.6).
    case, method, steps, compute = config
    M = case.tensor()
    X = matfn.msign(M, method=method, steps=steps, algorithm="standard")
    coeffs, factor = schedule(method, DEFAULT_STEPS[method] if steps is None else steps)
    A = as_float64(M)
    r = case.effective_rank
    xs = normalised_singular_values(A, factor).reshape(-1, case.k)
    bound = np.array(
        [
            max_scalar_error(coeffs, x[r - 1], x[0])
            + (float(np.abs(scalar_map(coeffs, x[r:])).max()) if r < case.k else 0.0)
            for x in xs
        ]
    ).reshape(case.batch)
    tol = bound + schedule_tolerance(coeffs, factor, A, compute_dtype_for(M, None), M.dtype)
    err = spectral_error(as_float64(X), range_oracle(A, r))
    assert np.all(err <= tol), (err.max(), tol.min())


@given(case=matrices(dtypes=[torch.float64], max_cond=1e4, max_side=32))
def test_gram_equals_standard_float64(case):
    # Gram NS is the same polynomial in exact arithmetic: in fp64 they agree to rounding
    # (2× the schedule tolerance, ~1e-13 for well-conditioned inputs).
    M = case.tensor()
    for steps in (5, 8):
        coeffs, factor = schedule("polar_express", steps)
        G = matfn.msign(M, steps=steps, algorithm="gram")
        S = matfn.msign(M, steps=steps, algorithm="standard")
        # + 1e-12: Gram's own s×s products (8 per step) round differently on tiny matrices.
        tol = 2 * schedule_tolerance(coeffs, factor, as_float64(M), torch.float64, torch.float64)
        assert np.all(spectral_error(as_float64(G), as_float64(S)) <= tol + 1e-12)
        if case.cond <= 10:
            torch.testing.assert_close(G, S, atol=1e-12, rtol=0)


@given(case=matrices(dtypes=[torch.float32], max_cond=1e3, max_side=32))
def test_gram_float32_schedule_exact(case):
    # Gram accumulates the polynomial in an s×s Q (8 s×s products per step instead of 2), so
    # it rounds about twice as often as the standard iteration: 4× its tolerance (the thorough
    # profile found 1.23× the standard tolerance on 3×3).
    M = case.tensor()
    coeffs, factor = schedule("polar_express", 5)
    X = matfn.msign(M, steps=5, algorithm="gram")
    A = as_float64(M)
    tol = 4 * schedule_tolerance(coeffs, factor, A, torch.float32, torch.float32)
    assert np.all(spectral_error(as_float64(X), schedule_oracle(A, coeffs, factor)) <= tol)


BF16_CASE = MatrixCase((32, 96), dtype=torch.bfloat16, cond=10.0, seed=1)


@pytest.mark.parametrize("algorithm", ["standard", "auto"])
def test_bfloat16_compute_standard(algorithm):
    # bf16 iteration (CPU): PE-8 converged; the spec's bf16 band is ±0.01 on singular values and
    # ~3e-2 on directions; per-case schedule tolerance (bf16 u = 2⁻⁹, amplification ≈ T).
    M = BF16_CASE.tensor()
    X = matfn.msign(M, steps=8, algorithm=algorithm, compute_dtype=torch.bfloat16)
    A = as_float64(M)
    coeffs, factor = schedule("polar_express", 8)
    tol = schedule_tolerance(coeffs, factor, A, torch.bfloat16, torch.bfloat16)
    assert spectral_error(as_float64(X), schedule_oracle(A, coeffs, factor)) <= tol
    sv = np.linalg.svd(as_float64(X), compute_uv=False)
    assert np.all(np.abs(sv - 1) <= 0.02)


def test_bfloat16_compute_gram():
    # Gram NS in bf16 (CPU): stable with the automatic restarts (gram_restarts: PE-8 → (1, 4));
    # without them it diverged (σ_max ≈ 11). Same band as the standard iteration.
    M = BF16_CASE.tensor()
    X = matfn.msign(M, steps=8, algorithm="gram", compute_dtype=torch.bfloat16)
    sv = np.linalg.svd(as_float64(X), compute_uv=False)
    assert np.all(np.abs(sv - 1) <= 0.02)
    A = as_float64(M)
    coeffs, factor = schedule("polar_express", 8)
    tol = schedule_tolerance(coeffs, factor, A, torch.bfloat16, torch.bfloat16)
    assert spectral_error(as_float64(X), schedule_oracle(A, coeffs, factor)) <= tol


@given(case=matrices(dtypes=[torch.float64], max_cond=1e5, max_side=32))
def test_full_rank_against_scipy_polar_and_svd(case):
    # steps="auto" in fp64 resolves σ ≥ 1e-7‖M‖_F to 1e-12 (scalar target), then polishes; the
    # rounding part follows the schedule tolerance with the auto schedule + polishing steps.
    M = case.tensor()
    X = matfn.msign(M, steps="auto")
    A = as_float64(M)
    lower, target = AUTO_TARGETS[torch.float64]
    coeffs = auto_schedule(lower, target) + [CONVERGENT_QUINTIC] * 3
    tol = target + schedule_tolerance(coeffs, 1.01, A, torch.float64, torch.float64)
    assert np.all(spectral_error(as_float64(X), polar_oracle(A)) <= tol)
    assert np.all(spectral_error(as_float64(X), msign_oracle(A)) <= tol)
    # method="svd": exact up to the SVD's own sensitivity (u·κ).
    Xs = matfn.msign(M, method="svd")
    svd_tol = 50 * unit_roundoff(torch.float64) * case.cond * max(case.n, case.m)
    assert np.all(spectral_error(as_float64(Xs), polar_oracle(A)) <= svd_tol)


@given(case=matrices(dtypes=[torch.float64], rank_deficient=True, max_cond=1e3, max_side=32))
def test_svd_method_rank_deficient(case):
    # Rank cut-off max(n, m)·ε·σ₁: zero singular values stay 0, the others become 1.
    assume(max(case.n, case.m) >= 4)  # the cut-off must clear fp64 construction noise (~ε σ₁)
    M = case.tensor()
    X = matfn.msign(M, method="svd")
    tol = 50 * unit_roundoff(torch.float64) * case.cond * max(case.n, case.m)
    err = spectral_error(as_float64(X), range_oracle(as_float64(M), case.effective_rank))
    assert np.all(err <= tol)


@given(
    case=matrices(dtypes=[torch.float64, torch.float32], rank_deficient=True, max_cond=1e2),
    method=st.sampled_from(["polar_express", "svd"]),
)
def test_singular_values_band_and_frobenius(case, method):
    # Converged schedule (PE 8 steps resolves x ≥ 1e-3/1.01 to ~1e-15): singular values are 1 on
    # the range and 0 off it, and ‖X‖_F² = r. fp64 slack 1e-10; fp32 slack 1e-4 covers rounding
    # amplified by f′(0) ≈ 1e4 in null directions (cond ≤ 100 keeps x_r ≥ 1e-3 for k ≤ 48…).
    M = case.tensor()
    r = case.effective_rank
    xs = normalised_singular_values(as_float64(M), 1.01)
    assume(np.all(xs[..., r - 1] >= 1e-3))
    X = matfn.msign(M, method=method, steps=8 if method != "svd" else None)
    sv = np.linalg.svd(as_float64(X), compute_uv=False)
    slack = 1e-10 if case.dtype == torch.float64 else 1e-4
    if case.dtype == torch.float32 and method != "svd":
        slack = 5e-3 if r < case.k else slack  # fp32 noise (~1e-7) × f′(0) of PE-8
    np.testing.assert_allclose(sv[..., :r], 1.0, atol=slack)
    if r < case.k:
        assert np.all(sv[..., r:] <= slack)
    fro2 = np.sum(as_float64(X) ** 2, axis=(-2, -1))
    np.testing.assert_allclose(fro2, r, atol=slack * 2 * case.k)


@given(case=matrices(dtypes=[torch.float64, torch.float32], rank_deficient=True, max_cond=1e4))
def test_polar_factor_psd(case):
    # H = msign(M)ᵀ M = V f(Σ)Σ Vᵀ is symmetric PSD for every schedule (f ≥ 0 on [0, 1]).
    M = case.tensor()
    for method in ("polar_express", "keller"):
        X = as_float64(matfn.msign(M, method=method))
        A = as_float64(M)
        H = X.swapaxes(-1, -2) @ A
        scale = np.linalg.norm(A, ord=2, axis=(-2, -1))[..., None] if A.size else 1.0
        slack = (1e-12 if case.dtype == torch.float64 else 1e-5) * min(case.n, case.m) * 10
        asym = np.linalg.norm(H - H.swapaxes(-1, -2), ord=2, axis=(-2, -1))
        assert np.all(asym <= slack * scale[..., 0])
        lam = np.linalg.eigvalsh((H + H.swapaxes(-1, -2)) / 2)
        assert np.all(lam.min(-1) >= -slack * scale[..., 0])


@given(
    case=matrices(dtypes=[torch.float64, torch.float32, torch.bfloat16], max_cond=1e3),
    k=st.integers(-20, 20),
    method=st.sampled_from(NS_METHODS),
)
def test_scale_and_sign_invariance_exact(case, k, method):
    # Scaling by 2^k and negation are exact in floating point and the normalisation uses
    # clamp(min=eps) (no additive eps): msign(2^k M) and −msign(−M) are bit-identical to msign(M).
    M = case.tensor()
    # No overflow/underflow of the entries' squares (fp32 norm), and above the eps = 1e-7 floor
    # of the normaliser (below it msign(M) = f(M/eps) is deliberately not scale-invariant).
    for Y in (M, M * 2.0**k):
        nz = Y[Y != 0].abs()
        assume(nz.numel() == 0 or (nz.max() < 1e15 and nz.min() > 1e-15))
        assume((torch.linalg.matrix_norm(Y.double()) > 2e-7).all())
    X = matfn.msign(M, method=method)
    assert torch.equal(matfn.msign(M * 2.0**k, method=method), X)
    assert torch.equal(matfn.msign(-M, method=method), -X)


@given(
    case=matrices(dtypes=[torch.float64, torch.float32], max_cond=1e3),
    c=st.floats(1e-3, 1e3),
)
def test_scale_invariance_general(case, c):
    # A general c > 0 rounds the normalised input (≤ 2u relative): within the schedule tolerance
    # (above the normaliser's eps = 1e-7 floor, as in the exact test).
    M = case.tensor()
    for Y in (M, c * M):
        assume((torch.linalg.matrix_norm(Y.double()) > 2e-7).all())
    coeffs, factor = schedule("polar_express", 5)
    tol = 2 * schedule_tolerance(coeffs, factor, as_float64(M), M.dtype, M.dtype)
    err = spectral_error(as_float64(matfn.msign(c * M)), as_float64(matfn.msign(M)))
    assert np.all(err <= tol)


@given(
    case=matrices(dtypes=[torch.float64, torch.float32], max_cond=1e3, rank_deficient=True),
    method=st.sampled_from([*NS_METHODS, "svd"]),
)
def test_transpose_equivariance(case, method):
    M = case.tensor()
    X = matfn.msign(M, method=method)
    Xt = matfn.msign(M.mT, method=method)
    if case.n != case.m and method != "svd":
        # Both orientations iterate on the same wide matrix.
        torch.testing.assert_close(Xt, X.mT, atol=0, rtol=0)
    coeffs, factor = (
        schedule("polar_express", 5) if method == "svd" else schedule(method, DEFAULT_STEPS[method])
    )
    tol = 2 * schedule_tolerance(coeffs, factor, as_float64(M), M.dtype, M.dtype)
    if method == "svd":
        tol = np.full_like(tol, 1e-10 if M.dtype == torch.float64 else 1e-3)
        assume(case.effective_rank == case.k)  # cut-off decisions may differ on null directions
    assert np.all(spectral_error(as_float64(Xt), as_float64(X.mT)) <= tol)


@given(case=matrices(dtypes=[torch.float64], max_cond=1e3, rank_deficient=True, max_side=24))
def test_orthogonal_equivariance(case):
    # msign(P M Q) = P msign(M) Q for orthogonal P, Q (the schedule oracle is equivariant too).
    M = case.tensor()
    rng = np.random.default_rng(case.seed)
    P = torch.from_numpy(haar_orthonormal(rng, case.n, case.n))
    Q = torch.from_numpy(haar_orthonormal(rng, case.m, case.m))
    coeffs, factor = schedule("polar_express", 5)
    tol = 2 * schedule_tolerance(coeffs, factor, as_float64(M), M.dtype, M.dtype)
    lhs = matfn.msign(P @ M @ Q)
    rhs = P @ matfn.msign(M) @ Q
    assert np.all(spectral_error(as_float64(lhs), as_float64(rhs)) <= tol)


@given(case=matrices(dtypes=[torch.float64, torch.float32, torch.bfloat16], min_side=1))
def test_batch_equals_loop(case):
    assume(case.batch)
    M = case.tensor()
    X = matfn.msign(M)
    flat, Xf = M.reshape(-1, case.n, case.m), X.reshape(-1, case.n, case.m)
    # One matrix runs 2-D GEMMs, a batch runs bmm: the same math with different summation order.
    # The iteration amplifies a rounding difference near σ = 0 by up to ∏ a_t ≈ 1010 for Polar
    # Express 5, so float32 (u = 6e-8) may differ by ≈ 6e-5; a batching bug differs by O(1).
    tol = {torch.float64: 1e-12, torch.float32: 1e-4, torch.bfloat16: 8e-3}[case.dtype]
    for i in range(flat.shape[0]):
        torch.testing.assert_close(Xf[i], matfn.msign(flat[i]), atol=tol, rtol=0)


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 1), (3, 1, 40)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=DTYPE_NAMES.get)
def test_vector_gives_normalised_vector(shape, dtype):
    M = MatrixCase(shape, dtype=dtype, seed=3, scale=1e3, batch_spread=1.0).tensor()
    v = M / torch.linalg.matrix_norm(M.double(), keepdim=True).to(dtype)
    # steps="auto" runs ≈ 13 float32 steps, each rounding the entries once more: ≈ 13·u ≈ 8e-7
    # relative per entry (measured up to 2.2e-6 relative on an entry of 0.5), hence 4e-6.
    tol = 1e-12 if dtype == torch.float64 else 4e-6
    torch.testing.assert_close(matfn.msign(M, steps="auto"), v, atol=tol, rtol=0)
    torch.testing.assert_close(matfn.msign(M, method="svd"), v, atol=tol, rtol=0)
    # A fixed schedule returns f(1/sf)·v (the single normalised singular value is 1/sf).
    for method in NS_METHODS:
        coeffs, factor = schedule(method, DEFAULT_STEPS[method])
        expected = float(scalar_map(coeffs, 1 / factor)) * v
        step_tol = schedule_tolerance(coeffs, factor, as_float64(M), dtype, dtype).max()
        torch.testing.assert_close(
            matfn.msign(M, method=method), expected, atol=float(step_tol), rtol=0
        )


@given(case=matrices(dtypes=[torch.float64, torch.float32], max_cond=1e3, max_side=32))
def test_auto_converges_without_warning(case):
    # Full rank with σ_min/‖M‖_F ≥ 1e-3·… ≫ ℓ_auto (1e-7 fp64, 1e-6 fp32): converged, silent.
    M = case.tensor()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        X = matfn.msign(M, steps="auto")
    A = as_float64(M)
    lower, target = AUTO_TARGETS[M.dtype]
    coeffs = auto_schedule(lower, target) + [CONVERGENT_QUINTIC] * AUTO_MAX_POLISH
    tol = 10 * target + schedule_tolerance(coeffs, 1.01, A, M.dtype, M.dtype)
    assert np.all(spectral_error(as_float64(X), msign_oracle(A)) <= tol)


@pytest.mark.parametrize(
    "case",
    [MatrixCase((20, 30), dtype=torch.float32, rank=5, cond=10.0, seed=s) for s in range(3)]
    + [
        MatrixCase((64, 32), dtype=torch.float32, rank=1, seed=0),
        MatrixCase((3, 16, 40), dtype=torch.float32, rank=8, cond=10.0, seed=1),
        MatrixCase((8, 8), dtype=torch.float32, rank=7, cond=10.0, seed=2),
    ],
    ids=case_id,
)
def test_auto_keeps_null_spaces_of_numerically_rank_deficient(case):
    # fp32 rounding leaves "zero" singular values at ~1e-7‖M‖_F < ℓ = 1e-6: the polishing quintic
    # would lift them towards 1; the purifying steps send them to 0 instead (no warning), so the
    # result is U_r V_rᵀ of the exact rank r.
    M = case.tensor()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        X = matfn.msign(M, steps="auto")
    U, s, Vh = np.linalg.svd(as_float64(M), full_matrices=False)
    r = case.effective_rank
    ref = U[..., :r] @ Vh[..., :r, :]
    assert np.abs(as_float64(X) - ref).max() <= 1e-3


LARGE_CASES = [
    MatrixCase((256, 256), dtype=torch.float32, cond=1e2, seed=0),
    MatrixCase((128, 512), dtype=torch.float32, cond=1e3, seed=1),
    MatrixCase((256, 64), dtype=torch.float64, cond=1e4, rank=50, seed=2),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", LARGE_CASES, ids=case_id)
def test_large_schedule_exact(case):
    M = case.tensor()
    A = as_float64(M)
    for method in ("polar_express", "tuned"):
        coeffs, factor = schedule(method, DEFAULT_STEPS[method])
        X = matfn.msign(M, method=method, algorithm="standard")
        tol = schedule_tolerance(coeffs, factor, A, M.dtype, M.dtype)
        assert spectral_error(as_float64(X), schedule_oracle(A, coeffs, factor)) <= tol


def test_scipy_polar_disagrees_on_rank_deficient():
    # Why the oracle is U_r V_rᵀ, not scipy.linalg.polar (docs/math.md §1.6: 8×12 rank 4 → 2.0
    # apart).
    A = MatrixCase((8, 12), rank=4, seed=0).array()
    diff = np.linalg.norm(scipy.linalg.polar(A)[0] - msign_oracle(A))
    assert diff == pytest.approx(2.0, abs=1e-8)
    torch.testing.assert_close(
        matfn.msign(torch.from_numpy(A), method="svd"), torch.from_numpy(msign_oracle(A))
    )


# --- Per-step tables: method=[(a, b, c), …] (docs/math.md §1.3(g)) ----------------------------

#: Named methods whose normalisation is ‖M‖_F alone, with a step count and the equal table.
TABLE_TWINS = [
    ("keller", 5, [KELLER] * 5),
    ("tuned", 5, list(TUNED_5)),
    ("tuned", 6, list(TUNED_6)),
    ("tuned", 7, [*TUNED_6, CONVERGENT_QUINTIC]),
    ("cubic", 12, [CUBIC] * 12),
    ("youjiacheng", None, list(YOUJIACHENG_6)),
]
#: Rows that random tables perturb: every published quintic and the cubic.
SEED_ROWS = [KELLER, CUBIC, CONVERGENT_QUINTIC, *TUNED_5, *YOUJIACHENG_6, *POLAR_EXPRESS_MODDED]


def numpy_table_iteration(A: np.ndarray, table, factor: float = 1.0) -> np.ndarray:
    """The table's steps in float64 numpy: wide orientation, ``X₀ = A/(sf‖A‖_F)``, per row
    ``X ← a X + (b S + c S²) X`` with ``S = X Xᵀ`` (an independent reimplementation)."""
    tall = A.shape[-2] > A.shape[-1]
    X = A.swapaxes(-1, -2) if tall else A
    norm = np.sqrt(np.sum(X * X, axis=(-2, -1), keepdims=True))
    X = X / np.maximum(factor * norm, 1e-7)
    for a, b, c in table:
        S = X @ X.swapaxes(-1, -2)
        X = a * X + (b * S + c * (S @ S)) @ X
    return X.swapaxes(-1, -2) if tall else X


@st.composite
def random_tables(draw, max_steps: int = 8):
    """Tables of 1…max_steps rows, each a published row with its entries scaled by factors in
    [0.9, 1.1], then the whole row by ``γ ≤ 1`` so that the composed map stays in [0, 1.5] on
    [0, 1] (rows of different tables in random order can otherwise diverge, or cross 0, where
    the schedule tolerance's grids assume positive values; such a row becomes the convergent
    quintic)."""
    steps = draw(st.integers(1, max_steps))
    x = np.linspace(0, 1, 2001)
    rows = []
    for _ in range(steps):
        a, b, c = draw(st.sampled_from(SEED_ROWS))
        row = [v * draw(st.floats(0.9, 1.1)) for v in (a, b, c)]
        y = scalar_map([tuple(row)], x)
        if y.min() < 0:
            row, y = list(CONVERGENT_QUINTIC), scalar_map([CONVERGENT_QUINTIC], x)
        gamma = min(1.0, 1.5 / float(np.abs(y).max()))
        rows.append(tuple(gamma * v for v in row))
        x = gamma * y
    return rows


@pytest.mark.parametrize("algorithm", ["standard", "gram", "auto"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("name", "steps", "table"), TABLE_TWINS, ids=lambda v: str(v)[:12])
def test_table_equal_to_named_method_is_bit_identical(name, steps, table, dtype, algorithm):
    for shape in ((2, 24, 40), (40, 9)):  # wide batch; tall (transposed) single matrix
        M = MatrixCase(shape, dtype=dtype, cond=1e2, seed=len(table)).tensor()
        ref = matfn.msign(M, method=name, steps=steps, algorithm=algorithm)
        for form in (table, tuple(table), np.array(table)):
            out = matfn.msign(M, method=form, algorithm=algorithm)
            assert out.dtype == M.dtype and torch.equal(out, ref)
        assert torch.equal(
            matfn.msign(M, method=table, steps=len(table)), matfn.msign(M, method=name, steps=steps)
        )


@given(
    case=matrices(dtypes=[torch.float64], max_cond=1e4, max_side=24, rank_deficient=True),
    table=random_tables(),
)
def test_random_table_matches_numpy_and_svd_oracle(case, table):
    # Standard iteration in float64 vs (i) a numpy reimplementation of the same steps and (ii) the
    # SVD oracle U f(Σ/‖M‖_F) Vᵀ; both within the schedule tolerance (module docstring).
    M = case.tensor()
    A = as_float64(M)
    X = matfn.msign(M, method=table, algorithm="standard")
    # + 20 k ε: the float64 SVD oracle's own rounding, which a 1-step table's tolerance does not
    # dwarf (measured 9.8e-15 against 9.2e-15 on a 9×9 rank-8 input).
    tol = schedule_tolerance(table, 1.0, A, torch.float64, torch.float64)
    tol = tol + 20 * case.k * np.finfo(np.float64).eps
    assert np.all(spectral_error(as_float64(X), numpy_table_iteration(A, table)) <= 2 * tol)
    assert np.all(spectral_error(as_float64(X), schedule_oracle(A, table, 1.0)) <= tol)
    # Gram NS: the same polynomial, restarts from gram_restarts(table) (4× as in the PE tests).
    G = matfn.msign(M, method=table, algorithm="gram")
    assert np.all(spectral_error(as_float64(G), schedule_oracle(A, table, 1.0)) <= 4 * tol + 1e-12)


@given(case=matrices(dtypes=[torch.float32], max_cond=1e2, max_side=24), table=random_tables(6))
def test_random_table_float32_schedule_exact(case, table):
    M = case.tensor()
    A = as_float64(M)
    for algorithm, factor in (("standard", 1), ("gram", 4)):
        X = matfn.msign(M, method=table, algorithm=algorithm)
        tol = factor * schedule_tolerance(table, 1.0, A, torch.float32, torch.float32)
        assert np.all(spectral_error(as_float64(X), schedule_oracle(A, table, 1.0)) <= tol)


@pytest.mark.parametrize("table", [list(YOUJIACHENG_6), [KELLER] * 5, [CUBIC] * 7], ids=len)
def test_table_gram_restarts_come_from_its_rows(monkeypatch, table):
    """Gram NS restarts where gram_restarts(table) says, and algorithm="auto" counts them."""
    calls = []
    gram = path.gram_newton_schulz

    def spy(X, coeffs, restarts=None, out_dtype=None):
        calls.append((list(coeffs), restarts))
        return gram(X, coeffs, restarts, out_dtype)

    monkeypatch.setattr(path, "gram_newton_schulz", spy)
    M = MatrixCase((4, 64), cond=10.0, seed=8).tensor()  # L = 16 s: "auto" takes Gram
    for algorithm in ("gram", "auto"):
        matfn.msign(M, method=table, algorithm=algorithm)
        assert calls.pop() == (table, gram_restarts(table))
    assert gram_restarts(YOUJIACHENG_6) == (2, 4)


def test_named_table_runs_with_its_source_normalisation():
    # "polar_express_modded" divides by 1.02‖M‖_F as modded-nanogpt does; the same rows passed as
    # a table divide by ‖M‖_F (as torch.optim.Muon does).
    M = MatrixCase((3, 20, 30), cond=1e2, seed=4).tensor()
    A = as_float64(M)
    named = as_float64(matfn.msign(M, method="polar_express_modded"))
    table = as_float64(matfn.msign(M, method=POLAR_EXPRESS_MODDED))
    np.testing.assert_allclose(
        named, numpy_table_iteration(A, POLAR_EXPRESS_MODDED, 1.02), atol=1e-12
    )
    np.testing.assert_allclose(table, numpy_table_iteration(A, POLAR_EXPRESS_MODDED), atol=1e-12)
    assert np.abs(named - table).max() > 1e-3


def test_generated_table_converges_to_the_svd_oracle():
    # A converging table (Polar Express, 8 steps, no safety factor) reaches U_r V_rᵀ in float64.
    table = polar_express_coefficients(8, 1e-3, safety=1.0)
    case = MatrixCase((2, 16, 40), cond=1e2, seed=5)
    M = case.tensor()
    for algorithm in ("standard", "gram"):
        X = matfn.msign(M, method=table, algorithm=algorithm)
        assert np.all(spectral_error(as_float64(X), msign_oracle(as_float64(M))) <= 1e-12)


@pytest.mark.parametrize("algorithm", ["standard", "gram"])
def test_table_on_the_triton_kernels(monkeypatch, algorithm):
    """A table through the Triton products (interpreter on CPU): the kernels take any row."""
    pytest.importorskip("triton")
    table = [(3.9, -7.5, 4.1), (1.5, -0.5, 0.0), *YOUJIACHENG_6[3:]]
    M = MatrixCase((2, 20, 45), dtype=torch.float32, cond=10.0, seed=6).tensor()
    if os.environ.get("MATFN_TEST_ON_GPU"):  # the kernels read CPU tensors only interpreted
        if not torch.cuda.is_available():
            pytest.skip("MATFN_TEST_ON_GPU=1 without CUDA")
        M = M.cuda()
    f32 = {
        "method": table,
        "algorithm": algorithm,
        "compute_dtype": torch.float32,
        "cuda_graph": False,
    }  # eager, so that the patched kernel choice takes effect
    ref = matfn.msign(M, **f32)  # torch products (CPU, or CUDA below the kernels' threshold)
    monkeypatch.setattr(path, "kernels_apply", lambda X: True)
    out = matfn.msign(M, **f32)
    assert out.dtype == torch.float32 and not torch.equal(out, ref)  # another summation order
    rtol = 2e-5 if algorithm == "standard" else 2e-4  # as tests/matfn/msign/test_triton.py
    assert float((out - ref).norm() / ref.norm()) <= rtol


def test_table_derivative_does_not_depend_on_the_coefficients():
    # Backward is msign_vjp of the exact msign(M): the same gradient for any schedule.
    M = MatrixCase((2, 12, 20), cond=10.0, seed=7).tensor()
    W = torch.randn(M.shape, dtype=M.dtype, generator=torch.Generator().manual_seed(0))
    grads = []
    for method in ("keller", [(3.0, -3.2, 1.2)] * 4, list(YOUJIACHENG_6)):
        A = M.clone().requires_grad_()
        O = matfn.msign(A, method=method)
        assert torch.equal(O.detach(), matfn.msign(M, method=method))
        (O * W).sum().backward()
        grads.append(A.grad)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])
    torch.testing.assert_close(grads[0], matfn.msign_vjp(M, W), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"method": []}, ValueError, "`method` must have 1 to 99 rows"),
        ({"method": [KELLER] * 100}, ValueError, "`method` must have 1 to 99 rows"),
        ({"method": [(1.0, 2.0)]}, ValueError, "`method` row 0 must have 3 entries"),
        ({"method": [KELLER, (1.0, math.nan, 0.0)]}, ValueError, "`method` row 1 must be finite"),
        ({"method": [(1.0, 2.0, "x")]}, TypeError, "`method` row 0 must hold real numbers"),
        ({"method": list(KELLER)}, TypeError, "`method` row 0 must be an"),
        ({"method": torch.tensor([KELLER])}, TypeError, "`method` must be a method name"),
        ({"method": "keler"}, ValueError, "`method` must be one of"),
        ({"method": [KELLER] * 3, "steps": 5}, ValueError, "`steps` must be None or 3"),
        ({"method": [KELLER] * 3, "steps": "auto"}, ValueError, "`steps` must be None or 3"),
        ({"method": "youjiacheng", "steps": 5}, ValueError, "`steps` must be None or 6"),
        ({"method": "polar_express_modded", "steps": "auto"}, ValueError, "None or 5"),
        ({"method": [KELLER], "algorithm": "fast"}, ValueError, "`algorithm`"),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else (v if isinstance(v, str) else None),
)
def test_bad_tables_raise(kwargs, error, match):
    M = torch.randn(4, 6, dtype=torch.float64)
    with pytest.raises(error, match=match):
        matfn.msign(M, **kwargs)
    with pytest.raises(error, match=match):  # the check comes before autograd's Function
        matfn.msign(M.requires_grad_(), **kwargs)
