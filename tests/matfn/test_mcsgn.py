"""mcsgn against the eig/scipy oracles and the construction's exact sign; block identities.

Tolerance (:func:`sign_tolerance`): for ``M = P Λ P⁻¹`` the iteration computes ``P f(Λ) P⁻¹``;
rounding of the ``O(n)``-term products (unit roundoff ``u``) is amplified by the non-normality,
``κ(P) ≲ ‖S‖₂²`` (``S = mcsgn(M)``, ``‖S‖₂ = 1`` for symmetric M). Converged with
``steps="auto"`` the scalar error is ≤ the dtype target, so ``‖S_ns − S‖₂ ≤ C u n ‖S‖₂²``;
measured ratios ≤ 1.7 (fp64 and fp32, n ≤ 32, κ(Q) ≤ 10, block couplings ≤ 10), so ``C = 16``.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import matfn
from matfn import MatrixSignConvergenceError
from matfn.coefficients import (
    CONVERGENT_QUINTIC,
    CUBIC,
    DEFAULT_STEPS,
    KELLER,
    TUNED_6,
    YOUJIACHENG_6,
    polar_express_coefficients,
    scalar_map,
    schedule,
)
from matfn.mcsgn import AXIS_DISTANCE
from matfn.oracles import as_float64, mcsgn_oracle, msign_oracle
from tests.strategies import (
    DTYPE_NAMES,
    SignCase,
    SpectralCase,
    case_id,
    haar_orthonormal,
    sign_matrices,
    spectral_matrices,
)

ROUNDING_FACTOR = 16.0


def sign_tolerance(S_exact: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Per-matrix ``C u (n + 8) ‖S‖₂²``, ``u`` of the compute dtype (fp32 for non-fp64 input).

    The ``+ 8`` covers the ~15 auto steps' rounding on tiny matrices.
    """
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    u = torch.finfo(compute).eps / 2
    n = S_exact.shape[-1]
    norm = np.linalg.norm(S_exact, ord=2, axis=(-2, -1))
    out_u = torch.finfo(dtype).eps / 2 if torch.finfo(dtype).eps > 2 * u else 0.0
    return ROUNDING_FACTOR * u * (n + 8) * norm**2 + out_u * norm * np.sqrt(n)


