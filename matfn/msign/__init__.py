r"""msign: the polar factor ``U Vᵀ`` of a real matrix by Newton–Schulz iteration.

The public function :func:`msign` validates, picks the path and calls; the package holds

* :mod:`matfn.msign.reference`: the torch steps (the leaves), e.g. :func:`newton_schulz_torch`;
* :mod:`matfn.msign.path`: which step runs for a batch (Triton, folded cuBLAS or torch), the
  normalisation and :func:`run_newton_schulz`;
* :mod:`matfn.msign.triton` and :mod:`matfn.msign.grouped`: the Triton launchers (imported on
  the first CUDA call).

The compute path is the custom op ``torch.ops.matfn.msign`` (:func:`msign_op`): :func:`msign`
validates in pure Python and calls it, so ``torch.compile(fullgraph=True)``, FakeTensor and
``torch.export`` see one node, and everything data-dependent (the finiteness check, the rescale,
``steps="auto"``) runs inside it. Its backward is ``torch.ops.matfn.msign_vjp``, which composes
msign with the Lyapunov solve of :mod:`matfn.sylvester` (that module imports this package), so it
is looked up in ``torch.ops`` when the backward runs; :mod:`matfn.derivatives` defines it. For
forward-mode AD (dual tensors) msign defers to :class:`matfn.derivatives.MsignFunction`,
registered through :func:`register_autograd` when ``matfn`` is imported.

``matfn.msign`` (the attribute) is the function; import the submodules as
``from matfn.msign import path`` (``import matfn.msign.path as p`` fails: the attribute
``matfn.msign`` it resolves is the function).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from typing import Literal, TypeAlias

import torch

from .. import _graphs, _scaling
from .._autocast import autocast_disabled, no_autocast
from .._batching import flatten_batch, to_wide, unflatten_batch
from .._validation import check_compute_dtype, check_eps, check_matrix
from ..coefficients import (
    CONVERGENT_QUINTIC,
    DEFAULT_STEPS,
    NAMED_TABLES,
    Table,
    auto_schedule,
    check_table,
    check_table_steps,
    schedule,
)
from ..kernels.recording import recording
from .path import (
    cast,
    choose_algorithm,
    iteration_dtype,
    normalize,
    normalize_by,
    normalize_for_iteration,
    run_newton_schulz,
)
from .reference import (
    AUTO_MAX_POLISH,
    AUTO_TARGETS,
    AUTO_TOL,
    GRAM_NEGATIVE_EIGENVALUE,
    GRAM_Q_MAX,
    gram_newton_schulz_torch,
    gram_restarts,
    msign_svd,
    newton_schulz_torch,
    ns_step_torch,
    polish_until_converged,
    sign_step_torch,
)

__all__ = [
    "msign",
    "msign_wide",
    "METHODS",
    "ALGORITHMS",
    "AUTO_MAX_POLISH",
    "AUTO_TARGETS",
    "AUTO_TOL",
    "GRAM_NEGATIVE_EIGENVALUE",
    "GRAM_Q_MAX",
    "cast",
    "check_options",
    "choose_algorithm",
    "default_compute_dtype",
    "gram_newton_schulz_torch",
    "gram_restarts",
    "iteration_dtype",
    "newton_schulz_torch",
    "normalize",
    "normalize_by",
    "normalize_for_iteration",
    "ns_step_torch",
    "polish_until_converged",
    "register_autograd",
    "forward_is_exact",
    "from_op",
    "has_tangent",
    "in_result_layout",
    "msign_op",
    "op_method",
    "TABLE_METHOD",
    "op_steps",
    "result_like",
    "rescale_if_needed",
    "PURIFYING_QUINTIC",
    "run_newton_schulz",
    "sign_step_torch",
]

#: A schedule's name, ``"svd"`` (exact), or a per-step table ``[(a, b, c), …]``.
Method: TypeAlias = (
    Literal[
        "polar_express", "tuned", "keller", "cubic", "polar_express_modded", "youjiacheng", "svd"
    ]
    | Sequence[tuple[float, float, float]]
)
Algorithm = Literal["auto", "standard", "gram"]
Steps = int | Literal["auto"] | None

#: The method names (a per-step table is accepted besides).
METHODS = (*DEFAULT_STEPS, "svd")
ALGORITHMS = ("auto", "standard", "gram")

#: The autograd Function :func:`msign` defers to for a dual input (forward-mode AD)
#: (:class:`matfn.derivatives.MsignFunction`, set by :func:`register_autograd`).
_autograd: type[torch.autograd.Function] | None = None


def register_autograd(function: type[torch.autograd.Function]) -> None:
    """Make ``function.apply(M, method, steps, algorithm, eps, compute_dtype)`` msign's autograd.

    Called once, by :mod:`matfn.derivatives` on import (``import matfn`` imports it).
    """
    global _autograd
    _autograd = function


def default_compute_dtype(M: torch.Tensor) -> torch.dtype:
    """bf16 on CUDA, float32 on CPU; float64 inputs iterate in float64."""
    if M.dtype == torch.float64:
        return torch.float64
    return torch.bfloat16 if M.is_cuda else torch.float32


#: steps="auto" on numerically rank-deficient input: the odd quintic ``(5x³ − 3x⁵)/2`` with
#: fixed points 0 and 1 (both attracting, ``p′ = 0`` there) and the repelling one ``√(2/3)``:
#: iterates below ``√(2/3) ≈ 0.816`` go to 0 cubically, those above to 1 quadratically.
PURIFYING_QUINTIC = (0.0, 2.5, -1.5)
#: The threshold between the two basins of :data:`PURIFYING_QUINTIC`.
PURIFY_THRESHOLD = math.sqrt(2 / 3)


def _iterate_auto(X: torch.Tensor, algorithm: str) -> torch.Tensor:
    lower, target = AUTO_TARGETS[X.dtype]
    X = run_newton_schulz(X, auto_schedule(lower, target), algorithm)
    tol = AUTO_TOL[X.dtype]
    X, converged = polish_until_converged(
        X, lambda Y: run_newton_schulz(Y, [CONVERGENT_QUINTIC], "standard"), tol
    )
    if not converged and X.dtype != torch.float64:
        # Singular values between 0 and 1 are left: below ℓ·‖M‖_F, which in float32 and half
        # precision is the rounding noise of a rank-deficient input; the polishing quintic would
        # lift them to 1. Split them instead: below √(2/3) to 0, above to 1 (the numerical rank
        # rule of the docstring). Not in float64, whose ℓ = 1e-7 lies far above its noise.
        X, converged = polish_until_converged(
            X, lambda Y: run_newton_schulz(Y, [PURIFYING_QUINTIC], "standard"), tol
        )
    if not converged:
        warnings.warn(
            f"msign(steps='auto') did not converge to tol={tol:g} after the schedule and "
            f"{AUTO_MAX_POLISH} polishing steps: singular values below about "
            f"{lower:g}·‖M‖_F converge slowly (numerically rank-deficient input?)",
            RuntimeWarning,
            stacklevel=3,
        )
    return X


def check_options(method: object, steps: object, algorithm: str) -> str | Table:
    """Validate the options; return ``method``, a table as a tuple of float triples.

    Raises ``ValueError`` for an unknown method/algorithm or a bad ``steps`` (for a table or a
    name of :data:`matfn.coefficients.NAMED_TABLES`: anything but None or its length), and
    ``TypeError``/``ValueError`` for a malformed table (:func:`matfn.coefficients.check_table`).
    The returned table is hashable: it can key a CUDA graph.
    """
    if not isinstance(method, str):
        method = check_table(method)
    elif method not in METHODS:
        raise ValueError(
            f"`method` must be one of {METHODS} or a table [(a, b, c), ...], got {method!r}"
        )
    if algorithm not in ALGORITHMS:
        raise ValueError(f"`algorithm` must be one of {ALGORITHMS}, got {algorithm!r}")
    if isinstance(method, tuple) or method in NAMED_TABLES:
        table = method if isinstance(method, tuple) else NAMED_TABLES[method]
        check_table_steps(table, steps, method if isinstance(method, str) else None)
        return method
    if steps is None or steps == "auto":
        return method
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"`steps` must be a positive int, 'auto' or None, got {steps!r}")
    return method


def msign_wide(
    X: torch.Tensor,
    *,
    method: Method,
    steps: Steps,
    algorithm: str,
    eps: float,
    compute_dtype: torch.dtype,
    norms: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """msign of a flattened wide batch ``(B, s, L)``, ``s ≤ L``, in the iteration dtype.

    The building block shared by msign, mclip and the optimizer (no validation, no reshape).
    The result is in ``compute_dtype``, or in fp16 where a bf16 batch took the folded CUDA path
    (:func:`matfn.msign.path.iteration_dtype`); callers cast it (to save a pass when the
    next consumer reads any float dtype, as the optimizer's update does).
    ``norms``: ``‖X_b‖_F`` when the caller already has them (:func:`normalize_by` then skips
    the read of X for the norm). ``out_dtype``: ask for the result in this dtype instead, for
    fixed schedules (the Triton path rounds its last product to it: no cast pass). ``method``
    may be a per-step table (normalised by ``‖X_b‖_F``; ``steps`` None or its length).
    """

    def normalized(factor: float) -> torch.Tensor:
        return normalize_for_iteration(X, factor, eps, compute_dtype, norms)

    if isinstance(method, str) and method == "svd":
        return msign_svd(X).to(compute_dtype)
    if steps == "auto":
        if not (isinstance(method, str) and method == "polar_express"):
            raise ValueError(f"steps='auto' uses the Polar-Express schedule; got method={method!r}")
        return _iterate_auto(normalized(1.01), algorithm)
    coeffs, factor = schedule(method, steps)
    return run_newton_schulz(normalized(factor), coeffs, algorithm, out_dtype)


@no_autocast
def msign(
    M: torch.Tensor,
    *,
    method: Method = "polar_express",
    steps: Steps = None,
    algorithm: Algorithm = "auto",
    eps: float = 1e-7,
    compute_dtype: torch.dtype | None = None,
    check_finite: bool = True,
    cuda_graph: bool = True,
) -> torch.Tensor:
    r"""Matrix sign (polar factor) ``msign(M) = U_r V_rᵀ`` by Newton–Schulz iteration.

    For ``M = U Σ Vᵀ`` of rank ``r``, every nonzero singular value becomes 1 and zeros stay 0.
    Equivalently ``msign(M) = (M Mᵀ)^{-1/2} M``, the orthogonal factor of the polar
    decomposition for full-rank M, and the steepest-descent direction of Muon.

    Parameters
    ----------
    M : torch.Tensor
        Real ``(..., n, m)`` tensor (float64/32/16 or bfloat16), any leading batch dims,
        any strides. Never modified.
    method : str or sequence of (a, b, c)
        Coefficient schedule: ``"polar_express"``, ``"tuned"``, ``"keller"``, ``"cubic"``, the
        published tables ``"polar_express_modded"`` (modded-nanogpt's 5 steps, ``sf = 1.02``)
        and ``"youjiacheng"`` (6 steps) (see :mod:`matfn.coefficients`); ``"svd"`` for the
        exact result through ``torch.linalg.svd``; or a per-step table ``[(a, b, c), …]``
        (1 to 99 rows of finite reals), run row by row from ``X₀ = M / ‖M‖_F`` (``sf = 1``, as
        ``torch.optim.Muon``), so that any published or generated schedule (e.g.
        :func:`matfn.polar_express_coefficients`) runs without a new name.
    steps : int, "auto" or None
        Number of iterations; ``None`` is the method's default (5; 12 for ``cubic``; a table's
        or a named table's length, the only other value these accept).
        ``"auto"`` runs the shortest Polar-Express schedule that resolves singular values down to
        ``ℓ·‖M‖_F`` for the compute dtype (ℓ = 1e-7 in float64, 1e-6 in float32, 1e-3 in
        half precision), then convergent quintic steps ``(15/8, −10/8, 3/8)`` until a step moves
        X by less than the dtype's tolerance (1e-10, 1e-5, 2e-2). One host sync per polishing
        step. **Numerical rank** (float32 and half-precision iterations, where ``ℓ`` sits at
        the rounding resolution): when those steps stop converging (singular values left
        strictly between 0 and 1, i.e. below about ``ℓ·‖M‖_F``: the rounding noise of a
        rank-deficient input), purifying steps ``x ↦ (5x³ − 3x⁵)/2`` send iterates below
        ``√(2/3)`` to 0 and the others to 1, so exact null spaces stay null (a rank-1 16×10
        float32 input gives ``U₁V₁ᵀ`` to 1e-6). Warns if that does not converge either, and in
        float64 (where values below ``ℓ`` are not noise) whenever polishing does not converge.
    algorithm : {"auto", "standard", "gram"}
        ``standard`` forms ``X Xᵀ`` every step; ``gram`` iterates on the s×s Gram matrix and
        applies the product once (cheaper for rectangular inputs; restarted where
        :func:`gram_restarts` says, and iterated in fp16 for bf16 inputs); ``auto`` picks Gram
        when its FLOP count, restarts included, is below 0.8× the standard one with general
        products and 0.9× with the symmetric CUDA kernels (for 5 Polar-Express steps with their
        two restarts: ``L > 8 s`` and ``L > 3.45 s``; see :func:`choose_algorithm`), and never
        for CUDA problems below the kernels' size threshold (launch-bound).
    eps : float
        Normalisation floor, a finite number > 0: ``X₀ = M / max(sf·‖M‖_F, eps)``, so
        msign(0) = 0 exactly. It never reaches a nonzero M: an M with ``‖M‖_F < eps`` (or a norm
        that over- or underflows the accumulate dtype) is first rescaled by a power of two to
        largest entry in ``[½, 1)`` (exact), so msign is scale-invariant over the whole range of
        the dtype (for ``eps ≤ ½``). On CUDA with ``check_finite=False`` this rescue is skipped
        (it needs the check's host sync): norms must then lie in float32's range (entries
        between about 1e-15 and 1e19/√(nm)).
    compute_dtype : torch.dtype, optional
        Dtype of the iteration. Default: bfloat16 on CUDA (fp32 accumulation in the matmuls),
        float32 on CPU, float64 for float64 inputs. Norms are always taken in float32 or better.
        CUDA bf16 batches with a short side below 2048 iterate in fp16 (same speed, 3× smaller
        error; :func:`matfn.msign.path.iteration_dtype`), the Gram path always does.
    check_finite : bool
        Raise on NaN/Inf (one host sync). On CUDA with fixed steps the test runs on the GPU
        beside the iteration and is read once all kernels are issued, so it costs the wait for
        the result, not a stall before the launches. The optimizer passes ``False``; NaN then
        propagates.
    cuda_graph : bool
        Replay the call from a CUDA graph captured for this input geometry and these options,
        a table's values included (:mod:`matfn._graphs`). On by default: small CUDA inputs are
        bound by the host issuing 17–20 kernels (a 5-step msign of 1024² does 0.13 ms of GPU
        work), so an eager call would cost several times its GPU time. The first call per
        geometry runs eagerly and captures (at most 16 graphs are kept, least recently used
        dropped; each holds its intermediates in a private memory pool); later calls issue three
        operations (copy in, replay, copy out), and every call, the first included, runs the
        same kernels, so repeated calls give identical results. Not used (eager) on CPU, for
        GPU-bound inputs (above 2³⁵ multiply-adds per product, e.g. 4096²), ``steps="auto"``
        (host syncs), ``method="svd"``, under autograd, under ``torch.compile`` and inside a
        CUDA graph capture already under way. ``False``: always eager (no cached graphs).
        The replay includes ``check_finite``'s test; its result is read after the replay.

    Returns
    -------
    torch.Tensor
        Approximately ``U_r V_rᵀ``, same shape and dtype as ``M``. Differentiable: when
        autograd tracks ``M`` the backward pass is :func:`matfn.msign_vjp`, the derivative of
        the exact ``msign(M)`` through a Lyapunov equation (not of the truncated polynomial the
        forward evaluated; see :class:`matfn.derivatives.MsignFunction`).

    Raises
    ------
    TypeError
        ``M`` is not a dense real floating tensor; a table is not a sequence of sequences of
        real numbers; ``eps`` not a number; ``compute_dtype`` not a ``torch.dtype``.
    ValueError
        ``M`` has fewer than 2 dims or non-finite entries; unknown method/algorithm; bad steps
        (for a table: not None or its length); a table with no rows, 100 rows or more, a row
        that is not a triple or a non-finite entry; ``eps`` not finite and > 0;
        ``compute_dtype`` not float64/32/16 or bfloat16.

    Notes
    -----
    Meta tensors propagate shape and dtype (the result is an empty meta tensor like ``M``).
    Autocast is off inside (:mod:`matfn._autocast`): the dtypes are the ones described here.

    The computation is the custom op ``torch.ops.matfn.msign``; this function validates the
    options in plain Python and calls it, so ``torch.compile(fullgraph=True)``, FakeTensor and
    ``torch.export`` see one node (the checks, the rescale and ``steps="auto"`` run inside it;
    the Triton kernels too, on CUDA). Host syncs: one for ``check_finite=True`` (after the
    launches on CUDA); one per polishing step of ``steps="auto"``; none on CUDA with
    ``check_finite=False`` and fixed steps, so such a call can be captured in the caller's CUDA
    graph.

    The iteration (docs/math.md §1.2): transpose to the wide orientation (``s = min(n, m)`` rows),
    ``X₀ = M / (sf ‖M‖_F)`` with ``sf = 1.01`` for Polar Express, 1.02 for its modded-nanogpt
    table and 1 otherwise (tables included), then
    ``A = X Xᵀ``, ``X ← a X + (b A + c A²) X`` per step. On singular values this is the scalar
    composition ``f = p_T ∘ … ∘ p_1`` applied to ``σᵢ / (sf ‖M‖_F)``, so the output is exactly
    ``U f(Σ/(sf‖M‖_F)) Vᵀ`` up to rounding.

    Cost per quintic step: ``4 s² L + 2 s³`` FLOPs (``L = max(n, m)``), e.g. 2.06 TFLOP for
    5 steps at 4096².

    Accuracy (max ``|σᵢ(X) − 1|`` for normalised singular values in ``[ℓ, 1]``): Polar Express
    5 steps 0.14 (ℓ = 1e-3), 8 steps 1e-15; tuned 0.05 (ℓ = 1e-2); Keller's quintic does not
    converge (output singular values in [0.68, 1.13] for ℓ = 1e-2). Add about 1e-2 for bf16
    rounding and 1e-5 for float32. Singular values below ℓ·‖M‖_F are not lifted to 1.

    References
    ----------
    K. Jordan et al., "Muon: An optimizer for hidden layers in neural networks" (2024).
    N. Amsel et al., "The Polar Express", arXiv:2505.16932 (2025).
    Su Jianlin, kexue.fm/archives/10922 and 10996 (2025).

    Examples
    --------
    >>> import torch, matfn
    >>> M = torch.randn(64, 32, dtype=torch.float64)
    >>> O = matfn.msign(M, steps="auto")
    >>> torch.allclose(O.mT @ O, torch.eye(32, dtype=torch.float64), atol=1e-9)
    True
    >>> table = [(3.4445, -4.7750, 2.0315)] * 5  # Keller's quintic, as a per-step table
    >>> torch.equal(matfn.msign(M, method=table), matfn.msign(M, method="keller"))
    True
    """
    check_matrix(M, "M", check_finite=False)
    method = check_options(method, steps, algorithm)
    eps = check_eps(eps)
    check_compute_dtype(compute_dtype)
    if M.is_meta:
        return torch.empty_like(M)
    if not torch.compiler.is_compiling() and has_tangent(M):
        # Forward-mode AD (a dual tensor): the autograd Function, whose jvp is msign_jvp; the
        # custom op's autograd is reverse mode only.
        if M.numel():
            M = rescale_if_needed(M, eps, check_finite=check_finite)
        if _autograd is None:
            raise RuntimeError("msign's derivative is not registered: import matfn")
        return _autograd.apply(M, method, steps, algorithm, eps, compute_dtype)
    if (
        cuda_graph
        and not torch.compiler.is_compiling()
        and steps != "auto"
        and method != "svd"
        and _graphs.ns_graph_applies(M)
    ):
        options = (method, steps, algorithm, eps, compute_dtype, check_finite)
        return _msign_eager(M, *options, graph=True)
    name, table = op_method(method)
    return torch.ops.matfn.msign(
        M, name, table, *op_steps(steps), algorithm, eps, compute_dtype, check_finite
    )


#: The ``method`` string of the msign-family ops (msign, mclip, mcsgn) for a per-step table,
#: whose rows travel flattened in their ``table`` argument.
TABLE_METHOD = "table"


def op_method(method: str | Table) -> tuple[str, list[float]]:
    """``(name, table)`` for a custom op's schema.

    A method name and ``[]``, or ``"table"`` and the per-step table's rows flattened to
    ``[a₁, b₁, c₁, a₂, …]``.
    """
    if isinstance(method, str):
        return method, []
    return TABLE_METHOD, [v for row in method for v in row]


def op_steps(steps: Steps) -> tuple[int | None, bool]:
    """``(steps, auto_steps)`` for a custom op's schema: ``"auto"`` becomes ``(None, True)``."""
    if steps == "auto":
        return None, True
    return steps, False  # type: ignore[return-value]


def from_op(method: str, table: Sequence[float], steps: int | None, auto_steps: bool):
    """The inverse of :func:`op_method` and :func:`op_steps`: ``(method, steps)``."""
    if method == TABLE_METHOD:
        method = tuple(tuple(table[i : i + 3]) for i in range(0, len(table), 3))  # type: ignore[assignment]
    return method, ("auto" if auto_steps else steps)


def result_like(M: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An empty tensor of ``M``'s shape in the layout of msign's results.

    The results are computed in the wide orientation: contiguous for ``n ≤ m``, the transpose
    of a contiguous ``(..., m, n)`` tensor for ``n > m``. Fake implementations give this layout
    and the op bodies return it (:func:`in_result_layout`), because compiled graphs trust the
    strides of the fake result.
    """
    *batch, n, m = M.shape
    dtype = M.dtype if dtype is None else dtype
    if n > m:
        return M.new_empty((*batch, m, n), dtype=dtype).mT
    return M.new_empty(M.shape, dtype=dtype)


def _result_strides(shape: Sequence[int]) -> tuple[int, ...]:
    *batch, n, m = shape
    strides = [1, n] if n > m else [m, 1]
    size = max(n, 1) * max(m, 1)
    for d in reversed(batch):
        strides.insert(0, size)
        size *= max(d, 1)
    return tuple(strides)


def in_result_layout(out: torch.Tensor) -> torch.Tensor:
    """``out``, or a copy in :func:`result_like`'s layout when its strides differ.

    Rare: the paths write that layout; the copy only fixes degenerate and odd-strided cases.
    """
    strides = _result_strides(out.shape)
    if out.stride() == strides:
        return out
    return torch.empty_strided(out.shape, strides, dtype=out.dtype, device=out.device).copy_(out)


def forward_is_exact(
    method: object, steps: Steps, compute_dtype: torch.dtype | None, M: torch.Tensor
) -> bool:
    """Whether msign's output is msign to the dtype's accuracy (so its backward may reuse it)."""
    if method == "svd":
        return M.dtype in (torch.float32, torch.float64)
    cdt = compute_dtype or (torch.float64 if M.dtype == torch.float64 else None)
    if cdt is None:
        cdt = torch.bfloat16 if M.is_cuda else torch.float32
    return steps == "auto" and cdt in (torch.float32, torch.float64) and M.dtype == cdt


def has_tangent(M: torch.Tensor) -> bool:
    """Whether ``M`` carries a forward-mode AD tangent (a dual tensor)."""
    # Outside a forward-AD dual level (the optimizer, torch.compile) skip the unpack_dual call.
    if getattr(torch.autograd.forward_ad, "_current_level", 0) < 0:
        return False
    return torch.autograd.forward_ad.unpack_dual(M).tangent is not None


@torch.library.custom_op("matfn::msign", mutates_args=())
def msign_op(
    M: torch.Tensor,
    method: str,
    table: list[float],
    steps: int | None,
    auto_steps: bool,
    algorithm: str,
    eps: float,
    compute_dtype: torch.dtype | None,
    check_finite: bool,
) -> torch.Tensor:
    """``torch.ops.matfn.msign``: :func:`matfn.msign` of validated options, as one graph node.

    ``method``: a name of :data:`METHODS`, or ``"table"`` with ``table`` the per-step rows
    flattened (``[a₁, b₁, c₁, a₂, …]``; else ``[]``). ``steps``: the step count or None for
    the default; ``auto_steps`` for ``steps="auto"``. ``compute_dtype`` None: the default.
    Everything data-dependent runs here: the finiteness check, the power-of-two rescale
    (:func:`rescale_if_needed`), the ``steps="auto"`` polishing and the SVD. The result has
    :func:`result_like`'s layout and never aliases ``M``. Differentiable (reverse mode): the
    backward is ``torch.ops.matfn.msign_vjp``.
    """
    with autocast_disabled():
        method_, steps_ = from_op(method, table, steps, auto_steps)
        out = _msign_eager(M, method_, steps_, algorithm, eps, compute_dtype, check_finite)
        return in_result_layout(out)


@msign_op.register_fake
def _msign_fake(M, method, table, steps, auto_steps, algorithm, eps, compute_dtype, check_finite):
    return result_like(M)


def _msign_setup_context(ctx, inputs, output) -> None:
    M, method, _, _, auto_steps, _, _, compute_dtype, _ = inputs
    steps = "auto" if auto_steps else None
    reuse = forward_is_exact(method, steps, compute_dtype, M)
    ctx.save_for_backward(M, output if reuse else None)


def _msign_backward(ctx, grad: torch.Tensor):
    """``msign_vjp(M, grad)``: the derivative of the exact msign (see :func:`msign`)."""
    M, O = ctx.saved_tensors
    G = torch.ops.matfn.msign_vjp(M, grad, "auto", None, None, False, O)
    return (G.to(M.dtype),) + (None,) * 8


msign_op.register_autograd(_msign_backward, setup_context=_msign_setup_context)


def _msign_eager(
    M: torch.Tensor,
    method: str | Table,
    steps: Steps,
    algorithm: str,
    eps: float,
    compute_dtype: torch.dtype | None,
    check_finite: bool,
    graph: bool = False,
) -> torch.Tensor:
    """msign of validated options: the check and rescale, then :func:`_msign`.

    On CUDA with ``check_finite`` and a fixed schedule the check does not hold up the launches
    (:func:`_check_deferred`): the iteration runs on M as it is, beside the device-side test of
    its norms (:func:`matfn._scaling.in_range`), and the host reads the verdict once, after
    issuing every kernel. A failed test (NaN/Inf, or a norm out of range, rare) discards that
    result and takes the rescue: :func:`rescale_if_needed` raises or rescales, and the call runs
    again. With ``graph``, ``_msign`` (with the test) is replayed from a CUDA graph.
    """
    if M.numel() == 0:
        return torch.empty_like(M)
    compute_dtype = compute_dtype or default_compute_dtype(M)
    options = {
        "method": method, "steps": steps, "algorithm": algorithm, "eps": eps,
        "compute_dtype": compute_dtype,
    }  # fmt: skip
    if check_finite and _check_deferred(M, method, steps):
        checked = functools.partial(_msign_checked, **options)
        out, ok = _graphs.replay_or_capture(checked, M) if graph else checked(M)
        if ok.item():  # the call's one host sync, after its launches
            return out
    M = rescale_if_needed(M, eps, check_finite=check_finite)
    call = functools.partial(_msign, **options)
    if graph:
        return _graphs.replay_or_capture(call, M)
    return call(M)


def _check_deferred(M: torch.Tensor, method: str | Table, steps: Steps) -> bool:
    """Whether msign's check may be read after the launches (see :func:`_msign_eager`).

    CUDA, a fixed schedule (``steps="auto"`` and the SVD read values themselves), and not under
    ``torch.compile`` or inside a CUDA graph capture, where no value can be read.
    """
    return (
        M.is_cuda
        and steps != "auto"
        and not (isinstance(method, str) and method == "svd")
        and not recording()
        and not torch.compiler.is_compiling()
        and not torch.cuda.is_current_stream_capturing()
    )


def _msign_checked(M: torch.Tensor, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """``(_msign(M), ok)`` with ``ok`` the device flag of :func:`matfn._scaling.in_range`."""
    ok = _scaling.in_range(M, options["eps"])
    return _msign(M, **options), ok


def rescale_if_needed(M: torch.Tensor, floor: float, *, check_finite: bool) -> torch.Tensor:
    """``M`` itself, or ``2^{-e} M`` per matrix when a norm is out of range or below ``floor``.

    The finiteness check of ``check_finite`` rides on the same pass and sync
    (:func:`matfn._scaling.norms_in_range`). Without it, CUDA inputs, CUDA graph captures and
    ``torch.compile`` skip the test (it needs a host sync) and return M; CPU inputs always test.
    The rescale is exact and msign scale-invariant, so a rescaled result is bitwise the result
    of an in-range M.
    """
    if not check_finite and (M.is_cuda or recording() or torch.compiler.is_compiling()):
        return M
    if _scaling.norms_in_range(M, floor, check_finite=check_finite):
        return M
    return _scaling.scale_pow2(M, -_scaling.exponents(M))


def _msign(M: torch.Tensor, **options) -> torch.Tensor:
    """msign of a validated, non-empty ``M`` (the part a CUDA graph captures)."""
    X, batch_shape = flatten_batch(M)
    X, transposed = to_wide(X)
    out = msign_wide(X, **options, out_dtype=M.dtype)
    out = cast(out, M.dtype)  # svd and steps="auto" return the compute dtype
    if transposed:
        out = out.mT
    return unflatten_batch(out, batch_shape)
