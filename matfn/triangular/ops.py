r"""The custom ops ``torch.ops.matfn.tri_inv`` and ``torch.ops.matfn.tri_solve``.

:func:`matfn.tri_inv` / :func:`matfn.tri_solve` validate their arguments and call these ops, so
that ``torch.compile(fullgraph=True)``, FakeTensor and ``torch.export`` keep each call as one
opaque node: the body (value checks, the path choice, the Triton kernels on CUDA float32) runs
eagerly inside the node, the fake implementation only gives the result's shape and dtype.

Schema (operands already validated and broadcast by the public functions)::

    matfn::tri_inv(Tensor Q, Tensor K, Tensor diag, Tensor? log_decay,
                   int chunk_size, bool check_finite) -> Tensor
    matfn::tri_solve(Tensor Q, Tensor K, Tensor V, Tensor diag, Tensor? log_decay,
                     int chunk_size, bool check_finite) -> Tensor

``Q, K`` ``(..., n, d)``; ``V`` ``(..., n, e)``; ``diag`` the diagonal ``λ`` with shape
``(..., n) = Q.shape[:-1]`` (a number becomes a 0-dim tensor expanded to it); ``log_decay``
``None`` or ``(..., n, g)`` with the batch dims of ``Q``, ``g = 1`` (one decay per row) or
``g = d`` (per channel). The result, ``(..., n, n)`` or ``(..., n, e)``, is a fresh contiguous
tensor in the promoted dtype of all tensor operands. ``check_finite=True`` tests every operand
for NaN/Inf and ``diag`` for zeros in one host sync; ``False`` reads no value on the host, so a
call can be captured in a CUDA graph.

Gradients (``register_autograd``) go through two more ops, ``matfn::tri_inv_backward`` and
``matfn::tri_solve_backward``, which run the exact backward of :mod:`matfn.triangular.backward`
(``log_decay`` included) on the inputs in the compute dtype; opaque nodes too, so a compiled
backward neither unrolls their chunk loops nor recompiles per ``n``. Their bodies,
:func:`inv_grads` and :func:`solve_grads`, are also what a graph-replayed call's backward runs
(without the op's dispatch). Once differentiable (the backward ops have no autograd).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

from matfn import _graphs
from matfn._validation import assert_all_finite

from .backward import tri_inv_backward, tri_solve_backward
from .paths import inv_flat, solve_flat

__all__ = [
    "SingularTriangularError",
    "check_values",
    "values_ok",
    "unpack_needed",
    "result_dtype",
    "tri_inv_op",
    "tri_solve_op",
    "tri_inv_backward_op",
    "tri_solve_backward_op",
    "inv_grads",
    "solve_grads",
]


class SingularTriangularError(ZeroDivisionError, ValueError):
    """``T`` has a zero on its diagonal, so it is singular (the message names the index)."""


SingularTriangularError.__module__ = "matfn.triangular"


# ---------------------------------------------------------------------------------------------
# shared pieces of the bodies
# ---------------------------------------------------------------------------------------------


def result_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """Promotion of the operands' dtypes (``None`` skipped)."""
    dtypes = [t.dtype for t in tensors if t is not None]
    dtype = dtypes[0]
    for dt in dtypes[1:]:
        dtype = torch.promote_types(dtype, dt)
    return dtype


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_values(
    Q: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor | None,
    lam: torch.Tensor,
    decay: torch.Tensor | None,
) -> None:
    """Raise on NaN/Inf in any operand or a zero in ``λ``: one host sync for all of them."""
    if not lam.numel():  # then Q, K, V are empty too
        return
    zero = lam == 0
    if assert_all_finite(zero.any(), Q=Q, K=K, V=V, diag=lam, log_decay=decay):
        idx = tuple(int(i) for i in zero.nonzero()[0])
        raise SingularTriangularError(
            f"T is singular: its diagonal `diag` is zero at index {idx[-1]} "
            f"(full index {idx} of diag broadcast to {tuple(lam.shape)})"
        )


