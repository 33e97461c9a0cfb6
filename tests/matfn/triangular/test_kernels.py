"""Triton triangular kernels (TRITON_INTERPRET=1 on CPU, set by conftest) vs the torch reference.

The launchers are called directly on CPU float32 tensors; outputs are poisoned with NaN first, so
an unwritten element fails. Reference: the row recursion ``_tri_inv_torch`` in float64.
Tolerance: relative Frobenius error ≤ 1e-5 — float32 forward substitution on these
well-conditioned cases (|q·k| ≤ 0.6, |λ| ≥ 0.5, κ_F(T) < 100) lands near 1e-7 (measured
0.5–3e-7), so a wrong tile or a missing level shows up as O(1).
"""

from __future__ import annotations

import itertools
import types

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import matfn.kernels.triangular as kt  # noqa: E402
from matfn import triangular as tri  # noqa: E402
from matfn.kernels.triangular import tri_inv_triton, tri_solve_triton  # noqa: E402
from matfn.kernels.triangular_chunk import _tf32_split  # noqa: E402

RTOL = 1e-5
ALGORITHMS = ("scan", "tree")


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
    (2, 100, 7, 33, 32, 4),  # the solve's default: 4-row blocks, 3 doubling levels
    (1, 130, 6, 5, 64, 8),
    (2, 37, 5, 3, 16, 2),
    (1, 1, 1, 1, 16, 1),
    (1, 500, 12, 7, 16, 16),  # 32 chunks: 5 levels, Grams combined 3 times
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
    for algorithm in ALGORITHMS:
        X = torch.full((B, n, e), float("nan"))
        tri_solve_triton(Q, K, V, lam, algorithm=algorithm, chunk_size=chunk, block_s=bs, out=X)
        assert rel(X, Xr) < RTOL, algorithm


@pytest.mark.parametrize("scan_precision", ["ieee", "3xtf32"])
@pytest.mark.parametrize("group_size", [1, 2, 5])
def test_solve_group_sizes(group_size, scan_precision):
    Q, K, lam, V = make(2, 90, 6, 20, seed=1)
    Xr = tri._tri_solve_torch(Q.double(), K.double(), V.double(), lam.double())
    X = torch.full_like(V, float("nan"))
    tri_solve_triton(
        Q,
        K,
        V,
        lam,
        algorithm="scan",
        chunk_size=16,
        group_size=group_size,
        scan_precision=scan_precision,
        out=X,
    )
    assert rel(X, Xr) < RTOL


# the scan's settings: fused (flag- and sentinel-driven state and correction launches) or not,
# growing or equal groups, slices of the state, column tiles of the group kernel, state tiles;
# batch > 1 (flags and states per batch entry), d and e not powers of two
SCAN_CASES = [
    dict(),
    dict(scan_fused=False),
    dict(group_size=2),
    dict(group_size=2, scan_fused=False),
    dict(scan_ratio=0.5),
    dict(scan_ratio=4.0, scan_fused=False),
    dict(scan_slices=1, scan_block=32, state_block=16),
    dict(scan_slices=2, scan_warps=8, state_warps=4),
]


@pytest.mark.parametrize("opts", SCAN_CASES, ids=[str(c) for c in SCAN_CASES])
def test_scan_settings(opts):
    Q, K, lam, V = make(3, 150, 36, 21, seed=2)
    Xr = tri._tri_solve_torch(Q.double(), K.double(), V.double(), lam.double())
    X = torch.full_like(V, float("nan"))
    tri_solve_triton(Q, K, V, lam, algorithm="scan", chunk_size=16, out=X, **opts)
    assert rel(X, Xr) < RTOL


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_fused_scan_with_non_finite_values_ends(bad):
    """The fused scan's readers wait until no element of ``Z_g`` is the sentinel NaN: NaN and Inf
    reaching ``Z`` through arithmetic are other bit patterns, so the solve ends (non-finite
    results in that column, where products meet the bad value, not a hang)."""
    Q, K, lam, V = make(1, 150, 8, 6, seed=4)
    V[0, 3, 2] = bad
    X = tri_solve_triton(Q, K, V, lam, algorithm="scan", chunk_size=16)
    assert not torch.isfinite(X[0, 3:, 2]).any()
    assert torch.isfinite(X[..., [0, 1, 3, 4, 5]]).all()