def spectral_error(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    return np.linalg.norm(X - Y, ord=2, axis=(-2, -1))


def _sym(rng: np.random.Generator, n: int, lo: float, hi: float) -> np.ndarray:
    W = haar_orthonormal(rng, n, n)
    return (W * np.geomspace(hi, lo, n)) @ W.T


@given(case=sign_matrices())
def test_against_exact_sign_and_eig_oracle(case):
    M = case.tensor()
    S = as_float64(matfn.mcsgn(M))
    exact = case.exact_sign()
    tol = sign_tolerance(exact, case.dtype)
    assert np.all(spectral_error(S, exact) <= tol)
    # The eig oracle agrees with the construction (independent check of the oracle itself);
    # eig's eigenvectors are ill-conditioned for repeated eigenvalues (gap = 1), hence 100×.
    if case.dtype == torch.float64:
        assert np.all(spectral_error(mcsgn_oracle(M), exact) <= 100 * tol)


@given(
    case=sign_matrices(kinds=["eig", "sym"], dtypes=[torch.float64], max_side=16, max_batch_dims=0)
)
def test_against_scipy_signm(case):
    # signm is unreliable on block-triangular / derogatory input (see
    # test_scipy_signm_fails_on_derogatory_block; with gap 0.01 and coupling 10 it is off by 360
    # while the construction's exact sign and our result agree): compare on distinct eigenvalues
    # of diagonalisable, mildly non-normal matrices only.
    assume(case.gap < 1 or case.n == 1)
    with np.errstate(all="ignore"):
        ref = scipy.linalg.signm(case.array())
    S = as_float64(matfn.mcsgn(case.tensor()))
    # signm works through a Schur form and its own Newton iteration: allow both tolerances.
    tol = 2 * sign_tolerance(case.exact_sign(), torch.float64) + 1e-12
    assert spectral_error(S, ref) <= tol


def test_scipy_signm_fails_on_derogatory_block():
    # M = s[[I, C], [0, −I]] has M² = s²I, so mcsgn(M) = M/s exactly; scipy.linalg.signm returns
    # I here (‖error‖ = 3.16; before scipy 1.18 it also reported an error estimate of 1e-13), so
    # the tests use it as an oracle only on distinct eigenvalues (docs/math.md §2.5).
    case = SignCase(n=6, kind="block", gap=1.0, scale=0.31622776601683794, seed=0)
    A = case.array()
    np.testing.assert_allclose(case.exact_sign(), A / case.scale, atol=1e-14)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy < 1.18 may warn; from 1.18 it has no `disp`
        ref = scipy.linalg.signm(A)
    assert spectral_error(ref, case.exact_sign()) > 1
    S = as_float64(matfn.mcsgn(case.tensor()))
    assert spectral_error(S, case.exact_sign()) <= sign_tolerance(case.exact_sign(), torch.float64)


@given(case=sign_matrices(dtypes=[torch.float64, torch.float32]))
def test_involution_and_commutation(case):
    # S² = I (nonsingular M) and S M = M S.
    M = case.tensor()
    S = matfn.mcsgn(M).double()
    A = M.double()
    exact = case.exact_sign()
    tol = torch.from_numpy(np.asarray(sign_tolerance(exact, case.dtype)))
    S_norm = torch.linalg.matrix_norm(torch.from_numpy(exact), ord=2)
    eye = torch.eye(case.n, dtype=torch.float64)
    inv_err = torch.linalg.matrix_norm(S @ S - eye, ord=2)
    assert torch.all(inv_err <= 3 * tol * S_norm)
    A_norm = torch.linalg.matrix_norm(A, ord=2)
    comm = torch.linalg.matrix_norm(S @ A - A @ S, ord=2)
    assert torch.all(comm <= 3 * tol * A_norm)


@given(case=sign_matrices(kinds=["eig", "block"], dtypes=[torch.float64], max_batch_dims=0))
def test_similarity_invariance(case):
    # mcsgn(P M P⁻¹) = P mcsgn(M) P⁻¹ with κ(P) ≤ 4.
    rng = np.random.default_rng(case.seed + 1)
    n = case.n
    P = haar_orthonormal(rng, n, n) * np.geomspace(1, 4, n) @ haar_orthonormal(rng, n, n).T
    Pi = np.linalg.inv(P)
    A = case.array()
    lhs = as_float64(matfn.mcsgn(torch.from_numpy(P @ A @ Pi)))
    rhs = P @ as_float64(matfn.mcsgn(torch.from_numpy(A))) @ Pi
    # Both sides carry mcsgn's rounding, amplified by κ(P) ≤ 4 once more on each side.
    tol = sign_tolerance(P @ case.exact_sign() @ Pi, torch.float64) * 16 * 16
    assert spectral_error(lhs, rhs) <= tol


@given(case=sign_matrices(kinds=["sym"], dtypes=[torch.float64, torch.float32]))
def test_equals_msign_for_symmetric(case):
    M = case.tensor()
    S = as_float64(matfn.mcsgn(M))
    O = as_float64(matfn.msign(M, steps="auto"))
    tol = 2 * sign_tolerance(case.exact_sign(), case.dtype)
    assert np.all(spectral_error(S, O) <= tol)
    assert np.all(spectral_error(S, msign_oracle(case.array())) <= tol)


@given(
    n=st.integers(1, 12),
    m=st.integers(1, 12),
    cond=st.sampled_from([1.0, 10.0, 1e3]),
    c_scale=st.sampled_from([0.1, 1.0, 10.0]),
    seed=st.integers(0, 2**16),
)
def test_sylvester_block(n, m, cond, c_scale, seed):
    # mcsgn([[A, −C], [0, −B]]) = [[I, −2X], [0, −I]] with A X + X B = C (docs/math.md §2.3(1),
    # scipy's convention). X's conditioning: ‖X‖ ≤ ‖C‖/(λ_min(A) + λ_min(B)), so scale by 1/sep.
    rng = np.random.default_rng(seed)
    A, B = _sym(rng, n, 1 / cond, 1.0), _sym(rng, m, 1 / cond, 1.0)
    C = c_scale * rng.standard_normal((n, m))
    Z = np.block([[A, -C], [np.zeros((m, n)), -B]])
    S = as_float64(matfn.mcsgn(torch.from_numpy(Z)))
    X = -S[:n, n:] / 2
    ref = scipy.linalg.solve_sylvester(A, B, C)
    exact = np.block([[np.eye(n), -2 * ref], [np.zeros((m, n)), -np.eye(m)]])
    tol = sign_tolerance(exact, torch.float64) * cond
    assert np.linalg.norm(X - ref, 2) <= tol
    np.testing.assert_allclose(S[:n, :n], np.eye(n), atol=tol)
    np.testing.assert_allclose(S[n:, n:], -np.eye(m), atol=tol)
    np.testing.assert_allclose(S[n:, :n], 0, atol=tol)


@given(n=st.integers(1, 12), cond=st.sampled_from([1.0, 10.0, 1e2]), seed=st.integers(0, 999))
def test_sqrt_and_inverse_sqrt_block(n, cond, seed):
    # mcsgn([[0, C], [I, 0]]) = [[0, C^{1/2}], [C^{-1/2}, 0]] for C with positive eigenvalues
    # (eigenvalues ±√λ(C) are real). C = Q D Q⁻¹ with κ(Q) ≤ 3, non-symmetric.
    rng = np.random.default_rng(seed)
    Q = haar_orthonormal(rng, n, n) * np.geomspace(1, 3, n) @ haar_orthonormal(rng, n, n).T
    C = Q @ np.diag(np.geomspace(1, 1 / cond, n)) @ np.linalg.inv(Q)
    Z = np.block([[np.zeros((n, n)), C], [np.eye(n), np.zeros((n, n))]])
    S = as_float64(matfn.mcsgn(torch.from_numpy(Z)))
    root = np.real(scipy.linalg.sqrtm(C))
    inv_root = np.linalg.inv(root)
    exact = np.block([[np.zeros((n, n)), root], [inv_root, np.zeros((n, n))]])
    tol = sign_tolerance(exact, torch.float64) * np.sqrt(cond)
    assert spectral_error(S, exact) <= tol
    np.testing.assert_allclose(S[:n, :n], 0, atol=tol)


@pytest.mark.parametrize(
    ("n", "m", "steps"), [(6, 6, None), (9, 9, "auto"), (5, 8, 10), (8, 5, 10)], ids=str
)
def test_msign_through_mcsgn_block(n, m, steps):
    # mcsgn([[0, C], [Cᵀ, 0]]) = [[0, msign(C)], [msign(Cᵀ), 0]]. Rectangular C gives |n − m|
    # zero eigenvalues, which an int step count maps to 0 (auto would raise, see below).
    rng = np.random.default_rng(n * 100 + m)
    k = min(n, m)
    C = (haar_orthonormal(rng, n, k) * np.geomspace(1, 0.1, k)) @ haar_orthonormal(rng, m, k).T
    Z = np.block([[np.zeros((n, n)), C], [C.T, np.zeros((m, m))]])
    S = as_float64(matfn.mcsgn(torch.from_numpy(Z), steps=steps))
    O = msign_oracle(C)
    # Fixed 10 steps resolve eigenvalues ≥ 1e-3·√tr(Z²) to ≤ 1e-15; symmetric: ‖S‖₂ = 1.
    tol = sign_tolerance(np.eye(n + m), torch.float64)
    assert spectral_error(S[:n, n:], O) <= tol
    assert spectral_error(S[n:, :n], O.T) <= tol
    np.testing.assert_allclose(S[:n, :n], 0, atol=tol)
    np.testing.assert_allclose(S[n:, n:], 0, atol=tol)


ROTATIONS = {
    "rotation": np.array([[0.0, -1.0], [1.0, 0.0]]),
    "near-axis-pair": np.array([[1e-3, -1.0], [1.0, 1e-3]]),
    "near-axis-pair-neg": np.array([[-1e-2, -2.0], [0.5, -1e-2]]),
}


def _embedded(block: np.ndarray, n: int = 6, seed: int = 0) -> np.ndarray:
    # The 2×2 block hidden in a larger matrix with good real eigenvalues, in a random basis.
    rng = np.random.default_rng(seed)
    D = np.diag(rng.choice([-1.0, 1.0], n - 2) * np.geomspace(1, 0.3, n - 2))
    Z = scipy.linalg.block_diag(block, D)
    Q = haar_orthonormal(rng, n, n)
    return Q @ Z @ Q.T


@pytest.mark.parametrize("steps", [None, "auto", 5, 8, 12], ids=str)
@pytest.mark.parametrize("embed", [False, True], ids=["2x2", "embedded"])
@pytest.mark.parametrize("name", list(ROTATIONS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=DTYPE_NAMES.get)
def test_imaginary_axis_and_near_axis_eigenvalues(name, embed, steps, dtype):
    # Eigenvalues exactly on the axis (±i) raise on every path. Eigenvalues 1e-3 off the axis
    # (89.94°) are well-posed: the Newton path (steps None/"auto") returns their sign; a real
    # polynomial schedule (int steps) cannot move them to ±1 and raises.
    A = _embedded(ROTATIONS[name]) if embed else ROTATIONS[name]
    M = torch.from_numpy(A).to(dtype)
    good = torch.from_numpy(_embedded(np.diag([1.0, -2.0]), A.shape[-1], seed=1)).to(dtype)
    if name == "rotation" or isinstance(steps, int):
        with pytest.raises(MatrixSignConvergenceError, match="imaginary axis|complex eig"):
            matfn.mcsgn(M, steps=steps)
        # In a batch with well-posed matrices it still raises (no silent garbage for one element).
        with pytest.raises(MatrixSignConvergenceError):
            matfn.mcsgn(torch.stack([good, M]), steps=steps)
        return
    S = as_float64(matfn.mcsgn(torch.stack([good, M]), steps=steps))
    exact = mcsgn_oracle(torch.stack([good, M]).double())
    # Condition of the near-axis pair ≈ ‖M‖/|Re λ| ≈ 1e3; float32 rounding of M moves it too.
    tol = 1e-11 if dtype == torch.float64 else 1e-3
    assert np.all(spectral_error(S, exact) <= tol * np.linalg.norm(exact, 2, axis=(-2, -1)))


@pytest.mark.parametrize(
    "case",
    [
        SignCase(n=6, kind="sym", zeros=1, gap=0.1, seed=2),
        SignCase(n=10, kind="sym", zeros=3, gap=0.1, seed=2),
        SignCase(n=10, kind="eig", zeros=3, gap=0.1, q_cond=3.0, seed=2),
        SignCase(n=20, kind="eig", zeros=1, gap=0.1, q_cond=3.0, seed=2, dtype=torch.float32),
        SignCase(n=12, batch=(2,), kind="sym", zeros=2, gap=0.1, seed=5, dtype=torch.float32),
    ],
    ids=case_id,
)
def test_zero_eigenvalue_maps_to_zero(case):
    # csgn(0) = 0. A fixed schedule (8 steps resolve |λ| ≥ 1e-3·√tr(M²)) leaves rounding noise
    # at 0 near 0: its slope f′(0) ≈ 1e4 times u. steps="auto" cannot tell an exact zero from an
    # unresolved small eigenvalue and raises instead of lifting the noise to ±1.
    M = case.tensor()
    S = as_float64(matfn.mcsgn(M, steps=8))
    u = torch.finfo(torch.float64 if case.dtype == torch.float64 else torch.float32).eps / 2
    tol = sign_tolerance(case.exact_sign(), case.dtype) + 1e4 * u * case.n
    assert np.all(spectral_error(S, case.exact_sign()) <= tol)
    with pytest.raises(MatrixSignConvergenceError):
        matfn.mcsgn(M, steps="auto")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_NAMES.get)
def test_half_precision_inputs_iterate_in_float32(dtype):
    case = SignCase(n=16, batch=(3,), kind="eig", gap=0.1, q_cond=3.0, seed=4, dtype=dtype)
    M = case.tensor()
    S = matfn.mcsgn(M)
    assert S.dtype == dtype
    ref = matfn.mcsgn(M.float()).to(dtype)
    torch.testing.assert_close(S, ref, atol=0, rtol=0)
    tol = sign_tolerance(case.exact_sign(), dtype)
    assert np.all(spectral_error(as_float64(S), case.exact_sign()) <= tol)


@given(case=sign_matrices(dtypes=[torch.float64, torch.float32], max_batch_dims=2))
def test_batch_equals_loop(case):
    M = case.tensor()
    S = matfn.mcsgn(M)
    flat, Sf = M.reshape(-1, case.n, case.n), S.reshape(-1, case.n, case.n)
    tol = float(sign_tolerance(case.exact_sign(), case.dtype).max())
    for i in range(flat.shape[0]):
        torch.testing.assert_close(Sf[i], matfn.mcsgn(flat[i]), atol=tol, rtol=0)


@pytest.mark.parametrize("method", ["polar_express", "tuned", "keller", "cubic"])
def test_fixed_schedules_follow_scalar_map(method):
    # With default steps P f(Λ/(sf√tr M²)) P⁻¹: error ≤ κ(Q)·max |f(x) − 1| + rounding, where
    # x are the normalised eigenvalue magnitudes (Keller's map does not converge: ≈ 0.3).
    case = SignCase(n=12, kind="eig", gap=0.3, q_cond=2.0, seed=7)
    A = case.array()
    steps = 5 if method == "polar_express" else None
    coeffs, factor = schedule(method, steps or DEFAULT_STEPS[method])
    lam = np.abs(np.linalg.eigvals(A))
    x = lam / (factor * np.sqrt(np.trace(A @ A)))
    scalar = float(np.abs(scalar_map(coeffs, x) - 1).max())
    S = as_float64(matfn.mcsgn(case.tensor(), method=method, steps=steps))
    tol = case.q_cond * scalar + sign_tolerance(case.exact_sign(), torch.float64)
    assert spectral_error(S, case.exact_sign()) <= tol


def test_svd_method_is_exact_eig():
    case = SignCase(n=12, batch=(2,), kind="eig", gap=0.01, q_cond=10.0, seed=7)
    S = as_float64(matfn.mcsgn(case.tensor(), method="svd"))
    assert np.all(spectral_error(S, case.exact_sign()) <= 1e-11)


# --- Per-step tables: method=[(a, b, c), …] -------------------------------------------------


@pytest.mark.parametrize(
    ("name", "steps", "table"),
    [
        ("keller", 5, [KELLER] * 5),
        ("tuned", 6, list(TUNED_6)),
        ("cubic", 12, [CUBIC] * 12),
        ("youjiacheng", None, list(YOUJIACHENG_6)),
    ],
    ids=lambda v: str(v)[:12],
)
def test_table_equal_to_named_method_is_bit_identical(name, steps, table):
    # Both run X₀ = M/√tr(M²) (sf = 1) and the same rows.
    case = SignCase(n=12, batch=(2,), kind="eig", gap=0.3, q_cond=2.0, seed=3)
    M = case.tensor()
    kw = {"check_convergence": False}
    ref = matfn.mcsgn(M, method=name, steps=steps, **kw)
    assert torch.equal(matfn.mcsgn(M, method=table, **kw), ref)
    assert torch.equal(matfn.mcsgn(M, method=tuple(table), steps=len(table), **kw), ref)


@given(case=sign_matrices(kinds=["eig", "sym"], max_side=16))
def test_converging_table_matches_exact_sign(case):
    # The odd quintics act on the eigenvalues (docs/math.md §2.2): a table that converges on
    # [1e-3, 1] to the dtype's target (Polar Express without safety factor, 10 steps: 1e-15)
    # gives the sign within the steps="auto" tolerance on eigenvalues |λ| ≥ gap·scale.
    table = polar_express_coefficients(10, 1e-3, safety=1.0)
    lam = np.abs(np.linalg.eigvals(case.array()))
    trace = np.sqrt(np.abs(np.trace(case.array() @ case.array(), axis1=-2, axis2=-1)))
    assume(np.all(lam.min(-1) >= 2e-3 * trace))
    S = as_float64(matfn.mcsgn(case.tensor(), method=table))
    exact = case.exact_sign()
    assert np.all(spectral_error(S, exact) <= 4 * sign_tolerance(exact, case.dtype))


def test_fixed_table_follows_scalar_map():
    # A non-converging table: P f(Λ/√tr M²) P⁻¹, error ≤ κ(Q)·max |f(x) − 1| + rounding.
    case = SignCase(n=12, kind="eig", gap=0.3, q_cond=2.0, seed=7)
    A = case.array()
    table = [(3.0, -3.2, 1.2)] * 4 + [CONVERGENT_QUINTIC]
    x = np.abs(np.linalg.eigvals(A)) / np.sqrt(np.trace(A @ A))
    scalar = float(np.abs(scalar_map(table, x) - 1).max())
    S = as_float64(matfn.mcsgn(case.tensor(), method=table))
    tol = case.q_cond * scalar + sign_tolerance(case.exact_sign(), torch.float64)
    assert spectral_error(S, case.exact_sign()) <= tol


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"method": []}, ValueError, "`method` must have 1 to 99 rows"),
        ({"method": [(1.0, math.inf, 0.0)]}, ValueError, "`method` row 0 must be finite"),
        ({"method": [(1.0, 2.0)]}, ValueError, "`method` row 0 must have 3 entries"),
        ({"method": "fast"}, ValueError, "`method` must be one of"),
        ({"method": 1.5}, TypeError, "`method` must be a method name"),
        ({"method": [KELLER] * 3, "steps": 4}, ValueError, "`steps` must be None or 3"),
        ({"method": [KELLER] * 3, "steps": "auto"}, ValueError, "`steps` must be None or 3"),
        ({"method": "youjiacheng", "steps": "auto"}, ValueError, "`steps` must be None or 6"),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
