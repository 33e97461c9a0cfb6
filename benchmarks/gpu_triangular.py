"""GPU check + timing table for ``tri_inv`` / ``tri_solve`` (Triton) against torch and fla-core.

Run on a CUDA machine from the repository root::

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_triangular.py [--quick] [--json out.json]
        [--sections correct,trap,profile,main,solve,scan,scaling,deltanet] [--skip ...]

The solve's two algorithms side by side (about 2 minutes, most of it compiling)::

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_triangular.py --quick \
        --sections correct,profile,solve

Variants are ``dataclasses.replace`` of the frozen configs (:mod:`matfn.triangular.config`)
plus, for the solve, a forced ``algorithm``.

1. Correctness: every variant on odd sizes and batches, outputs poisoned with NaN,
   compared with the float64 chunked torch form (relative Frobenius error).
2. n = 4096, d = 128, fp32: ours (variants) vs ``torch.linalg.solve_triangular(T, I)`` /
   ``torch.linalg.inv(T)`` for the inverse and ``solve_triangular(T, V)`` (e = 128) for the solve;
   median of ``triton.testing.do_bench`` and of ``do_bench_cudagraph`` (launch gaps removed).
3. ``solve``: the scan and tree solves side by side (eager and graph-replayed, errors vs float64)
   at n = 4096, d = e = 128 for each chunk size and the tree's tile knobs, then doubling n.
4. Doubling n at d = 128: time/n² (inverse) and time/n (solve, scan and tree).
5. DeltaNet chunks (batch 8, 16 heads, length 4096, 64×64 chunks, L2-normalised keys, β ∈ (0, 1)):
   fla-core's ``solve_tril`` (from A) and ``chunk_scaled_dot_kkt_fwd`` + ``solve_tril``
   (from k, β) against our chunk kernel (from Q = diag(β)K and K), then the general case
   (random Λ, Q ≠ K) on the same shapes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import sys

import torch
import triton
import triton.language as tl
from rich.console import Console
from rich.table import Table as RichTable
from triton.testing import do_bench, do_bench_cudagraph

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from matfn import tri_inv, tri_solve  # noqa: E402
from matfn.triangular import inverse, scan, tree  # noqa: E402
from matfn.triangular.chunk import mm  # noqa: E402
from matfn.triangular.config import (  # noqa: E402
    TRI_INV_CONFIG,
    TRI_SOLVE_CONFIG,
    TriInvConfig,
    TriSolveConfig,
)
from matfn.triangular.inverse import tri_inv_triton  # noqa: E402
from matfn.triangular.reference import (  # noqa: E402
    tri_inv_chunked_torch,
    tri_solve_chunked_torch,
)
from matfn.triangular.solve import tri_solve_triton  # noqa: E402

console = Console(width=160)


class Table(RichTable):
    """A rich table that also prints each row as it is added (partial results survive a kill)."""

    def add_row(self, *cells, **kw):
        if TIMING:
            console.print(f"[dim]{self.title}[/dim] | " + " | ".join(str(c) for c in cells))
        super().add_row(*cells, **kw)


dev = "cuda"
TIMING = True  # False: run each timed function once (the precompile workers)


def run_info(**extra) -> dict:
    """The GPU, the date and the versions that a run's results are recorded with."""
    return dict(
        device=torch.cuda.get_device_properties(0).name,
        date=datetime.datetime.now(datetime.UTC).isoformat(),
        torch=torch.__version__,
        triton=triton.__version__,
        **extra,
    )


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.double()
    if not torch.isfinite(a).all():
        return float("nan")
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def dense_T(Q, K, lam):
    return torch.diag_embed(lam) + torch.tril(Q @ K.mT, -1)


