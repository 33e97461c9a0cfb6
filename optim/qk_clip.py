r"""QK-Clip: cap the attention max-logit by rescaling query/key projections after each step.

Usage (any ``nn.Module``, any ``torch.optim.Optimizer``)::

    qk = QKClip(tau=100.0)
    for i, blk in enumerate(model.blocks):
        qk.add_attention(f"layer{i}", blk.q_proj.weight, blk.k_proj.weight,
                         num_heads=H, head_dim=D, num_kv_heads=H_kv)
    qk.attach(optimizer)              # clips after every optimizer.step(), then resets stats
    # inside the attention forward, on post-RoPE q (B, H, S, D) and k (B, H_kv, S, D):
    #     if self.training: qk.record("layer3", q, k, causal=True)

The math is docs/math.md §6 (Su, "QK-Clip", kexue.fm/archives/11126; Megatron-LM's
``clip_qk``). Per head ``h`` the max-logit ``S_h`` is the signed max of the logits fed to softmax
(``scale · q·k`` over unmasked pairs, over every micro-batch of the step and, under
``torch.distributed``, over ranks by an all-reduce MAX). With ``γ_h = min(1, τ / S_h)``:

===================================  ==========================================================
attention                            rescaling after ``optimizer.step()``
===================================  ==========================================================
MHA (one key head per query head)    ``W_q^h ← γ_h^α W_q^h``, ``W_k^h ← γ_h^(1−α) W_k^h``
GQA / MQA (key head shared by G>1)   ``W_q^h ← γ_h W_q^h``; the shared key head is untouched, so
                                     the other heads of its group keep their logits
                                     (``gqa="group"``: Megatron's rule, the group's min γ with
                                     the α split on q and on the shared k)
MLA                                  ``W_qc^h ← γ^α``, ``W_kc^h ← γ^(1−α)``, ``W_qr^h ← γ``;
                                     the shared RoPE key ``W_kr`` untouched
===================================  ==========================================================

Bias rule: ``q = x W_qᵀ + b_q``, so the rows of ``b_q`` (and ``b_k``) are scaled with their
weight rows; the logit of head ``h`` then scales by exactly ``γ_h``. RoPE is linear, so it
commutes with the scaling. Heads with ``S_h ≤ τ`` (and non-finite ``S_h``: a NaN/Inf max is a
numerical failure that clipping cannot fix, so it is logged and left alone) are never written
to, so their outputs stay bit-identical. Optimizer states (momentum, Adam moments) are not
touched (Su, 11126). ``γ`` comes from this step's forward (pre-update weights) and is applied
to the post-update weights, so the next step's max-logit is ≤ τ only approximately.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .max_logit import check_qk, max_logits

__all__ = ["QKClip", "max_logits"]

RowSpec = slice | Sequence[int] | torch.Tensor | None


# --------------------------------------------------------------------------- registry


@dataclass
class _Part:
    """Rows of one projection that belong to each head: ``rows[h]`` are head h's rows."""

    role: str  # "q", "k", "q_nope", "k_nope", "q_rope"
    weight: torch.Tensor
    bias: torch.Tensor | None
    rows: torch.Tensor  # (heads_of_part, rows_per_head) int64 on the weight's device
    out_dim: int


@dataclass
class _Attention:
    kind: Literal["mha", "mla"]
    num_heads: int
    num_kv_heads: int
    parts: list[_Part]
    gqa: Literal["per_head", "group"]
    alpha: float | None
    stats: torch.Tensor  # (num_heads,) float32 running max
    frozen: list[torch.Tensor] = field(default_factory=list)  # shared k_rope: never written


def _check_param(t: object, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor (a Parameter), got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"`{name}` must have a floating dtype, got {t.dtype}")
    if t.ndim != 2:
        raise ValueError(f"`{name}` must be a 2-D weight, got shape {tuple(t.shape)}")
    return t


