"""Where the host time of ``tri_solve``'s backward goes (CUDA, n = 4096, d = e = 128).

Each row is the host's time to issue one call with the GPU kept busy (so the host never waits
for it; ``benchmarks.public_api.host_ms``), from the innermost launcher outwards, then the GPU
time (``do_bench``) for comparison. A row far above the one inside it is Python or dispatch
cost of that layer.

Usage: ``python3 benchmarks/gpu_backward_host.py [--decay none,GDN,KDA]``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import matfn  # noqa: E402
from benchmarks.gpu_decay import make  # noqa: E402
from benchmarks.public_api import host_ms  # noqa: E402
from matfn.triangular import backward, ops, paths  # noqa: E402


def case(decay: str):
    Q, K, V, L = make(1, 4096, 128, decay, 1.0)
    lam = torch.ones(1, 4096, device="cuda")
    Lop = None if L is None else L.reshape(1, 4096, -1)  # the ops' (B, n, g)
    X = matfn.tri_solve(Q, K, V, log_decay=L)
    dX = torch.randn_like(X)
    leaves = [x.clone().requires_grad_() for x in (Q, K, V)]
    needs = [True, True, True, False, L is not None]
    rows = {
        "solve_flat (launcher)": lambda: paths.solve_flat(Q, K, V, lam, 64, Lop),
        "torch.ops.matfn.tri_solve": lambda: torch.ops.matfn.tri_solve(
            Q, K, V, lam, Lop, 64, False
        ),
        "matfn.tri_solve cuda_graph=False": lambda: matfn.tri_solve(
            Q, K, V, log_decay=L, check_finite=False, cuda_graph=False
        ),
        "backward.tri_solve_backward (flat)": lambda: backward.tri_solve_backward(
            Q, K, lam, X, dX, 64, (True, True, False, L is not None), Lop
        ),
        "ops.solve_grads": lambda: ops.solve_grads(
            Q, K, V, lam, Lop, X, dX, 64, needs, replay=False
        ),
        "torch.ops.matfn.tri_solve_backward": lambda: torch.ops.matfn.tri_solve_backward(
            Q, K, V, lam, Lop, X, dX, 64, needs
        ),
    }
    for graph in (False, True):

        def step(graph=graph):
            Z = matfn.tri_solve(*leaves, log_decay=L, check_finite=False, cuda_graph=graph)
            return torch.autograd.grad(Z, leaves, dX)

        rows[f"forward + autograd.grad, cuda_graph={graph}"] = step
    for name, fn in rows.items():
        gpu = triton.testing.do_bench(fn, return_mode="median")
        host = host_ms(fn, calls=10)
        h = host if isinstance(host, str) else f"{host:.3f}"
        print(f"| {decay} | {name} | {h} | {gpu:.3f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--decay", default="none,GDN", help="kinds of benchmarks.gpu_decay.make")
    args = p.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    print("| decay | call | host ms | do_bench ms |\n|---|---|---|---|")
    for decay in args.decay.split(","):
        case(decay)


if __name__ == "__main__":
    main()
