"""mclip against the SVD oracle ``U clip(Σ, α, β) Vᵀ`` and its properties (docs/math.md §3.5).

Tolerance with ``steps="auto"`` (:func:`clip_tolerance`): the Gram-side signs act on
``G − β²I`` (eigenvalues ``σ² − β²``) whose rounding is ``u‖G‖ ≈ u σ_max²``; it enters the
result multiplied by ``(β ∓ σ)/(σ ± β)``-sized factors, so the error is ``≈ u σ_max²/β``
(measured: 9e-14 fp64 and 4.5e-5 fp32 at σ_max = 30β, i.e. ratio ≈ 0.9). Hence
``C u β max(1, σ_max/β)²`` with ``C = 16``, u of the compute dtype (float32 for non-fp64 input).
The default (F3, 8 fixed steps) is judged by its documented envelope instead (see the tests).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import matfn
from matfn.coefficients import (
    CONVERGENT_QUINTIC,
    KELLER,
    TUNED_5,
    YOUJIACHENG_6,
    auto_schedule,
)
from matfn.oracles import as_float64, mclip_oracle, msign_oracle
from tests.strategies import MatrixCase, haar_orthonormal, matrices

FORMS = ("F3", "F2", "dilation", "svd")
ROUNDING_FACTOR = 16.0

#: Inner msign(steps="auto") calls warn when G − β²I has (numerically) zero eigenvalues, i.e.
#: singular values exactly at β or 0; those directions are multiplied by σ − β = 0 or cancel, so
#: the warning is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:msign\\(steps='auto'\\) did not converge")


def clip_tolerance(A: np.ndarray, beta: float, dtype: torch.dtype) -> np.ndarray:
    """``C u β (max(1, σ_max/β)² + 4√(n+m))``: the Gram term plus the ~15 auto steps' rounding."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    u = torch.finfo(compute).eps / 2
    smax = np.linalg.norm(A, ord=2, axis=(-2, -1)) if A.size else np.zeros(A.shape[:-2])
    size = 4 * np.sqrt(sum(A.shape[-2:]))
    return ROUNDING_FACTOR * u * beta * (np.maximum(1.0, smax / beta) ** 2 + size)


def clip_oracle(A: np.ndarray, rank: int, min_sv: float, max_sv: float) -> np.ndarray:
    """``U clip(Σ, α, β) Vᵀ`` with the known rank (zero singular values stay 0)."""
    U, s, Vh = np.linalg.svd(A, full_matrices=False)
    c = np.clip(s, min_sv, max_sv)
    c[..., rank:] = 0
    return (U * c[..., None, :]) @ Vh


