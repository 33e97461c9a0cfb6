"""The ``torch.ops.matfn.mcsgn`` and ``torch.ops.matfn.solve_sylvester`` custom ops.

opcheck (schema, fake tensors, autograd registration, AOT dispatch with dynamic shapes) on a few
shapes and dtypes; ``torch.compile(fullgraph=True)`` and ``torch.export`` of the public
functions against eager; the registered backward against finite differences; mcsgn's sync-free
combination (int ``steps``, ``check_finite=False``, ``check_convergence=False``) run on meta
tensors, where any read of a value fails. GPU tests (inductor with the Triton kernels inside,
CUDA-graph capture) run only with ``MATFN_TEST_ON_GPU=1`` on a GPU.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import matfn
from matfn.mcsgn import _mcsgn_compute
from matfn.msign import TABLE_METHOD

ON_GPU = bool(os.environ.get("MATFN_TEST_ON_GPU")) and torch.cuda.is_available()
gpu = pytest.mark.skipif(not ON_GPU, reason="needs a GPU (MATFN_TEST_ON_GPU=1)")
has_cxx = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("c++", "g++", "clang++")),
    reason="inductor on CPU needs a C++ compiler",
)

TABLE = [(3.0, -3.2, 1.2)] * 6


def sign_input(*batch: int, n: int = 5, dtype=torch.float64, device="cpu", seed=0):
    """``Q D Q⁻¹``: real eigenvalues of both signs in ±[0.5, 3], a mildly non-normal basis."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.randn(*batch, n, n, generator=g, dtype=torch.float64) * 0.3
    Q = Q + torch.eye(n, dtype=torch.float64)
    d = torch.linspace(0.5, 3.0, n, dtype=torch.float64) * torch.tensor([1.0, -1.0]).repeat(n)[:n]
    M = Q @ torch.diag_embed(d.expand(*batch, n)) @ torch.linalg.inv(Q)
    return M.to(device=device, dtype=dtype)


def symmetric_input(*batch: int, n: int = 5, dtype=torch.float64, device="cpu", seed=0):
    """``Q D Qᵀ`` with ``Q`` orthogonal: eigenvalues of both signs in ±[0.5, 3]."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(*batch, n, n, generator=g, dtype=torch.float64)).Q
    d = torch.linspace(0.5, 3.0, n, dtype=torch.float64) * torch.tensor([1.0, -1.0]).repeat(n)[:n]
    M = Q @ torch.diag_embed(d.expand(*batch, n)) @ Q.mT
    return (0.5 * (M + M.mT)).to(device=device, dtype=dtype)


def sylvester_input(*batch: int, n: int = 4, m: int = 3, dtype=torch.float64, device="cpu"):
    """``A (…, n, n)``, ``B (m, m)`` with spectra in the right half-plane, ``C (…, n, m)``."""
    g = torch.Generator().manual_seed(1)

    def coefficient(*shape: int) -> torch.Tensor:
        k = shape[-1]
        noise = torch.randn(*shape, generator=g, dtype=torch.float64) * (0.6 / k**0.5)
        return noise + 2 * torch.eye(k)  # eigenvalues within about 0.6 of 2

    A, B = coefficient(*batch, n, n), coefficient(m, m)
    C = torch.randn(*batch, n, m, generator=g, dtype=torch.float64)
    return tuple(t.to(device=device, dtype=dtype) for t in (A, B, C))


def mcsgn_args(M: torch.Tensor, **options) -> tuple:
    """The op's positional arguments for the defaults of :func:`matfn.mcsgn` plus ``options``."""
    o = {"method": "polar_express", "table": [], "steps": None, "auto": True, "eps": 1e-30}
    o |= {"check_finite": True, "check_convergence": True, "cuda_graph": False}
    o["compute_dtype"] = torch.float64 if M.dtype == torch.float64 else torch.float32
    o |= options
    keys = ("method", "table", "steps", "auto", "eps", "compute_dtype", "check_finite")
    return (M, *(o[k] for k in keys), o["check_convergence"], o["cuda_graph"])


# --- opcheck ----------------------------------------------------------------------------------

MCSGN_CASES = [
    pytest.param((2,), torch.float64, {}, True, id="newton-f64-batch-grad"),
    pytest.param((), torch.float32, {}, False, id="newton-f32"),
    pytest.param((3,), torch.float32, {"auto": False, "steps": 8}, False, id="steps8-f32"),
    pytest.param(
        (2, 1),
        torch.float64,
        {"auto": False, "method": TABLE_METHOD, "table": [v for r in TABLE for v in r]},
        True,
        id="table-f64-grad",
    ),
    pytest.param((2,), torch.float64, {"auto": False, "method": "svd"}, False, id="svd"),
]