def make(B, n, d, e=0, kind="general", seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    K = torch.nn.functional.normalize(torch.randn(B, n, d, device=dev, generator=g), dim=-1)
    if kind == "deltanet":
        beta = torch.rand(B, n, device=dev, generator=g)
        Q = K * beta[..., None]
        lam = torch.ones(B, n, device=dev)
    else:
        Q = 0.5 * torch.nn.functional.normalize(
            torch.randn(B, n, d, device=dev, generator=g), dim=-1
        )
        K = 0.5 * K
        lam = (1 + torch.rand(B, n, device=dev, generator=g)) * torch.where(
            torch.rand(B, n, device=dev, generator=g) < 0.3, -1.0, 1.0
        )
    V = torch.randn(B, n, e, device=dev, generator=g) if e else None
    return Q, K, lam, V


def ms(fn, graph=True):
    if not TIMING:
        fn()
        return float("nan"), float("nan")
    t = do_bench(fn, warmup=25, rep=100, return_mode="median")
    tg = float("nan")
    if graph:
        try:
            tg = do_bench_cudagraph(fn, rep=100, return_mode="median")
        except Exception as exc:  # noqa: BLE001
            console.print(f"[yellow]cudagraph failed: {exc}")
    return t, tg


# Each config compiles its own kernels (10-50 s of single-thread compile time for C = 64 on first
# use, cached on disk afterwards), so `precompile` warms every (variant, shape) pair in parallel
# processes first. A variant: TriInvConfig / TriSolveConfig fields, and the solve's "algorithm".
VARIANTS_INV = [
    dict(),  # the default (C = 64)
    dict(chunk_size=32),
]
SCAN = dict(algorithm="scan")
TREE = dict(algorithm="tree")
VARIANTS_SOLVE = [
    dict(**TREE),  # the tree with the defaults (C = 32, 32×32 tiles, 4 warps)
    dict(**SCAN),  # the scan with the defaults (what an eager tri_solve runs)
    dict(chunk_size=16, **SCAN),
    dict(chunk_size=64, **SCAN),
    dict(chunk_size=16, **TREE),
    dict(chunk_size=64, **TREE),
    dict(tree_cols=64, **TREE),
    dict(tree_gram_block=64, **TREE),
    dict(tree_rows=16, tree_cols=16, tree_gram_block=16, **TREE),
    dict(chunk_size=64, tree_rows=64, tree_cols=64, tree_gram_block=64, tree_warps=8, **TREE),
]
_INV_FIELDS = {f.name for f in dataclasses.fields(TriInvConfig)}
_SOLVE_FIELDS = {f.name for f in dataclasses.fields(TriSolveConfig)}


def inv_args(v: dict) -> dict:
    """tri_inv_triton's arguments for a variant (its TriInvConfig fields)."""
    return dict(
        config=dataclasses.replace(
            TRI_INV_CONFIG, **{k: x for k, x in v.items() if k in _INV_FIELDS}
        )
    )


def solve_args(v: dict) -> dict:
    """tri_solve_triton's arguments for a variant (its TriSolveConfig fields and algorithm)."""
    config = dataclasses.replace(
        TRI_SOLVE_CONFIG, **{k: x for k, x in v.items() if k in _SOLVE_FIELDS}
    )
    return dict(config=config, algorithm=v.get("algorithm", "auto"))


CORRECTNESS_SHAPES = [
    (1, 1, 1, 1),
    (3, 17, 5, 3),
    (2, 100, 16, 50),
    (2, 777, 100, 33),
    (1, 4096, 128, 128),
]


def _warm(task) -> tuple[str, float, str | None]:
    """Compile one variant's kernels for one shape (in a worker process; launches blocking so
    that a faulting kernel is named). Returns (label, seconds, error or None)."""
    import time
    import traceback

    os.environ["CUDA_LAUNCH_BLOCKING"] = "1"
    v, (B, n, d, e) = task
    t0 = time.perf_counter()
    try:
        Q, K, lam, V = make(B, n, d, e)
        tri_inv_triton(Q, K, lam, **inv_args(v))
        if e:
            tri_solve_triton(Q, K, V, lam, **solve_args(v))
        torch.cuda.synchronize()
        err = None
    except Exception as exc:  # noqa: BLE001
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if "matfn" in f.filename]
        where = f" at {frames[-1].filename.split('/')[-1]}:{frames[-1].lineno}" if frames else ""
        err = f"{type(exc).__name__}: {str(exc)[:120]}{where}"
    return f"{vname(v)} {(B, n, d, e)}", time.perf_counter() - t0, err


def _warm_fla() -> tuple[str, float, str | None]:
    """Run fla-core's autotuning once (its results are cached on disk for the main process)."""
    import time

    t0 = time.perf_counter()
    try:
        deltanet({}, timing=False)
    except Exception as exc:  # noqa: BLE001
        return "fla-warm-up", time.perf_counter() - t0, repr(exc)[:200]
    return "fla-core+ours on the DeltaNet shapes", time.perf_counter() - t0, None


def precompile(workers: int, sections: set[str], quick: bool) -> set[str]:
    """Fill Triton's on-disk cache for every (variant, shape) pair that ``sections`` use,
    ``workers`` at a time (Triton specialises integer arguments on ``== 1`` and divisibility
    by 16 only, so n = 1024 stands for every timed size)."""
    import concurrent.futures
    import multiprocessing
    import time

    shapes = (CORRECTNESS_SHAPES[:3] if quick else CORRECTNESS_SHAPES) + [(1, 1024, 128, 128)]
    wanted = []
    if sections & {"correct", "main", "solve", "profile", "scaling"}:
        wanted += VARIANTS_SOLVE  # (_warm runs the inverse with the same chunk settings too)
    if sections & {"correct", "main", "profile", "scaling", "deltanet"}:
        wanted += VARIANTS_INV
        shapes.append((16, 64, 128, 0))
    variants = list({vname(v): v for v in wanted}.values())
    tasks = [(v, sh) for v in variants for sh in shapes]
    t0 = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    # one process per task: a kernel that faults poisons its process's CUDA context
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=ctx, max_tasks_per_child=1
    ) as pool:
        # fla-core autotunes 16+ configs one after another: start it first
        futures = [pool.submit(_warm_fla)] if "deltanet" in sections else []
        futures += [pool.submit(_warm, t) for t in tasks]
        times = sorted((f.result() for f in futures), key=lambda r: -r[1])
    console.print(
        f"precompiled {len(tasks)} (variant, shape) pairs in "
        f"{time.perf_counter() - t0:.0f} s with {workers} processes; slowest: "
        + ", ".join(f"{k} {t:.0f} s" for k, t, _ in times[:3])
    )
    failed = {label.split(" ")[0] for label, _, err in times if err}
    for label, _, err in times:
        if err:
            console.print(f"[red]FAILED {label}: {err}")
    # a variant that faults (illegal address) would poison the CUDA context of this process
    for lst in (VARIANTS_INV, VARIANTS_SOLVE):
        lst[:] = [v for v in lst if vname(v) not in failed]
    return failed


