r"""The per-head maximum attention logit, without materialising the score matrix.

QK-Clip's statistic (docs/math.md §6): for query head ``h`` (key head ``h // (H / H_kv)``
under GQA/MQA), ``S_h = max_{b, i, j ∈ M(i)} scale·⟨q_{b,h,i}, k_{b,h_kv,j}⟩`` with
``M(i) = {j ≤ i}`` when causal. :func:`max_logits` validates and picks the path: the fused
Triton kernel (:func:`matfn.kernels.max_logit.max_logit_triton`) for bf16/fp16 CUDA inputs,
else the chunked torch reference :func:`max_logit_torch`.

The computation is the custom op ``torch.ops.matfn.max_logits`` (:func:`max_logits_op`), so that
``torch.compile(fullgraph=True)``, FakeTensor and ``torch.export`` keep it as one node (the
Triton kernel runs inside it on CUDA); :func:`max_logits` validates and calls it. The op has no
autograd formula: the statistic is taken without gradient (a max is not what QK-Clip
differentiates), and the public function passes it detached inputs.
"""

from __future__ import annotations

import math

import torch

from matfn.functional import triton_module, use_triton

__all__ = ["check_qk", "max_logit_torch", "max_logits", "max_logits_op"]


def check_qk(q: object, k: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated ``(q, k)``: real floating ``(B, H, S, D)`` and ``(B, H_kv, S, D)`` tensors.

    One device, equal batch and head_dim, ``H % H_kv == 0``; raises ``TypeError`` /
    ``ValueError`` quoting the bad value.
    """
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point() or t.is_complex():
            raise TypeError(f"`{name}` must have a real floating dtype, got {t.dtype}")
        if t.ndim != 4:
            raise ValueError(
                f"`{name}` must have shape (batch, heads, seq, head_dim), got {tuple(t.shape)}"
            )
    assert isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)
    if q.device != k.device:
        raise ValueError(f"`k` is on {k.device} but `q` is on {q.device}; use one device")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            "`q` (batch, heads, seq, head_dim) and `k` (batch, kv_heads, seq, head_dim) must "
            f"agree in batch and head_dim, got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(
            f"`q`'s head count ({q.shape[1]}) must be a multiple of `k`'s ({k.shape[1]})"
        )
    return q, k


def _result_dtype(q: torch.Tensor) -> torch.dtype:
    """The accumulate dtype of the statistic: float64 for float64 queries, else float32."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def max_logit_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    causal: bool = True,
    scale: float,
    use_abs: bool = False,
    block_q: int = 256,
    block_k: int = 1024,
) -> torch.Tensor:
    """Reference: per-head max of ``scale·q kᵀ`` in blocks of ``block_q × block_k`` scores.

    Shapes as :func:`max_logits`. Products in float32 (float64 for float64 inputs), the same
    accumulation as the kernel and the fused attention kernels; masked pairs are ``-inf``.
    Returns ``(H,)`` in that dtype. Memory: at most ``B·H·block_q·block_k`` scores at a time
    (float32: 4 MiB per 2²⁰).
    """
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G = H // Hkv
    acc = _result_dtype(q)
    out = torch.full((Hkv, G), float("-inf"), dtype=acc, device=q.device)
    if B == 0 or Sq == 0 or Sk == 0:
        return out.view(H)
    qg = q.reshape(B, Hkv, G, Sq, D) if q.is_contiguous() else q.unflatten(1, (Hkv, G))
    for i0 in range(0, Sq, block_q):
        i1 = min(Sq, i0 + block_q)
        qb = qg[:, :, :, i0:i1].to(acc)
        kend = min(Sk, i1) if causal else Sk
        for j0 in range(0, kend, block_k):
            j1 = min(kend, j0 + block_k)
            kb = k[:, :, None, j0:j1].to(acc)
            s = torch.matmul(qb, kb.transpose(-1, -2)).mul_(scale)  # (B, Hkv, G, bq, bk)
            if use_abs:
                s.abs_()
            if causal and j1 - 1 > i0:
                rows = torch.arange(i0, i1, device=q.device)[:, None]
                cols = torch.arange(j0, j1, device=q.device)[None, :]
                s.masked_fill_(cols > rows, float("-inf"))
            torch.maximum(out, s.amax(dim=(0, 3, 4)), out=out)
    return out.view(H)


