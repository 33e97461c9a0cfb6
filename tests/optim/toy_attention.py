"""Tiny attention modules (MHA/GQA/MQA, fused or split QKV, MLA) for QK-Clip tests and demos.

Each module records its max-logits into an attached :class:`optim.QKClip` during training
forwards and exposes ``logits(x)`` (the full masked score tensor) and ``head_outputs(x)`` (the
per-head attention outputs before the output projection) so tests can recompute everything.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from optim import QKClip


def rope(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary embedding (rotate-half form) of ``x`` shaped (B, H, S, D), D even."""
    S, D = x.shape[-2], x.shape[-1]
    inv = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(S, dtype=torch.float64)[:, None] * inv[None, :]
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(x.dtype)
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(x.dtype)
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _causal_mask(S: int, device: torch.device) -> torch.Tensor:
    return torch.ones(S, S, dtype=torch.bool, device=device).tril()


class ToyAttention(nn.Module):
    """Causal self-attention with RoPE; ``num_kv_heads < num_heads`` gives GQA/MQA."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        *,
        head_dim: int | None = None,
        bias: bool = False,
        fused: bool = False,
        use_rope: bool = True,
        causal: bool = True,
        q_norm: str | None = None,
        k_norm: str | None = None,
    ) -> None:
        super().__init__()
        self.H = num_heads
        self.Hkv = num_heads if num_kv_heads is None else num_kv_heads
        self.D = head_dim or dim // num_heads
        self.fused, self.use_rope, self.causal = fused, use_rope, causal
        nq, nk = self.H * self.D, self.Hkv * self.D
        if fused:
            self.qkv = nn.Linear(dim, nq + 2 * nk, bias=bias)
        else:
            self.q_proj = nn.Linear(dim, nq, bias=bias)
            self.k_proj = nn.Linear(dim, nk, bias=bias)
            self.v_proj = nn.Linear(dim, nk, bias=bias)
        self.o_proj = nn.Linear(nq, dim, bias=False)
        # QK-Norm (RMSNorm over head_dim, then a gain): "shared" (D,) or "per_head" (heads, D)
        self.q_norm = self._gain(q_norm, self.H)
        self.k_norm = self._gain(k_norm, self.Hkv)
        self.qk_clip: QKClip | None = None
        self.clip_name = ""

    def _gain(self, kind: str | None, heads: int) -> nn.Parameter | None:
        if kind is None:
            return None
        shape = {"shared": (self.D,), "per_head": (heads, self.D)}[kind]
        return nn.Parameter(1.0 + 0.1 * torch.randn(shape))

    def register(self, qk_clip: QKClip, name: str, **kwargs: object) -> None:
        nq, nk = self.H * self.D, self.Hkv * self.D
        kwargs = dict(q_norm_weight=self.q_norm, k_norm_weight=self.k_norm) | kwargs
        if self.fused:
            w, b = self.qkv.weight, self.qkv.bias
            qk_clip.add_attention(
                name, w, w, self.H, self.D, self.Hkv, q_bias=b, k_bias=b,
                q_rows=slice(0, nq), k_rows=slice(nq, nq + nk), **kwargs,
            )  # fmt: skip
        else:
            qk_clip.add_attention(
                name, self.q_proj.weight, self.k_proj.weight, self.H, self.D, self.Hkv,
                q_bias=self.q_proj.bias, k_bias=self.k_proj.bias, **kwargs,
            )  # fmt: skip
        self.qk_clip, self.clip_name = qk_clip, name

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, S, _ = x.shape
        nq, nk = self.H * self.D, self.Hkv * self.D
        if self.fused:
            q, k, v = self.qkv(x).split([nq, nk, nk], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        # heads from the width: under tensor parallelism this rank's share of them
        q = q.view(B, S, -1, self.D).transpose(1, 2)
        k = k.view(B, S, -1, self.D).transpose(1, 2)
        v = v.view(B, S, -1, self.D).transpose(1, 2)
        if self.q_norm is not None:
            q = F.rms_norm(q, (self.D,), eps=1e-6) * self._per_head(self.q_norm)
        if self.k_norm is not None:
            k = F.rms_norm(k, (self.D,), eps=1e-6) * self._per_head(self.k_norm)
        if self.use_rope:
            q, k = rope(q), rope(k)
        return q, k, v

    @staticmethod
    def _per_head(g: torch.Tensor) -> torch.Tensor:
        return g[:, None, :] if g.ndim == 2 else g  # (H, 1, D) against (B, H, S, D)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, S, S) scaled logits, ``-inf`` on masked pairs."""
        q, k, _ = self.qkv_heads(x)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(self.D)
        if self.causal:
            s = s.masked_fill(~_causal_mask(x.shape[1], x.device), float("-inf"))
        return s

    def head_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, S, D): softmax(logits) @ v per head."""
        _, _, v = self.qkv_heads(x)
        v = v.repeat_interleave(self.H // v.shape[1], dim=1)
        return torch.softmax(self.logits(x), dim=-1) @ v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        q, k, v = self.qkv_heads(x)
        if self.qk_clip is not None and self.training:
            self.qk_clip.record(self.clip_name, q, k, causal=self.causal)
        G = q.shape[1] // k.shape[1]
        o = F.scaled_dot_product_attention(
            q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), is_causal=self.causal
        )
        return self.o_proj(o.transpose(1, 2).reshape(B, S, -1))


class ToyMLA(nn.Module):
    """DeepSeek-style multi-head latent attention (no q LoRA), causal, with a shared RoPE key.

    ``q_proj`` rows per head: ``[nope | rope]``; ``kv_a`` rows: ``[latent | k_rope (shared)]``;
    ``kv_b`` rows per head: ``[k_nope | v]``.
    """

    def __init__(
        self, dim: int, num_heads: int, nope_dim: int, rope_dim: int, v_dim: int, kv_rank: int
    ) -> None:
        super().__init__()
        self.H, self.dn, self.dr, self.dv, self.r = num_heads, nope_dim, rope_dim, v_dim, kv_rank
        self.q_proj = nn.Linear(dim, num_heads * (nope_dim + rope_dim), bias=False)
        self.kv_a = nn.Linear(dim, kv_rank + rope_dim, bias=False)
        self.kv_b = nn.Linear(kv_rank, num_heads * (nope_dim + v_dim), bias=False)
        self.o_proj = nn.Linear(num_heads * v_dim, dim, bias=False)
        self.qk_clip: QKClip | None = None
        self.clip_name = ""

    def register(self, qk_clip: QKClip, name: str, **kwargs: object) -> None:
        qk_clip.add_mla(
            name, self.q_proj.weight, self.kv_b.weight, self.q_proj.weight, self.kv_a.weight,
            self.H, self.dn, self.dr, **kwargs,
        )  # fmt: skip
        self.qk_clip, self.clip_name = qk_clip, name

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, S, _ = x.shape
        H, dn, dr, dv = self.H, self.dn, self.dr, self.dv
        q = self.q_proj(x).view(B, S, H, dn + dr).transpose(1, 2)
        q_c, q_r = q.split([dn, dr], dim=-1)
        c, k_r = self.kv_a(x).split([self.r, dr], dim=-1)
        kv = self.kv_b(c).view(B, S, H, dn + dv).transpose(1, 2)
        k_c, v = kv.split([dn, dv], dim=-1)
        k_r = rope(k_r[:, None])  # (B, 1, S, dr): one key shared by all heads
        q = torch.cat([q_c, rope(q_r)], dim=-1)
        k = torch.cat([k_c, k_r.expand(B, H, S, dr)], dim=-1)
        return q, k, v

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        q, k, _ = self.qkv_heads(x)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(self.dn + self.dr)
        return s.masked_fill(~_causal_mask(x.shape[1], x.device), float("-inf"))

    def head_outputs(self, x: torch.Tensor) -> torch.Tensor:
        _, _, v = self.qkv_heads(x)
        return torch.softmax(self.logits(x), dim=-1) @ v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        q, k, v = self.qkv_heads(x)
        if self.qk_clip is not None and self.training:
            self.qk_clip.record(self.clip_name, q, k, causal=True)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, self.H * self.dv))


class ToyLM(nn.Module):
    """Embedding → ``layers`` × (RMSNorm → attention, RMSNorm → MLP) → RMSNorm → head."""

    def __init__(
        self,
        vocab: int = 32,
        dim: int = 32,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        layers: int = 2,
        mla: bool = False,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.attn = nn.ModuleList(
            ToyMLA(dim, num_heads, dim // num_heads, 8, dim // num_heads, dim // 2)
            if mla
            else ToyAttention(dim, num_heads, num_kv_heads)
            for _ in range(layers)
        )
        self.mlp = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
            for _ in range(layers)
        )
        self.n1 = nn.ModuleList(nn.RMSNorm(dim) for _ in range(layers))
        self.n2 = nn.ModuleList(nn.RMSNorm(dim) for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def register(self, qk_clip: QKClip, **kwargs: object) -> None:
        for i, a in enumerate(self.attn):
            a.register(qk_clip, f"layer{i}", **kwargs)

    def attn_inputs(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """The normed input of each attention layer (for recomputing its logits)."""
        h, out = self.embed(tokens), []
        for a, m, n1, n2 in zip(self.attn, self.mlp, self.n1, self.n2, strict=True):
            out.append(n1(h))
            h = h + a(out[-1])
            h = h + m(n2(h))
        return out

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        for a, m, n1, n2 in zip(self.attn, self.mlp, self.n1, self.n2, strict=True):
            h = h + a(n1(h))
            h = h + m(n2(h))
        return self.head(self.norm(h))
