"""The custom ops of msign, mclip, msign_jvp and msign_vjp: opcheck, compile, FakeTensor, export.

``torch.ops.matfn.{msign, mclip, mclip_backward, msign_jvp, msign_vjp}`` hold the compute paths;
the public functions validate in pure Python and call them, so ``torch.compile(fullgraph=True)``
traces each public call (backward included) to one node per op. On the CPU (CI): opcheck,
aot_eager and inductor compiles, FakeTensorMode, ``torch.export``. With ``MATFN_TEST_ON_GPU=1``
on a GPU: inductor compiles with the Triton kernels inside, and ``torch.cuda.graph`` captures of
the public calls with ``check_finite=False`` and fixed steps (no host sync).
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.testing import assert_close

import matfn
from matfn.msign import result_like
from tests.strategies import MatrixCase

ON_GPU = bool(os.environ.get("MATFN_TEST_ON_GPU")) and torch.cuda.is_available()
gpu = pytest.mark.skipif(not ON_GPU, reason="needs a GPU (MATFN_TEST_ON_GPU=1)")
HAS_CXX = any(shutil.which(c) for c in (os.environ.get("CXX") or "g++", "c++", "clang++"))

#: Keller's quintic as a 3-row per-step table, flattened as the ops take it.
TABLE = [(3.4445, -4.775, 2.0315)] * 3
FLAT = [v for row in TABLE for v in row]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _matrix(shape, dtype=torch.float64, seed=0, device="cpu"):
    return MatrixCase(shape, dtype=dtype, cond=10.0, seed=seed).tensor(device)


def _randn(shape, dtype=torch.float64, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# opcheck
# ---------------------------------------------------------------------------------------------

#: (shape, dtype, method, table, steps, auto_steps, algorithm, compute_dtype)
MSIGN_ARGS = [
    ((2, 6, 9), torch.float64, "polar_express", [], None, False, "auto", None),
    ((7, 4), torch.float32, "polar_express", [], 4, False, "standard", None),
    ((2, 1, 5, 5), torch.float32, "table", FLAT, None, False, "gram", torch.float64),
    ((6, 4), torch.float64, "polar_express", [], None, True, "auto", None),
    ((3, 5), torch.float64, "svd", [], None, False, "auto", None),
]


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("case", MSIGN_ARGS, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
def test_opcheck_msign(case, requires_grad):
    shape, dtype, method, table, steps, auto, algorithm, cdt = case
    M = _matrix(shape, dtype).requires_grad_(requires_grad)
    args = (M, method, table, steps, auto, algorithm, 1e-7, cdt, True)
    torch.library.opcheck(torch.ops.matfn.msign, args)


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize(
    "case",
    [
        ((2, 5, 7), torch.float64, 0.3, 0.0, "polar_express", [], None, "F3"),
        ((6, 4), torch.float32, 0.5, 0.1, "table", FLAT, None, "F2"),
        ((4, 4), torch.float64, 100.0, 0.0, "polar_express", [], 6, "F3"),  # exact-M rule
        ((3, 5), torch.float64, 0.4, 0.0, "svd", [], None, "F3"),
    ],
    ids=lambda c: f"{c[0]}-{c[1]}-{c[4]}-{c[7]}",
)
def test_opcheck_mclip(case, requires_grad):
    shape, dtype, max_sv, min_sv, method, table, steps, form = case
    M = _matrix(shape, dtype).requires_grad_(requires_grad)
    options = (max_sv, min_sv, method, table, steps, False, form, "auto", 1e-7, None, True)
    torch.library.opcheck(torch.ops.matfn.mclip, (M, *options))
    grad = _randn(shape, dtype)
    torch.library.opcheck(torch.ops.matfn.mclip_backward, (grad, M.detach(), *options))


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize(
    "case",
    [
        ((2, 5, 7), (5, 7), torch.float64, "auto"),
        ((6, 4), (6, 4), torch.float32, "sylvester"),
        ((3, 3, 3), (3, 3, 3), torch.float64, "svd"),
    ],
    ids=lambda c: f"{c[0]}-{c[2]}-{c[3]}",
)
@pytest.mark.parametrize("name", ["msign_jvp", "msign_vjp"])
def test_opcheck_derivatives(name, case, requires_grad):
    shape, dshape, dtype, method = case
    M = _matrix(shape, dtype)
    D = _randn(dshape, dtype).requires_grad_(requires_grad)  # linear in D; M is not differentiable
    op = getattr(torch.ops.matfn, name)
    torch.library.opcheck(op, (M, D, method, None, None, True))


def test_opcheck_vjp_with_the_forward_output():
    M = _matrix((5, 8))
    O = matfn.msign(M, steps="auto")
    G = _randn((5, 8))
    torch.library.opcheck(torch.ops.matfn.msign_vjp, (M, G, "auto", None, None, False, O))


# ---------------------------------------------------------------------------------------------
# the public functions compile (fullgraph), backward included, and match eager
# ---------------------------------------------------------------------------------------------

D_FIXED = _randn((2, 6, 9), seed=5)
CALLS = {
    "msign": lambda M: matfn.msign(M),
    "msign-table": lambda M: matfn.msign(M, method=TABLE),
    "msign-auto": lambda M: matfn.msign(M, steps="auto"),
    "msign-svd": lambda M: matfn.msign(M, method="svd"),
    "msign-graph-flag": lambda M: matfn.msign(M, cuda_graph=True, check_finite=False, steps=5),
    "mclip": lambda M: matfn.mclip(M, max_sv=0.3),
    "mclip-table-min": lambda M: matfn.mclip(M, max_sv=0.5, min_sv=0.1, method=TABLE),
    "mclip-graph-flag": lambda M: matfn.mclip(M, max_sv=0.3, cuda_graph=True, check_finite=False),
    "msign_jvp": lambda M: matfn.msign_jvp(M, D_FIXED),
    "msign_vjp": lambda M: matfn.msign_vjp(M, D_FIXED, method="svd"),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_compile_fullgraph_matches_eager(name):
    fn = CALLS[name]
    M = _matrix((2, 6, 9), seed=3)
    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(M)
    assert torch.equal(out, fn(M))


@pytest.mark.parametrize(
    "fn",
    [
        lambda M: matfn.msign(M),
        lambda M: matfn.msign(M, method=TABLE, steps=3),
        lambda M: matfn.mclip(M, max_sv=0.3),
        lambda M: matfn.mclip(M, max_sv=0.5, min_sv=0.1, form="F2"),
    ],
    ids=["msign", "msign-table", "mclip", "mclip-min-F2"],
)
@pytest.mark.parametrize("shape", [(2, 6, 9), (7, 4)], ids=str)
def test_compile_backward_matches_eager(fn, shape):
    M = _matrix(shape, seed=4)
    W = _randn(shape, seed=6)

    def loss(X):
        return (fn(X) * W).sum()

    ref_in = M.clone().requires_grad_()
    loss(ref_in).backward()
    X = M.clone().requires_grad_()
    torch.compile(loss, fullgraph=True, backend="aot_eager")(X).backward()
    assert_close(X.grad, ref_in.grad, rtol=1e-12, atol=1e-14)


def test_compile_dynamic_shapes():
    fn = torch.compile(
        lambda M: matfn.msign(M) + matfn.mclip(M, max_sv=0.3),
        fullgraph=True,
        backend="aot_eager",
        dynamic=True,
    )
    for shape in [(2, 6, 9), (3, 5, 11), (8, 5)]:
        M = _matrix(shape, seed=len(shape))
        out = fn(M)
        assert torch.equal(out, matfn.msign(M) + matfn.mclip(M, max_sv=0.3)), shape


def test_compiled_call_still_checks_finiteness():
    M = _matrix((4, 6))
    M[1, 2] = float("nan")
    fn = torch.compile(lambda X: matfn.msign(X), fullgraph=True, backend="aot_eager")
    with pytest.raises(ValueError, match="`M` contains NaN or Inf"):
        fn(M)


@pytest.mark.skipif(not HAS_CXX, reason="inductor on the CPU needs a C++ compiler")
def test_inductor_cpu():
    M = _matrix((2, 6, 9), dtype=torch.float32, seed=2)

    def fn(X):
        return 2 * matfn.msign(X, method=TABLE) + matfn.mclip(X, max_sv=0.3)

    out = torch.compile(fn, fullgraph=True, backend="inductor")(M)
    assert_close(out, fn(M), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# FakeTensor, meta layout, export
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 6, 9), (9, 6), (3, 1, 4, 4), (0, 5, 3)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_fake_tensor_mode(shape, dtype):
    with FakeTensorMode():
        M = torch.empty(shape, dtype=dtype)
        D = torch.empty(shape[-2:], dtype=torch.float64)
        outs = [
            matfn.msign(M),
            matfn.msign(M, method=TABLE),
            matfn.mclip(M, max_sv=0.3),
            matfn.msign_jvp(M, D),
            matfn.msign_vjp(M, D),
        ]
    for out, out_dtype in zip(outs, [dtype] * 3 + [torch.float64] * 2, strict=True):
        assert out.shape == shape and out.dtype == out_dtype


@pytest.mark.parametrize(
    "M",
    [
        _matrix((2, 6, 9)),
        _matrix((2, 9, 6)),
        _matrix((9, 6)).mT.contiguous().mT,  # tall, column-major
        _matrix((4, 9, 6))[::2],  # strided batch
        _matrix((1, 6)),
        _matrix((6, 1)),
        _matrix((5, 5)),
    ],
    ids=["wide", "tall", "tall-colmajor", "strided-batch", "row", "column", "square"],
)
def test_results_have_the_fake_layout(M):
    """Compiled graphs trust the fake result's strides: every op returns exactly that layout."""
    D = _randn(M.shape)
    outs = [
        matfn.msign(M),
        matfn.msign(M, method="svd"),
        matfn.mclip(M, max_sv=0.3),
        matfn.mclip(M, max_sv=1e3),  # the exact-M rule: a copy of M
        matfn.msign_jvp(M, D),
        matfn.msign_vjp(M, D, method="svd"),
    ]
    layout = result_like(M).stride()
    for out in outs:
        assert out.stride() == layout
        assert out.untyped_storage().data_ptr() != M.untyped_storage().data_ptr()


