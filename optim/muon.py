r"""Muon for whole models: orthogonalised momentum for matrices, AdamW for everything else.

Layout follows ``torch.optim`` (``_muon.py``, ``adam.py``): the :class:`Muon` class gathers
parameters and state (``_init_group``) and calls the functional :func:`muon`, which picks the
path: :func:`_single_tensor_muon` (one parameter at a time; the readable reference),
:func:`_batched_muon` (matrices of one wide shape, dtype and device orthogonalised in one batched
call; ``torch._foreach_*`` element-wise work) or, on CUDA, :func:`optim._fused.fused_muon` (the
same update with Triton element-wise passes and optional CUDA-graph replay). The shared math
(matrix views, :func:`orthogonalize`, momentum and apply steps) is :mod:`optim._math`;
distributed steps are :mod:`optim.distributed`; what a param group goes through before it steps
(validation, ``ns_steps`` resolution, the ``betas`` alias and AdamW lr rules) and
:func:`muon_param_groups` are :mod:`optim._groups`. The math is docs/math.md §7.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim.adam import adam
from torch.optim.optimizer import Optimizer, ParamsT

from . import _fused
from ._fused import BucketGraphs
from ._groups import (  # noqa: F401 (re-exported public names: optim.muon.HEAD_NAMES, ...)
    DEFAULT_ADAMW_BETAS,
    EMBEDDING_MIN_ASPECT,
    EMBEDDING_MIN_ROWS,
    HEAD_NAMES,
    MATRIX_VIEWS,
    NS_ALGORITHMS,
    UPDATES,
    _adamw_lr,
    _alias_betas,
    _check_hyper,
    _resolve_ns_steps,
    _route_adamw_lr,
    _warn_embedding_like,
    looks_like_embedding,
    muon_param_groups,
)
from ._math import (
    LOW_PRECISION,
    MUON_KEYS,
    Coefficients,
    adjust_lr_ratio,
    apply_,
    buckets,
    drop_empty,
    foreach_ok,
    iteration_dtype_of,
    matrix_shape,
    momentum_inputs,
    orthogonalize,
    orthogonalize_bucket,
    runs,
    to_scalar,
    weight_decay_,
)
from .distributed import Strategy, choose_strategy, init_state

__all__ = [
    "Muon",
    "adjust_lr_ratio",
    "looks_like_embedding",
    "matrix_shape",
    "muon",
    "muon_param_groups",
    "orthogonalize",
    "orthogonalize_bucket",
]

AdjustLR = Literal["original", "match_rms_adamw"] | None
Update = Literal["msign", "mclip"]
MatrixView = Literal["auto", "flatten", "batch"]

NSCoefficients = Coefficients | Sequence[Coefficients]


# --------------------------------------------------------------------------------------------
# The torch paths
# --------------------------------------------------------------------------------------------


def _single_tensor_muon(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_bufs: list[Tensor],
    *,
    lr: float | Tensor,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
    adjust_lr_fn: str | None,
    group: Mapping[str, Any],
) -> None:
    """One parameter at a time (its expert stack batched); the reference for the batched path."""
    view = group.get("matrix_view", "auto")
    for param, grad, buf in zip(params, grads, momentum_bufs, strict=True):
        (u,) = momentum_inputs([grad], [buf], momentum, nesterov)
        k, n, m = matrix_shape(param.shape, view)
        O = orthogonalize(u.reshape(k, n, m), group).to(param.dtype)
        weight_decay_([param], lr, weight_decay)
        scale = -lr * adjust_lr_ratio(adjust_lr_fn, n, m)
        if isinstance(scale, Tensor):
            param.add_((O * scale.to(O.device)).reshape(param.shape))
        else:
            param.add_(O.reshape(param.shape), alpha=scale)


def _stack(parts: list[Tensor], group: Mapping[str, Any]) -> Tensor:
    """``torch.cat(parts)``, cast in the same pass to a bf16/fp16 iteration dtype.

    For ``update="msign"`` the stack is normalised and rounded to the iteration dtype anyway
    (torch.optim.Muon rounds ``G.bfloat16()`` first too), so writing it in that dtype saves a
    float32 write and read of every update. mclip normalises in float32 and gets the float32
    stack.
    """
    dtype = iteration_dtype_of(group, parts[0])
    cast = (
        group.get("update", "msign") == "msign"
        and dtype in LOW_PRECISION
        and parts[0].dtype not in LOW_PRECISION
    )
    if not cast:
        return torch.cat(parts) if len(parts) > 1 else parts[0]
    out = parts[0].new_empty((sum(p.shape[0] for p in parts), *parts[0].shape[1:]), dtype=dtype)
    return torch.cat(parts, out=out)


def _batched_muon(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_bufs: list[Tensor],
    *,
    lr: float | Tensor,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
    adjust_lr_fn: str | None,
    group: Mapping[str, Any],
) -> None:
    """Megabatched Muon: one orthogonalisation call per (wide shape, dtype, device) bucket.

    Tall matrices are transposed into their wide bucket (``msign(Mᵀ) = msign(M)ᵀ``), so a
    transformer block's ``d×4d`` and ``4d×d`` weights share one batched call. Momentum, weight
    decay and the update are ``torch._foreach_*`` calls over the whole group.
    """
    view = group.get("matrix_view", "auto")
    updates = momentum_inputs(grads, momentum_bufs, momentum, nesterov)
    blocks: list[tuple[tuple, list[int], Tensor]] = []
    for members in buckets(params, [(u.device, u.dtype) for u in updates], view):
        parts = []
        for (n, m, k, _, _), i in members:
            X = updates[i].reshape(k, n, m)
            parts.append(X.mT if n > m else X)
        O = orthogonalize(_stack(parts, group), group)
        for run_key, idx, start in runs(members):
            n, m, k = run_key[:3]
            block = O[start : start + len(idx) * k]
            blocks.append((run_key, idx, block.mT if n > m else block))

    weight_decay_(params, lr, weight_decay)
    for (n, m, _, shape, _), idx, block in blocks:
        ps = [params[i] for i in idx]
        scale = -lr * adjust_lr_ratio(adjust_lr_fn, n, m)
        if isinstance(scale, Tensor) or not foreach_ok(ps):
            # one cast+copy per run into the params' dtype and layout
            block = block.to(dtype=ps[0].dtype, memory_format=torch.contiguous_format)
        # else the add reads the bf16 (maybe transposed) update directly and promotes per
        # element: one pass over W instead of a cast copy first
        apply_(ps, list(block.reshape(len(idx), *shape).unbind(0)), scale)


# --------------------------------------------------------------------------------------------
# The functional form
# --------------------------------------------------------------------------------------------


def muon(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_bufs: list[Tensor],
    *,
    lr: float | Tensor,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
    ns_coefficients: NSCoefficients | None = None,
    ns_steps: int | None = None,
    eps: float = 1e-7,
    adjust_lr_fn: AdjustLR = None,
    msign: str = "polar_express",
    update: Update = "msign",
    mclip_scale: float = 1.0,
    ns_algorithm: str = "auto",
    ns_dtype: torch.dtype | None = None,
    matrix_view: MatrixView = "auto",
    batched: bool = True,
    has_complex: bool = False,
    graphs: BucketGraphs | None = None,
) -> None:
    r"""Functional Muon: update ``params`` in place from ``grads``; see :class:`Muon`.

    ``momentum_bufs`` (one per param, any float dtype) are updated in place; ``grads`` are not.
    ``batched=False`` runs :func:`_single_tensor_muon`; else :func:`optim._fused.fused_muon`
    where it applies (CUDA, Triton, float lr, ``update="msign"``, contiguous float tensors:
    :func:`optim._fused.applies`) and :func:`_batched_muon` elsewhere. ``graphs``: a
    :class:`optim._fused.BucketGraphs` cache kept across calls (by :class:`Muon`) to replay the
    orthogonalisation of small CUDA buckets from captured graphs; None runs eagerly.
    ``ns_coefficients``: one ``(a, b, c)`` for every step or a per-step table (see
    :class:`Muon`). Parameters with a zero-size dimension are skipped (nothing to update, and
    the shape factor ``r(A, B)`` is undefined for them).
    """
    if has_complex:
        raise TypeError(
            "Muon does not support complex parameters; optimise real and imaginary parts"
        )
    params, grads, momentum_bufs = drop_empty(params, grads, momentum_bufs)
    if not params:
        return
    lr = to_scalar(lr)
    group = {
        "ns_coefficients": ns_coefficients,
        "ns_steps": ns_steps,
        "eps": eps,
        "msign": msign,
        "update": update,
        "mclip_scale": mclip_scale,
        "ns_algorithm": ns_algorithm,
        "ns_dtype": ns_dtype,
        "matrix_view": matrix_view,
    }
    kwargs: dict[str, Any] = dict(
        lr=lr,
        weight_decay=weight_decay,
        momentum=momentum,
        nesterov=nesterov,
        adjust_lr_fn=adjust_lr_fn,
        group=group,
    )
    if not batched:
        _single_tensor_muon(params, grads, momentum_bufs, **kwargs)
    elif _fused.applies(params, grads, momentum_bufs, lr, group):
        _fused.fused_muon(params, grads, momentum_bufs, graphs=graphs, **kwargs)
    else:
        _batched_muon(params, grads, momentum_bufs, **kwargs)


# --------------------------------------------------------------------------------------------
# The optimizer
# --------------------------------------------------------------------------------------------


class Muon(Optimizer):
    r"""Muon (momentum orthogonalised by Newton–Schulz) for matrices, AdamW for the rest.

    Takes ``torch.optim.Muon``'s positional arguments with torch's defaults, except that the
    default Newton–Schulz schedule is Polar Express (``ns_coefficients=None``), not Keller's
    fixed quintic: with ``ns_coefficients=(3.4445, -4.7750, 2.0315)`` the update is torch's (to
    bf16 rounding: torch iterates in bf16, this class in float32 on CPU and bf16 on CUDA unless
    ``ns_dtype`` says otherwise) and state dicts load both ways. Where
    ``torch.optim.AdamW(model.parameters(), ...)`` was used, non-matrix parameters get the
    built-in AdamW, but the hyper-parameters differ (README, "Migrating").

    Algorithm, per step for each parameter ``W`` routed to Muon (group key ``use_muon``;
    default ``W.ndim >= 2``; docs/math.md §7)::

        input: η (lr), λ (weight_decay), μ (momentum), nesterov, r (adjust_lr_fn)
        ─────────────────────────────────────────────────────────────────────────────────────
        G ← ∇W
        B ← μ B + (1 − μ) G                        (EMA momentum, lerp; state "momentum_buffer")
        U ← (1 − μ) G + μ B   if nesterov else B
        O ← msign(U)   or   mclip(U / c)            (per A×B matrix of W's view; see `update`)
        W ← (1 − η λ) W − η · r(A, B) · O          (decoupled decay with the unadjusted η)
        ─────────────────────────────────────────────────────────────────────────────────────
        return W

    Why: ``msign(U)`` keeps the momentum's singular directions and sets every singular value
    to 1, so each step moves ``W`` by the same spectral norm in every direction.

    Every other parameter gets AdamW (``torch.optim.adam.adam`` with
    ``decoupled_weight_decay=True``; state ``exp_avg``, ``exp_avg_sq``, ``step``) with
    ``weight_decay = adamw_weight_decay or weight_decay``, ``betas = adamw_betas``,
    ``eps = adamw_eps`` and a learning rate that LR schedulers scale:

    * a ``use_muon=False`` group (:func:`muon_param_groups`' AdamW group) carries its AdamW lr
      as its own ``lr``: the group's ``adamw_lr`` if it sets one, else its ``lr`` if it sets
      one, else the constructor's ``adamw_lr``, else ``lr``. ``adamw_lr`` is then cleared to
      ``None`` in the group;
    * in a group routed by ndim (``use_muon`` None) that holds matrices and vectors, AdamW's lr
      follows the group's: ``adamw_lr · lr / adamw_lr_ref``, ``adamw_lr_ref`` being the
      group's lr when it was added (``adamw_lr`` None: ``lr`` itself);
    * a group whose ``adamw_lr`` is set but ``adamw_lr_ref`` is None (a checkpoint group
      without the ``adamw_lr_ref`` key, or a value assigned to ``adamw_lr`` afterwards) runs
      AdamW at that constant lr, so such checkpoints resume as they were trained.

    Parameters
    ----------
    params : iterable of Tensor or dict
        Parameters or param groups. A group may set any keyword below, plus ``use_muon``
        (``True``: every param must be ≥ 2-D; ``False``: all AdamW; absent/None: by ndim). See
        :func:`muon_param_groups` for the usual split (embeddings, head and 1-D params on AdamW).
    lr : float or Tensor
        Learning rate η (a 1-element tensor is accepted).
    weight_decay : float
        Decoupled weight decay λ, multiplied by the unadjusted lr.
    momentum : float
        μ in ``[0, 1)``.
    nesterov : bool
        Use the Nesterov input ``(1 − μ)G + μB``.
    ns_coefficients : (a, b, c), sequence of (a, b, c), or None
        One triple: that quintic at every step (torch's behaviour; torch's default is Keller's
        ``(3.4445, -4.7750, 2.0315)``). A table ``[(a₁, b₁, c₁), …]``: row ``t`` at step ``t``
        (a tuned per-step schedule). Both start from ``U / max(‖U‖_F, eps)``, as torch does.
        Stored in the param group as floats (a tuple, or a tuple of tuples). ``None``: the
        schedule of the ``msign`` method (Polar Express by default: a different, convergent
        polynomial per step).
    eps : float
        Normalisation floor: a zero gradient gives a zero update.
    ns_steps : int or None
        Newton–Schulz steps, below 100 (torch's limit). With a triple: ``None`` means 5; with a
        table: ``None`` or its length; both are stored resolved, so the group's keys are
        torch.optim.Muon's. Without ``ns_coefficients``: ``None`` is the method's default.
    adjust_lr_fn : {None, "original", "match_rms_adamw"}
        Shape factor ``r(A, B)`` for an ``A×B`` matrix: ``√max(1, A/B)`` (None/"original",
        Keller) or ``0.2·√max(A, B)`` (Moonlight: update RMS 0.2, so AdamW's lr and weight decay
        carry over). ``A×B`` is the 2-D view: ``(out, in·kh·kw)`` for conv, ``(n, m)`` per expert.
    msign : {"polar_express", "tuned", "keller", "cubic", "svd"}
        Newton–Schulz schedule when ``ns_coefficients`` is None (see :func:`matfn.msign`).
    update : {"msign", "mclip"}
        ``"mclip"``: spectrally clipped update ``O = mclip(U/c)``, ``c = mclip_scale·‖U‖_F/√s``
        (``s = min(A, B)``): singular values ``min(σᵢ/c, 1)``. Directions with small singular
        values stay small instead of being lifted to 1; ``‖O‖₂ ≤ 1`` as for msign.
    mclip_scale : float
        κ in the clipping threshold above (κ → 0 recovers msign).
    ns_algorithm : {"auto", "standard", "gram"}
        Newton–Schulz algorithm (see :func:`matfn.msign`).
    ns_dtype : torch.dtype or None
        Iteration dtype; default bfloat16 on CUDA, float32 on CPU.
    matrix_view : {"auto", "flatten", "batch"}
        How ≥ 3-D params become matrices: ``auto`` batches 3-D ``(E, n, m)`` per expert and
        flattens ≥ 4-D conv weights with ``view(out, -1)``; ``flatten`` also flattens 3-D
        (Conv1d); ``batch`` batches over all leading dims.
    adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay
        Hyper-parameters of the built-in AdamW. ``adamw_lr``: see above (``None``: ``lr``);
        ``adamw_weight_decay`` ``None``: ``weight_decay``; ``adamw_betas`` ``None``:
        ``(0.9, 0.95)``; ``adamw_eps`` is Adam's ε (``eps`` is Muon's normalisation floor).
    betas : (float, float) or None
        Alias of ``adamw_betas`` (``torch.optim.AdamW``'s name; Muon's own momentum is
        ``momentum``). Giving both with different values raises ``ValueError``. A param group
        may use either key; it is stored as ``adamw_betas``.
    batched : bool
        Orthogonalise same-shape matrices in one batched call (``False``: one at a time).
    cuda_graphs : bool
        On CUDA, replay the orthogonalisation of small buckets (≤ 2²⁶ entries) from captured
        CUDA graphs once the same bucket has been seen twice, on the kernels fastest on the GPU
        rather than those cheapest to launch (:mod:`optim._fused`). Removes most of the host
        overhead of a launch-bound step (docs/benchmarks.md); replayed updates differ from eager
        ones by the iteration's rounding (≈ 0.1 % of the move). Costs each captured bucket's
        intermediates (its private memory pool, a few times the bucket). Skipped while a
        capture is already running (a user graphing the whole step), under ``torch.compile``,
        and off CUDA. Default off.
    process_group : ProcessGroup, DeviceMesh, True or None
        Distributed Muon (:mod:`optim.distributed`; the strategy is chosen here, once). DTensor
        parameters (FSDP2 ``fully_shard``) are detected and need nothing here. For plain
        parameters replicated by DDP pass the DDP group (``True``: the default group): each
        rank orthogonalises its share and the results are all-gathered. ``None`` (default):
        plain parameters are single-process.

    Warns
    -----
    UserWarning
        When a group routed by ndim (``use_muon`` None, e.g. ``model.parameters()``) holds a
        matrix that looks like an embedding or output head (:func:`looks_like_embedding`):
        Muon is meant for hidden matrices, those belong on AdamW. :func:`muon_param_groups`
        and explicit ``use_muon`` groups never warn.

    Notes
    -----
    **LR schedulers.** Every group's ``lr`` is scheduled, AdamW's included (see above);
    ``initial_lr`` is set by the scheduler as usual. A hand-written schedule scales each
    group's own base lr (``g["lr"] = base_lrs[i] * f(step)``); writing one lr into every group
    would give the AdamW groups Muon's. ``OneCycleLR``'s momentum cycling (its
    default ``cycle_momentum=True``) cycles the ``momentum`` key, i.e. Muon's μ, between
    ``base_momentum`` and ``max_momentum``; AdamW's β₁ (``adamw_betas[0]``) is not cycled.
    Pass ``cycle_momentum=False`` to keep μ fixed, as Muon's recipes do.

    **Zero-size parameters** (a dimension of size 0) get state but are never updated.

    **torch.compile.** ``torch.compile(opt.step)`` traces the whole step (``fullgraph=True``
    works): under compile the batched torch path runs (no Triton element-wise passes, no bucket
    graphs, no host syncs; inductor fuses the element-wise work) and each bucket's
    orthogonalisation is one opaque custom op, ``torch.ops.matfn.muon_orthogonalize``
    (:func:`optim._math.orthogonalize_op`), with the Triton Newton–Schulz kernels inside on
    CUDA. The compiled step matches the eager one to float32 rounding on CPU; on CUDA, to the
    bf16 iteration's rounding (its norms come from torch instead of the fused pass). It is not
    faster: on an H100 GPT-2-small's 72 matrices take 6.4 ms compiled against 3.6 ms eager
    (docs/benchmarks.md; the compiled step runs inductor's element-wise code instead of the two
    fused Triton passes, and no bucket graphs). On torch 2.11 inductor's loop reordering
    asserts on this step's fused ``_foreach`` nodes at that size;
    ``torch._inductor.config.loop_ordering_after_fusion = False`` avoids it (torch 2.13 skips
    such nodes).

    **Update RMS.** For a full-rank ``A×B`` matrix ``‖msign(U)‖_F² = min(A, B)``, so
    ``RMS(O) = 1/√max(A, B)`` and ``RMS(r·O)`` is ``1/√B`` ("original") or exactly 0.2
    ("match_rms_adamw"). With ``update="mclip"``, ``‖O‖_F² = Σ min(σᵢ²/c², 1) ≤ min(s, s/κ²)``
    (because ``Σσᵢ² = ‖U‖_F² = s c²/κ²``). The same ``r(A, B)`` is used, so the msign RMS is an
    upper bound (times ``min(1, 1/κ)``), reached when U's spectrum is flat (then mclip = msign
    for κ ≤ 1); a rank-1 U gives the same update under both. ``‖O‖₂ ≤ 1`` still holds, so
    decoupled decay keeps bounding ``‖W‖₂`` as with msign.

    **Cost** per step: the Newton–Schulz iterations, ``T(4s²L + 2s³)`` FLOPs per matrix
    (``algorithm="gram"``: ``4s²L + 8Ts³``), in one batched call per (shape, dtype, device)
    bucket (tall matrices are transposed into the wide bucket), plus O(#params) element-wise
    work: ``torch._foreach_*`` calls, or on CUDA two Triton passes (:mod:`optim._fused`).

    **State.** ``momentum_buffer`` has the param's shape; it is float32 for bf16/fp16 params
    (kept float32 across ``load_state_dict``, which would otherwise cast it to the param dtype).
    ``step`` exists only for AdamW params. NaN/Inf gradients propagate (no host sync). With one
    ``ns_coefficients`` triple the state dict loads into ``torch.optim.Muon`` and back (its
    group keys are a superset of torch's); torch cannot run a method schedule or a table.

    Examples
    --------
    >>> import torch
    >>> from optim import Muon, muon_param_groups
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    >>> opt = Muon(muon_param_groups(model), lr=0.02, adamw_lr=3e-3)
    >>> model(torch.randn(4, 8)).square().mean().backward()
    >>> opt.step()
    >>> opt.zero_grad()
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: NSCoefficients | None = None,
        eps: float = 1e-7,
        ns_steps: int | None = None,
        adjust_lr_fn: AdjustLR = None,
        *,
        msign: str = "polar_express",
        update: Update = "msign",
        mclip_scale: float = 1.0,
        ns_algorithm: str = "auto",
        ns_dtype: torch.dtype | None = None,
        matrix_view: MatrixView = "auto",
        adamw_lr: float | Tensor | None = None,
        adamw_betas: tuple[float, float] | None = None,
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float | None = None,
        betas: tuple[float, float] | None = None,
        batched: bool = True,
        cuda_graphs: bool = False,
        process_group: Any = None,
    ) -> None:
        adamw_betas = _alias_betas(betas, adamw_betas)
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=ns_coefficients,
            eps=eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
            msign=msign,
            update=update,
            mclip_scale=mclip_scale,
            ns_algorithm=ns_algorithm,
            ns_dtype=ns_dtype,
            matrix_view=matrix_view,
            adamw_lr=adamw_lr,
            adamw_betas=adamw_betas,
            adamw_eps=adamw_eps,
            adamw_weight_decay=adamw_weight_decay,
            adamw_lr_ref=None,
            batched=batched,
            cuda_graphs=cuda_graphs,
            use_muon=None,
        )
        _check_hyper(defaults)
        super().__init__(params, defaults)
        _warn_embedding_like(self.param_groups, stacklevel=2)
        self._graphs = BucketGraphs()  # captured bucket graphs: a cache, not state
        params_ = [p for g in self.param_groups for p in g["params"]]
        self._strategy: Strategy = choose_strategy(params_, process_group)
        if self._strategy.distributed:
            init_state(self)  # rank-symmetric state before the first step (checkpointing)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickling/deepcopy: torch keeps only defaults, state and groups; rebuild the rest.

        The copy is single-process (``Strategy("local")``): process groups do not pickle.
        """
        super().__setstate__(state)
        self.__dict__.setdefault("_graphs", BucketGraphs())
        self.__dict__.setdefault("_strategy", Strategy())
        for group in self.param_groups:
            group.setdefault("cuda_graphs", False)
            group.setdefault("adamw_lr_ref", None)  # a pickle without the key: constant adamw_lr

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group: validate it, resolve ``ns_steps`` and the AdamW lr, check the routing.

        ``betas`` is stored as ``adamw_betas``; see the class docstring for which lr a
        ``use_muon=False`` group gets. Warns as the constructor does for embedding-like
        matrices routed to Muon by ndim.
        """
        if isinstance(param_group, dict) and "betas" in param_group:
            betas = param_group.pop("betas")
            param_group["adamw_betas"] = _alias_betas(betas, param_group.get("adamw_betas"))
        own = param_group if isinstance(param_group, dict) else {}
        own_lr, own_adamw_lr = "lr" in own, own.get("adamw_lr") is not None
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _check_hyper(group)
            _resolve_ns_steps(group)
            if group["use_muon"]:
                for p in group["params"]:
                    matrix_shape(p.shape, group["matrix_view"])  # raises for ndim < 2
            _route_adamw_lr(group, own_lr=own_lr, own_adamw_lr=own_adamw_lr)
        except (TypeError, ValueError):
            self.param_groups.pop()  # a rejected group is not half-added
            raise
        if "_strategy" in self.__dict__:  # after construction (the constructor warns once)
            _warn_embedding_like([group], stacklevel=2)

    @staticmethod
    def _uses_muon(p: Tensor, group: Mapping[str, Any]) -> bool:
        flag = group["use_muon"]
        return p.ndim >= 2 if flag is None else bool(flag)

    def _init_group(
        self,
        group: dict[str, Any],
        m_params: list[Tensor],
        m_grads: list[Tensor],
        m_bufs: list[Tensor],
        a_params: list[Tensor],
        a_grads: list[Tensor],
        a_avgs: list[Tensor],
        a_sqs: list[Tensor],
        a_steps: list[Tensor],
    ) -> None:
        # flat list arguments: torch.compile's optimizer support calls `_init_group` eagerly
        # and propagates the lists it fills (lists nested in tuples would be lost)
        for p in group["params"]:
            if p.grad is None:
                continue
            if torch.is_complex(p) or torch.is_complex(p.grad):
                raise TypeError(
                    "Muon does not support complex parameters; view them as real "
                    "(torch.view_as_real) or optimise them with another optimizer"
                )
            if p.grad.is_sparse:
                raise TypeError(
                    "Muon does not support sparse gradients; use nn.Embedding(sparse=False) "
                    "or torch.optim.SparseAdam for those parameters"
                )
            state = self.state[p]
            if self._uses_muon(p, group):
                if "momentum_buffer" not in state:
                    dtype = torch.float32 if p.dtype in LOW_PRECISION else p.dtype
                    state["momentum_buffer"] = torch.zeros_like(
                        p, dtype=dtype, memory_format=torch.preserve_format
                    )
                m_params.append(p)
                m_grads.append(p.grad)
                m_bufs.append(state["momentum_buffer"])
            else:
                if "step" not in state:
                    # like torch.optim.AdamW: on the CPU eagerly (not capturable/fused), on the
                    # param's device when created for torch.compile (which runs this method
                    # eagerly while compiling, moves saved CPU steps there itself, and traces
                    # AdamW's capturable form: no host sync in the graph)
                    device = p.device if torch.compiler.is_compiling() else None
                    state["step"] = torch.tensor(0.0, dtype=torch.float32, device=device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                a_params.append(p)
                a_grads.append(p.grad)
                a_avgs.append(state["exp_avg"])
                a_sqs.append(state["exp_avg_sq"])
                a_steps.append(state["step"])

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Perform one step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            muon_lists: tuple = ([], [], [])
            adam_lists: tuple = ([], [], [], [], [])
            self._init_group(group, *muon_lists, *adam_lists)
            if muon_lists[0] and self._strategy.distributed:
                self._strategy.step(group, *muon_lists)
            elif muon_lists[0]:
                muon(
                    *muon_lists,
                    lr=group["lr"],
                    weight_decay=group["weight_decay"],
                    momentum=group["momentum"],
                    nesterov=group["nesterov"],
                    adjust_lr_fn=group["adjust_lr_fn"],
                    batched=group["batched"],
                    graphs=self._graphs if group["cuda_graphs"] else None,
                    **{k: group[k] for k in MUON_KEYS},
                )
            if adam_lists[0]:
                beta1, beta2 = group["adamw_betas"]
                lr = _adamw_lr(group)
                wd = group["adamw_weight_decay"]
                adam(
                    *adam_lists[:4],
                    [],
                    adam_lists[4],
                    decoupled_weight_decay=True,
                    amsgrad=False,
                    beta1=beta1,
                    beta2=beta2,
                    lr=to_scalar(lr),
                    weight_decay=group["weight_decay"] if wd is None else wd,
                    eps=group["adamw_eps"],
                    maximize=False,
                    capturable=torch.compiler.is_compiling(),
                )
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state; momentum buffers keep their saved dtype (torch would cast to the param's).

        Also accepts a ``torch.optim.Muon`` state dict: missing group keys take this
        optimizer's defaults, and its ``ns_coefficients``/``ns_steps`` keep torch's iteration.
        A group saved without ``adamw_lr_ref`` but with ``adamw_lr`` keeps that constant AdamW
        lr, as when it was saved; a group without ``adamw_lr`` (torch's) is routed as a new one.
        """
        saved = {
            pid: s["momentum_buffer"]
            for pid, s in state_dict["state"].items()
            if isinstance(s, Mapping) and isinstance(s.get("momentum_buffer"), Tensor)
        }
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # e.g. a torch.optim.Muon checkpoint lacks our keys
            foreign = "adamw_lr" not in group
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            _resolve_ns_steps(group)
            if foreign:
                _route_adamw_lr(group, own_lr=True, own_adamw_lr=False, loading=True)
        ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(ids, params, strict=True):
            if pid in saved:
                self.state[p]["momentum_buffer"] = saved[pid].to(device=p.device, copy=True)