def _rows(
    spec: RowSpec, size: int, heads: int, per_head: int, name: str, device: torch.device
) -> torch.Tensor:
    n = heads * per_head
    if spec is None:
        idx = torch.arange(size)
    elif isinstance(spec, slice):
        idx = torch.arange(size)[spec]
    else:
        idx = torch.as_tensor(spec)
        if idx.dtype in (torch.bool,) or idx.is_floating_point() or idx.ndim != 1:
            raise TypeError(f"`{name}` must be a slice or a 1-D sequence of int row indices")
        idx = idx.to(torch.int64).cpu()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= size):
            raise ValueError(f"`{name}` holds row indices outside [0, {size})")
    if idx.numel() != n:
        raise ValueError(
            f"`{name}` selects {idx.numel()} rows, expected heads·head_dim = {heads}·{per_head}"
            f" = {n} (weight has {size} output rows)"
        )
    if torch.unique(idx).numel() != n:
        raise ValueError(f"`{name}` selects some rows twice")
    return idx.view(heads, per_head).to(device)


def _check_bias(b: object, weight: torch.Tensor, out_dim: int, name: str) -> torch.Tensor | None:
    if b is None:
        return None
    if not isinstance(b, torch.Tensor) or not b.is_floating_point():
        raise TypeError(f"`{name}` must be a floating torch.Tensor or None")
    if b.ndim != 1 or b.shape[0] != weight.shape[out_dim]:
        raise ValueError(
            f"`{name}` must have shape ({weight.shape[out_dim]},) to match its weight's output "
            f"rows, got {tuple(b.shape)}"
        )
    return b


def _scale_rows(t: torch.Tensor, rows: torch.Tensor, factors: torch.Tensor, out_dim: int) -> None:
    """``t[rows] *= factors`` along the output dim, in float32 or better, cast back once."""
    view = t.transpose(0, 1) if (t.ndim == 2 and out_dim == 1) else t
    cdt = torch.promote_types(t.dtype, torch.float32)
    sel = view[rows]
    f = factors.to(device=t.device, dtype=cdt).view(-1, *([1] * (sel.ndim - 1)))
    view[rows] = (sel.to(cdt) * f).to(t.dtype)


# --------------------------------------------------------------------------- QKClip


