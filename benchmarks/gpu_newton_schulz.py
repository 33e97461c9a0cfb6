"""GPU benchmark and accuracy check of matfn's Newton–Schulz kernels against torch and peers.

Run on a CUDA machine (not collected by pytest)::

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_newton_schulz.py [--sections env,acc,time,graph,gram]
        [--cases 4096x4096,64x512x512] [--json out.json]

Sections
--------
env    versions, device, which peers import, where torch.optim.Muon's NS lives.
acc    bf16 accuracy against a float64 oracle on matrices with a known SVD
       (``M = U diag(σ) Vᵀ``): relative error to the schedule-exact result ``U f(Σ̂) Vᵀ`` and
       max |σ − 1|, for the Triton path, the torch path, standard and Gram.
time   per case: ours (``matfn.msign`` end to end, bf16), torch.optim.Muon's NS (a loop for
       batches), the torch reference batched with ``baddbmm``, and each peer; median, p20/p80
       (``triton.testing.do_bench``), achieved TFLOP/s counting the plain algorithm's FLOPs
       ``T(4 s² L + 2 s³)`` and the FLOPs actually performed, fraction of the cuBLAS bf16 rate
       measured at 8192³ in the same process.
graph  small cases with and without CUDA-graph capture.
small  the graph cases, graph-replayed, on the default path and with Triton everywhere, with and
       without programmatic dependent launch, each checked against float64 NS; then each product
       of a 1024² step per TMA config.
pdl    ours with programmatic dependent launch on and off, alternating: eager, host issue time
       and graph-replayed time for each of ``--cases``.
gram   the symmetric Gram kernel alone against cuBLAS ``X @ X.T``.
components  each product of a step, cuBLAS vs Triton, eager and graph-replayed, at Muon's
       shapes (48×768², 24×768×3072, 64×512², 1024², 4096²).
grouped  lists of mixed shapes: one grouped launch per product vs one stacked batch per shape.
tma    the TMA-load kernels (``matfn.kernels.matmul_tma``): each tile config checked against an
       fp32 product at aligned odd sizes, then each product of a step (``X Xᵀ``, ``cA² + bA``,
       ``BX + aX``) timed per config, autotuned, with pointer loads and on cuBLAS, and the Gram
       product of emerging-optimizers' TMA SYRK (``tsyrk_ex``) beside it.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import math
import os
import platform
import sys
import time
import traceback
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import matfn  # noqa: E402
from matfn import _backend, _graphs  # noqa: E402
from matfn.coefficients import scalar_map, schedule  # noqa: E402
from matfn.msign import path as ns_path  # noqa: E402
from matfn.msign.path import choose_algorithm, normalize  # noqa: E402
from matfn.msign.reference import (  # noqa: E402
    gram_newton_schulz_torch,
    gram_restarts,
    newton_schulz_torch,
)


def configs(**changes):
    """A context running the kernels under :data:`matfn._backend.NEWTON_SCHULZ` and
    :data:`matfn._backend.MATMUL` with these fields replaced (the A/B variants)."""
    import contextlib
    import dataclasses

    ns_fields = {f.name for f in dataclasses.fields(_backend.NewtonSchulzConfig)}
    ns = {k: v for k, v in changes.items() if k in ns_fields}
    mm = {k: v for k, v in changes.items() if k not in ns_fields}
    stack = contextlib.ExitStack()
    new_ns = dataclasses.replace(_backend.NEWTON_SCHULZ, **ns)
    stack.enter_context(mock.patch.object(_backend, "NEWTON_SCHULZ", new_ns))
    stack.enter_context(
        mock.patch.object(_backend, "MATMUL", dataclasses.replace(_backend.MATMUL, **mm))
    )
    return stack


STEPS = 5
CASES = {
    # name: (batch, n, m)
    "1024x1024": (1, 1024, 1024),
    "2048x2048": (1, 2048, 2048),
    "4096x4096": (1, 4096, 4096),
    "8192x8192": (1, 8192, 8192),
    "4096x16384": (1, 4096, 16384),
    "64x512x512": (64, 512, 512),
    "1000x1000": (1, 1000, 1000),
    "1294x929": (1, 1294, 929),
    "4096x14336": (1, 4096, 14336),
    "32x128x4096": (32, 128, 4096),
    "128x768x2048": (128, 768, 2048),
}
TARGETS_MS = {
    "4096x4096": 2.2,
    "8192x8192": 18.0,
    "4096x16384": 5.0,
    "1024x1024": 0.1,
    "64x512x512": 0.5,
}
#: ``--lean``: the time section runs ours (the default path), the torch reference and the peers
#: only, not the alternative path variants.
LEAN = False
SMALL = ["1024x1024", "1000x1000", "1294x929", "64x512x512", "32x128x4096"]
RESULTS: dict = {"sections": {}}


def log(*a):
    print(*a, flush=True)


def bench(fn, rep_ms: float | None = None) -> tuple[float, float, float]:
    import triton.testing

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = (time.perf_counter() - t0) * 1e3
    rep = rep_ms or max(100.0, min(600.0, 30 * est))
    q = triton.testing.do_bench(fn, warmup=max(25, 3 * est), rep=rep, quantiles=[0.5, 0.2, 0.8])
    return tuple(q)  # type: ignore[return-value]


def plain_flops(batch: int, n: int, m: int, steps: int = STEPS) -> float:
    s, L = min(n, m), max(n, m)
    return batch * steps * (4 * s * s * L + 2 * s**3)


def performed_flops(batch: int, n: int, m: int, algo: str, coeffs) -> float:
    s, L = min(n, m), max(n, m)
    T = len(coeffs)
    if algo == "gram":
        k = len(gram_restarts(coeffs))
        return batch * ((3 + 3 * k) * s * s * L + 4 * T * s**3)
    return batch * T * (3 * s * s * L + s**3)


# --------------------------------------------------------------------------------------- env
def section_env():
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(),
        "sms": torch.cuda.get_device_properties(0).multi_processor_count,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as e:  # pragma: no cover - reported
        info["triton"] = f"unavailable: {e}"
    try:
        from torch.optim import _muon

        info["torch_muon_ns"] = (
            "torch.optim._muon._zeropower_via_newtonschulz"
            if hasattr(_muon, "_zeropower_via_newtonschulz")
            else f"not found; names: {[n for n in dir(_muon) if 'newton' in n.lower()]}"
        )
    except Exception as e:
        info["torch_muon_ns"] = f"unavailable: {e}"
    for mod in ("emerging_optimizers", "gram_newton_schulz", "heavyball"):
        try:
            m = importlib.import_module(mod)
            info[mod] = getattr(m, "__version__", "imported")
        except Exception as e:
            info[mod] = f"import failed: {type(e).__name__}: {e}"
    for k, v in info.items():
        log(f"  {k:>22}: {v}")
    RESULTS["env"] = info


def cublas_peak() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = bench(lambda: a @ b)[0]
    return 2 * 8192**3 / ms / 1e9


# --------------------------------------------------------------------------------------- peers
def make_peers():
    """name -> callable(M) on a (B, n, m) bf16 tensor, or a string saying why not."""
    peers: dict = {}
    try:
        from torch.optim._muon import _zeropower_via_newtonschulz as zp

        coeffs = (3.4445, -4.7750, 2.0315)

        def torch_muon(M):
            return [zp(M[i], coeffs, STEPS, 1e-7) for i in range(M.shape[0])]

        peers["torch.optim.Muon NS"] = torch_muon
    except Exception as e:
        peers["torch.optim.Muon NS"] = f"{type(e).__name__}: {e}"
    try:
        from emerging_optimizers.orthogonalized_optimizers.muon_utils import newton_schulz

        def emerging(M):
            prev = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision("medium")  # their bf16 / SYRK path
            try:
                if M.shape[0] == 1:
                    return newton_schulz(M[0].float(), STEPS, "polar_express", use_syrk=True)
                return newton_schulz(M.float(), STEPS, "polar_express")  # SYRK is 2-D only
            finally:
                torch.set_float32_matmul_precision(prev)

        peers["emerging-optimizers (SYRK)"] = emerging
    except Exception as e:
        peers["emerging-optimizers (SYRK)"] = f"{type(e).__name__}: {e}"
    try:
        from gram_newton_schulz import GramNewtonSchulz

        gns = GramNewtonSchulz(ns_use_kernels=False)  # CuTeDSL kernels: package too big to carry

        peers["gram-newton-schulz (torch, no CuTeDSL)"] = lambda M: gns(M)
    except Exception as e:
        peers["gram-newton-schulz (torch, no CuTeDSL)"] = f"{type(e).__name__}: {e}"
    try:
        from heavyball.utils import zeropower_via_newtonschulz5

        peers["heavyball"] = lambda M: zeropower_via_newtonschulz5(M, 5)
    except Exception as e:
        peers["heavyball"] = f"{type(e).__name__}: {e}"
    return peers


# --------------------------------------------------------------------------------------- ours
def ours(M):
    return matfn.msign(M, steps=STEPS, check_finite=False)


def ours_graphed(M):
    """Ours replayed from its CUDA-graph cache (``cuda_graph=True``): three launches a call."""
    return matfn.msign(M, steps=STEPS, check_finite=False, cuda_graph=True)


#: One Gram restart, at step 2: gram-newton-schulz's default placement. Ours picks (1, 3) for
#: 5 Polar-Express steps (msign.gram_restarts); this variant shows what the second one costs.
ONE_RESTART = (2,)


def one_restart(M):
    """Ours with a single Gram restart (:data:`ONE_RESTART`) instead of gram_restarts' choice."""
    with mock.patch.object(ns_path, "gram_restarts", lambda coeffs: ONE_RESTART):
        return ours(M)


