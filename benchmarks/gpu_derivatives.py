"""Backward through msign: exact VJP (Lyapunov/sign route) vs unrolled Newton–Schulz vs SVD.

For square ``n×n`` float32 matrices with prescribed spectrum (σ log-spaced in ``[1/cond, 1]``)
and a Gaussian cotangent ``G``, time forward + backward of

* ``matfn.msign`` (default 5-step Polar-Express forward; backward = :func:`matfn.msign_vjp`,
  the derivative of the exact msign through the short-side Lyapunov equation);
* ``msign_vjp`` alone (the backward pass by itself);
* autograd through the unrolled Polar-Express iteration in float32 (5 and 8 steps): what
  "backprop through Newton–Schulz" gives, the derivative of the truncated polynomial;
* autograd through ``torch.linalg.svd`` (``U Vᵀ``), float32,

and report the relative error of each gradient against the float64 SVD closed form (spec §4.2).
Run: ``python benchmarks/gpu_derivatives.py`` (CUDA if available; ``--device cpu`` otherwise).
Timing: ``triton.testing.do_bench`` median on CUDA, median of ``--reps`` wall times on CPU.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root

import matfn  # noqa: E402
from matfn.coefficients import schedule  # noqa: E402
from matfn.msign import newton_schulz_torch, normalize  # noqa: E402


def prescribed_square(n: int, cond: float, seed: int, device: str) -> torch.Tensor:
    """``U diag(σ) Vᵀ`` in float64, Haar U and V, σ log-spaced in ``[1/cond, 1]``."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -math.log10(cond), n, dtype=torch.float64)
    return ((U * s) @ V.T).to(device)


def unrolled_grad(M: torch.Tensor, G: torch.Tensor, steps: int) -> torch.Tensor:
    """Autograd through ``steps`` Polar-Express Newton–Schulz steps (float32)."""
    X = M.detach().clone().requires_grad_()
    coeffs, factor = schedule("polar_express", steps)
    O = newton_schulz_torch(normalize(X[None], factor, 1e-7, torch.float32), coeffs)[0]
    (gX,) = torch.autograd.grad(O, X, G)
    return gX


def svd_grad(M: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Autograd through ``torch.linalg.svd`` (``U Vᵀ``)."""
    X = M.detach().clone().requires_grad_()
    U, _, Vh = torch.linalg.svd(X, full_matrices=False)
    (gX,) = torch.autograd.grad(U @ Vh, X, G)
    return gX


def matfn_grad(M: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Forward ``matfn.msign`` (defaults), backward = exact VJP."""
    X = M.detach().clone().requires_grad_()
    (gX,) = torch.autograd.grad(matfn.msign(X), X, G)
    return gX


def bench(fn: Callable[[], object], device: str, reps: int) -> float:
    """Median milliseconds."""
    if device.startswith("cuda"):
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=2, rep=max(20, reps * 10), return_mode="median"))
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


METHODS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "matfn.msign fwd+bwd (exact VJP)": matfn_grad,
    "matfn.msign_vjp only": lambda M, G: matfn.msign_vjp(M, G),
    "unrolled PE-5 fp32": lambda M, G: unrolled_grad(M, G, 5),
    "unrolled PE-8 fp32": lambda M, G: unrolled_grad(M, G, 8),
    "torch.linalg.svd autograd fp32": svd_grad,
}


def run(sizes: list[int], cond: float, device: str, reps: int) -> list[dict[str, object]]:
    rows = []
    for n in sizes:
        M64 = prescribed_square(n, cond, n, device)
        G64 = torch.randn(n, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        G64 = G64.to(device)
        ref = matfn.msign_vjp(M64, G64, method="svd")  # float64 closed form
        M, G = M64.float(), G64.float()
        for name, fn in METHODS.items():
            try:
                grad = fn(M, G)
            except Exception as err:  # report and go on: one broken path must not hide the rest
                print(f"n={n:5d}  {name:34s} FAILED: {type(err).__name__}: {err}", flush=True)
                continue
            err = float(torch.linalg.matrix_norm(grad.double() - ref) / ref.norm())
            ms = bench(lambda fn=fn: fn(M, G), device, reps)
            rows.append({"n": n, "method": name, "ms": ms, "rel_err": err})
            print(f"n={n:5d}  {name:34s} {ms:10.2f} ms  rel err {err:.2e}", flush=True)
    return rows


def markdown(rows: list[dict[str, object]]) -> str:
    lines = [
        "| n | method | fwd+bwd ms (median) | rel. error vs fp64 SVD formula |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['n']} | {r['method']} | {r['ms']:.2f} | {r['rel_err']:.1e} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    p.add_argument("--cond", type=float, default=100.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    dev = args.device
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else platform.processor()
    print(
        f"device {dev} ({name}), torch {torch.__version__}, cond {args.cond:g}, "
        f"threads {torch.get_num_threads()}",
        flush=True,
    )
    rows = run(args.sizes, args.cond, dev, args.reps)
    print()
    print(markdown(rows))


if __name__ == "__main__":
    main()
