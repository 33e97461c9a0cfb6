"""Grouped (mixed-shape, one launch) products and Newton–Schulz vs torch (Triton interpreter).

Tolerances: float32 products accumulate in float32 in a different order than torch's
(rtol 1e-5 at K ≤ 60); fp16 outputs are rounded once to fp16 (2⁻¹¹ relative, rtol 2e-3).
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from matfn.coefficients import schedule  # noqa: E402
from matfn.kernels.grouped import grouped_matmul, newton_schulz_grouped_launch  # noqa: E402
from matfn.msign import newton_schulz_torch, normalize  # noqa: E402

ON_GPU = bool(os.environ.get("MATFN_TEST_ON_GPU")) and torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3)}


def _operand(shape, transposed, gen, dtype):
    x = torch.randn(shape[::-1] if transposed else shape, generator=gen)
    x = x.mT if transposed else x  # a strided view, read in place
    return x.to(DEVICE, dtype)


@settings(deadline=None, max_examples=15)
@given(
    shapes=st.lists(
        st.tuples(st.integers(1, 40), st.integers(1, 40), st.integers(1, 60)),
        min_size=1,
        max_size=4,
    ),
    transposed=st.booleans(),
    with_d=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_grouped_matmul_matches_torch(shapes, transposed, with_d, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    As = [_operand((M, K), transposed, gen, dtype) for M, N, K in shapes]
    Bs = [_operand((K, N), not transposed, gen, dtype) for M, N, K in shapes]
    Ds = [_operand((M, N), False, gen, dtype) for M, N, K in shapes] if with_d else None
    alpha, beta, gamma = 0.7, (-1.3 if with_d else 0.0), 2.5
    before = [a.clone() for a in As]
    outs = grouped_matmul(As, Bs, Ds, alpha=alpha, beta=beta, gamma=gamma)
    for i, (A, B, C) in enumerate(zip(As, Bs, outs, strict=True)):
        ref = alpha * (A.double() @ B.double()) + gamma * torch.eye(*C.shape, dtype=torch.float64)
        if with_d:
            ref += beta * Ds[i].double()
        assert C.dtype == dtype and C.is_contiguous()
        torch.testing.assert_close(C.double(), ref.to(C.device), **TOL[dtype])
        assert torch.equal(A, before[i])


def test_grouped_matmul_rejects_bad_groups():
    A = torch.zeros(3, 4, device=DEVICE)
    with pytest.raises(ValueError, match="do not multiply"):
        grouped_matmul([A], [torch.zeros(5, 2, device=DEVICE)])
    with pytest.raises(ValueError, match="same length"):
        grouped_matmul([A], [])
    with pytest.raises(ValueError, match="2-D"):
        grouped_matmul([A[None]], [A.mT])
    assert grouped_matmul([], []) == []


@pytest.mark.parametrize("method,steps", [("polar_express", 5), ("cubic", 6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_newton_schulz_grouped_launch_matches_torch(method, steps, dtype):
    """Mixed shapes (square, wide, a row) in one launch per product = torch per matrix."""
    coeffs, factor = schedule(method, steps)
    gen = torch.Generator().manual_seed(3)
    Xs = [
        normalize(torch.randn(1, s, L, generator=gen), factor, 1e-7, torch.float32)[0]
        for s, L in [(12, 12), (9, 40), (12, 12), (1, 17), (20, 33)]
    ]
    outs = newton_schulz_grouped_launch([X.to(DEVICE, dtype) for X in Xs], coeffs)
    for X, out in zip(Xs, outs, strict=True):
        ref = newton_schulz_torch(X[None].double(), coeffs)[0]
        tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=0, atol=3e-2)
        torch.testing.assert_close(out.double().cpu(), ref, **tol)


def test_dispatch_grouped_launch(monkeypatch):
    """``newton_schulz_grouped`` takes the grouped kernel when switched on; same results."""
    from matfn.kernels import dispatch, grouped

    coeffs, factor = schedule("polar_express", 5)
    gen = torch.Generator().manual_seed(4)
    Xs = [
        normalize(torch.randn(1, s, L, generator=gen), factor, 1e-7, torch.float32)[0]
        for s, L in [(6, 20), (8, 8), (6, 20)]
    ]
    calls = {"n": 0}
    real = grouped.newton_schulz_grouped_launch

    def spy(*args):
        calls["n"] += 1
        return real(*args)

    monkeypatch.setattr(grouped, "newton_schulz_grouped_launch", spy)
    monkeypatch.setattr(dispatch, "use_triton", lambda *t: True)
    monkeypatch.setattr(dispatch, "_KERNEL_DTYPES", (torch.float32,))
    monkeypatch.setattr(dispatch, "GROUPED_LAUNCH", True)
    outs = dispatch.newton_schulz_grouped([X.to(DEVICE) for X in Xs], coeffs, "standard")
    assert calls["n"] == 1
    for X, out in zip(Xs, outs, strict=True):
        ref = newton_schulz_torch(X[None], coeffs)[0]
        torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=2e-5)
