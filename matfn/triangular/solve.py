r"""``tri_solve`` on CUDA: the launcher that checks the operands and picks the scan or the tree.

* :mod:`matfn.triangular.scan` — the two-level scan over groups of chunks (every eager call, and
  graph captures of more than ``tree_max_rows`` rows): ``≈ 4 n d (e + d) + 2 n d e`` FLOPs
  behind a short chain of dependent steps.
* :mod:`matfn.triangular.tree` — divide and conquer over ``⌈log₂(n/C)⌉`` parallel levels (graph
  captures of at most ``tree_max_rows`` rows ``B·n``): 2.4× the FLOPs but no chain, so it wins
  only where a graph removes its launch gaps and the problem is small (docs/benchmarks.md).

Both run in float32 with fp32-accurate tensor-core products (≈ 1e-6 relative against float64
on well-conditioned ``T``).
"""

from __future__ import annotations

import torch

from .config import SOLVE_MAX_D, TRI_SOLVE_CONFIG, TriSolveConfig
from .inverse import check_operands, out_buffer
from .scan import solve_scan
from .tree import solve_tree

__all__ = ["tri_solve_triton", "ALGORITHMS"]

#: ``algorithm`` values of :func:`tri_solve_triton`.
ALGORITHMS = ("auto", "scan", "tree")


def _capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on ``device``'s current stream."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def use_tree(capturing: bool, rows: int, config: TriSolveConfig) -> bool:
    """``algorithm="auto"``: the tree while a graph is captured and ``rows = B·n`` is small.

    Replayed from a graph, the tree's levels have no launch gaps and it has no chain, so it
    beats the scan up to ``config.tree_max_rows`` rows; eager, its extra launches cost more
    than its shorter chain saves at every size.
    """
    return capturing and rows <= config.tree_max_rows


def tri_solve_triton(
    Q: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor,
    lam: torch.Tensor,
    *,
    config: TriSolveConfig = TRI_SOLVE_CONFIG,
    algorithm: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``T⁻¹ V`` for float32 ``Q, K`` ``(B, n, d)``, ``V`` ``(B, n, e)``, ``λ`` ``(B, n)``.

    Parameters
    ----------
    Q, K, V, lam : torch.Tensor
        The operands, float32; ``d ≤ 128`` (the kernels keep ``d``-wide tiles on chip).
    config : TriSolveConfig
        The tuning (:class:`~matfn.triangular.config.TriSolveConfig`).
    algorithm : {"auto", "scan", "tree"}
        ``"auto"`` (what ``tri_solve`` runs): :func:`use_tree`; ``"scan"`` / ``"tree"`` force one
        (tests and benchmarks).
    out : torch.Tensor, optional
        A contiguous float32 ``(B, n, e)`` result buffer.

    Returns
    -------
    torch.Tensor
        ``X`` ``(B, n, e)`` with ``T X = V``.
    """
    check_operands(Q, K, lam)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if V.dtype != torch.float32 or V.ndim != 3 or V.shape[:2] != Q.shape[:2]:
        raise ValueError(f"expected float32 V (B, n, e), got {V.dtype} {tuple(V.shape)}")
    if Q.shape[-1] > SOLVE_MAX_D:
        raise ValueError(f"tri_solve_triton supports d ≤ {SOLVE_MAX_D}, got d = {Q.shape[-1]}")
    Q, K, V, lam = Q.contiguous(), K.contiguous(), V.contiguous(), lam.contiguous()
    B, n, d = Q.shape
    e = V.shape[-1]
    X = out_buffer(out, (B, n, e), Q.device)
    if B == 0 or n == 0 or e == 0:
        return X
    if algorithm == "auto":
        algorithm = "tree" if use_tree(_capturing(Q.device), B * n, config) else "scan"
    if algorithm == "tree":
        return solve_tree(Q, K, V, lam, X, config)
    return solve_scan(Q, K, V, lam, X, config)
