"""Triton triangular kernels (TRITON_INTERPRET=1 on CPU, set by conftest) vs the torch reference.

The launchers are called directly on CPU float32 tensors; outputs are poisoned with NaN first, so
an unwritten element fails. Reference: the row recursion ``_tri_inv_torch`` in float64.
Tolerance: relative Frobenius error ≤ 1e-5 — float32 forward substitution on these
well-conditioned cases (|q·k| ≤ 0.6, |λ| ≥ 0.5, κ_F(T) < 100) lands near 1e-7 (measured
0.5–3e-7), so a wrong tile or a missing level shows up as O(1).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from matfn import triangular as tri  # noqa: E402
from matfn.kernels.triangular import tri_inv_triton, tri_solve_triton  # noqa: E402

RTOL = 1e-5


def make(B, n, d, e, seed=0, deltanet=False):
    g = torch.Generator().manual_seed(seed)
    K = torch.nn.functional.normalize(torch.randn(B, n, d, generator=g), dim=-1)
    if deltanet:
        Q = K * torch.rand(B, n, 1, generator=g)
        lam = torch.ones(B, n)
    else:
        Q = 0.6 * torch.nn.functional.normalize(torch.randn(B, n, d, generator=g), dim=-1)
        lam = (0.5 + torch.rand(B, n, generator=g)) * torch.where(
            torch.rand(B, n, generator=g) < 0.4, -1.0, 1.0
        )
    V = torch.randn(B, n, e, generator=g)
    return Q, K, lam, V


def rel(a, b):
    assert torch.isfinite(a).all(), "unwritten (NaN-poisoned) or non-finite output"
    return ((a.double() - b).norm() / b.norm()).item()


# (B, n, d, e, chunk, block_s): sizes not divisible by the chunk, several levels / groups,
# d and e not powers of two, a single chunk, one row
CASES = [
    (2, 37, 5, 3, 16, 16),
    (1, 100, 20, 17, 16, 16),
    (2, 100, 7, 33, 32, 16),
    (1, 200, 3, 5, 64, 16),
    (3, 64, 16, 16, 64, 32),
    (1, 1, 1, 1, 16, 16),
    (2, 90, 9, 4, 32, 1),  # block_s = 1: the whole chunk inverse by doubling
    (1, 1, 1, 1, 16, 1),
]


@pytest.mark.parametrize(
    "B, n, d, e, chunk, bs",
    CASES,
    ids=[f"b{c[0]}-n{c[1]}-d{c[2]}-e{c[3]}-C{c[4]}-S{c[5]}" for c in CASES],
)
def test_kernels_match_reference(B, n, d, e, chunk, bs):
    Q, K, lam, V = make(B, n, d, e, seed=n)
    Yr = tri._tri_inv_torch(Q.double(), K.double(), lam.double())
    Xr = tri._tri_solve_torch(Q.double(), K.double(), V.double(), lam.double())
    Y = torch.full((B, n, n), float("nan"))
    tri_inv_triton(Q, K, lam, chunk_size=chunk, block_s=bs, out=Y)
    assert rel(Y, Yr) < RTOL
    assert torch.equal(torch.triu(Y, 1), torch.zeros_like(Y))
    X = torch.full((B, n, e), float("nan"))
    tri_solve_triton(Q, K, V, lam, chunk_size=chunk, block_s=bs, out=X)
    assert rel(X, Xr) < RTOL


@pytest.mark.parametrize("group_size", [1, 2, 5])
def test_solve_group_sizes(group_size):
    Q, K, lam, V = make(2, 90, 6, 20, seed=1)
    Xr = tri._tri_solve_torch(Q.double(), K.double(), V.double(), lam.double())
    X = tri_solve_triton(Q, K, V, lam, chunk_size=16, group_size=group_size)
    assert rel(X, Xr) < RTOL


def test_deltanet_batch_of_chunks_and_tf32x3_option():
    """The DeltaNet benchmark shape in miniature: many independent 64×64 chunks."""
    Q, K, lam, _ = make(5, 64, 32, 1, seed=3, deltanet=True)
    Yr = tri._tri_inv_torch(Q.double(), K.double(), lam.double())
    for prec in ("ieee", "tf32x3"):  # the interpreter computes both exactly in fp32
        Y = tri_inv_triton(Q, K, lam, chunk_size=64, precision=prec)
        assert rel(Y, Yr) < RTOL
        assert Y.abs().max() <= 1 + 1e-5


def test_public_api_dispatches_to_kernels(monkeypatch):
    """tri_inv / tri_solve route float32 batches to the launchers when kernels apply (forced
    here on CPU, where the interpreter runs them); leading dims are flattened and restored."""
    calls = []
    import matfn.kernels.triangular as kt

    def spy(fn):
        def wrapped(*args, **kwargs):
            calls.append(fn.__name__)
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(tri, "_use_kernels", lambda *t: True)
    monkeypatch.setattr(kt, "tri_inv_triton", spy(kt.tri_inv_triton))
    monkeypatch.setattr(kt, "tri_solve_triton", spy(kt.tri_solve_triton))
    Q, K, lam, V = make(6, 40, 4, 3, seed=4)
    Q, K, lam, V = Q.view(2, 3, 40, 4), K.view(2, 3, 40, 4), lam.view(2, 3, 40), V.view(2, 3, 40, 3)
    Y = tri.tri_inv(Q, K, lam, chunk_size=20)  # rounded to the kernel chunk 32
    X = tri.tri_solve(Q, K, V, lam)
    assert calls == ["tri_inv_triton", "tri_solve_triton"]
    Yr = tri._tri_inv_torch(
        Q.double().flatten(0, 1), K.double().flatten(0, 1), lam.double().flatten(0, 1)
    )
    assert Y.shape == (2, 3, 40, 40) and rel(Y.flatten(0, 1), Yr) < RTOL
    assert X.shape == (2, 3, 40, 3) and rel(X.flatten(0, 1), Yr @ V.double().flatten(0, 1)) < RTOL


def test_public_api_kernel_options():
    # one 64-row chunk: the blocked fp32 kernel; longer or smaller chunks: dense tf32x3
    assert tri._kernel_options(64, 64) == {
        "chunk_size": 64,
        "chunk_impl": "blocked",
        "precision": "ieee",
    }
    assert tri._kernel_options(65, 64)["chunk_impl"] == "dense"
    assert tri._kernel_options(40, 20) == {
        "chunk_size": 32,
        "chunk_impl": "dense",
        "precision": "tf32x3",
    }


def test_launcher_rejects_bad_arguments():
    Q, K, lam, V = make(1, 20, 4, 2)
    with pytest.raises(TypeError):
        tri_inv_triton(Q.double(), K, lam)
    with pytest.raises(ValueError, match="chunk_size"):
        tri_inv_triton(Q, K, lam, chunk_size=48)
    with pytest.raises(ValueError, match="precision"):
        tri_inv_triton(Q, K, lam, precision="tf32")
    with pytest.raises(ValueError, match="out"):
        tri_inv_triton(Q, K, lam, out=torch.empty(1, 20, 21))
    with pytest.raises(ValueError, match="d ≤ 128"):
        tri_solve_triton(torch.zeros(1, 20, 129), torch.zeros(1, 20, 129), V, lam)


# chunk_impl="blocked" (C = 64 on explicit 16×16 blocks): n not divisible by 64 (partial row
# blocks in the last chunk), one row, one chunk, several levels, d not a power of two (also
# d > BD = 64 for the d loop), batch > 1; make() gives negative and small (≥ 0.5) λ
BLOCKED_CASES = [
    (2, 37, 5, 3),
    (1, 100, 20, 17),
    (1, 200, 100, 5),
    (1, 1, 1, 1),
    (3, 64, 16, 16),
    (2, 128, 20, 40),
    (1, 300, 7, 2),
    (2, 17, 130, 9),
]


@pytest.mark.parametrize("prec", ["ieee", "tf32x3"])
@pytest.mark.parametrize(
    "B, n, d, e", BLOCKED_CASES, ids=[f"b{c[0]}-n{c[1]}-d{c[2]}-e{c[3]}" for c in BLOCKED_CASES]
)
def test_blocked_chunk_kernel_matches_reference(B, n, d, e, prec):
    Q, K, lam, V = make(B, n, d, e, seed=n + d)
    Yr = tri._tri_inv_torch(Q.double(), K.double(), lam.double())
    Y = torch.full((B, n, n), float("nan"))
    tri_inv_triton(Q, K, lam, chunk_size=64, precision=prec, chunk_impl="blocked", out=Y)
    assert rel(Y, Yr) < RTOL
    assert torch.equal(torch.triu(Y, 1), torch.zeros_like(Y))
    if d <= 128:  # the solve's limit
        Xr = tri._tri_solve_torch(Q.double(), K.double(), V.double(), lam.double())
        X = torch.full((B, n, e), float("nan"))
        tri_solve_triton(Q, K, V, lam, chunk_size=64, precision=prec, chunk_impl="blocked", out=X)
        assert rel(X, Xr) < RTOL


def test_blocked_matches_dense_on_deltanet_chunks():
    """Many independent 64×64 chunks (the DeltaNet shape in miniature): both chunk kernels agree."""
    Q, K, lam, V = make(5, 64, 32, 8, seed=3, deltanet=True)
    Yd = tri_inv_triton(Q, K, lam, chunk_impl="dense")
    Yb = tri_inv_triton(Q, K, lam, chunk_impl="blocked")
    Yr = tri._tri_inv_torch(Q.double(), K.double(), lam.double())
    assert rel(Yb, Yr) < RTOL and rel(Yb, Yd.double()) < RTOL
    Xb = tri_solve_triton(Q, K, V, lam, chunk_impl="blocked")
    assert rel(Xb, Yr @ V.double()) < RTOL


def test_bad_chunk_impl_rejected():
    Q, K, lam, V = make(1, 20, 4, 2)
    with pytest.raises(ValueError, match="chunk_impl"):
        tri_inv_triton(Q, K, lam, chunk_impl="fla")
    with pytest.raises(ValueError, match="chunk_impl"):
        tri_solve_triton(Q, K, V, lam, chunk_impl="Blocked")
    with pytest.raises(ValueError, match="chunk_impl"):
        tri_inv_triton(Q, K, lam, chunk_size=32, chunk_impl="blocked")
    with pytest.raises(ValueError, match="chunk_impl"):
        tri_solve_triton(Q, K, V, lam, chunk_size=16, chunk_impl="blocked")
