"""Kernel dispatch: Triton on CUDA tensors, the torch reference path everywhere else.

Importing this module never imports Triton; :func:`use_triton` probes it lazily once.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

__all__ = ["triton_available", "use_triton"]


@functools.cache
def triton_available() -> bool:
    """Whether Triton can be imported (probed once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels should run for these tensors.

    True when every tensor is on CUDA, Triton is importable and ``MATFN_DISABLE_TRITON`` is not
    ``"1"``. CPU tensors always take the torch path, also under ``TRITON_INTERPRET=1`` (tests
    call the kernel functions directly to run them in the interpreter).
    """
    if os.environ.get("MATFN_DISABLE_TRITON") == "1" or not tensors:
        return False
    if not all(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors):
        return False
    return triton_available()
