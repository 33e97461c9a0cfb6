r"""Fused per-head max of attention logits, without materialising the score matrix (Triton).

The torch twin is :func:`optim.max_logit.max_logit_torch`; :func:`optim.max_logit.max_logits`
dispatches between them. Importing this module imports Triton.

For query head ``h`` (key/value head ``h // (H / H_kv)`` under GQA/MQA) the kernel computes

.. math:: S^h = \max_{b,\; i,\; j \in \mathcal{M}(i)} \; \mathrm{scale}\,\langle q_{b,h,i},
          k_{b,h_{kv},j}\rangle

with :math:`\mathcal{M}(i) = \{j \le i\}` when causal (top-left aligned, as
``scaled_dot_product_attention(is_causal=True)``), else all keys. Each program owns one
``BLOCK_M`` tile of queries of one (batch, head) and walks the key tiles up to the causal limit,
keeping a running row max in registers (flash-attention's loop without exp and the PV product);
one partial max per program is written and reduced by ``amax`` on the host side.
Cost: ``B·H·Sq·Sk·D`` multiply-adds (half of that when causal), one read of q, and
``Sq / BLOCK_M`` reads of k per head.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["max_logit_triton"]

#: largest head dim the kernel holds in registers; larger ones take the torch path
MAX_HEAD_DIM = 256


@triton.jit
def _max_logit_kernel(
    q_ptr,
    k_ptr,
    out_ptr,
    H,
    Sq,
    Sk,
    D,
    group,
    scale,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_kd,
    CAUSAL: tl.constexpr,
    USE_ABS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    num_m = tl.num_programs(0)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    hk = (h // group).to(tl.int64)
    h = h.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    # 64-bit offsets: batch·head strides overflow int32 for long sequences
    q_base = q_ptr + b * stride_qb + h * stride_qh
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    q = tl.load(
        q_base + offs_m[:, None].to(tl.int64) * stride_qs + offs_d[None, :] * stride_qd,
        mask=(offs_m[:, None] < Sq) & (offs_d[None, :] < D),
        other=0.0,
    )
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    hi = Sk
    if CAUSAL:
        hi = tl.minimum(Sk, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        kt = tl.load(
            k_base + cols[None, :].to(tl.int64) * stride_ks + offs_d[:, None] * stride_kd,
            mask=(cols[None, :] < Sk) & (offs_d[:, None] < D),
            other=0.0,
        )
        s = tl.dot(q, kt, input_precision=INPUT_PRECISION) * scale
        if USE_ABS:
            s = tl.abs(s)
        valid = (offs_m[:, None] < Sq) & (cols[None, :] < Sk)
        if CAUSAL:
            valid = valid & (cols[None, :] <= offs_m[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_i = tl.maximum(m_i, tl.max(s, axis=1))
    tl.store(out_ptr + pid_bh * num_m + pid_m, tl.max(m_i, axis=0))


def _default_blocks(head_dim: int) -> tuple[int, int, int, int]:
    block_d = max(16, triton.next_power_of_2(head_dim))
    if block_d <= 64:
        return 128, 64, block_d, 4
    if block_d <= 128:
        return 128, 64, block_d, 8
    return 64, 32, block_d, 4


def max_logit_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    causal: bool = True,
    scale: float,
    use_abs: bool = False,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 2,
) -> torch.Tensor:
    """Per-head max of ``scale · q kᵀ`` over the (causal) mask, as float32 of shape ``(H,)``.

    Parameters
    ----------
    q : torch.Tensor
        ``(B, H, Sq, D)`` queries (any strides), float32/float16/bfloat16.
    k : torch.Tensor
        ``(B, H_kv, Sk, D)`` keys, same dtype and device; ``H % H_kv == 0``.
    causal : bool
        Mask keys ``j > i`` (top-left alignment, as SDPA's ``is_causal``).
    scale : float
        Logit scale (the softmax scale, usually ``1/√D``).
    use_abs : bool
        Max of ``|logit|`` instead of the signed max.
    block_m, block_n, num_warps, num_stages
        Launch configuration overrides (tests and benchmarks).

    Returns
    -------
    torch.Tensor
        float32 ``(H,)``; ``-inf`` for heads with no unmasked pair (empty batch or sequence).

    Notes
    -----
    Products accumulate in float32. float32 inputs use TF32 tensor cores exactly when
    ``torch.backends.cuda.matmul.allow_tf32`` is set (torch's own matmul rule), else IEEE fp32.
    NaN inputs give an unspecified result (Triton's max does not propagate NaN).
    """
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    out_empty = torch.full((H,), float("-inf"), dtype=torch.float32, device=q.device)
    if B == 0 or Sq == 0 or Sk == 0 or H == 0:
        return out_empty
    bm, bn, bd, nw = _default_blocks(D)
    bm = block_m or bm
    bn = block_n or bn
    nw = num_warps or nw
    precision = "ieee"
    if q.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        precision = "tf32"
    num_m = triton.cdiv(Sq, bm)
    # NaN-poisoned: a program that fails to write shows up in the amax
    partial = torch.full((B * H * num_m,), float("nan"), dtype=torch.float32, device=q.device)
    grid = (num_m, B * H)
    _max_logit_kernel[grid](
        q,
        k,
        partial,
        H,
        Sq,
        Sk,
        D,
        H // Hkv,
        float(scale),
        *q.stride(),
        *k.stride(),
        CAUSAL=bool(causal),
        USE_ABS=bool(use_abs),
        INPUT_PRECISION=precision,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_D=bd,
        num_warps=nw,
        num_stages=num_stages,
    )
    return partial.view(B, H, num_m).amax(dim=(0, 2))