def test_bad_tables_raise(kwargs, error, match):
    M = torch.eye(4, dtype=torch.float64)
    with pytest.raises(error, match=match):
        matfn.mcsgn(M, **kwargs)


def _relative_errors(S: np.ndarray, exact: np.ndarray) -> np.ndarray:
    return np.linalg.norm(S - exact, axis=(-2, -1)) / np.linalg.norm(exact, axis=(-2, -1))


# Tested envelope of the Newton path (non-symmetric input, steps="auto"): eigenvector condition
# κ₂(Q) ≤ 1e3, complex pairs at angles 0°–87° from the real axis, moduli spread ≤ 1e2, scales
# 1e-3–1e3, n ≤ 24, both half-planes. Measured worst error ~4e-12 (κ₂(Q) = 1e3).
@given(case=spectral_matrices(max_q_cond=1e3))
def test_newton_complex_nonnormal_float64(case):
    S = as_float64(matfn.mcsgn(case.tensor()))
    assert np.all(_relative_errors(S, case.exact_sign()) <= 1e-10)


@given(case=spectral_matrices(max_q_cond=1e5, max_spread=10.0, max_batch_dims=0, max_side=16))
def test_newton_beyond_envelope_within_10x_of_signm(case):
    # κ₂(Q) up to 1e5: no absolute target, but never worse than 10× scipy's signm (which often
    # fails outright on such input), 1e-10, or the inversion floor u·‖S‖²_F of any
    # inversion-based iteration (a Schur method can beat it where M ∝ S, e.g. all |λ| = 1).
    M = case.array()
    exact = case.exact_sign()
    S = as_float64(matfn.mcsgn(case.tensor()))
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = np.atleast_2d(scipy.linalg.signm(M))
    ref_err = float(_relative_errors(np.real(ref), exact))
    floor = torch.finfo(torch.float64).eps / 2 * float(np.linalg.norm(exact)) ** 2
    assert float(_relative_errors(S, exact)) <= max(10 * ref_err, 1e-10, floor)


