"""Gradients through the Triton forward (TRITON_INTERPRET=1 on CPU, set by conftest).

With the kernels forced on, ``tri_inv`` / ``tri_solve`` on float32 inputs that need grads run
the launchers in the forward and, for the transposed solves, in the backward; the gradients must
match autograd through the dense float64 ``T`` to float32 accuracy.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(
    bool(os.environ.get("MATFN_TEST_ON_GPU")), reason="needs TRITON_INTERPRET=1 (CPU tensors)"
)

import matfn.triangular as tri  # noqa: E402
from matfn.triangular import inverse, solve  # noqa: E402
from tests.fakes import spy_on  # noqa: E402


def test_gradients_through_the_kernel_forward(monkeypatch):
    calls = []
    monkeypatch.setattr(tri.paths, "use_triton", lambda *t: True)
    spy_on(monkeypatch, inverse, "tri_inv_triton", calls)
    spy_on(monkeypatch, solve, "tri_solve_triton", calls)
    g = torch.Generator().manual_seed(0)
    B, n, d, e = 2, 70, 4, 3
    K = torch.nn.functional.normalize(torch.randn(B, n, d, generator=g), dim=-1)
    Q = 0.5 * torch.randn(B, n, d, generator=g) / d**0.5
    V = torch.randn(B, n, e, generator=g)
    lam = 0.5 + torch.rand(B, n, generator=g)
    xs = [x.requires_grad_() for x in (Q, K, V, lam)]
    X = tri.tri_solve(*xs, chunk_size=16)
    Y = tri.tri_inv(xs[0], xs[1], xs[3], chunk_size=16)
    assert calls == ["tri_solve_triton", "tri_inv_triton"]
    wx = torch.randn(X.shape, generator=g)
    wy = torch.randn(Y.shape, generator=g)
    got = torch.autograd.grad((X * wx).sum() + (Y * wy).sum(), xs)
    # the backward's transposed solves: one for tri_solve (dV = T⁻ᵀ dX), two for tri_inv
    assert calls[2:] and set(calls[2:]) == {"tri_solve_triton"} and len(calls) == 5, calls

    x64 = [x.detach().double().requires_grad_() for x in xs]
    T = torch.diag_embed(x64[3]) + torch.tril(x64[0] @ x64[1].mT, -1)
    Xd = torch.linalg.solve_triangular(T, x64[2], upper=False)
    Yd = torch.linalg.solve_triangular(
        T, torch.eye(n, dtype=torch.float64).expand(B, n, n), upper=False
    )
    want = torch.autograd.grad((Xd * wx).sum() + (Yd * wy).sum(), x64)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float32
        assert ((a.double() - b).norm() / b.norm()).item() < 1e-5