def spectral_error(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    return np.linalg.norm(X - Y, ord=2, axis=(-2, -1))


moderate = matrices(
    dtypes=[torch.float64, torch.float32],
    max_side=24,
    max_cond=30.0,
    scales=(1e-2, 30.0),
    ones=True,
    rank_deficient=True,
    batch_spread=0.3,
)


@given(case=moderate, form=st.sampled_from(FORMS), beta=st.sampled_from([1.0, 0.5, 2.0]))
def test_forms_agree_with_svd_auto(case, form, beta):
    M = case.tensor()
    assume(np.all(np.linalg.norm(as_float64(M), ord=2, axis=(-2, -1)) <= 30 * beta))
    X = as_float64(matfn.mclip(M, max_sv=beta, form=form, steps="auto"))
    A = as_float64(M)
    ref = clip_oracle(A, case.effective_rank, 0.0, beta)
    assert np.all(spectral_error(X, ref) <= clip_tolerance(A, beta, case.dtype))
    if case.dtype == torch.float64:  # fp32 rounding noise in null directions: cut-off differs
        np.testing.assert_allclose(ref, mclip_oracle(A, beta), atol=1e-12 * max(1.0, beta))


def _probe_batch(R: float, seed: int = 0) -> torch.Tensor:
    # σ_max = R (β = 1), a second singular value scanned through [1, 30] and 30 values in [0, 1]:
    # the scan finds where the Gram-side sign of σ² − 1 is unresolved (the worst case).
    rng = np.random.default_rng(seed)
    U, V = haar_orthonormal(rng, 32, 32), haar_orthonormal(rng, 64, 32)
    out = []
    for p in np.geomspace(1.0001, 30, 60):
        s = np.concatenate([[R, min(p, R)], rng.uniform(0, 1, 30)])
        out.append((U * s) @ V.T)
    return torch.from_numpy(np.stack(out)).float()


@pytest.mark.parametrize(
    ("ratio", "top", "grow", "shrink"),
    [
        (3, 1.01, 1e-5, 1e-5),
        (10, 1.01, 2e-3, 1e-5),
        (30, 1.01, 0.02, 1e-3),
        (100, 1.07, 1e-3, 0.15),
        (1000, 1.07, 1e-3, 0.99),
    ],
    ids=lambda v: str(v),
)
def test_default_envelope(ratio, top, grow, shrink):
    # Documented envelope of the default (F3, 8 Polar-Express steps, float32), worst case over a
    # second singular value scanned through [β, 30β] (measured in brackets): largest output
    # singular value ≤ 1.01β for σ_max/β ≤ 30 (1.008) and ≤ 1.07β up to 1000 (1.068 at 100).
    # Values just below β are pulled up towards β (0.0012β at 10, 0.013β at 30); for σ_max ≳ 100β
    # the values below β shrink instead (0.10β at 100, 0.98β at 1000): G = M Mᵀ squares the
    # dynamic range and the Gram-side sign cannot resolve σ² − β² next to σ_max².
    for beta in (1.0, 0.25):
        M = beta * _probe_batch(ratio)
        X = matfn.mclip(M, max_sv=beta)
        sv_out = np.linalg.svd(as_float64(X), compute_uv=False)
        sv_in = np.linalg.svd(as_float64(M), compute_uv=False)
        assert sv_out[:, 0].max() <= top * beta
        below = sv_in < 0.99 * beta
        assert np.all(sv_out[below] - sv_in[below] <= grow * beta)
        assert np.all(sv_in[below] - sv_out[below] <= shrink * beta)


@given(
    case=matrices(dtypes=[torch.float32], max_side=24, max_cond=1e3, scales=(1e-2, 30.0)),
    beta=st.sampled_from([1.0, 0.3]),
)
def test_default_never_increases_and_bounded(case, beta):
    # Default settings, σ_max ≤ 30β: σᵢ(out) ≤ min(σᵢ, β) up to 2% of β (unresolved near β, see
    # test_default_envelope) and ‖out‖₂ ≤ 1.01β.
    M = case.tensor()
    A = as_float64(M)
    assume(np.all(np.linalg.norm(A, ord=2, axis=(-2, -1)) <= 30 * beta))
    X = as_float64(matfn.mclip(M, max_sv=beta))
    sv_in = np.linalg.svd(A, compute_uv=False)
    sv_out = np.linalg.svd(X, compute_uv=False)
    assert np.all(sv_out <= sv_in + 0.02 * beta)  # sorted: clip is monotone
    assert np.all(sv_out[..., 0] <= 1.01 * beta)


@given(case=moderate)
def test_idempotent_and_norm_bound(case):
    M = case.tensor()
    A = as_float64(M)
    X = matfn.mclip(M, steps="auto")
    XX = matfn.mclip(X, steps="auto")
    tol = clip_tolerance(A, 1.0, case.dtype)
    assert np.all(spectral_error(as_float64(XX), as_float64(X)) <= 2 * tol)
    assert np.all(np.linalg.norm(as_float64(X), ord=2, axis=(-2, -1)) <= 1 + tol)


@given(
    case=matrices(
        dtypes=[torch.float64, torch.float32],
        max_side=24,
        scales=(1e-3, 0.9),
        rank_deficient=True,
        max_cond=1e4,
        batch_spread=0.0,
    )
)
def test_identity_on_unit_ball(case):
    M = case.tensor()
    X = matfn.mclip(M, steps="auto")
    tol = clip_tolerance(as_float64(M), 1.0, case.dtype)
    assert np.all(spectral_error(as_float64(X), as_float64(M)) <= tol)


@given(
    n=st.integers(1, 20),
    m=st.integers(1, 20),
    smin=st.sampled_from([1.0, 1.5, 4.0]),
    cond=st.sampled_from([1.0, 3.0, 7.0]),
    seed=st.integers(0, 999),
)
def test_equals_msign_when_sigma_min_at_least_one(n, m, smin, cond, seed):
    k = min(n, m)
    case = MatrixCase((n, m), cond=cond, scale=smin * cond, seed=seed)
    M = case.tensor()
    X = as_float64(matfn.mclip(M, steps="auto"))
    tol = clip_tolerance(as_float64(M), 1.0, torch.float64)
    assert spectral_error(X, msign_oracle(as_float64(M))) <= tol
    assert np.linalg.svd(as_float64(M), compute_uv=False)[k - 1] >= smin * (1 - 1e-12)


@given(case=moderate, beta=st.sampled_from([0.1, 3.0, 1e3]))
def test_scaling(case, beta):
    # mclip_[0,β](M) = β·mclip(M/β).
    M = case.tensor()
    lhs = matfn.mclip(M, max_sv=beta, steps="auto")
    rhs = beta * matfn.mclip(M / beta, steps="auto")
    A = as_float64(M)
    tol = 2 * clip_tolerance(A, beta, case.dtype)
    assert np.all(spectral_error(as_float64(lhs), as_float64(rhs)) <= tol)


@given(
    case=matrices(dtypes=[torch.float64], max_side=20, max_cond=1e2, scales=(0.1, 10.0)),
    alpha=st.sampled_from([0.05, 0.3, 1.0]),
    form=st.sampled_from(FORMS),
)
def test_min_sv_lifting_full_rank(case, alpha, form):
    beta = 2.0
    M = case.tensor()
    A = as_float64(M)
    X = as_float64(matfn.mclip(M, min_sv=alpha, max_sv=beta, form=form, steps="auto"))
    ref = clip_oracle(A, case.k, alpha, beta)
    # The lower clip adds one more α-level clip: α/β-scaled copy of the tolerance.
    tol = clip_tolerance(A, beta, torch.float64) + clip_tolerance(A, alpha, torch.float64)
    assert np.all(spectral_error(X, ref) <= tol)
    np.testing.assert_allclose(ref, mclip_oracle(A, beta, alpha), atol=1e-12)


@pytest.mark.parametrize(
    ("case", "steps", "null_tol"),
    [
        (MatrixCase((12, 20), rank=5, cond=10.0, scale=3.0, seed=0), "auto", 1e-6),
        (MatrixCase((3, 16, 10), rank=4, cond=10.0, scale=3.0, seed=1), "auto", 1e-6),
        (MatrixCase((20, 12), rank=5, cond=10.0, scale=3.0, seed=2, dtype=torch.float32), 8, 1e-3),
    ],
    ids=lambda v: getattr(v, "id", str(v)),
)
def test_min_sv_preserves_rank(case, steps, null_tol):
    # Zero singular values are not lifted to min_sv (rank-deficient M: those directions are not
    # determined by M). NS leaves msign(M) noise ~ u·f′(0) in them, scaled by α.
    alpha, beta = 0.5, 2.0
    M = case.tensor()
    X = as_float64(matfn.mclip(M, min_sv=alpha, max_sv=beta, steps=steps))
    sv = np.linalg.svd(X, compute_uv=False)
    r = case.effective_rank
    assert np.all(sv[..., r:] <= null_tol)
    A = as_float64(M)
    ref = clip_oracle(A, r, alpha, beta)
    band = 1e-6 if steps == "auto" else 0.02
    assert np.all(spectral_error(X, ref) <= band + null_tol)


@given(case=moderate, form=st.sampled_from(FORMS))
def test_transpose_and_orthogonal_equivariance(case, form):
    M = case.tensor()
    A = as_float64(M)
    tol = 2 * clip_tolerance(A, 1.0, case.dtype)
    X = matfn.mclip(M, form=form, steps="auto")
    Xt = matfn.mclip(M.mT, form=form, steps="auto")
    assert np.all(spectral_error(as_float64(Xt), as_float64(X.mT)) <= tol)
    rng = np.random.default_rng(case.seed)
    P = torch.from_numpy(haar_orthonormal(rng, case.n, case.n)).to(case.dtype)
    Q = torch.from_numpy(haar_orthonormal(rng, case.m, case.m)).to(case.dtype)
    lhs = matfn.mclip(P @ M @ Q, form=form, steps="auto")
    rhs = P @ X @ Q
    assert np.all(spectral_error(as_float64(lhs), as_float64(rhs)) <= 2 * tol)


@pytest.mark.parametrize("form", ["F3", "F2", "dilation"])
def test_fixed_steps_forms_bounded(form):
    # Fixed step counts other than the default: every form still clips σ_max = 10β to ≈ β.
    M = 3.0 * _probe_batch(10.0)[:8]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        X = matfn.mclip(M, max_sv=3.0, form=form, steps=10)
    sv = np.linalg.svd(as_float64(X), compute_uv=False)
    assert sv[:, 0].max() <= 3.0 * 1.01


@pytest.mark.slow
def test_large_default_and_auto():
    case = MatrixCase((128, 384), dtype=torch.float32, cond=1e3, scale=30.0, seed=3)
    M = case.tensor()
    A = as_float64(M)
    # 128 large singular values widen the unresolved band (‖G − I‖_F grows): measured 1.0204.
    sv = np.linalg.svd(as_float64(matfn.mclip(M)), compute_uv=False)
    assert sv[0] <= 1.03
    X = as_float64(matfn.mclip(M, steps="auto"))
    assert spectral_error(X, clip_oracle(A, case.k, 0.0, 1.0)) <= clip_tolerance(
        A, 1.0, torch.float32
    )


# --- Per-step tables: method=[(a, b, c), …] -------------------------------------------------


@pytest.mark.parametrize("form", ["F3", "F2", "dilation"])
@pytest.mark.parametrize(
    ("name", "steps", "table"),
    [("keller", 5, [KELLER] * 5), ("tuned", 5, list(TUNED_5)), ("youjiacheng", 6, YOUJIACHENG_6)],
    ids=lambda v: str(v)[:12],
)
def test_table_equal_to_named_method_is_bit_identical(name, steps, table, form):
    # Every inner msign runs the table's rows from ‖·‖_F, as the named method's.
    M = MatrixCase((2, 12, 20), cond=1e2, scale=3.0, seed=2).tensor()
    for min_sv in (0.0, 0.5):
        kw = {"max_sv": 1.0, "min_sv": min_sv, "form": form}
        ref = matfn.mclip(M, method=name, steps=steps, **kw)
        assert torch.equal(matfn.mclip(M, method=table, **kw), ref)
        assert torch.equal(matfn.mclip(M, method=tuple(table), steps=len(table), **kw), ref)


@given(
    case=matrices(dtypes=[torch.float64], max_side=24, max_cond=30.0, scales=(1e-2, 30.0)),
    form=st.sampled_from(["F3", "F2", "dilation"]),
    beta=st.sampled_from([1.0, 0.5, 2.0]),
)
def test_converging_table_agrees_with_svd(case, form, beta):
    # A table that resolves |σ² − β²| down to 1e-7‖G − β²I‖_F to 1e-12 (the float64 auto
    # schedule and two convergent steps) clips as steps="auto" does
    # (test_forms_agree_with_svd_auto, same tolerance).
    table = auto_schedule(1e-7, 1e-12) + [CONVERGENT_QUINTIC] * 2
    M = case.tensor()
    A = as_float64(M)
    assume(np.all(np.linalg.norm(A, ord=2, axis=(-2, -1)) <= 30 * beta))
    X = as_float64(matfn.mclip(M, max_sv=beta, form=form, method=table))
    ref = clip_oracle(A, case.effective_rank, 0.0, beta)
    assert np.all(spectral_error(X, ref) <= clip_tolerance(A, beta, case.dtype))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"method": []}, ValueError, "`method` must have 1 to 99 rows"),
        ({"method": [(1.0, 2.0, math.nan)]}, ValueError, "`method` row 0 must be finite"),
        ({"method": [(1.0, 2.0, "c")]}, TypeError, "`method` row 0 must hold real numbers"),
        ({"method": {"a": 1.0}}, TypeError, "`method` must be a method name"),
        ({"method": [KELLER] * 3, "steps": 8}, ValueError, "`steps` must be None or 3"),
        ({"method": [KELLER] * 3, "steps": "auto"}, ValueError, "`steps` must be None or 3"),
        ({"method": "polar_express_modded", "steps": 8}, ValueError, "None or 5"),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
def test_bad_tables_raise(kwargs, error, match):
    M = torch.randn(4, 6, dtype=torch.float64)
    with pytest.raises(error, match=match):
        matfn.mclip(M, **kwargs)


def test_zero_dim_tensor_bounds_count_as_their_value():
    # A 0-d tensor bound is read on the host, as torch reads a tensor lr; any other shape raises.
    M = torch.randn(5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = matfn.mclip(M, max_sv=0.5, min_sv=0.1)
    out = matfn.mclip(M, max_sv=torch.tensor(0.5), min_sv=torch.tensor(0.1, dtype=torch.float64))
    assert torch.equal(out, ref)
    with pytest.raises(TypeError, match="max_sv"):
        matfn.mclip(M, max_sv=torch.tensor([0.5]))
    with pytest.raises(TypeError, match="max_sv"):
        matfn.mclip(M, max_sv=torch.tensor(True))