def pdl_off(M):
    """Ours without programmatic dependent launch (``pdl_max_tiles_per_sm=0``)."""
    with configs(pdl_max_tiles_per_sm=0):
        return ours(M)


def pointer_loads(M):
    """Ours with the pointer-load kernels (no TMA descriptors)."""
    with configs(tma="never"):
        return ours(M)


def ours_algo(M, algorithm):
    return matfn.msign(M, steps=STEPS, check_finite=False, algorithm=algorithm)


def forced(M):
    """Ours with the Triton kernels even below the size threshold."""
    with configs(min_triton_work=0, min_triton_side=0):
        return ours(M)


def unfolded(M):
    """Ours without the folded step for launch-bound batches (the torch reference, bf16)."""
    with configs(fold_launch_bound=False):
        return ours(M)


def torch_batched(M):
    """The torch reference (baddbmm) on the whole batch, bf16, same schedule as ours."""
    coeffs, factor = schedule("polar_express", STEPS)
    X = M if M.shape[-2] <= M.shape[-1] else M.mT
    X0 = normalize(X, factor, 1e-7, torch.bfloat16)
    return newton_schulz_torch(X0, coeffs)


# --------------------------------------------------------------------------------------- acc
def known_svd(s: int, L: int, seed: int, cond: float = 10.0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(s, s, device="cuda", dtype=torch.float64, generator=g))
    V, _ = torch.linalg.qr(torch.randn(L, s, device="cuda", dtype=torch.float64, generator=g))
    sig = torch.logspace(0, -math.log10(cond), s, device="cuda", dtype=torch.float64)
    M = (U * sig) @ V.T
    return M, U, sig, V


ACC_SHAPES = "768x768,768x3072,1024x1024,2048x2048,1024x4096,2048x8192,4096x16384"


