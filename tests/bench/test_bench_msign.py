"""CPU benchmarks of msign's torch path (pytest-benchmark).

``make bench`` times them (``--benchmark-only``); CI runs them once each with
``--benchmark-disable`` as smoke tests, at tiny sizes. GPU timings:
benchmarks/gpu_newton_schulz.py.
"""

from __future__ import annotations

import pytest
import torch

import matfn
from matfn.coefficients import schedule
from matfn.msign import gram_newton_schulz_torch, newton_schulz_torch, normalize

# (batch, n, m) for a timed run / for the CI smoke run
SIZES = {
    "square": ((1, 256, 256), (1, 16, 16)),
    "wide": ((1, 128, 1024), (1, 8, 64)),
    "batched": ((16, 64, 64), (3, 8, 8)),
}


def _size(request, name):
    timed, smoke = SIZES[name]
    return smoke if request.config.getoption("benchmark_disable") else timed


def _flops(batch, n, m, steps=5):
    s, L = min(n, m), max(n, m)
    return batch * steps * (4 * s * s * L + 2 * s**3)


@pytest.mark.parametrize("name", list(SIZES))
@pytest.mark.parametrize("algorithm", ["standard", "gram"])
def test_bench_msign(benchmark, request, name, algorithm):
    b, n, m = _size(request, name)
    M = torch.randn(b, n, m, generator=torch.Generator().manual_seed(0))
    benchmark.extra_info.update(shape=(b, n, m), algorithm=algorithm, plain_flops=_flops(b, n, m))
    out = benchmark(matfn.msign, M, algorithm=algorithm, check_finite=False)
    assert out.shape == M.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("algorithm", ["standard", "gram"])
def test_bench_iteration_only(benchmark, request, algorithm):
    """The iteration alone on a normalised wide batch (no validation, norm or transpose)."""
    b, n, m = _size(request, "wide")
    coeffs, factor = schedule("polar_express", 5)
    X0 = normalize(torch.randn(b, n, m), factor, 1e-7, torch.float32)
    fn = newton_schulz_torch if algorithm == "standard" else gram_newton_schulz_torch
    out = benchmark(fn, X0, coeffs)
    assert torch.isfinite(out).all()
