"""Triton triangular kernels (TRITON_INTERPRET=1 on CPU, set by conftest) vs the torch reference.

The launchers are called directly on CPU float32 tensors; outputs are poisoned with NaN first, so
an unwritten element fails. Reference: the row recursion ``tri_inv_torch`` in float64.
Tolerance: relative Frobenius error ≤ 1e-5 — float32 forward substitution on these
well-conditioned cases (|q·k| ≤ 0.6, |λ| ≥ 0.5, κ_F(T) < 100) lands near 1e-7 (measured
0.5–3e-7), so a wrong tile or a missing level shows up as O(1).
"""

from __future__ import annotations

import dataclasses
import itertools
import os

import pytest
import torch

pytest.importorskip("triton")
# These tests push CPU tensors through the launchers, which only the interpreter can run; on a
# GPU run of the suite the kernels are checked by benchmarks/gpu_triangular.py --sections correct
# and by the public-API tests.
pytestmark = pytest.mark.skipif(
    bool(os.environ.get("MATFN_TEST_ON_GPU")), reason="needs TRITON_INTERPRET=1 (CPU tensors)"
)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import matfn.triangular as tri  # noqa: E402
from matfn.triangular import chunk, inverse, scan, schedule, solve  # noqa: E402
from matfn.triangular.config import (  # noqa: E402
    TRI_INV_CONFIG,
    TRI_SOLVE_CONFIG,
    TriInvConfig,
    TriSolveConfig,
    inv_config,
    solve_config,
)
from matfn.triangular.inverse import tri_inv_triton  # noqa: E402
from matfn.triangular.reference import tri_inv_torch, tri_solve_torch  # noqa: E402
from matfn.triangular.schedule import ScanPlan  # noqa: E402
from matfn.triangular.solve import tri_solve_triton  # noqa: E402

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


def inv_cfg(**kw):
    return dataclasses.replace(TRI_INV_CONFIG, **kw)


def solve_cfg(**kw):
    return dataclasses.replace(TRI_SOLVE_CONFIG, **kw)


def reference(Q, K, V, lam):
    return tri_solve_torch(Q.double(), K.double(), V.double(), lam.double())


# (B, n, d, e, chunk, block_s): sizes not divisible by the chunk, several levels / groups,
# d and e not powers of two, a single chunk, one row, d above the 64-wide d loop
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
    (1, 200, 100, 5, 64, 16),  # d > 64: the chunk kernel's d loop
]


@pytest.mark.parametrize(
    "B, n, d, e, chunk_size, bs",
    CASES,
    ids=[f"b{c[0]}-n{c[1]}-d{c[2]}-e{c[3]}-C{c[4]}-S{c[5]}" for c in CASES],
)
def test_kernels_match_reference(B, n, d, e, chunk_size, bs):
    Q, K, lam, V = make(B, n, d, e, seed=n)
    Yr = tri_inv_torch(Q.double(), K.double(), lam.double())
    Xr = reference(Q, K, V, lam)
    Y = torch.full((B, n, n), float("nan"))
    tri_inv_triton(Q, K, lam, config=inv_cfg(chunk_size=chunk_size, block_s=bs), out=Y)
    assert rel(Y, Yr) < RTOL
    assert torch.equal(torch.triu(Y, 1), torch.zeros_like(Y))
    config = solve_cfg(chunk_size=chunk_size, block_s=bs)
    for algorithm in ALGORITHMS:
        X = torch.full((B, n, e), float("nan"))
        tri_solve_triton(Q, K, V, lam, config=config, algorithm=algorithm, out=X)
        assert rel(X, Xr) < RTOL, algorithm


def test_inverse_of_wide_d_single_and_many_chunks():
    """d = 130 (> 2 column tiles of the chunk kernel's d loop), one chunk and several."""
    for n in (17, 150):
        Q, K, lam, _ = make(2, n, 130, 1, seed=n)
        Y = torch.full((2, n, n), float("nan"))
        tri_inv_triton(Q, K, lam, out=Y)
        assert rel(Y, tri_inv_torch(Q.double(), K.double(), lam.double())) < RTOL


