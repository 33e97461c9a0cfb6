"""Muon's fused element-wise kernels vs the torch ops they replace (Triton interpreter on CPU).

Tolerances: the kernels do the reference's float32 arithmetic (torch's lerp forms, the same cast
to the stack dtype) with FMA contraction and a different summation order for the norms, so
float32 results agree to a few ulps (rtol 1e-6); results rounded to fp16 agree to one fp16 ulp
(2⁻¹⁰ relative) where a float32 ulp of difference flips a rounding.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

import optim._fused as fused_mod  # noqa: E402
from matfn.functional import graph_key  # noqa: E402
from matfn.kernels import elementwise  # noqa: E402
from optim import Muon  # noqa: E402
from optim._fused import BucketGraphs, FusedConfig  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: Tests that force the Triton path for CPU tensors run the kernels in the interpreter only (a
#: GPU run of the suite, MATFN_TEST_ON_GPU=1, launches real kernels, which cannot read them).
interpreter_only = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="forces Triton on CPU tensors"
)


#: 16×16 tiles on CPU: several and ragged last tiles at these sizes, and a fast interpreter
CONFIG = elementwise.ElementwiseConfig(block=16) if DEVICE == "cpu" else elementwise.CONFIG


def _reference(g, buf, momentum, nesterov):
    buf = buf.clone()
    if g.dtype == buf.dtype:
        buf.lerp_(g, 1 - momentum)
        u = g.lerp(buf, momentum) if nesterov else buf
    else:
        buf.mul_(momentum).add_(g, alpha=1 - momentum)
        u = buf * momentum + g.float() * (1 - momentum) if nesterov else buf
    return buf, u


# (n, m, k): wide, tall (transposed into the stack), square, ragged tiles, an expert stack
SHAPES = [(5, 7, 1), (20, 13, 1), (13, 20, 1), (33, 33, 1), (16, 48, 2), (40, 9, 3), (1, 30, 1)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("nesterov", [True, False], ids=["nesterov", "plain"])
@pytest.mark.parametrize(
    "dtypes",
    [
        (torch.float32, torch.float32, torch.float32),
        (torch.float32, torch.float32, torch.float16),
        (torch.float16, torch.float32, torch.float16),
    ],
    ids=["fp32", "fp32-to-fp16", "fp16-grad-fp32-buf"],
)
def test_momentum_stack_matches_torch(shape, nesterov, dtypes):
    n, m, k = shape
    g_dtype, b_dtype, out_dtype = dtypes
    gen = torch.Generator().manual_seed(n * 100 + m)
    count = 3
    full = (k, n, m) if k > 1 else (n, m)
    grads = [torch.randn(full, generator=gen).to(DEVICE, g_dtype) for _ in range(count)]
    bufs = [torch.randn(full, generator=gen).to(DEVICE, b_dtype) for _ in range(count)]
    grads_before = [g.clone() for g in grads]
    expected = [_reference(g, b, 0.9, nesterov) for g, b in zip(grads, bufs, strict=True)]

    K, s, L = count * k, min(n, m), max(n, m)
    out = torch.empty(K, s, L, dtype=out_dtype, device=DEVICE)
    partials = torch.empty(K, elementwise.num_tiles(n, m, CONFIG), device=DEVICE)
    elementwise.momentum_stack(
        grads, bufs, out, partials, n=n, m=m, momentum=0.9, nesterov=nesterov, config=CONFIG
    )

    for g, g0 in zip(grads, grads_before, strict=True):
        assert torch.equal(g, g0)  # gradients are read only
    for b, (b_ref, _) in zip(bufs, expected, strict=True):
        torch.testing.assert_close(b, b_ref, rtol=1e-6, atol=1e-6)
    u_ref = torch.cat([u.reshape(k, n, m) for _, u in expected])
    u_ref = (u_ref.mT if n > m else u_ref).to(out_dtype)
    fp16_ulp = dict(rtol=2e-3, atol=1e-3) if out_dtype == torch.float16 else {}
    torch.testing.assert_close(out, u_ref, **fp16_ulp)
    norms = torch.linalg.matrix_norm(out.double()).float()
    torch.testing.assert_close(partials.sum(1).sqrt(), norms, rtol=1e-5, atol=0)


@settings(deadline=None, max_examples=20)
@given(
    n=st.integers(1, 40),
    m=st.integers(1, 40),
    k=st.integers(1, 3),
    count=st.integers(1, 3),
    momentum=st.sampled_from([0.0, 0.5, 0.9, 0.95, 0.999]),
    nesterov=st.booleans(),
    scale=st.sampled_from([1e-30, 1e-6, 1.0, 1e6]),
    seed=st.integers(0, 2**16),
)
def test_momentum_stack_property(n, m, k, count, momentum, nesterov, scale, seed):
    """Any shape/orientation, momentum and gradient scale (tiny to huge): the torch ops' result."""
    gen = torch.Generator().manual_seed(seed)
    full = (k, n, m) if k > 1 else (n, m)
    grads = [(torch.randn(full, generator=gen) * scale).to(DEVICE) for _ in range(count)]
    bufs = [(torch.randn(full, generator=gen) * scale).to(DEVICE) for _ in range(count)]
    expected = [_reference(g, b, momentum, nesterov) for g, b in zip(grads, bufs, strict=True)]
    out = torch.empty(count * k, min(n, m), max(n, m), device=DEVICE)
    partials = torch.empty(count * k, elementwise.num_tiles(n, m, CONFIG), device=DEVICE)
    elementwise.momentum_stack(
        grads, bufs, out, partials, n=n, m=m, momentum=momentum, nesterov=nesterov, config=CONFIG
    )
    tol = dict(rtol=1e-6, atol=1e-6 * scale)
    for b, (b_ref, _) in zip(bufs, expected, strict=True):
        torch.testing.assert_close(b, b_ref, **tol)
    u_ref = torch.cat([u.reshape(k, n, m) for _, u in expected])
    torch.testing.assert_close(out, u_ref.mT if n > m else u_ref, **tol)
    # Squares of entries ~1e-30 underflow float32 (as in torch's float32 norm): harmless, since
    # the normalisation divides by max(norm, eps = 1e-7) and both sides are then eps.
    norms = torch.linalg.matrix_norm(out.double()).clamp_min(1e-7)
    got = partials.double().sum(1).sqrt().clamp_min(1e-7)
    torch.testing.assert_close(got, norms, rtol=1e-5, atol=0)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_apply_update_matches_torch(shape, dtype):
    n, m, k = shape
    gen = torch.Generator().manual_seed(7 * n + m)
    full = (k, n, m) if k > 1 else (n, m)
    params = [torch.randn(full, generator=gen).to(DEVICE, dtype) for _ in range(2)]
    # the wide iteration output, read through a transposed view for tall matrices
    wide = torch.randn(2 * k, min(n, m), max(n, m), generator=gen).to(DEVICE, torch.float16)
    update = wide.mT if n > m else wide
    expected = [
        (0.99 * p.float() - 0.02 * u.float().reshape(full)).to(dtype)
        for p, u in zip(params, update.reshape(2, k, n, m), strict=True)
    ]
    elementwise.apply_update(params, update, factor=0.99, scale=-0.02, config=CONFIG)
    for p, e in zip(params, expected, strict=True):
        tol = {} if dtype == torch.float32 else {"rtol": 1e-3, "atol": 1e-3}  # one fp16 ulp
        torch.testing.assert_close(p, e, **tol)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_divide_by_norms_matches_torch(out_dtype):
    gen = torch.Generator().manual_seed(5)
    X = torch.randn(3, 7, 33, generator=gen).to(DEVICE)
    X[1] = 0  # a zero matrix stays zero; a tiny one is divided by eps, not by its norm
    X[2] *= 1e-12
    norms = torch.linalg.matrix_norm(X) * torch.tensor([1.5, 1.0, 1.0], device=DEVICE)
    expected = (X / (norms.reshape(-1, 1, 1) * 1.01).clamp_min(1e-7)).to(out_dtype)
    out = X if out_dtype == X.dtype else torch.empty_like(X, dtype=out_dtype)
    got = elementwise.divide_by_norms(X, norms, 1.01, 1e-7, out, config=CONFIG)
    assert got is out
    torch.testing.assert_close(got, expected, rtol=0, atol=0)  # correctly rounded, as torch's


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float16), (torch.float16, torch.float32)])
def test_cast_matches_torch(dtypes):
    src, dst = dtypes
    X = torch.randn(3, 5, 77, generator=torch.Generator().manual_seed(1)).to(DEVICE, src)
    assert torch.equal(elementwise.cast(X, dst, config=CONFIG), X.to(dst))
    assert torch.equal(elementwise.cast(X.mT, dst), X.mT.to(dst))  # strided: torch's copy
    assert elementwise.cast(X, src) is X


