"""Fused max-logit kernel vs the torch reference (Triton interpreter on CPU; GPU if present)."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from matfn.kernels.max_logit import max_logit_triton  # noqa: E402
from optim.max_logit import max_logit_torch, max_logits  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (B, H, H_kv, Sq, Sk, D, causal, block_m, block_n): odd lengths, GQA/MQA, ragged last tiles,
# Sq ≠ Sk both ways, head dims that are not powers of two
CASES = [
    (1, 2, 2, 1, 1, 16, True, 16, 16),
    (2, 4, 2, 37, 37, 24, True, 16, 16),
    (2, 4, 2, 37, 37, 24, False, 16, 32),
    (1, 3, 1, 33, 33, 8, True, 32, 16),
    (1, 6, 3, 19, 45, 40, False, 16, 16),
    (1, 2, 1, 45, 19, 16, True, 16, 16),
    (2, 2, 2, 65, 65, 64, True, 32, 32),
    (1, 4, 4, 7, 7, 5, False, 16, 16),
]


def _ids(c):
    B, H, Hkv, Sq, Sk, D, causal, bm, bn = c
    return f"B{B}-H{H}-kv{Hkv}-q{Sq}-k{Sk}-D{D}-{'causal' if causal else 'full'}-{bm}x{bn}"


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("use_abs", [False, True])
def test_kernel_matches_reference(case, dtype, use_abs):
    B, H, Hkv, Sq, Sk, D, causal, bm, bn = case
    g = torch.Generator().manual_seed(Sq * 131 + D)
    q = (3 * torch.randn(B, H, Sq, D, generator=g)).to(dtype).to(DEVICE)
    k = torch.randn(B, Hkv, Sk, D, generator=g).to(dtype).to(DEVICE)
    scale = 1 / math.sqrt(D)
    ref = max_logit_torch(q, k, causal=causal, scale=scale, use_abs=use_abs)
    out = max_logit_triton(q, k, causal=causal, scale=scale, use_abs=use_abs, block_m=bm,
                           block_n=bn)  # fmt: skip
    assert out.shape == (H,) and out.dtype == torch.float32
    assert not torch.isnan(out).any()  # every partial max was written (buffer poisoned)
    # both accumulate exact fp16/fp32 products in float32; only the summation order differs:
    # ≤ D·eps32·scale·Σ|q_d k_d| ≈ 40·1.2e-7·(3·√D·√D)/√D — below 1e-4 absolute here
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)


def test_kernel_noncontiguous_inputs():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 21, 4, 16, generator=g).to(DEVICE).transpose(1, 2)  # (B, H, S, D) view
    k = torch.randn(2, 21, 2, 16, generator=g).to(DEVICE).transpose(1, 2)
    ref = max_logit_torch(q, k, causal=True, scale=0.25)
    out = max_logit_triton(q, k, causal=True, scale=0.25, block_m=16, block_n=16)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_kernel_empty_inputs_launch_nothing():
    q, k = torch.zeros(1, 2, 0, 16), torch.zeros(1, 1, 0, 16)
    assert torch.equal(max_logit_triton(q, k, scale=1.0), torch.full((2,), -math.inf))


def test_dispatch_uses_torch_path_off_cuda(monkeypatch):
    """CPU tensors (and MATFN_DISABLE_TRITON=1) take the reference path; results agree."""
    monkeypatch.setenv("MATFN_DISABLE_TRITON", "1")
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 2, 9, 16, generator=g), torch.randn(1, 1, 9, 16, generator=g)
    torch.testing.assert_close(max_logits(q, k), max_logit_torch(q, k, causal=True, scale=0.25))


def _planted(B, H, Hkv, S, D, pairs, seed=0):
    """Small noise plus one large logit per head at (i, j) = pairs[h % len(pairs)]."""
    g = torch.Generator().manual_seed(seed)
    q = 0.01 * torch.randn(B, H, S, D, generator=g)
    k = 0.01 * torch.randn(B, Hkv, S, D, generator=g)
    G = H // Hkv
    for h in range(0, H, G):  # one plant per key head, read by its first query head
        i, j = pairs[(h // G) % len(pairs)]
        u = torch.zeros(D)
        u[h % D] = 1.0
        q[0, h, i] += 10 * u
        k[0, h // G, j] += 10 * u
    return q, k


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "pairs",
    [
        [(15, 16), (16, 15)],
        [(16, 16), (31, 32)],
        [(0, 1), (40, 40)],
        [(39, 40), (40, 39)],
        [(20, 21), (21, 20)],
    ],
    ids=["tile-edge-15", "diag-and-edge-31", "first-row", "last-rows", "interior"],
)
def test_kernel_mask_boundaries(causal, pairs):
    """A masking error by one position changes the max by ~100 here (random data hides it)."""
    q, k = _planted(1, 4, 2, 41, 16, pairs)
    q, k = q.to(DEVICE), k.to(DEVICE)
    ref = max_logit_torch(q, k, causal=causal, scale=1.0)
    out = max_logit_triton(q, k, causal=causal, scale=1.0, block_m=16, block_n=16)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    for h in (0, 2):
        i, j = pairs[(h // 2) % len(pairs)]
        assert (ref[h] > 50) == (not causal or j <= i)