def max_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    use_abs: bool = False,
) -> torch.Tensor:
    r"""Per-head max attention logit, without materialising the score matrix.

    Parameters
    ----------
    q : torch.Tensor
        ``(B, H, Sq, D)`` post-RoPE queries (any strides).
    k : torch.Tensor
        ``(B, H_kv, Sk, D)`` post-RoPE keys; ``H % H_kv == 0`` and query head ``h`` reads key
        head ``h // (H / H_kv)`` (GQA/MQA).
    causal : bool
        Only pairs with key index ``j ≤ i`` (SDPA's ``is_causal``, top-left aligned).
    scale : float, optional
        The softmax scale; default ``1/√D`` as in ``scaled_dot_product_attention``.
    use_abs : bool
        Max of ``|logit|`` (Su's definition) instead of the signed max (K2/Megatron).

    Returns
    -------
    torch.Tensor
        ``(H,)`` float32 (float64 for float64 inputs): ``S_h = max_{b,i,j} scale·q_{bhi}·k_{bh'j}``;
        ``-inf`` where no pair is unmasked (empty batch or sequence).

    Raises
    ------
    TypeError
        Non-tensor or non-floating ``q``/``k``.
    ValueError
        Wrong ranks, mismatched batch/head_dim, ``H`` not a multiple of ``H_kv``, mixed devices.

    Notes
    -----
    Cost: ``B·H·Sq·Sk·D`` multiply-adds (about half when causal), no gradient. On CUDA with
    Triton (unless ``MATFN_DISABLE_TRITON=1``) and bf16/fp16 inputs, one fused kernel
    (:func:`matfn.kernels.max_logit.max_logit_triton`) keeps only a row max in registers; the
    torch path (:func:`max_logit_torch`) materialises at most ``B·H·256·1024`` float32 scores
    at a time. Products
    accumulate in float32 in both paths, so they agree to float32 summation-order rounding.

    Examples
    --------
    >>> q = torch.zeros(1, 2, 3, 4); k = torch.zeros(1, 1, 3, 4)
    >>> q[0, 1, 2, 0] = 2.0; k[0, 0, 1, 0] = 3.0
    >>> max_logits(q, k, scale=1.0)
    tensor([0., 6.])
    """
    q, k = check_qk(q, k)
    scale = None if scale is None else float(scale)
    # no autograd formula: detached inputs, so the result never requires grad
    return max_logits_op(
        q.detach(), k.detach(), causal=bool(causal), scale=scale, use_abs=bool(use_abs)
    )


@torch.library.custom_op("matfn::max_logits", mutates_args=())
def max_logits_op(
    q: torch.Tensor,
    k: torch.Tensor,
    causal: bool,
    scale: float | None,
    use_abs: bool,
) -> torch.Tensor:
    """``torch.ops.matfn.max_logits``: the compute of :func:`max_logits` on validated inputs.

    Schema ``(Tensor q, Tensor k, bool causal, float? scale, bool use_abs) -> Tensor``: ``q``,
    ``k`` as checked by :func:`check_qk`; ``scale`` None is ``1/√D`` (resolved here, so a
    symbolic head dim never reaches the schema). Returns a new ``(H,)`` tensor, float32
    (float64 for float64 ``q``); inputs are not modified. Opaque to dynamo/AOT: the Triton
    kernel (bf16/fp16 CUDA inputs, head dim ≤ ``MAX_HEAD_DIM``) or the chunked torch reference
    runs inside. No autograd formula (see the module docstring).
    """
    D = q.shape[-1]
    s = (1.0 / math.sqrt(D) if D else 1.0) if scale is None else scale
    # float32 stays on the torch path: the kernel's IEEE-fp32 dots are about 10× slower than
    # the chunked reference's tensor-core matmuls (docs/benchmarks.md)
    half = q.dtype in (torch.bfloat16, torch.float16)
    if q.dtype == k.dtype and half and use_triton(q, k):
        kernel = triton_module("kernels.max_logit")
        if 0 < D <= kernel.MAX_HEAD_DIM:
            return kernel.max_logit_triton(q, k, causal=causal, scale=s, use_abs=use_abs)
    return max_logit_torch(q, k, causal=causal, scale=s, use_abs=use_abs)


@max_logits_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float | None, use_abs: bool):
    return q.new_empty((q.shape[1],), dtype=_result_dtype(q))