def _plan(fused, S0, NC, RNUM=0, RDEN=1):
    NG = len(schedule.group_sizes(S0, RNUM, RDEN, NC))
    return ScanPlan(fused and NG > 1, S0, RNUM, RDEN, NG)


def _run_scan(Q, K, V, lam, config, plan=None):
    X = torch.full_like(V, float("nan"))
    out = scan.solve_scan(Q, K, V, lam, X, config, plan)
    assert out is X
    return X


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("group_size", [1, 2, 5])
def test_scan_equal_groups(group_size, fused):
    """Equal groups (the unfused scan's schedule) of several sizes, fused and unfused."""
    Q, K, lam, V = make(2, 90, 6, 20, seed=1)
    config = solve_cfg(chunk_size=16)
    X = _run_scan(Q, K, V, lam, config, _plan(fused, group_size, NC=6))
    assert rel(X, reference(Q, K, V, lam)) < RTOL


# the scan's settings: fused (flag- and sentinel-driven state and correction launches) or not,
# growing or equal groups, slices of the state, column tiles of the group kernel, state tiles;
# batch > 1 (flags and states per batch entry), d and e not powers of two
SCAN_CASES = [
    (dict(), None),
    (dict(), "unfused"),
    (dict(scan_ratio=0.5), None),
    (dict(scan_ratio=4.0), None),
    (dict(scan_slices=1, scan_block=32, state_block=16), None),
    (dict(scan_slices=1, scan_block=32, state_block=16), "unfused"),
    (dict(scan_slices=2, scan_warps=8, state_warps=4), "unfused"),
    (dict(scan_slices=8), None),  # clipped to the 16-row slices that d = 36 (padded 64) has
]


@pytest.mark.parametrize("opts, plan", SCAN_CASES, ids=[f"{c}-{p}" for c, p in SCAN_CASES])
def test_scan_settings(opts, plan):
    Q, K, lam, V = make(3, 150, 36, 21, seed=2)
    config = solve_cfg(chunk_size=16, **opts)
    NC = triton.cdiv(150, 16)
    if plan == "unfused":  # what a batch gets on a GPU with too few SMs for the fused form
        unfused = schedule.scan_plan(NC, 16, 36, 3 * 6, 16, config.scan_ratio, 6)
        assert not unfused.fused and unfused.RNUM == 0
        plan = unfused
    X = _run_scan(Q, K, V, lam, config, plan)
    assert rel(X, reference(Q, K, V, lam)) < RTOL


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_fused_scan_with_non_finite_values_ends(bad):
    """The fused scan's readers wait until no element of ``Z_g`` is the sentinel NaN: NaN and Inf
    reaching ``Z`` through arithmetic are other bit patterns, so the solve ends (non-finite
    results in that column, where products meet the bad value, not a hang)."""
    Q, K, lam, V = make(1, 150, 8, 6, seed=4)
    V[0, 3, 2] = bad
    config = solve_cfg(chunk_size=16)
    assert scan.plan_for(Q, 6, config).fused
    X = tri_solve_triton(Q, K, V, lam, config=config, algorithm="scan")
    assert not torch.isfinite(X[0, 3:, 2]).any()
    assert torch.isfinite(X[..., [0, 1, 3, 4, 5]]).all()


@pytest.mark.parametrize("NC", [1, 2, 7, 64, 128, 1000])
@pytest.mark.parametrize("ratio", [0.5, 1.8, 4.0])
def test_chain_schedule(NC, ratio):
    """Growing groups cover every chunk once, in order, and the modelled end beats equal groups
    of the √-balanced size (the reason for growing them)."""
    S0, RNUM, RDEN = schedule.chain_schedule(NC, ratio)
    starts = [schedule.group_start(g, S0, RNUM, RDEN, NC) for g in range(NC + 2)]
    assert starts[0] == 0 and starts[-1] == NC
    sizes = [b - a for a, b in itertools.pairwise(starts) if b > a]
    assert sum(sizes) == NC and all(s >= 1 for s in sizes)
    assert sizes == schedule.group_sizes(S0, RNUM, RDEN, NC)
    assert all(b >= a for a, b in itertools.pairwise(sizes[:-1]))  # the last may be cut short
    gs = max(1, round((NC * ratio) ** 0.5))
    equal = [min(gs, NC - i) for i in range(0, NC, gs)]
    assert schedule.modelled_end(sizes, ratio) <= schedule.modelled_end(equal, ratio)