@pytest.mark.parametrize(("batch", "dtype", "options", "grad"), MCSGN_CASES)
def test_opcheck_mcsgn(batch, dtype, options, grad):
    # a polynomial table needs real eigenvalues: symmetric input
    table = options.get("method") == TABLE_METHOD
    M = (symmetric_input if table else sign_input)(*batch, dtype=dtype)
    torch.library.opcheck(torch.ops.matfn.mcsgn, mcsgn_args(M.requires_grad_(grad), **options))


@pytest.mark.parametrize(
    ("batch", "dtype", "grad"),
    [((2,), torch.float64, True), ((), torch.float32, False), ((3,), torch.float32, True)],
    ids=["f64-batch-grad", "f32", "f32-batch-grad"],
)
def test_opcheck_solve_sylvester(batch, dtype, grad):
    A, B, C = sylvester_input(*batch, dtype=dtype)
    K = C.reshape(-1, *C.shape[-2:]).shape[0]
    args = (
        A.reshape(-1, *A.shape[-2:]).requires_grad_(grad),
        B.expand(K, *B.shape).contiguous().requires_grad_(grad),
        C.reshape(-1, *C.shape[-2:]).requires_grad_(grad),
        torch.float64 if dtype == torch.float64 else torch.float32,
        None,
        True,
    )
    torch.library.opcheck(torch.ops.matfn.solve_sylvester, args)


# --- the backward -----------------------------------------------------------------------------


def test_mcsgn_backward_is_the_frechet_derivative():
    # Newton path (non-symmetric), a fixed schedule and the eig reference: all the derivative
    # of the exact sign, which finite differences of the float64 Newton path reproduce.
    M = sign_input(2, n=4).requires_grad_()
    assert torch.autograd.gradcheck(matfn.mcsgn, (M,))
    S = symmetric_input(2, n=4).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: matfn.mcsgn(x, steps=30), (S,))
    assert torch.autograd.gradcheck(lambda x: matfn.mcsgn(x, method="svd"), (M,))


def test_solve_sylvester_backward_against_finite_differences():
    A, B, C = (t.requires_grad_() for t in sylvester_input(2))
    assert torch.autograd.gradcheck(matfn.solve_sylvester, (A, B, C))
    # Broadcast batch dims reduce the gradient of the shared B.
    assert torch.autograd.gradcheck(
        lambda a, b, c: matfn.solve_sylvester(a, b, c, compute_dtype=torch.float32), (A, B, C)
    )


# --- torch.compile, FakeTensor, export ---------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [{}, {"steps": 8}, {"method": TABLE, "check_convergence": False}, {"method": "svd"}],
    ids=["auto", "steps8", "table", "svd"],
)
def test_compiled_mcsgn_matches_eager(options):
    M = (symmetric_input if options.get("method") is TABLE else sign_input)(2)
    f = torch.compile(lambda x: matfn.mcsgn(x, **options), fullgraph=True, backend="aot_eager")
    assert torch.equal(f(M), matfn.mcsgn(M, **options))


def test_compiled_mcsgn_dynamic_shapes_and_errors():
    f = torch.compile(matfn.mcsgn, fullgraph=True, backend="aot_eager", dynamic=True)
    for n in (4, 5):
        M = sign_input(3, n=n, dtype=torch.float32)
        assert torch.equal(f(M), matfn.mcsgn(M))
    # Errors raised inside the op reach the caller unchanged.
    R = torch.tensor([[0.0, -2.0], [2.0, 0.0]], dtype=torch.float64)  # eigenvalues ±2i
    with pytest.raises(matfn.MatrixSignConvergenceError, match="imaginary axis"):
        f(R)
    bad = sign_input(n=4)
    bad[0, 1] = float("nan")
    with pytest.raises(ValueError, match="`M` contains NaN or Inf"):
        f(bad)


def test_compiled_solve_sylvester_matches_eager_forward_and_backward():
    A, B, C = sylvester_input(2)
    f = torch.compile(matfn.solve_sylvester, fullgraph=True, backend="aot_eager")
    assert torch.equal(f(A, B, C), matfn.solve_sylvester(A, B, C))
    g = torch.compile(
        lambda a, b, c: matfn.solve_sylvester(a, b, c).float(),
        fullgraph=True,
        backend="aot_eager",
        dynamic=True,
    )
    for n in (4, 6):
        A, B, C = sylvester_input(3, n=n)
        assert torch.equal(g(A, B, C), matfn.solve_sylvester(A, B, C).float())

    def loss(a, b, c):
        return (matfn.solve_sylvester(a, b, c) ** 2).sum()

    eager = [t.clone().requires_grad_() for t in (A, B, C)]
    loss(*eager).backward()
    compiled = [t.clone().requires_grad_() for t in (A, B, C)]
    torch.compile(loss, fullgraph=True, backend="aot_eager")(*compiled).backward()
    for e, c in zip(eager, compiled, strict=True):
        torch.testing.assert_close(c.grad, e.grad, rtol=0, atol=0)


