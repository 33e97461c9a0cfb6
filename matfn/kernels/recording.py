"""Kernel choice while a CUDA graph records them: by GPU time, not by launch cost.

Eagerly, every Triton launch costs the host 50–150 µs (docs/benchmarks.md, "Host cost per
launch"), so the dispatcher (:mod:`matfn.kernels.dispatch`) keeps small problems on cuBLAS and
the pointer-load kernels, whose launches are cheaper. Kernels recorded into a CUDA graph are
issued once and replayed without host work; there the faster kernels on the GPU win: the TMA
products with programmatic dependent launch ran a 1024² Polar-Express msign in 0.111 ms against
0.140 ms on the eager choice, 64×512² in 0.61 against 0.65 ms (H200, graph-replayed), and one
Triton divide pass instead of torch's three launches normalises the input (1024²: 0.106 ms).

:func:`for_graph` marks the calls made while recording (and their warm-up run, which must
autotune and launch the same kernels); :func:`recording` is what the dispatcher asks.
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