@given(case=spectral_matrices(dtypes=[torch.float32], max_q_cond=1e2))
def test_newton_complex_nonnormal_float32(case):
    # Rounding u·κ₂(Q)² (measured ≤ 30·u for κ = 1, ≤ 0.04·u·κ² for κ = 1e2, n = 20).
    # Eigenvalues nearer the axis than AXIS_DISTANCE·‖M‖_F (1e-4 in float32) raise instead.
    M = case.tensor()
    margin = math.cos(math.radians(case.max_angle)) / case.spread * case.scale
    fro = float(torch.linalg.matrix_norm(M.double()).min())
    if margin < 3 * AXIS_DISTANCE[torch.float32] * fro:
        try:
            S = as_float64(matfn.mcsgn(M))
        except MatrixSignConvergenceError as err:
            assert "imaginary axis" in str(err)
            return
    else:
        S = as_float64(matfn.mcsgn(M))
    u = torch.finfo(torch.float32).eps / 2
    tol = 4 * u * (case.n + 8) * case.q_cond**2
    assert np.all(_relative_errors(S, case.exact_sign()) <= tol)


def test_issue_complex_example_converges():
    # A = 2I + 0.1·randn(20, 20): eigenvalues 1.95 ± 0.23i etc.; sign = I.
    rng = np.random.default_rng(0)
    A = 2 * np.eye(20) + 0.1 * rng.standard_normal((20, 20))
    S = as_float64(matfn.mcsgn(torch.from_numpy(A)))
    np.testing.assert_allclose(S, np.eye(20), atol=1e-13)
    np.testing.assert_allclose(S, mcsgn_oracle(A), atol=1e-13)


