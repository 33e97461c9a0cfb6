"""Small int64 tables (addresses, shapes, strides) handed to Triton kernels."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def int64_table(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """``values`` as an int64 tensor on ``device``, uploaded without waiting for the GPU.

    Pinned host memory and a non-blocking copy: a pageable copy would make the host wait for
    the GPU queue to drain.
    """
    table = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table
