"""Ahead-of-time compile of ``tri_inv_chunks_kernel`` for sm90, without a GPU.

Compiles each of the kernel's autotune configs without decay, then the first config with a
per-row decay, each a fresh compile with Triton's bundled ``ptxas``. Prints, per case: the
compile wall time (the whole pipeline, and the ``ptxas`` stage alone), registers per thread,
spill stores and loads in bytes (``ptxas -v``) and the PTX size.

Usage: ``python -m benchmarks.compile_chunks_kernel [--arch 90]``. ``n`` and ``d`` are
runtime arguments: they and the pointers get the divisibility-16 hints of a launch with
``n = 4096, d = 128``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import time

os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret

import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from matfn.triangular import chunks_kernel  # noqa: E402

ARGS = {"k_ptr": "*fp32", "beta_ptr": "*fp32", "l_ptr": "*fp32", "y_ptr": "*fp32"}
ARGS |= {"n": "i32", "d": "i32"}


def compile_once(arch, BK, warps, stages, decay):
    """One fresh compile: (seconds, ptxas seconds, registers, spill stores, spill loads, PTX kB)."""
    constexprs = {"BK": BK, "DECAY": decay}
    src = triton.compiler.ASTSource(
        fn=chunks_kernel.tri_inv_chunks_kernel.fn,
        signature=ARGS | {name: "constexpr" for name in constexprs},
        constexprs=constexprs,
        attrs={(i,): [["tt.divisibility", 16]] for i in range(len(ARGS))},
    )
    stage_us = {}
    log = io.StringIO()  # the ptxas log, printed by Triton with dump_ptxas_log
    with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.compilation.always_compile = True
        knobs.compilation.listener = lambda *, times, **_: stage_us.update(times.lowering_stages)
        knobs.nvidia.dump_ptxas_log = True
        start = time.perf_counter()
        compiled = triton.compile(
            src,
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": warps, "num_stages": stages, "enable_fp_fusion": True},
        )
        seconds = time.perf_counter() - start
    text = log.getvalue()
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text).groups()
    ptx_kb = len(compiled.asm["ptx"]) / 1024
    return seconds, stage_us["cubin"] / 1e6, regs, *map(int, spills), ptx_kb


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90)
    a = p.parse_args()
    configs = [(c.kwargs["BK"], c.num_warps, c.num_stages) for c in chunks_kernel._CONFIGS]
    cases = [(*cfg, False) for cfg in configs] + [(*configs[0], True)]
    print(f"tri_inv_chunks_kernel, sm{a.arch}, Triton {triton.__version__}")
    print(" BK warps stages decay | total s ptxas s regs spill st spill ld PTX kB")
    for bk, warps, stages, decay in cases:
        s, ptxas, regs, st, ld, kb = compile_once(a.arch, bk, warps, stages, decay)
        case = f"{bk:3} {warps:5} {stages:6} {decay!s:>5}"
        print(f"{case} | {s:7.1f} {ptxas:7.1f} {regs:4} {st:8} {ld:8} {kb:6.0f}", flush=True)


if __name__ == "__main__":
    main()