def section_acc(shapes, conds=(10.0,)):
    from matfn.msign.triton import gram_newton_schulz_triton, ns_step_folded

    coeffs, factor = schedule("polar_express", STEPS)
    restarts = gram_restarts(coeffs)
    rows = []

    def pointer(fn, *args):  # without TMA loads
        with configs(tma="never"):
            return fn(*args)

    def steps_of(step, X0):
        for a, b, c in coeffs:
            X0 = step(X0, a, b, c)
        return X0

    for (s, L), cond in [(shape, c) for shape in shapes for c in conds]:
        M64, U, sig, V = known_svd(s, L, seed=s + L, cond=cond)
        x = (sig / (factor * sig.norm())).cpu().numpy()
        f = torch.as_tensor(scalar_map(coeffs, x), device="cuda")
        oracle = (U * f) @ V.T
        X0 = normalize(M64.unsqueeze(0), factor, 1e-7, torch.bfloat16)

        def bf16_iteration(fn, *args):  # the Triton path without triton_half_dtype
            with configs(triton_half_dtype=None):
                return fn(*args)

        M16 = M64.unsqueeze(0).bfloat16()
        variants = {
            "msign (bf16 in/out, default)": lambda M16=M16: matfn.msign(
                M16, steps=STEPS, check_finite=False
            ),
            "triton standard (fp16 iterates)": lambda X0=X0: ns_path.newton_schulz(X0, coeffs),
            "triton standard bf16": lambda X0=X0: bf16_iteration(ns_path.newton_schulz, X0, coeffs),
            "triton gram fp16": lambda X0=X0: ns_path.gram_newton_schulz(X0, coeffs, restarts),
            f"triton gram fp16, restarts {ONE_RESTART}": lambda X0=X0: ns_path.gram_newton_schulz(
                X0, coeffs, ONE_RESTART
            ),
            "triton standard bf16, pointer loads": lambda X0=X0: pointer(
                bf16_iteration, ns_path.newton_schulz, X0, coeffs
            ),
            "triton gram fp16, pointer loads": lambda X0=X0: pointer(
                ns_path.gram_newton_schulz, X0, coeffs, restarts
            ),
            "torch standard bf16": lambda X0=X0: newton_schulz_torch(X0, coeffs),
            "folded bf16 (cuBLAS (B+aI)X)": lambda X0=X0: steps_of(ns_step_folded, X0),
            "folded fp16 (the default)": lambda X0=X0: steps_of(ns_step_folded, X0.half()),
            "torch gram bf16": lambda X0=X0: gram_newton_schulz_torch(X0, coeffs, restarts),
            "torch gram fp16": lambda X0=X0: gram_newton_schulz_torch(X0.half(), coeffs, restarts),
            "triton gram bf16 (no fp16)": lambda X0=X0: gram_newton_schulz_triton(
                X0, coeffs, restarts
            ),
        }
        for name, fn in variants.items():
            out = fn()[0].double()
            if not torch.isfinite(out).all():
                rows.append((f"{s}x{L} κ{cond:g}", name, float("nan"), float("nan")))
                continue
            rel = float(torch.linalg.norm(out - oracle) / torch.linalg.norm(oracle))
            ev = torch.linalg.eigvalsh(out @ out.T).clamp_min(0).sqrt()
            dev = float((ev - 1).abs().max())
            rows.append((f"{s}x{L} κ{cond:g}", name, rel, dev))
        sched_err = float(abs(scalar_map(coeffs, x) - 1).max())
        rows.append((f"{s}x{L} κ{cond:g}", "(schedule, exact arithmetic)", 0.0, sched_err))
        del M64, U, V, oracle
        torch.cuda.empty_cache()
    log(f"  {'shape':>17} {'variant':<36} {'rel err vs U f(Σ) Vᵀ':>20} {'max|σ−1|':>10}")
    for r in rows:
        log(f"  {r[0]:>17} {r[1]:<36} {r[2]:>20.3e} {r[3]:>10.3e}")
    RESULTS["sections"]["acc"] = rows


