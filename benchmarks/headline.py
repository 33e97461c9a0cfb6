"""Headline cases through the public API: time, accuracy and outputs, comparable across checkouts.

Uses only public names (``matfn.msign``, ``matfn.tri_inv``, ``matfn.tri_solve``,
``optim.Muon``, ``optim.qk_clip.max_logits``), so the same script times any checkout of the
project: put the checkout first on ``PYTHONPATH``. Two runs and a comparison on one GPU::

    git worktree add .before <commit>         # the checkout to compare against
    PYTHONPATH=$PWD/.before python3 benchmarks/headline.py --label before --save /tmp/before
    PYTHONPATH=$PWD python3 benchmarks/headline.py --label after --save /tmp/after
    python3 benchmarks/headline.py --compare /tmp/before /tmp/after

Each case is timed with ``triton.testing.do_bench`` (median of CUDA-event times; eager calls,
so host overhead counts) or, for ``graph`` rows, ``do_bench_cudagraph`` over a CUDA graph the
benchmark captures around the public call (``check_finite=False``). ``--save DIR`` writes
``DIR/results.json`` and each case's output; ``--compare A B`` prints both timings side by
side with their ratio and the largest difference between the two checkouts' outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch

DEVICE = "cuda"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _bench(fn: Callable[[], object], graph: bool, rep: int) -> float:
    import triton.testing

    if graph:
        return float(triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median"))
    return float(triton.testing.do_bench(fn, warmup=50, rep=rep, return_mode="median"))


def _msign_error(M: torch.Tensor, O: torch.Tensor) -> float:
    """``‖O − U Vᵀ‖_F / ‖U Vᵀ‖_F`` against the float64 SVD (batched)."""
    U, _, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    ref = U @ Vh
    return float(torch.linalg.norm(O.double() - ref) / torch.linalg.norm(ref))


def _tri_dense(Q: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    n = Q.shape[-2]
    eye = torch.eye(n, dtype=torch.float64, device=Q.device)
    return eye + torch.tril(Q.double() @ K.double().mT, -1)


def msign_cases() -> list[tuple[str, tuple[int, ...], bool]]:
    """(name, shape, graph): the README's headline msign shapes, bf16 input, 5 steps."""
    return [
        ("msign 4096² bf16", (4096, 4096), False),
        ("msign 8192² bf16", (8192, 8192), False),
        ("msign 4096×16384 bf16", (4096, 16384), False),
        ("msign 128×768×2048 bf16", (128, 768, 2048), False),
        ("msign 1024² bf16 cuda_graph=True", (1024, 1024), False),
        ("msign 64×512² bf16 cuda_graph=True", (64, 512, 512), False),
        ("msign 1024² bf16 eager", (1024, 1024), False),
        ("msign 1024² bf16 graph", (1024, 1024), True),
    ]


