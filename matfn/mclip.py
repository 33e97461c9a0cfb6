r"""mclip: singular-value clipping ``U clip(Σ, min_sv, max_sv) Vᵀ`` through msign."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from typing import Literal

import torch

from . import _graphs, _scaling
from ._autocast import autocast_disabled, no_autocast
from ._batching import flatten_batch, to_wide, unflatten_batch
from ._validation import assert_finite, check_compute_dtype, check_eps, check_matrix, check_real
from .coefficients import Table
from .kernels.recording import recording
from .msign import (
    Algorithm,
    Method,
    Steps,
    check_options,
    from_op,
    in_result_layout,
    msign_wide,
    op_method,
    op_steps,
    result_like,
)

__all__ = ["mclip", "mclip_op", "mclip_backward_op"]

Form = Literal["F3", "F2", "dilation", "svd"]
FORMS = ("F3", "F2", "dilation", "svd")
#: Default step count of every inner msign (steps=None with polar_express): the Gram-side signs
#: must resolve |σ² − β²| relative to ‖M Mᵀ − β² I‖_F, which 5 steps do not (max σ ≈ 1.3β).
MCLIP_DEFAULT_STEPS = 8


def _clip_above(
    M: torch.Tensor,
    O: torch.Tensor,
    beta: float | torch.Tensor,
    form: str,
    sign: Callable[[torch.Tensor], torch.Tensor],
    check_keep: bool = False,
) -> torch.Tensor:
    """``U min(Σ, β) Vᵀ`` for a wide batch ``(B, s, L)`` given ``O = msign(M)``.

    ``beta``: one ``β > 0`` for the batch, or a ``(B, 1, 1)`` float64 tensor of one per matrix
    (rescaled inputs). ``sign`` computes msign of a wide batch. Formulas (docs/math.md §3.2)
    with ``G = M Mᵀ`` on the short side and ``β`` folded in by scale invariance
    (``msign(G/β² − I) = msign(G − β² I)``):

    * F2: ``½[M + βO + msign(G − β²I)(βO − M)]``;
    * F3: ``½[msign(G + β²I)(βO + M) + msign(G − β²I)(βO − M)]``;
    * dilation: ``Q + P M`` with ``[[P, Q], [·, ·]] = msign([[βI, M], [Mᵀ, βI]])``.

    ``check_keep``: matrices with ``β ≥ ‖M‖_F ≥ σ_max`` come back exactly (the clip is the
    identity for them, and the formulas would cancel ``βO ± M``: β ≫ σ loses M to rounding);
    they are iterated with ``β = ‖M‖_F`` (finite) and replaced.
    """
    s = M.shape[-2]
    eye = torch.eye(s, dtype=M.dtype, device=M.device)
    keep = None
    if check_keep:
        if not isinstance(beta, torch.Tensor):
            beta = torch.full((M.shape[0], 1, 1), beta, dtype=torch.float64, device=M.device)
        bound = torch.linalg.matrix_norm(M, keepdim=True).to(torch.float64)
        keep = beta >= bound
        beta = torch.where(keep, bound, beta)
    if isinstance(beta, torch.Tensor):
        # β² rounded once from float64, as the scalar path's Python product
        beta, beta2 = beta.to(M.dtype), (beta * beta).to(M.dtype)
    else:
        beta2 = beta * beta
    if form == "dilation":
        L = M.shape[-1]
        H = torch.zeros(M.shape[0], s + L, s + L, dtype=M.dtype, device=M.device)
        H[:, :s, s:] = M
        H[:, s:, :s] = M.mT
        diagonal = H.diagonal(dim1=-2, dim2=-1)
        if isinstance(beta, torch.Tensor):
            diagonal.copy_(beta.reshape(-1, 1).expand(-1, s + L))
        else:
            diagonal.fill_(beta)
        OH = sign(H)
        out = OH[:, :s, s:] * beta + OH[:, :s, :s] @ M
    else:
        G = M @ M.mT
        shifted = G - beta2 * eye
        if form == "F2":
            out = 0.5 * (M + beta * O + sign(shifted) @ (beta * O - M))
        else:
            # F3: both Gram-side signs in one batched call.
            both = sign(torch.cat([G + beta2 * eye, shifted]))
            plus, minus = both.chunk(2)
            out = 0.5 * (plus @ (beta * O + M) + minus @ (beta * O - M))
    return out if keep is None else torch.where(keep, M, out)


def _clip_svd(
    X: torch.Tensor, min_sv: float | torch.Tensor, max_sv: float | torch.Tensor
) -> torch.Tensor:
    """The exact clip by the SVD; bounds as floats or ``(B, 1, 1)`` float64 tensors."""
    work = X.to(torch.float64 if X.dtype == torch.float64 else torch.float32)
    U, S, Vh = torch.linalg.svd(work, full_matrices=False)
    tol = max(X.shape[-2:]) * torch.finfo(work.dtype).eps * S[..., :1]
    if isinstance(max_sv, torch.Tensor):
        lo = torch.as_tensor(min_sv, dtype=torch.float64, device=S.device).reshape(-1, 1)
        hi = max_sv.reshape(-1, 1)
        clamped = torch.minimum(torch.maximum(S, lo.to(S.dtype)), hi.to(S.dtype))
    else:
        clamped = S.clamp(min=min_sv, max=max_sv)
    clipped = torch.where(S > tol, clamped, torch.zeros_like(S))
    return (U * clipped.unsqueeze(-2)) @ Vh


def _plan(M: torch.Tensor, max_sv: float, eps: float, check_finite: bool) -> tuple[bool, str]:
    """``(rescale, keep)``: whether to rescale M by powers of two, and the exact-M rule's mode.

    One norm pass and one host sync (which carries the finiteness check): rescale unless every
    ``‖M_b‖_F`` lies in ``[2√(eps·s), max^{1/4}/4]`` (so ``M Mᵀ``, the inner norms ``Σσ⁴`` and the
    inner msign's floor eps stay out of trouble; rescaling is exact, so this only chooses the
    cheaper path); ``keep`` is ``"all"`` when ``max_sv ≥ ‖M_b‖_F`` for every matrix (M is the
    answer), ``"none"`` when for none, else ``"some"`` (decided per matrix on the device).
    CUDA calls with ``check_finite=False``, graph captures and ``torch.compile`` skip it (no
    sync): ``(False, "none")``.
    """
    if not check_finite and (M.is_cuda or recording() or torch.compiler.is_compiling()):
        return False, "none"
    acc = _scaling.accumulate_dtype(M.dtype)
    norms = torch.linalg.matrix_norm(M.detach(), dtype=acc)
    smallest, largest = torch.stack(torch.aminmax(norms.reshape(-1))).tolist()
    if check_finite and not math.isfinite(smallest + largest):
        assert_finite(M, "M")
    lo_acc, _ = _scaling.norm_range(acc)
    lo = 2 * max(math.sqrt(eps * min(M.shape[-2:])), math.sqrt(lo_acc))
    hi = torch.finfo(acc).max ** 0.25 / 4
    rescale = not (lo <= smallest and largest <= hi)
    if rescale:
        return True, "some"
    return False, "all" if max_sv >= largest else "none" if max_sv < smallest else "some"


@no_autocast
def mclip(
    M: torch.Tensor,
    *,
    max_sv: float = 1.0,
    min_sv: float = 0.0,
    method: Method = "polar_express",
    steps: Steps = None,
    form: Form = "F3",
    algorithm: Algorithm = "auto",
    eps: float = 1e-7,
    compute_dtype: torch.dtype | None = None,
    check_finite: bool = True,
    cuda_graph: bool = True,
) -> torch.Tensor:
    r"""Clip singular values into ``[min_sv, max_sv]``: ``U clip(Σ, min_sv, max_sv) Vᵀ``.

    Parameters
    ----------
    M : torch.Tensor
        Real ``(..., n, m)`` tensor, any batch dims. Never modified.
    max_sv : float
        Upper bound ``β > 0``; ``inf`` allowed. Rule: a matrix with ``β ≥ ‖M‖_F`` (a cheap bound
        on ``σ_max``) comes back exactly, ``max_sv=inf`` included (the clip is the identity
        there); for β between ``σ_max`` and ``‖M‖_F`` the iteration's accuracy applies. On CUDA
        with ``check_finite=False`` the rule (and the rescale of the Notes) needs the check's
        host sync and is skipped, except for ``max_sv=inf`` with ``min_sv=0``.
    min_sv : float
        Lower bound ``α``, finite, with ``0 ≤ α ≤ β``. Only nonzero singular values are lifted:
        the rank is preserved (for rank-deficient M the lifted directions would not be unique).
    method, steps, algorithm, eps, check_finite, cuda_graph
        As in :func:`matfn.msign` (``eps`` is the inner calls' normalisation floor, met only by
        exact zeros: the inputs are rescaled first); they apply to every inner msign call,
        except that ``steps=None`` with ``polar_express`` means 8 steps (5 leave the largest
        singular value near ``1.3·max_sv``). ``method="svd"`` gives the exact result through
        ``torch.linalg.svd`` (so does ``form="svd"``). A per-step table ``[(a, b, c), …]`` runs
        in every inner msign (each normalised by its own ``‖·‖_F``; ``steps`` None or the
        table's length); the clip is as accurate as the table's ``f ≈ 1`` (docs/math.md §3.3),
        so a table that does not converge, such as Keller's quintic, clips loosely.
    compute_dtype : torch.dtype, optional
        Iteration dtype; default float32 (float64 for float64 input), on CUDA too: bfloat16
        cannot resolve ``σ² − β²`` next to ``σ_max² ≫ β²`` and lets clipped values through.
    form : {"F3", "F2", "dilation", "svd"}
        Which identity expresses the clip through msign (docs/math.md §3.2–3.3). ``F3`` (default,
        3 msign calls) is robust when ``σ_max ≫ max_sv`` with few steps, as in an optimizer
        update; ``F2`` (2 calls) is the cheapest and the most accurate for moderate
        ``σ_max ≲ 10·max_sv``; ``dilation`` (one msign of an ``(n+m)``-square matrix, ~8× the cost)
        is the most accurate with many steps.

    Returns
    -------
    torch.Tensor
        Same shape and dtype as ``M``.

    Raises
    ------
    TypeError, ValueError
        Bad input or a malformed table as in :func:`matfn.msign`; ``max_sv ≤ 0`` or NaN,
        ``min_sv < 0``, not finite or ``> max_sv``; unknown ``form``.

    Notes
    -----
    Scale: ``mclip(sM, max_sv=sβ, min_sv=sα) = s·mclip(M, max_sv=β, min_sv=α)`` to rounding for
    any finite input and any ``s > 0`` that keeps the bounds representable (bitwise for powers
    of two): a batch with a ``‖M_b‖_F`` outside ``[2√(eps·s), max^{1/4}/4]`` of the accumulate
    dtype is rescaled per matrix by a power of two to largest entry in ``[½, 1)`` (exact), so
    ``M Mᵀ`` and the inner norms never over- or underflow. The test rides on the finiteness
    check's pass and sync (skipped on CUDA with ``check_finite=False``: inputs must then be in
    that range, as the optimizer's normalised ones are). Meta tensors propagate shape and
    dtype; autocast is off inside.

    The computation is the custom op ``torch.ops.matfn.mclip`` (one node under
    ``torch.compile(fullgraph=True)``, FakeTensor and ``torch.export``). Host syncs: the plan's
    one (finiteness check, rescale test, exact-M rule) and those of ``steps="auto"``; none on
    CUDA with ``check_finite=False`` and fixed steps (capturable in the caller's CUDA graph).
    Differentiable in reverse mode: the backward (``torch.ops.matfn.mclip_backward``) recomputes
    the forward with autograd on and differentiates what it computed, the unrolled iterations
    (not the exact clip).

    With ``O = msign(M)`` and, on the short side, ``G = M Mᵀ``:
    ``mclip_[0,β](M) = ½[msign(G + β²I)(βO + M) + msign(G − β²I)(βO − M)]`` (F3). In exact
    arithmetic ``msign(G + β²I) = I`` and F3 equals F2; numerically that factor cancels part of
    the error of the ``G − β²I`` term for ``σ ≫ β``. A lower bound uses
    ``clip_[α,β](x) = min(x, β) + α·sign(x) − min(x, α)``.

    Cost (``s = min(n, m)``, ``L = max(n, m)``): F2 is msign(M) + one ``s×s`` msign + 2 GEMMs
    (``4 s² L``); F3 adds one more ``s×s`` msign (batched with the other) and one GEMM.

    Accuracy: the Gram-side msign resolves ``|σ² − β²|`` only down to about
    ``ℓ·‖G − β²I‖_F``, so singular values close to ``max_sv`` are clipped loosely with few steps,
    and with ``σ_max ≫ β`` the small singular values are distorted too (forming ``G`` squares the
    dynamic range; the dilation form avoids that). With the defaults (F3, 8 Polar-Express steps,
    float32) the result's largest singular value stays within 1% of ``max_sv`` for
    ``σ_max/β ≤ 30`` and within 7% for ``σ_max/β`` up to 1000 on 32×64 test spectra (worst case
    over a second singular value scanned through ``[β, 30β]``: 1.068β at ``σ_max = 100β``,
    ``σ₂ ≈ 1.4β``; no fixed step count does better everywhere, the bump only moves). The
    unresolved band grows with ``‖M Mᵀ − β²I‖_F``, i.e. with the number of large singular values:
    128 values log-spaced in ``[0.03β, 30β]`` give 1.02β. Singular values just below ``β`` are
    pulled up towards ``β`` by up to 0.013β (``σ_max = 30β``); for ``σ_max/β ≳ 100`` the ones
    below ``β`` are instead shrunk towards 0 (by up to 0.1β at 100, 0.98β at 1000).
    ``steps="auto"`` keeps the largest within 0.1% of ``β`` up to 1000 and converges to the SVD
    result for spectra with ``σ_max/β ≲ 30``.

    References
    ----------
    Su Jianlin, kexue.fm/archives/11006 and 11059 (2025); leloykun, "Numerically Stable Spectral
    Clipping Via Newton-Schulz Iteration" (2025).

    Examples
    --------
    >>> import torch, matfn
    >>> M = torch.diag(torch.tensor([3.0, 0.5], dtype=torch.float64))
    >>> matfn.mclip(M, method="svd")
    tensor([[1.0000, 0.0000],
            [0.0000, 0.5000]], dtype=torch.float64)
    """
    check_matrix(M, "M", check_finite=False)
    method = check_options(method, steps, algorithm)
    if form not in FORMS:
        raise ValueError(f"`form` must be one of {FORMS}, got {form!r}")
    max_sv = check_real(max_sv, "max_sv", low=0.0, low_open=True, finite=False)
    min_sv = check_real(min_sv, "min_sv", low=0.0)
    if min_sv > max_sv:
        raise ValueError(f"`min_sv` must satisfy 0 <= min_sv <= max_sv, got {min_sv!r}")
    eps = check_eps(eps)
    check_compute_dtype(compute_dtype)
    if M.is_meta:
        return torch.empty_like(M)
    options = (max_sv, min_sv, method, steps, form, algorithm, eps, compute_dtype, check_finite)
    exact = method == "svd" or form == "svd"
    if (
        cuda_graph
        and not torch.compiler.is_compiling()
        and steps != "auto"
        and not exact
        and _graphs.ns_graph_applies(M)
    ):
        return _mclip_eager(M, *options, graph=True)
    name, table = op_method(method)
    return torch.ops.matfn.mclip(
        M, max_sv, min_sv, name, table, *op_steps(steps), form, algorithm, eps, compute_dtype,
        check_finite,
    )  # fmt: skip


@torch.library.custom_op("matfn::mclip", mutates_args=())
def mclip_op(
    M: torch.Tensor,
    max_sv: float,
    min_sv: float,
    method: str,
    table: list[float],
    steps: int | None,
    auto_steps: bool,
    form: str,
    algorithm: str,
    eps: float,
    compute_dtype: torch.dtype | None,
    check_finite: bool,
) -> torch.Tensor:
    """``torch.ops.matfn.mclip``: :func:`mclip` of validated options, as one graph node.

    ``method``, ``table``, ``steps`` and ``auto_steps`` encode the method and steps as in
    ``torch.ops.matfn.msign`` (:func:`matfn.msign.msign_op`); the other arguments are
    :func:`mclip`'s. The plan (:func:`_plan`: finiteness check, rescale, the exact-M rule) and
    the iterations run here. The result has :func:`matfn.msign.result_like`'s layout and never
    aliases ``M``. Differentiable (reverse mode): the backward is
    ``torch.ops.matfn.mclip_backward``, the gradient of the computation itself (the unrolled
    iterations, not of the exact clip).
    """
    with autocast_disabled():
        method_, steps_ = from_op(method, table, steps, auto_steps)
        options = (max_sv, min_sv, method_, steps_, form, algorithm, eps, compute_dtype)
        return in_result_layout(_mclip_eager(M, *options, check_finite))


@mclip_op.register_fake
def _mclip_fake(M, *options):
    return result_like(M)


@torch.library.custom_op("matfn::mclip_backward", mutates_args=())
def mclip_backward_op(
    grad: torch.Tensor,
    M: torch.Tensor,
    max_sv: float,
    min_sv: float,
    method: str,
    table: list[float],
    steps: int | None,
    auto_steps: bool,
    form: str,
    algorithm: str,
    eps: float,
    compute_dtype: torch.dtype | None,
    check_finite: bool,
) -> torch.Tensor:
    """``torch.ops.matfn.mclip_backward``: the vector-Jacobian product of ``torch.ops.matfn.mclip``.

    ``grad``: the cotangent of the result; the other arguments are the forward's. Recomputes
    the forward with autograd on (every step is a torch operation on CPU) and back-propagates
    ``grad`` through it: the derivative of what mclip computed, unrolled iterations included.
    Cost: a forward and its backward; nothing is kept between the two passes.
    """
    with autocast_disabled(), _autograd_inside_op():
        X = M.detach().requires_grad_()
        method_, steps_ = from_op(method, table, steps, auto_steps)
        options = (max_sv, min_sv, method_, steps_, form, algorithm, eps, compute_dtype)
        out = _mclip_eager(X, *options, check_finite)
        (gM,) = torch.autograd.grad(out, X, grad.to(out.dtype))
    gM = in_result_layout(gM.to(M.dtype))
    if gM.untyped_storage().data_ptr() == grad.untyped_storage().data_ptr():
        gM = gM.clone()  # the exact-M rule's identity passes grad through: never alias it
    return gM


@contextlib.contextmanager
def _autograd_inside_op() -> Iterator[None]:
    """Grad mode and the autograd dispatch keys on, inside a custom op's body.

    An op's body runs below autograd (its dispatch keys are excluded, so ``enable_grad`` alone
    records nothing); :func:`mclip_backward_op` differentiates its recomputed forward, so it
    lifts that exclusion for its own duration (the autocast keys stay excluded).
    """
    C = torch._C
    exclude = C._dispatch_tls_local_exclude_set()
    for key in (
        C.DispatchKey.AutogradFunctionality,
        C.DispatchKey.AutogradOther,
        C.DispatchKey.AutogradNestedTensor,
    ):
        exclude = exclude.remove(key)
    with C._ForceDispatchKeyGuard(C._dispatch_tls_local_include_set(), exclude):
        with torch.enable_grad():
            yield


@mclip_backward_op.register_fake
def _mclip_backward_fake(grad, M, *options):
    return result_like(M)


def _mclip_setup_context(ctx, inputs, output) -> None:
    ctx.options = inputs[1:]
    ctx.save_for_backward(inputs[0])


def _mclip_backward(ctx, grad: torch.Tensor):
    (M,) = ctx.saved_tensors
    gM = torch.ops.matfn.mclip_backward(grad, M, *ctx.options)
    return (gM,) + (None,) * len(ctx.options)


mclip_op.register_autograd(_mclip_backward, setup_context=_mclip_setup_context)


def _mclip_eager(
    M: torch.Tensor,
    max_sv: float,
    min_sv: float,
    method: str | Table,
    steps: Steps,
    form: str,
    algorithm: str,
    eps: float,
    compute_dtype: torch.dtype | None,
    check_finite: bool,
    graph: bool = False,
) -> torch.Tensor:
    """mclip of validated options: the plan, then :func:`_mclip`.

    With ``graph``, ``_mclip`` is replayed from a CUDA graph; the plan's sync runs before it.
    """
    if M.numel() == 0:
        return torch.empty_like(M)
    rescale, keep = _plan(M, max_sv, eps, check_finite)
    if keep == "all" and min_sv == 0:
        return M.clone(memory_format=torch.contiguous_format)
    if steps is None and method == "polar_express":
        steps = MCLIP_DEFAULT_STEPS
    if compute_dtype is None:
        compute_dtype = torch.float64 if M.dtype == torch.float64 else torch.float32
    options = (min_sv, max_sv, method, steps, form, algorithm, eps, compute_dtype, rescale, keep)
    call = functools.partial(_mclip, options=options)
    if graph:
        return _graphs.replay_or_capture(call, M)
    return call(M)


def _mclip(M: torch.Tensor, options: tuple) -> torch.Tensor:
    """mclip of a validated, non-empty ``M`` (the part a CUDA graph captures).

    With ``rescale``, scale-safe by homogeneity, ``mclip(M, α, β) = 2^e·mclip(2^{-e} M,
    2^{-e}α, 2^{-e}β)``, ``2^e`` each matrix's largest entry's binade (:mod:`matfn._scaling`):
    exact, and bitwise the unscaled path's result wherever that one was in range; ``G = M Mᵀ``
    and the inner msign norms then stay in range for any finite input. ``keep``: :func:`_plan`.
    """
    min_sv, max_sv, method, steps, form, algorithm, eps, compute_dtype, rescale, keep = options
    X, batch_shape = flatten_batch(M)
    X, transposed = to_wide(X)
    e = None
    upper: float | torch.Tensor = max_sv
    lower: float | torch.Tensor = min_sv
    if rescale:
        e = _scaling.exponents(X)
        unit = torch.exp2(-e.to(torch.float64)).reshape(-1, 1, 1)
        upper, lower = max_sv * unit, min_sv * unit
        X = _scaling.scale_pow2(X, -e)
    if method == "svd" or form == "svd":
        out = _clip_svd(X, lower, upper)
        if keep != "none" and min_sv == 0:  # the exact-M rule, as _clip_above applies it
            bound = torch.linalg.matrix_norm(X, keepdim=True).to(torch.float64)
            out = torch.where(torch.as_tensor(upper, device=X.device) >= bound, X, out)
    else:
        work = X.to(torch.float64 if compute_dtype == torch.float64 else torch.float32)

        def sign(Y: torch.Tensor) -> torch.Tensor:
            out = msign_wide(
                Y,
                method=method,
                steps=steps,
                algorithm=algorithm,
                eps=eps,
                compute_dtype=compute_dtype,
            )
            return out.to(work.dtype)

        O = sign(work)
        check = keep != "none"
        out = _clip_above(work, O, upper, form, sign, check)
        if min_sv > 0:
            low = lower.to(work.dtype) if isinstance(lower, torch.Tensor) else lower
            out = out + low * O - _clip_above(work, O, lower, form, sign, check)
    if e is not None:
        out = _scaling.scale_pow2(out, e)
    if transposed:
        out = out.mT
    return unflatten_batch(out.to(M.dtype), batch_shape)
