r"""The Muon update's math, shared by the single-process and the distributed optimizer.

A leaf of :mod:`optim` (it imports only :mod:`matfn.functional`): :mod:`optim.muon`,
:mod:`optim._fused` and :mod:`optim.distributed` build on it. For a parameter ``W`` with
gradient ``G`` and momentum buffer ``B`` (docs/math.md §7)::

    B ← μB + (1 − μ)G                   momentum_inputs
    U ← (1 − μ)G + μB  or  B            (Nesterov or not)
    O ← msign(U)  or  mclip(U / c)      orthogonalize, per matrix of matrix_shape's view
    W ← (1 − ηλ)W − η·r(A, B)·O         weight_decay_, apply_, adjust_lr_ratio

Everything here is plain torch (``torch._foreach_*`` over lists) except the orthogonalisation,
which calls :mod:`matfn`'s Newton–Schulz (Triton kernels on CUDA).
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from matfn.functional import (
    default_compute_dtype,
    mclip,
    msign_wide,
    normalize_for_iteration,
    run_newton_schulz,
    to_wide,
)

__all__ = [
    "ADJUST_LR_FNS",
    "DEFAULT_NS_STEPS",
    "LOW_PRECISION",
    "MAX_NS_STEPS",
    "MUON_KEYS",
    "adjust_lr_ratio",
    "apply_",
    "buckets",
    "drop_empty",
    "is_triple",
    "iteration_dtype_of",
    "matrix_shape",
    "momentum_inputs",
    "ns_table",
    "op_options",
    "orthogonalize",
    "orthogonalize_op",
    "orthogonalize_bucket",
    "runs",
    "to_scalar",
    "weight_decay_",
]

ADJUST_LR_FNS = (None, "original", "match_rms_adamw")
#: Newton–Schulz steps of a fixed ``ns_coefficients`` triple when ``ns_steps`` is None (torch's).
DEFAULT_NS_STEPS = 5
#: ``ns_steps`` must stay below this (torch.optim.Muon's limit).
MAX_NS_STEPS = 100
#: One Newton–Schulz step ``X ← aX + (bA + cA²)X``.
Coefficients = tuple[float, float, float]
#: Parameters stored in these dtypes keep their momentum buffer in float32.
LOW_PRECISION = (torch.bfloat16, torch.float16)
#: The keys of a param group that :func:`orthogonalize` and the matrix view read.
MUON_KEYS = (
    "ns_coefficients",
    "ns_steps",
    "eps",
    "msign",
    "update",
    "mclip_scale",
    "ns_algorithm",
    "ns_dtype",
    "matrix_view",
)

try:  # torch ≥ 2.8; squeezes a 1-element tensor lr to 0-d, keeps floats
    from torch.optim.optimizer import _to_scalar as to_scalar
except ImportError:  # pragma: no cover - older torch

    def to_scalar(x: float | Tensor) -> float | Tensor:
        return x.squeeze() if isinstance(x, Tensor) and x.dim() != 0 else x


# --------------------------------------------------------------------------------------------
# Shapes: which matrices a parameter holds, and the learning-rate shape factor
# --------------------------------------------------------------------------------------------


def matrix_shape(
    shape: torch.Size | Sequence[int], matrix_view: str = "auto"
) -> tuple[int, int, int]:
    """``(k, n, m)``: a parameter of ``shape`` is optimised as ``k`` matrices of size ``n×m``.

    2-D: one matrix. ``matrix_view="auto"``: 3-D ``(E, n, m)`` is E expert matrices, ≥ 4-D
    (conv ``(out, in, kh, kw)``) is flattened to ``(out, in·kh·kw)`` as in Keller's Muon.
    ``"flatten"`` flattens every ≥ 3-D parameter (use it for Conv1d weights ``(out, in, k)``);
    ``"batch"`` treats all leading dims as a batch of ``shape[-2] × shape[-1]`` matrices.
    """
    shape = tuple(shape)
    if len(shape) < 2:
        raise ValueError(f"Muon needs parameters with ndim >= 2, got shape {shape}")
    if len(shape) == 2:
        return 1, shape[0], shape[1]
    flatten = matrix_view == "flatten" or (matrix_view == "auto" and len(shape) >= 4)
    if flatten:
        return 1, shape[0], math.prod(shape[1:])
    return math.prod(shape[:-2]), shape[-2], shape[-1]


def adjust_lr_ratio(adjust_lr_fn: str | None, n: int, m: int) -> float:
    r"""The shape factor ``r(A, B)`` of torch.optim.Muon for an ``A×B`` matrix (``A = n``).

    ``None``/``"original"``: ``√max(1, A/B)`` (update RMS ``1/√B`` for full rank);
    ``"match_rms_adamw"``: ``0.2·√max(A, B)`` (update RMS 0.2, AdamW's typical value).
    """
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1.0, n / m))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(n, m))
    raise ValueError(f"`adjust_lr_fn` must be one of {ADJUST_LR_FNS}, got {adjust_lr_fn!r}")


def iteration_dtype_of(group: Mapping[str, Any], X: Tensor) -> torch.dtype:
    """The dtype the group's Newton–Schulz iterates ``X`` in (``ns_dtype`` or the default)."""
    return group.get("ns_dtype") or default_compute_dtype(X)


# --------------------------------------------------------------------------------------------
# Orthogonalisation (no state, no parameters)
# --------------------------------------------------------------------------------------------


def is_triple(value: object) -> bool:
    """Whether ``value`` is one ``(a, b, c)`` of real numbers (not a table of them)."""
    if isinstance(value, str | bytes | Tensor) or not isinstance(value, Sequence):
        return False
    return len(value) == 3 and all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value
    )


