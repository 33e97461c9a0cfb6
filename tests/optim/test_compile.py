"""torch.compile, FakeTensor and torch.export of optim: the custom ops and the compiled Muon step.

CPU tests run in CI (``backend="aot_eager"``; one ``inductor`` case each, skipped without a C++
compiler). GPU tests (inductor with the Triton kernels inside the ops, CUDA-graph capture) run
with ``MATFN_TEST_ON_GPU=1`` on a CUDA machine and skip elsewhere.
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from optim import Muon, QKClip, muon_param_groups
from optim._math import op_options, orthogonalize, orthogonalize_op
from optim.max_logit import max_logits

from .toy_attention import ToyLM

ON_GPU = bool(os.environ.get("MATFN_TEST_ON_GPU")) and torch.cuda.is_available()
gpu = pytest.mark.skipif(not ON_GPU, reason="needs CUDA and MATFN_TEST_ON_GPU=1")


def _has_cxx() -> bool:
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception:  # noqa: BLE001 - any failure to find one means: skip
        return False
    return True


needs_cxx = pytest.mark.skipif(not _has_cxx(), reason="inductor on CPU needs a C++ compiler")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: no cache hits, no recompile limit across tests."""
    torch._dynamo.reset()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second intra-op thread only adds spin-wait
    yield
    torch.set_num_threads(threads)
    torch._dynamo.reset()


# --------------------------------------------------------------------------- max_logits


def _qk(shape_q, shape_k, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(shape_q, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(shape_k, generator=g).to(device=device, dtype=dtype)
    return q, k


OPCHECK_CASES = [
    # (q shape, k shape, dtype, causal, scale, use_abs)
    ((2, 4, 5, 8), (2, 2, 5, 8), torch.float32, True, None, False),
    ((1, 3, 7, 4), (1, 1, 7, 4), torch.float64, False, 0.5, True),
    ((2, 2, 6, 8), (2, 2, 9, 8), torch.bfloat16, True, None, False),
    ((1, 2, 0, 4), (1, 2, 3, 4), torch.float32, True, None, False),
]


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: f"{c[0]}-{c[2]}-causal{c[3]}")
def test_max_logits_opcheck(case):
    sq, sk, dtype, causal, scale, use_abs = case
    q, k = _qk(sq, sk, dtype)
    torch.library.opcheck(torch.ops.matfn.max_logits.default, (q, k, causal, scale, use_abs))


def test_max_logits_opcheck_noncontiguous():
    q, k = _qk((2, 6, 4, 8), (2, 6, 2, 8))
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, S, D) views with permuted strides
    torch.library.opcheck(torch.ops.matfn.max_logits.default, (q, k, False, None, False))


def test_max_logits_op_is_the_public_function():
    q, k = _qk((2, 4, 5, 8), (2, 2, 5, 8))
    want = max_logits(q, k, causal=False, scale=0.3, use_abs=True)
    got = torch.ops.matfn.max_logits(q, k, False, 0.3, True)
    assert torch.equal(got, want)
    # no autograd formula: the statistic is taken without gradient, as before the op
    assert not max_logits(q.requires_grad_(), k).requires_grad


@pytest.mark.parametrize("dynamic", [False, True])
def test_max_logits_compile_fullgraph(dynamic):
    q, k = _qk((2, 4, 6, 8), (2, 2, 6, 8))

    def f(q, k):
        return max_logits(q * 2, k, causal=True).clamp_min(-1e4) + 1

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    torch.testing.assert_close(compiled(q, k), f(q, k), rtol=0, atol=0)
    q2, k2 = _qk((1, 6, 3, 8), (1, 3, 3, 8), seed=1)  # new shapes (symbolic when dynamic)
    torch.testing.assert_close(compiled(q2, k2), f(q2, k2), rtol=0, atol=0)