@pytest.mark.parametrize("NC", [1, 2, 7, 64, 128, 1000])
@pytest.mark.parametrize("ratio", [0.5, 1.8, 4.0])
def test_chain_schedule(NC, ratio):
    """Growing groups cover every chunk once, in order, and the modelled end beats equal groups
    of the √-balanced size (the reason for growing them)."""
    S0, RNUM, RDEN = kt._chain_schedule(NC, ratio)
    starts = [kt._group_start_host(g, S0, RNUM, RDEN, NC) for g in range(NC + 2)]
    assert starts[0] == 0 and starts[-1] == NC
    sizes = [b - a for a, b in itertools.pairwise(starts) if b > a]
    assert sum(sizes) == NC and all(s >= 1 for s in sizes)
    assert sizes == kt._group_sizes(S0, RNUM, RDEN, NC)
    assert all(b >= a for a, b in itertools.pairwise(sizes[:-1]))  # the last may be cut short
    gs = max(1, round((NC * ratio) ** 0.5))
    equal = [min(gs, NC - i) for i in range(0, NC, gs)]
    assert kt._modelled_end(sizes, ratio) <= kt._modelled_end(equal, ratio)


@pytest.mark.parametrize("NC", [5, 64, 128, 1000])
@pytest.mark.parametrize("max_groups", [1, 3, 8])
def test_chain_schedule_max_groups(NC, max_groups):
    """With a cap (one group-kernel program per SM), the schedule still covers every chunk and
    has at most that many groups; no cap is never modelled later than a cap."""
    S0, RNUM, RDEN = kt._chain_schedule(NC, 2.5, max_groups)
    sizes = kt._group_sizes(S0, RNUM, RDEN, NC)
    assert sum(sizes) == NC and all(s >= 1 for s in sizes)
    assert len(sizes) <= max_groups
    free = kt._group_sizes(*kt._chain_schedule(NC, 2.5), NC)
    assert kt._modelled_end(free, 2.5) <= kt._modelled_end(sizes, 2.5)


def test_groups_per_wave(monkeypatch):
    """The cap: SMs // programs per group; 0 (the unfused scan) below MIN_GROUPS_PER_WAVE;
    None (no cap) off CUDA."""
    fake = types.SimpleNamespace(is_cuda=True, device=types.SimpleNamespace(index=0))
    monkeypatch.setattr(kt, "INTERPRET", False)
    monkeypatch.setattr(kt, "_sm_count", lambda index: 132)
    assert kt._groups_per_wave(fake, 16) == 8
    assert kt._groups_per_wave(fake, 32) == 0  # 4 groups: fewer than MIN_GROUPS_PER_WAVE
    assert kt._groups_per_wave(torch.zeros(1), 16) is None


def test_chunk_pass_initialises_scratch():
    """The chunk kernel's INIT: zeros, then SENTINEL, over a buffer split between programs."""
    Q, K, lam, V = make(1, 100, 8, 4)
    chunk = kt._chunk_kernel("dense", 16, 16, "3xtf32", 4)
    W = torch.empty(1, 100, 12)
    scratch = torch.full((5000,), 7, dtype=torch.int32)
    kt._chunk_pass(chunk, Q, K, lam, V=V, P=W[..., 4:], U=W, BE=32, scratch=(scratch, 64))
    assert torch.equal(scratch[:64], torch.zeros(64, dtype=torch.int32))
    assert (scratch[64:] == 0x7FC0DEAD).all()
    assert torch.isnan(scratch[64:].view(torch.float32)).all()


@triton.jit
def _group_start_kernel(out_ptr, S0, RNUM, RDEN, NC, N: tl.constexpr):
    g = tl.arange(0, N)
    tl.store(out_ptr + g, kt._group_start(g, S0, RNUM, RDEN, NC))


def test_group_start_matches_host():
    for S0, RNUM, RDEN, NC in [(3, 7, 4, 128), (1, 8, 4, 64), (16, 0, 1, 128), (2, 5, 4, 10)]:
        out = torch.empty(64, dtype=torch.int32)
        _group_start_kernel[(1,)](out, S0, RNUM, RDEN, NC, N=64)
        host = [kt._group_start_host(g, S0, RNUM, RDEN, NC) for g in range(64)]
        assert out.tolist() == host