def values_ok(
    Q: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor | None,
    lam: torch.Tensor,
    decay: torch.Tensor | None = None,
) -> torch.Tensor:
    """The test of :func:`check_values` as a 0-dim bool device tensor (no host sync).

    True when every operand is finite and ``λ`` has no zero; a caller reads it after launching
    the work and calls :func:`check_values` for the error when it is False.
    """
    flags = [torch.isfinite(x).all() for x in (Q, K, V, lam, decay) if x is not None]
    return torch.stack([*flags, (lam != 0).all()]).all()


def _prepare(
    Q: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor | None,
    lam: torch.Tensor,
    decay: torch.Tensor | None,
    cdt: torch.dtype,
) -> tuple[torch.Tensor, ...]:
    """Flatten the batch dims and convert to the compute dtype (``None`` kept).

    ``Q, K`` → ``(B, n, d)``, ``V`` → ``(B, n, e)``, ``λ`` → ``(B, n)``, ``ℓ`` → ``(B, n, g)``.
    """
    n, d = Q.shape[-2:]
    B = math.prod(Q.shape[:-2])
    Qf = Q.reshape(B, n, d).to(cdt)
    Kf = K.reshape(B, n, d).to(cdt)
    Vf = None if V is None else V.reshape(B, n, V.shape[-1]).to(cdt)
    lamf = lam.reshape(B, n).to(cdt)
    Lf = None if decay is None else decay.reshape(B, n, decay.shape[-1]).to(cdt)
    return Qf, Kf, Vf, lamf, Lf


def _inv_compute(Q, K, lam, decay, chunk_size: int) -> torch.Tensor:
    """``T⁻¹`` in the result dtype (non-empty operands, no value checks)."""
    dtype = result_dtype(Q, K, lam, decay)
    n = Q.shape[-2]
    batch = Q.shape[:-2]
    Qf, Kf, _, lamf, Lf = _prepare(Q, K, None, lam, decay, compute_dtype(dtype))
    Y = inv_flat(Qf, Kf, lamf, chunk_size, Lf)
    return Y.reshape(*batch, n, n).to(dtype)


def _solve_compute(Q, K, V, lam, decay, chunk_size: int) -> torch.Tensor:
    """``T⁻¹ V`` in the result dtype (non-empty operands, no value checks)."""
    dtype = result_dtype(Q, K, V, lam, decay)
    Qf, Kf, Vf, lamf, Lf = _prepare(Q, K, V, lam, decay, compute_dtype(dtype))
    X = solve_flat(Qf, Kf, Vf, lamf, chunk_size, Lf)
    return X.reshape(V.shape).to(dtype)


