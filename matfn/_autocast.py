"""The public functions' autocast rule: they run in their own dtypes inside ``torch.autocast``.

An enclosing ``torch.autocast("cpu"/"cuda", dtype)`` would otherwise recast every matmul of an
iteration to ``dtype`` (bf16 products under a float32 iteration: errors of 1e-2 instead of
1e-6, and convergence checks that fail), so :func:`no_autocast` turns autocast off inside each
public entry, as ``torch.amp.custom_fwd`` does for custom functions. Inputs keep their dtype
(an autocast region upstream may already have produced bf16 tensors: the functions then follow
their docstrings' rules for bf16 inputs) and outputs come back in the dtype those rules give.
Imports only torch.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar

import torch

__all__ = ["no_autocast", "autocast_disabled"]

P = ParamSpec("P")
R = TypeVar("R")

#: The device types whose autocast state is switched off (the ones the library runs on).
DEVICE_TYPES = ("cpu", "cuda")


@contextlib.contextmanager
def autocast_disabled() -> Iterator[None]:
    """Autocast off for every device type in :data:`DEVICE_TYPES` that has it on; else a no-op.

    The test of the state is cheap (no context is entered outside an autocast region), so the
    optimizer's hot path pays nothing.
    """
    enabled = [d for d in DEVICE_TYPES if torch.is_autocast_enabled(d)]
    if not enabled:
        yield
        return
    with contextlib.ExitStack() as stack:
        for device_type in enabled:
            stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


def no_autocast(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorate a public function so it runs with autocast off (see the module doc)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with autocast_disabled():
            return fn(*args, **kwargs)

    return wrapper
