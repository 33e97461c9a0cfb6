"""What each part of the scan solve costs on the GPU (``tri_solve_triton``, ``algorithm="scan"``).

Run on a CUDA machine from the repository root::

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_triangular_parts.py [--json out.json]
        [--sections timeline,chunk,group,state,solve]

At n = 4096, d = e = 128, fp32, B = 1 (the issue's target size):

1. ``timeline``: one graph-replayed fused scan solve with ``%globaltimer`` stamps in its kernels
   (``_Scan.trace``): per group, when its programs start and end and their time per step, when
   the state scan saw the group done and ended its step, and when the group's corrections saw
   their inputs and ended (µs after a stamp kernel launched just before the solve), for the
   settings in ``TIMELINES``; its error against float64.
2. ``chunk``: the chunk kernel alone (device µs, torch.profiler) for each diagonal block size
   ``block_s`` and warp count, writing what the solve needs (``W = Y_cc [V_c | Q_c]``) or only
   the inverse ``Y_cc``; its output against the default's.
3. ``group``: the group kernel's cost per sequential step, as the slope between equal groups of
   ``GS`` and ``2·GS`` chunks (so the launch and the first loads cancel), for 32- and 64-row
   chunks, column tiles, slices, warps and software-pipelining stages.
4. ``state``: the unfused state kernel's cost per group, the same way.
5. ``solve``: whole solves, graph-replayed, with their errors against the float64 chunked form.
"""

from __future__ import annotations

import argparse
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

