r"""QK-Clip: cap the attention max-logit by rescaling query/key projections after each step.

Usage (any ``nn.Module``, any ``torch.optim.Optimizer``; FSDP2/DTensor, DDP and tensor-parallel
weights)::

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
QK-Norm (RMSNorm gains on q and k)   the gains instead of the weights, by the same rules where
                                     gains are per head; a gain shared by several heads gets
                                     the smallest γ of the heads sharing it (docs/math.md §6)
===================================  ==========================================================

Bias rule: ``q = x W_qᵀ + b_q``, so the rows of ``b_q`` (and ``b_k``) are scaled with their
weight rows; the logit of head ``h`` then scales by exactly ``γ_h``. RoPE is linear, so it
commutes with the scaling. Heads with ``S_h ≤ τ`` (and non-finite ``S_h``: a NaN/Inf max is a
numerical failure that clipping cannot fix, so it is logged and left alone) are never written
to, so their outputs stay bit-identical (except where a shared QK-Norm gain forces otherwise).
Optimizer states (momentum, Adam moments) are not touched (Su, 11126). ``γ`` comes from this
step's forward (pre-update weights) and is applied to the post-update weights, so the next
step's max-logit is ≤ τ only approximately.

Sharded weights: a DTensor parameter (FSDP2's ``Shard(0)``, ``Shard(1)``, ``Replicate``, a
tensor-parallel ``Shard``, FSDP2's ``_StridedShard`` over tensor parallelism, several mesh
dims) is registered as it is; every rank scales, in place, only the rows of its local shard,
located through the shard's global offset, with no gather. Tensor-parallel heads
(``tp_group=``): each rank records its own heads and the statistics are reduced over
``process_group`` (data parallel) and then ``tp_group``.
"""

from __future__ import annotations

import math
import sys
import warnings
import weakref
from collections.abc import Iterator
from typing import Any, Literal

import torch

from ._qk_layout import (
    RowSpec,
    _apply,
    _Attention,
    _check_bias,
    _check_heads,
    _check_param,
    _factors,
    _is_dtensor,
    _local_heads,
    _mha_attention,
    _mla_attention,
    _tp_info,
)
from .distributed import resolve_process_group
from .max_logit import check_qk, max_logits