@pytest.mark.parametrize("chunk_impl", ["dense", "blocked"])
def test_3xtf32_everywhere(chunk_impl):
    """The defaults, precision = scan_precision = "3xtf32" (the in-kernel hi/lo split), at C = 64
    on several levels and groups (the default scan tile there is 32 columns).

    The interpreter runs the tf32 products in fp32, so this checks the plumbing and the
    recombination; the split's accuracy is checked by the test_tf32_split_* tests below.
    """
    Q, K, lam, V = make(2, 300, 40, 24, seed=5)
    Yr = tri._tri_inv_torch(Q.double(), K.double(), lam.double())
    Y = torch.full((2, 300, 300), float("nan"))
    tri_inv_triton(Q, K, lam, chunk_size=64, chunk_impl=chunk_impl, out=Y)
    assert rel(Y, Yr) < RTOL
    for algorithm in ALGORITHMS:
        X = torch.full_like(V, float("nan"))
        tri_solve_triton(
            Q, K, V, lam, algorithm=algorithm, chunk_size=64, chunk_impl=chunk_impl, out=X
        )
        assert rel(X, Yr @ V.double()) < RTOL, algorithm


@triton.jit
def _split_kernel(x_ptr, hi_ptr, lo_ptr, N: tl.constexpr):
    r = tl.arange(0, N)
    hi, lo = _tf32_split(tl.load(x_ptr + r))
    tl.store(hi_ptr + r, hi)
    tl.store(lo_ptr + r, lo)


def _split_on_device(x):
    hi, lo = torch.empty_like(x), torch.empty_like(x)
    _split_kernel[(1,)](x, hi, lo, N=x.numel())
    return hi, lo


def _tf32(x):
    """Truncate float32 to tf32 (what a tensor core reads: 10 mantissa bits)."""
    return (x.view(torch.int32) & -8192).view(torch.float32)


def test_tf32_split_is_exact_and_tf32():
    """hi is a tf32 value, hi + lo == x exactly, |lo| ≤ 2⁻¹⁰ |x| (the 13 dropped bits)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, generator=g) * torch.logspace(-30, 30, 1024)
    x[:4] = torch.tensor([0.0, -0.0, 1.0, -3.0])
    hi, lo = _split_on_device(x)
    assert torch.equal(hi.view(torch.int32) & 8191, torch.zeros(1024, dtype=torch.int32))
    assert torch.equal(hi + lo, x)
    assert (lo.abs() <= 2.0**-10 * x.abs()).all()


def test_3xtf32_product_accuracy_with_tf32_inputs():
    """The three products of the split, each with its inputs truncated to tf32 as on a tensor
    core (emulated here, float64 accumulation), stay fp32-accurate; one tf32 product does not."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(64, 128, generator=g), torch.randn(128, 16, generator=g)
    ref = a.double() @ b.double()
    a_hi, a_lo = _split_on_device(a.flatten())
    b_hi, b_lo = _split_on_device(b.flatten())
    a_hi, a_lo = a_hi.view_as(a), a_lo.view_as(a)
    b_hi, b_lo = b_hi.view_as(b), b_lo.view_as(b)

    def mm(x, y):
        return _tf32(x).double() @ _tf32(y).double()

    three = mm(a_hi, b_lo) + mm(a_lo, b_hi) + mm(a_hi, b_hi)
    one = mm(a, b)
    err3 = ((three - ref).norm() / ref.norm()).item()
    err1 = ((one - ref).norm() / ref.norm()).item()
    assert err3 < 2e-6 < 1e-4 < err1


def test_deltanet_batch_of_chunks_and_tf32x3_option():
    """The DeltaNet benchmark shape in miniature: many independent 64×64 chunks."""
    Q, K, lam, _ = make(5, 64, 32, 1, seed=3, deltanet=True)
    Yr = tri._tri_inv_torch(Q.double(), K.double(), lam.double())
    for prec in ("ieee", "tf32x3", "tf32"):  # the interpreter computes all exactly in fp32
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
    # dense kernel, 3xtf32 dots; the inverse keeps C = 64, the solve takes at most 32
    assert tri._kernel_options("inv", 64) == {"chunk_size": 64, "precision": "3xtf32"}
    assert tri._kernel_options("solve", 64) == {"chunk_size": 32, "precision": "3xtf32"}
    assert tri._kernel_options("inv", 20)["chunk_size"] == 32
    assert tri._kernel_options("solve", 10)["chunk_size"] == 16