def vname(v: dict) -> str:
    """A variant's name: its fields, or "default"."""
    return "/".join(f"{k}={x}" for k, x in v.items()) or "default"


def correctness(quick: bool) -> bool:
    ok = True
    shapes = CORRECTNESS_SHAPES[:3] if quick else CORRECTNESS_SHAPES
    tab = Table(title="correctness vs float64 (rel. Frobenius), outputs poisoned with NaN")
    for c in ("B", "n", "d", "e", "variant", "kind", "inv err", "solve err", "‖T⁻¹‖_max"):
        tab.add_column(c)
    for B, n, d, e in shapes:
        for kind in ("general", "deltanet"):
            Q, K, lam, V = make(B, n, d, e, kind, seed=n + d)
            Yr = tri_inv_chunked_torch(Q.double(), K.double(), lam.double())
            Xr = tri_solve_chunked_torch(Q.double(), K.double(), V.double(), lam.double())
            for v in VARIANTS_SOLVE + [v for v in VARIANTS_INV if v not in VARIANTS_SOLVE]:
                vs = dict(v)
                Y = torch.full((B, n, n), float("nan"), device=dev)
                tri_inv_triton(Q, K, lam, out=Y, **inv_args(vs))
                X = torch.full((B, n, e), float("nan"), device=dev)
                tri_solve_triton(Q, K, V, lam, out=X, **solve_args(vs))
                torch.cuda.synchronize()
                ei, es = rel(Y, Yr), rel(X, Xr)
                tol = 1e-5
                bad = not (ei < tol and es < tol)
                ok &= not bad
                if bad:
                    console.print(f"[red]FAIL {vname(v)} {(B, n, d, e)} {kind}: {ei:.1e} {es:.1e}")
                tab.add_row(
                    str(B),
                    str(n),
                    str(d),
                    str(e),
                    vname(v),
                    kind,
                    f"{ei:.1e}",
                    f"{es:.1e}",
                    f"{Yr.abs().max().item():.1e}",
                    style="red" if bad else None,
                )
    # the public API dispatches to the kernels on CUDA
    Q, K, lam, V = make(2, 300, 20, 7)
    e1 = rel(tri_inv(Q, K, lam), tri_inv_chunked_torch(Q.double(), K.double(), lam.double()))
    e2 = rel(
        tri_solve(Q, K, V, lam),
        tri_solve_chunked_torch(Q.double(), K.double(), V.double(), lam.double()),
    )
    tab.add_row("2", "300", "20", "7", "public API", "general", f"{e1:.1e}", f"{e2:.1e}", "")
    ok &= e1 < 1e-5 and e2 < 1e-5
    console.print(tab)
    return ok


def main_table(results, n=4096, d=128, e=128):
    Q, K, lam, V = make(1, n, d, e, "general", seed=1)
    T = dense_T(Q, K, lam)
    Yr = tri_inv_chunked_torch(Q.double(), K.double(), lam.double())
    Xr = tri_solve_chunked_torch(Q.double(), K.double(), V.double(), lam.double())
    eye = torch.eye(n, device=dev)
    tab = Table(title=f"n={n}, d={d}, e={e}, fp32, one matrix (median ms)")
    for c in ("op", "impl", "do_bench", "cudagraph", "vs baseline", "rel err vs fp64"):
        tab.add_column(c)
    t_base, _ = ms(lambda: torch.linalg.solve_triangular(T, eye, upper=False), graph=False)
    t_invb, _ = ms(lambda: torch.linalg.inv(T), graph=False)
    e_base = rel(torch.linalg.solve_triangular(T, eye, upper=False), Yr)
    e_invb = rel(torch.linalg.inv(T), Yr)
    tab.add_row(
        "tri_inv", "torch solve_triangular(T, I)", f"{t_base:.3f}", "", "1.00", f"{e_base:.1e}"
    )
    tab.add_row(
        "tri_inv", "torch inv(T)", f"{t_invb:.3f}", "", f"{t_base / t_invb:.2f}", f"{e_invb:.1e}"
    )
    results["inv_baseline_ms"] = t_base
    results["inv_torch_inv_ms"] = t_invb
    for v in VARIANTS_INV:
        t, tg = ms(lambda v=v: tri_inv_triton(Q, K, lam, **inv_args(v)))
        err = rel(tri_inv_triton(Q, K, lam, **inv_args(v)), Yr)
        tab.add_row(
            "tri_inv",
            "ours " + vname(v),
            f"{t:.3f}",
            f"{tg:.3f}",
            f"{t_base / t:.1f}x",
            f"{err:.1e}",
        )
        results[f"inv {vname(v)}"] = dict(ms=t, ms_graph=tg, err=err)
    t_sb, _ = ms(lambda: torch.linalg.solve_triangular(T, V, upper=False), graph=False)
    e_sb = rel(torch.linalg.solve_triangular(T, V, upper=False), Xr)
    tab.add_row(
        "tri_solve", "torch solve_triangular(T, V)", f"{t_sb:.3f}", "", "1.00", f"{e_sb:.1e}"
    )
    results["solve_baseline_ms"] = t_sb
    for v in VARIANTS_SOLVE:
        t, tg = ms(lambda v=v: tri_solve_triton(Q, K, V, lam, **solve_args(v)))
        err = rel(tri_solve_triton(Q, K, V, lam, **solve_args(v)), Xr)
        tab.add_row(
            "tri_solve",
            "ours " + vname(v),
            f"{t:.3f}",
            f"{tg:.3f}",
            f"{t_sb / t:.1f}x",
            f"{err:.1e}",
        )
        results[f"solve {vname(v)}"] = dict(ms=t, ms_graph=tg, err=err)
    console.print(tab)