# --------------------------------------------------------------------------------------- time
def section_time(cases, peak, peer_cases, peer_names):
    peers = {k: v for k, v in make_peers().items() if any(n in k for n in peer_names)}
    coeffs, _ = schedule("polar_express", STEPS)
    rows = []
    for name in cases:
        batch, n, m = CASES[name]
        g = torch.Generator(device="cuda").manual_seed(0)
        M = torch.randn(batch, n, m, device="cuda", dtype=torch.bfloat16, generator=g)
        s, L = min(n, m), max(n, m)
        X0 = M if n <= m else M.mT
        algo = choose_algorithm(
            "auto",
            s,
            L,
            STEPS,
            restarts=len(gram_restarts(coeffs)),
            symmetric=ns_path.kernels_apply(X0),
        )
        pf = plain_flops(batch, n, m)
        kernels = ns_path.kernels_apply(X0)
        entries = [(f"ours ({algo}{'' if kernels else ', torch path'})", lambda M=M: ours(M))]
        if _graphs.ns_graph_applies(M):
            entries.append(("ours (cuda_graph=True)", lambda M=M: ours_graphed(M)))
        elif kernels:
            entries.append(("ours (PDL off)", lambda M=M: pdl_off(M)))
        if algo == "gram":
            entries.append((f"ours (gram, restarts {ONE_RESTART})", lambda M=M: one_restart(M)))
        if LEAN:
            pass
        elif kernels:
            entries.append((f"ours ({algo}, pointer loads)", lambda M=M: pointer_loads(M)))
        else:
            entries.append((f"ours ({algo}, Triton forced)", lambda M=M: forced(M)))
            entries.append((f"ours ({algo}, unfolded: baddbmm/BX+aX)", lambda M=M: unfolded(M)))
        other = "standard" if algo == "gram" else "gram"
        if s < L and not LEAN:
            entries.append((f"ours ({other})", lambda M=M, o=other: ours_algo(M, o)))
        entries.append(("torch ref batched (baddbmm)", lambda M=M: torch_batched(M)))
        for pname, p in peers.items():
            if not pname.startswith("torch.optim") and name not in peer_cases:
                continue
            if isinstance(p, str):
                rows.append((name, pname, None, None, None, p))
                log(f"  {name:>13} {pname:<40} cannot run: {p}")
                continue
            loop = " (loop)" if batch > 1 and "torch.optim" in pname else ""
            entries.append((pname + loop, lambda M=M, p=p: p(M)))
        base = None
        for ename, fn in entries:
            try:
                med, p20, p80 = bench(fn)
            except Exception as e:
                rows.append((name, ename, None, None, None, f"{type(e).__name__}: {str(e)[:80]}"))
                traceback.print_exc(limit=2)
                continue
            if base is None:
                base = med
            rows.append((name, ename, med, p20, p80, ""))
            tf = pf / med / 1e9
            extra = ""
            if ename.startswith("ours ("):
                algo_e = "gram" if ename.startswith("ours (gram") else "standard"
                done = performed_flops(batch, n, m, algo_e, coeffs)
                extra = f" performed {done / med / 1e9:6.0f} TF/s"
            log(
                f"  {name:>13} {ename:<40} {med:9.4f} ms [{p20:8.4f},{p80:8.4f}] "
                f"x{med / base:6.2f} of ours  {tf:6.0f} TF/s ({tf / peak:5.1%}){extra}"
            )
        tgt = TARGETS_MS.get(name)
        if tgt:
            graphed = [
                r[2] for r in rows if r[:2] == (name, "ours (cuda_graph=True)") and r[2] is not None
            ]
            also = ""
            if graphed:
                also = f"; cuda_graph=True {'MET' if graphed[0] <= tgt else 'missed'}"
            log(f"  {name:>13} target ≤ {tgt} ms: {'MET' if base <= tgt else 'missed'}{also}")
        del M
        torch.cuda.empty_cache()
    RESULTS["sections"]["time"] = rows


def captured(fn) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``fn()``, captured after three warm-up calls on a side stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def section_graph(cases):
    rows = []
    for name in cases:
        batch, n, m = CASES[name]
        M = torch.randn(batch, n, m, device="cuda", dtype=torch.bfloat16)
        for label, fn in (
            ("ours", ours),
            ("ours, cuda_graph=True", ours_graphed),
            ("ours, Triton forced", forced),
            ("ours, unfolded", unfolded),
            ("torch ref batched", torch_batched),
        ):
            fn(M)
            eager = bench(lambda fn=fn: fn(M))[0]
            g = bench(captured(lambda fn=fn: fn(M)).replay)[0]
            rows.append((name, label, eager, g))
            log(f"  {name:>13} {label:<20} eager {eager:8.4f} ms   graph {g:8.4f} ms")
    RESULTS["sections"]["graph"] = rows


SMALL_VARIANTS = {
    # label: (path thresholds at 0 → Triton everywhere, or "recording", MatmulConfig.tma, PDL)
    "default path": (False, "auto", False),
    "default path + PDL": (False, "auto", True),
    "Triton, TMA": (True, "always", False),
    "Triton, TMA + PDL": (True, "always", True),
    "Triton, pointer + PDL": (True, "never", True),
    # what cuda_graph=True captures: kernels chosen by GPU time (kernels.recording), whose
    # normalisation is one Triton divide pass
    "recording (cuda_graph=True)": ("recording", "auto", True),
}


def _reset_tuning():
    """Forget every autotuned config (the variants change which kernels run)."""
    from matfn.kernels import matmul

    matmul._BEST_CONFIG.clear()
    matmul._tma_tuned.clear()
    for kernel in (matmul._sym_tuned, matmul._gen_tuned):
        kernel.cache.clear()
    _graphs.clear()


def _variant(label):
    """A context that applies one of :data:`SMALL_VARIANTS`."""
    from matfn.kernels import recording

    everywhere, tma, pdl = SMALL_VARIANTS[label]
    changes = dict(tma=tma, tma_min_work=0 if tma == "always" else 2**34)
    changes["pdl_max_tiles_per_sm"] = _backend.MATMUL.pdl_max_tiles_per_sm if pdl else 0
    if everywhere is True:
        changes.update(min_triton_work=0, min_triton_side=0, min_tma_batch_work=0)
    stack = configs(**changes)
    if everywhere == "recording":
        stack.enter_context(recording.for_graph())
    return stack


