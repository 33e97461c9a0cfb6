"""``cuda_graph=True``: replayed results equal eager ones, on new values, without aliasing.

CUDA graphs need a GPU: on the CPU (CI) only the eager fallback is checked; the replay tests run
with ``MATFN_TEST_ON_GPU=1`` on a GPU. Replays launch the kernels fastest on the GPU
(:mod:`matfn.kernels.recording`), for small bf16 problems not the eager call's: the same
iteration in fp16 with products summed in another order, so results agree to the output
dtype's rounding (``rtol=atol=2⁻⁸`` in bf16; 1e-6 in float32, whose kernels do not change,
where reductions may be split differently).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch.testing import assert_close

import matfn
from matfn import _graphs
from matfn.triangular import SingularTriangularError

ON_GPU = bool(os.environ.get("MATFN_TEST_ON_GPU")) and torch.cuda.is_available()
gpu = pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU (MATFN_TEST_ON_GPU=1)")
TOL = {torch.bfloat16: 2**-8, torch.float32: 1e-6}


def _close(out, ref):
    tol = TOL[ref.dtype]
    assert_close(out, ref, rtol=tol, atol=tol)


@pytest.fixture(autouse=True)
def _fresh_cache():
    _graphs.clear()
    yield
    _graphs.clear()


def test_cpu_inputs_run_eagerly():
    M = torch.randn(3, 9, 5, dtype=torch.float64)
    assert not _graphs.graph_applies(M, work=_graphs.gram_work(M))
    assert_close(matfn.msign(M, cuda_graph=True), matfn.msign(M), rtol=0, atol=0)
    assert_close(matfn.mclip(M, max_sv=0.3, cuda_graph=True), matfn.mclip(M, max_sv=0.3))
    S = torch.randn(2, 6, 6, dtype=torch.float64)
    S = S + S.mT
    kw = {"steps": 8, "check_convergence": False}
    assert_close(matfn.mcsgn(S, cuda_graph=True, **kw), matfn.mcsgn(S, **kw), rtol=0, atol=0)
    assert len(_graphs._ENTRIES) == 0


@gpu
def test_graph_applies_rules():
    def applies(M):
        return _graphs.graph_applies(M, work=_graphs.gram_work(M))

    M = torch.randn(4, 4, device="cuda")
    assert applies(M)
    assert not applies(M.requires_grad_())
    assert not applies(torch.empty(0, 4, device="cuda"))
    assert applies(torch.empty(64, 512, 512, device="cuda"))  # 2³³
    assert applies(torch.empty(48, 768, 768, device="cuda"))  # 2.2·10¹⁰: host-bound eager
    assert not applies(torch.empty(4096, 4096, device="cuda"))  # 2³⁶: GPU-bound
    assert not applies(torch.empty(4, 4))
    # 8192 DeltaNet chunks: 2³² multiply-adds but 2 × 268 MB to copy in per replay
    Kc = torch.empty(8192, 64, 128, device="cuda")
    assert not _graphs.graph_applies(Kc, Kc, work=8192 * 64 * 64 * 128)


def test_input_bytes_bound():
    # the size rule alone, on CPU tensors (the rule's other conditions need CUDA)
    assert _graphs.input_bytes(torch.empty(2, 3), torch.empty(4, dtype=torch.float64)) == 56
    big = torch.empty(_graphs.MAX_INPUT_BYTES // 4 + 1, device="meta")
    assert _graphs.input_bytes(big) > _graphs.MAX_INPUT_BYTES


@gpu
@pytest.mark.parametrize(
    "shape, transpose",
    [((1024, 1024), False), ((16, 512, 512), False), ((3, 200, 96), True), ((2, 3, 64, 48), False)],
)
def test_msign_replay_matches_eager(shape, transpose):
    g = torch.Generator(device="cuda").manual_seed(0)
    bf16 = torch.bfloat16
    inputs = [torch.randn(shape, device="cuda", generator=g, dtype=bf16) for _ in range(3)]
    if transpose:
        inputs = [M.mT for M in inputs]
    kw = {"check_finite": False}
    refs = [matfn.msign(M, **kw) for M in inputs]
    copies = [M.clone() for M in inputs]
    outs = [matfn.msign(M, cuda_graph=True, **kw) for M in inputs]  # capture, replay, replay
    assert len(_graphs._ENTRIES) == 1
    for M, copy, out, ref in zip(inputs, copies, outs, refs, strict=True):
        assert torch.equal(M, copy)  # the input is never modified
        assert out.shape == M.shape and out.dtype == M.dtype
        _close(out, ref)  # earlier results are not overwritten by later replays
    assert outs[1].data_ptr() != outs[2].data_ptr()


@gpu
@pytest.mark.parametrize("transpose", [False, True])
def test_normalize_while_recording_matches_eager(transpose):
    """Below ``min_triton_divide`` a recorded normalisation is one Triton divide pass instead
    of torch's three launches, with the same values (both divide in fp32, correctly rounded)."""
    from matfn import _backend
    from matfn.kernels import recording
    from matfn.msign.path import normalize

    M = torch.randn(4, 96, 160, device="cuda", dtype=torch.bfloat16)
    M = M.mT if transpose else M
    assert M.numel() < _backend.NEWTON_SCHULZ.min_triton_divide
    ref = normalize(M, 1.5, 1e-7, torch.float16)
    with recording.for_graph():
        got = normalize(M, 1.5, 1e-7, torch.float16)
    assert got.shape == M.shape and got.dtype == torch.float16
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


