"""Where the time goes: torch.profiler tables for the launch-bound cases (GPU only).

Run on a CUDA machine from the repository root::

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_profile.py [--cases muon,msign1024,batch512]

Per case: wall time per call (synchronised), host time to issue one call on an idle queue,
the summed GPU kernel time, the number of kernel launches per call, the top kernels by GPU
time, any host-device synchronisation caught by ``torch.cuda.set_sync_debug_mode``, and a
cProfile of the host side (where the Python issue time goes).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import matfn  # noqa: E402
from benchmarks.gpu_decay import make  # noqa: E402
from optim import Muon  # noqa: E402


def gpt2_muon():
    shapes = []
    for _ in range(12):
        shapes += [(768, 768)] * 4 + [(768, 3072), (3072, 768)]
    g = torch.Generator(device="cuda").manual_seed(0)
    params = [(torch.randn(s, device="cuda", generator=g) * 0.02).requires_grad_() for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, device="cuda", generator=g)
    return Muon(params, lr=0.02).step


def msign_of(shape):
    M = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    return lambda: matfn.msign(M, steps=5, check_finite=False)


def torch_muon_ns():
    from torch.optim._muon import _zeropower_via_newtonschulz

    G = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
    return lambda: _zeropower_via_newtonschulz(G, (3.4445, -4.7750, 2.0315), 5, 1e-7)


def msign_pieces():
    """msign at 1024² split into its parts, to separate Python from op costs."""
    from matfn.coefficients import schedule
    from matfn.msign import newton_schulz_torch, normalize

    M = torch.randn(1, 1024, 1024, device="cuda", dtype=torch.bfloat16)
    coeffs, factor = schedule("polar_express", 5)
    X0 = normalize(M, factor, 1e-7, torch.bfloat16)
    parts = {
        "normalize": lambda: normalize(M, factor, 1e-7, torch.bfloat16),
        "newton_schulz_torch (5 steps)": lambda: newton_schulz_torch(X0, coeffs),
        "one mm": lambda: X0[0] @ X0[0].mT,
        "schedule() lookup": lambda: schedule("polar_express", 5),
    }
    for name, fn in parts.items():
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            fn()
        host = (time.perf_counter() - t0) / 20 * 1e3
        torch.cuda.synchronize()
        print(f"  host per call: {name:<32} {host:.3f} ms")
    return lambda: matfn.msign(M, steps=5, check_finite=False)


def tri_case(op: str):
    from matfn.triangular.inverse import tri_inv_triton
    from matfn.triangular.solve import tri_solve_triton

    g = torch.Generator(device="cuda").manual_seed(0)
    Q, K, V = (torch.randn(3, 1, 4096, 128, device="cuda", generator=g) / 128).unbind(0)
    lam = torch.ones(1, 4096, device="cuda")
    if op == "inv":
        return lambda: tri_inv_triton(Q, K, lam)
    return lambda: tri_solve_triton(Q, K, V, lam)


def tri_backward(kind: str, graph: bool = False):
    """``tri_solve`` forward + ``autograd.grad`` (n = 4096, d = e = 128, batch 1).

    ``kind``: as in :func:`benchmarks.gpu_decay.make` (``none``, ``GDN``, ``KDA``).
    ``graph``: the default ``cuda_graph=True`` (forward and backward replayed), else eager.
    """
    Q, K, V, L = make(1, 4096, 128, kind, 1.0)
    leaves = [x.requires_grad_() for x in (Q, K, V, L) if x is not None]
    dX = torch.randn_like(V)

    def step():
        X = matfn.tri_solve(*leaves[:3], log_decay=L, check_finite=False, cuda_graph=graph)
        return torch.autograd.grad(X, leaves, dX)

    return step


def triton_launch(n_args: int):
    """One empty Triton kernel with ``n_args`` int arguments: the bare cost of a launch."""
    import triton
    import triton.language as tl

    @triton.jit
    def noop(x_ptr, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16,
             a17, a18, BLOCK: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
        tl.store(x_ptr + tl.arange(0, BLOCK), tl.zeros((BLOCK,), tl.float32))

    x = torch.empty(16, device="cuda")
    ints = [4096 + 7 * i for i in range(19)]
    ints[n_args:] = [1] * (19 - n_args)
    return lambda: noop[(1,)](x, *ints, BLOCK=16, PREC="3xtf32")


CASES = {
    "tri_inv4096": lambda: tri_case("inv"),
    "tri_solve4096": lambda: tri_case("solve"),
    "tri_solve_backward4096": lambda: tri_backward("none"),
    "tri_solve_backward4096_graph": lambda: tri_backward("none", graph=True),
    "gdn_backward4096": lambda: tri_backward("GDN"),
    "gdn_backward4096_graph": lambda: tri_backward("GDN", graph=True),
    "kda_backward4096": lambda: tri_backward("KDA"),
    "triton_launch1": lambda: triton_launch(1),
    "triton_launch19": lambda: triton_launch(19),
    "muon": gpt2_muon,
    "msign1024": lambda: msign_of((1024, 1024)),
    "msign4096": lambda: msign_of((4096, 4096)),
    "torch_muon_ns1024": torch_muon_ns,
    "pieces1024": msign_pieces,
    "batch512": lambda: msign_of((64, 512, 512)),
}


def report(name: str, fn, reps: int = 10) -> None:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / reps * 1e3
    host = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        fn()
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events) / 3
    launches = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA) / 3
    print(
        f"\n=== {name}: wall {wall:.3f} ms/call · host (idle queue) "
        f"{sorted(host)[reps // 2]:.3f} ms · GPU kernels {gpu_us / 1e3:.3f} ms · "
        f"{launches:.0f} kernels/call"
    )
    syncs = [str(w.message).splitlines()[0] for w in caught]
    print(f"syncs caught: {len(syncs)}", *sorted(set(syncs))[:5], sep="\n  ")
    print(events.table(sort_by="self_device_time_total", row_limit=14, max_name_column_width=70))
    print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=70))
    host_profile(fn)


def host_profile(fn, reps: int = 5, rows: int = 22) -> None:
    """cProfile of the host side: which Python functions the issue time goes to."""
    import cProfile
    import pstats

    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(reps):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    print(f"host (cProfile, {reps} calls; tottime/cumtime in s):")
    pstats.Stats(prof).sort_stats("tottime").print_stats(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    for name in args.cases.split(","):
        try:
            report(name, CASES[name]())
        except Exception as exc:  # keep the other cases
            print(f"=== {name}: FAILED {type(exc).__name__}: {exc}")


if __name__ == "__main__":
    main()
