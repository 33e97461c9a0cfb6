"""Launch helpers shared by every Triton kernel: device queries and programmatic dependent launch.

Programmatic dependent launch (PDL, compute capability ≥ 9) lets a kernel start while the one
before it finishes; the new kernel's programs call :func:`wait_for_previous_launch` before any
memory access, so the early start is safe and only the launch latency is hidden.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

__all__ = [
    "INTERPRET",
    "capability",
    "sm_count",
    "use_pdl",
    "pdl_flags",
    "wait_for_previous_launch",
]

#: Kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set by the test suite).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def capability(index: int) -> tuple[int, int]:
    """``torch.cuda.get_device_capability`` of CUDA device ``index``, asked once per device."""
    return torch.cuda.get_device_capability(index)


@functools.cache
def sm_count(index: int) -> int:
    """Streaming multiprocessors of CUDA device ``index``, asked once per device."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def use_pdl(A: torch.Tensor, tiles: int | None = None, max_tiles_per_sm: int = 2) -> bool:
    """Whether a launch on ``A``'s device uses programmatic dependent launch.

    Only on CUDA devices of compute capability ≥ 9, never in the interpreter. ``tiles``: a
    product's 128×128 output tiles (batch included); above ``max_tiles_per_sm`` per SM there is
    no launch gap worth hiding and the product is launched plainly. ``None``: no limit (chains of
    short dependent kernels).
    """
    if INTERPRET or not A.is_cuda or capability(A.device.index)[0] < 9:
        return False
    return tiles is None or tiles <= max_tiles_per_sm * sm_count(A.device.index)


def pdl_flags(pdl: bool) -> dict:
    """PDL's kernel flag and launch option, always set together.

    The kernel's ``griddepcontrol.wait`` (:func:`wait_for_previous_launch`) is what makes the
    early launch safe.
    """
    return {"USE_PDL": True, "launch_pdl": True} if pdl else {"USE_PDL": False}


@triton.jit
def wait_for_previous_launch(USE_PDL: tl.constexpr):
    """Start of a program under programmatic dependent launch.

    The program may start while the launch before it finishes: it waits for that launch and its
    memory (``griddepcontrol.wait``) before any access (the launch may have written this one's
    operands, or still read the memory this one writes), then lets the next launch's programs
    start their set-up. Every kernel launched with ``launch_pdl=True`` calls it first.
    """
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
