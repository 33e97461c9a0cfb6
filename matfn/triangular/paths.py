"""The solver paths for flattened operands: Triton on CUDA float32, the torch chunked forms else.

Shared by the forward ops (:mod:`matfn.triangular.ops`) and the backward
(:mod:`matfn.triangular.backward`), whose transposed solves are forward solves on reversed rows.
"""

from __future__ import annotations

import torch

from matfn._backend import triton_module, use_triton

from .config import SOLVE_MAX_D, decay_config, inv_config, solve_config
from .reference import (
    causal_product_decay_torch,
    tri_inv_chunked_torch,
    tri_solve_chunked_torch,
    tri_solve_decay_chunked_torch,
)

__all__ = ["inv_flat", "solve_flat", "causal_decay_flat"]


def _kernels_apply(x: torch.Tensor, width: int) -> bool:
    """Whether the Triton kernels take float32 ``x`` with ``width``-wide on-chip tiles."""
    return 0 < width <= SOLVE_MAX_D and x.dtype == torch.float32 and use_triton(x)


def inv_flat(Qf, Kf, lamf, chunk_size: int, decay=None) -> torch.Tensor:
    """``T⁻¹`` of flattened compute-dtype operands: Triton on CUDA float32, else torch.

    ``decay``: the log-decays ``(B, n, g)`` of a decayed system, solved for ``V = I`` (its
    ``d×n`` state makes that ``O(n² (d + C))``, as the undecayed inverse).
    """
    if decay is not None:
        B, n, _ = Qf.shape
        eye = torch.eye(n, dtype=Qf.dtype, device=Qf.device).expand(B, n, n)
        return torch.tril(solve_flat(Qf, Kf, eye, lamf, chunk_size, decay))
    if Qf.shape[-1] > 0 and use_triton(Qf) and Qf.dtype == torch.float32:
        inverse = triton_module("triangular.inverse")
        return inverse.tri_inv_triton(Qf, Kf, lamf, config=inv_config(chunk_size))
    return tri_inv_chunked_torch(Qf, Kf, lamf, chunk_size)


def solve_flat(Qf, Kf, Vf, lamf, chunk_size: int, decay=None) -> torch.Tensor:
    """``T⁻¹ V`` of flattened compute-dtype operands: Triton on CUDA float32, else torch.

    ``decay``: ``None`` or the log-decays ``(B, n, g)`` of a decayed system.
    """
    if not _kernels_apply(Qf, Qf.shape[-1]):
        if decay is None:
            return tri_solve_chunked_torch(Qf, Kf, Vf, lamf, chunk_size)
        return tri_solve_decay_chunked_torch(Qf, Kf, Vf, lamf, decay, chunk_size)
    if decay is None:
        solve = triton_module("triangular.solve")
        return solve.tri_solve_triton(Qf, Kf, Vf, lamf, config=solve_config(chunk_size))
    kernels = triton_module("triangular.decay")
    return kernels.tri_solve_decay_triton(Qf, Kf, Vf, lamf, decay, config=decay_config(chunk_size))


def causal_decay_flat(A, B, W, decay, chunk_size: int) -> torch.Tensor:
    """``O_r = Σ_{s<r} (A_r·B_s) W_s ⊙ exp(G_r − G_s)``: Triton on CUDA float32, else torch."""
    if _kernels_apply(A, A.shape[-1]) and W.shape[-1] > 0:
        kernels = triton_module("triangular.decay")
        return kernels.causal_product_decay_triton(A, B, W, decay, config=decay_config(chunk_size))
    return causal_product_decay_torch(A, B, W, decay, chunk_size)