@pytest.mark.parametrize("NC", [5, 64, 128, 1000])
@pytest.mark.parametrize("max_groups", [1, 3, 8])
def test_chain_schedule_max_groups(NC, max_groups):
    """With a cap (one group-kernel program per SM), the schedule still covers every chunk and
    has at most that many groups; no cap is never modelled later than a cap."""
    S0, RNUM, RDEN = schedule.chain_schedule(NC, 2.5, max_groups)
    sizes = schedule.group_sizes(S0, RNUM, RDEN, NC)
    assert sum(sizes) == NC and all(s >= 1 for s in sizes)
    assert len(sizes) <= max_groups
    free = schedule.group_sizes(*schedule.chain_schedule(NC, 2.5), NC)
    assert schedule.modelled_end(free, 2.5) <= schedule.modelled_end(sizes, 2.5)


def test_groups_per_wave_and_scan_plan():
    """The cap: SMs // programs per group; 0 (the unfused scan) below min_groups; None (no cap)
    without an SM count (interpreter, CPU). The plan: fused with growing groups under the cap,
    else equal √-balanced groups; one group is never fused."""
    assert schedule.groups_per_wave(132, 16, 6) == 8
    assert schedule.groups_per_wave(132, 32, 6) == 0  # 4 groups: fewer than 6
    assert schedule.groups_per_wave(None, 32, 6) is None
    # n = 4096, C = 32, d = e = 128 on 132 SMs: B = 1 fused in ≤ 8 groups, B = 2 unfused
    one = schedule.scan_plan(128, 32, 128, 16, 132, 1.4, 6)
    assert one.fused and one.groups <= 8 and one.RNUM > 0
    two = schedule.scan_plan(128, 32, 128, 32, 132, 1.4, 6)
    assert not two.fused and (two.S0, two.RNUM, two.RDEN) == (round((128 * 128 / 64) ** 0.5), 0, 1)
    assert two.groups == len(schedule.group_sizes(two.S0, 0, 1, 128))
    assert not schedule.scan_plan(1, 32, 128, 16, None, 1.4, 6).fused
    Q = torch.zeros(1, 4096, 128)  # CPU: no cap
    assert scan.plan_for(Q, 128, TRI_SOLVE_CONFIG) == schedule.scan_plan(
        128, 32, 128, 16, None, 1.4, 6
    )


def test_chunk_pass_initialises_scratch():
    """The chunk kernel's INIT: zeros, then SENTINEL, over a buffer split between programs."""
    Q, K, lam, V = make(1, 100, 8, 4)
    W = torch.empty(1, 100, 12)
    scratch = torch.full((5000,), 7, dtype=torch.int32)
    chunk.chunk_pass(
        Q, K, lam, chunk_size=16, block_s=16, warps=4, V=V, P=W[..., 4:], U=W, BE=32,
        scratch=(scratch, 64),
    )  # fmt: skip
    assert torch.equal(scratch[:64], torch.zeros(64, dtype=torch.int32))
    assert (scratch[64:] == 0x7FC0DEAD).all()
    assert torch.isnan(scratch[64:].view(torch.float32)).all()


@triton.jit
def _group_start_kernel(out_ptr, S0, RNUM, RDEN, NC, N: tl.constexpr):
    g = tl.arange(0, N)
    tl.store(out_ptr + g, scan.group_start(g, S0, RNUM, RDEN, NC))


