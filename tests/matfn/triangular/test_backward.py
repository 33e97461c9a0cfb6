"""Gradients of tri_inv / tri_solve (docs/math.md §5.6): gradcheck and dense float64 oracles.

The oracle differentiates the dense ``T = Λ + tril(Q Kᵀ, −1)`` through
``torch.linalg.solve_triangular`` in float64; the structured backward must agree to rounding.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck

import matfn
from matfn.triangular import backward as bwd
from matfn.triangular import reference as ref

F64 = torch.float64


def _inputs(batch, n, d, e, seed, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    Q = torch.randn((*batch, n, d), generator=g, dtype=F64) / d**0.5
    K = torch.nn.functional.normalize(torch.randn((*batch, n, d), generator=g, dtype=F64), dim=-1)
    V = torch.randn((*batch, n, e), generator=g, dtype=F64)
    sign = torch.where(torch.rand((*batch, n), generator=g) < 0.5, -1.0, 1.0).double()
    lam = sign * (0.5 + torch.rand((*batch, n), generator=g, dtype=F64))
    return [x.to(dtype).requires_grad_() for x in (Q, K, V, lam)]


def _dense_T(Q, K, lam):
    return torch.diag_embed(lam) + torch.tril(Q @ K.mT, -1)


def _grads(out, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out.shape, generator=g, dtype=out.dtype)
    return torch.autograd.grad(out, inputs, w, allow_unused=True)


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize(("n", "chunk_size"), [(65, 16), (65, 32), (130, 32)])
def test_gradcheck_tri_solve(n, chunk_size):
    Q, K, V, lam = _inputs((2,), n, 3, 2, seed=n + chunk_size)
    fn = lambda Q, K, V, lam: matfn.tri_solve(Q, K, V, lam, chunk_size=chunk_size)  # noqa: E731
    assert gradcheck(fn, (Q, K, V, lam), fast_mode=True)


@pytest.mark.parametrize(("n", "chunk_size"), [(65, 16), (130, 32)])
def test_gradcheck_tri_inv(n, chunk_size):
    Q, K, _, lam = _inputs((2,), n, 3, 1, seed=n)
    fn = lambda Q, K, lam: matfn.tri_inv(Q, K, lam, chunk_size=chunk_size)  # noqa: E731
    assert gradcheck(fn, (Q, K, lam), fast_mode=True)


@pytest.mark.parametrize("diag", [None, 2.0, "tensor"])
def test_gradcheck_scalar_and_none_diag(diag):
    """Full (not fast-mode) gradcheck on a small case across 3 chunks."""
    Q, K, V, lam = _inputs((), 24, 2, 2, seed=3)
    dg = lam if diag == "tensor" else diag
    fn = lambda Q, K, V: matfn.tri_solve(Q, K, V, dg, chunk_size=8)  # noqa: E731
    assert gradcheck(fn, (Q, K, V))


@settings(max_examples=8, deadline=None)
@given(
    n=st.integers(1, 150),
    d=st.integers(1, 6),
    e=st.integers(1, 5),
    chunk=st.sampled_from([1, 7, 16, 64]),
    seed=st.integers(0, 10**6),
)
def test_grads_match_dense_autograd(n, d, e, chunk, seed):
    Q, K, V, lam = _inputs((2,), n, d, e, seed)
    X = matfn.tri_solve(Q, K, V, lam, chunk_size=chunk)
    assert X.grad_fn is not None and "matfn_tri_solve" in type(X.grad_fn).__name__
    got = _grads(X, (Q, K, V, lam))
    Xd = torch.linalg.solve_triangular(_dense_T(Q, K, lam), V, upper=False)
    want = _grads(Xd, (Q, K, V, lam))
    for a, b in zip(got, want, strict=True):
        assert _rel(a, b) < 1e-11
    Y = matfn.tri_inv(Q, K, lam, chunk_size=chunk)
    got = _grads(Y, (Q, K, lam))
    eye = torch.eye(n, dtype=F64).expand(2, n, n)
    want = _grads(torch.linalg.solve_triangular(_dense_T(Q, K, lam), eye, upper=False), (Q, K, lam))
    for a, b in zip(got, want, strict=True):
        assert _rel(a, b) < 1e-11


def test_issue_repro_no_inplace_error():
    """The issue's failures: grads through Q at n = 65 (solve) and n = 200 (inverse)."""
    Q, K, V, _ = _inputs((), 200, 4, 3, seed=0)
    matfn.tri_solve(Q[:65], K[:65].detach(), V[:65].detach()).sum().backward()
    assert Q.grad is not None and torch.isfinite(Q.grad).all()
    matfn.tri_inv(Q, K).sum().backward()
    assert K.grad is not None and torch.isfinite(K.grad).all()


