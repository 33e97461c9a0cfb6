"""Symmetric/general Triton products vs float64 torch (Triton interpreter on CPU; GPU if present).

Tolerances: the kernels accumulate in float32, so fp32 operands agree with the float64 product to
~K·2⁻²⁴·max|A||B| (we allow 1e-5 relative to the output scale for K ≤ 64); fp16 operands and an
fp16 output add one output rounding (2⁻¹¹ ≈ 4.9e-4 relative), we allow 2e-3.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

import matfn.kernels.gram as gram  # noqa: E402

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
    monkeypatch.setattr(gram, "INTERPRET_BLOCKS", BLOCKS[request.param])
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
    G = gram.gram_triton(X, out=out)
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
    A = gram.gram_triton(_rand(shape, dtype, seed=1))
    D = _rand((b, s, s), dtype, seed=2)
    D = (D + D.mT) / 2
    out = torch.full((b, s, s), float("nan"), dtype=dtype, device=DEVICE)
    gram.matmul_triton(A, A, D, alpha=2.03, beta=-4.77, gamma=3.44, symmetric=True, out=out)
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
    gram.matmul_triton(B, Xt, Xt, alpha=0.7, beta=1.875, out=out)
    ref = 0.7 * B.double() @ Xt.double() + 1.875 * Xt.double()
    _close(out, ref, dtype)


def test_broadcast_batch_and_empty():
    X = _rand((3, 20, 24), torch.float32, seed=5)
    D = _rand((1, 20, 20), torch.float32, seed=6)
    D = D + D.mT  # symmetric=True promises a symmetric result
    out = gram.matmul_triton(X, X.mT, D, beta=2.0, symmetric=True)
    _close(out, X.double() @ X.double().mT + 2 * D.double(), torch.float32)
    for shape in [(0, 4, 5), (2, 0, 5)]:
        E = torch.zeros(shape, device=DEVICE)
        assert gram.gram_triton(E).shape == (shape[0], shape[1], shape[1])
    Z = gram.gram_triton(torch.zeros(2, 4, 0, device=DEVICE))
    assert torch.equal(Z, torch.zeros(2, 4, 4, device=DEVICE))


def test_bad_shapes():
    X = torch.zeros(2, 4, 5, device=DEVICE)
    with pytest.raises(ValueError, match="3-D"):
        gram.gram_triton(X[0])
    with pytest.raises(ValueError, match="cannot be multiplied"):
        gram.matmul_triton(X, X)
    with pytest.raises(ValueError, match="square"):
        gram.matmul_triton(X, X.mT[:, :, :3], symmetric=True)
    with pytest.raises(ValueError, match="`D`"):
        gram.matmul_triton(X, X.mT, torch.zeros(2, 3, 3, device=DEVICE))