def section_small(cases):
    """Launch-bound cases, graph-replayed (GPU time): the default path against Triton
    everywhere, with and without programmatic dependent launch (PDL); every variant's result is
    checked against the float64 iteration on the same input. Then each product of a 1024² step
    per TMA config, with and without PDL, checked against a float32 product."""
    from triton.testing import do_bench_cudagraph

    from matfn.kernels import matmul
    from matfn.kernels.matmul_tma import launch_tma

    rows = []
    coeffs, factor = schedule("polar_express", STEPS)
    for name in cases:
        batch, n, m = CASES[name]
        M = torch.randn(batch, n, m, device="cuda", dtype=torch.bfloat16)
        X = M.double()
        X = X / (X.norm(dim=(-2, -1), keepdim=True) * factor)
        wide = X if n <= m else X.mT
        ref = newton_schulz_torch(wide, coeffs)
        ref = ref if n <= m else ref.mT
        for label in SMALL_VARIANTS:
            _reset_tuning()
            with _variant(label):
                try:
                    out = ours(M)  # autotunes
                    err = float((out.double() - ref).norm() / ref.norm())
                    t = bench(captured(lambda: ours(M)).replay)
                except Exception as exc:  # noqa: BLE001
                    log(f"  {name:>12} {label:<24} failed: {type(exc).__name__}: {exc}"[:300])
                    continue
            rows.append((name, label, *t, err))
            log(
                f"  {name:>12} {label:<24} graph {t[0]:8.4f} ms [{t[1]:.4f}, {t[2]:.4f}]"
                f"   rel err vs float64 NS {err:.2e}"
            )
    _reset_tuning()

    X = torch.randn(1, 1024, 1024, device="cuda", dtype=torch.float16) / 32
    A = X @ X.mT
    P = torch.baddbmm(A, A, A, beta=-4.77, alpha=2.03)
    eye = torch.eye(1024, device="cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    products = {  # name: (symmetric, A, B, D, α, β, γ, cuBLAS twin)
        "A = X Xᵀ": (True, X, X.mT, None, 1.0, 0.0, 0.0, lambda: torch.bmm(X, X.mT)),
        "cA² + bA + aI": (
            True, A, A, A, 2.03, -4.77, 3.44,
            lambda: torch.baddbmm(A, A, A, beta=-4.77, alpha=2.03).diagonal(-2, -1).add_(3.44),
        ),
        "BX + aX": (False, P, X, X, 1.0, 3.44, 0.0, lambda: torch.baddbmm(X, P, X, beta=3.44)),
    }  # fmt: skip
    for pname, (sym, A1, B1, D1, al, be, ga, f_cublas) in products.items():
        ref = al * A1.float() @ B1.float() + ga * eye
        if D1 is not None:
            ref += be * D1.float()
        t = do_bench_cudagraph(f_cublas, rep=50, return_mode="median")
        log(f"  1024² {pname:<14} {'cuBLAS':<30} {t * 1e3:6.1f} µs")
        blocks = matmul._TMA_SYMMETRIC_BLOCKS if sym else matmul._TMA_GENERAL_BLOCKS
        for (bm, bn, bk, st, w, persistent), pdl in itertools.product(blocks, (False, True)):
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_stages=st)
            cfg.update(num_warps=w, PROGRAMS=sms if persistent else 0)
            out = torch.empty(1, 1024, 1024, device="cuda", dtype=torch.float16)
            grid = matmul._grid(1024, 1024, 1, sym)
            label = f"TMA {bm}x{bn} s{st} w{w}{' pers.' if persistent else ''}"
            label += " PDL" if pdl else ""

            def f(args=(A1, B1, D1, out, al, be, ga, sym, grid), cfg=cfg, pdl=pdl):
                launch_tma(*args, config=cfg, pdl=pdl)

            try:
                f()
                e = float((out.float() - ref).abs().max() / ref.abs().max())
                t = do_bench_cudagraph(f, rep=50, return_mode="median")
            except Exception as exc:  # noqa: BLE001
                log(f"  1024² {pname} {label}: failed {type(exc).__name__}: {exc}"[:300])
                continue
            rows.append(("1024² product", pname, label, t, e))
            log(f"  1024² {pname:<14} {label:<30} {t * 1e3:6.1f} µs   rel err {e:.1e}")
    RESULTS["sections"]["small"] = rows


PDL_MODES = {  # label: MatmulConfig.pdl_max_tiles_per_sm
    "rule": _backend.MATMUL.pdl_max_tiles_per_sm,  # the default: at most two waves of tiles
    "all": 10**9,  # PDL for every product
    "never": 0,
}


def _pdl_mode(label):
    return configs(pdl_max_tiles_per_sm=PDL_MODES[label])


def section_pdl(cases, rounds: int = 2):
    """Programmatic dependent launch by the default rule, on every product and off, alternating
    (A/B) to cancel drift: eager ``do_bench`` time, host issue time per call and graph-replayed
    time of ours per case."""
    rows = []
    for name in cases:
        batch, n, m = CASES[name]
        M = torch.randn(batch, n, m, device="cuda", dtype=torch.bfloat16)
        for mode in PDL_MODES:  # compile and autotune each first
            with _pdl_mode(mode):
                ours(M)
        for _, mode in itertools.product(range(rounds), PDL_MODES):
            with _pdl_mode(mode):
                eager = bench(lambda M=M: ours(M))[0]
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(10):
                    ours(M)
                host = (time.perf_counter() - t0) / 10 * 1e3
                torch.cuda.synchronize()
                replay = bench(captured(lambda M=M: ours(M)).replay)[0]
            rows.append((name, mode, eager, host, replay))
            log(
                f"  {name:>12} PDL={mode:<5} eager {eager:8.4f} ms   host issue {host:7.3f} ms"
                f"   graph-replayed {replay:8.4f} ms"
            )
    RESULTS["sections"]["pdl"] = rows


def section_gram():
    from matfn.kernels.matmul import gram_triton

    rows = []
    for s, L in [(8192, 8192), (4096, 4096), (4096, 16384)]:
        X = torch.randn(1, s, L, device="cuda", dtype=torch.bfloat16)
        G = gram_triton(X)
        ref = X[0].float() @ X[0].float().T
        err = float((G[0].float() - ref).abs().max() / ref.abs().max())
        t_ours = bench(lambda X=X: gram_triton(X))[0]
        t_cub = bench(lambda X=X: X[0] @ X[0].T)[0]
        rows.append((f"{s}x{L}", t_ours, t_cub, t_cub / t_ours, err))
        log(
            f"  gram {s}x{L}: ours {t_ours:.3f} ms, cuBLAS X@X.T {t_cub:.3f} ms, "
            f"speed-up {t_cub / t_ours:.2f}x, rel err {err:.1e}, "
            f"{2 * s * s * L / t_ours / 1e9:.0f} plain TF/s"
        )
    RESULTS["sections"]["gram"] = rows


COMPONENT_SHAPES = [
    (48, 768, 768),
    (24, 768, 3072),
    (64, 512, 512),
    (1, 1024, 1024),
    (1, 4096, 4096),
]