def test_partial_requires_grad_matches_full():
    Q, K, V, lam = _inputs((3,), 50, 4, 2, seed=5)
    full = _grads(matfn.tri_solve(Q, K, V, lam, chunk_size=16), (Q, K, V, lam))
    for i, x in enumerate((Q, K, V, lam)):
        args = [y.detach() if y is not x else y for y in (Q, K, V, lam)]
        (g,) = _grads(matfn.tri_solve(*args, chunk_size=16), (x,))
        torch.testing.assert_close(g, full[i], rtol=0, atol=0)


def test_broadcast_diag_and_dtypes():
    """``diag`` of shape (n,) for a batch gets the summed gradient; grads keep input dtypes."""
    Q, K, V, lam = _inputs((2, 3), 33, 3, 2, seed=7)
    lam1 = lam[0, 0].detach().clone().requires_grad_()
    Q32 = Q.detach().float().requires_grad_()
    X = matfn.tri_solve(Q32, K, V, lam1, chunk_size=8)
    assert X.dtype == F64
    gq, gl = _grads(X, (Q32, lam1))
    assert gq.dtype == torch.float32 and gl.shape == lam1.shape
    Xd = torch.linalg.solve_triangular(
        _dense_T(Q32.double(), K, lam1.expand(2, 3, 33)), V, upper=False
    )
    wq, wl = _grads(Xd, (Q32, lam1))
    assert _rel(gq, wq) < 1e-6 and _rel(gl, wl) < 1e-11


def test_half_inputs_grads():
    Q, K, V, lam = _inputs((2,), 40, 4, 3, seed=11)
    Qh = Q.detach().to(torch.bfloat16).requires_grad_()
    X = matfn.tri_solve(Qh, K.detach().to(torch.bfloat16), V.detach().to(torch.bfloat16))
    assert X.dtype == torch.bfloat16
    (g,) = _grads(X, (Qh,))
    assert g.dtype == torch.bfloat16 and torch.isfinite(g.float()).all()


def test_no_grad_path_is_unwrapped():
    """Without recorded grads the forward is the plain path: no autograd node, same bits."""
    Q, K, V, lam = (x.detach() for x in _inputs((2,), 70, 3, 2, seed=2))
    X = matfn.tri_solve(Q, K, V, lam, chunk_size=16)
    assert X.grad_fn is None
    torch.testing.assert_close(X, ref.tri_solve_chunked_torch(Q, K, V, lam, 16), rtol=0, atol=0)
    Qg = Q.clone().requires_grad_()
    with torch.no_grad():
        assert matfn.tri_solve(Qg, K, V, lam).grad_fn is None
        assert matfn.tri_inv(Qg, K, lam).grad_fn is None
    Xg = matfn.tri_solve(Qg, K, V, lam, chunk_size=16)
    torch.testing.assert_close(Xg.detach(), X, rtol=0, atol=0)


def test_causal_products_and_transposed_solve():
    g = torch.Generator().manual_seed(0)
    dV, Z = torch.randn(2, 2, 77, 3, generator=g, dtype=F64)
    Q, K = torch.randn(2, 2, 77, 5, generator=g, dtype=F64)
    P = torch.tril(dV @ Z.mT, -1)
    for C in (1, 16, 77, 128):
        PK, PtQ = bwd.causal_products(dV, Z, Q, K, C)
        torch.testing.assert_close(PK, P @ K)
        torch.testing.assert_close(PtQ, P.mT @ Q)
    Q, K, V, lam = (x.detach() for x in _inputs((2,), 77, 3, 4, seed=1))
    want = torch.linalg.solve_triangular(_dense_T(Q, K, lam).mT, V, upper=True)
    torch.testing.assert_close(bwd.solve_transposed(Q, K, V, lam, 16), want)


def test_tri_inv_backward_ignores_upper_part_of_dY():
    Q, K, _, lam = (x.detach() for x in _inputs((1,), 50, 3, 1, seed=4))
    dY = torch.randn(1, 50, 50, dtype=F64)
    a = bwd.tri_inv_backward(Q, K, lam, dY, 16, (True, True, True, False))
    b = bwd.tri_inv_backward(Q, K, lam, torch.tril(dY), 16, (True, True, True, False))
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