def test_group_start_matches_host():
    for S0, RNUM, RDEN, NC in [(3, 7, 4, 128), (1, 8, 4, 64), (16, 0, 1, 128), (2, 5, 4, 10)]:
        out = torch.empty(64, dtype=torch.int32)
        _group_start_kernel[(1,)](out, S0, RNUM, RDEN, NC, N=64)
        host = [schedule.group_start(g, S0, RNUM, RDEN, NC) for g in range(64)]
        assert out.tolist() == host


def test_chunk_64_everywhere():
    """C = 64 on several levels and groups for the inverse and both solves.

    The interpreter runs the tf32 products in fp32, so this checks the plumbing and the
    recombination of the three products; the split's accuracy is checked by the test_tf32_split_*
    tests below.
    """
    Q, K, lam, V = make(2, 300, 40, 24, seed=5)
    Yr = tri_inv_torch(Q.double(), K.double(), lam.double())
    Y = torch.full((2, 300, 300), float("nan"))
    tri_inv_triton(Q, K, lam, out=Y)
    assert rel(Y, Yr) < RTOL
    for algorithm in ALGORITHMS:
        X = torch.full_like(V, float("nan"))
        tri_solve_triton(Q, K, V, lam, config=solve_cfg(chunk_size=64), algorithm=algorithm, out=X)
        assert rel(X, Yr @ V.double()) < RTOL, algorithm


@triton.jit
def _split_kernel(x_ptr, hi_ptr, lo_ptr, N: tl.constexpr):
    r = tl.arange(0, N)
    hi, lo = chunk.tf32_split(tl.load(x_ptr + r))
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


def test_deltanet_batch_of_chunks():
    """The DeltaNet benchmark shape in miniature: many independent 64×64 chunks (one chunk each,
    so the chunk kernel alone), entries in [−1, 1]."""
    Q, K, lam, V = make(5, 64, 32, 8, seed=3, deltanet=True)
    Yr = tri_inv_torch(Q.double(), K.double(), lam.double())
    Y = tri_inv_triton(Q, K, lam)
    assert rel(Y, Yr) < RTOL
    assert Y.abs().max() <= 1 + 1e-5
    for algorithm in ALGORITHMS:
        X = tri_solve_triton(Q, K, V, lam, config=solve_cfg(chunk_size=64), algorithm=algorithm)
        assert rel(X, Yr @ V.double()) < RTOL, algorithm


def test_public_api_dispatches_to_kernels(monkeypatch):
    """tri_inv / tri_solve route float32 batches to the launchers when kernels apply (forced
    here on CPU, where the interpreter runs them); leading dims are flattened and restored, and
    the requested chunk is rounded to the kernels' (the config of :func:`inv_config`)."""
    calls = []

    def spy(fn):
        def wrapped(*args, **kwargs):
            calls.append((fn.__name__, kwargs["config"]))
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(tri.paths, "use_triton", lambda *t: True)
    monkeypatch.setattr(inverse, "tri_inv_triton", spy(inverse.tri_inv_triton))
    monkeypatch.setattr(solve, "tri_solve_triton", spy(solve.tri_solve_triton))
    Q, K, lam, V = make(6, 40, 4, 3, seed=4)
    Q, K, lam, V = Q.view(2, 3, 40, 4), K.view(2, 3, 40, 4), lam.view(2, 3, 40), V.view(2, 3, 40, 3)
    Y = tri.tri_inv(Q, K, lam, chunk_size=20)  # rounded to the kernel chunk 32
    X = tri.tri_solve(Q, K, V, lam)
    assert calls == [
        ("tri_inv_triton", inv_cfg(chunk_size=32)),
        ("tri_solve_triton", TRI_SOLVE_CONFIG),
    ]
    Yr = tri_inv_torch(
        Q.double().flatten(0, 1), K.double().flatten(0, 1), lam.double().flatten(0, 1)
    )
    assert Y.shape == (2, 3, 40, 40) and rel(Y.flatten(0, 1), Yr) < RTOL
    assert X.shape == (2, 3, 40, 3) and rel(X.flatten(0, 1), Yr @ V.double().flatten(0, 1)) < RTOL


