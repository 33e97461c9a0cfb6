r"""``tri_inv`` / ``tri_solve``: diagonal-plus-low-rank lower-triangular matrices in O(n²) / O(n).

The matrix is ``T = Λ + tril(Q Kᵀ, −1)`` with ``Q, K ∈ ℝ^{n×d}`` (``n ≫ d``) and
``Λ = diag(λ)`` without zeros (docs/math.md §5). Its strictly lower part has rank ``d``, so

* ``tri_inv`` forms ``T⁻¹`` in ``O(n² d)`` FLOPs instead of the ``n³/3`` of dense inversion, and
* ``tri_solve`` computes ``T⁻¹ V`` in ``O(n d e)`` without forming ``T⁻¹``.

This module validates and calls the custom ops of ``ops``. The modules of the package:

``ops``
    ``torch.ops.matfn.tri_inv`` / ``torch.ops.matfn.tri_solve``: the value checks, the path
    choice and the autograd registration; one opaque node under ``torch.compile`` and
    ``torch.export``.
``reference``
    The torch forms: the row recursion (the readable oracle), the chunked form (the CPU path)
    and the decayed chunked form (the ``log_decay`` path off CUDA float32).
``backward``
    The exact backward (torch, every device) that the ops register with autograd.
``config``
    The frozen tuning of the kernels, one config per op (no Triton).
``chunk``, ``inverse``, ``solve`` (``scan``, ``tree``, ``schedule``), ``decay``
    The Triton kernels and launchers for CUDA float32 tensors, imported on first use
    (:func:`matfn._backend.triton_module`); ``decay`` for decayed systems (the solve and the
    causal products of their backward).
``chunks``, ``chunks_kernel``
    ``tri_inv_chunks`` (the per-chunk inverses of DeltaNet's WY form): validation, custom op
    and torch form; its Triton kernel (CUDA float32, imported on first use).
"""

from __future__ import annotations

import functools
import math
from numbers import Real

import torch

from matfn import _graphs
from matfn._autocast import no_autocast
from matfn._validation import check_matrix, check_same_device, non_finite_error

from .chunks import tri_inv_chunks
from .ops import (
    SingularTriangularError,
    check_values,
    inv_grads,
    result_dtype,
    solve_grads,
    unpack_needed,
    values_ok,
)
from .reference import DEFAULT_CHUNK

__all__ = ["tri_inv", "tri_solve", "tri_inv_chunks", "SingularTriangularError"]

# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------


def _shape(x: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in x.shape) + ")"


