"""Tile-config sweep and launch-cost study of the Newton–Schulz products (GPU only).

Run on a CUDA machine from the repository root::

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_tma_sweep.py [--sections sweep,host,dispatch]
        [--shapes 1x4096x4096,64x512x512] [--json out.json]

Sections
--------
sweep     every product of a quintic step (``X Xᵀ``, ``cA² + bA``, ``cA² + bA + aI``,
          ``BX + aX``) at each shape, timed CUDA-graph replayed (GPU time, no host cost) for
          cuBLAS, the autotuned pointer and TMA kernels and every TMA tile config of
          :data:`SYMMETRIC_SWEEP` / :data:`GENERAL_SWEEP`; each config's result is checked
          against the cuBLAS product first. The best config per product is printed last, and
          the config emerging-optimizers' ``tsyrk_ex`` autotuner picked beside it.
host      host time per launch (no synchronisation, 300 launches queued) of one product by
          cuBLAS, the pointer kernel and the TMA kernel, and a cProfile of the TMA launches.
dispatch  ``matfn.msign`` end to end at small and batched shapes, eager and graph-replayed,
          under alternative dispatch settings (which path each product takes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import matfn  # noqa: E402
from benchmarks.gpu_newton_schulz import configs  # noqa: E402

# (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps, persistent); shared memory checked offline against
# Triton 3.6's sm_90 compiler (≤ 227 KB).
SYMMETRIC_SWEEP = [
    (128, 128, 64, 4, 8, False),
    (128, 128, 64, 4, 8, True),
    (128, 128, 64, 3, 4, False),
    (128, 128, 64, 5, 8, False),
    (128, 128, 128, 3, 8, False),
    (128, 128, 128, 2, 8, False),
    (128, 128, 128, 3, 4, False),
    (64, 64, 64, 4, 4, False),
    (64, 64, 128, 4, 4, False),
    (128, 256, 64, 3, 8, False),
    (128, 256, 64, 4, 8, False),
    (256, 128, 64, 3, 8, False),
    (256, 128, 64, 4, 8, False),
    (128, 128, 64, 2, 4, False),
    (128, 128, 32, 4, 4, False),
    (128, 128, 64, 3, 4, True),
]
GENERAL_SWEEP = [
    (128, 256, 64, 3, 8, True),
    (128, 256, 64, 3, 8, False),
    (128, 256, 64, 4, 8, False),
    (256, 128, 64, 3, 8, False),
    (256, 128, 64, 4, 8, False),
    (128, 128, 64, 4, 8, False),
    (128, 128, 64, 4, 8, True),
    (128, 128, 128, 3, 8, False),
    (128, 128, 128, 3, 8, True),
    (64, 128, 64, 4, 4, False),
    (64, 128, 128, 4, 4, False),
    (64, 64, 64, 4, 4, False),
    (64, 256, 64, 4, 4, False),
]
SHAPES = [
    (1, 4096, 4096),
    (1, 4096, 16384),
    (64, 512, 512),
    (48, 768, 768),
    (1, 1024, 1024),
    (1, 2048, 2048),
    (24, 768, 3072),
    (128, 768, 2048),
]
RESULTS: dict = {}


def log(*a):
    print(*a, flush=True)


def graph_ms(fn) -> float:
    from triton.testing import do_bench_cudagraph

    fn()
    return do_bench_cudagraph(fn, rep=25, return_mode="median")


def section_sweep(shapes):
    from matfn.kernels import matmul
    from matfn.kernels.matmul_tma import launch_tma

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    a, b, c = 3.4445, -4.7750, 2.0315
    best_rows = []
    try:
        from emerging_optimizers.triton_kernels.syrk import tsyrk_ex
    except Exception as exc:  # noqa: BLE001
        tsyrk_ex = None
        log(f"emerging tsyrk_ex unavailable: {exc}")
    for bt, s, L in shapes:
        g = torch.Generator(device="cuda").manual_seed(0)
        X = torch.randn(bt, s, L, device="cuda", dtype=torch.bfloat16, generator=g) / math.sqrt(L)
        A = X @ X.mT
        P = torch.baddbmm(A, A, A, beta=b, alpha=c)
        # name: (symmetric, A, B, D, alpha, beta, gamma, cuBLAS twin)
        products = {
            "X Xᵀ": (True, X, X.mT, None, 1.0, 0.0, 0.0, lambda: torch.bmm(X, X.mT)),
            "cA² + bA": (True, A, A, A, c, b, 0.0, lambda: torch.baddbmm(A, A, A, beta=b, alpha=c)),
            "cA² + bA + aI": (
                False,
                A,
                A,
                A,
                c,
                b,
                a,
                lambda: torch.baddbmm(A, A, A, beta=b, alpha=c),
            ),
            "BX + aX": (False, P, X, X, 1.0, a, 0.0, lambda: torch.baddbmm(X, P, X, beta=a)),
        }
        for pname, (sym, A1, B1, D1, al, be, ga, f_cublas) in products.items():
            if pname.startswith("cA²") and L != s:
                continue  # the s×s products of a wide shape: timed at its square shape
            n, k, m = A1.shape[1], A1.shape[2], B1.shape[2]
            flops = (1 if sym else 2) * bt * n * k * m
            ref = f_cublas().float()
            if ga:
                ref.diagonal(dim1=-2, dim2=-1).add_(ga)
            scale = float(ref.abs().max())
            times = {"cuBLAS": graph_ms(f_cublas)}
            for mode in ("never", "always"):

                def f(mode=mode, sym=sym, A1=A1, B1=B1, D1=D1, al=al, be=be, ga=ga):
                    with configs(tma=mode):
                        return matmul.matmul_triton(
                            A1, B1, D1, alpha=al, beta=be, gamma=ga, symmetric=sym
                        )

                times["pointer (tuned)" if mode == "never" else "TMA (tuned)"] = graph_ms(f)
            for bm, bn, bk, st, w, pers in SYMMETRIC_SWEEP if sym else GENERAL_SWEEP:
                if bm > max(n, 64) or bn > max(m, 64):
                    continue
                out = torch.empty(bt, n, m, device="cuda", dtype=torch.bfloat16)
                cfg = dict(
                    BLOCK_M=bm,
                    BLOCK_N=bn,
                    BLOCK_K=bk,
                    GROUP_M=8,
                    num_stages=st,
                    num_warps=w,
                    PROGRAMS=sms if pers else 0,
                )
                label = f"{bm}x{bn}x{bk} s{st} w{w}{' P' if pers else ''}"
                grid = matmul._grid(n, m, bt, sym)

                def f(
                    A1=A1, B1=B1, D1=D1, al=al, be=be, ga=ga, out=out, sym=sym, grid=grid, cfg=cfg
                ):
                    launch_tma(A1, B1, D1, out, al, be, ga, sym, grid, config=cfg)

                try:
                    f()
                    torch.cuda.synchronize()
                    err = float((out.float() - ref).abs().max()) / scale
                    if not err < 2e-2:
                        log(f"  {bt}x{s}x{L} {pname} {label}: WRONG rel err {err:.1e}")
                        continue
                    times[label] = graph_ms(f)
                except Exception as exc:  # noqa: BLE001
                    log(f"  {bt}x{s}x{L} {pname} {label}: {type(exc).__name__} {str(exc)[:100]}")
            if tsyrk_ex is not None and bt == 1 and sym:
                if pname == "X Xᵀ":
                    times["emerging tsyrk_ex"] = graph_ms(lambda X=X: tsyrk_ex(X[0]))
                else:
                    times["emerging tsyrk_ex"] = graph_ms(
                        lambda A=A: tsyrk_ex(A[0], A[0], alpha=c, beta=b)
                    )
            base = times["cuBLAS"]
            line = " ".join(f"{k}={v:.4f}" for k, v in times.items())
            log(f"  {bt}x{s}x{L} {pname}: {line}")
            configs = {k: v for k, v in times.items() if "x" in k and "tsyrk" not in k}
            best = min(configs, key=configs.get) if configs else None
            if best:
                t = configs[best]
                log(
                    f"  BEST {bt}x{s}x{L} {pname:<14} {best:<22} {t:.4f} ms  cuBLAS {base:.4f}"
                    f"  TMA tuned {times['TMA (tuned)']:.4f}  ({flops / t / 1e9:.0f} performed "
                    f"TF/s; cuBLAS/best {base / t:.2f})"
                )
                best_rows.append(((bt, s, L), pname, best, t, base, times))
    if tsyrk_ex is not None:
        for obj in (tsyrk_ex, *vars(sys.modules[tsyrk_ex.__module__]).values()):
            cfg = getattr(obj, "best_config", None)
            cache = getattr(obj, "cache", None)
            if cfg is not None or cache:
                log(f"  emerging autotuner {getattr(obj, 'fn', obj)}: best {cfg}; cache {cache}")
    RESULTS["sweep"] = best_rows


def section_host():
    """Host time per launch (queued, no sync) and a cProfile of the TMA launch."""
    import cProfile
    import pstats

    from matfn.kernels import matmul

    for bt, s in ((1, 1024), (64, 512), (1, 4096)):
        X = torch.randn(bt, s, s, device="cuda", dtype=torch.bfloat16) / math.sqrt(s)
        out = torch.empty_like(X)
        fns = {
            "cuBLAS bmm": lambda X=X, out=out: torch.bmm(X, X.mT, out=out),
        }
        for mode in ("never", "always"):

            def f(mode=mode, X=X, out=out):
                with configs(tma=mode):
                    matmul.matmul_triton(X, X.mT, X, beta=0.5, symmetric=True, out=out)

            fns[f"Triton {'pointer' if mode == 'never' else 'TMA'} (mock.patch inside)"] = f
        for name, f in fns.items():
            f()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(300):
                f()
            host = (time.perf_counter() - t0) / 300 * 1e6
            torch.cuda.synchronize()
            log(f"  host {bt}x{s}² {name:<40} {host:7.1f} µs/launch")
        with configs(tma="always"):
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(300):
                matmul.matmul_triton(X, X.mT, X, beta=0.5, symmetric=True, out=out)
            prof.disable()
            torch.cuda.synchronize()
        if s == 1024:
            log("  cProfile of 300 TMA launches (tottime, s):")
            pstats.Stats(prof).sort_stats("tottime").print_stats(18)


DISPATCH_CASES = [
    (1, 1024, 1024),
    (1, 2048, 2048),
    (64, 512, 512),
    (48, 768, 768),
    (24, 768, 3072),
    (128, 768, 2048),
    (32, 128, 4096),
    (1, 1294, 929),
]


#: Tile configs added to the TMA autotuning lists in the dispatch section (small products).
SMALL_SYMMETRIC = [
    (64, 64, 64, 4, 4, False),
    (128, 128, 64, 5, 8, False),
    (128, 128, 64, 2, 4, False),
]
SMALL_GENERAL = [
    (64, 128, 128, 4, 4, False),
    (64, 128, 64, 4, 4, False),
    (128, 256, 64, 4, 8, False),
]


def _folded_tma(X, a, b, c):
    """Folded step with both s×s-by-s×L products on Triton: ``(cA² + bA + aI) X``."""
    from matfn.kernels.matmul import matmul_triton

    A = torch.bmm(X, X.mT)
    return matmul_triton(matmul_triton(A, A, A, alpha=c, beta=b, gamma=a), X)


def _folded_tma_gram(X, a, b, c):
    """As :func:`_folded_tma` with the symmetric Gram kernel for ``X Xᵀ``."""
    from matfn.kernels.matmul import gram_triton, matmul_triton

    A = gram_triton(X)
    return matmul_triton(matmul_triton(A, A, A, alpha=c, beta=b, gamma=a), X)


# iterate bf16 batches in fp16 as the shipped folded step does (path.iteration_dtype)
_folded_tma.__name__ = _folded_tma_gram.__name__ = "ns_step_folded"


def _variants():
    from matfn.msign import path

    def patched(settings=None, step=None):
        def run(M):
            with configs(**(settings or {})):
                if step is None:
                    return matfn.msign(M, steps=5, check_finite=False)
                with mock.patch.object(path, "step_function", lambda X: step):
                    return matfn.msign(M, steps=5, check_finite=False)

        return run

    tma = dict(tma="always")
    return {
        "default": patched(),
        "folded, poly TMA": patched(dict(tma, min_triton_poly_work=0)),
        "folded, poly + update TMA": patched(tma, _folded_tma),
        "folded, Gram + poly + update TMA": patched(tma, _folded_tma_gram),
        "all Triton (symmetric), TMA": patched(dict(tma, min_triton_work=0, min_triton_side=0)),
    }


def section_dispatch(cases):
    from triton.testing import do_bench

    from benchmarks.gpu_newton_schulz import captured
    from matfn.kernels import matmul

    matmul._TMA_SYMMETRIC_BLOCKS += SMALL_SYMMETRIC
    matmul._TMA_GENERAL_BLOCKS += SMALL_GENERAL
    variants = _variants()
    rows = []
    for bt, n, m in cases:
        M = torch.randn(bt, n, m, device="cuda", dtype=torch.bfloat16)
        ref = None
        for name, fn in variants.items():
            try:
                out = fn(M)
                ref = out if ref is None else ref
                diff = float((out.float() - ref.float()).norm() / ref.float().norm())
                eager = do_bench(lambda fn=fn: fn(M), warmup=25, rep=100, return_mode="median")
                graph = captured(lambda fn=fn: fn(M))
                g = do_bench(graph.replay, warmup=25, rep=100, return_mode="median")
            except Exception as exc:  # noqa: BLE001
                log(f"  {bt}x{n}x{m} {name}: {type(exc).__name__} {str(exc)[:150]}")
                continue
            rows.append(((bt, n, m), name, eager, g, diff))
            log(
                f"  {bt}x{n}x{m:<6} {name:<40} eager {eager:7.4f}  graph {g:7.4f} ms"
                f"   rel diff to default {diff:.1e}"
            )
    RESULTS["dispatch"] = rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", default="sweep,host,dispatch")
    ap.add_argument("--shapes", default=",".join("x".join(map(str, s)) for s in SHAPES))
    ap.add_argument(
        "--dispatch-cases", default=",".join("x".join(map(str, s)) for s in DISPATCH_CASES)
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    def parse(text):
        return [tuple(map(int, c.split("x"))) for c in text.split(",") if c]

    log(torch.cuda.get_device_name(), "torch", torch.__version__)
    t0 = time.time()
    for name, fn in (
        ("sweep", lambda: section_sweep(parse(args.shapes))),
        ("host", section_host),
        ("dispatch", lambda: section_dispatch(parse(args.dispatch_cases))),
    ):
        if name in args.sections.split(","):
            log(f"== {name} ({time.time() - t0:.0f} s)")
            try:
                fn()
            except Exception:  # noqa: BLE001
                traceback.print_exc()
    log(f"== done in {time.time() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(RESULTS, f, indent=1, default=str)


if __name__ == "__main__":
    main()
