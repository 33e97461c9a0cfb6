"""CPU complexity benchmark of tri_inv / tri_solve: n doubles at fixed d.

``extra_info`` carries the normalised time — ``ns_per_n2`` for inverses (flat for an O(n²)
method, growing ∝ n for the dense O(n³) baselines) and ``ns_per_n`` for solves (flat for O(n),
growing ∝ n for the dense O(n²) triangular solve). Baselines run on the dense
``T = Λ + tril(Q Kᵀ, −1)``: ``torch.linalg.solve_triangular(T, I)``, ``torch.linalg.inv(T)`` and
``torch.linalg.solve_triangular(T, V)``.

    pytest tests/bench/test_bench_triangular.py --benchmark-only \
        --benchmark-group-by=param:op --benchmark-columns=median,ops

With ``--benchmark-disable`` (CI) each case runs once, as a smoke test that also checks the
result against the dense baseline.
"""

from __future__ import annotations

import time

import pytest
import torch

from matfn import tri_inv, tri_solve

D, E = 32, 16
SIZES = (128, 256, 512, 1024)


def _inputs(n: int):
    g = torch.Generator().manual_seed(n)
    K = torch.nn.functional.normalize(torch.randn(n, D, generator=g), dim=-1)
    Q = 0.5 * torch.nn.functional.normalize(torch.randn(n, D, generator=g), dim=-1)
    lam = 1 + torch.rand(n, generator=g)
    V = torch.randn(n, E, generator=g)
    T = torch.diag(lam) + torch.tril(Q @ K.T, -1)
    return Q, K, lam, V, T


def _ops(op: str, Q, K, lam, V, T):
    eye = torch.eye(T.shape[0])
    return {
        "tri_inv": lambda: tri_inv(Q, K, lam, check_finite=False),
        "solve_triangular(T,I)": lambda: torch.linalg.solve_triangular(T, eye, upper=False),
        "inv(T)": lambda: torch.linalg.inv(T),
        "tri_solve": lambda: tri_solve(Q, K, V, lam, check_finite=False),
        "solve_triangular(T,V)": lambda: torch.linalg.solve_triangular(T, V, upper=False),
    }[op]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize(
    "op", ["tri_inv", "solve_triangular(T,I)", "inv(T)", "tri_solve", "solve_triangular(T,V)"]
)
def test_bench_triangular(benchmark, op, n):
    Q, K, lam, V, T = _inputs(n)
    fn = _ops(op, Q, K, lam, V, T)
    t0 = time.perf_counter()
    out = benchmark(fn)
    once = time.perf_counter() - t0
    stats = getattr(benchmark, "stats", None)
    seconds = stats.stats.median if stats else once
    is_solve = op in ("tri_solve", "solve_triangular(T,V)")
    benchmark.extra_info.update(
        n=n,
        d=D,
        e=E,
        op=op,
        median_s=seconds,
        **({"ns_per_n": seconds * 1e9 / n} if is_solve else {"ns_per_n2": seconds * 1e9 / n**2}),
    )
    if not op.startswith("tri_"):
        return
    # smoke check: same answer as the dense float32 baseline (float32 forward-substitution error
    # on this well-conditioned T, |q·k| ≤ 0.5 and λ ∈ [1, 2], is ~1e-6 relative)
    ref = (
        torch.linalg.solve_triangular(T, V, upper=False)
        if is_solve
        else torch.linalg.solve_triangular(T, torch.eye(n), upper=False)
    )
    assert ((out - ref).norm() / ref.norm()).item() < 1e-4
