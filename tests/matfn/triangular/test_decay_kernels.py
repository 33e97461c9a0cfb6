"""The decayed Triton kernels (:mod:`matfn.triangular.decay`) against float64 oracles.

On CPU tensors in Triton's interpreter (TRITON_INTERPRET=1, set by the root conftest) or, on a
GPU run of the suite (``MATFN_TEST_ON_GPU=1``), compiled on CUDA tensors; a test that would
need the other one skips. Oracles: the float64 torch forms
(:func:`~matfn.triangular.reference.tri_solve_decay_chunked_torch`,
:func:`~matfn.triangular.reference.causal_product_decay_torch`, which test_decay.py and the
product test below check against dense definitions to 1e-14), and float64 autograd.

Tolerance 1e-5 relative (Frobenius): the kernels are fp32 throughout with fp32-accurate
tensor-core products and exponents formed as float64 differences, and land at 1–3e-7 on these
unit-key, β ∈ (0, 1) cases; a wrong sub-block, decay factor or state step is 1e-3 or more.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

import matfn.triangular as tri  # noqa: E402
from matfn.triangular import decay, reference  # noqa: E402
from matfn.triangular.config import TRI_DECAY_CONFIG, TriDecayConfig, decay_config  # noqa: E402
from tests.fakes import spy_on  # noqa: E402

DEVICE = "cuda" if os.environ.get("MATFN_TEST_ON_GPU") else "cpu"
RTOL = 1e-5
F64 = torch.float64


@pytest.fixture(autouse=True)
def _kernels_run_here():
    if (DEVICE == "cuda") == bool(os.environ.get("TRITON_INTERPRET")):
        pytest.skip("the interpreter runs on CPU tensors, a compiled kernel on CUDA ones")


def make(B, n, d, e, *, per_channel, strength=1.0, seed=0):
    """DeltaNet-like float64 operands: unit keys, ``Q = β K``, ``λ ∈ [½, 1½)``, ``ℓ = −U(0, s)``."""
    g = torch.Generator().manual_seed(seed)
    K = torch.nn.functional.normalize(torch.randn(B, n, d, generator=g, dtype=F64), dim=-1)
    Q = torch.rand(B, n, 1, generator=g, dtype=F64) * K
    V = torch.randn(B, n, e, generator=g, dtype=F64)
    lam = 0.5 + torch.rand(B, n, generator=g, dtype=F64)
    L = -strength * torch.rand(B, n, d if per_channel else 1, generator=g, dtype=F64)
    return Q, K, V, lam, L


def run(x: torch.Tensor) -> torch.Tensor:
    return x.to(device=DEVICE, dtype=torch.float32)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double().cpu() - b).norm() / b.norm().clamp_min(1e-300)).item()


def config(C: int) -> TriDecayConfig:
    return dataclasses.replace(TRI_DECAY_CONFIG, chunk_size=C, block_s=min(16, C))


CASES = [  # (B, n, d, e, C): ragged last chunks, d and e below, at and off the tiles
    (2, 70, 8, 5, 16),
    (1, 100, 20, 3, 32),
    (2, 130, 16, 17, 64),
    (1, 64, 33, 40, 64),
]


@pytest.mark.parametrize("per_channel", [False, True], ids=["gdn", "kda"])
@pytest.mark.parametrize(("B", "n", "d", "e", "C"), CASES)
def test_solve_matches_float64(B, n, d, e, C, per_channel):
    Q, K, V, lam, L = make(B, n, d, e, per_channel=per_channel)
    X = decay.tri_solve_decay_triton(*map(run, (Q, K, V, lam)), run(L), config=config(C))
    want = reference.tri_solve_decay_chunked_torch(Q, K, V, lam, L, 16)
    assert rel(X, want) < RTOL


@pytest.mark.parametrize("per_channel", [False, True], ids=["gdn", "kda"])
@pytest.mark.parametrize(("B", "n", "d", "e", "C"), CASES)
def test_causal_product_matches_dense(B, n, d, e, C, per_channel):
    g = torch.Generator().manual_seed(1)
    A, Bm = torch.randn(2, B, n, e, generator=g, dtype=F64)
    W = torch.randn(B, n, d, generator=g, dtype=F64)
    L = -torch.rand(B, n, d if per_channel else 1, generator=g, dtype=F64)
    G = L.cumsum(1)
    below = torch.ones(n, n, dtype=torch.bool).tril(-1)
    E = torch.where(below[..., None], G[:, :, None] - G[:, None], -torch.inf).exp()
    dense = torch.einsum("bie,bje,bjc,bijc->bic", A, Bm, W, E)
    torch_form = reference.causal_product_decay_torch(A, Bm, W, L, 16)
    assert rel(torch_form, dense) < 1e-13
    O = decay.causal_product_decay_triton(run(A), run(Bm), run(W), run(L), config=config(C))
    assert rel(O, dense) < RTOL


@pytest.mark.parametrize("per_channel", [False, True], ids=["gdn", "kda"])
def test_strong_decay_stays_finite_and_accurate(per_channel):
    """ℓ ≈ −30 per row: ``exp(±G)`` alone overflows float32 after 3 rows; chunk-relative
    exponents keep every factor ≤ 1, so the kernels match float64 as for weak decays."""
    Q, K, V, lam, L = make(2, 150, 12, 6, per_channel=per_channel, strength=30.0, seed=3)
    L[:, 40:60] = 0.0  # a stretch without decay right after strong decays: no cancellation
    X = decay.tri_solve_decay_triton(*map(run, (Q, K, V, lam)), run(L))
    assert rel(X, reference.tri_solve_decay_chunked_torch(Q, K, V, lam, L, 32)) < RTOL
    O = decay.causal_product_decay_triton(run(V), run(V.flip(1)), run(K), run(L))
    assert rel(O, reference.causal_product_decay_torch(V, V.flip(1), K, L, 32)) < RTOL


@settings(max_examples=12, deadline=None)
@given(
    n=st.integers(1, 140),
    d=st.integers(1, 40),
    e=st.integers(1, 24),
    C=st.sampled_from([16, 32, 64]),
    per_channel=st.booleans(),
    strength=st.sampled_from([0.0, 1e-3, 0.5, 4.0, 40.0]),
    zero_keys=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_against_float64(n, d, e, C, per_channel, strength, zero_keys, seed):
    """Any shape, decay strength (none to total) and zero keys: ≤ 1e-5 of the float64 forms."""
    Q, K, V, lam, L = make(1, n, d, e, per_channel=per_channel, strength=strength, seed=seed)
    if zero_keys:
        K[:, ::3] = 0.0
    X = decay.tri_solve_decay_triton(*map(run, (Q, K, V, lam)), run(L), config=config(C))
    assert rel(X, reference.tri_solve_decay_chunked_torch(Q, K, V, lam, L, C)) < RTOL
    O = decay.causal_product_decay_triton(run(V), run(V), run(K), run(L), config=config(C))
    want = reference.causal_product_decay_torch(V, V, K, L, C)
    if want.norm() > 0:
        assert rel(O, want) < RTOL
    else:
        assert not O.any()


@pytest.mark.parametrize("per_channel", [False, True], ids=["gdn", "kda"])
def test_public_calls_and_gradients_run_the_kernels(monkeypatch, per_channel):
    """``tri_solve`` / ``tri_inv`` with ``log_decay`` on float32: forward and backward through
    the kernels (the transposed solve and both causal products), against float64 autograd."""
    calls = []
    monkeypatch.setattr(tri.paths, "use_triton", lambda *t: True)
    spy_on(monkeypatch, decay, "tri_solve_decay_triton", calls)
    spy_on(monkeypatch, decay, "causal_product_decay_triton", calls)
    Q, K, V, lam, L = make(2, 90, 6, 4, per_channel=per_channel, seed=4)
    L = L if per_channel else L[..., 0]
    xs = [run(x).requires_grad_() for x in (Q, K, V, lam, L)]
    # eager launches: a graph-replayed call runs the op twice on first use (run, then capture)
    X = tri.tri_solve(*xs[:4], log_decay=xs[4], chunk_size=32, cuda_graph=False)
    assert calls == ["tri_solve_decay_triton"]
    dX = torch.randn(X.shape, generator=torch.Generator().manual_seed(5)).to(X)
    got = torch.autograd.grad(X, xs, dX)
    assert calls[1:] == ["tri_solve_decay_triton"] + ["causal_product_decay_triton"] * 2
    x64 = [x.detach().double().cpu().requires_grad_() for x in xs]
    X64 = tri.tri_solve(x64[0], x64[1], x64[2], x64[3], log_decay=x64[4])
    want = torch.autograd.grad(X64, x64, dX.double().cpu())
    assert rel(X, X64.detach()) < RTOL
    for a, b in zip(got, want, strict=True):
        assert rel(a, b) < RTOL

    Y = tri.tri_inv(xs[0], xs[1], xs[3], log_decay=xs[4], chunk_size=32, cuda_graph=False)
    Y64 = tri.tri_inv(x64[0], x64[1], x64[3], log_decay=x64[4])
    assert rel(Y, Y64.detach()) < RTOL
    dY = torch.randn(Y.shape, generator=torch.Generator().manual_seed(6)).to(Y)
    got = torch.autograd.grad(Y, [xs[i] for i in (0, 1, 3, 4)], dY)
    want = torch.autograd.grad(Y64, [x64[i] for i in (0, 1, 3, 4)], dY.double().cpu())
    for a, b in zip(got, want, strict=True):
        assert rel(a, b) < RTOL


@pytest.mark.skipif(DEVICE != "cuda", reason="n = 4096 needs a compiled kernel")
@pytest.mark.parametrize("per_channel", [False, True], ids=["gdn", "kda"])
def test_n4096_matches_float64(per_channel):
    """The issue's case: n = 4096, d = e = 128, where folding the decay into Q, K overflows.

    Oracle: the dense system for a per-row decay; the float64 chunked form per channel (the
    dense ``n×n×d`` factors would take 17 GB), which matches it to 1e-14 above.
    """
    Q, K, V, _, L = make(1, 4096, 128, 128, per_channel=per_channel, seed=7)
    Q, K, V, L = (x.cuda() for x in (Q, K, V, L))
    lam = torch.ones(Q.shape[:-1], dtype=F64, device="cuda")
    if per_channel:
        want = reference.tri_solve_decay_chunked_torch(Q, K, V, lam, L, 64)
    else:
        T = reference.decay_dense_torch(Q, K, lam, L)
        want = torch.linalg.solve_triangular(T, V, upper=False)
    X = tri.tri_solve(run(Q), run(K), run(V), log_decay=run(L if per_channel else L[..., 0]))
    assert rel(X, want.cpu()) < RTOL


def test_launchers_reject_bad_operands():
    Q, K, V, lam, L = (run(x) for x in make(1, 20, 4, 3, per_channel=False))
    with pytest.raises(ValueError, match="float32 Q"):
        decay.tri_solve_decay_triton(Q.double(), K, V, lam, L)
    with pytest.raises(ValueError, match="log_decay"):
        decay.tri_solve_decay_triton(Q, K, V, lam, L.expand(1, 20, 2))
    with pytest.raises(ValueError, match="d ≤ 128"):
        big = run(torch.zeros(1, 20, 130))
        decay.tri_solve_decay_triton(big, big, V, lam, L)
    with pytest.raises(ValueError, match="e ≤ 128"):
        wide = run(torch.zeros(1, 20, 130))
        decay.causal_product_decay_triton(wide, wide, Q, L)


def test_decay_config():
    assert decay_config(64) is TRI_DECAY_CONFIG
    assert decay_config(20).chunk_size == 32 and decay_config(1).chunk_size == 16
    with pytest.raises(ValueError, match="slab"):
        TriDecayConfig(slab=48)
