"""Kernel choice while a CUDA graph records them: by GPU time, not by launch cost.

Eagerly, every Triton launch costs the host 50–150 µs, so the path choice
(:mod:`matfn.msign.path`) keeps small problems on cuBLAS and the pointer-load kernels, whose
launches are cheaper. Kernels recorded into a CUDA graph are issued once and replayed without
host work; there the faster kernels on the GPU win (the TMA products with programmatic dependent
launch, one Triton divide pass for the normalisation; docs/benchmarks.md).

:func:`for_graph` marks the calls made while recording (and their warm-up run, which must
autotune and launch the same kernels); :func:`recording` is what the path choice asks. A leaf
module (no Triton).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

__all__ = ["for_graph", "recording"]

_RECORDING = contextvars.ContextVar("matfn_recording_for_graph", default=False)


def recording() -> bool:
    """Whether the kernels launched now are for a CUDA graph (see :func:`for_graph`)."""
    return _RECORDING.get()


@contextlib.contextmanager
def for_graph() -> Iterator[None]:
    """Choose kernels by GPU time inside this block: its launches are recorded into a graph.

    Enter it around a graph's capture and around the warm-up run before it, so both launch the
    same kernels (the warm-up autotunes them).
    """
    token = _RECORDING.set(True)
    try:
        yield
    finally:
        _RECORDING.reset(token)
