"""The custom ops ``torch.ops.matfn.tri_inv`` / ``tri_solve``: opcheck, compile, export, capture.

CPU tests: ``torch.library.opcheck`` (schema, autograd registration, FakeTensor, AOT dispatch
with dynamic shapes); ``torch.compile(fullgraph=True)`` of the public functions (``aot_eager``,
once ``dynamic=True``, once inductor) matches eager, gradients included; FakeTensorMode;
``torch.export``. GPU tests (``MATFN_TEST_ON_GPU=1`` on a CUDA machine): inductor with the
Triton kernels inside, and ``torch.cuda.graph`` capture of the public calls with
``check_finite=False`` and a tensor ``diag``.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.testing import assert_close

import matfn
from matfn.triangular import ops

F64 = torch.float64
ON_GPU = bool(os.environ.get("MATFN_TEST_ON_GPU")) and torch.cuda.is_available()
gpu = pytest.mark.skipif(not ON_GPU, reason="needs CUDA and MATFN_TEST_ON_GPU=1")


def _case(batch, n, d, e, seed=0, dtype=F64, decay=None, device="cpu"):
    """``(Q, K, V, λ, ℓ)``: a well-conditioned system; ``ℓ`` None, per row or per channel."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.randn((*batch, n, d), generator=g, dtype=F64) / d
    K = torch.nn.functional.normalize(torch.randn((*batch, n, d), generator=g, dtype=F64), dim=-1)
    V = torch.randn((*batch, n, e), generator=g, dtype=F64)
    lam = 1 + torch.rand((*batch, n), generator=g, dtype=F64)
    ld = None
    if decay == "row":
        ld = -torch.rand((*batch, n), generator=g, dtype=F64)
    elif decay == "channel":
        ld = -torch.rand((*batch, n, d), generator=g, dtype=F64)
    out = [x.to(dtype=dtype, device=device) for x in (Q, K, V, lam)]
    return (*out, None if ld is None else ld.to(dtype=dtype, device=device))


def _op_decay(ld, Q):
    """``ℓ`` in the op's ``(..., n, g)`` form (what the public functions pass)."""
    if ld is None or ld.shape == Q.shape:
        return ld
    return ld.unsqueeze(-1)


def _grad_leaves(*xs):
    return [None if x is None else x.detach().clone().requires_grad_() for x in xs]


def _grads(out, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out.shape, generator=g, dtype=F64).to(out)
    leaves = [x for x in inputs if x is not None and x.requires_grad]
    return torch.autograd.grad(out, leaves, w)


# ---------------------------------------------------------------------------------------------
# opcheck
# ---------------------------------------------------------------------------------------------

OPCHECK_CASES = [
    # (dtype, batch, diag, decay)
    (F64, (2,), "tensor", None),
    (torch.float32, (), "float", None),
    (F64, (2, 1), "float", "row"),
    (torch.float32, (2,), "tensor", "channel"),
]


@pytest.mark.parametrize(("dtype", "batch", "diag", "decay"), OPCHECK_CASES)
def test_opcheck(dtype, batch, diag, decay):
    n = 10
    Q, K, V, lam, ld = _case(batch, n, 3, 2, dtype=dtype, decay=decay)
    if diag == "float":  # what the public functions pass for a number: a 0-dim tensor expanded
        lam = torch.full((), 2.0, dtype=dtype).expand(Q.shape[:-1])
    ld = _op_decay(ld, Q)
    Q, K, V, ld = _grad_leaves(Q, K, V, ld)
    if diag == "tensor":
        lam = lam.clone().requires_grad_()
    torch.library.opcheck(torch.ops.matfn.tri_inv.default, (Q, K, lam, ld, 4, True))
    torch.library.opcheck(torch.ops.matfn.tri_solve.default, (Q, K, V, lam, ld, 4, False))


@pytest.mark.parametrize("decay", [None, "row", "channel"])
def test_opcheck_backward_ops(decay):
    Q, K, V, lam, ld = _case((2,), 10, 3, 2, decay=decay)
    ld = _op_decay(ld, Q)
    dY, dX = torch.randn(2, 10, 10, dtype=F64), torch.randn(2, 10, 2, dtype=F64)
    X = torch.ops.matfn.tri_solve(Q, K, V, lam, ld, 4, False)
    Y = torch.ops.matfn.tri_inv(Q, K, lam, ld, 4, False)
    need_ld = ld is not None
    inv_needs = [True, False, True, need_ld]
    solve_needs = [False, True, True, True, need_ld]
    args = (Q, K, lam, ld, Y if need_ld else None, dY, 4, inv_needs)
    torch.library.opcheck(torch.ops.matfn.tri_inv_backward.default, args)
    args = (Q, K, V, lam.float(), ld, X, dX, 4, solve_needs)
    torch.library.opcheck(torch.ops.matfn.tri_solve_backward.default, args)
    # the bodies, as a replayed call's backward runs them (no graph on CPU: the same values)
    got = ops.inv_grads(Q, K, lam, ld, Y, dY, 4, inv_needs, replay=True)
    want = torch.ops.matfn.tri_inv_backward(Q, K, lam, ld, Y, dY, 4, inv_needs)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, rtol=0, atol=0)
    needs = [True, True, True, False, need_ld]
    got = ops.solve_grads(Q, K, V, lam, ld, X, dX, 4, needs, replay=True)
    want = torch.ops.matfn.tri_solve_backward(Q, K, V, lam, ld, X, dX, 4, needs)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, rtol=0, atol=0)


