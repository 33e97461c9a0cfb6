"""GPU benchmark of ``optim.Muon.step()`` on the 72 matrices of a GPT-2-small.

Run on a CUDA machine (not collected by pytest)::

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_muon.py [--layers 12] [--json out.json]

12 layers × (4 × 768², 768×3072, 3072×768) fp32 parameters with fixed fp32 gradients. Checks
first (printed, and the exit status is 1 if one fails): with Keller's coefficients our step
matches torch.optim.Muon's to bf16 rounding; the batched path matches the per-matrix path; the
default (Polar-Express) update has singular values in the schedule's band. Then times, with
``triton.testing.do_bench`` (median, p20, p80): ours (default schedule; Keller coefficients;
per-matrix path; Triton off), the orthogonalisation alone, torch.optim.Muon and fused AdamW.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import optim._fused as fused_mod  # noqa: E402
from optim import Muon  # noqa: E402
from optim._fused import BucketGraphs, FusedConfig  # noqa: E402
from optim.muon import orthogonalize  # noqa: E402

KELLER = (3.4445, -4.7750, 2.0315)
TARGET_MS = 4.0


def log(*a):
    print(*a, flush=True)


def gpt2_shapes(layers: int, d: int = 768) -> list[tuple[int, int]]:
    shapes = []
    for _ in range(layers):
        shapes += [(d, d)] * 4 + [(d, 4 * d), (4 * d, d)]
    return shapes


DEVICE = "cuda"


def make(shapes, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    params = [torch.randn(s, device=DEVICE, generator=g) * 0.02 for s in shapes]
    grads = [torch.randn(s, device=DEVICE, generator=g) for s in shapes]
    return params, grads


def fresh(params, grads):
    ps = [p.clone().requires_grad_() for p in params]
    for p, g in zip(ps, grads, strict=True):
        p.grad = g.clone()
    return ps


def bench(fn) -> tuple[float, float, float]:
    fn()  # warm-up: state allocation, kernel compilation, coefficient caches
    if DEVICE != "cuda":  # --device cpu: a dry run of this script's logic
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        q = torch.tensor(times).quantile(torch.tensor([0.5, 0.2, 0.8]))
        return tuple(q.tolist())
    from triton.testing import do_bench

    torch.cuda.synchronize()
    med, lo, hi = do_bench(fn, warmup=50, rep=400, quantiles=[0.5, 0.2, 0.8])
    return med, lo, hi


def host_time(fn) -> tuple[float, float, float]:
    """CPU time to issue one call on an idle GPU queue: the step's Python/launch overhead."""
    fn()
    times = []
    for _ in range(30):
        torch.cuda.synchronize() if DEVICE == "cuda" else None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = torch.tensor(times).quantile(torch.tensor([0.5, 0.2, 0.8]))
    return tuple(q.tolist())