def test_launcher_rejects_bad_arguments():
    Q, K, lam, V = make(1, 20, 4, 2)
    with pytest.raises(TypeError):
        tri_inv_triton(Q.double(), K, lam)
    with pytest.raises(ValueError, match="chunk_size"):
        tri_inv_triton(Q, K, lam, chunk_size=48)
    with pytest.raises(ValueError, match="block_s"):
        tri_solve_triton(Q, K, V, lam, block_s=3)
    with pytest.raises(ValueError, match="precision"):
        tri_inv_triton(Q, K, lam, precision="fp32")
    with pytest.raises(ValueError, match="scan_precision"):
        tri_solve_triton(Q, K, V, lam, scan_precision="bf16")
    with pytest.raises(ValueError, match="scan_block"):
        tri_solve_triton(Q, K, V, lam, scan_block=8)
    with pytest.raises(ValueError, match="scan_slices"):
        tri_solve_triton(Q, K, V, lam, scan_slices=3)
    with pytest.raises(ValueError, match="state_block"):
        tri_solve_triton(Q, K, V, lam, state_block=8)
    with pytest.raises(ValueError, match="state_warps"):
        tri_solve_triton(Q, K, V, lam, state_warps=3)
    with pytest.raises(ValueError, match="scan_ratio"):
        tri_solve_triton(Q, K, V, lam, scan_ratio=0.0)
    with pytest.raises(ValueError, match="scan_slices"):
        tri_solve_triton(Q, K, V, lam, scan_slices=2)  # d = 4: one 16-row slice at most
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
        for algorithm in ALGORITHMS:
            X = torch.full((B, n, e), float("nan"))
            tri_solve_triton(
                Q, K, V, lam, algorithm=algorithm, chunk_size=64, precision=prec,
                chunk_impl="blocked", out=X,
            )  # fmt: skip
            assert rel(X, Xr) < RTOL, algorithm


def test_blocked_matches_dense_on_deltanet_chunks():
    """Many independent 64×64 chunks (the DeltaNet shape in miniature): both chunk kernels agree."""
    Q, K, lam, V = make(5, 64, 32, 8, seed=3, deltanet=True)
    Yd = tri_inv_triton(Q, K, lam, chunk_impl="dense")
    Yb = tri_inv_triton(Q, K, lam, chunk_impl="blocked")
    Yr = tri._tri_inv_torch(Q.double(), K.double(), lam.double())
    assert rel(Yb, Yr) < RTOL and rel(Yb, Yd.double()) < RTOL
    for algorithm in ALGORITHMS:
        Xb = tri_solve_triton(
            Q, K, V, lam, algorithm=algorithm, chunk_size=64, chunk_impl="blocked"
        )
        assert rel(Xb, Yr @ V.double()) < RTOL, algorithm


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


def test_solve_refuses_the_known_miscompiled_scan_shape():
    """64-row chunks, 16-column scan tiles, 8 warps and tensor-core dots: wrong on the H100 with
    Triton 3.6 (module docstring), so the launcher refuses it rather than return wrong values."""
    Q, K, lam, V = make(1, 130, 100, 8)
    scan = dict(algorithm="scan", chunk_size=64, scan_block=16)
    with pytest.raises(ValueError, match="scan_block=32 or scan_warps=4"):
        tri_solve_triton(Q, K, V, lam, scan_warps=8, **scan)
    X = tri_solve_triton(Q, K, V, lam, scan_warps=4, **scan)
    assert rel(X, tri._tri_solve_torch(Q.double(), K.double(), V.double(), lam.double())) < RTOL


# tree solve (algorithm="tree"): L = ⌈log₂(n/C)⌉ levels; n ≤ C (no level), n = C + 1 and
# C·2^k + 1 (a last block of one row, odd block counts, blocks without a partner on every
# level), n = C·2^k exactly, n not a multiple of C, B > 1, d and e not powers of two, e < d,
# e > d, d and e above the 64-wide d loop / 32-wide column tiles, d = e = 1
TREE_CASES = [
    (1, 16, 4, 3, 16),
    (2, 10, 5, 7, 16),
    (1, 17, 3, 2, 16),
    (2, 32, 6, 9, 16),
    (1, 33, 6, 9, 16),
    (1, 64, 20, 5, 16),
    (3, 65, 20, 5, 16),
    (1, 128, 12, 40, 16),
    (2, 129, 40, 12, 16),
    (1, 97, 1, 1, 16),
    (1, 256, 100, 70, 32),
    (1, 257, 24, 24, 32),
    (2, 300, 9, 130, 64),
    (1, 200, 128, 128, 64),
]


@pytest.mark.parametrize(
    "B, n, d, e, chunk",
    TREE_CASES,
    ids=[f"b{c[0]}-n{c[1]}-d{c[2]}-e{c[3]}-C{c[4]}" for c in TREE_CASES],
)
def test_tree_solve_matches_reference(B, n, d, e, chunk):
    Q, K, lam, V = make(B, n, d, e, seed=n + d)
    Xr = tri._tri_solve_torch(Q.double(), K.double(), V.double(), lam.double())
    X = torch.full((B, n, e), float("nan"))
    Xo = tri_solve_triton(Q, K, V, lam, algorithm="tree", chunk_size=chunk, out=X)
    assert Xo is X
    assert rel(X, Xr) < RTOL