def test_max_logits_fake_tensor():
    with FakeTensorMode():
        q, k = torch.empty(2, 6, 5, 8), torch.empty(2, 3, 5, 8)
        out = max_logits(q, k)
        out64 = max_logits(q.double(), k.double())
        out_half = max_logits(q.bfloat16(), k.bfloat16())
    assert out.shape == (6,) and out.dtype == torch.float32
    assert out64.shape == (6,) and out64.dtype == torch.float64
    assert out_half.dtype == torch.float32


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(16, 16)
        self.k = nn.Linear(16, 8)

    def forward(self, x):
        B, S, _ = x.shape
        q = self.q(x).view(B, S, 4, 4).transpose(1, 2)
        k = self.k(x).view(B, S, 2, 4).transpose(1, 2)
        return max_logits(q, k, causal=True)


def test_max_logits_export():
    module = _Attention()
    x = torch.randn(2, 5, 16)
    program = torch.export.export(module, (x,))
    assert "matfn.max_logits" in str(program.graph)
    x2 = torch.randn(2, 5, 16)
    torch.testing.assert_close(program.module()(x2), module(x2), rtol=0, atol=0)


def test_qk_clip_records_inside_a_compiled_model():
    """QKClip.record in the attention forward of a fullgraph-compiled model: same statistics."""
    torch.manual_seed(0)
    model = ToyLM(layers=2, num_kv_heads=2)
    qk = QKClip(tau=100.0)
    model.register(qk)
    tokens = torch.randint(0, 32, (2, 8))
    torch.compile(model, backend="aot_eager", fullgraph=True)(tokens)
    compiled = qk.max_logits()
    qk.reset()
    model(tokens)
    eager = qk.max_logits()
    assert compiled.keys() == eager.keys() == {"layer0", "layer1"}
    for name in eager:
        assert torch.isfinite(eager[name]).all()
        torch.testing.assert_close(compiled[name], eager[name], rtol=0, atol=0)


@needs_cxx
def test_max_logits_compile_inductor():
    q, k = _qk((2, 4, 6, 8), (2, 2, 6, 8))

    def f(q, k):
        return max_logits(q, k, scale=0.5) * 3

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(q, k), f(q, k))


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_max_logits_compile_and_capture_on_gpu(dtype):
    q, k = _qk((2, 8, 256, 64), (2, 2, 256, 64), dtype, device="cuda")
    want = max_logits(q, k)

    def f(q, k):
        return max_logits(q, k)

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(q, k), want, rtol=0, atol=0)
    # no host sync: the public call can be captured into the user's CUDA graph
    static_q, static_k = q.clone(), k.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        max_logits(static_q, static_k)  # warm-up (Triton compile) off the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = max_logits(static_q, static_k)
    q2, k2 = _qk((2, 8, 256, 64), (2, 2, 256, 64), dtype, seed=1, device="cuda")
    static_q.copy_(q2)
    static_k.copy_(k2)
    graph.replay()
    torch.testing.assert_close(out, max_logits(q2, k2), rtol=0, atol=0)


# --------------------------------------------------------------------------- muon_orthogonalize


def _group(**changes):
    group = {
        "ns_coefficients": None,
        "ns_steps": None,
        "eps": 1e-7,
        "msign": "polar_express",
        "update": "msign",
        "mclip_scale": 1.0,
        "ns_algorithm": "auto",
        "ns_dtype": None,
        "matrix_view": "auto",
    }
    group.update(changes)
    return group


ORTHO_CASES = [
    ((3, 6, 10), torch.float32, _group()),
    ((2, 5, 5), torch.float64, _group(ns_coefficients=(3.4445, -4.775, 2.0315), ns_steps=4)),
    ((2, 4, 9), torch.float32, _group(update="mclip", mclip_scale=0.7)),
    ((1, 4, 40), torch.float32, _group(ns_algorithm="gram", msign="keller", ns_steps=6)),
    ((2, 4, 6), torch.float32, _group(ns_dtype=torch.bfloat16)),
]


