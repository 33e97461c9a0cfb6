"""Small int64 tables (addresses, shapes, strides) handed to Triton kernels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl


def int64_table(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """``values`` as an int64 tensor on ``device``, uploaded without waiting for the GPU.

    Pinned host memory and a non-blocking copy: a pageable copy would make the host wait for
    the GPU queue to drain.
    """
    table = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table


@triton.jit
def table_pointer(table, i, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Entry ``i`` of an address table as a ``DTYPE`` pointer, 16-byte aligned if ``ALIGNED``.

    ``ALIGNED`` promises that the host checked every address. The hint reaches the loads
    through the returned pointer: the grouped and Muon kernels compile to the same sm_90 PTX
    (vector loads, ``cp.async``; Triton 3.6) as with the hint written inline.
    """
    ptr = tl.load(table + i).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr
