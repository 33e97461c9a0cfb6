"""The path choice (matfn.msign.path): which path runs, the Gram option, and msign end to end
through the kernels.

The Triton path is exercised on CPU by forcing ``use_triton`` (the interpreter then runs the
kernels on CPU tensors, in float32 — the interpreter has no bf16). Tolerances: kernels vs the
torch path in float32 differ by summation order only (≤ 2e-5 relative after 5–8 steps); the Gram
and standard iterations compute the same polynomial, equal in float64 to 1e-12 (the restart
criterion bounds the amplification of rounding by |q| ≤ 60).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given

from matfn import _backend
from matfn.coefficients import schedule
from matfn.kernels import launch, recording
from matfn.msign import path
from matfn.msign.path import choose_algorithm, normalize, run_newton_schulz
from matfn.msign.reference import (
    gram_newton_schulz_torch,
    gram_restarts,
    newton_schulz_torch,
    sign_step_torch,
)
from tests.strategies import matrices


def test_use_triton_cpu_and_disable(monkeypatch):
    x = torch.zeros(2, 3)
    assert not _backend.use_triton(x)
    assert not _backend.use_triton()
    assert not path.kernels_apply(x[None])
    assert not path.folded_applies(x[None])
    # the size rule alone (device-independent): B·s²·L ≥ 2³⁴ multiply-adds per product
    assert path.gpu_bound(torch.empty(1, 1, 1).expand(24, 768, 3072))
    assert not path.gpu_bound(torch.empty(1, 1, 1).expand(32, 128, 4096))
    monkeypatch.setenv("MATFN_DISABLE_TRITON", "1")
    assert not _backend.use_triton(x)


def test_import_matfn_does_not_import_triton():
    code = (
        "import sys, matfn, matfn.functional, matfn.msign.path, matfn.kernels.recording; "
        "print('triton' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_gram_restarts():
    pe5, _ = schedule("polar_express", 5)
    assert gram_restarts(pe5) == (1, 3)
    assert gram_restarts(schedule("polar_express", 8)[0]) == (1, 4)
    assert gram_restarts(schedule("keller", 5)[0]) == (2,)
    assert gram_restarts(schedule("cubic", 12)[0]) == (6,)
    assert gram_restarts([(1.875, -1.25, 0.375)]) == ()


def test_choose_algorithm():
    assert choose_algorithm("standard", 10, 1000, 5) == "standard"
    assert choose_algorithm("gram", 10, 10, 5) == "gram"
    assert choose_algorithm("auto", 64, 64, 5) == "standard"  # square: Gram costs more
    assert choose_algorithm("auto", 64, 4096, 5) == "gram"
    # general products, two restarts: Gram from L > 8s (0.8 margin)
    assert choose_algorithm("auto", 100, 790, 5, restarts=2) == "standard"
    assert choose_algorithm("auto", 100, 810, 5, restarts=2) == "gram"
    # symmetric kernels (0.9 margin, measured): standard 65 s³ vs Gram with two restarts 56 s³
    # at L = 4s → Gram; at L = 3s, 50 s³ vs 47 s³ → standard
    assert choose_algorithm("auto", 4096, 16384, 5, restarts=2, symmetric=True) == "gram"
    assert choose_algorithm("auto", 4096, 12288, 5, restarts=2, symmetric=True) == "standard"


METHODS = [("polar_express", 5), ("polar_express", 8), ("tuned", 6), ("keller", 5), ("cubic", 9)]


@given(case=matrices(dtypes=(torch.float64,), max_side=40, rank_deficient=True, scales=None))
def test_gram_equals_standard_float64(case):
    """Gram NS (with its restarts) and standard NS are the same polynomial: equal in float64."""
    M = case.tensor()
    X = M.reshape(-1, *M.shape[-2:])
    X = X if X.shape[-2] <= X.shape[-1] else X.mT
    for method, steps in METHODS:
        coeffs, factor = schedule(method, steps)
        X0 = normalize(X, factor, 1e-7, torch.float64)
        std = newton_schulz_torch(X0, coeffs)
        gram = gram_newton_schulz_torch(X0, coeffs)
        # Both orders of rounding (≈ 1e-16 per product) are amplified by the schedule's slope on
        # null/noise directions, ∏ a_t ≈ 2e3 for 8 Polar-Express steps: 1e-11 leaves 5× margin.
        torch.testing.assert_close(gram, std, rtol=0, atol=1e-11, msg=f"{method} {steps}")


@pytest.fixture
def force_kernels(monkeypatch, ns_config):
    """Route CPU float32 batches to the Triton kernels (interpreter) and count the calls."""
    from matfn.msign import triton as ns

    if os.environ.get("MATFN_TEST_ON_GPU"):  # CPU tensors reach the kernels only interpreted
        pytest.skip("needs TRITON_INTERPRET=1 (CPU tensors through the kernels)")

    calls = {"n": 0}
    monkeypatch.setattr(path, "use_triton", lambda *t: True)
    ns_config(min_triton_work=0, min_triton_side=0)
    monkeypatch.setattr(path, "_KERNEL_DTYPES", (torch.float32, torch.float16))
    real = ns.gram_triton

    def spy(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(ns, "gram_triton", spy)
    return calls


@pytest.mark.parametrize("algorithm", ["standard", "gram"])
@pytest.mark.parametrize("shape", [(2, 12, 30), (1, 17, 17), (3, 1, 20)], ids=str)
def test_run_newton_schulz_kernels_match_torch(force_kernels, algorithm, shape):
    coeffs, factor = schedule("polar_express", 5)
    g = torch.Generator().manual_seed(0)
    X0 = normalize(torch.randn(shape, generator=g), factor, 1e-7, torch.float32)
    out = run_newton_schulz(X0, coeffs, algorithm)
    assert force_kernels["n"] > 0, "the Triton path did not run"
    ref = (newton_schulz_torch if algorithm == "standard" else gram_newton_schulz_torch)(
        X0.double(), coeffs
    )
    atol = 2e-4 if algorithm == "gram" else 2e-5
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=atol)


@pytest.mark.parametrize(
    "method,steps", [("polar_express", 5), ("polar_express", 8), ("tuned", 6), ("cubic", 6)]
)
def test_msign_through_kernels(force_kernels, method, steps):
    """msign end to end (batch dims, tall input, per-step schedules) with the kernels forced."""
    import matfn

    g = torch.Generator().manual_seed(1)
    M = torch.randn(2, 24, 10, generator=g)  # tall: iterated as (2, 10, 24)
    out = matfn.msign(M, method=method, steps=steps)
    assert force_kernels["n"] > 0
    ref = matfn.msign(M.double(), method=method, steps=steps).float()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)


def test_sign_step_and_grouped_path(force_kernels):
    g = torch.Generator().manual_seed(2)
    S = torch.randn(2, 9, 9, generator=g) / 9
    torch.testing.assert_close(
        path.sign_step(S, 1.5, -0.5, 0.0), sign_step_torch(S, 1.5, -0.5, 0.0)
    )
    coeffs, factor = schedule("polar_express", 5)
    Xs = [
        normalize(torch.randn(1, *s, generator=g), factor, 1e-7, torch.float32)[0]
        for s in [(5, 20), (8, 8), (5, 20)]
    ]
    outs = path.newton_schulz_grouped(Xs, coeffs, "standard")
    for X, out in zip(Xs, outs, strict=True):
        torch.testing.assert_close(out, newton_schulz_torch(X[None], coeffs)[0], rtol=0, atol=2e-5)


def test_gram_keeps_dtype_and_cpu_path():
    coeffs, factor = schedule("polar_express", 5)
    X0 = normalize(torch.randn(1, 6, 30), factor, 1e-7, torch.float32)
    out = path.gram_newton_schulz(X0, coeffs)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, gram_newton_schulz_torch(X0, coeffs))


def test_tma_batches_take_the_kernels_below_the_side_threshold(monkeypatch, matmul_config):
    """Batches of small matrices take the Triton path from min_tma_batch_work on TMA GPUs only."""
    monkeypatch.setattr(path, "use_triton", lambda *t: True)
    monkeypatch.setattr(launch, "capability", lambda index: (9, 0))

    def probe(*shape, dtype=torch.bfloat16):  # no memory: a broadcast scalar
        return torch.empty((), dtype=dtype).expand(shape)

    moe = probe(128, 768, 2048)  # 2^37.2 multiply-adds per product
    assert path.kernels_apply(moe) and not path.folded_applies(moe)
    assert path.kernels_apply(probe(128, 2048, 768))  # tall: the same wide batch
    assert path.kernels_apply(probe(1, 4096, 4096))  # above min_triton_side anyway
    assert not path.kernels_apply(probe(24, 768, 3072))  # 2^35.3 < min_tma_batch_work
    assert path.folded_applies(probe(24, 768, 3072))
    assert not path.kernels_apply(probe(128, 770, 2048))  # rows not 16-byte aligned
    assert not path.kernels_apply(probe(128, 768, 2048, dtype=torch.float32))
    matmul_config(tma="never")
    assert not path.kernels_apply(moe)
    matmul_config(tma="auto")
    monkeypatch.setattr(launch, "capability", lambda index: (8, 0))
    assert not path.kernels_apply(moe) and path.folded_applies(moe)
    assert path.kernels_apply(probe(1, 4096, 4096))


def test_triton_path_iterates_bf16_in_fp16_and_is_more_accurate(
    force_kernels, monkeypatch, ns_config
):
    """bf16 batches on the Triton path run in fp16 (triton_half_dtype) and come back bf16."""
    monkeypatch.setattr(path, "_KERNEL_DTYPES", (torch.bfloat16, torch.float16))
    coeffs, factor = schedule("polar_express", 5)
    g = torch.Generator().manual_seed(3)
    X = normalize(torch.randn(2, 24, 64, generator=g, dtype=torch.float64), factor, 1e-7,
                  torch.float64)  # fmt: skip
    assert path.iteration_dtype(X, torch.bfloat16) == torch.float16
    out = path.newton_schulz(X.bfloat16(), coeffs)
    assert force_kernels["n"] > 0, "the Triton path did not run"
    assert out.dtype == torch.bfloat16
    exact = newton_schulz_torch(X, coeffs)
    err = torch.linalg.norm(out.double() - exact)
    err_bf16 = torch.linalg.norm(newton_schulz_torch(X.bfloat16(), coeffs).double() - exact)
    assert err < err_bf16, (err, err_bf16)
    ns_config(triton_half_dtype=None)
    assert path.iteration_dtype(X, torch.bfloat16) == torch.bfloat16
    assert path.iteration_dtype(X, torch.float16) == torch.float16


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_normalize_layouts(layout, device, ns_config):
    """normalize = X / max(factor·‖X‖_F, eps) per matrix, for every layout (CUDA: a Triton pass).

    The divide is one float32 division rounded to the output dtype, as torch's; Triton's
    division may differ from IEEE by 2 ulp of float32, below half a bf16 ulp: ≤ 1 bf16 ulp.
    """
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    ns_config(min_triton_divide=0)  # the Triton pass at this size
    g = torch.Generator().manual_seed(4)
    M = torch.randn(3, 40, 24, generator=g).to(device, torch.bfloat16)
    M[1] = 0  # a zero matrix stays zero (eps)
    X = {"contiguous": M, "transposed": M.mT.contiguous().mT, "strided": M[:, ::2]}[layout]
    out = normalize(X, 1.01, 1e-7, torch.bfloat16)
    norm = torch.linalg.matrix_norm(X.double(), keepdim=True)
    ref = X.double() / (1.01 * norm).clamp_min(1e-7)
    assert out.dtype == torch.bfloat16 and out.shape == X.shape
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out.double(), ref, rtol=2**-8, atol=0)
    assert torch.equal(X, {"contiguous": M, "transposed": M, "strided": M[:, ::2]}[layout])


def test_recording_for_a_graph_picks_kernels_by_gpu_time(monkeypatch):
    """Inside ``recording.for_graph()`` (a CUDA-graph capture and its warm-up), launch cost is
    no reason to avoid the Triton kernels: every TMA-loadable bf16/fp16 batch takes them, while
    eagerly 1024² stays below the size thresholds. Odd sizes (no TMA) and float32 do not."""
    monkeypatch.setattr(path, "use_triton", lambda *tensors: True)
    monkeypatch.setattr(launch, "capability", lambda index: (9, 0))
    square = torch.empty(1, 1, 1, dtype=torch.bfloat16).expand(1, 1024, 1024)
    batch = torch.empty(1, 1, 1, dtype=torch.float16).expand(64, 512, 512)
    odd = torch.empty(1, 1, 1, dtype=torch.bfloat16).expand(1, 929, 1294)
    fp32 = torch.empty(1, 1, 1).expand(1, 1024, 1024)
    assert not recording.recording()
    assert not any(path.kernels_apply(X) for X in (square, batch, odd, fp32))
    with recording.for_graph():
        assert recording.recording()
        assert path.kernels_apply(square) and path.kernels_apply(batch)
        assert not path.kernels_apply(odd) and not path.kernels_apply(fp32)
        with recording.for_graph():
            pass
        assert recording.recording(), "nested blocks restore, not clear, the mark"
    assert not recording.recording()


def test_programmatic_dependent_launch_switch(monkeypatch):
    """PDL only on CUDA devices of compute capability ≥ 9, never in the interpreter."""
    from types import SimpleNamespace

    cuda = SimpleNamespace(is_cuda=True, device=SimpleNamespace(index=0))
    monkeypatch.setattr(launch, "INTERPRET", False)
    for capability, expected in (((9, 0), True), ((10, 0), True), ((8, 0), False)):
        monkeypatch.setattr(launch, "capability", lambda index, c=capability: c)
        assert launch.use_pdl(cuda) is expected
    assert not launch.use_pdl(SimpleNamespace(is_cuda=False, device=SimpleNamespace(index=None)))
    monkeypatch.setattr(launch, "INTERPRET", True)
    assert not launch.use_pdl(cuda)


def test_programmatic_dependent_launch_only_for_short_products(monkeypatch):
    """Products of more than two waves of 128×128 tiles launch plainly (``tiles``); chains of
    short kernels (no ``tiles``) always use PDL where it is on."""
    from types import SimpleNamespace

    cuda = SimpleNamespace(is_cuda=True, device=SimpleNamespace(index=0))
    monkeypatch.setattr(launch, "INTERPRET", False)
    monkeypatch.setattr(launch, "capability", lambda index: (9, 0))
    monkeypatch.setattr(launch, "sm_count", lambda index: 132)
    assert launch.use_pdl(cuda, tiles=64)  # 1024²
    assert launch.use_pdl(cuda, tiles=264)
    assert not launch.use_pdl(cuda, tiles=265)
    assert not launch.use_pdl(cuda, tiles=1024)  # 4096², 64×512², 32×128×4096's B X
    assert launch.use_pdl(cuda)


def test_msign_under_recording_runs_the_kernels_at_any_size(monkeypatch):
    """End to end in the interpreter: inside ``recording.for_graph()`` a small fp16 batch, below
    every eager size threshold, runs msign on the Triton products (on a GPU of compute capability
    ≥ 9 these load by TMA) and agrees with the float64 iteration to fp16 accuracy: 5 steps of
    fp16-rounded products with float32 accumulation (unit roundoff 2⁻¹¹ ≈ 4.9e-4), amplified by
    at most a ≈ 8 a step on the small singular values; measured 1.7–2.4e-3 on entries up to
    0.55 (4 seeds), we allow 5e-3. Eagerly the same call takes the torch path."""
    import matfn
    from matfn.msign import triton as ns

    if os.environ.get("MATFN_TEST_ON_GPU"):
        pytest.skip("needs TRITON_INTERPRET=1 (CPU tensors through the kernels)")
    monkeypatch.setattr(path, "use_triton", lambda *t: True)
    monkeypatch.setattr(launch, "capability", lambda index: (9, 0))
    calls = []
    real = ns.gram_triton
    monkeypatch.setattr(ns, "gram_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(3)
    M = torch.randn(2, 40, 16, generator=g).half()  # tall: iterated as (2, 16, 40)
    half = {"compute_dtype": torch.float16}  # what bf16 CUDA inputs iterate in
    eager = matfn.msign(M, **half)
    assert not calls, "eagerly, a problem this small stays on the torch path"
    with recording.for_graph():
        out = matfn.msign(M, **half)
    assert calls, "while recording, the Triton products run"
    ref = matfn.msign(M.double())
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=5e-3)
    # and no less accurate than the eager fp16 torch path (8.6e-3 here: CPU half products)
    assert (out.double() - ref).abs().max() <= (eager.double() - ref).abs().max()


def test_graph_key_holds_the_configs(monkeypatch, ns_config, matmul_config):
    """``functional.graph_key()``: hashable, and changes with either config or the switch."""
    from matfn import functional

    key = functional.graph_key()
    assert hash(key) == hash(functional.graph_key()) and key == functional.graph_key()
    ns_config(min_triton_work=0)
    assert functional.graph_key() != key
    changed = functional.graph_key()
    matmul_config(tma="never")
    assert functional.graph_key() != changed
    monkeypatch.setenv("MATFN_DISABLE_TRITON", "1")
    assert functional.graph_key()[0] is True
