"""CPU pytest-benchmark of one optimizer step: optim.Muon against torch.optim.Muon and AdamW.

A 2-layer "transformer-ish" stack of matrices (d = 64 or 128; 12 matrices). In CI this runs
with ``--benchmark-disable`` as a smoke test (each step once). For numbers::

    .venv/bin/pytest tests/bench/test_bench_muon.py --benchmark-only --benchmark-columns=median

GPU numbers on the GPT-2-small matrices come from ``benchmarks/gpu_muon.py``.
"""

from __future__ import annotations

import pytest
import torch

from optim import Muon

KELLER = (3.4445, -4.7750, 2.0315)


def shapes(d: int, layers: int = 2) -> list[tuple[int, int]]:
    return [s for _ in range(layers) for s in [(d, d)] * 4 + [(d, 4 * d), (4 * d, d)]]


def make(d: int):
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g).mul_(0.02).requires_grad_() for s in shapes(d)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    return params


OPTIMIZERS = {
    "ours-default": lambda ps: Muon(ps, lr=0.02),
    "ours-keller": lambda ps: Muon(ps, lr=0.02, ns_coefficients=KELLER),
    "ours-per-matrix": lambda ps: Muon(ps, lr=0.02, batched=False),
    "torch-muon": lambda ps: torch.optim.Muon(ps, lr=0.02),
    "torch-adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
}


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_bench_step(benchmark, name, d):
    params = make(d)
    opt = OPTIMIZERS[name](params)
    before = [p.detach().clone() for p in params]
    benchmark.extra_info.update(matrices=len(params), d=d)
    benchmark(opt.step)
    # the step ran and moved every matrix (a smoke check that holds in --benchmark-disable mode)
    assert all(not torch.equal(p, b) for p, b in zip(params, before, strict=True))