def test_kernels_reject_what_they_cannot_address():
    X = torch.randn(8, 6, device=DEVICE)
    with pytest.raises(ValueError, match="contiguous"):
        elementwise.apply_update([X.mT], torch.zeros(1, 6, 8, device=DEVICE), factor=1, scale=1)
    with pytest.raises(ValueError, match="`out`"):
        elementwise.momentum_stack(
            [X], [X.clone()], torch.empty(1, 8, 6, device=DEVICE),
            torch.empty(1, 1, device=DEVICE), n=8, m=6, momentum=0.9, nesterov=True,
        )  # fmt: skip


# ------------------------------------------------------------------------------------------
# The optimizer's fused path vs its torch path
# ------------------------------------------------------------------------------------------


@pytest.fixture
def fused_on_cpu(monkeypatch):
    """Let ``muon()`` take the fused Triton path for CPU tensors (interpreter); count it."""
    calls = {"n": 0}
    real = fused_mod.applies

    def forced(*args):
        on = real(*args)
        calls["n"] += on
        return on

    monkeypatch.setattr(fused_mod, "use_triton", lambda *t: True)
    monkeypatch.setattr(fused_mod, "applies", forced)
    return calls


def _run(shapes, seed, steps=2, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
    opt = Muon(params, lr=0.05, weight_decay=0.1, **kwargs)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return params, [opt.state[p]["momentum_buffer"] for p in params]


@st.composite
def shape_lists(draw):
    dims = st.sampled_from([1, 3, 8, 17, 24])
    shapes = []
    for _ in range(draw(st.integers(1, 3))):
        n, m = draw(dims), draw(dims)
        shapes += [(n, m)] * draw(st.integers(1, 2))
        if draw(st.booleans()):
            shapes.append((m, n))
        if draw(st.booleans()):
            shapes.append((2, n, m))
    return shapes


@interpreter_only
@settings(deadline=None, max_examples=15)
@given(
    shapes=shape_lists(),
    seed=st.integers(0, 2**16),
    nesterov=st.booleans(),
    adjust=st.sampled_from([None, "original", "match_rms_adamw"]),
)
def test_fused_step_equals_torch_step(shapes, seed, nesterov, adjust):
    kwargs = dict(nesterov=nesterov, adjust_lr_fn=adjust)
    ref_params, ref_bufs = _run(shapes, seed, **kwargs)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fused_mod, "use_triton", lambda *t: True)
        params, bufs = _run(shapes, seed, **kwargs)
    for x, y in zip(params + bufs, ref_params + ref_bufs, strict=True):
        # the same float32 arithmetic, but the norms summed in another order and W updated with
        # one rounding instead of two; Newton–Schulz amplifies those ulps (slopes up to a ≈ 8
        # per step), measured up to 1.1e-6 on W (the update moves W by lr = 0.05): atol 1e-5.
        # A wrong transpose, coefficient or momentum form moves W by ~1e-2.
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@interpreter_only
def test_fused_step_equals_torch_step_over_several_ragged_tiles(fused_on_cpu):
    """Matrices of several default-size tiles, ragged at both edges, both orientations in one
    bucket: the partial-sum layout of a mixed bucket."""
    shapes = [(70, 130), (130, 70), (2, 65, 66)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fused_mod, "applies", lambda *a: False)
        ref_params, ref_bufs = _run(shapes, 3, steps=1)
    params, bufs = _run(shapes, 3, steps=1)
    assert fused_on_cpu["n"] == 1
    for x, y in zip(params + bufs, ref_params + ref_bufs, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@interpreter_only
def test_fused_path_taken_and_deterministic(fused_on_cpu):
    shapes = [(24, 8), (8, 24), (16, 16), (2, 8, 24)]
    a, _ = _run(shapes, 0, ns_coefficients=(3.4445, -4.7750, 2.0315))
    assert fused_on_cpu["n"] == 2
    b, _ = _run(shapes, 0, ns_coefficients=(3.4445, -4.7750, 2.0315))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_fused_path_falls_back_where_it_cannot_run(fused_on_cpu):
    conv = torch.nn.Conv2d(4, 8, 3).to(memory_format=torch.channels_last)
    opt = Muon([conv.weight], lr=0.01)
    conv.weight.grad = torch.randn_like(conv.weight)  # channels_last: not contiguous
    opt.step()
    opt = Muon([torch.nn.Parameter(torch.randn(8, 8))], lr=torch.tensor(0.01))
    opt.param_groups[0]["params"][0].grad = torch.randn(8, 8)
    opt.step()  # tensor lr
    opt = Muon([torch.nn.Parameter(torch.randn(8, 8))], lr=0.01, update="mclip")
    opt.param_groups[0]["params"][0].grad = torch.randn(8, 8)
    opt.step()
    assert fused_on_cpu["n"] == 0


# ------------------------------------------------------------------------------------------
# CUDA-graph replay of the bucket orthogonalisation (optim/_fused.py)
# ------------------------------------------------------------------------------------------


def test_graph_cache_is_not_state_and_off_cuda_unused():
    params = [torch.nn.Parameter(torch.randn(8, 12)) for _ in range(2)]
    opt = Muon(params, lr=0.02, cuda_graphs=True)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    opt.step()
    assert len(opt._graphs) == 0  # CPU: never captured
    assert not BucketGraphs().usable(10, torch.device("cpu"))
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    assert all(set(st) == {"momentum_buffer"} for st in sd["state"].values())
    assert len(copy.deepcopy(opt)._graphs) == 0
    assert len(pickle.loads(pickle.dumps(opt._graphs))) == 0
    with pytest.raises(ValueError, match="cuda_graphs"):
        Muon(params, cuda_graphs="yes")


def test_graph_key_holds_the_kernel_choice():
    """A bucket graph captured on one kernel choice is never replayed under another: the key
    holds :func:`matfn.functional.graph_key` and the cache's :class:`FusedConfig`."""
    group = {"ns_steps": 5}
    args = ([((8, 12), 0)], torch.float32, torch.device("cpu"), group)
    graphs = BucketGraphs()
    key = graphs.key(*args)
    assert key == graphs.key(*args) and graph_key() in key
    other = BucketGraphs(dataclasses.replace(graphs.config, gpu_time_kernels=False))
    assert other.key(*args) != key
    assert graphs.key(*args[:3], {"ns_steps": 6}) != key


@pytest.mark.parametrize("gpu_time_kernels", [True, False])
def test_bucket_graphs_record_on_the_configured_kernels(monkeypatch, fake_cuda, gpu_time_kernels):
    """Warm-up and capture run inside ``for_graph()`` exactly when the config asks for the
    GPU-fastest kernels; a bucket is captured on its second sighting only, once."""
    inside = [False]

    @contextlib.contextmanager
    def for_graph():
        inside[0] = True
        try:
            yield
        finally:
            inside[0] = False

    monkeypatch.setattr(fused_mod, "for_graph", for_graph)
    modes = []

    def orthogonalize(stack, partials):
        modes.append(inside[0])
        return stack

    cache = BucketGraphs(FusedConfig(gpu_time_kernels=gpu_time_kernels))
    stack, partials = torch.zeros(2, 3, 4), torch.zeros(2)
    for _ in range(3):
        cache.maybe_capture("bucket", stack, partials, orthogonalize)
    assert modes == [gpu_time_kernels] * 2 and len(cache) == 1
    assert not inside[0]


def test_bucket_graphs_keep_at_most_max_graphs(fake_cuda):
    cache = BucketGraphs(FusedConfig(max_graphs=2))
    stack, partials = torch.zeros(1, 2, 2), torch.zeros(1)
    for key in ("a", "a", "b", "b", "c", "c"):
        cache.maybe_capture(key, stack, partials, lambda X, P: X)
    assert len(cache) == 2 and cache.lookup("a") is None and cache.lookup("c") is not None
    assert not cache.usable(2**27, torch.device("cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("gpu_time_kernels", [False, True], ids=["eager-kernels", "gpu-fastest"])
def test_graph_replay_equals_eager_steps(gpu_time_kernels):
    """Replayed bucket graphs give the eager steps' parameters: bitwise-level when they launch
    the eager kernels; within the bf16 iteration's rounding (‖Δ‖ ≤ 1 % of the parameters' move,
    the NS error against float64 being ≈ 0.3 %) when they take the GPU-fastest ones."""
    config = FusedConfig(gpu_time_kernels=gpu_time_kernels)
    shapes = [(64, 64)] * 3 + [(64, 256), (256, 64)]
    gen = torch.Generator(device="cuda").manual_seed(0)
    grads = [[torch.randn(s, device="cuda", generator=gen) for s in shapes] for _ in range(4)]
    results = []
    for graphs in (True, False):
        params = [torch.nn.Parameter(torch.zeros(s, device="cuda")) for s in shapes]
        opt = Muon(params, lr=0.02, cuda_graphs=graphs)
        opt._graphs = BucketGraphs(config)
        for step_grads in grads:
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g.clone()
            opt.step()
        assert len(opt._graphs) == (2 if graphs else 0)  # both buckets captured on step 2
        results.append(params)
    for x, y in zip(*results, strict=True):
        if gpu_time_kernels:
            assert float((x - y).norm() / y.norm()) <= 1e-2
        else:
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