def _kernel_times(fn, iters=20) -> dict[str, tuple[float, float]]:
    """Launches and device µs per call of each kernel that ``fn`` runs (torch.profiler)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fn()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    return {
        ev.key: (ev.count / iters, ev.device_time_total / iters)
        for ev in prof.key_averages()
        if ev.device_time_total > 0
    }


def profile(results, n=4096, d=128, e=128, iters=20):
    """Device time per kernel (torch.profiler) of one call, and the host time of a call (50 calls
    queued without a sync: what eager use pays when the launches, not the GPU, are the limit)."""
    import time

    Q, K, lam, V = make(1, n, d, e, "general", seed=1)
    tree64 = solve_args(dict(chunk_size=64, **TREE))
    cases = {
        "inv default": lambda: tri_inv_triton(Q, K, lam),
        # eagerly "auto" is the scan (the tree only while a CUDA graph is captured)
        "solve default (scan, C32)": lambda: tri_solve_triton(Q, K, V, lam),
        "solve tree C64": lambda: tri_solve_triton(Q, K, V, lam, **tree64),
        "solve tree C32": lambda: tri_solve_triton(Q, K, V, lam, algorithm="tree"),
        "public tri_inv": lambda: tri_inv(Q[0], K[0], lam[0], check_finite=False),
        "public tri_solve": lambda: tri_solve(Q[0], K[0], V[0], lam[0], check_finite=False),
        "public tri_solve, check_finite": lambda: tri_solve(Q[0], K[0], V[0], lam[0]),
        "public tri_inv, cuda_graph": lambda: tri_inv(
            Q[0], K[0], lam[0], check_finite=False, cuda_graph=True
        ),
        "public tri_solve, cuda_graph": lambda: tri_solve(
            Q[0], K[0], V[0], lam[0], check_finite=False, cuda_graph=True
        ),
    }
    tab = Table(title=f"device time per kernel, n={n}, d={d}, e={e} (µs per call, torch.profiler)")
    for c in ("call", "kernel", "launches", "µs"):
        tab.add_column(c)
    for label, fn in cases.items():
        total = 0.0
        for key, (count, us) in sorted(_kernel_times(fn, iters).items(), key=lambda kv: -kv[1][1]):
            total += us
            tab.add_row(label, key[:60], f"{count:g}", f"{us:.1f}")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(50):
            fn()
        host = (time.perf_counter() - t0) / 50 * 1e6
        torch.cuda.synchronize()
        tab.add_row(
            label, "[b]sum on the GPU / host time per call[/b]", "", f"{total:.1f} / {host:.1f}"
        )
        results[f"profile {label}"] = dict(device_us=total, host_us=host)
    console.print(tab)
    for label, fn in cases.items():  # what a caller waits for, eager (launches included)
        if label.startswith("public"):
            eager = ms(fn, graph=False)[0]
            results[f"eager {label}"] = eager
            console.print(f"eager do_bench {label}: {eager:.3f} ms")


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    """``a @ b``: the library's three-pass product for ``"3xtf32"``, else ``tl.dot`` in ``PREC``."""
    if PREC == "3xtf32":
        return mm(a, b)
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _trap_kernel(
    w_ptr,
    p_ptr,
    k_ptr,
    s_ptr,
    x_ptr,
    out_s_ptr,
    STEPS,
    M: tl.constexpr,
    D: tl.constexpr,
    N: tl.constexpr,
    PREC: tl.constexpr,
):
    """The group kernel's loop, bare: ``X_c = W_c − P_c S; S += K_cᵀ X_c`` over ``STEPS`` tiles."""
    rm = tl.arange(0, M)
    rd = tl.arange(0, D)
    rn = tl.arange(0, N)
    S = tl.load(s_ptr + rd[:, None] * N + rn[None, :])
    for c in range(0, STEPS):
        P = tl.load(p_ptr + (c * M + rm[:, None]) * D + rd[None, :])
        Kc = tl.load(k_ptr + (c * M + rm[:, None]) * D + rd[None, :])
        W = tl.load(w_ptr + (c * M + rm[:, None]) * N + rn[None, :])
        X = W - _dot(P, S, PREC)
        tl.store(x_ptr + (c * M + rm[:, None]) * N + rn[None, :], X)
        S += _dot(tl.trans(Kc), X, PREC)
    tl.store(out_s_ptr + rd[:, None] * N + rn[None, :], S)


