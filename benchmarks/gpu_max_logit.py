"""GPU check + timing of the fused max-logit kernel vs the torch reference (QK-Clip record path).

Run on a CUDA machine from the repo root::

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_max_logit.py

Prints a correctness table (kernel vs chunked torch reference vs float64 oracle) and a timing
table (triton.testing.do_bench, median ms), plus a launch-config sweep; writes JSON to $OUT.
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch

sys.path.insert(0, os.getcwd())

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from matfn.kernels.max_logit import max_logit_triton  # noqa: E402
from optim.max_logit import max_logit_torch  # noqa: E402


def dense(q, k, causal, scale):
    """Naive: the whole (B, H, S, S) score tensor in the input dtype, then amax."""
    G = q.shape[1] // k.shape[1]
    s = (q @ k.repeat_interleave(G, 1).transpose(-1, -2)).float() * scale
    if causal:
        S = q.shape[2]
        s = s.masked_fill(~torch.ones(S, S, dtype=torch.bool, device=q.device).tril(), -math.inf)
    return s.amax(dim=(0, 2, 3))


def main() -> None:
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "triton": triton.__version__, "check": [], "time": [], "sweep": []}  # fmt: skip
    shapes = [  # (B, H, Hkv, S, D)
        (2, 16, 16, 2048, 128),
        (2, 16, 4, 2048, 128),
        (2, 16, 16, 2048, 192),
        (1, 16, 16, 8192, 128),
    ]
    ok = True
    for B, H, Hkv, S, D in shapes:
        for dtype in (torch.bfloat16, torch.float32):
            for causal in (True, False):
                g = torch.Generator(device=dev).manual_seed(S + D + H)
                q = (2 * torch.randn(B, H, S, D, device=dev, generator=g)).to(dtype)
                k = torch.randn(B, Hkv, S, D, device=dev, generator=g).to(dtype)
                sc = 1 / math.sqrt(D)
                out = max_logit_triton(q, k, causal=causal, scale=sc)
                ref = max_logit_torch(q, k, causal=causal, scale=sc)
                err = ((out - ref).abs() / ref.abs().clamp_min(1e-6)).max().item()
                row = dict(shape=(B, H, Hkv, S, D), dtype=str(dtype), causal=causal,
                           rel_err_vs_ref=err)  # fmt: skip
                if S <= 2048:
                    o64 = max_logit_torch(q.double(), k.double(), causal=causal, scale=sc)
                    row["rel_err_vs_f64"] = ((out.double() - o64).abs() / o64.abs()).max().item()
                good = err < 1e-4 and not torch.isnan(out).any()
                ok &= good
                row["ok"] = good
                results["check"].append(row)
                print("check", row)
                ms_k = do_bench(lambda q=q, k=k, c=causal, s=sc: max_logit_triton(q, k, causal=c,
                                scale=s), warmup=25, rep=100, return_mode="median")  # fmt: skip
                ms_t = do_bench(lambda q=q, k=k, c=causal, s=sc: max_logit_torch(q, k, causal=c,
                                scale=s), warmup=10, rep=50, return_mode="median")  # fmt: skip
                ms_d = float("nan")
                if B * H * S * S * 4 <= 2**31:
                    ms_d = do_bench(lambda q=q, k=k, c=causal, s=sc: dense(q, k, c, s), warmup=10,
                                    rep=50, return_mode="median")  # fmt: skip
                ms_a = float("nan")
                if dtype == torch.bfloat16 and D <= 128:
                    ms_a = do_bench(lambda q=q, k=k, c=causal: torch.nn.functional.
                                    scaled_dot_product_attention(q, k, k, is_causal=c,
                                    enable_gqa=True), warmup=10, rep=50,
                                    return_mode="median")  # fmt: skip
                flop = 2 * B * H * S * S * D * (0.5 if causal else 1.0)
                t = dict(shape=(B, H, Hkv, S, D), dtype=str(dtype).replace("torch.", ""),
                         causal=causal, kernel_ms=ms_k, torch_ref_ms=ms_t, dense_ms=ms_d,
                         sdpa_fwd_ms=ms_a, kernel_tflops=flop / ms_k / 1e9)  # fmt: skip
                results["time"].append(t)
    # launch-config sweep at the headline shape
    B, H, S, D = 2, 16, 2048, 128
    q = torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16)
    for bm, bn, nw, ns in [
        (128, 64, 8, 2),
        (128, 64, 4, 3),
        (128, 128, 8, 2),
        (128, 128, 8, 3),
        (64, 64, 4, 3),
        (128, 32, 4, 3),
        (64, 128, 4, 2),
        (256, 64, 8, 2),
    ]:
        for causal in (True, False):
            ms = do_bench(lambda bm=bm, bn=bn, nw=nw, ns=ns, c=causal: max_logit_triton(
                q, k, causal=c, scale=0.088, block_m=bm, block_n=bn, num_warps=nw,
                num_stages=ns), warmup=25, rep=100, return_mode="median")  # fmt: skip
            results["sweep"].append(dict(block_m=bm, block_n=bn, num_warps=nw, num_stages=ns,
                                         causal=causal, ms=ms))  # fmt: skip
    print("\n| B,H,Hkv,S,D | dtype | causal | kernel ms | TFLOP/s | torch ref ms | dense ms |"
          " SDPA fwd ms |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    for t in results["time"]:
        print(f"| {','.join(map(str, t['shape']))} | {t['dtype']} | {t['causal']} | "
              f"{t['kernel_ms']:.3f} | {t['kernel_tflops']:.0f} | {t['torch_ref_ms']:.3f} | "
              f"{t['dense_ms']:.3f} | {t['sdpa_fwd_ms']:.3f} |")  # fmt: skip
    print("\n| block_m | block_n | warps | stages | causal | ms |\n|---|---|---|---|---|---|")
    for r in results["sweep"]:
        print(f"| {r['block_m']} | {r['block_n']} | {r['num_warps']} | {r['num_stages']} | "
              f"{r['causal']} | {r['ms']:.4f} |")  # fmt: skip
    print("ALL CHECKS OK" if ok else "SOME CHECKS FAILED")
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "max_logit.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