def test_ops_are_registered_and_do_not_alias():
    Q, K, V, lam, _ = _case((), 6, 2, 2)
    Q0 = Q.clone()
    Y = torch.ops.matfn.tri_inv(Q, K, lam, None, 4, True)
    X = torch.ops.matfn.tri_solve(Q, K, V, lam, None, 4, True)
    assert_close(Y, matfn.tri_inv(Q, K, lam, chunk_size=4), rtol=0, atol=0)
    assert_close(X, matfn.tri_solve(Q, K, V, lam, chunk_size=4), rtol=0, atol=0)
    assert X.data_ptr() != V.data_ptr() and torch.equal(Q, Q0)
    assert Y.is_contiguous() and X.is_contiguous()


def test_op_checks_values_only_with_check_finite():
    Q, K, V, lam, _ = _case((), 6, 2, 2)
    lam[3] = 0
    with pytest.raises(matfn.triangular.SingularTriangularError, match="index 3"):
        torch.ops.matfn.tri_solve(Q, K, V, lam, None, 4, True)
    assert torch.isinf(torch.ops.matfn.tri_inv(Q, K, lam, None, 4, False)[3, 3])


# ---------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------


def _public(Q, K, V, lam, ld, chunk_size=4, check_finite=True):
    """Both public functions in one graph (a scalar loss of each, so one backward)."""
    Y = matfn.tri_inv(Q, K, lam, log_decay=ld, chunk_size=chunk_size, check_finite=check_finite)
    X = matfn.tri_solve(
        Q, K, V, lam, log_decay=ld, chunk_size=chunk_size, check_finite=check_finite
    )
    return Y, X


def _assert_compiled_matches(fn, compiled, inputs, rtol=0.0, atol=0.0):
    eager_in, comp_in = _grad_leaves(*inputs), _grad_leaves(*inputs)
    want = fn(*eager_in)
    got = compiled(*comp_in)
    for a, b in zip(got, want, strict=True):
        assert_close(a, b, rtol=rtol, atol=atol)
    loss = lambda outs: sum((o * o).sum() for o in outs)  # noqa: E731
    gw = torch.autograd.grad(loss(want), [x for x in eager_in if x is not None])
    gg = torch.autograd.grad(loss(got), [x for x in comp_in if x is not None])
    for a, b in zip(gg, gw, strict=True):
        assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    ("diag", "decay"), [("tensor", None), ("float", None), ("tensor", "row"), ("none", "channel")]
)
def test_compile_fullgraph_aot_eager(diag, decay):
    torch._dynamo.reset()
    Q, K, V, lam, ld = _case((2,), 12, 3, 2, decay=decay)
    if diag == "tensor":

        def fn(Q, K, V, lam, ld):
            return _public(Q, K, V, lam, ld)

        inputs = (Q, K, V, lam, ld)
    else:
        value = 2.0 if diag == "float" else None

        def fn(Q, K, V, ld):
            return _public(Q, K, V, value, ld)

        inputs = (Q, K, V, ld)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    _assert_compiled_matches(fn, compiled, inputs)


def test_compile_dynamic_shapes():
    torch._dynamo.reset()
    compiled = torch.compile(_public, fullgraph=True, backend="aot_eager", dynamic=True)
    for n in (9, 14):
        Q, K, V, lam, _ = _case((2,), n, 3, 2, seed=n)
        _assert_compiled_matches(_public, compiled, (Q, K, V, lam, None))


def test_compile_check_finite_still_raises():
    """The value checks run inside the op node, so a compiled call raises like eager."""
    torch._dynamo.reset()
    Q, K, V, lam, _ = _case((), 8, 2, 2)
    Q[2, 1] = float("nan")
    compiled = torch.compile(_public, fullgraph=True, backend="aot_eager")
    with pytest.raises(ValueError, match="`Q`.*NaN or Inf"):
        compiled(Q, K, V, lam, None)


def _cpp_compiler() -> bool:
    return any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++", "c++"))