def trap(results, D=128, steps=8):
    """The known trap of the triangular kernels in a bare kernel: a tensor-core dot of a 64-row
    tile by a 16-column tile with 8 warps (wrong in the group kernel on the H100, Triton 3.6)."""
    tab = Table(title="bare group-kernel loop vs float64: relative error of X and S")
    for c in ("M rows", "N cols", "warps", "dot", "err X", "err S"):
        tab.add_column(c)
    g = torch.Generator(device=dev).manual_seed(0)
    for M, N, warps in ((64, 16, 8), (64, 16, 4), (64, 32, 8), (32, 16, 8)):
        P = torch.randn(steps * M, D, device=dev, generator=g) / D**0.5
        Kc = torch.randn(steps * M, D, device=dev, generator=g) / D**0.5
        W = torch.randn(steps * M, N, device=dev, generator=g)
        S0 = torch.randn(D, N, device=dev, generator=g)
        Sr, Xr = S0.double(), []
        for c in range(steps):
            x = W[c * M : (c + 1) * M].double() - P[c * M : (c + 1) * M].double() @ Sr
            Xr.append(x)
            Sr = Sr + Kc[c * M : (c + 1) * M].double().T @ x
        Xr = torch.cat(Xr)
        for prec in ("ieee", "tf32x3", "3xtf32"):
            X = torch.full_like(W, float("nan"))
            S = torch.full_like(S0, float("nan"))
            _trap_kernel[(1,)](W, P, Kc, S0, X, S, steps, M=M, D=D, N=N, PREC=prec, num_warps=warps)
            ex, es = rel(X, Xr), rel(S, Sr)
            bad = not ex < 1e-5
            tab.add_row(
                str(M),
                str(N),
                str(warps),
                prec,
                f"{ex:.1e}",
                f"{es:.1e}",
                style="red" if bad else None,
            )
            results[f"trap M{M} N{N} w{warps} {prec}"] = dict(err_x=ex, err_s=es)
    console.print(tab)


def solve_compare(results, quick, n=4096, d=128, e=128, sizes=None):
    """The scan and tree solves side by side: each tree variant of VARIANTS_SOLVE against the
    scan with its chunk size at ``n``, then the defaults of both at doubling n and batch
    (``sizes``: (B, n) pairs)."""
    Q, K, lam, V = make(1, n, d, e, "general", seed=1)
    Xr = tri_solve_chunked_torch(Q.double(), K.double(), V.double(), lam.double())
    tab = Table(title=f"tri_solve scan vs tree: n={n}, d={d}, e={e}, fp32 (median ms)")
    for c in (
        "C",
        "tree variant",
        "scan eager",
        "scan graph",
        "scan err",
        "tree eager",
        "tree graph",
        "tree err",
        "scan/tree graph",
    ):
        tab.add_column(c)

    def run(v):
        t, tg = ms(lambda: tri_solve_triton(Q, K, V, lam, **solve_args(v)))
        X = torch.full((1, n, e), float("nan"), device=dev)
        return t, tg, rel(tri_solve_triton(Q, K, V, lam, out=X, **solve_args(v)), Xr)

    by_chunk = {}
    for v in [x for x in VARIANTS_SOLVE if x.get("algorithm") == "tree"]:
        C = solve_args(v)["config"].chunk_size
        if C not in by_chunk:
            by_chunk[C] = run(dict(SCAN, chunk_size=C))
            results[f"solve scan C{C}"] = dict(
                zip(("ms", "ms_graph", "err"), by_chunk[C], strict=True)
            )
        tree_t = run(v)
        results[f"solve {vname(v)}"] = dict(zip(("ms", "ms_graph", "err"), tree_t, strict=True))
        tab.add_row(
            str(C),
            vname(v),
            *(f"{x:.3f}" for x in by_chunk[C][:2]),
            f"{by_chunk[C][2]:.1e}",
            *(f"{x:.3f}" for x in tree_t[:2]),
            f"{tree_t[2]:.1e}",
            f"{by_chunk[C][1] / tree_t[1]:.2f}",
        )
    console.print(tab)

    tab = Table(title=f"tri_solve scan vs tree, defaults (C = 32), d={d}, e={e}: doubling n, batch")
    for c in ("B", "n", "scan eager", "scan graph", "tree eager", "tree graph", "scan/tree graph"):
        tab.add_column(c)
    tab.add_column("tree graph µs/(B·n/1024)")
    tab.add_column("err scan / tree")
    if sizes is None:
        sizes = [(1, 512), (1, 1024), (1, 2048), (1, 4096), (1, 8192), (8, 4096), (32, 1024)]
        if not quick:
            sizes.insert(5, (1, 16384))
    for B, n in sizes:
        Q, K, lam, V = make(B, n, d, e, "general", seed=n + B)
        Xr = tri_solve_chunked_torch(Q.double(), K.double(), V.double(), lam.double())
        row = {}
        for alg in ("scan", "tree"):
            row[alg] = ms(lambda alg=alg: tri_solve_triton(Q, K, V, lam, algorithm=alg))
            row[alg + " err"] = rel(tri_solve_triton(Q, K, V, lam, algorithm=alg), Xr)
        (s_t, s_g), (t_t, t_g) = row["scan"], row["tree"]
        tab.add_row(
            str(B),
            str(n),
            f"{s_t:.3f}",
            f"{s_g:.3f}",
            f"{t_t:.3f}",
            f"{t_g:.3f}",
            f"{s_g / t_g:.2f}",
            f"{t_g * 1e3 / (B * n / 1024):.1f}",
            f"{row['scan err']:.1e} / {row['tree err']:.1e}",
        )
        results[f"solve B={B} n={n}"] = row
    console.print(tab)


