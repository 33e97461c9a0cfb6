"""tri_inv / tri_solve against scipy's dense triangular solves in float64 (docs/math.md §5).

Tolerances (Frobenius norms, ``u`` the unit roundoff of the compute dtype, ``κ = ‖T‖‖T⁻¹‖``):

* forward error ``‖Y − Y*‖/‖Y*‖ ≤ 4 u κ`` — the forward-substitution bound; over 300 random cases
  (n < 300, d < 40, |q·k| up to 5, λ down to 1e-3, both signs) the worst ratio measured was
  0.56 u κ in float32 and 0.31 u κ in float64, so 4 leaves a 7× margin while a wrong entry shows
  as an O(1) error;
* residuals ``‖T Y − I‖, ‖Y T − I‖ ≤ 4 n u ‖T‖‖Y‖`` (worst measured 1.2 n u), valid at any
  conditioning as long as nothing overflows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.linalg import solve_triangular

import matfn
from matfn.triangular import SingularTriangularError, tri_inv, tri_solve
from matfn.triangular import ops as tri_ops
from matfn.triangular import reference as ref

U = {torch.float64: 2.0**-53, torch.float32: 2.0**-24}
DIAG_KINDS = ("none", "scalar", "pos", "mixed", "tiny")


@dataclass(frozen=True)
class TriCase:
    """Parameters of one ``T = Λ + tril(Q Kᵀ, −1)``; rows of K are unit, rows of Q have norm
    ``scale`` (so |q_i·k_j| ≤ scale); ``diag`` picks Λ; all entries come from ``seed``."""

    batch: tuple[int, ...]
    n: int
    d: int
    e: int
    scale: float
    diag: str
    seed: int

    def __repr__(self) -> str:
        b = "x".join(map(str, self.batch)) or "1"
        return (
            f"TriCase(b{b}-n{self.n}-d{self.d}-e{self.e}-s{self.scale:.3g}-{self.diag}"
            f"-seed{self.seed})"
        )

    def build(self, dtype=torch.float64):
        g = torch.Generator().manual_seed(self.seed)
        shape = (*self.batch, self.n, self.d)
        K = torch.nn.functional.normalize(
            torch.randn(shape, generator=g, dtype=torch.float64), dim=-1
        )
        Q = self.scale * torch.nn.functional.normalize(
            torch.randn(shape, generator=g, dtype=torch.float64), dim=-1
        )
        V = torch.randn((*self.batch, self.n, self.e), generator=g, dtype=torch.float64)
        lead = (*self.batch, self.n)
        sign = torch.where(torch.rand(lead, generator=g) < 0.5, -1.0, 1.0).double()
        if self.diag == "none":
            lam, diag = torch.ones(lead, dtype=torch.float64), None
        elif self.diag == "scalar":
            lam, diag = torch.full(lead, -1.5, dtype=torch.float64), -1.5
        elif self.diag == "pos":
            lam = 0.5 + 1.5 * torch.rand(lead, generator=g, dtype=torch.float64)
            diag = lam.to(dtype)
        elif self.diag == "mixed":
            lam = sign * (0.5 + 1.5 * torch.rand(lead, generator=g, dtype=torch.float64))
            diag = lam.to(dtype)
        else:  # tiny |λ| down to 1e-3, both signs
            lam = sign * 10 ** (-3 * torch.rand(lead, generator=g, dtype=torch.float64))
            diag = lam.to(dtype)
        return Q.to(dtype), K.to(dtype), V.to(dtype), diag, lam


@st.composite
def tri_cases(draw, max_n=96, max_d=24, max_e=8, tiny=True):
    batch = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    n = draw(st.integers(1, max_n))
    d = draw(st.integers(1, max_d))
    e = draw(st.integers(1, max_e))
    scale = 10 ** draw(st.floats(-2, 0.5))
    kinds = DIAG_KINDS if tiny else DIAG_KINDS[:4]
    return TriCase(batch, n, d, e, scale, draw(st.sampled_from(kinds)), draw(st.integers(0, 999)))


def dense_T(Q, K, lam):
    return torch.diag_embed(lam) + torch.tril(Q.double() @ K.double().mT, -1)


def scipy_inv(T: torch.Tensor) -> np.ndarray:
    Tn = T.reshape(-1, *T.shape[-2:]).numpy()
    n = Tn.shape[-1]
    out = np.stack([solve_triangular(t, np.eye(n), lower=True) for t in Tn])
    return out.reshape(T.shape)


def scipy_solve(T: torch.Tensor, V: torch.Tensor) -> np.ndarray:
    Tn = T.reshape(-1, *T.shape[-2:]).numpy()
    Vn = V.double().reshape(-1, *V.shape[-2:]).numpy()
    X = [solve_triangular(t, v, lower=True) for t, v in zip(Tn, Vn, strict=True)]
    return np.stack(X).reshape(V.shape)


def fro(x) -> np.ndarray:
    return np.linalg.norm(np.asarray(x), axis=(-2, -1))


def check_forward(Y, Yx, T, u, what="T⁻¹"):
    """Per matrix: ‖Y − Y*‖ ≤ 4 u κ ‖Y*‖ with κ = ‖T‖‖Y*‖, ``Yx = Y* = T⁻¹`` (module docstring)."""
    Y = np.asarray(Y.double() if isinstance(Y, torch.Tensor) else Y)
    kappa = fro(T) * fro(Yx)
    err = fro(Y - Yx)
    bound = 4 * u * kappa * fro(Yx)
    assert np.all(err <= bound + 1e-300), f"{what}: error {err} > bound {bound} (κ = {kappa})"


def well_conditioned(lam: torch.Tensor) -> bool:
    return bool(lam.numel() == 0 or torch.isfinite(1 / lam).all())


# --------------------------------------------------------------------------------------------
# accuracy against scipy
# --------------------------------------------------------------------------------------------


@given(case=tri_cases())
def test_tri_inv_float64_matches_scipy(case: TriCase):
    Q, K, V, diag, lam = case.build(torch.float64)
    T = dense_T(Q, K, lam)
    Yx = scipy_inv(T)
    if not np.isfinite(Yx).all():  # T⁻¹ overflows float64: nothing to compare
        return
    Y = tri_inv(Q, K, diag)
    assert Y.shape == (*case.batch, case.n, case.n) and Y.dtype == torch.float64
    check_forward(Y, Yx, T, U[torch.float64])
    # exactly lower triangular, diag(Y) = 1/λ
    assert torch.equal(torch.triu(Y, 1), torch.zeros_like(Y))
    torch.testing.assert_close(torch.diagonal(Y, dim1=-2, dim2=-1), 1 / lam, rtol=4e-16, atol=0)
    # residuals Y T − I and T Y − I (normwise backward error)
    n, u = case.n, U[torch.float64]
    eye = torch.eye(n, dtype=torch.float64)
    scale = fro(T) * fro(Y) * 4 * n * u
    assert np.all(fro(Y @ T - eye) <= scale)
    assert np.all(fro(T @ Y - eye) <= scale)


@given(case=tri_cases())
def test_tri_solve_float64_matches_scipy_and_inverse(case: TriCase):
    Q, K, V, diag, lam = case.build(torch.float64)
    T = dense_T(Q, K, lam)
    Xx = scipy_solve(T, V)
    if not np.isfinite(Xx).all() or not np.isfinite(scipy_inv(T)).all():
        return
    X = tri_solve(Q, K, V, diag)
    assert X.shape == V.shape and X.dtype == torch.float64
    u = U[torch.float64]
    kappa = fro(T) * fro(scipy_inv(T))
    assert np.all(fro(X.numpy() - Xx) <= 4 * u * kappa * fro(Xx) + 1e-300)
    # tri_solve(V) = tri_inv @ V, to the same bound
    XY = tri_inv(Q, K, diag) @ V
    assert np.all(fro((X - XY).numpy()) <= 8 * u * kappa * fro(Xx) + 1e-300)


@given(case=tri_cases(tiny=True))
def test_float32_against_float64(case: TriCase):
    Q, K, V, diag, lam = case.build(torch.float32)
    T = dense_T(Q, K, lam.float().double())
    Yx = scipy_inv(T)
    if not np.isfinite(Yx).all():
        return
    Y = tri_inv(Q, K, diag)
    assert Y.dtype == torch.float32
    big = np.abs(Yx).max()
    if big > 2 * float(np.finfo(np.float32).max):  # beyond float32: Inf/NaN, not garbage
        assert not torch.isfinite(Y).all()
        return
    if big > 1e36:  # at float32's edge (max 3.4e38) overflow depends on rounding: either is right
        return
    check_forward(Y, Yx, T, U[torch.float32])
    X = tri_solve(Q, K, V, diag)
    Xx = scipy_solve(T, V)
    kappa = fro(T) * fro(Yx)
    assert np.all(fro(X.double().numpy() - Xx) <= 4 * U[torch.float32] * kappa * fro(Xx) + 1e-30)


@given(
    case=tri_cases(max_n=80, tiny=False),
    chunks=st.lists(st.integers(1, 80), min_size=2, max_size=3),
)
def test_chunk_size_invariance(case: TriCase, chunks: list[int]):
    Q, K, V, diag, lam = case.build(torch.float64)
    T = dense_T(Q, K, lam)
    kappa = fro(T) * fro(scipy_inv(T))
    Ys = [tri_inv(Q, K, diag, chunk_size=c) for c in chunks]
    Xs = [tri_solve(Q, K, V, diag, chunk_size=c) for c in chunks]
    u = U[torch.float64]
    for Y, X in zip(Ys[1:], Xs[1:], strict=True):
        assert np.all(fro((Y - Ys[0]).numpy()) <= 8 * u * kappa * fro(Ys[0]) + 1e-300)
        assert np.all(fro((X - Xs[0]).numpy()) <= 8 * u * kappa * fro(Xs[0]) + 1e-300)


@pytest.mark.parametrize("n, d, chunk", [(37, 5, 8), (64, 3, 16), (50, 12, 1)])
def test_row_recursion_reference(n, d, chunk):
    """The readable references (tri_inv_torch, tri_solve_torch) against scipy and the chunked
    forms."""
    case = TriCase((2,), n, d, 4, 0.7, "mixed", n)
    Q, K, V, _, lam = case.build()
    T = dense_T(Q, K, lam)
    Y = ref.tri_inv_torch(Q, K, lam)
    check_forward(Y, scipy_inv(T), T, U[torch.float64])
    X = ref.tri_solve_torch(Q, K, V, lam)
    np.testing.assert_allclose(X.numpy(), scipy_solve(T, V), rtol=0, atol=1e-12 * fro(X).max())
    torch.testing.assert_close(ref.tri_inv_chunked_torch(Q, K, lam, chunk), Y, rtol=0, atol=1e-13)
    torch.testing.assert_close(
        ref.tri_solve_chunked_torch(Q, K, V, lam, chunk), X, rtol=0, atol=1e-12
    )


@pytest.mark.slow
@pytest.mark.parametrize("n, d, dtype", [(2048, 256, torch.float64), (1500, 64, torch.float32)])
def test_large(n, d, dtype):
    case = TriCase((), n, d, 3, 0.3, "pos", 7)
    Q, K, V, diag, lam = case.build(dtype)
    T = dense_T(Q, K, lam.to(dtype).double())
    Yx = scipy_inv(T)
    check_forward(tri_inv(Q, K, diag), Yx, T, U[dtype])
    Xx = scipy_solve(T, V)
    X = tri_solve(Q, K, V, diag)
    kappa = fro(T) * fro(Yx)
    assert fro(X.double().numpy() - Xx) <= 4 * U[dtype] * kappa * fro(Xx)


# --------------------------------------------------------------------------------------------
# DeltaNet case, conditioning, growth
# --------------------------------------------------------------------------------------------


@settings(max_examples=15)
@given(
    n=st.integers(2, 300),
    d=st.integers(1, 64),
    seed=st.integers(0, 999),
    dtype=st.sampled_from([torch.float64, torch.float32]),
)
def test_deltanet_entries_bounded(n, d, seed, dtype):
    """Λ = I, Q = K, ‖k_i‖ ≤ 1 ⇒ every entry of T⁻¹ lies in [−1, 1] (products of contractions),
    and Y_ti = −k_iᵀ (I − k_{i+1}k_{i+1}ᵀ)…(I − k_{t−1}k_{t−1}ᵀ) k_t (docs/math.md §5.3)."""
    g = torch.Generator().manual_seed(seed)
    K = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    K = K * torch.rand(n, 1, generator=g, dtype=torch.float64) ** 0.25  # norms in (0, 1]
    Y = tri_inv(K.to(dtype), K.to(dtype))
    slack = 1e-12 if dtype == torch.float64 else 1e-5
    assert Y.abs().max() <= 1 + slack
    torch.testing.assert_close(torch.diagonal(Y), torch.ones(n, dtype=dtype))
    for _ in range(5):
        t = int(torch.randint(1, n, (1,), generator=g))
        i = int(torch.randint(0, t, (1,), generator=g))
        v = K[t].clone()
        for j in range(t - 1, i, -1):
            v = v - K[j] * (K[j] @ v)
        expect = -(K[i] @ v).item()
        assert abs(Y[t, i].item() - expect) <= (1e-12 if dtype == torch.float64 else 2e-5)


def test_growth_formula_and_overflow_is_reported():
    """d = 1, q_i k_j = a: Y_ij = −(a/λ)(1 − a/λ)^{i−j−1}/λ — ‖T⁻¹‖ grows like |1 − a/λ|^n."""
    n, a, lam = 40, 3.0, 1.0
    Q = torch.full((n, 1), a, dtype=torch.float64)
    K = torch.ones(n, 1, dtype=torch.float64)
    Y = tri_inv(Q, K, lam)
    i, j = torch.tril_indices(n, n, -1)
    expect = -(a / lam) * (1 - a / lam) ** (i - j - 1).double() / lam
    torch.testing.assert_close(Y[i, j], expect, rtol=1e-13, atol=0)
    # (−2)^200 overflows float32: the result must say so (Inf/NaN), not hide it
    Yf = tri_inv(torch.full((200, 1), a), torch.ones(200, 1), lam)
    assert not torch.isfinite(Yf).all()
    Xf = tri_solve(torch.full((200, 1), a), torch.ones(200, 1), torch.ones(200, 1), lam)
    assert not torch.isfinite(Xf).all()


# --------------------------------------------------------------------------------------------
# API behaviour: batch, diag forms, dtypes, layout, empty and zero inputs, no mutation
# --------------------------------------------------------------------------------------------


def test_batch_equals_loop_and_diag_broadcast():
    case = TriCase((2, 3), 21, 4, 5, 0.8, "pos", 3)
    Q, K, V, _, _ = case.build()
    diag = 0.5 + torch.rand(3, 21, dtype=torch.float64)  # broadcast over the first batch dim
    Y = tri_inv(Q, K, diag)
    X = tri_solve(Q, K, V, diag)
    for a in range(2):
        for b in range(3):
            torch.testing.assert_close(Y[a, b], tri_inv(Q[a, b], K[a, b], diag[b]))
            torch.testing.assert_close(X[a, b], tri_solve(Q[a, b], K[a, b], V[a, b], diag[b]))


@pytest.mark.parametrize("diag", [None, 2.0, -0.5, 3, "vec", "0d"])
def test_diag_forms(diag):
    Q, K, V, _, _ = TriCase((), 10, 3, 2, 0.5, "none", 1).build()
    if diag == "vec":
        diag = torch.linspace(-2, 2, 11, dtype=torch.float64)[torch.arange(11) != 5]
    elif diag == "0d":
        diag = torch.tensor(1.25, dtype=torch.float64)
    lam = (
        torch.ones(10, dtype=torch.float64)
        if diag is None
        else torch.as_tensor(diag, dtype=torch.float64).expand(10)
    )
    T = dense_T(Q, K, lam)
    np.testing.assert_allclose(tri_inv(Q, K, diag).numpy(), scipy_inv(T), rtol=0, atol=1e-13)
    np.testing.assert_allclose(tri_solve(Q, K, V, diag).numpy(), scipy_solve(T, V), atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_float32(dtype):
    Q, K, V, diag, lam = TriCase((2,), 30, 4, 3, 0.5, "pos", 2).build(dtype)
    Y = tri_inv(Q, K, diag)
    X = tri_solve(Q, K, V, diag)
    assert Y.dtype == dtype and X.dtype == dtype
    ref = tri_inv(Q.float(), K.float(), diag.float())
    torch.testing.assert_close(Y, ref.to(dtype), rtol=0, atol=0)  # exact: computed in fp32
    torch.testing.assert_close(
        X, tri_solve(Q.float(), K.float(), V.float(), diag.float()).to(dtype), rtol=0, atol=0
    )


def test_non_contiguous_and_no_mutation():
    Q, K, V, diag, _ = TriCase((3,), 25, 6, 4, 0.6, "mixed", 9).build()
    Qt = Q.mT.contiguous().mT  # non-contiguous view with the same values
    Kt = K[:, :, :].mT.contiguous().mT
    Vs = torch.cat([V, V], -1)[..., ::2]
    dexp = diag[:1].expand(3, 25)  # stride-0 batch
    copies = [t.clone() for t in (Qt, Kt, Vs, dexp)]
    Y = tri_inv(Qt, Kt, dexp)
    X = tri_solve(Qt, Kt, Vs, dexp)
    torch.testing.assert_close(Y, tri_inv(Q, K, diag[:1].expand(3, 25).contiguous()))
    torch.testing.assert_close(X, tri_solve(Q, K, Vs.contiguous(), dexp.contiguous()))
    for t, c in zip((Qt, Kt, Vs, dexp), copies, strict=True):
        assert torch.equal(t, c)


def test_zero_in_zero_out_and_empty():
    Q, K, V, diag, lam = TriCase((2,), 12, 3, 4, 0.6, "mixed", 4).build()
    assert torch.equal(tri_solve(Q, K, torch.zeros_like(V), diag), torch.zeros_like(V))
    Y0 = tri_inv(torch.zeros_like(Q), torch.zeros_like(K), diag)
    assert torch.equal(Y0, torch.diag_embed(1 / lam))
    # d = 0 (no low-rank part): T = Λ
    assert torch.equal(tri_inv(Q[..., :0], K[..., :0], diag), torch.diag_embed(1 / lam))
    assert tri_inv(Q[:, :0], K[:, :0]).shape == (2, 0, 0)
    assert tri_inv(Q[:0], K[:0]).shape == (0, 12, 12)
    assert tri_solve(Q, K, V[..., :0], diag).shape == (2, 12, 0)
    assert tri_solve(Q[:, :0], K[:, :0], V[:, :0]).shape == (2, 0, 4)
    assert tri_solve(Q[:0], K[:0], V[:0]).dtype == torch.float64


def test_exports():
    assert matfn.tri_inv is tri_inv and matfn.tri_solve is tri_solve


# --------------------------------------------------------------------------------------------
# bad inputs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["Q", "K", "V", "diag"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_raises(where, bad):
    Q, K, V, diag, _ = TriCase((), 8, 2, 2, 0.5, "pos", 0).build()
    args = dict(Q=Q.clone(), K=K.clone(), V=V.clone(), diag=diag.clone())
    args[where].view(-1)[3] = bad
    with pytest.raises(ValueError, match=f"`{where}`.*NaN or Inf"):
        tri_solve(args["Q"], args["K"], args["V"], args["diag"])
    if where != "V":
        with pytest.raises(ValueError, match=f"`{where}`.*NaN or Inf"):
            tri_inv(args["Q"], args["K"], args["diag"])


def test_zero_diagonal_names_index():
    Q, K, V, diag, _ = TriCase((2,), 9, 2, 2, 0.5, "pos", 0).build()
    diag[1, 6] = 0.0
    with pytest.raises(SingularTriangularError, match="index 6") as info:
        tri_inv(Q, K, diag)
    assert isinstance(info.value, ZeroDivisionError) and isinstance(info.value, ValueError)
    with pytest.raises(ZeroDivisionError, match=r"index 6 .*\(1, 6\)"):
        tri_solve(Q, K, V, diag)
    with pytest.raises(ValueError, match="index 0"):
        tri_inv(Q, K, 0.0)


@pytest.mark.parametrize("diag", [None, 2.0, -0.5, "tensor"])
def test_no_value_is_read_on_the_host_without_check_finite(monkeypatch, diag):
    """With check_finite=False no host sync (the one fetch of ``assert_all_finite``) remains,
    a tensor diagonal included, so the call can be captured in a CUDA graph; a number diagonal
    is still tested on the host (free)."""
    Q, K, V, lam, _ = TriCase((2,), 9, 2, 2, 0.5, "pos", 0).build()
    if diag == "tensor":
        diag = lam
    expect = tri_solve(Q, K, V, diag)
    expect_inv = tri_inv(Q, K, diag)

    def no_sync(*args, **kwargs):
        raise AssertionError("host sync")

    monkeypatch.setattr(tri_ops, "assert_all_finite", no_sync)
    out = tri_solve(Q, K, V, diag, check_finite=False)
    torch.testing.assert_close(out, expect, rtol=0, atol=0)
    torch.testing.assert_close(tri_inv(Q, K, diag, check_finite=False), expect_inv, rtol=0, atol=0)
    with pytest.raises(AssertionError, match="host sync"):  # check_finite=True syncs
        tri_inv(Q, K, torch.ones(9, dtype=Q.dtype))
    with pytest.raises(ValueError, match="`diag`.*NaN or Inf"):
        tri_inv(Q, K, math.inf)
    with pytest.raises(SingularTriangularError, match="index 0"):
        tri_inv(Q, K, 0.0, check_finite=False)


def test_zero_tensor_diagonal_unchecked_gives_inf():
    """Without check_finite a zero in a tensor ``diag`` is not looked for: ``1/0`` shows."""
    Q, K, V, lam, _ = TriCase((), 9, 2, 2, 0.5, "pos", 0).build()
    lam[4] = 0.0
    Y = tri_inv(Q, K, lam, check_finite=False)
    assert torch.isinf(Y[4, 4]) and torch.isfinite(Y[:4, :4]).all()
    X = tri_solve(Q, K, V, lam, check_finite=False)
    assert not torch.isfinite(X[4:]).all() and torch.isfinite(X[:4]).all()


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda Q, K, V: (Q[..., :1], K, V, None), ValueError, "`Q` and `K`.*same shape"),
        (lambda Q, K, V: (Q, K[:, :5], V, None), ValueError, "`Q` and `K`"),
        (lambda Q, K, V: (Q, K, V[:, :5], None), ValueError, "`V`.*batch dims and n"),
        (lambda Q, K, V: (Q, K, V[:1], None), ValueError, "`V`"),
        (lambda Q, K, V: (Q, K, V, torch.ones(7, dtype=torch.float64)), ValueError, "`diag`"),
        (lambda Q, K, V: (Q, K, V, torch.ones(3, 8, dtype=torch.float64)), ValueError, "`diag`"),
        (lambda Q, K, V: (Q[0, 0], K, V, None), ValueError, "`Q`.*at least 2"),
        (lambda Q, K, V: (Q.long(), K, V, None), TypeError, "`Q`.*floating"),
        (lambda Q, K, V: (Q, K.to(torch.complex128), V, None), TypeError, "`K`.*complex"),
        (lambda Q, K, V: (Q, K, V.bool(), None), TypeError, "`V`"),
        (lambda Q, K, V: (Q, K, V.to_sparse(), None), TypeError, "`V`.*dense"),
        (lambda Q, K, V: (Q.numpy(), K, V, None), TypeError, "`Q`.*torch.Tensor"),
        (lambda Q, K, V: (Q, K, V, torch.ones(8, dtype=torch.int64)), TypeError, "`diag`"),
        (lambda Q, K, V: (Q, K, V, "1"), TypeError, "`diag`"),
    ],
)
def test_bad_inputs(make, exc, match):
    Q, K, V, _, _ = TriCase((2,), 8, 3, 2, 0.5, "pos", 0).build()
    q, k, v, diag = make(Q, K, V)
    with pytest.raises(exc, match=match):
        tri_solve(q, k, v, diag)


@pytest.mark.parametrize("chunk", [0, -1, 2.5, True])
def test_bad_chunk_size(chunk):
    Q, K, _, _, _ = TriCase((), 8, 3, 2, 0.5, "pos", 0).build()
    with pytest.raises(ValueError, match="chunk_size"):
        tri_inv(Q, K, chunk_size=chunk)


def test_nan_check_can_be_skipped():
    Q, K, _, _, _ = TriCase((), 8, 3, 2, 0.5, "pos", 0).build()
    Q[5, 0] = math.nan
    Y = tri_inv(Q, K, check_finite=False)
    assert torch.isnan(Y[5:, :5]).all() and torch.isfinite(Y[:5]).all()
