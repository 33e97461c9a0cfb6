"""The solver path for flattened operands: Triton on CUDA float32, the torch chunked form else.

Shared by the forward ops (:mod:`matfn.triangular.ops`) and the backward
(:mod:`matfn.triangular.backward`), whose transposed solves are forward solves on reversed rows.
"""

from __future__ import annotations

import torch

from matfn._backend import triton_module, use_triton

from .config import SOLVE_MAX_D, inv_config, solve_config
from .reference import tri_inv_chunked_torch, tri_solve_chunked_torch

__all__ = ["inv_flat", "solve_flat"]


def inv_flat(Qf, Kf, lamf, chunk_size: int) -> torch.Tensor:
    """``T⁻¹`` of flattened compute-dtype operands: Triton on CUDA float32, else torch."""
    if Qf.shape[-1] > 0 and use_triton(Qf) and Qf.dtype == torch.float32:
        inverse = triton_module("triangular.inverse")
        return inverse.tri_inv_triton(Qf, Kf, lamf, config=inv_config(chunk_size))
    return tri_inv_chunked_torch(Qf, Kf, lamf, chunk_size)


def solve_flat(Qf, Kf, Vf, lamf, chunk_size: int) -> torch.Tensor:
    """``T⁻¹ V`` of flattened compute-dtype operands: Triton on CUDA float32, else torch."""
    if 0 < Qf.shape[-1] <= SOLVE_MAX_D and use_triton(Qf) and Qf.dtype == torch.float32:
        solve = triton_module("triangular.solve")
        return solve.tri_solve_triton(Qf, Kf, Vf, lamf, config=solve_config(chunk_size))
    return tri_solve_chunked_torch(Qf, Kf, Vf, lamf, chunk_size)