def _check_inputs(
    Q: object,
    K: object,
    V: object | None,
    diag: object,
    check_finite: bool,
    chunk_size: int,
    log_decay: object = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Validate and return ``(Q, K, V, λ, ℓ)``; only a number ``diag`` is tested for values.

    ``λ`` has shape ``Q.shape[:-1]``; ``ℓ`` is ``None`` or ``(..., n, g)`` broadcast to the batch
    dims of ``Q`` with ``g = 1`` (one decay per row) or ``g = d`` (per channel). The tensors'
    values (NaN/Inf, zero pivots of a tensor ``diag``) are tested inside the op, and only with
    ``check_finite``: a test there is a host sync.
    """
    Q = check_matrix(Q, "Q", check_finite=False)
    K = check_matrix(K, "K", check_finite=False)
    if Q.shape != K.shape:
        raise ValueError(
            f"`Q` and `K` must have the same shape (..., n, d), got Q {_shape(Q)} and K {_shape(K)}"
        )
    if V is not None:
        V = check_matrix(V, "V", check_finite=False)
        if V.shape[:-1] != Q.shape[:-1]:
            raise ValueError(
                "`V` must have shape (..., n, e) with the batch dims and n of `Q`, "
                f"got V {_shape(V)} and Q {_shape(Q)}"
            )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive int, got {chunk_size!r}")

    dtype = result_dtype(Q, K, V)
    lead = Q.shape[:-1]
    host_value = None  # the diagonal's one value when it is known on the host (no device test)
    if diag is None:
        lam = torch.ones((), dtype=dtype, device=Q.device).expand(lead)
        host_value = 1.0
    elif isinstance(diag, Real) and not isinstance(diag, bool):
        lam = torch.full((), float(diag), dtype=dtype, device=Q.device).expand(lead)
        host_value = float(diag)
    elif isinstance(diag, torch.Tensor):
        if diag.layout != torch.strided or diag.is_complex() or not diag.is_floating_point():
            raise TypeError(
                "`diag` must be a real floating tensor of shape (..., n) or a Python number, "
                f"got dtype {diag.dtype} and layout {diag.layout}"
            )
        try:
            shape = torch.broadcast_shapes(diag.shape, lead)
        except RuntimeError:
            shape = None
        if shape != lead:
            raise ValueError(
                f"`diag` must broadcast to (..., n) = {tuple(lead)} (the leading dims of `Q`), "
                f"got shape {_shape(diag)}"
            )
        lam = diag.expand(lead)
    else:
        raise TypeError(
            f"`diag` must be None, a real number or a tensor of shape (..., n), "
            f"got {type(diag).__name__}"
        )
    decay = None if log_decay is None else _check_decay(log_decay, Q)
    check_same_device(Q=Q, K=K, V=V, diag=lam, log_decay=decay)
    if lam.numel() and host_value is not None:
        # a number diagonal is tested on the host: no sync
        if check_finite and not math.isfinite(host_value):
            raise non_finite_error("diag")
        if host_value == 0:
            raise SingularTriangularError(
                f"T is singular: its diagonal `diag` is zero at index 0 (the scalar {diag!r} "
                "is every diagonal entry)"
            )
    return Q, K, V, lam, decay


def _check_decay(log_decay: object, Q: torch.Tensor) -> torch.Tensor:
    """``log_decay`` as ``(..., n, g)`` broadcast to the batch dims of ``Q`` (``g ∈ {1, d}``).

    A tensor with the dims of ``Q`` whose last two dims are ``(n, d)`` is per channel; else it
    must broadcast to ``(..., n)`` (one decay per row).
    """
    if (
        not isinstance(log_decay, torch.Tensor)
        or log_decay.layout != torch.strided
        or log_decay.is_complex()
        or not log_decay.is_floating_point()
    ):
        raise TypeError(
            "`log_decay` must be a real floating tensor of shape (..., n) or (..., n, d), "
            f"got {type(log_decay).__name__}"
            + (f" of dtype {log_decay.dtype}" if isinstance(log_decay, torch.Tensor) else "")
        )
    n, d = Q.shape[-2:]

    def fits(shape: tuple[int, ...], target: torch.Size) -> bool:
        try:
            return torch.broadcast_shapes(shape, target) == target
        except RuntimeError:
            return False

    if (
        log_decay.ndim == Q.ndim
        and log_decay.shape[-2:] == (n, d)
        and fits(log_decay.shape, Q.shape)
    ):
        return log_decay.expand(Q.shape)
    if log_decay.ndim >= 1 and log_decay.shape[-1] == n and fits(log_decay.shape, Q.shape[:-1]):
        return log_decay.expand(Q.shape[:-1]).unsqueeze(-1)
    raise ValueError(
        f"`log_decay` must have shape (..., n) = {tuple(Q.shape[:-1])} (one decay per row) or "
        f"(..., n, d) = {tuple(Q.shape)} (per channel), up to broadcasting of the batch dims; "
        f"got {_shape(log_decay)}"
    )


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------


@no_autocast
def tri_inv(
    Q: torch.Tensor,
    K: torch.Tensor,
    diag: torch.Tensor | float | None = None,
    *,
    log_decay: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    check_finite: bool = True,
    cuda_graph: bool = True,
) -> torch.Tensor:
    r"""Inverse of ``T = Λ + tril(Q Kᵀ, −1)`` in ``O(n² d)``, as a dense lower-triangular matrix.

    Parameters
    ----------
    Q, K : torch.Tensor
        ``(..., n, d)`` real floating tensors of the same shape; any leading (batch/head) dims.
    diag : torch.Tensor or float, optional
        The diagonal ``λ`` of ``Λ``: ``None`` (identity, the default), a number, or a tensor that
        broadcasts to ``(..., n)``. Every entry must be nonzero; negative values are fine. A
        zero in a number is always caught (on the host); in a tensor only with
        ``check_finite=True`` (else ``1/0`` shows as Inf/NaN in the result).
    log_decay : torch.Tensor, optional
        Log-decays ``ℓ`` of a decayed system (Gated DeltaNet, KDA): with ``G = cumsum(ℓ)``
        along the rows, ``T_ij = λ_i δ_ij + [i > j] Σ_c Q_ic K_jc exp(G_ic − G_jc)``. Shape
        ``(..., n)`` (one decay per row) or ``(..., n, d)`` with the dims of ``Q`` (per
        channel); batch dims broadcast. Stable in float32 for any ``ℓ ≤ 0`` (only
        chunk-relative exponents, all ``≤ 0``, are formed; docs/math.md §5.6). The solve of
        :func:`tri_solve` on ``V = I``, in ``O(n² (d + C))``: the Triton kernels of
        :mod:`matfn.triangular.decay` on CUDA float32 (``d ≤ 128``), the chunked torch form
        elsewhere.
    chunk_size : int
        Rows per chunk ``C`` (results agree to rounding for every ``C``). The CUDA kernels take
        the request rounded up to a power of two in ``[16, 64]``
        (:func:`matfn.triangular.config.inv_config`).
    check_finite : bool
        Raise on NaN/Inf in the inputs and on a zero in a tensor ``diag``: one host sync for
        all of them, the only one of the call. A graph-replayed call (``cuda_graph``) runs the
        test inside the graph and reads it after the replay is issued, so the sync waits for
        the result instead of holding up the launch. With ``check_finite=False`` no value is
        read on the host (a tensor ``diag`` included), so the call can be captured in a CUDA
        graph and compiled without a sync.
    cuda_graph : bool
        Replay the kernels from a CUDA graph captured for this input geometry
        (:mod:`matfn._graphs`; on by default): eager CUDA calls are bound by the host issuing
        about 8 Triton launches, several times the GPU work at n = 4096, d = 128
        (docs/benchmarks.md). The first call per geometry runs eagerly and captures (at most 16
        graphs are kept, each with a private memory pool); ``False``: always eager. With
        ``check_finite=True`` the input test is part of the replay and read after it.
        Under autograd the backward is replayed too; with ``log_decay`` as well. Ignored on CPU,
        under ``torch.compile`` and inside a capture already under way.

    Returns
    -------
    torch.Tensor
        ``Y = T⁻¹``, ``(..., n, n)``, lower triangular with ``diag(Y) = 1/λ``; dtype is the
        promotion of the inputs' dtypes (fp16/bf16 are computed in float32 and cast back).

    Raises
    ------
    TypeError
        A non-tensor, complex, integer, bool or sparse input; ``diag`` of a bad type.
    ValueError
        Fewer than 2 dims; ``Q``/``K`` shapes differ; ``diag`` does not broadcast to
        ``(..., n)``; ``log_decay`` of neither shape; NaN/Inf entries; inputs on different
        devices.
    SingularTriangularError
        A zero on the diagonal (a subclass of both ``ZeroDivisionError`` and ``ValueError``);
        the message names the index.

    Notes
    -----
    Row ``i`` of ``T Y = I`` gives ``Y_i = (e_i − q_iᵀ S_i)/λ_i`` with the ``d×n`` state
    ``S_i = K[:i]ᵀ Y[:i]``. In chunks of ``C`` rows (docs/math.md §5.2):

    ``Y_cc = T_cc⁻¹``, ``Y[c, :l] = −Y_cc Q_c (K[:l]ᵀ Y[:l, :l])``.

    **Cost.** ``(2d + C) n²`` FLOPs on CPU (chunked sweep, ``n/C`` sequential steps) against
    ``n³/3`` for dense inversion. On CUDA the Triton path forms the off-diagonal ``C×C`` tiles
    as rank-``d`` products ``Y[I, J] = −P_I^{(s)} R_J^{(s)ᵀ}``, where ``P^{(s)}`` and
    ``R^{(s)}`` are the block-diagonal solves ``blkdiag_s(T)⁻¹ Q`` and ``blkdiag_s(T)⁻ᵀ K`` at the
    level ``s`` where chunks ``I`` and ``J`` first fall into one block; the levels are built
    bottom-up with ``P₂ ← P₂ (I − G₁)`` and ``R₁ ← R₁ (I − G₂)ᵀ``, where the ``d×d`` Grams
    ``G = Kᵀ P`` of a level follow from the level below, ``G = G₁ + G₂ − G₂ G₁``: ``d n²`` FLOPs
    for the tiles plus ``2 n d²`` per level and ``d³`` per block pair, ``log₂(n/C)`` levels,
    every step parallel.

    **Accuracy and conditioning.** The recursion is forward substitution, so it is backward
    stable row by row, and the error of ``Y`` is about ``u · κ(T)`` relative (``u`` the unit
    roundoff), with ``κ(T) ≤ ‖T‖ ‖T⁻¹‖``. The growth of ``‖T⁻¹‖`` is the whole story: with
    ``d = 1`` and ``q_i k_j = a``, ``Y_{ij} = −(a/λ)(1 − a/λ)^{i−j−1}/λ`` for ``i > j``, so the
    entries grow like ``|1 − a/λ|^n``. They grow exponentially in ``n`` whenever the scale of
    ``Q Kᵀ`` is large compared with ``|λ|`` or ``|λ|`` is small; then no algorithm (dense
    inversion included) gives an accurate ``T⁻¹`` in floating point and this one is as
    ill-conditioned as forward substitution. Errors are reported, not hidden: overflow shows as
    Inf/NaN in the result. The well-conditioned DeltaNet case ``Λ = I``, ``Q = K`` with
    ``‖k_i‖ ≤ 1`` has all entries in ``[−1, 1]`` (each factor ``I − k kᵀ`` is a contraction):
    float32 errors stay near ``1e-6`` relative for ``n`` in the thousands.

    **Gradients.** Exact gradients w.r.t. ``Q``, ``K``, a tensor ``diag`` (a number or
    ``None`` has none) and ``log_decay``. The call is the custom op ``torch.ops.matfn.tri_inv``
    (:mod:`matfn.triangular.ops`; one node under ``torch.compile`` and ``torch.export``), whose
    registered backward is ``torch.ops.matfn.tri_inv_backward``: ``dT = −T⁻ᵀ dY T⁻ᵀ`` by two
    structured solves (the forward's solver, Triton on CUDA float32; the transposed one on
    reversed rows with ``Q`` and ``K`` swapped), then
    ``dλ = diag(dT)``, ``dQ = dL K``, ``dK = dLᵀ Q`` for ``dL = tril(dT, −1)``: ``O(n² d)``,
    about ``(12 d + 4 C) n²`` FLOPs (:mod:`matfn.triangular.backward`). With ``log_decay``,
    ``Y`` is saved and the backward is :func:`tri_solve`'s with ``X = Y``, ``dX = tril(dY)``
    (one transposed decayed solve and two decayed causal products with ``n`` columns),
    ``dℓ`` included (docs/math.md §5.6). Double backward is not supported.

    References
    ----------
    Su Jianlin, kexue.fm/archives/11072 (the chunked recursion) and 11563 (DeltaNet's inverse).

    Examples
    --------
    >>> import torch, matfn
    >>> g = torch.Generator().manual_seed(0)
    >>> Q, K = torch.randn(2, 100, 4, generator=g, dtype=torch.float64).unbind(0)
    >>> Y = matfn.tri_inv(Q / 10, K / 10)
    >>> T = torch.eye(100, dtype=torch.float64) + torch.tril(Q @ K.T / 100, -1)
    >>> bool(torch.allclose(Y @ T, torch.eye(100, dtype=torch.float64)))
    True
    """
    Q, K, _, lam, decay = _check_inputs(Q, K, None, diag, check_finite, chunk_size, log_decay)
    n, d = Q.shape[-2:]
    batch = Q.shape[:-2]
    if n == 0 or math.prod(batch) == 0:
        return Q.new_zeros((*batch, n, n), dtype=result_dtype(Q, K, lam, decay))
    work = math.prod(batch) * n * n * d
    operands = tuple(x for x in (Q, K, lam, decay) if x is not None)
    if cuda_graph and _graphs.graph_applies(*_detached(*operands), work=work):
        if _records_grad(*operands):
            return _ReplayedInv.apply(Q, K, lam, decay, chunk_size, check_finite)
        return _replayed(_tri_inv, Q, K, None, lam, decay, chunk_size, check_finite)
    return torch.ops.matfn.tri_inv(Q, K, lam, decay, chunk_size, check_finite)


def _detached(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(x.detach() for x in tensors)


def _records_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in tensors)


def _replayed(compute, Q, K, V, lam, decay, chunk_size: int, check_finite: bool) -> torch.Tensor:
    """``compute`` (:func:`_tri_inv`, ``V`` None, or :func:`_tri_solve`) replayed from a CUDA graph.

    With ``check_finite`` the input test is part of the graph and its flag is read after the
    replay is issued: the call's one host sync waits for the result instead of holding up the
    launch; a failed test raises :func:`check_values`'s error. No autograd is recorded here
    (grad mode is off, or the caller is :class:`_ReplayedInv`/:class:`_ReplayedSolve`).
    """
    tensors = tuple(x for x in (Q, K, V, lam, decay) if x is not None)
    call = functools.partial(compute, checked=check_finite, chunk_size=chunk_size)
    if not check_finite:
        return _graphs.replay_or_capture(call, *tensors)
    out, ok = _graphs.replay_or_capture(call, *tensors)
    if not ok.item():
        check_values(Q, K, V, lam, decay)
    return out


def _tri_inv(Q, K, lam, decay=None, *, chunk_size: int, checked: bool = False):
    """The op on validated, non-empty inputs (what a CUDA graph captures).

    ``checked``: also return :func:`~matfn.triangular.ops.values_ok`'s device flag.
    """
    Y = torch.ops.matfn.tri_inv(Q, K, lam, decay, chunk_size, False)
    return (Y, values_ok(Q, K, None, lam, decay)) if checked else Y


@no_autocast
def tri_solve(
    Q: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor,
    diag: torch.Tensor | float | None = None,
    *,
    log_decay: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    check_finite: bool = True,
    cuda_graph: bool = True,
) -> torch.Tensor:
    r"""Solve ``T X = V`` for ``T = Λ + tril(Q Kᵀ, −1)`` in ``O(n d e)``, without forming ``T⁻¹``.

    Parameters
    ----------
    Q, K : torch.Tensor
        ``(..., n, d)`` real floating tensors of the same shape.
    V : torch.Tensor
        ``(..., n, e)`` right-hand sides with the batch dims and ``n`` of ``Q``.
    diag : torch.Tensor or float, optional
        The diagonal ``λ`` (``None`` = identity, a number, or a tensor broadcasting to
        ``(..., n)``); no zeros (caught as in :func:`tri_inv`).
    log_decay : torch.Tensor, optional
        Log-decays ``ℓ``, ``(..., n)`` or ``(..., n, d)``, as in :func:`tri_inv`: the decayed
        system ``T_ij = λ_i δ_ij + [i > j] Σ_c Q_ic K_jc exp(G_ic − G_jc)``, ``G = cumsum(ℓ)``.
        ``O(n (d e + C e + C d))``, stable in float32 for any ``ℓ ≤ 0``: the Triton kernels of
        :mod:`matfn.triangular.decay` on CUDA float32 (``d ≤ 128``; 64-row chunks), the
        chunked torch form elsewhere.
    chunk_size : int
        Rows per chunk ``C``; the CUDA kernels take the request rounded up to a power of two in
        ``[16, 32]`` (:func:`matfn.triangular.config.solve_config`).
    check_finite : bool
        Raise on NaN/Inf in the inputs and on a zero in a tensor ``diag`` (one host sync, the
        only one of the call); ``False`` reads no value on the host, as in :func:`tri_inv`.
    cuda_graph : bool
        As in :func:`tri_inv`; under capture, small batches (``B·n ≤ 1024``) take the tree
        solve, which has no sequential chain (without decay). Under autograd the backward is
        replayed too. Ignored on CPU, under ``torch.compile`` and inside a capture already
        under way.

    Returns
    -------
    torch.Tensor
        ``X = T⁻¹ V``, ``(..., n, e)``, in the promoted dtype of the inputs. ``V = 0`` gives
        exact zeros.

    Raises
    ------
    TypeError
        A non-tensor, complex, integer, bool or sparse input; ``diag`` of a bad type.
    ValueError
        Bad dims; ``Q``/``K``/``V``/``diag``/``log_decay`` shapes that do not match; NaN/Inf;
        mixed devices.
    SingularTriangularError
        A zero on the diagonal (names the index); also a ``ZeroDivisionError``.

    Notes
    -----
    Chunk recursion (docs/math.md §5.2): ``X_c = T_cc⁻¹ (V_c − Q_c Z)``, ``Z ← Z + K_cᵀ X_c`` with
    the ``d×e`` state ``Z = K[:l]ᵀ X[:l]`` (the DeltaNet state ``Sᵀ`` for ``Λ = I``, ``Q = K``).
    Cost ``≈ n (4 d e + C e)`` FLOPs plus the chunk-local solves. On CUDA the Triton path runs
    either a two-level scan — chunk-local solves of ``[V | Q]`` inside groups of chunks
    (parallel), a short sequential scan of the ``d×e`` state across groups with the group
    transitions ``I − K_gᵀ T_g⁻¹ Q_g``, and a parallel correction ``X_g −= (T_g⁻¹ Q_g) Z_g``,
    the last two in one flag-driven launch that overlaps the groups' chunk solves —
    or, while a CUDA graph is being captured and the batch has at most 1024 rows, a divide and
    conquer over ``⌈log₂(n/C)⌉`` parallel levels (``[X₂ | P₂] −= P₂ K₁ᵀ[X₁ | P₁]`` per pair of
    blocks, no sequential chain, 2.4× the FLOPs; :mod:`matfn.triangular.solve`).
    Accuracy and conditioning are those of forward substitution; see :func:`tri_inv`.

    **Gradients** w.r.t. ``Q``, ``K``, ``V`` and a tensor ``diag``, exact, in ``O(n d e)`` like
    the forward (:mod:`matfn.triangular.backward`): for ``X = T⁻¹ V``, ``dV = T⁻ᵀ dX`` (the
    forward's solver, Triton on CUDA float32, on reversed rows with ``Q`` and ``K`` swapped),
    ``dλ = −Σ_e dV ⊙ X``, and the rank-``e`` ``dL = −tril(dV Xᵀ, −1)`` enters only through the
    causal products ``dQ_i = −Σ_{j<i} (dV_i·X_j) K_j`` and ``dK_j = −Σ_{i>j} (dV_i·X_j) Q_i``,
    chunked with ``e×d`` states summed over chunks; this is the backward registered with the op
    ``torch.ops.matfn.tri_solve`` (:mod:`matfn.triangular.ops`). ``X`` is saved for the
    backward (solved again when the result was rounded to a half dtype). With ``log_decay`` the
    same steps carry the decay factors: the transposed solve is the decayed solve on reversed
    rows, the two products are decayed causal products (Triton on CUDA float32), and
    ``dℓ`` is the reverse cumulative sum of ``Q ⊙ dQ − K ⊙ dK`` (docs/math.md §5.6), all
    ``O(n d e)``. Double backward is not supported.

    References
    ----------
    Su Jianlin, kexue.fm/archives/11072 and 11563.

    Examples
    --------
    >>> import torch, matfn
    >>> g = torch.Generator().manual_seed(0)
    >>> Q, K = (torch.randn(2, 50, 3, generator=g, dtype=torch.float64) / 3).unbind(0)
    >>> V = torch.randn(50, 2, generator=g, dtype=torch.float64)
    >>> X = matfn.tri_solve(Q, K, V, diag=2.0)
    >>> T = 2 * torch.eye(50, dtype=torch.float64) + torch.tril(Q @ K.T, -1)
    >>> bool(torch.allclose(T @ X, V))
    True
    """
    Q, K, V, lam, decay = _check_inputs(Q, K, V, diag, check_finite, chunk_size, log_decay)
    n, d = Q.shape[-2:]
    e = V.shape[-1]
    batch = Q.shape[:-2]
    if n == 0 or e == 0 or math.prod(batch) == 0:
        return V.new_zeros((*batch, n, e), dtype=result_dtype(Q, K, V, lam, decay))
    work = math.prod(batch) * n * d * (d + e)
    operands = tuple(x for x in (Q, K, V, lam, decay) if x is not None)
    if cuda_graph and _graphs.graph_applies(*_detached(*operands), work=work):
        if _records_grad(*operands):
            return _ReplayedSolve.apply(Q, K, V, lam, decay, chunk_size, check_finite)
        return _replayed(_tri_solve, Q, K, V, lam, decay, chunk_size, check_finite)
    return torch.ops.matfn.tri_solve(Q, K, V, lam, decay, chunk_size, check_finite)


def _tri_solve(Q, K, V, lam, decay=None, *, chunk_size: int, checked: bool = False):
    """The op on validated, non-empty inputs (what a CUDA graph captures).

    ``checked``: also return :func:`~matfn.triangular.ops.values_ok`'s device flag.
    """
    X = torch.ops.matfn.tri_solve(Q, K, V, lam, decay, chunk_size, False)
    return (X, values_ok(Q, K, V, lam, decay)) if checked else X


class _ReplayedInv(torch.autograd.Function):
    """:func:`tri_inv` with ``cuda_graph=True`` under autograd.

    The forward is replayed (:func:`_replayed`); the backward is the body of the op
    ``torch.ops.matfn.tri_inv_backward`` (:func:`~matfn.triangular.ops.inv_grads`), called
    directly and replayed too where it is launch-bound: the op's dispatch cost more host time
    than the replay it wraps.
    """

    @staticmethod
    def forward(ctx, Q, K, lam, decay, chunk_size: int, check_finite: bool):
        Y = _replayed(_tri_inv, Q, K, None, lam, decay, chunk_size, check_finite)
        ctx.chunk_size = chunk_size
        # the decayed backward reads T⁻¹ (ops._setup_inv)
        ctx.save_for_backward(Q, K, lam, decay, None if decay is None else Y)
        return Y

    @staticmethod
    def backward(ctx, dY):
        Q, K, lam, decay, Y = ctx.saved_tensors
        needs = [bool(x) for x in ctx.needs_input_grad[:4]]
        grads = inv_grads(Q, K, lam, decay, Y, dY, ctx.chunk_size, needs, replay=True)
        return (*unpack_needed(grads, needs), None, None)


class _ReplayedSolve(torch.autograd.Function):
    """As :class:`_ReplayedInv`, for :func:`tri_solve` (``X`` is saved for the backward)."""

    @staticmethod
    def forward(ctx, Q, K, V, lam, decay, chunk_size: int, check_finite: bool):
        X = _replayed(_tri_solve, Q, K, V, lam, decay, chunk_size, check_finite)
        ctx.chunk_size = chunk_size
        ctx.save_for_backward(Q, K, V, lam, decay, X)
        return X

    @staticmethod
    def backward(ctx, dX):
        Q, K, V, lam, decay, X = ctx.saved_tensors
        needs = [bool(x) for x in ctx.needs_input_grad[:5]]
        grads = solve_grads(Q, K, V, lam, decay, X, dX, ctx.chunk_size, needs, replay=True)
        return (*unpack_needed(grads, needs), None, None)