@gpu
def test_options_and_geometry_get_their_own_graphs(monkeypatch):
    monkeypatch.setattr(_graphs, "MAX_GRAPHS", 2)
    M = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16)
    for steps in (3, 5, 8):
        _close(matfn.msign(M, steps=steps, cuda_graph=True), matfn.msign(M, steps=steps))
    assert len(_graphs._ENTRIES) == 2  # least recently used dropped
    N = torch.randn(128, 64, device="cuda", dtype=torch.bfloat16)
    _close(matfn.msign(N, cuda_graph=True), matfn.msign(N))
    _close(matfn.msign(N, cuda_graph=True), matfn.msign(N))  # replay of the wide-transposed call


@gpu
def test_side_stream_replay():
    M = torch.randn(8, 96, 256, device="cuda", dtype=torch.bfloat16)
    ref = matfn.msign(M)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        first = matfn.msign(M, cuda_graph=True)
        second = matfn.msign(M * 2, cuda_graph=True)  # msign(2M) = msign(M)
    torch.cuda.current_stream().wait_stream(side)
    _close(first, ref)
    _close(second, ref)


@gpu
def test_mclip_and_mcsgn_replay():
    g = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(2):
        M = torch.randn(4, 48, 80, device="cuda", generator=g)
        _close(matfn.mclip(M, max_sv=1.5, cuda_graph=True), matfn.mclip(M, max_sv=1.5))
        S = torch.randn(4, 32, 32, device="cuda", generator=g, dtype=torch.float64).float()
        S = S + S.mT
        kw = {"steps": 10, "check_convergence": False}
        _close(matfn.mcsgn(S, cuda_graph=True, **kw), matfn.mcsgn(S, **kw))
    assert len(_graphs._ENTRIES) == 2


@gpu
@pytest.mark.parametrize("with_diag", [False, True])
def test_triangular_replay(with_diag):
    """tri_inv / tri_solve replayed on new values. Inside a capture tri_solve may take the
    divide-and-conquer algorithm instead of the scan (kernels.triangular, ``algorithm="auto"``):
    both are fp32-accurate (≈ 1e-6 relative at this size), hence rtol 2e-5."""
    g = torch.Generator(device="cuda").manual_seed(2)
    for _ in range(3):  # capture, replay, replay
        Q, K = (torch.randn(2, 2, 256, 32, device="cuda", generator=g) / 8).unbind(0)
        V = torch.randn(2, 256, 16, device="cuda", generator=g)
        diag = 1 + torch.rand(2, 256, device="cuda", generator=g) if with_diag else None
        assert_close(
            matfn.tri_inv(Q, K, diag, cuda_graph=True), matfn.tri_inv(Q, K, diag), rtol=2e-5,
            atol=2e-6,
        )  # fmt: skip
        assert_close(
            matfn.tri_solve(Q, K, V, diag, cuda_graph=True), matfn.tri_solve(Q, K, V, diag),
            rtol=2e-5, atol=2e-6,
        )  # fmt: skip
    assert len(_graphs._ENTRIES) == 2


