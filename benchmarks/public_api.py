"""What users call, beside the peers, in one GPU run: eager, compiled and graph-replayed times.

Every row times a public call (``matfn.msign``, ``matfn.tri_inv``, ``matfn.tri_solve``, their
backward, ``optim.Muon.step``) with ``triton.testing.do_bench`` (median of CUDA-event times over
``--rep`` ms; eager calls, so host overhead counts), next to the peers' public functions on the
same input in the same process: ``torch.optim.Muon``'s Newton–Schulz, gram-newton-schulz (torch
backend), emerging-optimizers (fp32 input, ``set_float32_matmul_precision("medium")``, as it
runs fastest), heavyball, and fla-core's ``solve_tril``. Peers are benchmark-only: install their
wheels beside the repository (``benchmarks/run_gpu_suite.sh`` does). Inputs are fp32, as an
optimizer passes them; msign runs its default 5 Polar-Express steps in bf16.

The defaults (``check_finite=True``, ``cuda_graph=True``) replay launch-bound calls from CUDA
graphs; the ``cuda_graph=False`` rows are plain eager launches. ``host ms`` is the host's time
per call: calls issued back to back behind a long GPU sleep, so
the host never waits for the GPU (the floor an eager call cannot go below however fast the
kernels). ``compiled`` wraps the public call in ``torch.compile`` (``mode="reduce-overhead"``
replays CUDA graphs).

    python3 benchmarks/public_api.py [--rep 200] [--only msign] [--cases 64×512²] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import matfn  # noqa: E402

DEVICE = "cuda"
STEPS = 5
MSIGN_CASES = {
    "1024²": (1024, 1024),
    "2048²": (2048, 2048),
    "64×512²": (64, 512, 512),
    "48×768²": (48, 768, 768),
    "4096×11008": (4096, 11008),
}
ROWS: list[dict] = []


def bench(fn: Callable[[], object], rep: int) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median"))


def host_ms(fn: Callable[[], object], calls: int = 10) -> float | str:
    """Host time per call, with the GPU kept busy so that the host never waits for it.

    ``calls`` stays small so that the queued launches fit CUDA's launch queue (about a thousand
    entries; a full queue blocks the host). A call that waits for the GPU (a host sync) reads
    ``"sync"``.
    """
    fn()
    torch.cuda.synchronize()
    t_sleep = time.perf_counter()
    torch.cuda._sleep(int(3e8))  # about 0.15 s of GPU time queued ahead of the calls
    torch.cuda.synchronize()
    sleep_s = time.perf_counter() - t_sleep
    torch.cuda._sleep(int(3e8))
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - t0
    torch.cuda.synchronize()
    return "sync" if elapsed > 0.5 * sleep_s else elapsed / calls * 1e3


def record(
    group: str,
    case: str,
    impl: str,
    fn: Callable[[], object],
    rep: int,
    *,
    host=False,
    error: Callable[[object], float] | None = None,
) -> None:
    row = {"group": group, "case": case, "impl": impl}
    try:
        out = fn()
        torch.cuda.synchronize()
        if error is not None:  # before the timing: a compiled graph's output is overwritten
            row["error"] = error(out)
        row["ms"] = bench(fn, rep)
        if host:
            row["host_ms"] = host_ms(fn)
    except Exception as exc:  # a failing row is reported; the others still run
        row["failed"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    ROWS.append(row)
    cells = [
        f"{row[k]:.4f}" if isinstance(row.get(k), float) else str(row.get(k, ""))
        for k in ("ms", "host_ms")
    ]
    err = f"{row['error']:.1e}" if "error" in row else ""
    print(
        f"| {case} | {impl} | {cells[0]} | {cells[1]} | {err} | {row.get('failed', '')} |",
        flush=True,
    )


def msign_error(M: torch.Tensor, O: torch.Tensor) -> float:
    """``‖O − U Vᵀ‖_F / ‖U Vᵀ‖_F`` against the float64 SVD."""
    if isinstance(O, list):
        O = torch.stack(O)
    U, _, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    ref = U @ Vh
    return float(torch.linalg.norm(O.double().reshape(ref.shape) - ref) / torch.linalg.norm(ref))


def peers() -> dict[str, Callable[[torch.Tensor], object] | str]:
    """name → callable on an fp32 ``(n, m)`` or ``(B, n, m)`` tensor, or why it is missing."""
    out: dict = {}
    try:
        from torch.optim._muon import _zeropower_via_newtonschulz as zp

        keller = (3.4445, -4.7750, 2.0315)

        def torch_muon(M):
            if M.ndim == 2:
                return zp(M, keller, STEPS, 1e-7)
            return [zp(m, keller, STEPS, 1e-7) for m in M]  # 2-D only: a loop, as the optimizer

        out["torch.optim.Muon NS"] = torch_muon
    except Exception as exc:
        out["torch.optim.Muon NS"] = repr(exc)
    try:
        from gram_newton_schulz import GramNewtonSchulz

        gns = GramNewtonSchulz(ns_use_kernels=False)  # the CuTeDSL kernels are not carried
        out["gram-newton-schulz (torch)"] = gns
    except Exception as exc:
        out["gram-newton-schulz (torch)"] = repr(exc)
    try:
        from emerging_optimizers.orthogonalized_optimizers.muon_utils import newton_schulz

        def emerging(M):
            prev = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision("medium")
            try:
                return newton_schulz(M, STEPS, "polar_express", use_syrk=M.ndim == 2)
            finally:
                torch.set_float32_matmul_precision(prev)

        out["emerging-optimizers"] = emerging
    except Exception as exc:
        out["emerging-optimizers"] = repr(exc)
    try:
        import heavyball.utils
        from heavyball.utils import zeropower_via_newtonschulz5

        # Its default compiles with max-autotune (a minute of tuning per shape); eager here.
        heavyball.utils.compile_mode = None
        out["heavyball (eager)"] = lambda M: zeropower_via_newtonschulz5(M, STEPS)
    except Exception as exc:
        out["heavyball"] = repr(exc)
    return out


def section_msign(rep: int, cases: list[str] | None = None) -> None:
    others = peers()
    for case, shape in MSIGN_CASES.items():
        if cases and case not in cases:
            continue
        M = torch.randn(shape, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(1))
        err = (lambda O, M=M: msign_error(M, O)) if M.numel() <= 2**24 else None
        record(
            "msign", case, "matfn default", lambda M=M: matfn.msign(M), rep, host=True, error=err
        )
        record(
            "msign",
            case,
            "matfn check_finite=False",
            lambda M=M: matfn.msign(M, check_finite=False),
            rep,
            host=True,
        )
        record(
            "msign",
            case,
            "matfn check_finite=False cuda_graph=False",
            lambda M=M: matfn.msign(M, check_finite=False, cuda_graph=False),
            rep,
            host=True,
        )
        compiled = torch.compile(
            lambda M: matfn.msign(M, check_finite=False), mode="reduce-overhead", fullgraph=True
        )
        record(
            "msign", case, "matfn compile reduce-overhead", lambda M=M: compiled(M), rep, error=err
        )
        for name, fn in others.items():
            if isinstance(fn, str):
                print(f"| {case} | {name} | | | | unavailable: {fn[:100]} |")
                continue
            record("msign", case, name, lambda M=M, fn=fn: fn(M), rep, host=True, error=err)


def _deltanet(n: int, d: int, batch: tuple[int, ...] = (1,)):
    g = torch.Generator(DEVICE).manual_seed(2)
    K = torch.nn.functional.normalize(torch.randn(*batch, n, d, device=DEVICE, generator=g), dim=-1)
    beta = torch.rand(*batch, n, 1, device=DEVICE, generator=g)
    V = torch.randn(*batch, n, d, device=DEVICE, generator=g)
    return K * beta, K, V


def section_triangular(rep: int) -> None:
    n, d = 4096, 128
    Q, K, V = _deltanet(n, d)
    T = torch.eye(n, dtype=torch.float64, device=DEVICE) + torch.tril(
        Q[0].double() @ K[0].double().mT, -1
    )

    def solve_err(Z):
        return float(torch.linalg.norm(T @ Z[0].double() - V[0].double()) / V.double().norm())

    case = f"n={n} d=e={d}"
    record("tri", case, "tri_inv default", lambda: matfn.tri_inv(Q, K), rep, host=True)
    record(
        "tri",
        case,
        "tri_inv check_finite=False",
        lambda: matfn.tri_inv(Q, K, check_finite=False),
        rep,
        host=True,
    )
    record(
        "tri",
        case,
        "tri_inv check_finite=False cuda_graph=False",
        lambda: matfn.tri_inv(Q, K, check_finite=False, cuda_graph=False),
        rep,
    )
    inv_c = torch.compile(
        lambda Q, K: matfn.tri_inv(Q, K, check_finite=False), mode="reduce-overhead", fullgraph=True
    )
    record("tri", case, "tri_inv compile reduce-overhead", lambda: inv_c(Q, K), rep)
    record(
        "tri",
        case,
        "tri_solve default",
        lambda: matfn.tri_solve(Q, K, V),
        rep,
        host=True,
        error=solve_err,
    )
    record(
        "tri",
        case,
        "tri_solve check_finite=False",
        lambda: matfn.tri_solve(Q, K, V, check_finite=False),
        rep,
        host=True,
    )
    record(
        "tri",
        case,
        "tri_solve check_finite=False cuda_graph=False",
        lambda: matfn.tri_solve(Q, K, V, check_finite=False, cuda_graph=False),
        rep,
    )
    solve_c = torch.compile(
        lambda Q, K, V: matfn.tri_solve(Q, K, V, check_finite=False),
        mode="reduce-overhead",
        fullgraph=True,
    )
    record("tri", case, "tri_solve compile reduce-overhead", lambda: solve_c(Q, K, V), rep)

    # Backward of tri_solve: forward + backward against the forward alone (same inputs).
    Qg, Kg, Vg = (x.clone().requires_grad_() for x in (Q, K, V))
    dZ = torch.randn_like(V)

    def fwd_bwd():
        Z = matfn.tri_solve(Qg, Kg, Vg, check_finite=False)
        return torch.autograd.grad(Z, (Qg, Kg, Vg), dZ)

    record(
        "tri",
        case,
        "tri_solve forward (grad-enabled inputs)",
        lambda: matfn.tri_solve(Qg, Kg, Vg, check_finite=False),
        rep,
    )
    record("tri", case, "tri_solve forward+backward", fwd_bwd, rep, host=True)
    # The same step compiled: AOTAutograd traces the op's registered backward, and
    # reduce-overhead replays forward and backward from CUDA graphs (no per-call host work).
    solve_g = torch.compile(
        lambda Q, K, V: matfn.tri_solve(Q, K, V, check_finite=False), mode="reduce-overhead"
    )

    def fwd_bwd_compiled():
        return torch.autograd.grad(solve_g(Qg, Kg, Vg), (Qg, Kg, Vg), dZ)

    record("tri", case, "tri_solve forward+backward compile reduce-overhead", fwd_bwd_compiled, rep)

    # Decayed (GDN: one log-decay per row), where folding the decay into Q and K overflows.
    log_decay = -torch.rand(1, n, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(3))
    G = log_decay.double().cumsum(-1)[0]
    Td = torch.eye(n, dtype=torch.float64, device=DEVICE) + torch.tril(
        (Q[0].double() @ K[0].double().mT) * (G[:, None] - G[None, :]).clamp(max=0).exp(), -1
    )

    def decay_err(Z):
        return float(torch.linalg.norm(Td @ Z[0].double() - V[0].double()) / V.double().norm())

    record(
        "tri",
        case,
        "tri_solve log_decay (GDN) eager",
        lambda: matfn.tri_solve(Q, K, V, log_decay=log_decay),
        rep,
        error=decay_err,
    )

    # fla-core's chunk inverse of many 64-row DeltaNet chunks, beside tri_inv on the same chunks.
    B, H, L = 8, 16, 4096
    Kc = torch.nn.functional.normalize(
        torch.randn(B, L, H, d, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(4)),
        dim=-1,
    )
    bc = torch.rand(B, L, H, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(5))
    try:
        from fla.ops.common.chunk_scaled_dot_kkt import chunk_scaled_dot_kkt_fwd
        from fla.ops.utils.solve_tril import solve_tril

        A = chunk_scaled_dot_kkt_fwd(k=Kc, beta=bc, output_dtype=torch.float32)
        record(
            "tri",
            "8×16 heads, 4096 rows, 64-row chunks",
            "fla solve_tril (A given)",
            lambda: solve_tril(A, output_dtype=torch.float32),
            rep,
        )
        record(
            "tri",
            "8×16 heads, 4096 rows, 64-row chunks",
            "fla kkt + solve_tril",
            lambda: solve_tril(
                chunk_scaled_dot_kkt_fwd(k=Kc, beta=bc, output_dtype=torch.float32),
                output_dtype=torch.float32,
            ),
            rep,
        )
    except Exception as exc:
        print(f"| fla | unavailable: {type(exc).__name__}: {exc} |")
    Kh = Kc.transpose(1, 2).reshape(B * H * (L // 64), 64, d).contiguous()
    bh = bc.transpose(1, 2).reshape(B * H * (L // 64), 64, 1).contiguous()
    Qh = Kh * bh
    record(
        "tri",
        "8×16 heads, 4096 rows, 64-row chunks",
        "matfn tri_inv (batched chunks)",
        lambda: matfn.tri_inv(Qh, Kh, check_finite=False),
        rep,
    )
    chunks = getattr(matfn, "tri_inv_chunks", None)
    if chunks is not None:
        Kb = Kc.transpose(1, 2).contiguous()
        bb = bc.transpose(1, 2).contiguous()
        record(
            "tri",
            "8×16 heads, 4096 rows, 64-row chunks",
            "matfn tri_inv_chunks",
            lambda: chunks(Kb, bb, check_finite=False),
            rep,
        )


def section_muon(rep: int) -> None:
    from optim import Muon

    shapes = [s for _ in range(12) for s in [(768, 768)] * 4 + [(768, 3072), (3072, 768)]]
    g = torch.Generator(DEVICE).manual_seed(6)
    for label, make in [
        ("optim.Muon", lambda ps: Muon(ps, lr=0.02)),
        ("optim.Muon cuda_graphs=True", lambda ps: Muon(ps, lr=0.02, cuda_graphs=True)),
        ("torch.optim.Muon", lambda ps: torch.optim.Muon(ps, lr=0.02)),
        ("torch.optim.AdamW fused", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)),
    ]:
        params = [
            torch.nn.Parameter(torch.randn(s, device=DEVICE, generator=g) * 0.02) for s in shapes
        ]
        for p in params:
            p.grad = torch.randn(p.shape, device=DEVICE, generator=g)
        try:
            opt = make(params)
        except Exception as exc:
            print(f"| GPT-2-small | {label} | unavailable: {exc} |")
            continue
        record("muon", "GPT-2-small 72 matrices", label, opt.step, rep, host=True)
    params = [torch.nn.Parameter(torch.randn(s, device=DEVICE, generator=g) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, device=DEVICE, generator=g)
    opt = Muon(params, lr=0.02)
    if torch.__version__ < (2, 13):
        # torch 2.11's inductor asserts in its loop reordering on this step's fused foreach
        # nodes (a FusedSchedulerNode holding a non-SchedulerNode); 2.13 skips such nodes.
        torch._inductor.config.loop_ordering_after_fusion = False
    step = torch.compile(opt.step)
    record("muon", "GPT-2-small 72 matrices", "optim.Muon torch.compile(step)", step, rep)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rep", type=int, default=200, help="do_bench repetition time, ms")
    ap.add_argument("--only", choices=["msign", "tri", "muon"], action="append")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument(
        "--cases", nargs="+", choices=list(MSIGN_CASES), help="msign cases (default: all)"
    )
    args = ap.parse_args(argv)
    import triton

    env = (
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
        f"{triton.__version__}, python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d', time.gmtime())}"
    )
    print(env)
    print("| case | impl | ms | host ms | error | note |\n|---|---|---|---|---|---|")
    sections = {
        "msign": lambda rep: section_msign(rep, args.cases),
        "tri": section_triangular,
        "muon": section_muon,
    }
    for name, section in sections.items():
        if not args.only or name in args.only:
            section(args.rep)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": ROWS}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
