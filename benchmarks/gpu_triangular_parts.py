"""What each part of the scan solve costs on the GPU (``tri_solve_triton``, ``algorithm="scan"``).

Run on a CUDA machine from the repository root::

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_triangular_parts.py [--json out.json]
        [--sections chunk,group,state,solve]

At n = 4096, d = e = 128, fp32, B = 1:

1. ``chunk``: the chunk kernel alone (device µs, torch.profiler) for each diagonal block size
   ``block_s`` and warp count, writing what the solve needs (``W = Y_cc [V_c | Q_c]``) or only
   the inverse ``Y_cc``; its output against the default's.
2. ``group``: the group kernel's cost per sequential step, as the slope between equal groups of
   ``GS`` and ``2·GS`` chunks (so the launch and the first loads cancel), for 32- and 64-row
   chunks, column tiles, slices, warps and software-pipelining stages.
3. ``state``: the unfused state kernel's cost per group, the same way.
4. ``solve``: whole solves (``dataclasses.replace`` of the frozen config), graph-replayed, with
   their errors against the float64 chunked form.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch
import triton
from triton.testing import do_bench_cudagraph

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from gpu_triangular import Table, _kernel_times, console, make, rel, run_info  # noqa: E402

from matfn.triangular.chunk import chunk_pass  # noqa: E402
from matfn.triangular.config import TRI_SOLVE_CONFIG  # noqa: E402
from matfn.triangular.reference import tri_solve_chunked_torch  # noqa: E402
from matfn.triangular.scan import _group_kernel, _state_kernel  # noqa: E402
from matfn.triangular.solve import tri_solve_triton  # noqa: E402

N, D, E = 4096, 128, 128


def device_us(fn, iters: int = 20) -> float:
    """Device µs per call of everything ``fn`` launches (torch.profiler)."""
    return sum(us for _, us in _kernel_times(fn, iters).values())


def chunk_costs(results: dict) -> None:
    Q, K, lam, V = make(1, N, D, E, "general", seed=1)
    tab = Table(title=f"chunk kernel, n={N}, d={D}, e={E}, C=32 (device µs)")
    for c in ("block_s", "warps", "writes", "µs", "diff vs default"):
        tab.add_column(c)
    F = E + D
    ref = None
    for bs in (16, 8, 4, 2, 1):
        for warps in (4, 2, 8):
            if warps != 4 and bs not in (16, 4):
                continue
            try:
                chunk = dict(chunk_size=32, block_s=bs, warps=warps)
                W = torch.full((1, N, F), float("nan"), device="cuda")

                def solve_part(chunk=chunk, W=W):
                    chunk_pass(Q, K, lam, V=V, P=W[..., E:], U=W, BE=32, **chunk)

                def solve_whole(chunk=chunk, W=W):
                    chunk_pass(Q, K, lam, V=V, P=W[..., E:], U=W, BE=32, whole=True, **chunk)

                solve_part()
                if ref is None:
                    ref = W.double()
                err = rel(W, ref)
                us = device_us(solve_part)
                tab.add_row(str(bs), str(warps), "W", f"{us:.1f}", f"{err:.1e}")
                results[f"chunk bs={bs} warps={warps} W"] = dict(us=us, diff=err)
                if warps == 4:
                    solve_whole()
                    us_w = device_us(solve_whole)
                    err_w = rel(W, ref)
                    tab.add_row(str(bs), str(warps), "W (whole)", f"{us_w:.1f}", f"{err_w:.1e}")
                    results[f"chunk bs={bs} warps={warps} W whole"] = dict(us=us_w, diff=err_w)
                if warps == 4:
                    Y = torch.zeros(1, N, N, device="cuda")
                    us_y = device_us(
                        lambda chunk=chunk, Y=Y: chunk_pass(Q, K, lam, Y=Y, BE=32, **chunk)
                    )
                    tab.add_row(str(bs), str(warps), "Y only", f"{us_y:.1f}", "")
                    results[f"chunk bs={bs} warps={warps} Y"] = dict(us=us_y)
            except Exception as exc:  # noqa: BLE001  (a variant that does not compile)
                tab.add_row(str(bs), str(warps), "", f"failed: {exc!r:.100}", "")
    console.print(tab)


def _group_launch(W, K, Wg, Sg, done, BC, GS, BF, NS, warps, stages):
    n, F = W.shape[1], W.shape[2]
    NC = triton.cdiv(n, BC)
    NG = triton.cdiv(NC, GS)
    kw = {} if stages is None else {"num_stages": stages}
    ND = triton.cdiv(D, BF)
    _group_kernel[(NG, ND + triton.cdiv(E, BF), 1)](
        W, K, Wg, Sg, Sg, done, n, D, E, F, NC, NG, ND, GS, 0, 1,
        W.stride(0), W.stride(1), K.stride(0), K.stride(1), Sg.stride(0), Sg.stride(1), 0, 0,
        BC=BC, BF=BF, DP=D, NS=NS, FUSED=False, num_warps=warps, **kw,
    )  # fmt: skip


def group_costs(results: dict) -> None:
    """Per-step cost: (time with groups of 2·GS − time with groups of GS) / GS, 8 groups each
    (n = 8·GS·C rows: the same 128 programs, one per SM, in both)."""
    F = E + D
    tab = Table(title=f"group kernel per step, d={D}, F={F} (device µs; slope GS → 2·GS)")
    for c in ("rows BC", "BF", "slices", "warps", "stages", "µs (GS)", "µs (2GS)", "µs/step"):
        tab.add_column(c)
    GS = 8
    variants = [
        (32, 16, 4, 4, None),
        (32, 16, 4, 4, 1),
        (32, 16, 4, 4, 2),
        (32, 16, 2, 4, None),
        (32, 16, 4, 2, None),
        (32, 32, 4, 4, None),
        (64, 16, 4, 4, None),
    ]
    done = torch.zeros(64, dtype=torch.int32, device="cuda")
    for BC, BF, NS, warps, stages in variants:
        t = []
        try:
            for gs in (GS, 2 * GS):
                n = 8 * gs * BC
                K = torch.nn.functional.normalize(torch.randn(1, n, D, device="cuda"), dim=-1)
                W = 0.1 * torch.randn(1, n, F, device="cuda")
                Wg = torch.empty_like(W)
                Sg = torch.empty(1, 8, D, F, device="cuda")
                t.append(
                    device_us(
                        lambda gs=gs, W=W, K=K, Wg=Wg, Sg=Sg: _group_launch(
                            W, K, Wg, Sg, done, BC, gs, BF, NS, warps, stages
                        )
                    )
                )
        except Exception as exc:  # noqa: BLE001
            tab.add_row(str(BC), str(BF), str(NS), str(warps), str(stages), f"failed {exc!r:.80}")
            continue
        step = (t[1] - t[0]) / GS
        tab.add_row(
            str(BC), str(BF), str(NS), str(warps), str(stages),
            f"{t[0]:.1f}", f"{t[1]:.1f}", f"{step:.2f}",
        )  # fmt: skip
        results[f"group BC={BC} BF={BF} NS={NS} warps={warps} stages={stages}"] = dict(
            us=t, us_per_step=step
        )
    console.print(tab)


def state_costs(results: dict) -> None:
    F = E + D
    tab = Table(title=f"state kernel per group, d={D}, e={E} (device µs; slope NG → 2·NG)")
    for c in ("BE", "warps", "stages", "µs (NG)", "µs (2NG)", "µs/step"):
        tab.add_column(c)
    NG = 8
    Sg = 0.01 * torch.randn(1, 2 * NG, D, F, device="cuda")
    Z = torch.empty(1, 2 * NG, D, E, device="cuda")
    for BE, warps, stages in [(32, 8, None), (32, 4, None), (16, 4, None), (64, 8, None),
                              (32, 8, 1)]:  # fmt: skip
        kw = {} if stages is None else {"num_stages": stages}

        def run(ng, BE=BE, warps=warps, kw=kw):
            _state_kernel[(triton.cdiv(E, BE), 1)](
                Sg, Z, D, E, F, ng, Sg.stride(0), Sg.stride(1), Z.stride(0), Z.stride(1),
                BE=BE, DP=D, USE_PDL=False, num_warps=warps, **kw,
            )  # fmt: skip

        try:
            t = [device_us(lambda ng=ng: run(ng)) for ng in (NG, 2 * NG)]
        except Exception as exc:  # noqa: BLE001
            tab.add_row(str(BE), str(warps), str(stages), f"failed {exc!r:.80}")
            continue
        step = (t[1] - t[0]) / NG
        tab.add_row(str(BE), str(warps), str(stages), f"{t[0]:.1f}", f"{t[1]:.1f}", f"{step:.2f}")
        results[f"state BE={BE} warps={warps} stages={stages}"] = dict(us=t, us_per_step=step)
    console.print(tab)


SOLVES = [
    {},
    dict(block_s=8),
    dict(block_s=16),
    dict(scan_ratio=2.0),
    dict(chunk_size=64),
    dict(chunk_size=64, scan_ratio=1.5),
    dict(chunk_size=64, scan_ratio=2.0),
    dict(chunk_size=64, scan_block=32),
    dict(chunk_size=64, block_s=8),
    dict(min_groups_per_wave=10**6),  # the unfused form (what batches get)
]


def solve_costs(results: dict) -> None:
    Q, K, lam, V = make(1, N, D, E, "general", seed=1)
    Xr = tri_solve_chunked_torch(Q.double(), K.double(), V.double(), lam.double())
    tab = Table(title=f"tri_solve scan, n={N}, d={D}, e={E} (graph-replayed ms)")
    for c in ("variant", "graph ms", "err", "kernels (µs, profiler)"):
        tab.add_column(c)
    for v in SOLVES:
        name = ", ".join(f"{k}={x}" for k, x in v.items()) or "default"

        config = dataclasses.replace(TRI_SOLVE_CONFIG, **v)

        def fn(config=config):
            return tri_solve_triton(Q, K, V, lam, config=config, algorithm="scan")

        try:
            X = torch.full((1, N, E), float("nan"), device="cuda")
            err = rel(tri_solve_triton(Q, K, V, lam, config=config, algorithm="scan", out=X), Xr)
            tg = min(do_bench_cudagraph(fn, rep=100, return_mode="median") for _ in range(2))
            kern = {k: us for k, (_, us) in _kernel_times(fn).items()}
        except Exception as exc:  # noqa: BLE001
            tab.add_row(name, "", "", f"failed: {exc!r:.120}")
            continue
        short = ", ".join(
            f"{k.removeprefix('_tri_').split('_kernel')[0]} {us:.1f}"
            for k, us in sorted(kern.items(), key=lambda kv: -kv[1])
        )
        tab.add_row(name, f"{tg:.4f}", f"{err:.1e}", short)
        results[f"solve {name}"] = dict(ms_graph=tg, err=err, kernels_us=kern)
    console.print(tab)


SECTIONS = {
    "chunk": chunk_costs,
    "group": group_costs,
    "state": state_costs,
    "solve": solve_costs,
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--sections", default=",".join(SECTIONS))
    a = ap.parse_args()
    results = run_info()
    console.print(results)
    for s in a.sections.split(","):
        SECTIONS[s](results)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
