"""A tiny causal character-level transformer LM and its data, for the demo, notebooks and tests.

The corpus is real text that ships with every CPython: the Python Language Reference topics of
:mod:`pydoc_data.topics` (the text ``help("assert")`` prints, about 465k characters); where a
distribution strips ``pydoc_data``, the source code of a few stdlib modules is used instead. No
download is needed.

The attention calls ``QKClip.record`` (when a :class:`optim.QKClip` is registered) on the post-RoPE
queries and keys, so max-logits can be tracked and capped.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from optim import Muon, QKClip, muon_param_groups

__all__ = [
    "load_corpus",
    "CharTokenizer",
    "TinyTransformerLM",
    "TrainResult",
    "train_lm",
    "make_optimizer",
]


def load_corpus() -> tuple[str, str]:
    """The demo corpus and a one-line description of where it comes from."""
    try:
        from pydoc_data.topics import topics

        text = "\n\n".join(topics[k] for k in sorted(topics))
        return text, f"Python {_pyver()} Language Reference topics (pydoc_data.topics)"
    except ImportError:  # pragma: no cover - stripped distributions
        import inspect
        import json
        import textwrap

        mods = (textwrap, inspect, json)
        text = "\n\n".join(inspect.getsource(m) for m in mods)
        return text, "source of the stdlib modules textwrap, inspect, json"


def _pyver() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


class CharTokenizer:
    """Characters ↔ ids; the vocabulary is the sorted set of characters of ``text``."""

    def __init__(self, text: str) -> None:
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        """Number of distinct characters."""
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        """int64 ids of ``text`` (characters outside the vocabulary raise ``KeyError``)."""
        return torch.tensor([self.index[c] for c in text], dtype=torch.int64)

    def decode(self, ids: torch.Tensor) -> str:
        """The text of a 1-D id tensor."""
        return "".join(self.chars[int(i)] for i in ids)


def rope(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding (rotate-half form) of ``x`` shaped ``(B, H, S, D)``, D even."""
    S, D = x.shape[-2], x.shape[-1]
    inv = base ** (-torch.arange(0, D, 2, dtype=torch.float32, device=x.device) / D)
    ang = torch.arange(S, dtype=torch.float32, device=x.device)[:, None] * inv[None, :]
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(x.dtype)
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(x.dtype)
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with RoPE and separate q/k/v projections (no bias)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads or (dim // num_heads) % 2:
            raise ValueError(f"`dim` ({dim}) must be num_heads ({num_heads}) × an even head_dim")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.qk_clip: Any = None
        self.clip_name = ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, S, dim) → (B, S, dim)``; records max-logits while training."""
        B, S, _ = x.shape
        H, D = self.num_heads, self.head_dim
        q = rope(self.q_proj(x).view(B, S, H, D).transpose(1, 2))
        k = rope(self.k_proj(x).view(B, S, H, D).transpose(1, 2))
        v = self.v_proj(x).view(B, S, H, D).transpose(1, 2)
        if self.qk_clip is not None and self.training:
            self.qk_clip.record(self.clip_name, q, k, causal=True)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, H * D))


class Block(nn.Module):
    """Pre-norm transformer block: RMSNorm → attention, RMSNorm → MLP (4×, GELU)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(dim)
        self.attn = CausalSelfAttention(dim, num_heads)
        self.norm2 = nn.RMSNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual attention then residual MLP."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyTransformerLM(nn.Module):
    """Token embedding → ``layers`` blocks → RMSNorm → linear head (a causal LM)."""

    def __init__(self, vocab_size: int, dim: int = 64, num_heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(Block(dim, num_heads) for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)

    def register_qk_clip(self, qk_clip: Any) -> None:
        """Register every attention layer with ``qk_clip`` (names ``layer0``, ``layer1``, …)."""
        for i, blk in enumerate(self.blocks):
            a = blk.attn
            qk_clip.add_attention(
                f"layer{i}", a.q_proj.weight, a.k_proj.weight, a.num_heads, a.head_dim
            )
            a.qk_clip, a.clip_name = qk_clip, f"layer{i}"

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, S, vocab)`` for int64 ``tokens`` ``(B, S)``."""
        h = self.embed(tokens)
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.norm(h))


@dataclass
class TrainResult:
    """Per-step curves of one training run."""

    name: str
    loss: list[float] = field(default_factory=list)
    max_logit: list[float] = field(default_factory=list)
    val_loss: float = math.nan
    seconds: float = 0.0
    clipped_steps: int = 0


def make_optimizer(
    kind: str, model: nn.Module, *, lr: float | None = None, adamw_lr: float = 3e-3
) -> torch.optim.Optimizer:
    """The optimizer of a demo run: ``"adamw"`` or ``"muon"``.

    ``"adamw"`` is ``torch.optim.AdamW`` (lr 3e-3, betas (0.9, 0.95), no weight decay);
    ``"muon"`` is :class:`optim.Muon` (lr 0.02) on the hidden matrices with its built-in AdamW
    (``adamw_lr``) for the embedding, the head, norms and biases (:func:`optim.muon_param_groups`).
    """
    if kind == "adamw":
        return torch.optim.AdamW(
            model.parameters(),
            lr=adamw_lr if lr is None else lr,
            betas=(0.9, 0.95),
            weight_decay=0.0,
        )
    if kind == "muon":
        return Muon(
            muon_param_groups(model),
            lr=0.02 if lr is None else lr,
            weight_decay=0.0,
            adamw_lr=adamw_lr,
            adjust_lr_fn="original",
        )
    raise ValueError(f"`kind` must be 'adamw' or 'muon', got {kind!r}")


def _batch(
    data: torch.Tensor, batch: int, seq: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    ix = torch.randint(0, data.numel() - seq - 1, (batch,), generator=gen)
    x = torch.stack([data[i : i + seq] for i in ix.tolist()])
    y = torch.stack([data[i + 1 : i + seq + 1] for i in ix.tolist()])
    return x, y


def train_lm(
    name: str,
    optimizer: str,
    *,
    steps: int = 300,
    qk_clip_tau: float | None = None,
    watch_tau: float = 100.0,
    dim: int = 64,
    num_heads: int = 4,
    layers: int = 2,
    batch: int = 32,
    seq: int = 64,
    lr: float | None = None,
    seed: int = 0,
    text: str | None = None,
    device: str | torch.device = "cpu",
    callback: Callable[[int, float, float], None] | None = None,
) -> TrainResult:
    """Train a :class:`TinyTransformerLM` on the demo corpus; returns loss and max-logit curves.

    Parameters
    ----------
    name : str
        Label of the run.
    optimizer : {"adamw", "muon"}
        See :func:`make_optimizer`.
    steps : int
        Optimizer steps.
    qk_clip_tau : float, optional
        Cap the max-logit at this τ with :class:`optim.QKClip`; ``None`` only watches it (a
        ``log_only`` QKClip records the max-logit of every step either way).
    watch_tau : float
        τ of the watching (log-only) QKClip; only reported, never applied.
    dim, num_heads, layers, batch, seq, lr, seed
        Model size, batch shape, learning rate (optimizer default if ``None``) and RNG seed
        (same initial weights and batches for every optimizer).
    text : str, optional
        Corpus (default :func:`load_corpus`); the last 10% is held out for ``val_loss``.
    device : str or torch.device
        Where the model trains (batches are drawn on the CPU, then moved).
    callback : callable, optional
        ``callback(step, loss, max_logit)`` after each step (progress bars).
    """
    if text is None:
        text, _ = load_corpus()
    tok = CharTokenizer(text)
    data = tok.encode(text)
    split = int(0.9 * data.numel())
    train, val = data[:split], data[split:]
    torch.manual_seed(seed)
    model = TinyTransformerLM(tok.vocab_size, dim, num_heads, layers).to(device)
    opt = make_optimizer(optimizer, model, lr=lr)
    clip = qk_clip_tau is not None
    qk = QKClip(tau=qk_clip_tau if clip else watch_tau, log_only=not clip)
    model.register_qk_clip(qk)
    qk.attach(opt)
    gen = torch.Generator().manual_seed(seed)
    res = TrainResult(name)
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        x, y = (t.to(device) for t in _batch(train, batch, seq, gen))
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()  # the QKClip hook clips (or only logs) and saves this step's statistics
        stats = qk.last_stats()
        ml = max(float(s["max_logits"].max()) for s in stats.values())
        res.clipped_steps += int(any(bool(s["clipped"].any()) for s in stats.values()))
        res.loss.append(float(loss.detach()))
        res.max_logit.append(ml)
        if callback is not None:
            callback(step, res.loss[-1], ml)
    res.seconds = time.perf_counter() - t0
    model.eval()
    vgen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        losses = [
            float(F.cross_entropy(model(x).flatten(0, 1), y.flatten()))
            for x, y in ((t.to(device) for t in _batch(val, batch, seq, vgen)) for _ in range(8))
        ]
    res.val_loss = sum(losses) / len(losses)
    return res