def scaling(results, d=128, e=128):
    tab = Table(title=f"doubling n (d={d}, e={e}, fp32, the launchers' defaults)")
    for c in (
        "n",
        "inv ms",
        "inv ns/n²",
        "solve_tri(T,I) ms",
        "scan ms",
        "scan ns/n",
        "tree ms",
        "tree ns/n",
        "scan / tree graph ms",
        "solve_tri(T,V) ms",
    ):
        tab.add_column(c)
    for n in (512, 1024, 2048, 4096, 8192):
        Q, K, lam, V = make(1, n, d, e, "general", seed=n)
        T = dense_T(Q, K, lam)
        eye = torch.eye(n, device=dev)
        ti, _ = ms(lambda: tri_inv_triton(Q, K, lam), graph=False)
        ts, tsg = ms(lambda: tri_solve_triton(Q, K, V, lam, algorithm="scan"))
        tt, ttg = ms(lambda: tri_solve_triton(Q, K, V, lam, algorithm="tree"))
        bi, _ = ms(lambda: torch.linalg.solve_triangular(T, eye, upper=False), graph=False)
        bs, _ = ms(lambda: torch.linalg.solve_triangular(T, V, upper=False), graph=False)
        tab.add_row(
            str(n),
            f"{ti:.3f}",
            f"{ti * 1e6 / n**2:.3f}",
            f"{bi:.3f}",
            f"{ts:.3f}",
            f"{ts * 1e6 / n:.2f}",
            f"{tt:.3f}",
            f"{tt * 1e6 / n:.2f}",
            f"{tsg:.4f} / {ttg:.4f}",
            f"{bs:.3f}",
        )
        results[f"scaling n={n}"] = dict(
            inv=ti,
            solve_scan=ts,
            solve_tree=tt,
            solve_scan_graph=tsg,
            solve_tree_graph=ttg,
            base_inv=bi,
            base_solve=bs,
        )
    console.print(tab)