def run(label: str, save: Path | None, rep: int, only: str | None) -> list[dict]:
    import matfn
    from optim import Muon

    rows: list[dict] = []

    def record(name: str, fn: Callable[[], torch.Tensor], graph: bool, error=None) -> None:
        if only and only not in name:
            return
        try:
            out = fn()
            torch.cuda.synchronize()
            ms = _bench(fn, graph, rep)
            err = error(out) if error else None
        except Exception as exc:  # a case that fails is reported, the others still run
            print(f"{name}: FAILED {type(exc).__name__}: {exc}", flush=True)
            rows.append({"case": name, "ms": None, "error": None, "failed": repr(exc)})
            return
        rows.append({"case": name, "ms": ms, "error": err})
        e = "" if err is None else f"  err {err:.2e}"
        print(f"{name:48s} {ms:9.4f} ms{e}", flush=True)
        if save is not None and isinstance(out, torch.Tensor):
            torch.save(out.detach().cpu(), save / f"{len(rows):02d}.pt")

    for name, shape, graph in msign_cases():
        M = torch.randn(shape, device=DEVICE, generator=_gen(1)).bfloat16()
        cg = "cuda_graph=True" in name
        small = M.numel() <= 2**24

        def call(M=M, cg=cg, graph=graph):
            return matfn.msign(M, cuda_graph=cg, check_finite=not (cg or graph))

        err = (lambda O, M=M: _msign_error(M, O)) if small else None
        record(name, call, graph, err)

    n, d = 4096, 128
    K = torch.nn.functional.normalize(
        torch.randn(1, n, d, device=DEVICE, generator=_gen(2)), dim=-1
    )
    beta = torch.rand(1, n, 1, device=DEVICE, generator=_gen(3))
    Q = K * beta
    V = torch.randn(1, n, d, device=DEVICE, generator=_gen(4))
    T = _tri_dense(Q, K)

    def inv_err(Y):
        return float(
            torch.linalg.norm(T @ Y.double() - torch.eye(n, device=DEVICE, dtype=torch.float64))
            / n**0.5
        )

    def solve_err(Z):
        return float(torch.linalg.norm(T @ Z.double() - V.double()) / torch.linalg.norm(V.double()))

    record("tri_inv n=4096 d=128 fp32 eager", lambda: matfn.tri_inv(Q, K), False, inv_err)
    record(
        "tri_inv n=4096 d=128 fp32 cuda_graph=True",
        lambda: matfn.tri_inv(Q, K, check_finite=False, cuda_graph=True),
        False,
        inv_err,
    )
    record(
        "tri_inv n=4096 d=128 fp32 graph",
        lambda: matfn.tri_inv(Q, K, check_finite=False),
        True,
        inv_err,
    )
    record(
        "tri_solve n=4096 d=e=128 fp32 eager", lambda: matfn.tri_solve(Q, K, V), False, solve_err
    )
    record(
        "tri_solve n=4096 d=e=128 fp32 cuda_graph=True",
        lambda: matfn.tri_solve(Q, K, V, check_finite=False, cuda_graph=True),
        False,
        solve_err,
    )
    record(
        "tri_solve n=4096 d=e=128 fp32 graph",
        lambda: matfn.tri_solve(Q, K, V, check_finite=False),
        True,
        solve_err,
    )

    # Muon on GPT-2-small's 72 matrices (12 × (4 × 768², 768×3072, 3072×768)), fp32.
    shapes = [s for _ in range(12) for s in [(768, 768)] * 4 + [(768, 3072), (3072, 768)]]
    for cuda_graphs in (False, True):
        g = _gen(5)
        params = [
            torch.nn.Parameter(torch.randn(s, device=DEVICE, generator=g) * 0.02) for s in shapes
        ]
        for p in params:
            p.grad = torch.randn(p.shape, device=DEVICE, generator=g)
        opt = (
            Muon(params, lr=0.02, cuda_graphs=cuda_graphs) if cuda_graphs else Muon(params, lr=0.02)
        )

        def step(opt=opt, params=params):
            opt.step()
            return params[0]

        record(f"Muon step GPT-2-small cuda_graphs={cuda_graphs}", step, False)

    from optim.qk_clip import max_logits  # the import path every checkout has

    q = torch.randn(2, 16, 2048, 128, device=DEVICE, generator=_gen(6)).bfloat16()
    k = torch.randn(2, 16, 2048, 128, device=DEVICE, generator=_gen(7)).bfloat16()
    record("max_logits B=2 H=16 S=2048 D=128 bf16", lambda: max_logits(q, k, causal=True), False)

    Mv = torch.randn(1024, 1024, device=DEVICE, generator=_gen(8))
    Gv = torch.randn(1024, 1024, device=DEVICE, generator=_gen(9))
    record("msign_vjp 1024² fp32", lambda: matfn.msign_vjp(Mv, Gv), False)
    return rows


def compare(a: Path, b: Path, tolerance: float) -> int:
    ra = json.loads((a / "results.json").read_text())
    rb = json.loads((b / "results.json").read_text())
    by_case = {r["case"]: (i, r) for i, r in enumerate(rb["rows"], 1)}
    print(f"{ra['label']}: {ra['env']}\n{rb['label']}: {rb['env']}")
    head = f"| case | {ra['label']} ms | {rb['label']} ms | ratio | max abs diff of outputs |"
    print(head + "\n|---|---|---|---|---|")
    slower = 0
    for i, r in enumerate(ra["rows"], 1):
        j, s = by_case.get(r["case"], (None, None))
        if s is None or r["ms"] is None or s["ms"] is None:
            print(f"| {r['case']} | {r['ms']} | {s and s['ms']} | — | — |")
            continue
        ratio = s["ms"] / r["ms"]
        diff = "—"
        fa, fb = a / f"{i:02d}.pt", b / f"{j:02d}.pt"
        if fa.exists() and fb.exists() and "Muon" not in r["case"]:
            diff = f"{(torch.load(fa).float() - torch.load(fb).float()).abs().max().item():.1e}"
        flag = " **slower**" if ratio > 1 + tolerance else ""
        slower += bool(flag)
        print(f"| {r['case']} | {r['ms']:.4f} | {s['ms']:.4f} | {ratio:.3f}{flag} | {diff} |")
    return slower


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", default="run")
    ap.add_argument("--save", type=Path, help="directory for results.json and the outputs")
    ap.add_argument("--rep", type=int, default=300, help="do_bench repetition time, ms")
    ap.add_argument("--only", help="run only cases whose name contains this")
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"))
    ap.add_argument("--tolerance", type=float, default=0.03)
    args = ap.parse_args(argv)
    if args.compare:
        compare(*args.compare, args.tolerance)
        return 0
    import triton

    import matfn

    env = (
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
        f"python {platform.python_version()}, matfn from {Path(matfn.__file__).parent}"
    )
    print(env, flush=True)
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
    rows = run(args.label, args.save, args.rep, args.only)
    if args.save:
        (args.save / "results.json").write_text(
            json.dumps({"label": args.label, "env": env, "rows": rows}, indent=1)
        )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