def ns_table(
    coefficients: Coefficients | Sequence[Coefficients], steps: int | None
) -> list[Coefficients]:
    """The per-step Newton–Schulz table of ``ns_coefficients`` and ``ns_steps``.

    One triple ``(a, b, c)``: that quintic for each of ``steps`` steps (default 5, torch's).
    A table ``[(a₁, b₁, c₁), …]``: row ``t`` at step ``t``; ``steps`` must be None or its
    length. A table is how tuned schedules (Polar Express, …) vary the polynomial per step.
    """
    if is_triple(coefficients):
        row = tuple(float(v) for v in coefficients)
        return [row] * (DEFAULT_NS_STEPS if steps is None else steps)  # type: ignore[list-item]
    table = [tuple(float(v) for v in row) for row in coefficients]  # type: ignore[union-attr]
    if steps is not None and steps != len(table):
        raise ValueError(
            f"`ns_steps`={steps} does not match the {len(table)}-step `ns_coefficients` table; "
            "pass ns_steps=None or the table's length"
        )
    return table  # type: ignore[return-value]


def _mclip_wide(X: Tensor, group: Mapping[str, Any], compute_dtype: torch.dtype) -> Tensor:
    """``mclip(X_b / c_b)`` with ``c_b = κ·‖X_b‖_F/√s``: singular values ``min(σ/c, 1)``."""
    eps = group["eps"]
    acc = X.to(torch.float64 if X.dtype == torch.float64 else torch.float32)
    # the threshold is the RMS singular value (times κ) of each matrix
    c = torch.linalg.matrix_norm(acc, keepdim=True) * (
        group.get("mclip_scale", 1.0) / math.sqrt(X.shape[-2])
    )
    Xn = (acc / c.clamp_min(eps)).to(compute_dtype)
    return mclip(
        Xn,
        max_sv=1.0,
        method=group["msign"],
        steps=group.get("ns_steps"),
        algorithm=group.get("ns_algorithm", "auto"),
        eps=eps,
        compute_dtype=compute_dtype,
        check_finite=False,
    )