class _Muonish(torch.nn.Module):
    def forward(self, M: torch.Tensor) -> torch.Tensor:
        return matfn.msign(M, method=TABLE) + matfn.mclip(M, max_sv=0.3, steps=6)


def test_export():
    M = _matrix((2, 6, 9), seed=7)
    program = torch.export.export(_Muonish(), (M,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"matfn.msign.default", "matfn.mclip.default"} <= targets
    assert torch.equal(program.module()(M), _Muonish()(M))


# torch's forward-AD set-up (make_dual) scripts its decompositions with the deprecated jit.
@pytest.mark.filterwarnings("ignore:`torch.jit.script")
def test_forward_mode_ad_still_works():
    M = _matrix((5, 7))
    T = _randn((5, 7))
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(M, T)
        tangent = torch.autograd.forward_ad.unpack_dual(matfn.msign(dual)).tangent
    assert_close(tangent, matfn.msign_jvp(M, T), rtol=1e-10, atol=1e-12)


def test_vjp_is_differentiable_in_the_direction_only():
    M = _matrix((5, 7))
    G = _randn((5, 7)).requires_grad_()
    W = _randn((5, 7), seed=9)
    (matfn.msign_vjp(M, G) * W).sum().backward()
    assert_close(G.grad, matfn.msign_jvp(M, W), rtol=1e-10, atol=1e-12)  # J is self-adjoint
    Mg = M.clone().requires_grad_()
    out = matfn.msign_jvp(Mg, G.detach())
    with pytest.raises(RuntimeError, match="differentiate twice"):
        out.sum().backward()


# ---------------------------------------------------------------------------------------------
# GPU: inductor with the Triton kernels inside, and CUDA-graph capture of the public calls
# ---------------------------------------------------------------------------------------------

#: Every GPU call below iterates in bf16/fp16 (the CUDA default, float32 inputs included), and
#: the two sides of each comparison may run different kernels (eager calls replay a graph whose
#: kernels are chosen by GPU time): they agree to that rounding, 2⁻⁸ (measured ≤ 1.3e-3).
GPU_TOL = 2**-8

GPU_CALLS = {
    "msign-bf16": (lambda M: matfn.msign(M, check_finite=False, steps=5), torch.bfloat16),
    "msign-table": (lambda M: matfn.msign(M, method=TABLE, check_finite=False), torch.float32),
    "msign-gram": (
        lambda M: matfn.msign(M, algorithm="gram", check_finite=False, steps=5),
        torch.float32,
    ),
    "mclip": (lambda M: matfn.mclip(M, max_sv=0.3, check_finite=False, steps=6), torch.float32),
}


@gpu
@pytest.mark.parametrize("name", list(GPU_CALLS))
def test_gpu_inductor_matches_eager(name):
    fn, dtype = GPU_CALLS[name]
    M = _matrix((4, 256, 512), dtype=dtype, device="cuda")
    out = torch.compile(fn, fullgraph=True, backend="inductor")(M)
    tol = GPU_TOL
    assert_close(out, fn(M), rtol=tol, atol=tol)


@gpu
def test_gpu_inductor_backward_and_derivatives():
    M = _matrix((2, 64, 96), dtype=torch.float32, device="cuda")
    W = _randn((2, 64, 96), dtype=torch.float32, device="cuda")

    def loss(X):
        return (matfn.msign(X) * W).sum()

    ref_in = M.clone().requires_grad_()
    loss(ref_in).backward()
    X = M.clone().requires_grad_()
    torch.compile(loss, fullgraph=True, backend="inductor")(X).backward()
    assert_close(X.grad, ref_in.grad, rtol=1e-5, atol=1e-6)
    jvp = torch.compile(lambda A: matfn.msign_jvp(A, W), fullgraph=True, backend="inductor")
    assert_close(jvp(M), matfn.msign_jvp(M, W), rtol=1e-5, atol=1e-6)


@gpu
@pytest.mark.parametrize("name", list(GPU_CALLS))
@pytest.mark.parametrize("shape", [(1024, 1024), (4, 256, 512)], ids=str)
def test_gpu_cuda_graph_capture_of_the_public_call(name, shape):
    """No host sync with check_finite=False and fixed steps: the user's capture replays it."""
    fn, dtype = GPU_CALLS[name]
    static = _matrix(shape, dtype=dtype, device="cuda")
    fn(static)  # warm-up off the capture (autotuning, cuBLAS workspaces)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(static)
    new = _matrix(shape, dtype=dtype, seed=11, device="cuda")
    static.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    # the capture records the kernels chosen for graph replay (kernels.recording): same
    # iteration, possibly another summation order
    tol = GPU_TOL
    assert_close(out, fn(new), rtol=tol, atol=tol)