def test_public_api_kernel_configs():
    # the inverse keeps C = 64, the solve takes at most 32; a smaller request is honoured,
    # rounded up to a power of two ≥ 16; the default request gives the frozen configs themselves
    assert inv_config(64) is TRI_INV_CONFIG and solve_config(64) is TRI_SOLVE_CONFIG
    assert TRI_INV_CONFIG.chunk_size == 64 and TRI_SOLVE_CONFIG.chunk_size == 32
    assert inv_config(20).chunk_size == 32 and inv_config(1000).chunk_size == 64
    assert solve_config(10).chunk_size == 16 and solve_config(1).chunk_size == 16
    assert inv_config(20) == dataclasses.replace(TRI_INV_CONFIG, chunk_size=32)


def test_configs_are_frozen_and_hashable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TRI_SOLVE_CONFIG.scan_ratio = 2.0  # type: ignore[misc]
    assert hash(TRI_SOLVE_CONFIG) == hash(TriSolveConfig())
    assert hash(TRI_INV_CONFIG) == hash(TriInvConfig())


@pytest.mark.parametrize(
    "cls, kw, match",
    [
        (TriInvConfig, dict(chunk_size=48), "chunk_size"),
        (TriInvConfig, dict(block_s=3), "block_s"),
        (TriInvConfig, dict(chunk_size=16, block_s=32), "block_s"),
        (TriInvConfig, dict(level_rows=8), "level_rows"),
        (TriInvConfig, dict(warps=3), "warps"),
        (TriSolveConfig, dict(block_s=3), "block_s"),
        (TriSolveConfig, dict(scan_block=8), "scan_block"),
        (TriSolveConfig, dict(scan_warps=3), "scan_warps"),
        (TriSolveConfig, dict(scan_slices=3), "scan_slices"),
        (TriSolveConfig, dict(state_block=8), "state_block"),
        (TriSolveConfig, dict(state_warps=3), "state_warps"),
        (TriSolveConfig, dict(scan_ratio=0.0), "scan_ratio"),
        (TriSolveConfig, dict(scan_ratio=None), "scan_ratio"),
        (TriSolveConfig, dict(tree_rows=48), "tree_rows"),
        (TriSolveConfig, dict(chunk_size=16, tree_rows=64), "tree_rows"),
        (TriSolveConfig, dict(tree_cols=128), "tree_cols"),
        (TriSolveConfig, dict(tree_gram_block=8), "tree_gram_block"),
        (TriSolveConfig, dict(tree_warps=3), "tree_warps"),
        (TriSolveConfig, dict(min_groups_per_wave=0), "min_groups_per_wave"),
    ],
)
def test_config_rejects_bad_values(cls, kw, match):
    with pytest.raises(ValueError, match=match):
        cls(**kw)


def test_launcher_rejects_bad_arguments():
    Q, K, lam, V = make(1, 20, 4, 2)
    with pytest.raises(TypeError):
        tri_inv_triton(Q.double(), K, lam)
    with pytest.raises(ValueError, match="expected Q, K"):
        tri_inv_triton(Q, K[:, :10], lam)
    with pytest.raises(ValueError, match="out"):
        tri_inv_triton(Q, K, lam, out=torch.empty(1, 20, 21))
    with pytest.raises(ValueError, match="algorithm"):
        tri_solve_triton(Q, K, V, lam, algorithm="dense")
    with pytest.raises(ValueError, match="expected float32 V"):
        tri_solve_triton(Q, K, V.double(), lam)
    with pytest.raises(ValueError, match="d ≤ 128"):
        tri_solve_triton(torch.zeros(1, 20, 129), torch.zeros(1, 20, 129), V, lam)