__all__ = ["QKClip", "max_logits"]


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
        same order and call ``clip_`` together (``attach`` does). ``False`` is refused once a
        DTensor or tensor-parallel attention is registered (ranks would clip differently).
    process_group : ProcessGroup or DeviceMesh, optional
        The group to reduce over: the data-parallel ranks (with sequence/context parallel ranks)
        that see different tokens of the same heads; default WORLD. Under tensor parallelism
        pass the data-parallel group (e.g. ``mesh["dp"]``): the statistics are then reduced over
        each attention's ``tp_group`` as well, so every rank ends with every head's max.

    Notes
    -----
    The statistic of head ``h`` is the running max, over every ``record`` call since the last
    clip (micro-batches, activation-checkpoint recomputations), of the logits fed to softmax.
    ``clip_`` (run by the step post-hook that ``attach`` registers) computes
    ``γ_h = min(1, τ/S_h)``, rescales as in the module docstring, saves the statistics for
    ``last_stats()`` and resets them. Cost per step: one host sync, one all-reduce of
    ``Σ num_heads`` floats per group and, for clipped heads only, one read-modify-write of the
    rows this rank holds.

    Sharded weights: register DTensor parameters as they are, after ``fully_shard`` /
    ``parallelize_module`` (those replace the parameters; ``attach`` warns when it sees stale
    ones). ``Replicate``, ``Shard(d)`` and ``_StridedShard`` placements on any number of mesh
    dims are supported (FSDP2, HSDP, tensor parallelism, FSDP2 over tensor parallelism);
    ``Partial`` and non-default shard orders raise ``ValueError`` naming the parameter and the
    placement. Plain parameters replicated by DDP need nothing.

    Checkpoints: ``state_dict``/``load_state_dict`` make a QKClip ``Stateful``, so it can sit
    beside the model and optimizer in ``torch.distributed.checkpoint.save``/``load``. Step hooks
    are not state: build the model, the optimizer and a QKClip, register the attentions, load,
    then call ``attach``.

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
        self._hooks: weakref.WeakKeyDictionary[torch.optim.Optimizer, Any] = (
            weakref.WeakKeyDictionary()
        )
        self._pending = False  # recorded since the last reduction (rank-local statistics)

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
        q_norm_weight: torch.Tensor | None = None,
        k_norm_weight: torch.Tensor | None = None,
        tp_group: Any = None,
    ) -> None:
        """Register an MHA / GQA / MQA attention layer.

        Parameters
        ----------
        name : str
            The key used by ``record`` and in the statistics.
        q_weight, k_weight : torch.Tensor
            The query and key projection weights (the same tensor for a fused QKV projection),
            plain or DTensor. Output features along ``out_dim``, head-major: row
            ``h·head_dim + d`` of the selected rows is component ``d`` of head ``h``.
        num_heads, head_dim : int
            Query heads (all of them, also under tensor parallelism) and the per-head width.
        num_kv_heads : int, optional
            Key heads (default ``num_heads``); ``num_heads % num_kv_heads == 0``.
        q_bias, k_bias : torch.Tensor, optional
            Biases; their rows are scaled with the weight rows (``q = xWᵀ + b``).
        q_rows, k_rows : slice or sequence of int or Tensor, optional
            Which output rows hold q (k), in head-major order; default all rows. For a fused
            ``[Q | K | V]`` Linear: ``q_rows=slice(0, H·D)``, ``k_rows=slice(H·D, (H+H_kv)·D)``;
            for interleaved layouts pass explicit indices. Indices are global for a DTensor.
        out_dim : int
            The weight's output-feature dim: 0 for ``nn.Linear`` (out, in), 1 for (in, out).
        alpha : float, optional
            Per-layer override of the q/k split.
        gqa : {"per_head", "group"}
            With shared key heads: ``"per_head"`` (default) puts the whole γ_h on query head h
            and leaves the key head alone, so heads below τ are untouched; ``"group"`` is
            Megatron-LM's rule (group min γ, split by α between q and the shared k).
        q_norm_weight, k_norm_weight : torch.Tensor, optional
            QK-Norm gains (``q = RMSNorm(x W_qᵀ)·g_q`` per head, as in OLMo 2 and Qwen3): the
            scaling of W_q (W_k) would be undone by the norm, so the clip scales the gain of
            that side instead and leaves its weight and bias alone. Shape ``(head_dim,)``: one
            gain shared by all heads; ``(heads·head_dim,)`` or ``(heads, head_dim)``: per head
            (``heads`` = ``num_heads`` for q, ``num_kv_heads`` for k). Rules: per-head gains as
            weights; a shared q gain with per-head k puts the whole γ on k (unclipped heads
            bit-identical); a shared gain whose heads cannot be separated gets the smallest γ
            of the heads sharing it, split by α when both sides are shared — heads below τ
            that share it are then scaled too, and every head ends ≤ τ (docs/math.md §6).
        tp_group : ProcessGroup or DeviceMesh, optional
            Tensor parallelism by heads (``ColwiseParallel`` q/k projections): rank ``r`` of the
            ``T`` ranks of this group computes query heads ``[r·H/T, (r+1)·H/T)`` and key heads
            ``[r·H_kv/T, (r+1)·H_kv/T)``, and ``record`` receives those. Plain weights, biases
            and per-head gains then hold this rank's heads only (a gain of one local head as
            ``(1, head_dim)``: ``(head_dim,)`` means shared); DTensors are global. ``H`` and
            ``H_kv`` must be divisible by ``T``.

        Raises
        ------
        TypeError, ValueError
            Bad names, shapes, row selections, overlapping q/k rows, settings, unsupported
            DTensor placements or tensor-parallel head counts.
        """
        name = self._new_name(name)
        H, D, Hkv = _check_heads(num_heads, head_dim, num_kv_heads)
        if out_dim not in (0, 1):
            raise ValueError(f"`out_dim` must be 0 or 1, got {out_dim}")
        if gqa not in ("per_head", "group"):
            raise ValueError(f"`gqa` must be 'per_head' or 'group', got {gqa!r}")
        if alpha is not None:
            alpha = self._check_alpha(alpha)
        qw, kw = _check_param(q_weight, "q_weight"), _check_param(k_weight, "k_weight")
        qb = _check_bias(q_bias, qw, out_dim, "q_bias")
        kb = _check_bias(k_bias, kw, out_dim, "k_bias")
        tp = _tp_info(tp_group, {"num_heads": H, "num_kv_heads": Hkv})
        self._attn[name] = _mha_attention(
            name, qw, kw, qb, kb, q_rows, k_rows, q_norm_weight, k_norm_weight,
            H=H, D=D, Hkv=Hkv, out_dim=out_dim, tp=tp, gqa=gqa, alpha=alpha,
        )  # fmt: skip

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
        tp_group: Any = None,
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
        tp_group : ProcessGroup or DeviceMesh, optional
            Heads split over tensor-parallel ranks, as in ``add_attention``; the shared ``k_r``
            is replicated.
        """
        name = self._new_name(name)
        H, dn, _ = _check_heads(num_heads, qk_nope_head_dim, None)
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
        tp = _tp_info(tp_group, {"num_heads": H})
        self._attn[name] = _mla_attention(
            name, qn, kn, qr, kr, q_nope_rows, k_nope_rows, q_rope_rows, q_nope_bias,
            k_nope_bias, q_rope_bias, H=H, dn=dn, dr=dr, out_dim=out_dim, tp=tp, alpha=alpha,
        )  # fmt: skip

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
        shape ``(batch, num_kv_heads, seq, head_dim)`` (under ``tp_group``: this rank's heads,
        ``num_heads / T`` and ``num_kv_heads / T``). ``scale`` defaults to ``1/√head_dim`` as
        in ``scaled_dot_product_attention``. No gradient; see :func:`max_logits` for cost.
        For MLA, ``q``/``k`` are the concatenated ``[nope | rope]`` per-head tensors with the
        shared ``k_r`` broadcast to every head (or ``num_kv_heads = 1``).
        """
        attn = self._get(name)
        q, k = (t.to_local() if _is_dtensor(t) else t for t in (q, k))  # TP: this rank's heads
        q, k = check_qk(q, k)
        h0, hq, hk = _local_heads(attn)
        where = "" if attn.tp is None else f" (this rank's share of tp_group, of {attn.num_heads})"
        if q.shape[1] != hq:
            raise ValueError(
                f"`q` has {q.shape[1]} heads but {name!r} was registered with "
                f"num_heads={attn.num_heads}: expected {hq}{where}"
            )
        if attn.kind == "mha" and k.shape[1] != hk:
            raise ValueError(
                f"`k` has {k.shape[1]} heads but {name!r} was registered with "
                f"num_kv_heads={attn.num_kv_heads}: expected {hk}{where}"
            )
        m = max_logits(q, k, causal=causal, scale=scale, use_abs=self.use_abs)
        self._fold(attn, m, h0)

    def record_max_logits(self, name: str, per_head_max: torch.Tensor) -> None:
        """Fold a per-head max-logit computed elsewhere (e.g. by a kernel).

        Shape ``(num_heads,)``, or under ``tp_group`` this rank's ``(num_heads / T,)``.
        """
        attn = self._get(name)
        if not isinstance(per_head_max, torch.Tensor) or not per_head_max.is_floating_point():
            raise TypeError("`per_head_max` must be a floating torch.Tensor")
        h0, hq, _ = _local_heads(attn)
        shape = tuple(per_head_max.shape)
        if shape == (attn.num_heads,):
            h0 = 0
        elif shape != (hq,):
            raise ValueError(
                f"`per_head_max` must have shape ({attn.num_heads},)"
                + ("" if attn.tp is None else f" or ({hq},) (this rank's heads)")
                + f", got {shape}"
            )
        self._fold(attn, per_head_max.detach(), h0)

    def _fold(self, attn: _Attention, m: torch.Tensor, h0: int = 0) -> None:
        m = m.to(device=attn.stats.device, dtype=attn.stats.dtype)
        s = attn.stats[h0 : h0 + m.shape[0]]
        torch.maximum(s, m, out=s)
        self._pending = True

    def max_logits(self) -> dict[str, torch.Tensor]:
        """The running per-head max-logits since the last clip (copies; ``-inf``: not seen)."""
        return {n: a.stats.clone() for n, a in self._attn.items()}

    def reset(self) -> None:
        """Forget the running statistics (``clip_`` does this after every step)."""
        for a in self._attn.values():
            a.stats.fill_(float("-inf"))
        self._pending = False

    def last_stats(self) -> dict[str, dict[str, torch.Tensor]]:
        """What the last ``clip_`` saw and did, per attention, as CPU tensors of shape (H,).

        ``max_logits`` (the reduced statistic, ``-inf`` if never recorded), ``gamma`` (the
        factor γ = min(1, τ/S) that was applied, or would have been in log-only mode) and
        ``clipped`` (bool: the head's max-logit exceeded τ and the clip acted on it).
        """
        return {n: dict(d) for n, d in self._last.items()}

    # -- distributed -----------------------------------------------------------------
    def _dist_on(self) -> bool:
        dist = torch.distributed
        on = self.distributed
        if on is None:
            on = dist.is_available() and dist.is_initialized()
        if not on:
            bad = [n for n, a in self._attn.items() if a.sharded or a.tp is not None]
            if bad:
                raise RuntimeError(
                    f"attentions {bad} hold DTensor or tensor-parallel weights, which need the "
                    "MAX all-reduce of the statistics (ranks see different tokens or heads); "
                    "leave `distributed` as None or True"
                )
        return bool(on)

    def _all_reduce(self, attns: list[_Attention], group: Any) -> None:
        dist = torch.distributed
        by_device: dict[torch.device, list[_Attention]] = {}
        for a in attns:
            by_device.setdefault(a.stats.device, []).append(a)
        for same in by_device.values():
            flat = torch.cat([a.stats for a in same])
            dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=group)
            for a, s in zip(same, flat.split([a.num_heads for a in same]), strict=True):
                a.stats.copy_(s)

    @torch.no_grad()
    def reduce_(self) -> None:
        """All-reduce (MAX) the running statistics now, as ``clip_`` does first.

        Over ``process_group``, then over each attention's ``tp_group``. A no-op without
        ``torch.distributed``. Collective: every rank must call it.
        """
        if not self._attn or not self._dist_on():
            return
        pg = self.process_group
        mesh_mod = sys.modules.get("torch.distributed.device_mesh")
        if mesh_mod is not None and isinstance(pg, mesh_mod.DeviceMesh):
            pg = resolve_process_group(pg)
        self._all_reduce(list(self._attn.values()), pg)
        by_group: dict[int, tuple[Any, list[_Attention]]] = {}
        for a in self._attn.values():
            if a.tp is not None:
                by_group.setdefault(id(a.tp[0]), (a.tp[0], []))[1].append(a)
        for group, attns in by_group.values():
            self._all_reduce(attns, group)
        self._pending = False

    # -- clipping --------------------------------------------------------------------
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
        self.reduce_()
        host = self._to_host()
        last: dict[str, dict[str, torch.Tensor]] = {}
        for n, attn in self._attn.items():
            S = host[n]
            over = torch.isfinite(S) & (S > self.tau)
            gamma = torch.where(over, self.tau / S, torch.ones_like(S))
            clipped = over if not self.log_only else torch.zeros_like(over)
            if bool(clipped.any()):
                _apply(attn, _factors(attn, gamma, self.alpha))
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

        Idempotent per optimizer: attaching again while the hook is in place returns the same
        handle, so the clip never runs twice per step. Warns when the optimizer holds DTensors but
        an attention's registered tensors are plain ones it does not hold (registered before
        sharding replaced them). Attach to one optimizer per model: each
        attached optimizer's step clips (and resets the statistics). Re-call after
        ``copy.deepcopy``/unpickling an optimizer or loading a checkpoint: hooks are not saved.

        Returns
        -------
        torch.utils.hooks.RemovableHandle
            ``.remove()`` detaches it.
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"`optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        handle = self._hooks.get(optimizer)
        if handle is not None:
            hooks = handle.hooks_dict_ref()
            if hooks is not None and handle.id in hooks:
                return handle
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if any(_is_dtensor(p) for p in params):  # sharded training: catch stale registrations
            owned = {id(p) for p in params}
            stale = [
                n
                for n, a in self._attn.items()
                if not any(_is_dtensor(p.tensor) or id(p.tensor) in owned for p in a.parts)
            ]
            if stale:
                warnings.warn(
                    f"QKClip.attach: the tensors registered for {stale} are plain tensors that "
                    "this optimizer (of DTensor parameters) does not hold: registered before "
                    "fully_shard / parallelize_module replaced them? The clip would scale stale "
                    "copies. Register after sharding.",
                    UserWarning,
                    stacklevel=2,
                )
        handle = optimizer.register_step_post_hook(lambda opt, args, kwargs: self.clip_())
        self._hooks[optimizer] = handle
        return handle

    def detach(self) -> None:
        """Remove every hook registered by ``attach``."""
        for h in list(self._hooks.values()):
            h.remove()
        self._hooks.clear()

    # -- state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Settings, counters and statistics (CPU copies); the weights belong to the model.

        The keys depend only on the registered names, so ``torch.distributed.checkpoint``
        can load into a fresh QKClip (``last`` holds placeholders while ``has_last`` is false).

        Raises
        ------
        RuntimeError
            Under ``torch.distributed`` with statistics recorded since the last reduction:
            they differ per rank and a checkpoint keeps one copy. Save after
            ``optimizer.step()`` or call ``reduce_()`` (on every rank) first.
        """
        if self._pending and self._attn and self._dist_on():
            raise RuntimeError(
                "QKClip holds per-rank statistics recorded since the last step; save after "
                "optimizer.step() or call `reduce_()` on every rank first"
            )
        last = {}
        for n, a in self._attn.items():
            d = self._last.get(n)
            if d is None:
                H = a.num_heads
                d = {
                    "max_logits": torch.full((H,), float("-inf")),
                    "gamma": torch.ones(H),
                    "clipped": torch.zeros(H, dtype=torch.bool),
                }
            last[n] = {k: v.clone() for k, v in d.items()}
        return {
            "tau": self.tau,
            "alpha": self.alpha,
            "log_only": self.log_only,
            "use_abs": self.use_abs,
            "num_clips": self.num_clips,
            "layer_alpha": {n: a.alpha for n, a in self._attn.items()},
            "stats": {n: a.stats.detach().cpu().clone() for n, a in self._attn.items()},
            "last": last,
            "has_last": bool(self._last),
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
        self._pending = False
        last = state_dict.get("last", {})
        has_last = bool(state_dict.get("has_last", bool(last)))
        self._last = (
            {n: {k: v.clone() for k, v in d.items()} for n, d in last.items()} if has_last else {}
        )

    def __repr__(self) -> str:
        return (
            f"QKClip(tau={self.tau}, alpha={self.alpha}, log_only={self.log_only}, "
            f"use_abs={self.use_abs}, attentions={self.names()})"
        )