def test_triangular_cpu_runs_eagerly():
    Q, K = (torch.randn(2, 40, 3, dtype=torch.float64) / 4).unbind(0)
    V = torch.randn(40, 2, dtype=torch.float64)
    assert_close(matfn.tri_inv(Q, K, cuda_graph=True), matfn.tri_inv(Q, K), rtol=0, atol=0)
    out = matfn.tri_solve(Q, K, V, 2.0, cuda_graph=True)
    assert_close(out, matfn.tri_solve(Q, K, V, 2.0), rtol=0, atol=0)
    assert len(_graphs._ENTRIES) == 0


def test_call_sites_hand_a_hashable_partial_of_the_eager_computation(monkeypatch):
    """On the CPU (CI) no graph is captured, so check each caller's side of the contract: with
    the graph path forced, every function hands ``replay_or_capture`` a ``functools.partial``
    whose bound arguments hash (they are the key) and which computes the eager result."""
    import functools

    seen = []

    def fake_replay(call, *tensors):
        assert isinstance(call, functools.partial)
        hash((call.func, call.args, tuple(sorted(call.keywords.items()))))
        seen.append(call.func.__name__)
        return call(*tensors)

    monkeypatch.setattr(_graphs, "graph_applies", lambda *tensors, work: True)
    monkeypatch.setattr(_graphs, "replay_or_capture", fake_replay)
    M = torch.randn(3, 9, 5, dtype=torch.float64)
    S = torch.randn(2, 6, 6, dtype=torch.float64)
    S = S + S.mT
    Q, K = (torch.randn(2, 2, 40, 3, dtype=torch.float64) / 4).unbind(0)
    V = torch.randn(2, 40, 2, dtype=torch.float64)
    kw = {"steps": 8, "check_convergence": False}
    table = [(3.4445, -4.775, 2.0315), (1.875, -1.25, 0.375)] * 4
    cases = [
        (lambda g: matfn.msign(M, cuda_graph=g), "_msign"),
        (lambda g: matfn.msign(M, method=table, cuda_graph=g), "_msign"),
        (lambda g: matfn.mclip(M, max_sv=0.3, cuda_graph=g), "_mclip"),
        (lambda g: matfn.mclip(M, max_sv=0.3, method=table, cuda_graph=g), "_mclip"),
        (lambda g: matfn.mcsgn(S, cuda_graph=g, **kw), "_normalized_sign_iteration"),
        (
            lambda g: matfn.mcsgn(S, method=table, cuda_graph=g, check_convergence=False),
            "_normalized_sign_iteration",
        ),
        (lambda g: matfn.tri_inv(Q, K, cuda_graph=g), "_tri_inv"),
        (lambda g: matfn.tri_solve(Q, K, V, 2.0, cuda_graph=g), "_tri_solve"),
    ]
    for fn, name in cases:
        assert_close(fn(True), fn(False), rtol=0, atol=0)
        assert seen.pop() == name and not seen


def test_capture_warms_up_and_records_on_the_same_gpu_time_kernels(monkeypatch, fake_cuda):
    """The warm-up run (which autotunes) and the capture both run inside
    ``recording.for_graph()``, so the graph replays the kernels the warm-up tuned, chosen by GPU
    time; the caller's code after the capture is back to the eager choice."""
    from matfn.kernels import recording

    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None)
    modes = []

    def fn(X):
        modes.append(recording.recording())
        return X * 2

    X = torch.ones(3)
    out = _graphs._capture("key", fn, (X,))
    assert modes == [True, True], "warm-up and capture"
    assert torch.equal(out, X * 2) and not recording.recording()
    assert list(_graphs._ENTRIES) == ["key"]