def test_compiled_mcsgn_backward_matches_eager():
    M = sign_input(2)

    def loss(x):
        return (matfn.mcsgn(x) * x.mT).sum()

    eager = M.clone().requires_grad_()
    loss(eager).backward()
    compiled = M.clone().requires_grad_()
    torch.compile(loss, fullgraph=True, backend="aot_eager")(compiled).backward()
    torch.testing.assert_close(compiled.grad, eager.grad, rtol=0, atol=0)


def test_fake_tensors_give_shape_and_dtype():
    with FakeTensorMode():
        S = matfn.mcsgn(torch.empty(3, 5, 5, dtype=torch.bfloat16))
        X = matfn.solve_sylvester(
            torch.empty(2, 1, 4, 4),
            torch.empty(3, 3, dtype=torch.float64),
            torch.empty(5, 4, 3),
        )
    assert S.shape == (3, 5, 5) and S.dtype == torch.bfloat16
    assert X.shape == (2, 5, 4, 3) and X.dtype == torch.float64


class _SignAndSolve(torch.nn.Module):
    def forward(self, M, B, C):
        S = matfn.mcsgn(M, steps=8)
        return S, matfn.solve_sylvester(S @ S + M @ M.mT, B, C)


def test_export_keeps_each_op_as_one_node():
    M = symmetric_input(2, dtype=torch.float32)
    _, B, C = sylvester_input(2, n=5, dtype=torch.float32)
    ep = torch.export.export(_SignAndSolve(), (M, B, C))
    targets = [node.target for node in ep.graph.nodes]
    assert targets.count(torch.ops.matfn.mcsgn.default) == 1
    assert targets.count(torch.ops.matfn.solve_sylvester.default) == 1
    for got, want in zip(ep.module()(M, B, C), _SignAndSolve()(M, B, C), strict=True):
        assert torch.equal(got, want)


@has_cxx
def test_inductor_on_cpu_matches_eager():
    M = sign_input(2, dtype=torch.float32)
    A, B, C = sylvester_input(2, dtype=torch.float32)

    def both(m, a, b, c):
        return matfn.mcsgn(2.0 * m), matfn.solve_sylvester(a, b, 3.0 * c)

    got = torch.compile(both, fullgraph=True)(M, A, B, C)
    for g, w in zip(got, both(M, A, B, C), strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


# --- host synchronisation ---------------------------------------------------------------------


@pytest.mark.parametrize("method", ["polar_express", TABLE], ids=["steps5", "table"])
def test_mcsgn_fixed_steps_unchecked_reads_no_value(method):
    # Meta tensors have no values: any host read (bool(), float(), .item()) of the compute path
    # raises, so running it on them proves the path is free of host syncs (CUDA-graph safe).
    M = torch.empty(2, 6, 6, device="meta")
    steps = 5 if method == "polar_express" else None
    S = _mcsgn_compute(M, method if method == "polar_express" else tuple(TABLE), steps,
                       1e-30, torch.float32, check_convergence=False, cuda_graph=False)  # fmt: skip
    assert S.shape == M.shape and S.is_meta
    with pytest.raises((RuntimeError, NotImplementedError)):  # the checked path reads values
        _mcsgn_compute(M, "polar_express", 5, 1e-30, torch.float32, True, False)


# --- GPU ----------------------------------------------------------------------------------------


@gpu
def test_gpu_inductor_matches_eager():
    M = symmetric_input(4, n=64, dtype=torch.float32, device="cuda")
    for options in ({}, {"steps": 8}, {"steps": 5, "check_finite": False}):
        f = torch.compile(lambda x, o=options: matfn.mcsgn(x, **o), fullgraph=True)
        torch.testing.assert_close(f(M), matfn.mcsgn(M, **options), rtol=1e-5, atol=1e-5)
    A, B, C = sylvester_input(2, n=32, m=16, dtype=torch.float32, device="cuda")
    g = torch.compile(matfn.solve_sylvester, fullgraph=True)
    torch.testing.assert_close(g(A, B, C), matfn.solve_sylvester(A, B, C), rtol=1e-5, atol=1e-5)


@gpu
def test_gpu_cuda_graph_capture_of_fixed_steps_unchecked_mcsgn():
    M = symmetric_input(4, n=256, dtype=torch.float32, device="cuda")
    options = {"steps": 5, "check_finite": False, "check_convergence": False}
    static = M.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        matfn.mcsgn(static, **options)  # warm-up: kernel selection off the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")  # any host sync raises
    try:
        with torch.cuda.graph(graph):
            out = matfn.mcsgn(static, **options)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    fresh = symmetric_input(4, n=256, dtype=torch.float32, device="cuda", seed=3)
    static.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, matfn.mcsgn(fresh, **options), rtol=1e-5, atol=1e-5)
