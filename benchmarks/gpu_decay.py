"""``tri_solve`` / ``tri_inv`` with and without decay on CUDA: Triton against the torch form.

Undecayed (``none``), Gated DeltaNet (one log-decay per row) and KDA (one per channel) systems
with DeltaNet's inputs: unit keys, ``Q = β K`` with ``β ∈ U(0, 1)``, ``λ = 1``, ``V`` Gaussian,
``ℓ = −U(0, s)``. Every row is a public call timed by ``triton.testing.do_bench`` (median):

* ``forward``: ``matfn.tri_solve(Q, K, V, log_decay=ℓ, check_finite=False)`` (replayed from a
  CUDA graph, the default; ``cuda_graph=False``: eager launches), its relative Frobenius error
  against the float64 result (the same call on float64 inputs: the torch form, which matches
  the dense system to 1e-15 in the tests);
* ``torch form``: the same call with ``MATFN_DISABLE_TRITON=1`` (the chunked torch form, the
  path off CUDA);
* ``forward+backward``: forward and ``torch.autograd.grad`` w.r.t. ``Q, K, V`` (and ``ℓ``), the
  worst relative error of the gradients against float64, and the backward's time
  (``forward+backward − forward``) over the forward's; ``compiled``: ``torch.compile`` with
  ``mode="reduce-overhead"``;
* ``tri_inv``: the inverse (``V = I`` through the same kernels); this and the compiled row only
  for the first batch size and decay strength.

Usage: ``python3 benchmarks/gpu_decay.py [--n 4096] [--d 128] [--batch 1,16]
[--kinds none,GDN,KDA]``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import matfn  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-300)).item()


def bench(fn) -> float:
    return triton.testing.do_bench(fn, return_mode="median")


def make(B: int, n: int, d: int, kind: str, strength: float, seed: int = 0):
    g = torch.Generator("cuda").manual_seed(seed)
    K = torch.nn.functional.normalize(torch.randn(B, n, d, device="cuda", generator=g), dim=-1)
    Q = torch.rand(B, n, 1, device="cuda", generator=g) * K
    V = torch.randn(B, n, d, device="cuda", generator=g)
    if kind == "none":
        return Q, K, V, None
    shape = (B, n, d) if kind == "KDA" else (B, n)
    return Q, K, V, -strength * torch.rand(shape, device="cuda", generator=g)


def torch_form(fn):
    os.environ["MATFN_DISABLE_TRITON"] = "1"
    try:
        return fn()
    finally:
        del os.environ["MATFN_DISABLE_TRITON"]


def row(case: str, what: str, ms: float, err: float | None = None, note: str = "") -> None:
    e = "" if err is None else f"{err:.1e}"
    print(f"| {case} | {what} | {ms:.3f} | {e} | {note} |", flush=True)


def run_case(B: int, n: int, d: int, kind: str, strength: float, extra: bool) -> None:
    case = f"{kind} B={B} n={n} d=e={d}" + ("" if kind == "none" else f" s={strength:g}")
    Q, K, V, L = make(B, n, d, kind, strength)
    args64 = [None if x is None else x.double() for x in (Q, K, V, L)]

    def fwd(graph=True):
        return matfn.tri_solve(Q, K, V, log_decay=L, check_finite=False, cuda_graph=graph)

    X64 = matfn.tri_solve(*args64[:3], log_decay=args64[3])
    t_fwd = bench(fwd)
    row(case, "forward", t_fwd, rel(fwd(), X64))
    row(case, "forward, cuda_graph=False", bench(lambda: fwd(False)))
    t_torch = torch_form(lambda: bench(fwd))
    row(case, "torch form (MATFN_DISABLE_TRITON=1)", t_torch, torch_form(lambda: rel(fwd(), X64)))

    leaves = [x.clone().requires_grad_() for x in (Q, K, V, L) if x is not None]
    dX = torch.randn_like(V)
    leaves64 = [x.double().requires_grad_() for x in leaves]
    want = torch.autograd.grad(
        matfn.tri_solve(*leaves64[:3], log_decay=(leaves64 + [None])[3]), leaves64, dX.double()
    )

    def fwd_bwd(graph=True):
        X = matfn.tri_solve(
            *leaves[:3], log_decay=(leaves + [None])[3], check_finite=False, cuda_graph=graph
        )
        return torch.autograd.grad(X, leaves, dX)

    got = fwd_bwd()
    errs = [rel(a, b) for a, b in zip(got, want, strict=True)]
    t_fb = bench(fwd_bwd)
    note = "dQ dK dV dℓ"[: 3 * len(errs) - 1] + ": " + " ".join(f"{e:.1e}" for e in errs)
    ratio = (t_fb - t_fwd) / t_fwd
    row(case, "forward+backward", t_fb, max(errs), f"backward {ratio:.2f}× forward; {note}")
    row(case, "forward+backward, cuda_graph=False", bench(lambda: fwd_bwd(False)))
    t_fb_torch = torch_form(lambda: bench(fwd_bwd))
    row(case, "forward+backward, torch form", t_fb_torch)

    if not extra:
        return
    compiled = torch.compile(
        lambda Q, K, V, L: matfn.tri_solve(Q, K, V, log_decay=L, check_finite=False),
        mode="reduce-overhead",
        fullgraph=True,
    )
    err = rel(compiled(Q, K, V, L), X64)
    t_c = bench(lambda: compiled(Q, K, V, L))
    row(case, "forward, compile reduce-overhead", t_c, err)

    def fwd_bwd_compiled():
        return torch.autograd.grad(compiled(*leaves[:3], (leaves + [None])[3]), leaves, dX)

    t_cfb = bench(fwd_bwd_compiled)
    ratio = (t_cfb - t_c) / t_c
    row(case, "forward+backward, compile reduce-overhead", t_cfb, note=f"backward {ratio:.2f}×")
    Y64 = matfn.tri_inv(args64[0], args64[1], log_decay=args64[3])

    def inv_fwd():
        return matfn.tri_inv(Q, K, log_decay=L, check_finite=False)

    row(case, "tri_inv forward", bench(inv_fwd), rel(inv_fwd(), Y64))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--batch", default="1,16")
    p.add_argument("--strength", default="1,5")
    p.add_argument("--kinds", default="none,GDN,KDA", help="no decay, per row, per channel")
    args = p.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    print("| case | call | ms | rel. error vs float64 | notes |")
    print("|---|---|---|---|---|")
    for B in (int(b) for b in args.batch.split(",")):
        for kind in args.kinds.split(","):
            strengths = [1.0] if kind == "none" else [float(x) for x in args.strength.split(",")]
            for s in strengths:
                run_case(B, args.n, args.d, kind, s, extra=B == 1 and s == 1.0)
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