from matfn.kernels import gram, triangular  # noqa: E402
from matfn.kernels.triangular import (  # noqa: E402
    _chain_schedule,
    _chunk_kernel,
    _chunk_pass,
    _group_sizes,
    _Scan,
    _solve_scan,
    _stamp,
    _trace_layout,
    _tri_group_sliced_kernel,
    _tri_state_kernel,
    tri_solve_triton,
)
from matfn.triangular import _tri_solve_chunked_torch  # noqa: E402

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
                chunk = _chunk_kernel("dense", 32, bs, "3xtf32", warps)
                W = torch.full((1, N, F), float("nan"), device="cuda")

                def solve_part(chunk=chunk, W=W):
                    _chunk_pass(chunk, Q, K, lam, V=V, P=W[..., E:], U=W, BE=32)

                def solve_whole(chunk=chunk, W=W):
                    _chunk_pass(chunk, Q, K, lam, V=V, P=W[..., E:], U=W, BE=32, whole=True)

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
                        lambda chunk=chunk, Y=Y: _chunk_pass(chunk, Q, K, lam, Y=Y, BE=32)
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
    _tri_group_sliced_kernel[(NG, ND + triton.cdiv(E, BF), 1)](
        W, K, Wg, Sg, Sg, done, n, D, E, F, NC, NG, ND, GS, 0, 1,
        W.stride(0), W.stride(1), K.stride(0), K.stride(1), Sg.stride(0), Sg.stride(1), 0, 0,
        BC=BC, BF=BF, DP=D, PREC="3xtf32", NS=NS, FUSED=False, num_warps=warps, **kw,
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
            _tri_state_kernel[(triton.cdiv(E, BE), 1)](
                Sg, Z, D, E, F, ng, Sg.stride(0), Sg.stride(1), Z.stride(0), Z.stride(1),
                BE=BE, DP=D, PREC="3xtf32", USE_PDL=False, num_warps=warps, **kw,
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
    dict(block_s=4),
    dict(scan_ratio=2.0),
    dict(chunk_size=64),
    dict(chunk_size=64, scan_ratio=1.5),
    dict(chunk_size=64, scan_ratio=2.0),
    dict(chunk_size=64, scan_block=32),
    dict(chunk_size=64, block_s=8),
    dict(chunk_size=64, chunk_impl="blocked"),
]


def solve_costs(results: dict) -> None:
    Q, K, lam, V = make(1, N, D, E, "general", seed=1)
    Xr = _tri_solve_chunked_torch(Q.double(), K.double(), V.double(), lam.double())
    tab = Table(title=f"tri_solve scan, n={N}, d={D}, e={E} (graph-replayed ms)")
    for c in ("variant", "graph ms", "err", "kernels (µs, profiler)"):
        tab.add_column(c)
    for v in SOLVES:
        name = ", ".join(f"{k}={x}" for k, x in v.items()) or "default"

        def fn(v=v):
            return tri_solve_triton(Q, K, V, lam, algorithm="scan", **v)

        try:
            X = torch.full((1, N, E), float("nan"), device="cuda")
            err = rel(tri_solve_triton(Q, K, V, lam, algorithm="scan", out=X, **v), Xr)
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


# label, block_s, scan_ratio, PDL, one group-kernel program per SM (_groups_per_wave),
# precision, other _Scan settings[, the corrections' column tile]
TIMELINES = [
    ("default (ratio 1.4)", 4, 1.4, "auto", True, "3xtf32", {}),
    ("ratio 2.0", 4, 2.0, "auto", True, "3xtf32", {}),
    ("chunk kernel in column loops", 4, 1.4, "auto", True, "3xtf32", dict(chunk_whole=False)),
]


@triton.jit
def _t0_kernel(ptr):
    _stamp(ptr, 0, True)


def timeline(results: dict) -> None:
    """When each part of one graph-replayed fused scan solve runs (``%globaltimer`` stamps,
    µs after a stamp kernel just before the solve's first launch)."""
    Q, K, lam, V = make(1, N, D, E, "general", seed=1)
    C, BF, BE = 32, 16, 32
    NC = N // C
    ND, NU = triton.cdiv(D, BF), triton.cdiv(E, BF)
    NFT, NE = ND + NU, triton.cdiv(E, BE)
    Xr = _tri_solve_chunked_torch(Q.double(), K.double(), V.double(), lam.double())
    for label, block_s, ratio, pdl, cap, prec, extra, *corr in TIMELINES:
        BE = corr[0] if corr else 32
        NE = triton.cdiv(E, BE)
        saved_cap = triangular.MIN_GROUPS_PER_WAVE
        triangular.MIN_GROUPS_PER_WAVE = 6 if cap else 10**9
        S0, RNUM, RDEN = _chain_schedule(NC, ratio, triangular._groups_per_wave(Q, NFT))
        sizes = _group_sizes(S0, RNUM, RDEN, NC)
        NG = len(sizes)
        _, correct_at, length = _trace_layout(NG, NFT, NC, NE)
        buf = torch.zeros(1 + length, dtype=torch.int64, device="cuda")
        chunk = _chunk_kernel("dense", C, block_s, prec, 4)
        X = torch.full((1, N, E), float("nan"), device="cuda")
        opt = _Scan(
            precision=prec,
            fused=True,
            ratio=ratio,
            state_block=BE,
            trace=buf[1:],
            **extra,
        )
        saved, gram.PDL = gram.PDL, pdl
        try:

            def fn(X=X, chunk=chunk, opt=opt, buf=buf):
                _t0_kernel[(1,)](buf)
                _solve_scan(Q, K, V, lam, X, chunk, opt)

            fn()
            torch.cuda.synchronize()
            err = rel(X, Xr)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            for _ in range(20):
                graph.replay()
            torch.cuda.synchronize()
            tg = do_bench_cudagraph(fn, rep=100, return_mode="median")
            graph.replay()
            torch.cuda.synchronize()
            err = max(err, rel(X, Xr))
        finally:
            gram.PDL = saved
            triangular.MIN_GROUPS_PER_WAVE = saved_cap
        t = (buf[1:].double() - buf[0].double()) / 1e3  # µs after the first stamp
        grp = t[:correct_at].view(NG, NFT, NC + 5)
        cor = t[correct_at:].view(NC, NE, 3)
        start = grp[:, :, 0]
        console.print(
            f"[b]{label}[/b] (graph {tg * 1e3:.1f} µs with the stamp kernel, error {err:.1e}): "
            f"groups {sizes}; group programs start {start.min():.1f}–{start.max():.1f} µs, "
            f"chains end {grp[:, :, NC + 1].max():.1f}; corrections end {cor[:, :, 2].max():.1f}"
        )
        tab = Table(title=f"timeline {label} (µs)")
        cols = ("group", "chunks", "start", "chain end (max)", "µs/step", "P tiles seen done",
                "Z_g seen", "state step end", "corr. seen (max)", "corr. end (max)")  # fmt: skip
        for c in cols:
            tab.add_column(c)
        first = 0
        for g, size in enumerate(sizes):
            steps = grp[g, :, 1 + first : 1 + first + size]
            per = (steps[:, -1] - steps[:, 0]).median().item() / max(size - 1, 1)
            cg = cor[first : first + size]
            row = [
                str(g), str(size), f"{start[g].min():.1f}", f"{grp[g, :, NC + 1].max():.1f}",
                f"{per:.2f}",
                f"{grp[g, ND:, NC + 2].max():.1f}" if 0 < g < NG - 1 else "",
                f"{grp[g, ND:, NC + 3].max():.1f}" if 0 < g < NG - 1 else "",
                f"{grp[g, ND:, NC + 4].max():.1f}" if g < NG - 1 else "",
                f"{cg[:, :, 1].max():.1f}", f"{cg[:, :, 2].max():.1f}",
            ]  # fmt: skip
            tab.add_row(*row)
            first += size
        console.print(tab)
        results[f"timeline {label}"] = dict(
            graph_us=tg * 1e3,
            err=err,
            group=grp.tolist(),
            corrections=cor.tolist(),
            sizes=sizes,
        )


SECTIONS = {
    "timeline": timeline,
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
