"""Symmetric/general Triton products vs float64 torch (Triton interpreter on CPU; GPU if present).

Tolerances: the kernels accumulate in float32, so fp32 operands agree with the float64 product to
~K·2⁻²⁴·max|A||B| (we allow 1e-5 relative to the output scale for K ≤ 64); fp16 operands and an
fp16 output add one output rounding (2⁻¹¹ ≈ 4.9e-4 relative), we allow 2e-3.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

import matfn.kernels.matmul as matmul  # noqa: E402
from matfn import _backend  # noqa: E402

ON_GPU = bool(os.environ.get("MATFN_TEST_ON_GPU")) and torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3}

# Interpreter tile shapes: square (triangle grid) and rectangular (full grid, upper tiles idle).
BLOCKS = {
    "sq16": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2},
    "16x32": {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2},
    "32x16": {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 1},
}
# (batch, s, L): one tile, sizes not divisible by any tile, tall (s > L), K < BLOCK_K.
SHAPES = [(1, 16, 16), (2, 37, 53), (3, 33, 20), (1, 5, 3), (2, 50, 7)]


@pytest.fixture(params=list(BLOCKS), ids=list(BLOCKS))
def blocks(request, monkeypatch):
    monkeypatch.setattr(matmul, "INTERPRET_BLOCKS", BLOCKS[request.param])
    return BLOCKS[request.param]


def _rand(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) / shape[-1] ** 0.5).to(
        dtype=dtype, device=DEVICE
    )


def _close(out, ref, dtype):
    scale = ref.abs().max().clamp_min(1e-30)
    err = (out.double() - ref).abs().max() / scale
    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) or non-finite entries"
    assert err <= RTOL[dtype], f"relative error {err:.2e} > {RTOL[dtype]:.0e}"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_gram_matches_float64(blocks, shape, dtype):
    X = _rand(shape, dtype, seed=sum(shape))
    out = torch.full((shape[0], shape[1], shape[1]), float("nan"), dtype=dtype, device=DEVICE)
    X_before = X.clone()
    G = matmul.gram_triton(X, out=out)
    assert G is out
    ref = X.double() @ X.double().mT
    _close(G, ref, dtype)
    assert torch.equal(G, G.mT), "the mirrored upper triangle must equal the lower exactly"
    assert torch.equal(X, X_before)


@pytest.mark.parametrize("shape", SHAPES[1:4], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_symmetric_epilogue(blocks, shape, dtype):
    """``c A A + b D + γ I`` with A, D symmetric: the fused B = bA + cA² (+ aI) of NS/Gram."""
    b, s, _ = shape
    A = matmul.gram_triton(_rand(shape, dtype, seed=1))
    D = _rand((b, s, s), dtype, seed=2)
    D = (D + D.mT) / 2
    out = torch.full((b, s, s), float("nan"), dtype=dtype, device=DEVICE)
    matmul.matmul_triton(A, A, D, alpha=2.03, beta=-4.77, gamma=3.44, symmetric=True, out=out)
    eye = torch.eye(s, dtype=torch.float64, device=DEVICE)
    ref = 2.03 * A.double() @ A.double() - 4.77 * D.double() + 3.44 * eye
    _close(out, ref, dtype)
    assert torch.equal(out, out.mT)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_general_epilogue_strided(blocks, shape, dtype):
    """``α B X + β X`` (the aX + BX step), with a transposed (non-contiguous) right operand."""
    b, s, L = shape
    Xt = _rand((b, L, s), dtype, seed=3).mT  # (b, s, L) view with strides (.., 1, s)
    B = _rand((b, s, s), dtype, seed=4)
    out = torch.full((b, s, L), float("nan"), dtype=dtype, device=DEVICE)
    matmul.matmul_triton(B, Xt, Xt, alpha=0.7, beta=1.875, out=out)
    ref = 0.7 * B.double() @ Xt.double() + 1.875 * Xt.double()
    _close(out, ref, dtype)


def test_broadcast_batch_and_empty():
    X = _rand((3, 20, 24), torch.float32, seed=5)
    D = _rand((1, 20, 20), torch.float32, seed=6)
    D = D + D.mT  # symmetric=True promises a symmetric result
    out = matmul.matmul_triton(X, X.mT, D, beta=2.0, symmetric=True)
    _close(out, X.double() @ X.double().mT + 2 * D.double(), torch.float32)
    for shape in [(0, 4, 5), (2, 0, 5)]:
        E = torch.zeros(shape, device=DEVICE)
        assert matmul.gram_triton(E).shape == (shape[0], shape[1], shape[1])
    Z = matmul.gram_triton(torch.zeros(2, 4, 0, device=DEVICE))
    assert torch.equal(Z, torch.zeros(2, 4, 4, device=DEVICE))


def test_bad_shapes():
    X = torch.zeros(2, 4, 5, device=DEVICE)
    with pytest.raises(ValueError, match="3-D"):
        matmul.gram_triton(X[0])
    with pytest.raises(ValueError, match="cannot be multiplied"):
        matmul.matmul_triton(X, X)
    with pytest.raises(ValueError, match="square"):
        matmul.matmul_triton(X, X.mT[:, :, :3], symmetric=True)
    with pytest.raises(ValueError, match="`D`"):
        matmul.matmul_triton(X, X.mT, torch.zeros(2, 3, 3, device=DEVICE))


# --------------------------------------------------------------------------- TMA-load kernels
# Shapes whose strides TMA accepts (16-byte multiples: 8 fp16 or 4 fp32 elements), none a
# multiple of the 16/32-wide interpreter tiles except the first; tall, wide, K < BLOCK_K.
TMA_SHAPES = [(1, 16, 16), (2, 40, 56), (3, 48, 24), (2, 24, 8)]


@pytest.fixture
def tma_launches(monkeypatch, matmul_config):
    """Force the TMA kernel where the operands allow it and count its launches."""
    matmul_config(tma="always")
    calls = []
    launch = matmul.launch_tma

    def spy(*args, **kwargs):
        calls.append(kwargs.get("config"))
        return launch(*args, **kwargs)

    monkeypatch.setattr(matmul, "launch_tma", spy)
    return calls


@pytest.mark.parametrize("programs", [0, 3], ids=["tile-per-program", "persistent"])
@pytest.mark.parametrize("shape", TMA_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_tma_products_match_float64(blocks, tma_launches, monkeypatch, shape, programs):
    """Gram, ``cA² + bA + γI`` and ``αBX + βX`` (X and Xᵀ operands) through TMA descriptors
    (16-bit operands only; on a GPU the autotuned configs run instead of the interpreter's)."""
    monkeypatch.setitem(matmul.INTERPRET_BLOCKS, "PROGRAMS", programs)
    dtype = torch.float16
    b, s, L = shape
    X = _rand(shape, dtype, seed=sum(shape) + 7)
    G = torch.full((b, s, s), float("nan"), dtype=dtype, device=DEVICE)
    matmul.gram_triton(X, out=G)
    _close(G, X.double() @ X.double().mT, dtype)
    assert torch.equal(G, G.mT), "the mirrored upper triangle must equal the lower exactly"
    D = _rand((b, s, s), dtype, seed=2)
    D = (D + D.mT) / 2
    S = matmul.matmul_triton(G, G, D, alpha=2.03, beta=-4.77, gamma=3.44, symmetric=True)
    eye = torch.eye(s, dtype=torch.float64, device=DEVICE)
    _close(S, 2.03 * G.double() @ G.double() - 4.77 * D.double() + 3.44 * eye, dtype)
    assert torch.equal(S, S.mT)
    Y = matmul.matmul_triton(S, X, X, alpha=0.7, beta=1.875)
    _close(Y, 0.7 * S.double() @ X.double() + 1.875 * X.double(), dtype)
    Xt = X.mT.contiguous().mT  # column-major X: read through a transposed descriptor
    Z = matmul.matmul_triton(Xt.mT, Xt, gamma=-0.5)
    eye_L = torch.eye(L, dtype=torch.float64, device=DEVICE)
    _close(Z, X.double().mT @ X.double() - 0.5 * eye_L, dtype)
    assert len(tma_launches) == 4, "every product here must take the TMA kernel"


def test_tma_descriptor_cache_rebinds_every_operand(blocks, tma_launches):
    """Launches of one geometry reuse cached descriptors: each launch must read its own tensors
    (D and the output share shape, strides and block), and no tensor stays referenced after."""
    from matfn.kernels.matmul_tma import _DESCRIPTORS

    dtype = torch.float16
    X1, X2 = _rand((2, 24, 40), dtype, seed=11), _rand((2, 24, 40), dtype, seed=12)
    D1, D2 = _rand((2, 24, 24), dtype, seed=13), _rand((2, 24, 24), dtype, seed=14)
    for X, D in ((X1, D1), (X2, D2), (X1, D2)):
        out = matmul.matmul_triton(X, X.mT, D, alpha=0.5, beta=2.0)
        _close(out, 0.5 * X.double() @ X.double().mT + 2.0 * D.double(), dtype)
    assert len(tma_launches) == 3
    assert _DESCRIPTORS.table, "the launches above must have filled the cache"
    assert all(desc.base is None for desc in _DESCRIPTORS.table.values())


def test_tma_applies_only_to_aligned_unit_stride_operands():
    from matfn.kernels.matmul_tma import tma_applies

    X = torch.zeros(2, 40, 56, dtype=torch.float16)
    out = torch.empty(2, 40, 40, dtype=torch.float16)
    assert tma_applies(X, X.mT, None, out)
    assert not tma_applies(X.float(), X.float().mT, None, out.float()), "16-bit operands only"
    assert tma_applies(X, X.mT, out, out)
    assert not tma_applies(X[:, :, 1:], X[:, :, 1:].mT, None, out), "misaligned base"
    odd = torch.zeros(2, 40, 53, dtype=torch.float16)
    assert not tma_applies(odd, odd.mT, None, out), "row stride of 106 bytes"
    assert tma_applies(X, X.mT, None, out[:, :, :37]), "a view with aligned strides is fine"
    narrow = torch.empty(2, 40, 37, dtype=torch.float16)
    assert not tma_applies(X, X.mT, None, narrow), "output row stride of 74 bytes"
    assert not tma_applies(X, X.mT, out.mT, out), "D must be row-major"
    assert not tma_applies(X, X.mT, out[:1].expand(2, 40, 40), out), "zero batch stride"
    assert not tma_applies(X[:, ::2, ::2], X[:, ::2, ::2].mT, None, out), "no unit stride"


@pytest.mark.skipif(ON_GPU, reason="fakes the GPU timer and SM count for the interpreter")
def test_tma_autotune_path(monkeypatch, matmul_config):
    """The GPU launch path: the autotuner prunes the TMA configs, its pre-hook sets the
    descriptors' block shapes for each one, and later calls launch the cached best config."""
    from types import SimpleNamespace

    monkeypatch.setattr(matmul, "INTERPRET", False)
    matmul_config(tma="always")
    blocks = [(16, 16, 16, 1, 1, False), (16, 16, 16, 1, 1, True), (32, 16, 16, 1, 1, False)]
    monkeypatch.setattr(matmul, "_TMA_SYMMETRIC_BLOCKS", blocks)
    monkeypatch.setattr(matmul, "_TMA_GENERAL_BLOCKS", blocks)
    monkeypatch.setattr(matmul, "_tma_tuned", {})
    monkeypatch.setattr(matmul, "_BEST_CONFIG", {})
    props = SimpleNamespace(multi_processor_count=3)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    X = _rand((2, 40, 56), torch.float16, seed=11)
    ref = X.double() @ X.double().mT
    # (symmetric, tma_wide_symmetric_rows, configs left to time: a single one is not timed)
    for symmetric, wide_rows, expect in ((True, 10**9, 2), (True, 40, 0), (False, 10**9, 3)):
        matmul_config(tma_wide_symmetric_rows=wide_rows)
        kernel = matmul._tma_kernel(symmetric)
        timed = []

        def fake_bench(kernel_call, quantiles, timed=timed):
            kernel_call()  # runs the config (pre-hook included) in the interpreter
            timed.append(1)
            return [float(-len(timed))] * 3  # the last config timed "wins"

        kernel.do_bench = fake_bench
        kernel.cache.clear()
        matmul._BEST_CONFIG.clear()
        for _ in range(2):  # tune, then the cached config
            G = matmul.matmul_triton(X, X.mT, symmetric=symmetric)
            _close(G, ref, torch.float16)
        assert len(timed) == expect
        (best,) = matmul._BEST_CONFIG.values()
        assert best is kernel.best_config
        if symmetric:
            wide = best.kwargs["BLOCK_M"] != best.kwargs["BLOCK_N"]
            assert wide == (wide_rows <= 40), "square tiles below tma_wide_symmetric_rows"


@settings(deadline=None, max_examples=15)
@given(
    batch=st.integers(1, 3),
    s8=st.integers(1, 9),
    l8=st.integers(1, 9),
    symmetric=st.booleans(),
    a_col_major=st.booleans(),
    with_d=st.booleans(),
    gamma=st.sampled_from([0.0, -1.25]),
    scale=st.sampled_from([1e-2, 1.0, 1e2]),
    programs=st.sampled_from([0, 2, 5]),
    tiles=st.sampled_from(list(BLOCKS)),
    seed=st.integers(0, 2**16),
)
def test_tma_matches_pointer_kernel_and_float64(
    batch, s8, l8, symmetric, a_col_major, with_d, gamma, scale, programs, tiles, seed
):
    """Random aligned shapes (multiples of 8, tiles cut at every edge), layouts, epilogues and
    persistent program counts: the TMA kernel agrees with float64 within the fp16 output rounding,
    its symmetric results are exactly symmetric, and it agrees with the pointer kernel."""
    import matfn.kernels.matmul_tma as mt

    s, L = 8 * s8, 8 * l8
    X = _rand((batch, s, L), torch.float16, seed) * scale
    if symmetric:  # X Xᵀ, read through a transposed descriptor
        A, B, n = X, X.mT, s
    else:  # (s×L)ᵀ-shaped left operand in either layout, times X
        A = _rand((batch, s, s), torch.float16, seed + 1)
        A = A.mT.contiguous().mT if a_col_major else A
        B, n = X, L
    D = None
    if with_d:
        D = _rand((batch, s, n), torch.float16, seed + 2)
        D = (D + D.mT) / 2 if symmetric else D
    kw = dict(alpha=0.75, beta=-0.5 if with_d else 0.0, gamma=gamma, symmetric=symmetric)
    blocks = dict(BLOCKS[tiles], PROGRAMS=programs)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(matmul, "INTERPRET_BLOCKS", blocks)
        mp.setattr(_backend, "MATMUL", dataclasses.replace(_backend.MATMUL, tma="always"))
        assert mt.tma_applies(A, B, D, torch.empty(batch, s, n, dtype=torch.float16))
        out_tma = matmul.matmul_triton(A, B, D, **kw)
        mp.setattr(_backend, "MATMUL", dataclasses.replace(_backend.MATMUL, tma="never"))
        mp.setattr(matmul, "INTERPRET_BLOCKS", BLOCKS[tiles])
        out_ptr = matmul.matmul_triton(A, B, D, **kw)
    eye = torch.eye(s, n, dtype=torch.float64, device=A.device)
    ref = 0.75 * A.double() @ B.double() + gamma * eye
    if with_d:
        ref = ref - 0.5 * D.double()
    _close(out_tma, ref, torch.float16)
    _close(out_ptr, ref, torch.float16)
    if symmetric:
        assert torch.equal(out_tma, out_tma.mT)
    # same fp32 accumulation order per tile: at most one fp16 rounding apart
    torch.testing.assert_close(out_tma, out_ptr, rtol=1e-3, atol=1e-3 * float(ref.abs().max()))