def checks(params, grads) -> list[tuple[str, float, float, bool]]:
    rows = []
    # 1. Keller coefficients: ours == torch.optim.Muon to bf16 rounding (one step)
    a, b = fresh(params, grads), fresh(params, grads)
    torch.optim.Muon(a, lr=0.02).step()
    Muon(b, lr=0.02, ns_coefficients=KELLER, ns_steps=5).step()
    worst = max(
        ((x - y).norm() / (x - p).norm()).item() for x, y, p in zip(a, b, params, strict=True)
    )
    rows.append(("ours(Keller) vs torch.optim.Muon: ‖Δ‖/‖move‖", worst, 0.03, worst < 0.03))
    # 2. batched == per-matrix
    a, b = fresh(params, grads), fresh(params, grads)
    Muon(a, lr=0.02).step()
    Muon(b, lr=0.02, batched=False).step()
    worst = max(
        ((x - y).norm() / (x - p).norm()).item() for x, y, p in zip(a, b, params, strict=True)
    )
    rows.append(("batched vs per-matrix: ‖Δ‖/‖move‖", worst, 0.02, worst < 0.02))
    # 3. default schedule: singular values of the update in [1 − 0.14 − 0.05, 1 + 0.14 + 0.05]
    #    (Polar Express 5 steps resolves σ/σ_max ≥ 1e-3; plus bf16 slack) on grads with a known
    #    spectrum, σ log-spaced over [1e-2, 1] (a square Gaussian has σ_min/σ_max ≪ 1e-3)
    group = {"msign": "polar_express", "eps": 1e-7}
    worst = 0.0
    for n, m in sorted({tuple(p.shape) for p in params}):
        k = min(n, m)
        U, _ = torch.linalg.qr(torch.randn(4, n, k, device=DEVICE))
        V, _ = torch.linalg.qr(torch.randn(4, m, k, device=DEVICE))
        sv = torch.logspace(0, -2, k, device=DEVICE)
        G = (U * sv) @ V.mT
        s = torch.linalg.svdvals(orthogonalize(G, group).double())
        worst = max(worst, (s - 1).abs().max().item())
    rows.append(("default msign: max |σ − 1|", worst, 0.19, worst < 0.19))
    # 4. the Triton element-wise kernels vs the torch._foreach path: three steps, same msign
    a, b = fresh(params, grads), fresh(params, grads)
    opt_a, opt_b = Muon(a, lr=0.02, weight_decay=0.1), Muon(b, lr=0.02, weight_decay=0.1)
    for _ in range(3):
        opt_a.step()
        with foreach_elementwise():
            opt_b.step()
    worst = max(
        ((x - y).norm() / (x - p).norm()).item() for x, y, p in zip(a, b, params, strict=True)
    )
    rows.append(("fused element-wise vs foreach, 3 steps: ‖Δ‖/‖move‖", worst, 0.02, worst < 0.02))
    worst = max(
        ((opt_a.state[x]["momentum_buffer"] - opt_b.state[y]["momentum_buffer"]).norm()
         / opt_b.state[y]["momentum_buffer"].norm()).item()
        for x, y in zip(a, b, strict=True)
    )  # fmt: skip
    rows.append(("  momentum buffers: max relative ‖Δ‖", worst, 1e-6, worst < 1e-6))
    # 5. CUDA-graph replay (cuda_graphs=True) vs eager orthogonalisation: 4 steps; the graphs
    # launch the eager kernels (bitwise-level agreement) or the GPU-fastest ones (within the
    # bf16 iteration's rounding), FusedConfig.gpu_time_kernels
    for fastest, bound in ((False, 1e-5), (True, 1e-2)):
        a, b = fresh(params, grads), fresh(params, grads)
        opt_a, opt_b = Muon(a, lr=0.02, cuda_graphs=True), Muon(b, lr=0.02)
        opt_a._graphs = BucketGraphs(FusedConfig(gpu_time_kernels=fastest))
        for _ in range(4):
            opt_a.step()
            opt_b.step()
        worst = max(
            ((x - y).norm() / (x - p).norm()).item() for x, y, p in zip(a, b, params, strict=True)
        )
        label = "GPU-fastest kernels" if fastest else "eager kernels"
        rows.append(
            (
                f"graph replay ({len(opt_a._graphs)} graphs, {label}) vs eager, 4 steps",
                worst,
                bound,
                worst < bound,
            )
        )
    return rows


def _graphs_on_eager_kernels(params, grads):
    """cuda_graphs=True, the captured bucket graphs on the eager step's kernels."""
    opt = Muon(fresh(params, grads), cuda_graphs=True)
    opt._graphs = BucketGraphs(FusedConfig(gpu_time_kernels=False))
    return opt.step


def foreach_elementwise():
    """The step's element-wise passes on torch._foreach_* (the fused Triton kernels off)."""
    return mock.patch.object(fused_mod, "applies", lambda *a: False)


def _within(ctx_factory, step_factory):
    def factory(P, G):
        step = step_factory(P, G)

        def run():
            with ctx_factory():
                step()

        return run

    return factory


def _bf16_step(params, grads):
    opt = Muon([p.bfloat16().requires_grad_() for p in params], lr=0.02)
    for p, g in zip(opt.param_groups[0]["params"], grads, strict=True):
        p.grad = g.bfloat16()
    return opt.step


def _triton_off_step(params, grads):
    step = Muon(fresh(params, grads), lr=0.02).step

    def run():
        os.environ["MATFN_DISABLE_TRITON"] = "1"
        try:
            step()
        finally:
            del os.environ["MATFN_DISABLE_TRITON"]

    return run


def _orthogonalize_only(params, grads):
    # the orthogonalisation alone, on the two stacked buckets the step builds
    group = {"msign": "polar_express", "eps": 1e-7}
    sq = torch.stack([g for g in grads if g.shape[0] == g.shape[1]])
    wide = torch.stack(
        [g if g.shape[0] < g.shape[1] else g.mT for g in grads if g.shape[0] != g.shape[1]]
    )
    return lambda: (orthogonalize(sq, group), orthogonalize(wide, group))