def section_components():
    """Each product of a quintic step, cuBLAS vs Triton, eager and CUDA-graph replayed.

    ``A = X Xᵀ`` (bmm vs the symmetric Gram kernel), ``B = c A² + b A`` (baddbmm vs the
    symmetric kernel), ``X ← B X + a X`` (baddbmm, which first copies X into its output, vs the
    fused epilogue): where the Triton path wins or loses at the sizes Muon sees.
    """
    from triton.testing import do_bench_cudagraph

    from matfn.kernels.matmul import gram_triton, matmul_triton

    rows = []
    a, b, c = 3.4445, -4.7750, 2.0315
    for B, n, m in COMPONENT_SHAPES:
        X = torch.randn(B, n, m, device="cuda", dtype=torch.bfloat16) / math.sqrt(m)
        A = X @ X.mT
        P = torch.baddbmm(A, A, A, beta=b, alpha=c)
        products = {
            "A = X Xᵀ": (lambda: torch.bmm(X, X.mT), lambda: gram_triton(X)),
            "B = cA² + bA": (
                lambda: torch.baddbmm(A, A, A, beta=b, alpha=c),
                lambda: matmul_triton(A, A, A, alpha=c, beta=b, symmetric=True),
            ),
            "X ← BX + aX": (
                lambda: torch.baddbmm(X, P, X, beta=a),
                lambda: matmul_triton(P, X, X, beta=a),
            ),
            "B' = cA² + bA + aI": (
                lambda: torch.baddbmm(A, A, A, beta=b, alpha=c).diagonal(-2, -1).add_(a),
                lambda: matmul_triton(A, A, A, alpha=c, beta=b, gamma=a),
            ),
            # the folded form: a added to B's diagonal (s entries), then a plain bmm
            "X ← (B+aI)X": (
                lambda: (P.diagonal(dim1=-2, dim2=-1).add_(0.0), torch.bmm(P, X)),
                lambda: matmul_triton(P, X, X, beta=a),
            ),
        }
        for pname, (f_cublas, f_triton) in products.items():
            times = []
            for f in (f_cublas, f_triton):
                f()
                eager = bench(f)[0]
                try:
                    graph = do_bench_cudagraph(f, rep=50, return_mode="median")
                except Exception as exc:  # noqa: BLE001
                    log(f"  cudagraph failed: {exc}")
                    graph = float("nan")
                times += [eager, graph]
            rows.append(((B, n, m), pname, *times))
            log(
                f"  {B}x{n}x{m} {pname:<14} cuBLAS {times[0]:.4f} (graph {times[1]:.4f}) ms   "
                f"Triton {times[2]:.4f} (graph {times[3]:.4f}) ms   "
                f"Triton/cuBLAS graph {times[3] / times[1]:.2f}"
            )
    RESULTS["sections"]["components"] = rows


GROUPED_CASES = {
    # name: list of (count, s, L) wide matrices of mixed shapes
    "gpt2-small (48×768², 24×768×3072)": [(48, 768, 768), (24, 768, 3072)],
    "mixed small (16×256², 16×256×1024, 8×512², 8×128×4096)": [
        (16, 256, 256),
        (16, 256, 1024),
        (8, 512, 512),
        (8, 128, 4096),
    ],
    "16 distinct shapes (2 each, 128…1088 × 2048)": [(2, 64 * (i + 2), 2048) for i in range(16)],
}


def section_grouped():
    """Mixed shapes: one grouped launch per product for all shapes vs one stacked batch per
    shape (``newton_schulz_grouped`` with ``grouped_launch`` on, from 2 shapes, and off); eager
    and graph-replayed (the GPU time alone)."""
    import triton.testing

    coeffs, factor = schedule("polar_express", STEPS)
    rows = []
    for name, spec in GROUPED_CASES.items():
        Xs = [
            normalize(torch.randn(1, s, L, device="cuda"), factor, 1e-7, torch.bfloat16)[0]
            for count, s, L in spec
            for _ in range(count)
        ]
        results = {}
        for label, on in (("stacked per shape", False), ("grouped launch", True)):
            with configs(grouped_launch=on, grouped_min_shapes=2):
                fn = lambda Xs=Xs: ns_path.newton_schulz_grouped(Xs, coeffs, "standard")  # noqa: E731
                results[label] = fn()
                med = bench(fn)[0]
                try:  # GPU time alone: the grouped path's host work is per group
                    graph = triton.testing.do_bench_cudagraph(fn, rep=100)
                except Exception as exc:  # noqa: BLE001
                    graph = float("nan")
                    log(f"  cudagraph failed: {type(exc).__name__}: {str(exc)[:100]}")
            rows.append((name, label, med, graph))
            log(f"  {name:<58} {label:<18} {med:8.3f} ms   graph replay {graph:8.3f} ms")
        # the same iteration in float64: each path's own rounding error
        refs = [newton_schulz_torch(X.double()[None], coeffs)[0] for X in Xs]
        for label, outs in results.items():
            err = max(
                float((o.double() - r).norm() / r.norm()) for o, r in zip(outs, refs, strict=True)
            )
            log(f"  {name:<58} {label:<18} max rel. error vs the fp64 iteration {err:.1e}")
    RESULTS["sections"]["grouped"] = rows


TMA_SHAPES = [(1, 4096, 4096), (1, 8192, 8192), (1, 4096, 16384)]