def test_config_refuses_the_known_miscompiled_shapes():
    """64-row chunks, 16-column scan tiles, 8 warps (and 16-column tree tiles with 8 warps):
    wrong tensor-core products on the H100 with Triton 3.6, so the config refuses them rather
    than return wrong values; 4 warps on the same shape is right."""
    with pytest.raises(ValueError, match="scan_block=32 or scan_warps=4"):
        solve_cfg(chunk_size=64, scan_block=16, scan_warps=8)
    with pytest.raises(ValueError, match="tree_cols ≥ 32 or tree_warps ≤ 4"):
        solve_cfg(tree_cols=16, tree_warps=8)
    Q, K, lam, V = make(1, 130, 100, 8)
    config = solve_cfg(chunk_size=64, scan_block=16, scan_warps=4)
    X = tri_solve_triton(Q, K, V, lam, config=config, algorithm="scan")
    assert rel(X, reference(Q, K, V, lam)) < RTOL


# tree solve: L = ⌈log₂(n/C)⌉ levels; n ≤ C (no level), n = C + 1 and C·2^k + 1 (a last block
# of one row, odd block counts, blocks without a partner on every level), n = C·2^k exactly,
# n not a multiple of C, B > 1, d and e not powers of two, e < d, e > d, d and e above the
# 64-wide d loop / 32-wide column tiles, d = e = 1
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
    "B, n, d, e, chunk_size",
    TREE_CASES,
    ids=[f"b{c[0]}-n{c[1]}-d{c[2]}-e{c[3]}-C{c[4]}" for c in TREE_CASES],
)
def test_tree_solve_matches_reference(B, n, d, e, chunk_size):
    Q, K, lam, V = make(B, n, d, e, seed=n + d)
    X = torch.full((B, n, e), float("nan"))
    config = solve_cfg(chunk_size=chunk_size)
    Xo = tri_solve_triton(Q, K, V, lam, config=config, algorithm="tree", out=X)
    assert Xo is X
    assert rel(X, reference(Q, K, V, lam)) < RTOL


@pytest.mark.parametrize(
    "rows, cols, gram, warps", [(16, 16, 16, 4), (64, 64, 64, 8), (16, 64, 32, 2), (64, 32, 16, 1)]
)
def test_tree_solve_tiles(rows, cols, gram, warps):
    """The tile values: row tiles smaller / larger than the chunk (up to 2C), column tiles
    narrower / wider than e = 40 and d = 50, Gram-combine tiles of all sizes."""
    Q, K, lam, V = make(1, 130, 50, 40, seed=8)  # 5 chunks: 3 levels, one block unpaired
    X = torch.full_like(V, float("nan"))
    config = solve_cfg(
        chunk_size=32, tree_rows=rows, tree_cols=cols, tree_gram_block=gram, tree_warps=warps
    )
    tri_solve_triton(Q, K, V, lam, config=config, algorithm="tree", out=X)
    assert rel(X, reference(Q, K, V, lam)) < RTOL


def test_auto_choice(monkeypatch):
    """``algorithm="auto"`` takes the tree only under CUDA-graph capture and up to
    ``tree_max_rows`` rows (B·n), the scan otherwise; DeltaNet inputs (Λ = I, Q = βK)."""
    assert not solve._capturing(torch.device("cpu"))
    assert solve.use_tree(True, 1024, TRI_SOLVE_CONFIG)
    assert not solve.use_tree(True, 1025, TRI_SOLVE_CONFIG)
    assert not solve.use_tree(False, 1, TRI_SOLVE_CONFIG)
    Q, K, lam, V = make(2, 200, 24, 24, seed=9, deltanet=True)
    Xr = reference(Q, K, V, lam)
    ran = []
    for name in ("solve_tree", "solve_scan"):
        fn = getattr(solve, name)
        monkeypatch.setattr(
            solve, name, lambda *a, fn=fn, name=name, **k: ran.append(name) or fn(*a, **k)
        )
    for capturing, max_rows, expect in (
        (False, 10**6, "solve_scan"),
        (True, 400, "solve_tree"),
        (True, 399, "solve_scan"),
    ):
        monkeypatch.setattr(solve, "_capturing", lambda device, c=capturing: c)
        X = tri_solve_triton(Q, K, V, lam, config=solve_cfg(tree_max_rows=max_rows))
        assert ran.pop() == expect, (capturing, max_rows)
        assert rel(X, Xr) < RTOL