#: (row name, how to time it, factory(params, grads) -> callable)
CASES = [
    ("ours: Muon() default (Polar Express, batched)", "bench", lambda P, G: Muon(fresh(P, G)).step),
    (
        "ours: Keller coefficients (torch's math)",
        "bench",
        lambda P, G: Muon(fresh(P, G), ns_coefficients=KELLER).step,
    ),
    (
        "ours: per-matrix path (batched=False)",
        "bench",
        lambda P, G: Muon(fresh(P, G), batched=False).step,
    ),
    (
        "ours: update='mclip' (3 inner msign)",
        "bench",
        lambda P, G: Muon(fresh(P, G), update="mclip").step,
    ),
    (
        "ours: cuda_graphs=True (bucket graphs replayed)",
        "bench",
        lambda P, G: Muon(fresh(P, G), cuda_graphs=True).step,
    ),
    (
        "ours: cuda_graphs=True, graphs on the eager kernels",
        "bench",
        _graphs_on_eager_kernels,
    ),
    (
        "ours: host time of step(), cuda_graphs=True",
        "host",
        lambda P, G: Muon(fresh(P, G), cuda_graphs=True).step,
    ),
    (
        "ours: element-wise on torch._foreach (kernels off)",
        "bench",
        _within(foreach_elementwise, lambda P, G: Muon(fresh(P, G)).step),
    ),
    ("ours: bf16 params (fp32 momentum)", "bench", _bf16_step),
    ("ours: Triton off (torch bmm path)", "bench", _triton_off_step),
    ("ours: orthogonalize() only (2 buckets)", "bench", _orthogonalize_only),
    ("ours: host time of step() (no sync)", "host", lambda P, G: Muon(fresh(P, G)).step),
    ("torch.optim.Muon", "bench", lambda P, G: torch.optim.Muon(fresh(P, G)).step),
    (
        "torch.optim.AdamW(fused=True)",
        "bench",
        lambda P, G: torch.optim.AdamW(fresh(P, G), fused=DEVICE == "cuda").step,
    ),
]


def timings(params, grads) -> list[tuple[str, float, float, float]]:
    rows = []
    for name, how, factory in CASES:
        try:
            fn = factory(params, grads)
            rows.append((name, *(bench(fn) if how == "bench" else host_time(fn))))
        except Exception as exc:  # keep the other rows: one GPU call should give the table
            log(f"  {name}: FAILED {type(exc).__name__}: {exc}")
            rows.append((name, float("nan"), float("nan"), float("nan")))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--json", default=None)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
    }
    log(env)
    shapes = gpt2_shapes(args.layers, args.d)
    params, grads = make(shapes)
    log(f"{len(shapes)} matrices, {sum(p.numel() for p in params) / 1e6:.1f} M parameters")

    check_rows = checks(params, grads)
    log("\nchecks")
    for name, value, bound, ok in check_rows:
        log(f"  {'PASS' if ok else 'FAIL'}  {name}: {value:.4f} (bound {bound})")

    rows = timings(params, grads)
    ours = rows[0][1]
    torch_muon = next(r[1] for r in rows if r[0] == "torch.optim.Muon")
    adamw = next(r[1] for r in rows if r[0].startswith("torch.optim.AdamW"))
    header = (
        f"{'step':<48} {'median ms':>10} {'p20':>8} {'p80':>8} {'vs torch Muon':>14} "
        f"{'vs AdamW':>9}"
    )
    log("\n" + header)
    log("-" * len(header))
    for name, med, lo, hi in rows:
        log(
            f"{name:<48} {med:>10.3f} {lo:>8.3f} {hi:>8.3f} {torch_muon / med:>13.2f}x "
            f"{med / adamw:>8.2f}x"
        )
    log(
        f"\nours {ours:.3f} ms (target ≤ {TARGET_MS} ms: "
        f"{'met' if ours <= TARGET_MS else 'MISSED'}), "
        f"{torch_muon / ours:.1f}× faster than torch.optim.Muon, {ours / adamw:.1f}× fused AdamW"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "checks": check_rows, "timings": rows}, f, indent=1)
    return 0 if all(ok for *_, ok in check_rows) else 1


if __name__ == "__main__":
    sys.exit(main())