def section_tma():
    """TMA kernels: correctness per config, then per-product timing against the alternatives."""
    from triton.testing import do_bench_cudagraph

    from matfn.kernels import matmul
    from matfn.kernels.matmul_tma import launch_tma

    def grid_of(s, b, sym):
        return matmul._grid(s, s, b, sym)

    def tiles_of(sym):  # (bm, bn, bk, stages, warps); persistence is swept separately
        return list(
            dict.fromkeys(
                c[:5] for c in (matmul._TMA_SYMMETRIC_BLOCKS if sym else matmul._TMA_GENERAL_BLOCKS)
            )
        )

    blocks = [(sym, cfg) for sym in (True, False) for cfg in tiles_of(sym)]
    SMS = torch.cuda.get_device_properties(0).multi_processor_count
    worst = 0.0
    for b, s, L in [(2, 1032, 1032), (1, 776, 1504), (3, 264, 392)]:
        X = torch.randn(b, s, L, device="cuda", dtype=torch.bfloat16) / math.sqrt(L)
        D = torch.randn(b, s, s, device="cuda", dtype=torch.bfloat16)
        D = D + D.mT
        for (sym, (bm, bn, bk, st, w)), programs in itertools.product(blocks, (0, SMS)):
            out = torch.full((b, s, s), float("nan"), device="cuda", dtype=torch.bfloat16)
            A = X if sym else X[:, :, :s]
            Bm = X.mT if sym else X[:, :, :s].mT.contiguous()
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_stages=st, num_warps=w)
            grid = grid_of(s, b, sym)
            label = f"{bm}x{bn}x{bk} s{st} w{w}{' persistent' if programs else ''}"
            try:
                launch_tma(
                    A, Bm, D, out, 0.5, -1.5, 2.0, sym, grid, config=dict(cfg, PROGRAMS=programs)
                )
            except Exception as exc:  # noqa: BLE001
                log(
                    f"  tma check {b}x{s}x{L} sym={sym} {label}: "
                    f"{type(exc).__name__} {str(exc)[:120]}"
                )
                continue
            ref = 0.5 * A.float() @ Bm.float() - 1.5 * D.float() + 2 * torch.eye(s, device="cuda")
            e = float((out.float() - ref).abs().max() / ref.abs().max())
            exact_sym = bool(torch.equal(out, out.mT)) if sym else True
            worst = max(worst, e if exact_sym else float("inf"))
            log(
                f"  tma check {b}x{s}x{L} sym={sym} {label}: rel err {e:.1e}"
                f"{'' if exact_sym else '  NOT EXACTLY SYMMETRIC'}"
            )
    log(f"  tma check worst: {worst:.1e}")

    try:
        from emerging_optimizers.triton_kernels.syrk import tsyrk_ex
    except Exception as exc:  # noqa: BLE001
        tsyrk_ex = None
        log(f"  emerging tsyrk_ex unavailable: {exc}")
    rows = []
    a, bb, c = 3.4445, -4.7750, 2.0315
    for b, s, L in TMA_SHAPES:
        X = torch.randn(b, s, L, device="cuda", dtype=torch.bfloat16) / math.sqrt(L)
        A = X @ X.mT
        P = torch.baddbmm(A, A, A, beta=bb, alpha=c)
        products = {
            "A = X Xᵀ": (True, X, X.mT, None, 1.0, 0.0, lambda: torch.bmm(X, X.mT)),
            "B = cA² + bA": (
                True,
                A,
                A,
                A,
                c,
                bb,
                lambda: torch.baddbmm(A, A, A, beta=bb, alpha=c),
            ),
            "X ← BX + aX": (False, P, X, X, 1.0, a, lambda: torch.baddbmm(X, P, X, beta=a)),
        }
        for pname, (sym, A1, B1, D1, al, be, f_cublas) in products.items():
            if pname != "A = X Xᵀ" and L != s:
                continue
            n = A1.shape[1]
            flops = (1 if sym else 2) * n * A1.shape[2] * B1.shape[2] * b
            entries = {"cuBLAS": f_cublas}
            for mode in ("never", "auto"):

                def f(mode=mode, sym=sym, A1=A1, B1=B1, D1=D1, al=al, be=be):
                    with configs(tma=mode):
                        return matmul.matmul_triton(A1, B1, D1, alpha=al, beta=be, symmetric=sym)

                entries["pointer (autotuned)" if mode == "never" else "TMA (autotuned)"] = f
            for bm, bn, bk, st, w in tiles_of(sym):
                out = torch.empty(b, n, B1.shape[2], device="cuda", dtype=torch.bfloat16)
                cfg = dict(
                    BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_stages=st, num_warps=w
                )
                for programs in (0, SMS):
                    grid = grid_of(n, b, sym)
                    label = f"TMA {bm}x{bn}x{bk} s{st} w{w}{' persistent' if programs else ''}"
                    entries[label] = (
                        lambda A1=A1, B1=B1, D1=D1, al=al, be=be, out=out, sym=sym, grid=grid, cfg=dict(cfg, PROGRAMS=programs): (  # noqa: E501
                            launch_tma(A1, B1, D1, out, al, be, 0.0, sym, grid, config=cfg)
                        )
                    )
            if pname == "A = X Xᵀ" and tsyrk_ex is not None:
                entries["emerging tsyrk_ex"] = lambda X=X: tsyrk_ex(X[0])
            if pname == "B = cA² + bA" and tsyrk_ex is not None:
                entries["emerging tsyrk_ex"] = lambda A=A: tsyrk_ex(A[0], A[0], alpha=c, beta=bb)
            base = None
            for ename, f in entries.items():
                try:
                    f()
                    t = bench(f)[0]
                    tg = do_bench_cudagraph(f, rep=50, return_mode="median")
                except Exception as exc:  # noqa: BLE001
                    log(
                        f"  {b}x{s}x{L} {pname} {ename}: failed {type(exc).__name__}: "
                        f"{str(exc)[:200]}"
                    )
                    continue
                base = base or t
                rows.append(((b, s, L), pname, ename, t, tg))
                log(
                    f"  {b}x{s}x{L} {pname:<13} {ename:<26} {t:8.4f} ms (graph {tg:8.4f})  "
                    f"cuBLAS/this {base / t:5.2f}  {flops / t / 1e9:6.0f} performed TF/s"
                )
    RESULTS["sections"]["tma"] = {"worst": worst, "rows": rows}