def deltanet(results, B=8, H=16, T=4096, d=128, BT=64, timing=True):
    global TIMING
    TIMING = timing
    tab = Table(
        title=f"DeltaNet chunks: B={B}, H={H}, T={T}, {BT}×{BT} chunks, d={d}, fp32 (median ms)"
    )
    for c in ("impl", "input", "do_bench", "cudagraph", "rel err vs fp64"):
        tab.add_column(c)
    g = torch.Generator(device=dev).manual_seed(3)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, d, device=dev, generator=g), dim=-1)
    beta = torch.rand(B, T, H, device=dev, generator=g)
    # our layout: one (BT, d) matrix per (b, h, chunk)
    Kc = k.view(B, T // BT, BT, H, d).permute(0, 3, 1, 2, 4).reshape(-1, BT, d).contiguous()
    bc = beta.view(B, T // BT, BT, H).permute(0, 3, 1, 2).reshape(-1, BT).contiguous()
    Qc = (Kc * bc[..., None]).contiguous()
    ones = torch.ones(Kc.shape[:2], device=dev)
    sub = slice(0, 256)
    Yr = tri_inv_chunked_torch(Qc[sub].double(), Kc[sub].double(), ones[sub].double())
    try:
        from fla.ops.common.chunk_scaled_dot_kkt import chunk_scaled_dot_kkt_fwd
        from fla.ops.utils.solve_tril import solve_tril

        A = chunk_scaled_dot_kkt_fwd(k, beta=beta, chunk_size=BT)
        # exact A for the "solve_tril only" row, so its error is solve_tril's own
        Aex = torch.tril(Qc @ Kc.mT, -1)
        Aex = Aex.view(B, H, T // BT, BT, BT).permute(0, 2, 3, 1, 4).reshape(B, T, H, BT)
        Aex = Aex.contiguous()

        def to_ours(Ai):
            return Ai.view(B, T // BT, BT, H, BT).permute(0, 3, 1, 2, 4).reshape(-1, BT, BT)

        t, tg = ms(lambda: solve_tril(Aex))
        err = rel(to_ours(solve_tril(Aex))[sub], Yr)
        tab.add_row(
            "fla solve_tril", "A (fp32, precomputed)", f"{t:.3f}", f"{tg:.3f}", f"{err:.1e}"
        )
        results["fla solve_tril"] = dict(ms=t, ms_graph=tg, err=err)

        def fla_full():
            return solve_tril(chunk_scaled_dot_kkt_fwd(k, beta=beta, chunk_size=BT))

        t, tg = ms(fla_full)
        err = rel(to_ours(fla_full())[sub], Yr)
        tab.add_row("fla kkt + solve_tril", "k, β (fp32)", f"{t:.3f}", f"{tg:.3f}", f"{err:.1e}")
        results["fla kkt+solve_tril"] = dict(ms=t, ms_graph=tg, err=err)
        del A
    except Exception as exc:  # noqa: BLE001
        console.print(f"[red]fla-core unavailable: {exc!r}")
    for v in [x for x in VARIANTS_INV if inv_args(x)["config"].chunk_size == BT]:
        t, tg = ms(lambda v=v: tri_inv_triton(Qc, Kc, ones, **inv_args(v)))
        err = rel(tri_inv_triton(Qc, Kc, ones, **inv_args(v))[sub], Yr)
        tab.add_row("ours " + vname(v), "Q=βK, K (fp32)", f"{t:.3f}", f"{tg:.3f}", f"{err:.1e}")
        results[f"deltanet ours {vname(v)}"] = dict(ms=t, ms_graph=tg, err=err)
    # general case on the same shapes: random Λ (both signs), Q ≠ K
    Qg, Kg, lam, _ = make(Kc.shape[0], BT, d, 0, "general", seed=5)
    Yg = tri_inv_chunked_torch(Qg[sub].double(), Kg[sub].double(), lam[sub].double())
    for v in [x for x in VARIANTS_INV if inv_args(x)["config"].chunk_size == BT]:
        t, tg = ms(lambda v=v: tri_inv_triton(Qg, Kg, lam, **inv_args(v)))
        err = rel(tri_inv_triton(Qg, Kg, lam, **inv_args(v))[sub], Yg)
        tab.add_row("ours " + vname(v), "general Λ, Q≠K", f"{t:.3f}", f"{tg:.3f}", f"{err:.1e}")
        results[f"deltanet-shape general ours {vname(v)}"] = dict(ms=t, ms_graph=tg, err=err)
    if TIMING:
        console.print(tab)


# the scan's values at n = 4096 (section "scan")
SCAN_SWEEP = [
    dict(),  # the default: fused, growing groups, one group-kernel program per SM
    dict(min_groups_per_wave=10**6),  # the unfused form (what batches get), equal groups
    dict(scan_ratio=2.5),
    dict(scan_ratio=1.5),
]


@triton.jit
def _handoff_kernel(counter_ptr, flag_ptr, data_ptr, BLOCK: tl.constexpr):
    """Program ``t`` (in start order) waits for ``t − 1``'s flag, bumps a block and flags."""
    t = tl.atomic_add(counter_ptr, 1)
    off = tl.arange(0, BLOCK)
    if t > 0:
        while tl.atomic_add(flag_ptr + t - 1, 0, sem="acquire") == 0:
            pass
        tl.debug_barrier()
        v = tl.load(data_ptr + (t - 1) * BLOCK + off, cache_modifier=".cg")
    else:
        v = tl.zeros((BLOCK,), dtype=tl.float32)
    tl.store(data_ptr + t * BLOCK + off, v + 1.0)
    tl.debug_barrier()
    tl.atomic_xchg(flag_ptr + t, 1, sem="release")


def handoff(results, programs=(1, 32, 128)):
    """Latency of one program-to-program handoff through a flag in global memory (the
    building block of a single-launch chained scan): time of a chain of N programs."""
    tab = Table(title="flag handoff chain (graph-replayed µs)")
    for c in ("programs", "µs", "µs per handoff", "ok"):
        tab.add_column(c)
    for N in programs:
        for block in (128, 4096):
            counter = torch.zeros(1, dtype=torch.int32, device=dev)
            flags = torch.zeros(N, dtype=torch.int32, device=dev)
            data = torch.zeros(N * block, dtype=torch.float32, device=dev)

            def fn():
                counter.zero_()
                flags.zero_()
                _handoff_kernel[(N,)](counter, flags, data, BLOCK=block, num_warps=4)

            fn()
            ok = bool((data.view(N, block)[:, 0] == torch.arange(1, N + 1, device=dev)).all())
            _, tg = ms(fn)
            tab.add_row(f"{N} x {block}", f"{tg * 1e3:.1f}", f"{tg * 1e3 / N:.2f}", str(ok))
            results[f"handoff {N}x{block}"] = dict(us=tg * 1e3, ok=ok)
    console.print(tab)


@contextlib.contextmanager
def pdl_mode(mode: str):
    """``"never"``: launch the triangular kernels without programmatic dependent launch (the
    launchers' ``use_pdl`` patched for the duration); ``"auto"``: as shipped."""
    modules = (inverse, scan, tree)
    saved = [m.use_pdl for m in modules]
    try:
        if mode == "never":
            for m in modules:
                m.use_pdl = lambda *args, **kwargs: False
        yield
    finally:
        for m, fn in zip(modules, saved, strict=True):
            m.use_pdl = fn


def scan_sweep(results, n=4096, d=128, e=128, pdl_modes=("auto", "never")):
    """The launch chains with programmatic dependent launch (PDL) on and off: tri_inv, the tree
    solves and the scan's variants (SCAN_SWEEP); graph-replayed and eager ms, error against
    float64 and, for the scan, device time per kernel (with PDL a kernel's time includes its
    wait for the one before, so those columns overlap)."""
    Q, K, lam, V = make(1, n, d, e, "general", seed=1)
    Xr = tri_solve_chunked_torch(Q.double(), K.double(), V.double(), lam.double())
    tab = Table(title=f"tri_solve scan variants: n={n}, d={d}, e={e}, fp32 (graph-replayed ms)")
    for c in ("variant", "PDL", "graph ms", "eager ms", "err", "kernels (µs, profiler)"):
        tab.add_column(c)
    Yr = tri_inv_chunked_torch(Q.double(), K.double(), lam.double())
    tree64 = solve_args(dict(chunk_size=64, **TREE))
    others = {  # the other launch chains, for programmatic dependent launch on and off
        "tri_inv default": (lambda: tri_inv_triton(Q, K, lam), Yr),
        "solve tree C32": (lambda: tri_solve_triton(Q, K, V, lam, algorithm="tree"), Xr),
        "solve tree C64": (lambda: tri_solve_triton(Q, K, V, lam, **tree64), Xr),
    }
    for label, (fn, ref) in others.items():
        for pdl in pdl_modes:
            with pdl_mode(pdl):
                err = rel(fn(), ref)
                t, tg = ms(fn)
            tab.add_row(label, pdl, f"{tg:.4f}", f"{t:.3f}", f"{err:.1e}", "")
            results[f"{label} pdl={pdl}"] = dict(ms_graph=tg, ms=t, err=err)
    for v in SCAN_SWEEP:
        v = dict(SCAN, **v)
        for pdl in pdl_modes:

            def fn(v=v):
                return tri_solve_triton(Q, K, V, lam, **solve_args(v))

            with pdl_mode(pdl):
                X = torch.full((1, n, e), float("nan"), device=dev)
                err = rel(tri_solve_triton(Q, K, V, lam, out=X, **solve_args(v)), Xr)
                t, tg = ms(fn)
                kern = {k: us for k, (_, us) in _kernel_times(fn).items()}
            short = ", ".join(
                f"{k.removeprefix('_').split('_kernel')[0]} {us:.1f}"
                for k, us in sorted(kern.items(), key=lambda kv: -kv[1])
            )
            tab.add_row(vname(v), pdl, f"{tg:.4f}", f"{t:.3f}", f"{err:.1e}", short)
            results[f"scan {vname(v)} pdl={pdl}"] = dict(
                ms_graph=tg, ms=t, err=err, kernels_us=kern
            )
    console.print(tab)


SECTIONS = ("correct", "trap", "profile", "main", "solve", "handoff", "scan", "scaling", "deltanet")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma list of the sections to run, in this order: {','.join(SECTIONS)}",
    )
    ap.add_argument("--skip", default="", help="comma list of sections not to run")
    ap.add_argument(
        "--pdl", default="auto,never", help="scan section: PDL modes to time (comma list)"
    )
    ap.add_argument(
        "--workers",
        type=int,
        default=min(15, (os.cpu_count() or 2) - 1),
        help="processes that precompile the kernels (0: compile on first use)",
    )
    a = ap.parse_args()
    sections = set(a.sections.split(",")) - set(a.skip.split(","))
    if sections - set(SECTIONS):
        ap.error(f"unknown sections {sorted(sections - set(SECTIONS))}; choose from {SECTIONS}")
    failed = sorted(precompile(a.workers, sections, a.quick)) if a.workers > 0 else []
    results = run_info(failed_variants=failed)
    console.print(results)
    if "correct" in sections:
        results["correct"] = correctness(a.quick)
        console.print(f"correctness ok: {results['correct']}")
    if "trap" in sections:
        trap(results)
    if "profile" in sections:
        profile(results)
    if "main" in sections:
        main_table(results)
    if "solve" in sections:
        solve_compare(results, a.quick)
    if "handoff" in sections:
        handoff(results)
    if "scan" in sections:
        scan_sweep(results, pdl_modes=tuple(a.pdl.split(",")))
    if "scaling" in sections:
        scaling(results)
    if "deltanet" in sections:
        deltanet(results)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
