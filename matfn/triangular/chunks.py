r"""``tri_inv_chunks``: the per-chunk inverses of the WY form of (gated) DeltaNet and KDA.

For chunks of ``C`` rows, ``c = 0, 1, …``, of keys ``K``, write-strengths ``β`` and optional
log-decays ``ℓ``, the chunked delta rule needs (docs/math.md §5.3, §5.6)

    Y_c = T_c⁻¹,   T_c = I + tril(diag(β_c) (K_c ⊙ Γ)(K_c ⊘ Γ)ᵀ, −1),

i.e. ``(T_c)_ij = δ_ij + [i > j] β_i Σ_m K_im K_jm exp(R_im − R_jm)`` with ``R`` the cumulative
sum of ``ℓ`` inside the chunk. Only the chunk-local block of each inverse is formed: the state
across chunks is the recurrence's own business. This is what fla-core computes with
``chunk_scaled_dot_kkt_fwd`` followed by ``solve_tril``; here it is one call from ``K``, ``β``
and ``ℓ``.

:func:`tri_inv_chunks`
    The public function: validation, then the custom op ``torch.ops.matfn.tri_inv_chunks``.
:func:`tri_inv_chunks_torch`
    The torch form (every device and dtype; the tests' float64 oracle).
:mod:`matfn.triangular.chunks_kernel`
    The Triton kernel (CUDA float32, ``C = 64``, no decay or one per row), one program per
    chunk from ``K`` to ``Y_c``; imported on the first call that takes it.
"""

from __future__ import annotations

import math

import torch

from matfn._autocast import no_autocast
from matfn._backend import triton_module, use_triton
from matfn._validation import assert_all_finite, check_matrix, check_same_device

from .reference import chunk_log_decay, decay_factors, wide_dtype

__all__ = ["tri_inv_chunks", "tri_inv_chunks_torch"]


# ---------------------------------------------------------------------------------------------
# torch form
# ---------------------------------------------------------------------------------------------


