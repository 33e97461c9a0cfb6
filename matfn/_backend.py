"""Which implementation runs: the Triton kernels on CUDA tensors, the torch reference elsewhere.

A leaf module: importing it never imports Triton (:func:`triton_available` probes it lazily
once), and it imports nothing else from the package.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

__all__ = ["triton_available", "use_triton", "triton_disabled"]


@functools.cache
def triton_available() -> bool:
    """Whether Triton can be imported (probed once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def triton_disabled() -> bool:
    """Whether ``MATFN_DISABLE_TRITON=1`` forces the torch path (the one environment switch)."""
    return os.environ.get("MATFN_DISABLE_TRITON") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels should run for these tensors.

    True when every tensor is on CUDA, Triton is importable and ``MATFN_DISABLE_TRITON`` is not
    ``"1"``. CPU tensors always take the torch path, also under ``TRITON_INTERPRET=1`` (tests
    call the kernel launchers directly to run them in the interpreter).
    """
    if triton_disabled() or not tensors:
        return False
    if not all(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors):
        return False
    return triton_available()
