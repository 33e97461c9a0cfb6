"""The Triton kernel modules :mod:`optim` launches, imported where a CUDA path first runs.

Both kernel modules (:mod:`matfn.kernels.elementwise`, :mod:`matfn.kernels.max_logit`) import
Triton at their top, and ``import optim`` must not import Triton (a CUDA-only dependency that
takes seconds to load). :func:`kernels` is therefore optim's one function-level import of a
matfn module; everything else is imported at module level.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Literal

__all__ = ["kernels"]


@functools.cache
def kernels(name: Literal["elementwise", "max_logit"]) -> ModuleType:
    """``matfn.kernels.<name>``, imported on first use (then a cached lookup: it runs per step)."""
    return importlib.import_module(f"matfn.kernels.{name}")