@pytest.mark.parametrize("case", ORTHO_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_muon_orthogonalize_opcheck_and_eager_match(case):
    shape, dtype, group = case
    X = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    args = (X, *op_options(group))
    torch.library.opcheck(torch.ops.matfn.muon_orthogonalize.default, args)
    got = orthogonalize_op(*args)
    want = orthogonalize(X, group)
    assert got.dtype == want.dtype and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@gpu
@pytest.mark.parametrize("shape", [(4, 64, 96), (2, 256, 1024)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_muon_orthogonalize_opcheck_on_gpu(shape, dtype):
    # bf16 iterations may run in fp16 inside (the folded path): the op returns the iteration
    # dtype the fake promises, bf16, either way
    X = torch.randn(shape, device="cuda").to(dtype)
    group = _group()
    args = (X, *op_options(group))
    torch.library.opcheck(torch.ops.matfn.muon_orthogonalize.default, args)
    got = orthogonalize_op(*args)
    assert got.dtype == torch.bfloat16
    want = orthogonalize(X, group, out_dtype=torch.bfloat16)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the eager default (iteration dtype, fp16 on the folded path) to its rounding
    torch.testing.assert_close(got.float(), orthogonalize(X, group).float(), rtol=0, atol=2e-2)


def test_muon_orthogonalize_compiled_tall_and_empty():
    group = _group()
    X = torch.randn(2, 9, 4)  # tall: the wrapper transposes around the op

    def f(X):
        return orthogonalize(X, group)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(X), f(X), rtol=0, atol=0)
    Z = torch.zeros(0, 3, 5)
    assert compiled(Z).shape == (0, 3, 5)


# --------------------------------------------------------------------------- compiled Muon step


class _Net(nn.Module):
    """Tall, wide and square matrices, an expert stack, biases, a norm and a head."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(12, 24)  # 24×12 (tall)
        self.norm = nn.LayerNorm(24)
        self.mid = nn.Linear(24, 24, bias=False)
        self.down = nn.Linear(24, 16)  # 16×24 (wide)
        self.experts = nn.Parameter(torch.randn(2, 16, 8) / 4)
        self.head = nn.Linear(8, 3)  # AdamW (muon_param_groups' head)


def _grads(model, steps, seed=1, device="cpu"):
    """The same gradients for both optimizers: only the optimizers' arithmetic can differ."""
    g = torch.Generator().manual_seed(seed)
    return [
        [torch.randn(p.shape, generator=g).to(device) for p in model.parameters()]
        for _ in range(steps)
    ]


def _compare_steps(make_opt, *, backend, steps=3, device="cpu", tol=1e-4):
    """Step an eager and a ``torch.compile``d optimizer side by side; compare after each step.

    Each parameter of the compiled copy must match the eager one to ``tol`` of how far the
    eager parameter has moved (max norms): the moves, not the weights, carry the optimizer's
    arithmetic.
    """
    torch.manual_seed(0)
    eager_model = _Net().to(device)
    compiled_model = copy.deepcopy(eager_model)
    start = [p.detach().clone() for p in eager_model.parameters()]
    eager_opt, compiled_opt = make_opt(eager_model), make_opt(compiled_model)
    step = torch.compile(compiled_opt.step, backend=backend, fullgraph=True)
    for grads in _grads(eager_model, steps, device=device):
        for model in (eager_model, compiled_model):
            for p, g in zip(model.parameters(), grads, strict=True):
                p.grad = g.clone()
        eager_opt.step()
        step()
        for (name, pe), pc, p0 in zip(
            eager_model.named_parameters(), compiled_model.parameters(), start, strict=True
        ):
            move = (pe - p0).abs().max().item()
            err = (pc - pe).abs().max().item()
            assert move > 0, name
            assert err <= tol * move, f"{name}: |compiled − eager| {err:.3g} vs move {move:.3g}"
    return eager_opt, compiled_opt


def _muon(model, **kwargs):
    return Muon(muon_param_groups(model), lr=0.02, adamw_lr=3e-3, **kwargs)


# float32 on CPU. The compiled step runs the same operations, but AOT decomposes lerp, the
# foreach ops and AdamW's addcdiv into primitives (inductor also fuses and reorders them), so
# the element-wise results differ from eager by float32 rounding (~1e-7 relative). Newton–Schulz
# amplifies a perturbation of its input by up to about ‖U‖/σ_min(U) (≲ 100 for these random
# momenta) and the moves accumulate over the steps: 1e-4 of the move is 20× the ≤ 5e-6
# observed, while any real difference (a wrong coefficient, a lost momentum or decay term)
# changes the move by percents.
STEP_CASES = {
    "polar_express": {},
    "keller-no-nesterov-unbatched": dict(
        ns_coefficients=(3.4445, -4.775, 2.0315), nesterov=False, batched=False
    ),
    "mclip-match-rms": dict(update="mclip", mclip_scale=0.5, adjust_lr_fn="match_rms_adamw"),
    "tensor-lr-table": dict(ns_coefficients=[(3.0, -3.2, 1.2), (2.0, -1.5, 0.5)]),
    "gram": dict(ns_algorithm="gram"),  # the path CUDA takes for 768×3072 buckets
}


@pytest.mark.parametrize("name", list(STEP_CASES))
def test_compiled_muon_step_matches_eager(name):
    kwargs = dict(STEP_CASES[name])

    def make(model):
        opt = _muon(model, **kwargs)
        if name.startswith("tensor-lr"):
            for group in opt.param_groups:
                group["lr"] = torch.tensor(group["lr"])
        return opt

    eager_opt, compiled_opt = _compare_steps(make, backend="aot_eager")
    # the compiled step keeps the same state
    for pe, pc in zip(eager_opt.state.values(), compiled_opt.state.values(), strict=True):
        assert pe.keys() == pc.keys()


@needs_cxx
@pytest.mark.slow
def test_compiled_muon_step_matches_eager_inductor():
    _compare_steps(_muon, backend="inductor", steps=2)


def test_compiled_muon_step_bf16_params():
    """bf16 weights with float32 momentum: the per-tensor (not foreach) branches trace too."""

    def make(model):
        model.to(torch.bfloat16)
        return _muon(model)

    torch.manual_seed(0)
    model = _Net()
    opt = make(model)
    step = torch.compile(opt.step, backend="aot_eager", fullgraph=True)
    for grads in _grads(model, 2):
        for p, g in zip(model.parameters(), grads, strict=True):
            p.grad = g.to(p.dtype)
        step()
    muon_params = opt.param_groups[0]["params"]
    assert all(opt.state[p]["momentum_buffer"].dtype == torch.float32 for p in muon_params)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@gpu
def test_compiled_muon_step_on_gpu_matches_eager():
    # bf16 iteration on CUDA: eager runs the Triton element-wise passes and its own norms,
    # the compiled step inductor's fused element-wise code and torch's norms around the op, so
    # the Newton–Schulz inputs differ by float32 rounding and the bf16 iteration turns that
    # into bf16-level differences of O (2⁻⁸ ≈ 4e-3 relative per step, amplified as above):
    # 3e-2 of the move.
    _compare_steps(_muon, backend="inductor", device="cuda", steps=3, tol=3e-2)


@gpu
def test_compiled_muon_step_on_gpu_skips_bucket_graphs():
    torch.manual_seed(0)
    model = _Net().cuda()
    opt = _muon(model, cuda_graphs=True)
    step = torch.compile(opt.step, backend="inductor", fullgraph=True)
    for grads in _grads(model, 3, device="cuda"):
        for p, g in zip(model.parameters(), grads, strict=True):
            p.grad = g
        step()
    assert len(opt._graphs) == 0  # under compile the bucket graphs are never captured
    assert all(math.isfinite(p.abs().max().item()) for p in model.parameters())
