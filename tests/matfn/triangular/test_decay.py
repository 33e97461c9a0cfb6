"""Decayed systems ``T_ij = λ_i δ_ij + [i > j] Σ_c Q_ic K_jc exp(G_ic − G_jc)`` (docs/math.md §5.6).

The oracle builds ``T`` densely from its definition in float64 with pairwise exponents
(:func:`matfn.triangular.reference.decay_dense_torch`) and solves it with
``torch.linalg.solve_triangular``; gradients are compared with autograd through that dense form.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck

import matfn
from matfn.triangular import reference as ref

F64 = torch.float64


def _case(batch, n, d, e, per_channel, seed, strength=0.3):
    """DeltaNet-like inputs: unit keys, ``Q = β K`` with ``β ∈ (0, 1)``, ``ℓ ∈ (−2s, 0)``."""
    g = torch.Generator().manual_seed(seed)
    K = torch.nn.functional.normalize(torch.randn((*batch, n, d), generator=g, dtype=F64), dim=-1)
    Q = torch.rand((*batch, n, 1), generator=g, dtype=F64) * K
    V = torch.randn((*batch, n, e), generator=g, dtype=F64)
    lam = 0.5 + torch.rand((*batch, n), generator=g, dtype=F64)
    shape = (*batch, n, d) if per_channel else (*batch, n)
    ld = -2 * strength * torch.rand(shape, generator=g, dtype=F64)
    return Q, K, V, lam, ld


def _dense(Q, K, lam, ld):
    """Dense decayed ``T`` with batch dims, from the flattened oracle."""
    n, d = Q.shape[-2:]
    L = ld if ld.shape == Q.shape else ld.expand(Q.shape[:-1]).unsqueeze(-1)
    T = ref.decay_dense_torch(
        Q.reshape(-1, n, d), K.reshape(-1, n, d), lam.reshape(-1, n), L.reshape(-1, n, L.shape[-1])
    )
    return T.reshape(*Q.shape[:-2], n, n)


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 16, 64])
def test_matches_dense_float64(per_channel, chunk_size):
    Q, K, V, lam, ld = _case((2, 3), 100, 5, 3, per_channel, seed=chunk_size)
    T = _dense(Q, K, lam, ld)
    X = matfn.tri_solve(Q, K, V, lam, log_decay=ld, chunk_size=chunk_size)
    assert _rel(X, torch.linalg.solve_triangular(T, V, upper=False)) < 1e-13
    Y = matfn.tri_inv(Q, K, lam, log_decay=ld, chunk_size=chunk_size)
    assert torch.equal(Y, torch.tril(Y))
    eye = torch.eye(100, dtype=F64)
    assert _rel(Y, torch.linalg.solve_triangular(T, eye.expand_as(T), upper=False)) < 1e-13


def test_zero_decay_is_the_undecayed_system():
    Q, K, V, lam, _ = _case((2,), 70, 4, 2, False, seed=1)
    for ld in (torch.zeros(2, 70, dtype=F64), torch.zeros(2, 70, 4, dtype=F64)):
        X = matfn.tri_solve(Q, K, V, lam, log_decay=ld, chunk_size=16)
        torch.testing.assert_close(X, matfn.tri_solve(Q, K, V, lam, chunk_size=16))


def test_per_row_equals_per_channel_with_equal_channels():
    Q, K, V, lam, ld = _case((2,), 90, 3, 2, False, seed=2)
    a = matfn.tri_solve(Q, K, V, lam, log_decay=ld, chunk_size=32)
    b = matfn.tri_solve(Q, K, V, lam, log_decay=ld[..., None].expand(2, 90, 3), chunk_size=32)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    ("n", "d", "per_channel", "batch"),
    [(512, 16, False, 2), (512, 8, True, 2), (1024, 8, True, 1), (4096, 16, False, 1)],
)
def test_strong_decay_float32(n, d, per_channel, batch):
    """ℓ ≈ −5 per row: |G| reaches 5 n, yet float32 stays within 1e-5 of float64.

    Folding ``exp(±G)`` into ``Q`` and ``K`` (the naive form) overflows float32 for contrast.
    """
    Q, K, V, lam, ld = _case((batch,), n, d, 4, per_channel, seed=n, strength=5.0)
    T = _dense(Q, K, lam, ld)
    want = torch.linalg.solve_triangular(T, V, upper=False)
    f = [x.float() for x in (Q, K, V, lam, ld)]
    X = matfn.tri_solve(*f[:4], log_decay=f[4])
    assert X.dtype == torch.float32
    assert _rel(X.double(), want) < 1e-5
    G = f[4].cumsum(-1 if not per_channel else -2)
    G = G if per_channel else G[..., None]
    assert not torch.isfinite(f[1] * torch.exp(-G)).all()  # the naive K ⊘ e^G overflows
    if n <= 512:
        Y = matfn.tri_inv(*f[:2], f[3], log_decay=f[4])
        eye = torch.eye(n, dtype=F64).expand_as(T)
        assert _rel(Y.double(), torch.linalg.solve_triangular(T, eye, upper=False)) < 1e-5


@pytest.mark.parametrize("per_channel", [False, True])
def test_gradcheck(per_channel):
    Q, K, V, lam, ld = (x.requires_grad_() for x in _case((2,), 65, 3, 2, per_channel, seed=3))
    fs = lambda *a: matfn.tri_solve(*a[:4], log_decay=a[4], chunk_size=16)  # noqa: E731
    assert gradcheck(fs, (Q, K, V, lam, ld), fast_mode=True)
    fi = lambda *a: matfn.tri_inv(*a[:3], log_decay=a[3], chunk_size=32)  # noqa: E731
    assert gradcheck(fi, (Q, K, lam, ld), fast_mode=True)


@settings(max_examples=10, deadline=None)
@given(
    n=st.integers(1, 130),
    d=st.integers(1, 5),
    per_channel=st.booleans(),
    chunk=st.sampled_from([1, 5, 16, 32]),
    seed=st.integers(0, 10**6),
)
def test_grads_match_dense_autograd(n, d, per_channel, chunk, seed):
    """Every gradient, ``ℓ`` included, equals autograd through the dense float64 ``T``."""
    inputs = [x.requires_grad_() for x in _case((2,), n, d, 2, per_channel, seed, strength=1.0)]
    Q, K, V, lam, ld = inputs
    X = matfn.tri_solve(Q, K, V, lam, log_decay=ld, chunk_size=chunk)
    Xd = torch.linalg.solve_triangular(_dense(Q, K, lam, ld), V, upper=False)
    torch.testing.assert_close(X, Xd)
    w = torch.randn(X.shape, dtype=F64, generator=torch.Generator().manual_seed(seed))
    got = torch.autograd.grad(X, inputs, w)
    want = torch.autograd.grad(Xd, inputs, w)
    for a, b in zip(got, want, strict=True):
        assert _rel(a, b) < 1e-11


def test_strong_decay_gradients_float32():
    """Gradients under strong decay (ℓ ≈ −5) stay finite and within 1e-4 of float64."""
    Q, K, V, lam, ld = _case((1,), 512, 8, 4, True, seed=9, strength=5.0)
    w = torch.randn(1, 512, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    grads = {}
    for dt in (F64, torch.float32):
        xs = [x.to(dt).requires_grad_() for x in (Q, K, V, lam, ld)]
        X = matfn.tri_solve(*xs[:4], log_decay=xs[4])
        grads[dt] = torch.autograd.grad(X, xs, w.to(dt))
    for a, b in zip(grads[torch.float32], grads[F64], strict=True):
        assert torch.isfinite(a).all()
        assert _rel(a.double(), b) < 1e-4


def test_cpu_float32_decay_path_on_half():
    Q, K, V, lam, ld = _case((2,), 64, 4, 2, True, seed=4)
    X = matfn.tri_solve(Q.half(), K.half(), V.half(), log_decay=ld.half())
    assert X.dtype == torch.float16
    want = matfn.tri_solve(Q.half().float(), K.half().float(), V.half().float(), log_decay=ld)
    assert _rel(X.double(), want.double()) < 1e-2


@pytest.mark.parametrize(
    ("ld", "exc", "match"),
    [
        (lambda: -torch.ones(10, 3, 4), ValueError, "log_decay"),
        (lambda: -torch.ones(2, 11), ValueError, "log_decay"),
        (lambda: -torch.ones(2, 10, 5), ValueError, "log_decay"),
        (lambda: torch.zeros(2, 10, dtype=torch.int64), TypeError, "log_decay"),
        (lambda: -1.0, TypeError, "log_decay"),
        (lambda: torch.full((2, 10), float("nan")), ValueError, "log_decay"),
    ],
)
def test_bad_log_decay(ld, exc, match):
    Q = torch.randn(2, 10, 4)
    with pytest.raises(exc, match=match):
        matfn.tri_solve(Q, Q, Q, log_decay=ld())
    with pytest.raises(exc, match=match):
        matfn.tri_inv(Q, Q, log_decay=ld())


def test_log_decay_broadcasts_over_batch():
    Q, K, V, lam, ld = _case((3,), 40, 4, 2, False, seed=6)
    X = matfn.tri_solve(Q, K, V, log_decay=ld[0])
    want = matfn.tri_solve(Q, K, V, log_decay=ld[0].expand(3, 40))
    torch.testing.assert_close(X, want, rtol=0, atol=0)
    ldc = -torch.rand(1, 40, 4, dtype=F64)
    X = matfn.tri_solve(Q, K, V, log_decay=ldc)
    torch.testing.assert_close(X, matfn.tri_solve(Q, K, V, log_decay=ldc.expand(3, 40, 4)))
