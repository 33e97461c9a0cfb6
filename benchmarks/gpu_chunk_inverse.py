"""Chunk inverses for the WY form: ``matfn`` ``tri_inv_chunks`` against fla-core (CUDA).

DeltaNet's home case: batch 8, 16 heads, n = 4096, d = 128, chunk 64, unit-norm keys,
β ∈ (0, 1); no decay, a per-row decay (GDN) and a per-channel decay (KDA), each weak
(ℓ ∈ [−1, 0)) and strong (ℓ ∈ [−5, 0)). For each: the relative Frobenius error against the
float64 torch form and the median time (``triton.testing.do_bench``) of

* matfn ``tri_inv_chunks`` (the public call: the Triton kernel of
  ``matfn.triangular.chunks_kernel`` without decay and for GDN, the torch form for KDA; the
  first call per case autotunes, outside the timed region);
* fla ``chunk_scaled_dot_kkt_fwd`` + ``solve_tril`` (not for KDA: that A takes no per-channel
  gate), fla ``solve_tril`` alone on a precomputed A (its error from the exactly rounded A),
  and fla's fused GDN ``kkt_solve`` kernel (tf32 dots) where fla-core is importable.

fla takes ``[B, T, H, d]`` and matfn ``(B, H, T, d)``: the transposes are made once, outside
the timed region. Install fla-core offline with
``pip install --no-deps .whl/einops-*.whl .whl/fla_core-*.whl``.

Usage: ``python3 benchmarks/gpu_chunk_inverse.py [--cases none,gdn,kda] [--n 4096]``.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
import triton

from matfn.triangular import chunks


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


def bench(fn) -> float:
    return triton.testing.do_bench(fn, return_mode="median")


def try_fla():
    try:
        from fla.ops.common.chunk_scaled_dot_kkt import chunk_scaled_dot_kkt_fwd
        from fla.ops.utils.solve_tril import solve_tril
    except Exception as exc:  # noqa: BLE001 - report any import failure and go on
        print(f"fla-core not available ({type(exc).__name__}: {exc}); timing matfn only")
        return None
    try:
        from fla.ops.gated_delta_rule.chunk_fwd import (
            chunk_gated_delta_rule_fwd_kkt_solve_kernel as fused,
        )
    except Exception:  # noqa: BLE001
        fused = None
    return chunk_scaled_dot_kkt_fwd, solve_tril, fused


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--cases", default="none,gdn,kda,gdn-strong,kda-strong")
    a = p.parse_args()
    B, H, n, d, C = a.batch, a.heads, a.n, a.d, 64
    dev = "cuda"
    print(
        f"{torch.cuda.get_device_name()}  B={B} H={H} n={n} d={d} C={C}  torch {torch.__version__}"
    )
    g = torch.Generator(device=dev).manual_seed(0)
    K = torch.nn.functional.normalize(torch.randn(B, H, n, d, device=dev, generator=g), dim=-1)
    beta = torch.rand(B, H, n, device=dev, generator=g)
    fla = try_fla()
    rows = []
    for case in a.cases.split(","):
        scale = 5.0 if case.endswith("strong") else 1.0
        L = None
        if case.startswith("gdn"):
            L = -scale * torch.rand(B, H, n, device=dev, generator=g)
        elif case.startswith("kda"):
            L = -scale * torch.rand(B, H, n, d, device=dev, generator=g)
        Lf = None if L is None else L.reshape(B * H, n, -1)
        ref = chunks.tri_inv_chunks_torch(
            K.reshape(B * H, n, d).double(),
            beta.reshape(B * H, n).double(),
            None if Lf is None else Lf.double(),
            C,
        ).reshape(B, H, n, C)

        def ours():
            return chunks.tri_inv_chunks(K, beta, log_decay=L, check_finite=False)

        err = rel(ours(), ref)  # the first call autotunes the kernel
        rows.append((case, "matfn tri_inv_chunks", bench(ours), err))
        if fla is None:
            continue
        kkt, solve_tril, fused = fla
        kf = K.transpose(1, 2).contiguous()  # [B, T, H, d], outside the timed region
        bf = beta.transpose(1, 2).contiguous()
        gf = None
        if L is not None and L.ndim == 3:  # fla's gate: in-chunk cumulative sum, log2 units
            gf = (L.reshape(B, H, n // C, C).cumsum(-1) / math.log(2)).reshape(B, H, n)
            gf = gf.transpose(1, 2).contiguous()
        back = lambda Y: Y.transpose(1, 2)  # noqa: E731 - [B, T, H, C] -> (B, H, T, C)
        # the exactly rounded A (float64, then fp32), for solve_tril alone
        A64 = torch.linalg.solve_triangular(
            ref.reshape(B, H, n // C, C, C),
            torch.eye(C, device=dev, dtype=torch.float64),
            upper=False,
        ) - torch.eye(C, device=dev, dtype=torch.float64)
        A_exact = back(A64.reshape(B, H, n, C).float()).contiguous()
        rows.append(
            (
                case,
                "fla solve_tril alone (exact A)",
                bench(lambda: solve_tril(A_exact)),
                rel(back(solve_tril(A_exact)), ref),
            )
        )
        if L is None or L.ndim == 3:

            def pipeline():
                A = kkt(k=kf, g=gf, beta=bf, chunk_size=C, output_dtype=torch.float32)
                return solve_tril(A, output_dtype=torch.float32)

            rows.append(
                (case, "fla kkt_fwd + solve_tril", bench(pipeline), rel(back(pipeline()), ref))
            )
            if fused is not None:

                def fused_call():
                    Ai = torch.zeros(B, n, H, C, device=dev)
                    fused[(n // C, B * H)](
                        k=kf,
                        g=gf,
                        beta=bf,
                        A=Ai,
                        cu_seqlens=None,
                        chunk_indices=None,
                        T=n,
                        H=H,
                        HV=H,
                        K=d,
                        BT=C,
                        BC=16,
                    )
                    return Ai

                try:
                    rows.append(
                        (
                            case,
                            "fla fused kkt_solve (tf32)",
                            bench(fused_call),
                            rel(back(fused_call()), ref),
                        )
                    )
                except Exception as exc:  # noqa: BLE001
                    print(f"fla fused kernel failed: {type(exc).__name__}: {exc}")
        else:
            rows.append((case, "fla kkt_fwd: no per-channel gate", math.nan, math.nan))
    kernel_module = sys.modules.get("matfn.triangular.chunks_kernel")  # loaded by a kernel call
    if kernel_module is not None:
        for key, cfg in kernel_module.tri_inv_chunks_kernel.cache.items():
            print(f"autotuned kernel config {cfg} for key {key}")
    print(f"\n{'case':<11} {'implementation':<44} {'median ms':>10} {'rel err':>10}")
    for case, name, ms, err in rows:
        print(f"{case:<11} {name:<44} {ms:>10.4f} {err:>10.2e}")


if __name__ == "__main__":
    main()
