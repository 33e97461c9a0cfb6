"""Scale safety: any finite input in the dtype's range, against float64 oracles.

msign is scale-invariant, mclip homogeneous (``mclip(sM, sβ) = s·mclip(M, β)``) and the
derivative homogeneous of degree −1 in M and linear in the direction. Two kinds of sweep:

* powers of two ``s = 2^k`` (k from −100 to 100 in float32/bfloat16, ±990 in float64, ±6 in
  float16): the scaled input is exact, so the results must be **bitwise** the unscaled ones
  (the implementation rescales by powers of two, and rounding is equivariant under them);
* powers of ten ``s = 10^k`` (1e-30 … 1e30 in float32, 1e-300 … 1e300 in float64): the scaled
  input is rounded, so the results are compared with the float64 oracles of that rounded input
  (:mod:`matfn.oracles`) to the accuracy the schedule has at scale 1.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import matfn
from matfn.msign import path
from matfn.oracles import as_float64, mclip_oracle, msign_oracle, msign_vjp_oracle
from tests.strategies import MatrixCase, matrices

#: Largest |k| of a power-of-two scale 2^k whose scaled unit-size matrices stay normal.
POW2_RANGE = {torch.float64: 990, torch.float32: 100, torch.bfloat16: 100, torch.float16: 6}
#: Decades swept per dtype (entries from 10^-k to 10^k): the issue's 1e-30 … 1e30 in float32.
DECADES = {torch.float64: 300, torch.float32: 30}

CASES = matrices(dtypes=(torch.float32,), max_side=16, max_cond=1e2, scales=None)


def _normal_k(M: torch.Tensor, k: int) -> int:
    """``k`` clamped so that every nonzero entry of ``M·2^k`` stays a normal number."""
    info = torch.finfo(M.dtype)
    a = M.abs().double()
    lo = float(a[a > 0].min()) if bool((a > 0).any()) else 1.0
    k_min = math.ceil(math.log2(info.tiny) - math.log2(lo))
    k_max = math.floor(math.log2(info.max) - math.log2(max(float(a.max()), 1e-300))) - 1
    return max(k_min, min(k, k_max))


def _pow2(M: torch.Tensor, k: int) -> torch.Tensor:
    """``M·2^k`` exactly (two factors, each representable)."""
    return M * 2.0 ** (k // 2) * 2.0 ** (k - k // 2)


def _rel(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-300))


# ---------------------------------------------------------------------------------------------
# msign
# ---------------------------------------------------------------------------------------------


@settings(deadline=None, max_examples=40)
@given(
    case=matrices(
        dtypes=(torch.float64, torch.float32, torch.bfloat16, torch.float16),
        max_side=16,
        max_cond=1e2,
        scales=None,
    ),
    frac=st.floats(-1, 1),
    method=st.sampled_from(["polar_express", "tuned", "cubic"]),
)
def test_msign_bitwise_invariant_under_powers_of_two(case, frac, method):
    M = case.tensor()
    k = _normal_k(M, round(frac * POW2_RANGE[case.dtype]))
    ref = matfn.msign(M, method=method)
    assert torch.equal(matfn.msign(_pow2(M, k), method=method), ref), k


@settings(deadline=None, max_examples=40)
@given(case=CASES, k=st.integers(-DECADES[torch.float32], DECADES[torch.float32]))
def test_msign_float32_decades_match_oracle(case, k):
    M = (torch.from_numpy(case.array()) * 10.0**k).to(torch.float32)
    assert torch.isfinite(M).all() and (M != 0).any()
    X = matfn.msign(M, steps="auto")
    err = np.abs(as_float64(X) - msign_oracle(M)).max()
    assert err <= 1e-3, (k, err)


@pytest.mark.parametrize("k", [-300, -150, -20, 20, 150, 300])
def test_msign_float64_decades_match_oracle(k):
    case = MatrixCase((3, 12, 7), cond=10.0, seed=k % 7)
    M = torch.from_numpy(case.array()) * 10.0**k
    X = matfn.msign(M, steps="auto")
    assert np.abs(as_float64(X) - msign_oracle(M)).max() <= 1e-10


def test_msign_issue_examples():
    torch.manual_seed(0)
    M = torch.randn(16, 10)
    ref = matfn.msign(M)
    for s in (1e19, 1e30, 1e-20, 1e-30, 3e38 / 16):
        out = matfn.msign(M * s)
        assert (out - ref).abs().max() < 1e-5, s
    # check_finite=False on CPU keeps the rescue (it has no sync to save there)
    assert (matfn.msign(M * 1e30, check_finite=False) - ref).abs().max() < 1e-5


def test_msign_mixed_scales_in_one_batch():
    torch.manual_seed(1)
    M = torch.randn(5, 6, 9)
    M[0] *= 1e30
    M[1] *= 1e-30
    M[3] = 0
    M[4] *= 1e-9  # below the default eps: normalised all the same
    out = matfn.msign(M)
    for b in range(5):  # batched and single products may round differently
        torch.testing.assert_close(out[b], matfn.msign(M[b]), rtol=0, atol=1e-4)
    assert torch.equal(out[3], torch.zeros_like(out[3]))
    for b in (0, 1, 4):
        ref = msign_oracle(M[b])
        assert np.abs(as_float64(matfn.msign(M[b], steps="auto")) - ref).max() < 1e-4
        assert out[b].abs().max() > 0.1


def test_msign_tiny_input_is_normalised_whatever_eps():
    M = torch.randn(8, 12, generator=torch.Generator().manual_seed(3))
    ref = matfn.msign(M)
    for eps in (1e-7, 1e-3, 0.5):
        assert torch.equal(matfn.msign(_pow2(M, -60), eps=eps), ref)


def test_msign_autograd_through_rescale():
    M = torch.randn(6, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    G = torch.randn(6, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for s in (1.0, 2.0**-200, 2.0**200):
        Ms = (M * s).requires_grad_()
        (matfn.msign(Ms, steps="auto") * G).sum().backward()
        ref = msign_vjp_oracle(M, G) / s
        assert _rel(as_float64(Ms.grad), ref) <= 1e-8, s


# ---------------------------------------------------------------------------------------------
# mclip
# ---------------------------------------------------------------------------------------------


@settings(deadline=None, max_examples=30)
@given(
    case=matrices(dtypes=(torch.float64, torch.float32), max_side=12, max_cond=1e2, scales=None),
    frac=st.floats(-1, 1),
    ratio=st.sampled_from([0.05, 0.3, 0.9, 2.0]),
    form=st.sampled_from(["F3", "F2", "svd"]),
    low=st.booleans(),
)
def test_mclip_bitwise_homogeneous_under_powers_of_two(case, frac, ratio, form, low):
    M = case.tensor()
    k = _normal_k(M, round(frac * POW2_RANGE[case.dtype]))
    beta = ratio * float(torch.linalg.matrix_norm(M.double(), 2).max())
    alpha = beta / 4 if low else 0.0
    ref = matfn.mclip(M, max_sv=beta, min_sv=alpha, form=form)
    s = 2.0**k
    out = matfn.mclip(_pow2(M, k), max_sv=beta * s, min_sv=alpha * s, form=form)
    assert torch.equal(out, _pow2(ref, k)), k


@settings(deadline=None, max_examples=30)
@given(
    case=CASES,
    k=st.integers(-DECADES[torch.float32], DECADES[torch.float32]),
    ratio=st.sampled_from([0.05, 0.3, 0.9]),
)
def test_mclip_float32_decades_match_oracle(case, k, ratio):
    s = 10.0**k
    A = case.array()
    M = (torch.from_numpy(A) * s).to(torch.float32)
    beta = ratio * float(np.linalg.norm(A.reshape(-1, *A.shape[-2:]), 2, axis=(-2, -1)).max()) * s
    ref = mclip_oracle(M, max_sv=beta)
    out = as_float64(matfn.mclip(M, max_sv=beta, steps="auto"))
    assert _rel(out, ref) <= 2e-3, (k, _rel(out, ref))
    # the exact path too
    assert _rel(as_float64(matfn.mclip(M, max_sv=beta, method="svd")), ref) <= 1e-5


def test_mclip_issue_examples():
    torch.manual_seed(0)
    M = torch.randn(16, 10)
    C = matfn.mclip(M, max_sv=2.0)
    for s in (1e-30, 1e-20, 1e-7, 1e9, 1e20, 1e30):
        Cs = matfn.mclip(M * s, max_sv=2.0 * s)
        assert float((Cs / s - C).norm() / C.norm()) < 1e-5, s
    # max_sv above σ_max: M itself, exactly
    B = M / torch.linalg.matrix_norm(M, 2) * 4
    for beta in (1e8, 1e30, math.inf, float(torch.linalg.matrix_norm(B)) * 1.01):
        assert torch.equal(matfn.mclip(B, max_sv=beta), B), beta
        assert torch.equal(matfn.mclip(B, max_sv=beta, form="dilation", steps=10), B), beta
    lifted = matfn.mclip(B, max_sv=math.inf, min_sv=1.0, method="svd")
    np.testing.assert_allclose(
        as_float64(lifted), mclip_oracle(B, max_sv=math.inf, min_sv=1.0), atol=1e-5
    )


def test_mclip_batch_keeps_the_ones_below_beta():
    torch.manual_seed(4)
    M = torch.randn(3, 8, 5)
    M[1] *= 1e-3  # σ_max ≪ β: returned exactly, while the others are clipped
    out = matfn.mclip(M, max_sv=1.0)
    assert torch.equal(out[1], M[1])
    assert float(torch.linalg.matrix_norm(out[0], 2)) < 1.02


# ---------------------------------------------------------------------------------------------
# derivative
# ---------------------------------------------------------------------------------------------


@settings(deadline=None, max_examples=25)
@given(
    case=matrices(dtypes=(torch.float64, torch.float32), max_side=10, max_cond=1e2, scales=None),
    frac_m=st.floats(-1, 1),
    frac_g=st.floats(-1, 1),
)
def test_vjp_bitwise_homogeneous_under_powers_of_two(case, frac_m, frac_g):
    M = case.tensor()
    G = torch.from_numpy(MatrixCase(case.shape, seed=case.seed + 1).array()).to(case.dtype)
    km = _normal_k(M, round(frac_m * POW2_RANGE[case.dtype] / 2))
    kg = _normal_k(G, round(frac_g * POW2_RANGE[case.dtype] / 2))
    ref = matfn.msign_vjp(M, G)
    out = matfn.msign_vjp(_pow2(M, km), _pow2(G, kg))
    assert torch.equal(out, _pow2(ref, kg - km)), (km, kg)


@settings(deadline=None, max_examples=25)
@given(case=CASES, k=st.integers(-DECADES[torch.float32], DECADES[torch.float32]))
def test_vjp_float32_decades_match_oracle(case, k):
    s = 10.0**k
    M = (torch.from_numpy(case.array()) * s).to(torch.float32)
    G = torch.from_numpy(MatrixCase(case.shape, seed=case.seed + 1).array()).float()
    ref = msign_vjp_oracle(M, G)
    out = matfn.msign_vjp(M, G)
    assert torch.isfinite(out).all()
    assert _rel(as_float64(out), ref) <= 1e-3, (k, _rel(as_float64(out), ref))
    jvp = matfn.msign_jvp(M, G, method="svd")
    assert _rel(as_float64(jvp), ref) <= 1e-3


def test_vjp_issue_example():
    torch.manual_seed(0)
    M, G = torch.randn(16, 10), torch.randn(16, 10)
    ref = matfn.msign_vjp(M, G)
    for s in (1e-30, 1e-20, 1e20, 1e30):
        out = matfn.msign_vjp(M * s, G)
        assert float((out * s - ref).norm() / ref.norm()) < 1e-4, s


# ---------------------------------------------------------------------------------------------
# steps="auto" on rank-deficient input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_auto_rank_one_float32_keeps_the_null_space(seed):
    gen = torch.Generator().manual_seed(seed)
    u, v = torch.randn(16, 1, generator=gen), torch.randn(10, 1, generator=gen)
    M = u @ v.T
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        X = matfn.msign(M, steps="auto")
    ref = (u / u.norm()) @ (v / v.norm()).T
    assert (X - ref).abs().max() <= 1e-3
    assert torch.linalg.svdvals(X)[1] <= 1e-3


# ---------------------------------------------------------------------------------------------
# the normalisation itself
# ---------------------------------------------------------------------------------------------


def test_normalize_overflowed_norm_gives_nan_not_zeros():
    X = torch.randn(2, 4, 6) * 1e20
    assert torch.isnan(path.normalize(X, 1.01, 1e-7, torch.float32)).all()
    norms = torch.tensor([math.inf, 1.0])
    out = path.normalize_by(torch.ones(2, 3, 3), norms, 1.0, 1e-7, torch.float32)
    assert torch.isnan(out[0]).all() and torch.equal(out[1], torch.ones(3, 3))