@pytest.mark.parametrize("precision", ["ieee", "tf32x3", "3xtf32", "tf32"])
def test_tree_solve_precisions(precision):
    """Every dot mode (the interpreter runs them all in fp32: this checks the plumbing)."""
    Q, K, lam, V = make(2, 100, 36, 20, seed=7)
    Xr = tri._tri_solve_torch(Q.double(), K.double(), V.double(), lam.double())
    X = torch.full_like(V, float("nan"))
    tri_solve_triton(Q, K, V, lam, algorithm="tree", chunk_size=16, precision=precision, out=X)
    assert rel(X, Xr) < RTOL


@pytest.mark.parametrize(
    "rows, cols, gram, warps", [(16, 16, 16, 4), (64, 64, 64, 8), (16, 64, 32, 2), (64, 32, 16, 1)]
)
def test_tree_solve_tiles(rows, cols, gram, warps):
    """The tile knobs: row tiles smaller / larger than the chunk (up to 2C), column tiles
    narrower / wider than e = 40 and d = 50, Gram-combine tiles of all sizes."""
    Q, K, lam, V = make(1, 130, 50, 40, seed=8)  # 5 chunks: 3 levels, one block unpaired
    Xr = tri._tri_solve_torch(Q.double(), K.double(), V.double(), lam.double())
    X = torch.full_like(V, float("nan"))
    tri_solve_triton(
        Q, K, V, lam, algorithm="tree", chunk_size=32, tree_rows=rows, tree_cols=cols,
        tree_gram_block=gram, tree_warps=warps, out=X,
    )  # fmt: skip
    assert rel(X, Xr) < RTOL


def test_tree_solve_deltanet_and_auto_choice(monkeypatch):
    """Λ = I, Q = βK (DeltaNet); ``algorithm="auto"`` takes the tree only under CUDA-graph
    capture and up to ``TREE_MAX_ROWS`` rows (B·n), the scan otherwise."""
    import matfn.kernels.triangular as kt

    assert not kt._capturing(torch.device("cpu"))
    Q, K, lam, V = make(2, 200, 24, 24, seed=9, deltanet=True)
    Xr = tri._tri_solve_torch(Q.double(), K.double(), V.double(), lam.double())
    ran = []
    for name in ("_solve_tree", "_solve_scan"):
        fn = getattr(kt, name)
        monkeypatch.setattr(
            kt, name, lambda *a, fn=fn, name=name, **k: ran.append(name) or fn(*a, **k)
        )
    for capturing, max_rows, expect in (
        (False, 10**6, "_solve_scan"),
        (True, 400, "_solve_tree"),
        (True, 399, "_solve_scan"),
    ):
        monkeypatch.setattr(kt, "_capturing", lambda device, c=capturing: c)
        monkeypatch.setattr(kt, "TREE_MAX_ROWS", max_rows)
        X = tri_solve_triton(Q, K, V, lam)
        assert ran.pop() == expect, (capturing, max_rows)
        assert rel(X, Xr) < RTOL


def test_tree_solve_rejects_bad_arguments():
    Q, K, lam, V = make(1, 20, 4, 2)
    with pytest.raises(ValueError, match="algorithm"):
        tri_solve_triton(Q, K, V, lam, algorithm="dense")
    with pytest.raises(ValueError, match="tree_rows"):
        tri_solve_triton(Q, K, V, lam, tree_rows=48)
    with pytest.raises(ValueError, match="tree_rows"):
        tri_solve_triton(Q, K, V, lam, chunk_size=16, tree_rows=64)
    with pytest.raises(ValueError, match="tree_cols"):
        tri_solve_triton(Q, K, V, lam, tree_cols=128)
    with pytest.raises(ValueError, match="tree_gram_block"):
        tri_solve_triton(Q, K, V, lam, tree_gram_block=8)
    with pytest.raises(ValueError, match="tree_warps"):
        tri_solve_triton(Q, K, V, lam, tree_warps=3)
    with pytest.raises(ValueError, match="tree_cols ≥ 32 or tree_warps ≤ 4"):
        tri_solve_triton(Q, K, V, lam, algorithm="tree", tree_cols=16, tree_warps=8)