def tri_inv_chunks_torch(
    K: torch.Tensor,
    beta: torch.Tensor,
    log_decay: torch.Tensor | None,
    chunk_size: int,
) -> torch.Tensor:
    r"""Chunk inverses in torch, ``(B, n, C)``: chunk ``c`` at rows ``cC … cC + C − 1``.

    ``K`` is ``(B, n, d)``, ``β`` ``(B, n)``, ``ℓ`` None, ``(B, n, 1)`` or ``(B, n, d)``, all of
    one dtype.

    ``n`` is padded to a multiple of ``C`` with zero keys (identity rows after the real ones, so
    the top-left block of the last chunk's inverse is the real one). The exponents ``R_i − R_j``
    are formed in float64 (differences of in-chunk sums that can each be in the hundreds) and
    rounded to the compute dtype before ``exp``; below the diagonal they are ``≤ 0`` for
    ``ℓ ≤ 0``, on and above it they are set to ``−∞``. A per-channel decay contracts a
    ``C×C×d`` tile per chunk, taken in slices of chunks to bound memory. ``A`` is accumulated
    in float64 (float32 on MPS) and rounded once to the input dtype: float32 accumulation over
    ``d = 128`` channels alone would give about 6e-8 relative error in the result, the rounded
    exact ``A`` about 3e-8 (as fla-core's ``solve_tril`` from an exact ``A``). The inverse is a
    batched triangular solve against ``I`` in the input dtype. Cost ``O(n C d)``
    (``O(n C²)`` for the solve).
    """
    B, n, d = K.shape
    C = chunk_size
    NC = -(-n // C)
    pad = NC * C - n
    dt = K.dtype
    edt = wide_dtype(K.device)
    Kc = torch.nn.functional.pad(K.to(edt), (0, 0, 0, pad)).reshape(B * NC, C, d)
    bc = torch.nn.functional.pad(beta, (0, pad)).reshape(B * NC, C, 1)
    if log_decay is None:
        below = torch.ones(C, C, dtype=torch.bool, device=K.device).tril(-1)
        A = (Kc @ Kc.mT) * below
    else:
        g = log_decay.shape[-1]
        R = chunk_log_decay(log_decay, C).reshape(B * NC, C, g)
        if g == 1:
            A = (Kc @ Kc.mT) * decay_factors(R, dt).to(edt)
        else:
            step = max(1, 2**24 // (C * C * d))  # chunks per slice of the C×C×d tile
            A = torch.cat(
                [
                    torch.einsum(
                        "nic,njc,nijc->nij",
                        Kc[s : s + step],
                        Kc[s : s + step],
                        decay_factors(R[s : s + step], dt).to(edt),
                    )
                    for s in range(0, B * NC, step)
                ]
            )
    eye = torch.eye(C, dtype=dt, device=K.device)
    T = eye + bc * A.to(dt)
    Y = torch.linalg.solve_triangular(T, eye.expand(B * NC, C, C), upper=False)
    return Y.reshape(B, NC * C, C)[:, :n].contiguous()


# ---------------------------------------------------------------------------------------------
# the custom op
# ---------------------------------------------------------------------------------------------


def _result_dtype(K: torch.Tensor, beta: torch.Tensor, log_decay: torch.Tensor | None):
    dtype = torch.promote_types(K.dtype, beta.dtype)
    if log_decay is not None:
        dtype = torch.promote_types(dtype, log_decay.dtype)
    return dtype


#: The chunk size the CUDA kernel takes (four blocks of 16 rows), DeltaNet's and KDA's.
KERNEL_CHUNK = 64


def _takes_kernel(K: torch.Tensor, log_decay: torch.Tensor | None, chunk_size: int) -> bool:
    """Whether the flattened compute-dtype operands run the Triton kernel.

    CUDA float32 (fp16/bf16 inputs are computed in float32), ``C =``
    :data:`KERNEL_CHUNK`, no decay or one per row; a per-channel decay (KDA) and every other
    case run :func:`tri_inv_chunks_torch`.
    """
    return (
        K.dtype == torch.float32
        and chunk_size == KERNEL_CHUNK
        and (log_decay is None or log_decay.shape[-1] == 1)
        and use_triton(K)
    )


@torch.library.custom_op("matfn::tri_inv_chunks", mutates_args=())
def _tri_inv_chunks_op(
    K: torch.Tensor,
    beta: torch.Tensor,
    log_decay: torch.Tensor | None,
    chunk_size: int,
    check_finite: bool,
) -> torch.Tensor:
    """``torch.ops.matfn.tri_inv_chunks(K, beta, log_decay, chunk_size, check_finite)``.

    Validated inputs (:func:`tri_inv_chunks` checks shapes, dtypes and devices): ``K``
    ``(..., n, d)``, ``beta`` ``(..., n)`` and ``log_decay`` None, ``(..., n)`` or
    ``(..., n, d)``, all with the batch dims of ``K``. ``check_finite`` runs the NaN/Inf test
    here (it needs values). Returns ``(..., n, chunk_size)`` in the promoted dtype.
    """
    dtype = _result_dtype(K, beta, log_decay)
    *batch, n, d = K.shape
    if check_finite:
        assert_all_finite(K=K, beta=beta, log_decay=log_decay)
    if n == 0 or math.prod(batch) == 0:
        return K.new_zeros((*batch, n, chunk_size), dtype=dtype)
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    B = math.prod(batch)
    Kf = K.reshape(B, n, d).to(cdt)
    bf = beta.reshape(B, n).to(cdt)
    Lf = None
    if log_decay is not None:
        Lf = log_decay.reshape(B, n, -1).to(cdt)
    if _takes_kernel(Kf, Lf, chunk_size):
        kernel = triton_module("triangular.chunks_kernel")
        Y = kernel.tri_inv_chunks_triton(Kf, bf, Lf)
    else:
        Y = tri_inv_chunks_torch(Kf, bf, Lf, chunk_size)
    return Y.reshape(*batch, n, chunk_size).to(dtype)


@_tri_inv_chunks_op.register_fake
def _(K, beta, log_decay, chunk_size, check_finite):
    return K.new_empty((*K.shape[:-1], chunk_size), dtype=_result_dtype(K, beta, log_decay))


# ---------------------------------------------------------------------------------------------
# public function
# ---------------------------------------------------------------------------------------------


def _shape(x: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in x.shape) + ")"


def _fits(shape: torch.Size, target: torch.Size) -> bool:
    try:
        return torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        return False


def _check_real(x: object, name: str, shape: str) -> torch.Tensor:
    if (
        not isinstance(x, torch.Tensor)
        or x.layout != torch.strided
        or x.is_complex()
        or not x.is_floating_point()
    ):
        got = type(x).__name__ + (f" of dtype {x.dtype}" if isinstance(x, torch.Tensor) else "")
        raise TypeError(f"`{name}` must be a real floating tensor of shape {shape}, got {got}")
    return x


@no_autocast
def tri_inv_chunks(
    K: torch.Tensor,
    beta: torch.Tensor,
    *,
    log_decay: torch.Tensor | None = None,
    chunk_size: int = 64,
    check_finite: bool = True,
) -> torch.Tensor:
    r"""Inverses of the ``C×C`` WY matrices of every ``C``-row chunk (DeltaNet, GDN, KDA).

    For the chunk of rows ``[cC, cC + C)`` with keys ``K_c``, ``β_c`` and the in-chunk
    cumulative log-decay ``R`` (``R_i = Σ_{k=cC}^{i} ℓ_k``),

        Y_c = (I + tril(diag(β_c) (K_c ⊙ e^R)(K_c ⊘ e^R)ᵀ, −1))⁻¹,

    evaluated entrywise as ``β_i Σ_m K_im K_jm exp(R_im − R_jm)`` for ``i > j``, so no
    ``exp(±R)`` is formed on its own and every factor is ``≤ 1`` for ``ℓ ≤ 0`` (stable in
    float32 however strong the decay; docs/math.md §5.6). ``Y_c`` is the "UT transform" of the
    chunked delta rule (docs/math.md §5.3): with ``W = Y_c diag(β) K_c`` and
    ``U = Y_c diag(β) V_c`` the chunk's state update follows.

    Parameters
    ----------
    K : torch.Tensor
        Keys ``(..., n, d)``, real floating; any batch/head dims. Unit-norm rows and
        ``β ∈ (0, 1)`` (the DeltaNet case) keep every ``|Y_ij| ≤ 1``.
    beta : torch.Tensor
        ``(..., n)``: the write strengths ``β``; batch dims broadcast to those of ``K``.
    log_decay : torch.Tensor, optional
        Log-decays ``ℓ`` (``ℓ = log α ≤ 0``): ``(..., n)``, one per row (Gated DeltaNet), or
        ``(..., n, d)`` with the dims of ``K``, one per row and channel (KDA); batch dims
        broadcast. Positive entries are allowed (factors then exceed 1 and may overflow).
    chunk_size : int
        Rows per chunk ``C``. ``n`` need not be a multiple: the last chunk is short, its rows
        past ``n`` are absent (its inverse is the top-left block of the padded one). The CUDA
        kernel takes ``C = 64``; other sizes run the torch form.
    check_finite : bool
        Raise on NaN/Inf in the inputs (one host sync, inside the op).

    Returns
    -------
    torch.Tensor
        ``(..., n, C)``: row ``cC + i`` holds row ``i`` of ``Y_c`` (fla-core's ``solve_tril``
        layout ``[.., T, BT]``), lower triangular with a unit diagonal. The dtype is the
        promotion of the inputs' (fp16/bf16 are computed in float32 and cast back).

    Raises
    ------
    TypeError
        A non-tensor, complex, integer, bool or sparse input.
    ValueError
        ``K`` with fewer than 2 dims; ``beta`` or ``log_decay`` of a shape that does not match
        ``K``; ``chunk_size`` not a positive int; NaN/Inf (with ``check_finite``); inputs on
        different devices.

    Notes
    -----
    **Cost.** The products of ``A`` take ``n C d / 2`` multiply-adds (the lower half of each
    ``C×C``), the inverse ``O(n C²)``; a per-channel decay adds the exact ``16×16×d`` diagonal
    blocks, ``8 n d`` exponentials. On CUDA in float32 (fp16/bf16 inputs are computed in
    float32) with ``C = 64`` and no decay or one per row, one Triton kernel
    (:mod:`matfn.triangular.chunks_kernel`) forms each chunk's ``A`` on the tensor cores and
    inverts it by ``16×16`` blocks, reading ``K`` and writing ``Y`` once from and to DRAM; it
    autotunes on its first call per ``(d, decay)``. Everything else (CPU, float64, other
    ``C``, a per-channel decay) runs the torch form (:func:`tri_inv_chunks_torch`): the
    products in float64, one batched triangular solve per chunk.

    **Accuracy.** Forward substitution is backward stable, so the error of ``Y`` is set by
    that of ``A``. The torch form rounds the float64 ``A`` once; the kernel scales each key
    by a power of two ``σ ≥ ‖k‖`` and splits it into fp16 parts, ``k/σ = h + l₁ + l₂`` with
    ``h`` on a grid of ``2⁻¹⁰``, so that ``h_i·h_j`` sums exactly on the tensor cores and the
    small rest adds about one rounding (plain float32 accumulation over ``d = 128`` channels
    would double the error of the result; :mod:`~matfn.triangular.chunks_kernel`). In the
    DeltaNet case (``‖k‖ = 1``, ``β ∈ (0, 1)``) both are within about 3e-8 (relative
    Frobenius) of float64, like fla-core's ``solve_tril`` from an exactly rounded ``A``.

    **Not differentiable**: the op has no autograd formula, so gradients do not flow to
    ``K``, ``beta`` or ``log_decay`` (a backward through it raises).

    Registered as ``torch.ops.matfn.tri_inv_chunks`` (``torch.compile`` / ``torch.export`` keep
    it as one node); this wrapper validates and calls it.

    Examples
    --------
    >>> import torch, matfn
    >>> g = torch.Generator().manual_seed(0)
    >>> K = torch.nn.functional.normalize(torch.randn(2, 100, 8, generator=g), dim=-1).double()
    >>> beta = torch.rand(2, 100, generator=g).double()
    >>> Y = matfn.tri_inv_chunks(K, beta, chunk_size=32)
    >>> Y.shape
    torch.Size([2, 100, 32])
    >>> T = torch.eye(32, dtype=torch.float64) + torch.tril(
    ...     beta[0, :32, None] * (K[0, :32] @ K[0, :32].T), -1)
    >>> bool(torch.allclose(Y[0, :32] @ T, torch.eye(32, dtype=torch.float64)))
    True
    """
    K = check_matrix(K, "K", check_finite=False)
    beta = _check_real(beta, "beta", "(..., n)")
    lead = K.shape[:-1]
    if not (beta.ndim >= 1 and beta.shape[-1] == lead[-1] and _fits(beta.shape, lead)):
        raise ValueError(
            f"`beta` must have shape (..., n) = {tuple(lead)} (the leading dims of `K`, batch "
            f"dims broadcast), got {_shape(beta)}"
        )
    beta = beta.expand(lead)
    if log_decay is not None:
        log_decay = _check_real(log_decay, "log_decay", "(..., n) or (..., n, d)")
        if log_decay.ndim == K.ndim and log_decay.shape[-2:] == K.shape[-2:]:
            ok = _fits(log_decay.shape, K.shape)
            target = K.shape
        else:
            ok = log_decay.ndim >= 1 and log_decay.shape[-1] == lead[-1]
            ok = ok and _fits(log_decay.shape, lead)
            target = lead
        if not ok:
            raise ValueError(
                f"`log_decay` must have shape (..., n) = {tuple(lead)} (one decay per row) or "
                f"(..., n, d) = {tuple(K.shape)} (per channel), up to broadcasting of the batch "
                f"dims; got {_shape(log_decay)}"
            )
        log_decay = log_decay.expand(target)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive int, got {chunk_size!r}")
    check_same_device(K=K, beta=beta, log_decay=log_decay)
    return torch.ops.matfn.tri_inv_chunks(K, beta, log_decay, chunk_size, bool(check_finite))
