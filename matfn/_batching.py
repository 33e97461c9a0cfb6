"""Leading-dimension flattening and the tall-to-wide transpose used by every matrix function."""

from __future__ import annotations

import torch

__all__ = ["flatten_batch", "unflatten_batch", "to_wide"]


def flatten_batch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
    """Reshape ``(..., n, m)`` to ``(B, n, m)``; return the tensor and the batch shape."""
    batch_shape = x.shape[:-2]
    return x.reshape(-1, *x.shape[-2:]), batch_shape


def unflatten_batch(x: torch.Tensor, batch_shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`flatten_batch`."""
    return x.reshape(*batch_shape, *x.shape[-2:])


def to_wide(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Return ``x`` or ``x.mT`` so that rows ≤ columns, and whether it was transposed.

    The Newton–Schulz cost is ``O(s² L)`` with ``s`` the short side, so the iteration always
    runs on the wide orientation.
    """
    if x.shape[-2] > x.shape[-1]:
        return x.mT, True
    return x, False