def section_check():
    """Triton vs torch at the same dtype, poisoned outputs, odd sizes (quick)."""
    from matfn.kernels.matmul import matmul_triton
    from matfn.msign.reference import ns_step_torch, sign_step_torch
    from matfn.msign.triton import ns_step_triton, sign_step_triton

    worst = 0.0
    for b, s, L in [(1, 1000, 1000), (3, 129, 257), (2, 777, 1500), (1, 4096, 4096)]:
        # σ_max(X) ≈ 1, so that every term of the step matters in the comparison.
        X = torch.randn(b, s, L, device="cuda", dtype=torch.bfloat16) / (s**0.5 + L**0.5)
        out = torch.full((b, s, s), float("nan"), device="cuda", dtype=torch.bfloat16)
        matmul_triton(X, X.mT, symmetric=True, out=out)
        ref = X.float() @ X.float().mT
        e1 = float((out.float() - ref).abs().max() / ref.abs().max())
        y = ns_step_triton(X, 3.4, -4.7, 2.0)
        r = ns_step_torch(X, 3.4, -4.7, 2.0)
        e2 = float((y.float() - r.float()).norm() / r.float().norm())
        Sq = X[:, :, :s].contiguous() * ((s**0.5 + L**0.5) / (2 * s**0.5))
        z = sign_step_triton(Sq, 1.5, -0.5, 0.1)
        zr = sign_step_torch(Sq, 1.5, -0.5, 0.1)
        e3 = float((z.float() - zr.float()).norm() / zr.float().norm())
        log(f"  check {b}x{s}x{L}: gram {e1:.1e}  ns_step {e2:.1e}  sign_step {e3:.1e}")
        worst = max(worst, e1, e2, e3)
    from matfn.kernels import matmul as G

    # plus a rectangular symmetric tile (full grid, upper tiles idle), as the TMA lists use
    sym_cfgs = G._SYMMETRIC_CONFIGS + [G._config(128, 256, 64, 3, 8)]
    for cfg in sym_cfgs + G._GENERAL_CONFIGS:
        sym = cfg in sym_cfgs
        for b, s, L in [(2, 1000, 1000), (1, 777, 1500)]:
            X = torch.randn(b, s, L, device="cuda", dtype=torch.bfloat16) / math.sqrt(L)
            A = X if sym else X[:, :, :s]
            D = torch.randn(b, s, s, device="cuda", dtype=torch.bfloat16)
            D = D + D.mT
            out = torch.full((b, s, s), float("nan"), device="cuda", dtype=torch.bfloat16)
            Bm = X.mT if sym else X[:, :, :s].mT.contiguous()
            G._mm_heuristic[
                (G._grid_size(s, s, b, cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], sym),)
            ](
                A,
                Bm,
                D,
                out,
                s,
                s,
                A.shape[2],
                b,
                *A.stride(),
                *Bm.stride(),
                *D.stride(),
                *out.stride(),
                0.5,
                -1.5,
                2.0,
                SYMMETRIC=sym,
                HAS_D=True,
                HAS_DIAG=True,
                IEEE=False,
                num_warps=cfg.num_warps,
                num_stages=cfg.num_stages,
                **cfg.kwargs,
            )
            ref = 0.5 * A.float() @ Bm.float() - 1.5 * D.float()
            ref += 2 * torch.eye(s, device="cuda")
            e = float((out.float() - ref).abs().max() / ref.abs().max())
            log(
                f"  config {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages} sym={sym} "
                f"{b}x{s}x{L}: rel err {e:.1e}"
            )
            worst = max(worst, e)
    log(f"  check worst relative difference triton vs torch (bf16): {worst:.1e}")
    RESULTS["sections"]["check"] = worst


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", default="env,check,acc,gram,time,graph")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--json", default=None)
    ap.add_argument("--peer-cases", default=",".join(CASES), help="cases that time the peers")
    ap.add_argument("--peers", default="torch.optim,emerging,gram-newton,heavyball")
    ap.add_argument("--acc-shapes", default=ACC_SHAPES, help="s x L shapes of the acc section")
    ap.add_argument("--acc-conds", default="10", help="condition numbers of the acc section")
    ap.add_argument("--graph-cases", default=",".join(SMALL), help="cases of the graph section")
    ap.add_argument("--lean", action="store_true", help="time ours without its variants")
    args = ap.parse_args()
    global LEAN
    LEAN = args.lean
    sections = args.sections.split(",")
    cases = [c for c in args.cases.split(",") if c]
    torch.backends.cuda.matmul.allow_tf32 = False
    t0 = time.time()
    if "env" in sections:
        log("== env")
        section_env()
    peak = None
    if "time" in sections or "peak" in sections:
        peak = cublas_peak()
        RESULTS["peak_tflops"] = peak
        log(f"== cuBLAS bf16 8192³: {peak:.0f} TFLOP/s")
    for name, fn in (
        ("check", section_check),
        (
            "acc",
            lambda: section_acc(
                [tuple(map(int, c.split("x"))) for c in args.acc_shapes.split(",")],
                [float(c) for c in args.acc_conds.split(",")],
            ),
        ),
        ("gram", section_gram),
        (
            "time",
            lambda: section_time(cases, peak, args.peer_cases.split(","), args.peers.split(",")),
        ),
        ("graph", lambda: section_graph([c for c in args.graph_cases.split(",") if c])),
        ("small", lambda: section_small([c for c in args.graph_cases.split(",") if c])),
        ("pdl", lambda: section_pdl(cases)),
        ("components", section_components),
        ("grouped", section_grouped),
        ("tma", section_tma),
    ):
        if name in sections:
            log(f"== {name} ({time.time() - t0:.0f} s)")
            try:
                fn()
            except Exception:
                traceback.print_exc()
    log(f"== done in {time.time() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(RESULTS, f, indent=1, default=str)


if __name__ == "__main__":
    main()