class QKClip:
    r"""Cap per-head attention max-logits at ``tau`` by rescaling W_q/W_k after each step.

    Parameters
    ----------
    tau : float
        The threshold τ > 0 on the max-logit (K2 used 100; small models tolerate 30).
    alpha : float
        The q/k split α ∈ [0, 1] where the key head is per query head: ``W_q ← γ^α W_q``,
        ``W_k ← γ^(1−α) W_k``. Default 0.5 (Su's √γ on each side).
    log_only : bool
        Record, reduce and report the statistics (``last_stats()``) but never change a weight.
    use_abs : bool
        Track ``max |logit|`` (Su's definition) instead of the signed max (K2, Megatron).
    distributed : bool, optional
        All-reduce (MAX) the statistics over ``process_group`` before clipping. ``None``: when
        ``torch.distributed`` is initialised. Every rank must register the same attentions in the
        same order and call ``clip_`` together (``attach`` does).
    process_group : optional
        The group to reduce over (data/sequence/context-parallel ranks); default WORLD.

    Notes
    -----
    The statistic of head ``h`` is the running max, over every ``record`` call since the last
    clip (micro-batches, activation-checkpoint recomputations), of the logits fed to softmax.
    ``clip_`` (run by the step post-hook that ``attach`` registers) computes
    ``γ_h = min(1, τ/S_h)``, rescales as in the module docstring, saves the statistics for
    ``last_stats()`` and resets them. Cost per step: one host sync and, for clipped heads only,
    one read-modify-write of their rows.

    Pickling or ``copy.deepcopy`` of an optimizer drops its step hooks (and a QKClip refers to
    the parameters of one model): after loading a checkpoint build the model, the optimizer and a
    QKClip, ``load_state_dict`` each, then call ``attach`` again.

    Sharded parameters (FSDP/DTensor, tensor-parallel heads) are not supported: register the
    full local weights (e.g. DDP replicas or fp32 master weights).

    References
    ----------
    Su Jianlin, "QK-Clip: 让Muon在Scaleup之路上更进一步", https://kexue.fm/archives/11126 (2025).
    Kimi Team, "Kimi K2: Open Agentic Intelligence", arXiv:2507.20534 (MuonClip).

    Examples
    --------
    >>> lin_q, lin_k = torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False)
    >>> qk = QKClip(tau=1.0)
    >>> qk.add_attention("attn", lin_q.weight, lin_k.weight, num_heads=2, head_dim=4)
    >>> x = torch.randn(1, 5, 8)
    >>> q = (10 * lin_q(x)).view(1, 5, 2, 4).transpose(1, 2)
    >>> k = lin_k(x).view(1, 5, 2, 4).transpose(1, 2)
    >>> qk.record("attn", q, k)
    >>> _ = qk.clip_()
    >>> sorted(qk.last_stats()["attn"])
    ['clipped', 'gamma', 'max_logits']
    """

    def __init__(
        self,
        tau: float = 100.0,
        *,
        alpha: float = 0.5,
        log_only: bool = False,
        use_abs: bool = False,
        distributed: bool | None = None,
        process_group: Any = None,
    ) -> None:
        self.tau = tau
        self.alpha = alpha
        self.log_only = bool(log_only)
        self.use_abs = bool(use_abs)
        self.distributed = distributed
        self.process_group = process_group
        self.num_clips = 0
        self._attn: dict[str, _Attention] = {}
        self._last: dict[str, dict[str, torch.Tensor]] = {}
        self._handles: list[Any] = []

    # -- validated settings ----------------------------------------------------------
    @property
    def tau(self) -> float:
        """The max-logit threshold τ > 0."""
        return self._tau

    @tau.setter
    def tau(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"`tau` must be a number, got {type(value).__name__}")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"`tau` must be finite and > 0, got {value}")
        self._tau = float(value)

    @property
    def alpha(self) -> float:
        """The q/k split α ∈ [0, 1] (q gets γ^α, k gets γ^(1−α))."""
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._alpha = self._check_alpha(value)

    @staticmethod
    def _check_alpha(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"`alpha` must be a number, got {type(value).__name__}")
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"`alpha` must lie in [0, 1], got {value}")
        return float(value)

    # -- registration ----------------------------------------------------------------
    def _new_name(self, name: str) -> str:
        if not isinstance(name, str) or not name:
            raise TypeError(f"`name` must be a non-empty str, got {name!r}")
        if name in self._attn:
            raise ValueError(f"`name` {name!r} is already registered")
        return name

    def add_attention(
        self,
        name: str,
        q_weight: torch.Tensor,
        k_weight: torch.Tensor,
        num_heads: int,
        head_dim: int,
        num_kv_heads: int | None = None,
        *,
        q_bias: torch.Tensor | None = None,
        k_bias: torch.Tensor | None = None,
        q_rows: RowSpec = None,
        k_rows: RowSpec = None,
        out_dim: int = 0,
        alpha: float | None = None,
        gqa: Literal["per_head", "group"] = "per_head",
    ) -> None:
        """Register an MHA / GQA / MQA attention layer.

        Parameters
        ----------
        name : str
            The key used by ``record`` and in the statistics.
        q_weight, k_weight : torch.Tensor
            The query and key projection weights (the same tensor for a fused QKV projection).
            Output features along ``out_dim``, head-major: row ``h·head_dim + d`` of the selected
            rows is component ``d`` of head ``h``.
        num_heads, head_dim : int
            Query heads and the per-head width.
        num_kv_heads : int, optional
            Key heads (default ``num_heads``); ``num_heads % num_kv_heads == 0``.
        q_bias, k_bias : torch.Tensor, optional
            Biases; their rows are scaled with the weight rows (``q = xWᵀ + b``).
        q_rows, k_rows : slice or sequence of int or Tensor, optional
            Which output rows hold q (k), in head-major order; default all rows. For a fused
            ``[Q | K | V]`` Linear: ``q_rows=slice(0, H·D)``, ``k_rows=slice(H·D, (H+H_kv)·D)``;
            for interleaved layouts pass explicit indices.
        out_dim : int
            The weight's output-feature dim: 0 for ``nn.Linear`` (out, in), 1 for (in, out).
        alpha : float, optional
            Per-layer override of the q/k split.
        gqa : {"per_head", "group"}
            With shared key heads: ``"per_head"`` (default) puts the whole γ_h on query head h
            and leaves the key head alone, so heads below τ are untouched; ``"group"`` is
            Megatron-LM's rule (group min γ, split by α between q and the shared k).

        Raises
        ------
        TypeError, ValueError
            Bad names, shapes, row selections, overlapping q/k rows, or settings.
        """
        name = self._new_name(name)
        H, D, Hkv = self._check_heads(num_heads, head_dim, num_kv_heads)
        if out_dim not in (0, 1):
            raise ValueError(f"`out_dim` must be 0 or 1, got {out_dim}")
        if gqa not in ("per_head", "group"):
            raise ValueError(f"`gqa` must be 'per_head' or 'group', got {gqa!r}")
        if alpha is not None:
            alpha = self._check_alpha(alpha)
        qw, kw = _check_param(q_weight, "q_weight"), _check_param(k_weight, "k_weight")
        qb = _check_bias(q_bias, qw, out_dim, "q_bias")
        kb = _check_bias(k_bias, kw, out_dim, "k_bias")
        qr = _rows(q_rows, qw.shape[out_dim], H, D, "q_rows", qw.device)
        kr = _rows(k_rows, kw.shape[out_dim], Hkv, D, "k_rows", kw.device)
        parts = [_Part("q", qw, qb, qr, out_dim), _Part("k", kw, kb, kr, out_dim)]
        self._check_disjoint(parts)
        self._attn[name] = _Attention(
            "mha", H, Hkv, parts, gqa, alpha, self._fresh_stats(H, qw.device)
        )

    def add_mla(
        self,
        name: str,
        q_nope_weight: torch.Tensor,
        k_nope_weight: torch.Tensor,
        q_rope_weight: torch.Tensor,
        k_rope_weight: torch.Tensor | None,
        num_heads: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        *,
        q_nope_rows: RowSpec = None,
        k_nope_rows: RowSpec = None,
        q_rope_rows: RowSpec = None,
        q_nope_bias: torch.Tensor | None = None,
        k_nope_bias: torch.Tensor | None = None,
        q_rope_bias: torch.Tensor | None = None,
        out_dim: int = 0,
        alpha: float | None = None,
    ) -> None:
        """Register a multi-head latent attention (MLA) layer (DeepSeek-V2/V3, Kimi K2).

        The logit of head h is ``q_c^h·k_c^h + q_r^h·k_r`` (times the scale): ``q_c``, ``k_c``
        (no RoPE) and ``q_r`` are per head, the RoPE key ``k_r`` is shared by all heads. After
        a step, ``W_qc^h ← γ^α``, ``W_kc^h ← γ^(1−α)``, ``W_qr^h ← γ`` and ``W_kr`` is never
        touched, so the logit of head h scales by γ_h and no other head changes.

        Parameters
        ----------
        name : str
            The key used by ``record``.
        q_nope_weight, q_rope_weight : torch.Tensor
            Query up-projection(s). When they are the same tensor (DeepSeek's ``q_b_proj`` /
            ``q_proj``) the default layout is, per head, ``nope`` rows then ``rope`` rows.
        k_nope_weight : torch.Tensor
            The key up-projection (DeepSeek's ``kv_b_proj``). If it has more than
            ``num_heads·qk_nope_head_dim`` rows, the default layout is, per head, the
            ``qk_nope_head_dim`` key rows first, then the value rows.
        k_rope_weight : torch.Tensor or None
            The shared RoPE key projection (e.g. ``kv_a_proj_with_mqa``); never modified, only
            kept to refuse overlaps.
        num_heads, qk_nope_head_dim, qk_rope_head_dim : int
            Heads and the widths of the two parts.
        q_nope_rows, k_nope_rows, q_rope_rows : optional
            Explicit head-major row selections (as in ``add_attention``) for other layouts.
        q_nope_bias, k_nope_bias, q_rope_bias : torch.Tensor, optional
            Biases of the corresponding weights, scaled with their rows.
        out_dim : int
            0 for ``nn.Linear`` weights (out, in), 1 for (in, out).
        alpha : float, optional
            Per-layer override of the split between ``q_c`` and ``k_c``.
        """
        name = self._new_name(name)
        H, dn, _ = self._check_heads(num_heads, qk_nope_head_dim, None)
        if isinstance(qk_rope_head_dim, bool) or not isinstance(qk_rope_head_dim, int):
            raise TypeError("`qk_rope_head_dim` must be an int")
        dr = qk_rope_head_dim
        if dr < 1:
            raise ValueError(f"`qk_rope_head_dim` must be >= 1, got {dr}")
        if out_dim not in (0, 1):
            raise ValueError(f"`out_dim` must be 0 or 1, got {out_dim}")
        if alpha is not None:
            alpha = self._check_alpha(alpha)
        qn = _check_param(q_nope_weight, "q_nope_weight")
        kn = _check_param(k_nope_weight, "k_nope_weight")
        qr = _check_param(q_rope_weight, "q_rope_weight")
        kr = None if k_rope_weight is None else _check_param(k_rope_weight, "k_rope_weight")
        per = torch.arange(H)[:, None]
        if qn is qr and q_nope_rows is None and q_rope_rows is None:
            if qn.shape[out_dim] != H * (dn + dr):
                raise ValueError(
                    f"fused `q_nope_weight`/`q_rope_weight` must have num_heads·(nope+rope) = "
                    f"{H * (dn + dr)} output rows, got {qn.shape[out_dim]}"
                )
            q_nope_rows = (per * (dn + dr) + torch.arange(dn)).flatten()
            q_rope_rows = (per * (dn + dr) + dn + torch.arange(dr)).flatten()
        if k_nope_rows is None and kn.shape[out_dim] != H * dn:
            if kn.shape[out_dim] % H or kn.shape[out_dim] // H <= dn:
                raise ValueError(
                    f"`k_nope_weight` has {kn.shape[out_dim]} output rows: expected "
                    f"num_heads·qk_nope_head_dim = {H * dn} or num_heads·(qk_nope_head_dim + "
                    "v_head_dim); pass `k_nope_rows` for other layouts"
                )
            k_nope_rows = (per * (kn.shape[out_dim] // H) + torch.arange(dn)).flatten()
        parts = [
            _Part("q_nope", qn, _check_bias(q_nope_bias, qn, out_dim, "q_nope_bias"),
                  _rows(q_nope_rows, qn.shape[out_dim], H, dn, "q_nope_rows", qn.device), out_dim),
            _Part("k_nope", kn, _check_bias(k_nope_bias, kn, out_dim, "k_nope_bias"),
                  _rows(k_nope_rows, kn.shape[out_dim], H, dn, "k_nope_rows", kn.device), out_dim),
            _Part("q_rope", qr, _check_bias(q_rope_bias, qr, out_dim, "q_rope_bias"),
                  _rows(q_rope_rows, qr.shape[out_dim], H, dr, "q_rope_rows", qr.device), out_dim),
        ]  # fmt: skip
        self._check_disjoint(parts)
        if kr is not None and any(p.weight is kr for p in parts):
            raise ValueError(
                "`k_rope_weight` (the shared RoPE key) must not be one of the per-head weights; "
                "register only the rows of its own projection"
            )
        self._attn[name] = _Attention(
            "mla", H, 1, parts, "per_head", alpha, self._fresh_stats(H, qn.device),
            frozen=[] if kr is None else [kr],
        )  # fmt: skip

    @staticmethod
    def _check_heads(
        num_heads: int, head_dim: int, num_kv_heads: int | None
    ) -> tuple[int, int, int]:
        for nm, v in (("num_heads", num_heads), ("head_dim", head_dim)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"`{nm}` must be an int, got {type(v).__name__}")
            if v < 1:
                raise ValueError(f"`{nm}` must be >= 1, got {v}")
        Hkv = num_heads if num_kv_heads is None else num_kv_heads
        if isinstance(Hkv, bool) or not isinstance(Hkv, int):
            raise TypeError(f"`num_kv_heads` must be an int, got {type(Hkv).__name__}")
        if Hkv < 1 or num_heads % Hkv:
            raise ValueError(
                f"`num_kv_heads` must be >= 1 and divide num_heads={num_heads}, got {Hkv}"
            )
        return num_heads, head_dim, Hkv

    @staticmethod
    def _check_disjoint(parts: list[_Part]) -> None:
        for a in range(len(parts)):
            for b in range(a + 1, len(parts)):
                pa, pb = parts[a], parts[b]
                if pa.weight is pb.weight and bool(
                    torch.isin(pa.rows.flatten(), pb.rows.flatten()).any()
                ):
                    raise ValueError(
                        f"the {pa.role} and {pb.role} rows of a fused weight overlap; pass "
                        "disjoint row selections"
                    )

    @staticmethod
    def _fresh_stats(H: int, device: torch.device) -> torch.Tensor:
        return torch.full((H,), float("-inf"), dtype=torch.float32, device=device)

    def names(self) -> list[str]:
        """Registered attention names, in registration order."""
        return list(self._attn)

    def __contains__(self, name: object) -> bool:
        return name in self._attn

    def __iter__(self) -> Iterator[str]:
        return iter(self._attn)

    # -- statistics ------------------------------------------------------------------
    def _get(self, name: str) -> _Attention:
        try:
            return self._attn[name]
        except (KeyError, TypeError):
            raise KeyError(f"no attention registered as {name!r}; known: {self.names()}") from None

    def record(
        self,
        name: str,
        q: torch.Tensor,
        k: torch.Tensor,
        causal: bool = True,
        scale: float | None = None,
    ) -> None:
        """Fold a forward pass's logits into head-wise running max of ``name``.

        Call inside the attention forward (training only) on the tensors given to softmax
        attention: post-RoPE ``q`` of shape ``(batch, num_heads, seq, head_dim)`` and ``k`` of
        shape ``(batch, num_kv_heads, seq, head_dim)``. ``scale`` defaults to ``1/√head_dim``
        as in ``scaled_dot_product_attention``. No gradient; see :func:`max_logits` for cost.
        For MLA, ``q``/``k`` are the concatenated ``[nope | rope]`` per-head tensors with the
        shared ``k_r`` broadcast to every head (or ``num_kv_heads = 1``).
        """
        attn = self._get(name)
        q, k = check_qk(q, k)
        if q.shape[1] != attn.num_heads:
            raise ValueError(
                f"`q` has {q.shape[1]} heads but {name!r} was registered with "
                f"num_heads={attn.num_heads}"
            )
        if attn.kind == "mha" and k.shape[1] != attn.num_kv_heads:
            raise ValueError(
                f"`k` has {k.shape[1]} heads but {name!r} was registered with "
                f"num_kv_heads={attn.num_kv_heads}"
            )
        m = max_logits(q, k, causal=causal, scale=scale, use_abs=self.use_abs)
        self._fold(attn, m)

    def record_max_logits(self, name: str, per_head_max: torch.Tensor) -> None:
        """Fold a per-head max-logit ``(num_heads,)`` computed elsewhere (e.g. by a kernel)."""
        attn = self._get(name)
        if not isinstance(per_head_max, torch.Tensor) or not per_head_max.is_floating_point():
            raise TypeError("`per_head_max` must be a floating torch.Tensor")
        if per_head_max.shape != (attn.num_heads,):
            raise ValueError(
                f"`per_head_max` must have shape ({attn.num_heads},), got "
                f"{tuple(per_head_max.shape)}"
            )
        self._fold(attn, per_head_max.detach())

    @staticmethod
    def _fold(attn: _Attention, m: torch.Tensor) -> None:
        m = m.to(device=attn.stats.device, dtype=attn.stats.dtype)
        torch.maximum(attn.stats, m, out=attn.stats)

    def max_logits(self) -> dict[str, torch.Tensor]:
        """The running per-head max-logits since the last clip (copies; ``-inf``: not seen)."""
        return {n: a.stats.clone() for n, a in self._attn.items()}

    def reset(self) -> None:
        """Forget the running statistics (``clip_`` does this after every step)."""
        for a in self._attn.values():
            a.stats.fill_(float("-inf"))

    def last_stats(self) -> dict[str, dict[str, torch.Tensor]]:
        """What the last ``clip_`` saw and did, per attention, as CPU tensors of shape (H,).

        ``max_logits`` (the reduced statistic, ``-inf`` if never recorded), ``gamma`` (the
        factor γ = min(1, τ/S) that was applied, or would have been in log-only mode) and
        ``clipped`` (bool: the head's weights were rescaled).
        """
        return {n: dict(d) for n, d in self._last.items()}

    # -- distributed -----------------------------------------------------------------
    def _reduce(self) -> None:
        dist = torch.distributed
        on = self.distributed
        if on is None:
            on = dist.is_available() and dist.is_initialized()
        if not on or not self._attn:
            return
        by_device: dict[torch.device, list[_Attention]] = {}
        for a in self._attn.values():
            by_device.setdefault(a.stats.device, []).append(a)
        for attns in by_device.values():
            flat = torch.cat([a.stats for a in attns])
            dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=self.process_group)
            for a, s in zip(attns, flat.split([a.num_heads for a in attns]), strict=True):
                a.stats.copy_(s)

    # -- clipping --------------------------------------------------------------------
    def _factors(self, attn: _Attention, gamma: torch.Tensor) -> dict[str, torch.Tensor]:
        a = self.alpha if attn.alpha is None else attn.alpha
        if attn.kind == "mla":
            return {"q_nope": gamma**a, "k_nope": gamma ** (1 - a), "q_rope": gamma}
        G = attn.num_heads // attn.num_kv_heads
        if G == 1:
            return {"q": gamma**a, "k": gamma ** (1 - a)}
        if attn.gqa == "per_head":
            return {"q": gamma}
        g = gamma.view(attn.num_kv_heads, G).amin(dim=1)
        return {"q": (g**a).repeat_interleave(G), "k": g ** (1 - a)}

    def _to_host(self) -> dict[str, torch.Tensor]:
        """All statistics as float64 CPU tensors, with one device-to-host copy per device."""
        by_device: dict[torch.device, list[str]] = {}
        for n, a in self._attn.items():
            by_device.setdefault(a.stats.device, []).append(n)
        host: dict[str, torch.Tensor] = {}
        for names in by_device.values():
            flat = torch.cat([self._attn[n].stats for n in names]).to("cpu", torch.float64)
            sizes = [self._attn[n].num_heads for n in names]
            host.update(zip(names, flat.split(sizes), strict=True))
        return host

    @torch.no_grad()
    def clip_(self) -> dict[str, dict[str, torch.Tensor]]:
        """Reduce the statistics, rescale the heads over τ, save ``last_stats``, reset.

        Returns
        -------
        dict
            ``last_stats()``.
        """
        self._reduce()
        host = self._to_host()
        last: dict[str, dict[str, torch.Tensor]] = {}
        for n, attn in self._attn.items():
            S = host[n]
            over = torch.isfinite(S) & (S > self.tau)
            gamma = torch.where(over, self.tau / S, torch.ones_like(S))
            clipped = over if not self.log_only else torch.zeros_like(over)
            if bool(clipped.any()):
                facs = self._factors(attn, gamma)
                for p in attn.parts:
                    f = facs.get(p.role)
                    if f is None:
                        continue
                    touch = f < 1
                    if not bool(touch.any()):
                        continue
                    rows = p.rows[touch.to(p.rows.device)]
                    fr = f[touch].repeat_interleave(rows.shape[1])
                    rows = rows.flatten()
                    _scale_rows(p.weight.data, rows, fr, p.out_dim)
                    if p.bias is not None:
                        _scale_rows(p.bias.data, rows, fr, 0)
            last[n] = {
                "max_logits": S.float(),
                "gamma": gamma.float(),
                "clipped": clipped,
            }
        self._last = last
        self.num_clips += 1
        self.reset()
        return self.last_stats()

    # -- optimizer hook ------------------------------------------------------------------
    def attach(self, optimizer: torch.optim.Optimizer) -> Any:
        """Run ``clip_`` after every ``optimizer.step()`` (a step post-hook).

        Re-call after ``copy.deepcopy``/unpickling an optimizer: hooks are not saved.

        Returns
        -------
        torch.utils.hooks.RemovableHandle
            ``.remove()`` detaches it.
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"`optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        handle = optimizer.register_step_post_hook(lambda opt, args, kwargs: self.clip_())
        self._handles.append(handle)
        return handle

    def detach(self) -> None:
        """Remove every hook registered by ``attach``."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # -- state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Settings and running statistics (CPU copies); the weights belong to the model."""
        return {
            "tau": self.tau,
            "alpha": self.alpha,
            "log_only": self.log_only,
            "use_abs": self.use_abs,
            "num_clips": self.num_clips,
            "layer_alpha": {n: a.alpha for n, a in self._attn.items()},
            "stats": {n: a.stats.detach().cpu().clone() for n, a in self._attn.items()},
            "last": {n: {k: v.clone() for k, v in d.items()} for n, d in self._last.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore ``state_dict()``; the same attention names must be registered first."""
        stats = state_dict["stats"]
        if set(stats) != set(self._attn):
            raise ValueError(
                "`state_dict` holds attentions "
                f"{sorted(stats)} but this QKClip has {sorted(self._attn)}; register the same "
                "names before loading"
            )
        for n, s in stats.items():
            if tuple(s.shape) != (self._attn[n].num_heads,):
                raise ValueError(
                    f"`state_dict` stats for {n!r} have shape {tuple(s.shape)}, expected "
                    f"({self._attn[n].num_heads},)"
                )
        self.tau = state_dict["tau"]
        self.alpha = state_dict["alpha"]
        self.log_only = bool(state_dict["log_only"])
        self.use_abs = bool(state_dict["use_abs"])
        self.num_clips = int(state_dict.get("num_clips", 0))
        for n, a in state_dict.get("layer_alpha", {}).items():
            self._attn[n].alpha = None if a is None else self._check_alpha(a)
        for n, s in stats.items():
            self._attn[n].stats.copy_(s)
        self._last = {
            n: {k: v.clone() for k, v in d.items()} for n, d in state_dict.get("last", {}).items()
        }

    def __repr__(self) -> str:
        return (
            f"QKClip(tau={self.tau}, alpha={self.alpha}, log_only={self.log_only}, "
            f"use_abs={self.use_abs}, attentions={self.names()})"
        )