def _empty(Q: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether the batch or ``n`` (or ``e``) is zero: the result is then empty."""
    return Q.shape[-2] == 0 or math.prod(Q.shape[:-2]) == 0 or any(t.shape[-1] == 0 for t in others)


# ---------------------------------------------------------------------------------------------
# the ops
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("matfn::tri_inv", mutates_args=())
def tri_inv_op(
    Q: torch.Tensor,
    K: torch.Tensor,
    diag: torch.Tensor,
    log_decay: torch.Tensor | None,
    chunk_size: int,
    check_finite: bool,
) -> torch.Tensor:
    """``T⁻¹`` for ``T = Λ + tril(Q Kᵀ, −1)`` (decayed with ``log_decay``): see the module doc.

    ``check_finite`` syncs once with the host (NaN/Inf and zero pivots); the body is otherwise
    free of host syncs.
    """
    if check_finite:
        check_values(Q, K, None, diag, log_decay)
    n = Q.shape[-2]
    if _empty(Q):
        dtype = result_dtype(Q, K, diag, log_decay)
        return Q.new_zeros((*Q.shape[:-2], n, n), dtype=dtype)
    return _inv_compute(Q, K, diag, log_decay, chunk_size).contiguous()


@tri_inv_op.register_fake
def _(Q, K, diag, log_decay, chunk_size, check_finite):
    n = Q.shape[-2]
    dtype = result_dtype(Q, K, diag, log_decay)
    return Q.new_empty((*Q.shape[:-2], n, n), dtype=dtype)


@torch.library.custom_op("matfn::tri_solve", mutates_args=())
def tri_solve_op(
    Q: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor,
    diag: torch.Tensor,
    log_decay: torch.Tensor | None,
    chunk_size: int,
    check_finite: bool,
) -> torch.Tensor:
    """``T⁻¹ V`` for ``T = Λ + tril(Q Kᵀ, −1)`` (decayed with ``log_decay``): see the module doc.

    ``check_finite`` syncs once with the host; the body is otherwise free of host syncs.
    """
    if check_finite:
        check_values(Q, K, V, diag, log_decay)
    if _empty(Q, V):
        dtype = result_dtype(Q, K, V, diag, log_decay)
        return V.new_zeros(V.shape, dtype=dtype)
    return _solve_compute(Q, K, V, diag, log_decay, chunk_size).contiguous()


@tri_solve_op.register_fake
def _(Q, K, V, diag, log_decay, chunk_size, check_finite):
    dtype = result_dtype(Q, K, V, diag, log_decay)
    return V.new_empty(V.shape, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# backward ops and autograd
# ---------------------------------------------------------------------------------------------


def _cast_grads(
    grads: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor | None]
) -> list[torch.Tensor | None]:
    """Each gradient in the shape and dtype of its input (``None`` kept)."""
    return [
        None if g is None else g.reshape(x.shape).to(x.dtype)
        for g, x in zip(grads, like, strict=True)
    ]


def _fresh(
    grads: Sequence[torch.Tensor | None], inputs: Sequence[torch.Tensor | None]
) -> list[torch.Tensor]:
    """The computed gradients, contiguous, none sharing memory with an input."""
    ptrs = {x.untyped_storage().data_ptr() for x in inputs if x is not None and x.numel()}
    out = []
    for g in grads:
        if g is not None:
            g = g.contiguous()
            shared = g.numel() and g.untyped_storage().data_ptr() in ptrs
            out.append(g.clone() if shared else g)
    return out


def _needed_like(
    inputs: Sequence[torch.Tensor | None], needs: Sequence[bool]
) -> list[torch.Tensor]:
    """The fake gradients: one empty tensor like each input marked in ``needs``."""
    return [x.new_empty(x.shape) for x, need in zip(inputs, needs, strict=True) if need]


def inv_grads(
    Q: torch.Tensor,
    K: torch.Tensor,
    diag: torch.Tensor,
    decay: torch.Tensor | None,
    Y: torch.Tensor | None,
    grad: torch.Tensor,
    chunk_size: int,
    needs: Sequence[bool],
    *,
    replay: bool,
) -> list[torch.Tensor]:
    """Gradients of ``Y = T⁻¹`` w.r.t. ``(Q, K, diag, log_decay)``, those in ``needs``.

    Returns the needed ones, in that order, in their inputs' shapes and dtypes:
    :func:`matfn.triangular.backward.tri_inv_backward` in the compute dtype. ``Y``: the
    forward's result, read with ``decay`` (solved again where it was rounded to a half dtype),
    else ignored. ``replay``: replay the computation from a CUDA graph where it is launch-bound
    (:mod:`matfn._graphs`; the backward of a ``cuda_graph=True`` call, which calls this
    directly: the op's dispatch costs more host time than the replay).
    """
    inputs = (Q, K, diag, decay)
    if _empty(Q):
        return [x.new_zeros(x.shape) for x, need in zip(inputs, needs, strict=True) if need]
    cdt = compute_dtype(result_dtype(Q, K, diag, decay))
    Qf, Kf, _, lamf, Lf = _prepare(Q, K, None, diag, decay, cdt)
    B, n, d = Qf.shape
    dYf = grad.reshape(-1, n, n).to(cdt)
    operands = [Qf, Kf, lamf, dYf]
    if decay is not None:
        Yf = Y.reshape(B, n, n) if Y.dtype == cdt else inv_flat(Qf, Kf, lamf, chunk_size, Lf)
        operands += [Lf, Yf]
    call = functools.partial(_inv_grads_flat, chunk_size=chunk_size, needs=tuple(needs))
    grads = _maybe_replayed(replay, call, operands, work=B * n * n * d)
    return _fresh(_cast_grads(unpack_needed(grads, needs), inputs), (*inputs, Y, grad))


@torch.library.custom_op("matfn::tri_inv_backward", mutates_args=())
def tri_inv_backward_op(
    Q: torch.Tensor,
    K: torch.Tensor,
    diag: torch.Tensor,
    log_decay: torch.Tensor | None,
    Y: torch.Tensor | None,
    grad: torch.Tensor,
    chunk_size: int,
    needs: list[bool],
) -> list[torch.Tensor]:
    """:func:`inv_grads` as one opaque node.

    So a compiled backward neither unrolls the chunk loops nor recompiles per ``n``.
    """
    return inv_grads(Q, K, diag, log_decay, Y, grad, chunk_size, needs, replay=False)


@tri_inv_backward_op.register_fake
def _(Q, K, diag, log_decay, Y, grad, chunk_size, needs):
    return _needed_like((Q, K, diag, log_decay), needs)


def _inv_grads_flat(Qf, Kf, lamf, dYf, Lf=None, Yf=None, *, chunk_size: int, needs):
    """The needed gradients of :func:`tri_inv_backward`, as a tuple (what a graph captures)."""
    grads = tri_inv_backward(Qf, Kf, lamf, dYf, chunk_size, needs, Lf, Yf)
    return tuple(g for g, need in zip(grads, needs, strict=True) if need)


def _solve_grads_flat(Qf, Kf, lamf, Xf, dXf, Lf=None, *, chunk_size: int, needs):
    """``dV`` and the needed ones of ``(dQ, dK, dλ, dℓ)`` of :func:`tri_solve_backward`."""
    grads = tri_solve_backward(Qf, Kf, lamf, Xf, dXf, chunk_size, needs, Lf)
    return tuple(g for g, need in zip(grads, (*needs[:2], True, *needs[2:]), strict=True) if need)


def _maybe_replayed(replay: bool, call: functools.partial, operands, *, work: int) -> tuple:
    """``call(*operands)``, replayed from a CUDA graph when ``replay`` and it is launch-bound.

    Launch-bound: :func:`matfn._graphs.graph_applies` (on the detached operands).
    """
    operands = tuple(x.detach() for x in operands)
    if replay and _graphs.graph_applies(*operands, work=work):
        return _graphs.replay_or_capture(call, *operands)
    return call(*operands)


def solve_grads(
    Q: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor,
    diag: torch.Tensor,
    decay: torch.Tensor | None,
    X: torch.Tensor,
    grad: torch.Tensor,
    chunk_size: int,
    needs: Sequence[bool],
    *,
    replay: bool,
) -> list[torch.Tensor]:
    """Gradients of ``X = T⁻¹ V`` w.r.t. ``(Q, K, V, diag, log_decay)``, those in ``needs``.

    As :func:`inv_grads`, with :func:`matfn.triangular.backward.tri_solve_backward`, which
    reads ``X`` in the compute dtype: the saved result is it unless it was rounded to a half
    dtype, then it is solved again.
    """
    nq, nk, nv, nl, nd = needs
    inputs = (Q, K, V, diag, decay)
    if _empty(Q, V):
        return [x.new_zeros(x.shape) for x, need in zip(inputs, needs, strict=True) if need]
    cdt = compute_dtype(result_dtype(Q, K, V, diag, decay))
    Qf, Kf, Vf, lamf, Lf = _prepare(Q, K, V, diag, decay, cdt)
    B, n, d = Qf.shape
    Xf = X.reshape(Vf.shape) if X.dtype == cdt else solve_flat(Qf, Kf, Vf, lamf, chunk_size, Lf)
    dXf = grad.reshape(Xf.shape).to(cdt)
    work = B * n * d * (d + Xf.shape[-1])
    operands = [Qf, Kf, lamf, Xf, dXf] + ([] if Lf is None else [Lf])
    call = functools.partial(_solve_grads_flat, chunk_size=chunk_size, needs=(nq, nk, nl, nd))
    grads = _maybe_replayed(replay, call, operands, work=work)
    dQ, dK, dV, dlam, ddecay = unpack_needed(grads, (nq, nk, True, nl, nd))
    grads = _cast_grads((dQ, dK, dV if nv else None, dlam, ddecay), inputs)
    return _fresh(grads, (*inputs, X, grad))


@torch.library.custom_op("matfn::tri_solve_backward", mutates_args=())
def tri_solve_backward_op(
    Q: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor,
    diag: torch.Tensor,
    log_decay: torch.Tensor | None,
    X: torch.Tensor,
    grad: torch.Tensor,
    chunk_size: int,
    needs: list[bool],
) -> list[torch.Tensor]:
    """:func:`solve_grads` as one opaque node (as :func:`tri_inv_backward_op`)."""
    return solve_grads(Q, K, V, diag, log_decay, X, grad, chunk_size, needs, replay=False)


@tri_solve_backward_op.register_fake
def _(Q, K, V, diag, log_decay, X, grad, chunk_size, needs):
    return _needed_like((Q, K, V, diag, log_decay), needs)


def unpack_needed(
    grads: Sequence[torch.Tensor], needs: Sequence[bool]
) -> list[torch.Tensor | None]:
    """The gradients of the inputs marked in ``needs`` in their slots, ``None`` elsewhere."""
    it = iter(grads)
    return [next(it) if need else None for need in needs]


def _setup_inv(ctx, inputs, output) -> None:
    Q, K, diag, log_decay, chunk_size, _ = inputs
    ctx.chunk_size = chunk_size
    # the decayed backward reads T⁻¹; the undecayed one solves twice instead of keeping it
    ctx.save_for_backward(Q, K, diag, log_decay, None if log_decay is None else output)


def _backward_inv(ctx, dY: torch.Tensor):
    """``(dQ, dK, dλ, dℓ)`` for the inputs that need them, through the backward op."""
    Q, K, lam, decay, Y = ctx.saved_tensors
    needs = [bool(x) for x in ctx.needs_input_grad[:4]]
    if not any(needs):
        return (None,) * 6
    grads = torch.ops.matfn.tri_inv_backward(Q, K, lam, decay, Y, dY, ctx.chunk_size, needs)
    return (*unpack_needed(grads, needs), None, None)


def _setup_solve(ctx, inputs, output) -> None:
    Q, K, V, diag, log_decay, chunk_size, _ = inputs
    ctx.chunk_size = chunk_size
    ctx.save_for_backward(Q, K, V, diag, log_decay, output)


def _backward_solve(ctx, dX: torch.Tensor):
    """``(dQ, dK, dV, dλ, dℓ)`` for the inputs that need them, through the backward op."""
    Q, K, V, lam, decay, X = ctx.saved_tensors
    needs = [bool(x) for x in ctx.needs_input_grad[:5]]
    if not any(needs):
        return (None,) * 7
    grads = torch.ops.matfn.tri_solve_backward(Q, K, V, lam, decay, X, dX, ctx.chunk_size, needs)
    return (*unpack_needed(grads, needs), None, None)


tri_inv_op.register_autograd(_backward_inv, setup_context=_setup_inv)
tri_solve_op.register_autograd(_backward_solve, setup_context=_setup_solve)