def test_tables_key_their_own_graphs(monkeypatch, fake_cuda):
    """A per-step table is part of the graph key, by value: another table of the same length
    captures its own graph (a replay of the first would return the first table's result, since
    the fake replay leaves the capture run's output), and the same values as a list, tuple or
    array replay the first graph."""
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None)
    monkeypatch.setattr(_graphs, "graph_applies", lambda *tensors, work: True)
    M = torch.randn(2, 12, 20, dtype=torch.float64)
    first = [(3.4445, -4.775, 2.0315)] * 3
    second = [(3.4445, -4.775, 2.0315), (1.5, -0.5, 0.0), (1.875, -1.25, 0.375)]
    for table in (first, second):
        out = matfn.msign(M, method=table, cuda_graph=True)  # eager warm-up result of a capture
        assert torch.equal(out, matfn.msign(M, method=table))
    assert len(_graphs._ENTRIES) == 2
    keys = list(_graphs._ENTRIES)
    for key, table in zip(keys, (first, second), strict=True):
        bound = dict(key[0][2])
        assert bound["method"] == tuple(tuple(map(float, row)) for row in table)
    for same in (
        tuple(first),
        np.array(first),
        [[int(v) if v == int(v) else v for v in r] for r in first],
    ):
        out = matfn.msign(M, method=same, cuda_graph=True)  # replay: the capture's output
        assert torch.equal(out, matfn.msign(M, method=first))
    assert list(_graphs._ENTRIES) == [keys[1], keys[0]]  # replayed: most recently used
    # a named method with the same rows is another key (the name is bound, not its rows)
    matfn.msign(M, method="keller", steps=3, cuda_graph=True)
    assert len(_graphs._ENTRIES) == 3
    # mclip and mcsgn bind the table too
    matfn.mclip(M, max_sv=0.5, method=first, cuda_graph=True)
    matfn.mclip(M, max_sv=0.5, method=second, cuda_graph=True)
    S = torch.randn(2, 8, 8, dtype=torch.float64)
    S = S + S.mT
    for table in (first, second):
        out = matfn.mcsgn(S, method=table, check_convergence=False, cuda_graph=True)
        assert torch.equal(out, matfn.mcsgn(S, method=table, check_convergence=False))
    assert len(_graphs._ENTRIES) == 7


def _spy_replay(monkeypatch, seen):
    def fake_replay(call, *tensors):
        seen.append(call.func.__name__)
        return call(*tensors)

    monkeypatch.setattr(_graphs, "graph_applies", lambda *tensors, work: True)
    monkeypatch.setattr(_graphs, "replay_or_capture", fake_replay)


@pytest.mark.parametrize("graph", [False, True])
def test_msign_reads_its_check_after_the_launches(monkeypatch, graph):
    """On CUDA, ``check_finite=True`` runs the norms' test beside the iteration and reads it
    once at the end (:func:`matfn.msign._check_deferred`). Forced on the CPU here: an in-range
    input returns the iteration's result (bitwise that of ``check_finite=False``); NaN/Inf
    raise the usual error; out-of-range norms (float32 overflow, below ``eps``) are rescued by
    the exact rescale, so their results match the in-range input's to float32 rounding."""
    import importlib

    msign_module = importlib.import_module("matfn.msign")
    monkeypatch.setattr(msign_module, "_check_deferred", lambda M, method, steps: True)
    seen = []
    _spy_replay(monkeypatch, seen)
    M = torch.randn(3, 24, 40, generator=torch.Generator().manual_seed(0))
    ref = matfn.msign(M, check_finite=False, cuda_graph=False)
    out = matfn.msign(M, cuda_graph=graph)
    assert torch.equal(out, ref)
    assert seen == (["_msign_checked"] if graph else [])
    for scale in (1e30, 1e-30):
        assert_close(matfn.msign(M * scale, cuda_graph=graph), ref, rtol=1e-5, atol=1e-5)
    for bad in (float("nan"), float("inf")):
        X = M.clone()
        X[1, 3, 4] = bad
        with pytest.raises(ValueError, match="`M` contains NaN or Inf"):
            matfn.msign(X, cuda_graph=graph)


def test_triangular_replays_read_their_check_after_the_replay(monkeypatch):
    """tri_inv / tri_solve replayed with ``check_finite=True`` return the flag of the input test
    beside the result and raise the eager check's errors (naming the argument or the zero
    pivot) only once the replay is issued."""
    seen = []
    _spy_replay(monkeypatch, seen)
    g = torch.Generator().manual_seed(1)
    Q, K = (torch.randn(2, 2, 40, 3, dtype=torch.float64, generator=g) / 4).unbind(0)
    V = torch.randn(2, 40, 2, dtype=torch.float64, generator=g)
    diag = 1 + torch.rand(2, 40, dtype=torch.float64, generator=g)
    assert torch.equal(matfn.tri_inv(Q, K, diag), matfn.tri_inv(Q, K, diag, cuda_graph=False))
    assert torch.equal(
        matfn.tri_solve(Q, K, V, diag), matfn.tri_solve(Q, K, V, diag, cuda_graph=False)
    )
    assert seen == ["_tri_inv", "_tri_solve"]
    bad = V.clone()
    bad[1, 7, 0] = float("nan")
    with pytest.raises(ValueError, match="`V` contains NaN or Inf"):
        matfn.tri_solve(Q, K, bad, diag)
    zero = diag.clone()
    zero[1, 5] = 0
    with pytest.raises(SingularTriangularError, match="index 5"):
        matfn.tri_inv(Q, K, zero)
    with pytest.raises(SingularTriangularError, match="index 5"):
        matfn.tri_solve(Q, K, V, zero)