@pytest.mark.parametrize("steps", [5, 8, 12])
def test_fixed_steps_on_rotation_raise(steps):
    # sign(rotation by 10°) = I; a real polynomial schedule blows its eigenvalues e^{±10°i} up
    # (entries 1e82 for 5 steps); the exact ‖S³ − S‖_F check sees it.
    t = np.deg2rad(10.0)
    R = torch.tensor([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]], dtype=torch.float64)
    with pytest.raises(MatrixSignConvergenceError, match="complex eigenvalues"):
        matfn.mcsgn(R, steps=steps)
    np.testing.assert_allclose(as_float64(matfn.mcsgn(R)), np.eye(2), atol=1e-14)


SCALES = {torch.float32: [1e-30, 1e-19, 1e19, 1e30], torch.float64: [1e-300, 1e-150, 1e150, 1e300]}


@pytest.mark.parametrize("path", ["newton", "symmetric", "steps"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=DTYPE_NAMES.get)
def test_scale_invariance(path, dtype):
    # mcsgn(sM) = mcsgn(M) for any finite scaling (inputs are divided by their largest entry
    # before any norm is formed), on all three paths.
    if path == "newton":
        case = SpectralCase(n=9, q_cond=10.0, complex_pairs=3, max_angle=80.0, seed=3)
    else:
        case = SignCase(n=9, kind="sym", gap=0.1, seed=3)
    steps = 10 if path == "steps" else None
    M = case.tensor().to(dtype)
    S0 = matfn.mcsgn(M, steps=steps)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for scale in SCALES[dtype]:
        S = matfn.mcsgn(M * scale, steps=steps)
        torch.testing.assert_close(S, S0, rtol=0, atol=tol * float(S0.abs().max()))


def test_exact_axis_error_names_the_axis():
    M = torch.from_numpy(_embedded(ROTATIONS["rotation"], 8, seed=2))
    with pytest.raises(MatrixSignConvergenceError, match="on or too near the imaginary axis"):
        matfn.mcsgn(M)