def orthogonalize(
    X: Tensor,
    group: Mapping[str, Any],
    norms: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    r"""The Muon direction of each matrix in a stacked batch ``X`` of shape ``(B, n, m)``.

    ``update="msign"``: ``msign(X_b) ≈ U Vᵀ`` by Newton–Schulz. With ``ns_coefficients=(a, b, c)``
    this is torch.optim.Muon's fixed quintic: ``X₀ = X / max(‖X‖_F, eps)``, then ``ns_steps``
    (default 5) steps ``X ← aX + (bA + cA²)X``, ``A = XXᵀ``; with a table
    ``[(a₁, b₁, c₁), …]`` the same normalisation and row ``t`` at step ``t``
    (:func:`ns_table`); otherwise the ``msign`` method's schedule (:func:`matfn.msign`).
    ``update="mclip"``: ``mclip(X_b / c_b)`` with ``c_b = mclip_scale·‖X_b‖_F/√s``: singular
    values ``min(σ/c, 1)`` (docs/math.md §3).

    Only the keys ``msign, ns_coefficients, ns_steps, eps, ns_algorithm, ns_dtype, update,
    mclip_scale`` of ``group`` are read. Returns ``(B, n, m)`` in the iteration dtype
    (``ns_dtype``; default bfloat16 on CUDA, float32 on CPU, float64 for float64; fp16 where
    a bf16 batch takes the folded CUDA path, see :func:`matfn.functional.iteration_dtype`;
    callers cast). ``X`` is never modified. ``norms``: the Frobenius norms of X's matrices,
    shape ``(B,)``, when the caller computed them while writing X (``update="msign"``), which
    saves a read of X. ``out_dtype``: the result in this dtype instead (the last product of a
    fixed schedule rounds to it; no cast pass).

    Under ``torch.compile`` the iteration is the custom op ``torch.ops.matfn.muon_orthogonalize``
    (:func:`orthogonalize_op`, result in the iteration dtype ``ns_dtype`` or the default): the
    schedule's host computation, the path choice and the Triton kernels stay inside one opaque
    node, so dynamo traces the optimizer step around it without graph breaks.

    Cost: ``T(4s²L + 2s³)`` FLOPs per ``s×L`` wide matrix for ``T`` steps (docs/math.md §1.4).
    """
    if torch.compiler.is_compiling():
        X, transposed = to_wide(X)
        O = orthogonalize_op(X, *op_options(group))
        O = O if out_dtype is None else O.to(out_dtype)
        return O.mT if transposed else O
    if X.numel() == 0:
        return torch.zeros_like(X, dtype=out_dtype)
    X, transposed = to_wide(X)
    compute_dtype = iteration_dtype_of(group, X)
    algorithm = group.get("ns_algorithm", "auto")
    eps = group["eps"]
    coefficients = group.get("ns_coefficients")
    steps = group.get("ns_steps")
    if group.get("update", "msign") == "mclip":
        O = _mclip_wide(X, group, compute_dtype)
        O = O if out_dtype is None else O.to(out_dtype)
    elif coefficients is not None:
        X0 = normalize_for_iteration(X, 1.0, eps, compute_dtype, norms)
        O = run_newton_schulz(X0, ns_table(coefficients, steps), algorithm, out_dtype)
    else:
        O = msign_wide(
            X,
            method=group["msign"],
            steps=steps,
            algorithm=algorithm,
            eps=eps,
            compute_dtype=compute_dtype,
            norms=norms,
            out_dtype=out_dtype,
        )
    return O.mT if transposed else O


def op_options(group: Mapping[str, Any]) -> tuple:
    """The arguments after ``X`` of :func:`orthogonalize_op` for a param group's settings.

    ``ns_coefficients`` becomes its resolved per-step table, flattened (3 floats per row;
    None: the ``msign`` method's schedule, ``ns_steps`` steps). Pure Python on the group: runs
    at trace time, the values are constants of the compiled graph.
    """
    coefficients = group.get("ns_coefficients")
    flat = None
    if coefficients is not None:
        flat = [v for row in ns_table(coefficients, group.get("ns_steps")) for v in row]
    return (
        group.get("update", "msign"),
        group["msign"],
        flat,
        group.get("ns_steps"),
        group.get("ns_algorithm", "auto"),
        float(group["eps"]),
        group.get("ns_dtype"),
        float(group.get("mclip_scale", 1.0)),
    )


@torch.library.custom_op("matfn::muon_orthogonalize", mutates_args=())
def orthogonalize_op(
    X: Tensor,
    update: str,
    method: str,
    table: list[float] | None,
    steps: int | None,
    algorithm: str,
    eps: float,
    ns_dtype: torch.dtype | None,
    mclip_scale: float,
) -> Tensor:
    """``torch.ops.matfn.muon_orthogonalize``: :func:`orthogonalize` of a wide batch, as one op.

    Schema ``(Tensor X, str update, str method, float[]? table, int? steps, str algorithm,
    float eps, ScalarType? ns_dtype, float mclip_scale) -> Tensor``. ``X``: ``(B, s, L)``,
    ``s ≤ L``, never modified. ``update``, ``method`` (the ``msign`` key), ``steps``
    (``ns_steps``), ``algorithm`` (``ns_algorithm``), ``eps``, ``ns_dtype`` and ``mclip_scale``
    are the param group's keys; ``table`` is ``ns_coefficients`` as a flat per-step table
    (3 floats per row, :func:`op_options`) or None. Returns a new contiguous ``(B, s, L)``
    tensor in the iteration dtype (``ns_dtype``, default :func:`iteration_dtype_of`'s).
    No autograd formula: the optimizer runs without gradient. Opaque to dynamo/AOT (Triton
    kernels on CUDA; the schedule and path choice are host work inside).
    """
    group = {
        "update": update,
        "msign": method,
        "ns_coefficients": None
        if table is None
        else [table[i : i + 3] for i in range(0, len(table), 3)],
        "ns_steps": steps,
        "ns_algorithm": algorithm,
        "eps": eps,
        "ns_dtype": ns_dtype,
        "mclip_scale": mclip_scale,
    }
    dtype = iteration_dtype_of(group, X)
    # contiguous: the layout the fake promises; a copy if it would alias X (ops never alias)
    O = orthogonalize(X, group, out_dtype=dtype).contiguous()
    return O.clone() if X.numel() and O.data_ptr() == X.data_ptr() else O


@orthogonalize_op.register_fake
def _(X: Tensor, update, method, table, steps, algorithm, eps, ns_dtype, mclip_scale) -> Tensor:
    return torch.empty_like(
        X,
        dtype=iteration_dtype_of({"ns_dtype": ns_dtype}, X),
        memory_format=torch.contiguous_format,
    )


def orthogonalize_bucket(updates: Sequence[Tensor], group: Mapping[str, Any]) -> list[Tensor]:
    """Orthogonalise a list of same-shape matrices ``(n, m)`` (or ``(k, n, m)``) in one call.

    Stack, one batched :func:`orthogonalize`, split. Outputs have the inputs' shapes and dtype;
    inputs are not modified.
    """
    if not updates:
        return []
    shape = updates[0].shape
    if any(u.shape != shape for u in updates):
        raise ValueError(f"`updates` must share one shape, got {[tuple(u.shape) for u in updates]}")
    X = torch.stack(list(updates)).reshape(-1, shape[-2], shape[-1])
    O = orthogonalize(X, group).to(updates[0].dtype)
    return list(O.reshape(len(updates), *shape).unbind(0))


# --------------------------------------------------------------------------------------------
# Momentum and apply steps
# --------------------------------------------------------------------------------------------


def momentum_inputs(
    grads: list[Tensor], bufs: list[Tensor], momentum: float, nesterov: bool
) -> list[Tensor]:
    r"""EMA momentum ``B ← μB + (1−μ)G`` in place; returns ``(1−μ)G + μB`` (Nesterov) or ``B``.

    Same-dtype pairs use ``lerp`` exactly like torch.optim.Muon; a float32 buffer of a bf16/fp16
    parameter uses ``μB + (1−μ)G`` (``lerp`` needs equal dtypes). Gradients are not modified.
    """
    out: list[Tensor | None] = [None] * len(grads)
    same = [i for i in range(len(grads)) if grads[i].dtype == bufs[i].dtype]
    mixed = [i for i in range(len(grads)) if grads[i].dtype != bufs[i].dtype]
    if same:
        b = [bufs[i] for i in same]
        g = [grads[i] for i in same]
        torch._foreach_lerp_(b, g, 1 - momentum)
        res = torch._foreach_lerp(g, b, momentum) if nesterov else b
        for i, r in zip(same, res, strict=True):
            out[i] = r
    if mixed:
        b = [bufs[i] for i in mixed]
        g = [grads[i] for i in mixed]
        torch._foreach_mul_(b, momentum)
        torch._foreach_add_(b, g, alpha=1 - momentum)
        if nesterov:
            res = torch._foreach_mul(b, momentum)
            torch._foreach_add_(res, g, alpha=1 - momentum)
        else:
            res = b
        for i, r in zip(mixed, res, strict=True):
            out[i] = r
    return out  # type: ignore[return-value]


def drop_empty(
    params: list[Tensor], grads: list[Tensor], bufs: list[Tensor]
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """The ``(param, grad, buffer)`` lists without parameters that have a zero-size dimension.

    Such a parameter has nothing to update, and its shape factor ``r(A, B)`` divides by zero.
    ``numel`` of a DTensor is the global one, so every rank drops the same parameters (an
    empty local shard of a non-empty matrix is kept: the collectives need it).
    """
    if all(p.numel() for p in params):
        return params, grads, bufs
    keep = [i for i, p in enumerate(params) if p.numel()]
    return [params[i] for i in keep], [grads[i] for i in keep], [bufs[i] for i in keep]


def foreach_ok(tensors: list[Tensor]) -> bool:
    """Whether scalar ``torch._foreach_*`` ops are exact here.

    On CPU they round a Python scalar to a bf16/fp16 list's dtype first (``0.998`` becomes
    ``0.9961``), so low-precision CPU tensors take per-tensor ops, which compute in float32.
    """
    return not any(t.dtype in LOW_PRECISION and t.device.type == "cpu" for t in tensors)


def weight_decay_(params: list[Tensor], lr: float | Tensor, weight_decay: float) -> None:
    """Decoupled decay with the unadjusted lr: ``W ← (1 − η λ) W``."""
    if weight_decay == 0 or not params:
        return
    factor = 1 - lr * weight_decay
    if not foreach_ok(params):
        for p in params:
            p.mul_(factor.to(p.device) if isinstance(factor, Tensor) else factor)
    elif isinstance(factor, Tensor):
        by_device: dict[torch.device, list[Tensor]] = {}
        for p in params:
            by_device.setdefault(p.device, []).append(p)
        for device, ps in by_device.items():
            torch._foreach_mul_(ps, factor.to(device))
    else:
        torch._foreach_mul_(params, factor)


def apply_(params: list[Tensor], updates: list[Tensor], scale: float | Tensor) -> None:
    """``W ← W + scale·O`` for same-shape pairs (O in W's dtype or one the add promotes)."""
    if isinstance(scale, Tensor):
        updates = torch._foreach_mul(updates, scale.to(updates[0].device))
        torch._foreach_add_(params, updates)
    elif not foreach_ok(params):
        for p, u in zip(params, updates, strict=True):
            p.add_(u, alpha=scale)
    else:
        torch._foreach_add_(params, updates, alpha=scale)


# --------------------------------------------------------------------------------------------
# Buckets: which matrices are orthogonalised together
# --------------------------------------------------------------------------------------------

#: A bucket member: ``((n, m, k, shape, dtype), index of the parameter)``.
Member = tuple[tuple, int]


def buckets(params: list[Tensor], keys: list[tuple], view: str) -> list[list[Member]]:
    """Group parameter indices by ``keys[i] + (s, L)``, ``s×L`` the wide matrix shape.

    Tall matrices share the bucket of their transpose (``msign(Mᵀ) = msign(M)ᵀ``). Within a
    bucket members are sorted by ``(n, m, k, shape, dtype)``, so that each run of equal members
    is a contiguous slice of the bucket's stack.
    """
    out: dict[tuple, list[Member]] = {}
    for i, p in enumerate(params):
        k, n, m = matrix_shape(p.shape, view)
        key = (*keys[i], min(n, m), max(n, m))
        out.setdefault(key, []).append(((n, m, k, tuple(p.shape), str(p.dtype)), i))
    for members in out.values():
        members.sort(key=lambda t: t[0])
    return list(out.values())


def runs(members: list[Member]) -> list[tuple[tuple, list[int], int]]:
    """The runs of a sorted bucket: ``(member key, indices, first matrix in the stack)``."""
    out, start = [], 0
    for run_key, run in itertools.groupby(members, key=lambda t: t[0]):
        idx = [i for _, i in run]
        out.append((run_key, idx, start))
        start += len(idx) * run_key[2]
    return out