@gpu
@pytest.mark.parametrize("graph", [False, True])
def test_deferred_checks_on_the_gpu(graph):
    """The same on CUDA, where the deferral is real (replayed and eager)."""
    g = torch.Generator(device="cuda").manual_seed(3)
    M = torch.randn(2, 256, 384, device="cuda", generator=g)
    ref = matfn.msign(M, check_finite=False, cuda_graph=graph)
    for _ in range(2):  # capture, then replay
        _close(matfn.msign(M, cuda_graph=graph), ref)
    for scale in (1e30, 1e-30):
        assert_close(matfn.msign(M * scale, cuda_graph=graph), ref, rtol=2**-7, atol=2**-7)
    X = M.clone()
    X[0, 1, 2] = float("inf")
    with pytest.raises(ValueError, match="`M` contains NaN or Inf"):
        matfn.msign(X, cuda_graph=graph)
    Q, K = (torch.randn(2, 2, 256, 32, device="cuda", generator=g) / 8).unbind(0)
    V = torch.randn(2, 256, 16, device="cuda", generator=g)
    for _ in range(2):
        matfn.tri_solve(Q, K, V, cuda_graph=graph)
    V[1, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="`V` contains NaN or Inf"):
        matfn.tri_solve(Q, K, V, cuda_graph=graph)
    with pytest.raises(SingularTriangularError, match="index 9"):
        matfn.tri_inv(
            Q,
            K,
            torch.ones(256, device="cuda").index_fill(0, torch.tensor([9], device="cuda"), 0.0),
            cuda_graph=graph,
        )


