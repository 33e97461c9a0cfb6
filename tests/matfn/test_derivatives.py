"""msign_jvp / msign_vjp / differentiable msign against the float64 SVD formula and differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import matfn
from matfn.oracles import msign_jvp_oracle, msign_oracle, msign_vjp_oracle
from tests.strategies import MatrixCase, matrices


def _direction(case: MatrixCase, salt: int = 1) -> np.ndarray:
    return np.random.default_rng(case.seed + salt).standard_normal(case.shape)


def _rel(x: torch.Tensor | np.ndarray, ref: np.ndarray) -> float:
    x = x.detach().double().numpy() if isinstance(x, torch.Tensor) else x
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-300))


def _inner(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() * b.double()).sum())


# Relative error against the SVD formula per unit of σ₁/σ_min (the derivative's own condition
# number): float64 measured ≤ 2e-17·cond + 1e-14, float32 ≤ 1e-8·cond + 5e-6 (the msign and
# Lyapunov iterations converge to ~1e-6 in float32); ~10-50× margin.
def _tol(dtype: torch.dtype, cond: float) -> float:
    return 1e-12 + 1e-15 * cond if dtype == torch.float64 else 5e-5 + 2e-7 * cond


full_rank = matrices(max_side=24, max_cond=1e4, scales=(1e-6, 1e6), max_batch=2)


@given(full_rank, st.sampled_from(["auto", "sylvester", "svd"]))
def test_jvp_and_vjp_match_svd_formula(case: MatrixCase, method: str) -> None:
    M = case.tensor()
    D = torch.from_numpy(_direction(case)).to(case.dtype)
    jvp = matfn.msign_jvp(M, D, method=method)
    vjp = matfn.msign_vjp(M, D, method=method)
    assert jvp.shape == M.shape and jvp.dtype == case.dtype
    tol = _tol(case.dtype, case.cond)
    # Oracles of the dtype-rounded M (still full rank: σ_min/σ₁ ≥ 1e-4 ≫ ε₃₂).
    assert _rel(jvp, msign_jvp_oracle(M, D)) <= tol
    assert _rel(vjp, msign_vjp_oracle(M, D)) <= tol


@given(matrices(dtypes=(torch.float64,), max_side=12, max_cond=1e2, scales=(1e-3, 1e3)))
def test_jvp_matches_central_differences(case: MatrixCase) -> None:
    M = case.tensor()
    D = torch.from_numpy(_direction(case))
    # One step per matrix: batches mix scales (batch_spread), and a step sized for the largest
    # matrix is a large perturbation of a small one.
    h = 1e-6 * torch.linalg.matrix_norm(M, keepdim=True) / torch.linalg.matrix_norm(D, keepdim=True)
    fd = (msign_oracle(M + h * D) - msign_oracle(M - h * D)) / (2 * h.numpy())
    # Central differences: truncation ~h²/σ_min², rounding ~ε₆₄/(h/σ_min) ≈ 1e-10·cond.
    assert _rel(matfn.msign_jvp(M, D), fd) <= 1e-7 * case.cond


@given(
    matrices(dtypes=(torch.float64,), max_side=16, max_cond=1e2, rank_deficient=True, max_batch=2),
    st.sampled_from(["auto", "svd"]),
)
def test_rank_deficient_pseudo_inverse_convention(case: MatrixCase, method: str) -> None:
    A = case.array()
    M = torch.from_numpy(A)
    r = case.effective_rank
    U, _, Vh = np.linalg.svd(A, full_matrices=True)
    rng = np.random.default_rng(case.seed)
    # Rank-preserving direction U_r K Vᵀ + U K' V_rᵀ: there msign is differentiable and the
    # formula is its derivative (docs/math.md §4.4); finite differences are meaningless elsewhere.
    K1 = rng.standard_normal((*case.batch, r, case.m))
    K2 = rng.standard_normal((*case.batch, case.n, r))
    D = U[..., :, :r] @ K1 @ Vh + U @ K2 @ Vh[..., :r, :]
    D = torch.from_numpy(D)
    tol = 1e-12 * case.cond + 1e-12
    assert _rel(matfn.msign_jvp(M, D, method=method), msign_jvp_oracle(A, D)) <= tol
    # VJP with a general cotangent: the pseudo-inverse convention (null–null block 0).
    G = torch.from_numpy(_direction(case, 2))
    assert _rel(matfn.msign_vjp(M, G, method=method), msign_vjp_oracle(A, G)) <= tol
    if r < case.k:
        with pytest.raises(ValueError, match="rank-deficient"):
            matfn.msign_jvp(M, D, method="sylvester")


def test_float32_rank_deficient_uses_float32_rank_cutoff() -> None:
    case = MatrixCase((10, 14), torch.float32, cond=10.0, rank=4, seed=5)
    M = case.tensor()  # its zero singular values are now ~1e-7·σ₁, below max(n, m)·ε₃₂·σ₁
    D = torch.from_numpy(_direction(case)).float()
    ref = msign_vjp_oracle(case.array(), D)  # the exactly rank-4 matrix's derivative
    assert _rel(matfn.msign_vjp(M, D), ref) <= 1e-4


@given(matrices(max_side=16, max_cond=1e3, scales=(1e-3, 1e3), max_batch=2))
def test_invariants(case: MatrixCase) -> None:
    M = case.tensor()
    D1 = torch.from_numpy(_direction(case, 1)).to(case.dtype)
    D2 = torch.from_numpy(_direction(case, 2)).to(case.dtype)
    tol = 50 * _tol(case.dtype, case.cond)
    J1, J2 = matfn.msign_jvp(M, D1), matfn.msign_jvp(M, D2)
    scale = float(torch.linalg.matrix_norm(J1.double()).max()) + 1e-300
    # Linearity.
    J12 = matfn.msign_jvp(M, 2 * D1 - 3 * D2)
    assert float((J12 - (2 * J1 - 3 * J2)).abs().max()) <= tol * 5 * scale
    # Scale invariance of msign: J_M[M] = 0, and J_{cM}[D] = J_M[D]/c.
    assert float(matfn.msign_jvp(M, M).abs().max()) <= tol * scale
    torch.testing.assert_close(matfn.msign_jvp(4 * M, D1), J1 / 4, rtol=tol, atol=tol * scale / 4)
    # Adjointness ⟨VJP[G], D⟩ = ⟨G, JVP[D]⟩.
    lhs, rhs = _inner(matfn.msign_vjp(M, D2), D1), _inner(D2, J1)
    bound = tol * float(D1.double().norm() * D2.double().norm()) * scale
    assert abs(lhs - rhs) <= bound / max(float(D1.double().norm()), 1e-300)
    # Tangent space of the Stiefel manifold: Oᵀ dO skew (tall/square), dO Oᵀ skew (wide).
    O = torch.from_numpy(msign_oracle(M)).to(case.dtype)
    S = O.mT @ J1 if case.n >= case.m else J1 @ O.mT
    assert float((S + S.mT).abs().max()) <= tol * 10 * scale


def test_sylvester_route_equals_spec_sylvester_form() -> None:
    # Spec §4.1: solve (M Oᵀ) X + X (Oᵀ M) = G with scipy, ∇_M = X − O Xᵀ O (square full rank).
    from scipy.linalg import solve_sylvester

    case = MatrixCase((9, 9), torch.float64, cond=30.0, seed=11)
    A = case.array()
    G = _direction(case)
    O = msign_oracle(A)
    X = solve_sylvester(A @ O.T, O.T @ A, G)
    expected = X - O @ X.T @ O
    got = matfn.msign_vjp(torch.from_numpy(A), torch.from_numpy(G), method="sylvester")
    assert _rel(got, expected) <= 1e-11


# torch's forward-AD set-up (make_dual) scripts its decompositions with the deprecated jit.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("shape", [(4, 4), (3, 6), (6, 3), (2, 3, 4)], ids=str)
@pytest.mark.parametrize("kw", [{"method": "svd"}, {"steps": "auto"}], ids=["svd", "auto"])
def test_gradcheck(shape: tuple[int, ...], kw: dict) -> None:
    g = torch.Generator().manual_seed(sum(shape))
    M = torch.randn(shape, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: matfn.msign(x, **kw), (M,), check_forward_ad=True)


def test_backward_is_exact_derivative_not_unrolled() -> None:
    case = MatrixCase((2, 12, 20), torch.float64, cond=1e2, seed=3)
    M = case.tensor().requires_grad_()
    G = torch.from_numpy(_direction(case))
    (matfn.msign(M) * G).sum().backward()  # default 5-step forward
    assert M.grad is not None
    assert _rel(M.grad, msign_vjp_oracle(case.array(), G)) <= 1e-10
    # Double backward is refused clearly.
    M2 = case.tensor().requires_grad_()
    loss = (matfn.msign(M2) ** 2 * G).sum()  # the cotangent 2·O∘G depends on M2
    (gM,) = torch.autograd.grad(loss, M2, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gM.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_backward_dtypes_and_no_grad_path(dtype: torch.dtype) -> None:
    case = MatrixCase((8, 5), torch.float64, cond=10.0, seed=2)
    M = case.tensor().to(dtype).requires_grad_()
    O = matfn.msign(M)
    assert O.grad_fn is not None
    O.sum().backward()
    assert M.grad is not None and M.grad.dtype == dtype
    ref = msign_vjp_oracle(M.detach(), np.ones(case.shape))
    assert _rel(M.grad, ref) <= (1e-5 if dtype == torch.float32 else 2e-2)
    with torch.no_grad():
        assert matfn.msign(M).grad_fn is None


def test_zero_empty_and_not_mutated() -> None:
    Z = torch.zeros(3, 4, dtype=torch.float64)
    D = torch.ones(3, 4, dtype=torch.float64)
    assert torch.equal(matfn.msign_jvp(Z, D), torch.zeros_like(Z))
    assert torch.equal(matfn.msign_vjp(Z, D), torch.zeros_like(Z))
    E = torch.zeros(2, 0, 4)
    assert matfn.msign_jvp(E, E).shape == (2, 0, 4)
    Er = torch.zeros(0, 3, 3, requires_grad=True)
    matfn.msign(Er).sum().backward()
    assert Er.grad is not None and Er.grad.shape == (0, 3, 3)
    M = torch.randn(3, 5, dtype=torch.float64).mT  # non-contiguous
    G = torch.ones(4, 5, dtype=torch.float64)[:3].mT  # non-contiguous too
    M0, G0 = M.clone(), G.clone()
    matfn.msign_vjp(M, G)
    assert torch.equal(M, M0) and torch.equal(G, G0)


def test_broadcast_direction_and_batch_equals_loop() -> None:
    case = MatrixCase((3, 6, 4), torch.float64, cond=10.0, seed=9)
    M = case.tensor()
    D = torch.from_numpy(_direction(case)[0])
    J = matfn.msign_jvp(M, D)
    for i in range(3):
        torch.testing.assert_close(J[i], matfn.msign_jvp(M[i], D))


@pytest.mark.parametrize(
    ("M", "D", "kw", "error", "match"),
    [
        (torch.ones(3), torch.ones(3), {}, ValueError, "`M` must have at least"),
        (torch.ones(3, 4), torch.ones(4, 3), {}, ValueError, "`dM` must have the shape"),
        (torch.ones(3, 4), torch.ones(2, 3, 4), {}, ValueError, "`dM` must have the shape"),
        (torch.ones(3, 4, dtype=torch.int32), torch.ones(3, 4), {}, TypeError, "`M`"),
        (torch.ones(3, 4), torch.full((3, 4), float("inf")), {}, ValueError, "`dM` contains"),
        (torch.ones(3, 4), torch.ones(3, 4), {"method": "eig"}, ValueError, "`method`"),
        (
            torch.ones(3, 4),
            torch.ones(3, 4),
            {"compute_dtype": torch.float16},
            ValueError,
            "`compute_dtype`",
        ),
    ],
    ids=["1d", "shape", "batch", "int", "inf", "method", "compute_dtype"],
)
def test_bad_inputs(M: torch.Tensor, D: torch.Tensor, kw: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        matfn.msign_jvp(M, D, **kw)
    with pytest.raises(error, match=match.replace("dM", "G")):
        matfn.msign_vjp(M, D, **kw)


@given(matrices(dtypes=(torch.float32,), max_side=32, max_cond=1e3, scales=None, max_batch=2))
def test_sigma_min_estimate_is_a_lower_bound(case: MatrixCase) -> None:
    # It sets the schedules' lower bound: an overestimate would cost polishing steps (or the
    # SVD fallback), an underestimate only a few extra steps.
    from matfn.derivatives import _sigma_min_estimate

    M = case.tensor().reshape(-1, case.n, case.m)
    M = M.mT if case.n > case.m else M
    M = M / torch.linalg.matrix_norm(M, keepdim=True)
    est = _sigma_min_estimate(M)
    true = float(torch.linalg.svdvals(M.double()).min())
    assert est is not None and 0 < est <= true
    assert est >= true / 1e3  # and not uselessly small