@pytest.mark.skipif(not _cpp_compiler(), reason="inductor on CPU needs a C++ compiler")
def test_compile_inductor_cpu():
    torch._dynamo.reset()
    Q, K, V, lam, _ = _case((2,), 12, 3, 2)

    def fn(Q, K, V, lam):  # an epilogue for inductor to fuse around the ops
        Y, X = _public(2 * Q, K, V, lam.abs() + 1, None)
        return Y.sum(-1), X.tanh()

    compiled = torch.compile(fn, fullgraph=True, backend="inductor")
    _assert_compiled_matches(fn, compiled, (Q, K, V, lam), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# FakeTensor and export
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
def test_fake_tensor_mode(dtype):
    Q, K, V, lam, ld = _case((2, 3), 7, 4, 5, decay="row")
    Q, K, V, lam_d, ld = Q.to(dtype), K.to(dtype), V.to(dtype), lam.to(dtype), ld.float()
    with FakeTensorMode() as mode:
        q, k, v, lm, l_, lmd = map(mode.from_tensor, (Q, K, V, lam, ld, lam_d))
        Y = matfn.tri_inv(q, k, lm, log_decay=l_)
        X = matfn.tri_solve(q, k, v, 2.0)
        X2 = matfn.tri_solve(q, k, v, lmd, log_decay=l_)
    assert Y.shape == (2, 3, 7, 7) and Y.dtype == F64
    assert X.shape == (2, 3, 7, 5) and X.dtype == dtype
    want = torch.promote_types(dtype, torch.float32)
    assert X2.shape == (2, 3, 7, 5) and X2.dtype == want


class _Mixer(torch.nn.Module):
    """A DeltaNet-like layer: ``T⁻¹ V`` and ``T⁻¹`` with a learned diagonal."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.diag = torch.nn.Parameter(1 + torch.linspace(0, 1, n, dtype=F64))

    def forward(self, Q, K, V, ld):
        X = matfn.tri_solve(Q, K, V, self.diag, log_decay=ld, chunk_size=4)
        Y = matfn.tri_inv(Q, K, self.diag, chunk_size=4, check_finite=False)
        return X + Y @ V


def test_export():
    Q, K, V, _, ld = _case((2,), 10, 3, 2, decay="row")
    module = _Mixer(10)
    program = torch.export.export(module, (Q, K, V, ld))
    text = str(program.graph)
    assert "matfn.tri_solve" in text and "matfn.tri_inv" in text
    assert_close(program.module()(Q, K, V, ld), module(Q, K, V, ld), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# GPU: inductor with the Triton kernels inside, and capture in the user's CUDA graph
# ---------------------------------------------------------------------------------------------


@gpu
@pytest.mark.parametrize("decay", [None, "channel"])
def test_gpu_compile_inductor(decay):
    torch._dynamo.reset()
    Q, K, V, lam, ld = _case((2,), 256, 32, 16, dtype=torch.float32, decay=decay, device="cuda")

    def fn(Q, K, V, lam, ld):
        Y, X = _public(Q, K, V, lam, ld, chunk_size=64)
        return Y * 2, X + 1

    compiled = torch.compile(fn, fullgraph=True, backend="inductor")
    _assert_compiled_matches(fn, compiled, (Q, K, V, lam, ld), rtol=1e-5, atol=1e-5)


def _capture_replays(call, inputs, fresh, rtol, atol):
    """Capture ``call(*inputs)`` in a CUDA graph, refill the inputs with ``fresh``, replay and
    compare with the eager call on ``fresh``."""
    static = [x.clone() for x in inputs]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: Triton compiles outside the capture
        for _ in range(2):
            call(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call(*static)
    for s, x in zip(static, fresh, strict=True):
        s.copy_(x)
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, call(*fresh), rtol=rtol, atol=atol)


@gpu
@pytest.mark.parametrize(
    ("batch", "n", "d", "dtype"),
    [((2,), 96, 8, F64), ((2,), 256, 32, torch.float32), ((), 4096, 128, torch.float32)],
)
def test_gpu_capture_public_calls(batch, n, d, dtype):
    """``check_finite=False`` with a tensor ``diag`` reads no value on the host: the public
    calls capture, and replays on new inputs give the eager results. Under capture a small
    ``tri_solve`` takes the tree solve (eager: the scan), so results agree to rounding."""
    a = _case(batch, n, d, 16, seed=0, dtype=dtype, device="cuda")[:4]
    b = _case(batch, n, d, 16, seed=1, dtype=dtype, device="cuda")[:4]
    tol = 1e-10 if dtype == F64 else 2e-4

    def inv(Q, K, V, lam):
        return matfn.tri_inv(Q, K, lam, check_finite=False)

    def solve(Q, K, V, lam):
        return matfn.tri_solve(Q, K, V, lam, check_finite=False)

    _capture_replays(inv, a, b, tol, tol)
    _capture_replays(solve, a, b, tol, tol)