def test_triangular_replays_under_autograd(monkeypatch):
    """With inputs that require grad, ``cuda_graph=True`` replays the forward and the backward
    op (forced on the CPU here); the gradients are those of the op path (``cuda_graph=False``)
    exactly, for every subset of inputs that needs them."""
    seen = []
    _spy_replay(monkeypatch, seen)
    g = torch.Generator().manual_seed(4)
    Q, K = (torch.randn(2, 2, 70, 3, dtype=torch.float64, generator=g) / 4).unbind(0)
    V = torch.randn(2, 70, 2, dtype=torch.float64, generator=g)
    diag = 1 + torch.rand(2, 70, dtype=torch.float64, generator=g)
    dX, dY = torch.randn_like(V), torch.randn(2, 70, 70, dtype=torch.float64, generator=g)
    for wanted in ((0, 1, 2, 3), (1,), (2, 3)):
        grads = []
        for graph in (True, False):
            leaves = [x.clone().requires_grad_(i in wanted) for i, x in enumerate((Q, K, V, diag))]
            X = matfn.tri_solve(*leaves, chunk_size=16, cuda_graph=graph)
            picked = [leaves[i] for i in wanted]
            grads.append(torch.autograd.grad(X, picked, dX))
        assert seen == ["_tri_solve", "_solve_grads_flat"]
        seen.clear()
        for a, b in zip(*grads, strict=True):
            assert torch.equal(a, b)
    leaves = [x.clone().requires_grad_() for x in (Q, K, diag)]
    ref = torch.autograd.grad(matfn.tri_inv(*leaves, cuda_graph=False), leaves, dY)
    got = torch.autograd.grad(matfn.tri_inv(*leaves), leaves, dY)
    assert seen == ["_tri_inv", "_inv_grads_flat"]
    for a, b in zip(got, ref, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("per_channel", [False, True], ids=["gdn", "kda"])
def test_decayed_triangular_replays_under_autograd(monkeypatch, per_channel):
    """With ``log_decay`` the replay covers the decay too (forced on the CPU here): the graph's
    inputs include ℓ, the check reads it, and forward and backward (``dℓ`` included) equal the
    op path's exactly."""
    seen = []
    _spy_replay(monkeypatch, seen)
    g = torch.Generator().manual_seed(6)
    Q, K = (torch.randn(2, 2, 70, 3, dtype=torch.float64, generator=g) / 4).unbind(0)
    V = torch.randn(2, 70, 2, dtype=torch.float64, generator=g)
    L = -torch.rand((2, 70, 3) if per_channel else (2, 70), dtype=torch.float64, generator=g)
    dX, dY = torch.randn_like(V), torch.randn(2, 70, 70, dtype=torch.float64, generator=g)
    results = {}
    for graph in (True, False):
        leaves = [x.clone().requires_grad_() for x in (Q, K, V, L)]
        X = matfn.tri_solve(*leaves[:3], log_decay=leaves[3], chunk_size=16, cuda_graph=graph)
        Y = matfn.tri_inv(
            leaves[0], leaves[1], log_decay=leaves[3], chunk_size=16, cuda_graph=graph
        )
        results[graph] = (
            X.detach(),
            Y.detach(),
            *torch.autograd.grad(X, leaves, dX),
            *torch.autograd.grad(Y, [leaves[i] for i in (0, 1, 3)], dY),
        )
    assert seen == ["_tri_solve", "_tri_inv", "_solve_grads_flat", "_inv_grads_flat"]
    for a, b in zip(results[True], results[False], strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="log_decay"):
        matfn.tri_solve(Q, K, V, log_decay=L.clone().fill_(float("nan")))


@gpu
def test_triangular_backward_replay_on_the_gpu():
    """Replayed forward and backward on CUDA agree with the op path. fp32 kernels, and the
    captured solves may take the tree algorithm instead of the scan: each is accurate to about
    1e-6 relative here, and the gradients' causal sums over 512 rows cancel, so single entries
    differ by up to ~1e-2 relative; the check is normwise, 1e-4 (a wrong gradient is off by
    O(1))."""
    g = torch.Generator(device="cuda").manual_seed(5)
    Q, K = (torch.randn(2, 2, 512, 32, device="cuda", generator=g) / 8).unbind(0)
    V = torch.randn(2, 512, 16, device="cuda", generator=g)
    dX = torch.randn_like(V)
    for _ in range(3):  # capture, replay, replay
        grads = []
        for graph in (True, False):
            leaves = [x.clone().requires_grad_() for x in (Q, K, V)]
            X = matfn.tri_solve(*leaves, cuda_graph=graph)
            grads.append(torch.autograd.grad(X, leaves, dX))
        for a, b in zip(*grads, strict=True):
            assert float(torch.linalg.norm(a - b) / torch.linalg.norm(b)) < 1e-4
    assert len(_graphs._ENTRIES) == 2


@gpu
@pytest.mark.parametrize("per_channel", [False, True], ids=["gdn", "kda"])
def test_decayed_backward_replay_on_the_gpu(per_channel):
    """Decayed calls replayed from graphs (forward and backward) agree with the op path on
    CUDA: the same kernels, so to rounding (the check is normwise, 1e-5)."""
    _graphs.clear()
    g = torch.Generator(device="cuda").manual_seed(7)
    K = torch.nn.functional.normalize(torch.randn(2, 300, 32, device="cuda", generator=g), dim=-1)
    Q = torch.rand(2, 300, 1, device="cuda", generator=g) * K
    V = torch.randn(2, 300, 16, device="cuda", generator=g)
    L = -torch.rand((2, 300, 32) if per_channel else (2, 300), device="cuda", generator=g)
    dX = torch.randn_like(V)
    for _ in range(3):  # capture, replay, replay
        grads = []
        for graph in (True, False):
            leaves = [x.clone().requires_grad_() for x in (Q, K, V, L)]
            X = matfn.tri_solve(*leaves[:3], log_decay=leaves[3], cuda_graph=graph)
            grads.append((X.detach(), *torch.autograd.grad(X, leaves, dX)))
        for a, b in zip(*grads, strict=True):
            assert float(torch.linalg.norm(a - b) / torch.linalg.norm(b)) < 1e-5
    assert len(_graphs._ENTRIES) == 2
