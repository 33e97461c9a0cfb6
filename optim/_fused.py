r"""Muon's CUDA step: Triton element-wise passes and CUDA-graph replay of bucket orthogonalisation.

:func:`fused_muon` computes exactly the update of :func:`optim.muon._batched_muon` (the torch
reference), with the element-wise work in two Triton passes of
:mod:`matfn.kernels.elementwise` instead of ``torch._foreach_*`` calls and a stacking copy:

1. per bucket, one pass per run of equal shapes: ``B ← μB + (1−μ)G``, the Nesterov input,
   transposed into the wide stack (tall matrices), cast to the iteration dtype, and per-tile
   sums of squares (the Frobenius norms the normalisation needs, so it does not read X again);
2. orthogonalisation of the bucket's stack (:func:`optim._math.orthogonalize`);
3. per run, one pass ``W ← (1 − ηλ)W − η·r(A, B)·O``.

With ``Muon(..., cuda_graphs=True)`` step 2 of small buckets is replayed from captured CUDA
graphs (:class:`BucketGraphs`): host overhead, not GPU work, dominates those buckets, and a
replayed graph issues its normalise + Newton–Schulz kernels in microseconds. How a graph stays
correct:

* it is captured for a bucket only the second time the same key is seen (shapes, member count,
  dtype, device, the group's Newton–Schulz settings, :func:`matfn.functional.graph_key` and the
  :class:`FusedConfig`), so a changing set of gradients does not capture one-offs; at most
  ``max_graphs`` are kept (least recently used dropped), each bucket at most
  ``max_graph_elements`` entries (large buckets are GPU-bound: a graph gains nothing and would
  pin their intermediates);
* the graph reads a static stack buffer that the momentum pass writes every step, and writes a
  static output that the update pass reads right after, in stream order;
* never while a capture is already under way (a user graphing the whole step), under
  ``torch.compile``, or off CUDA;
* the cache is not optimizer state: ``state_dict``, ``deepcopy`` and pickling drop it.
"""

from __future__ import annotations

import contextlib
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from matfn.functional import for_graph, graph_key, triton_module, use_triton

from ._math import (
    MUON_KEYS,
    Member,
    adjust_lr_ratio,
    buckets,
    iteration_dtype_of,
    orthogonalize,
    runs,
)

__all__ = ["CONFIG", "KERNEL_DTYPES", "BucketGraphs", "FusedConfig", "applies", "fused_muon"]

#: Dtypes the element-wise kernels read and write.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class FusedConfig:
    """Settings of the CUDA-graph replay (one object, part of every graph's key).

    Attributes
    ----------
    max_graphs : int
        Most graphs kept per optimizer (each holds a private pool for its intermediates).
    max_graph_elements : int
        Largest bucket stack (entries) that is captured: 2²⁶ is 128 MB in bf16, above
        GPT-2-small's 28 M and 57 M entry buckets.
    gpu_time_kernels : bool
        Capture inside :func:`matfn.functional.for_graph`, i.e. on the kernels fastest on the
        GPU (the TMA products with programmatic dependent launch) rather than the eager step's,
        which are chosen for their launch cost; faster replayed (docs/benchmarks.md). Replayed
        updates then differ from eager ones by the iteration's rounding, not bitwise.
    """

    max_graphs: int = 8
    max_graph_elements: int = 2**26
    gpu_time_kernels: bool = True


#: The configuration a new :class:`BucketGraphs` takes unless given another.
CONFIG = FusedConfig()


def applies(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor],
    lr: float | Tensor,
    group: Mapping[str, Any],
) -> bool:
    """Whether the batched step runs on :func:`fused_muon` (else the torch reference).

    CUDA with Triton on (:func:`matfn.functional.use_triton`), eager mode, a float lr,
    ``update="msign"``, a float32/bf16/fp16 iteration dtype and contiguous float32/bf16/fp16
    params, grads and buffers.
    """
    if isinstance(lr, Tensor) or group.get("update", "msign") != "msign":
        return False
    if torch.compiler.is_compiling() or not use_triton(*params, *grads, *bufs):
        return False
    return iteration_dtype_of(group, params[0]) in KERNEL_DTYPES and all(
        t.dtype in KERNEL_DTYPES and t.is_contiguous() for t in (*params, *grads, *bufs)
    )


# --------------------------------------------------------------------------------------------
# CUDA-graph cache
# --------------------------------------------------------------------------------------------


@dataclass
class _Entry:
    graph: torch.cuda.CUDAGraph
    stack: Tensor
    partials: Tensor
    out: Tensor


class BucketGraphs:
    """Per-optimizer cache of captured orthogonalisation graphs, keyed by bucket.

    Parameters
    ----------
    config : FusedConfig, optional
        Default :data:`CONFIG`.
    """

    def __init__(self, config: FusedConfig | None = None) -> None:
        self.config = CONFIG if config is None else config
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._seen: Counter = Counter()

    def __deepcopy__(self, memo: dict) -> BucketGraphs:
        return BucketGraphs(self.config)

    def __getstate__(self) -> dict:
        return {"config": self.config}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state.get("config"))

    def __len__(self) -> int:
        return len(self._entries)

    def usable(self, stack_numel: int, device: torch.device) -> bool:
        """Whether this bucket may be replayed from a graph now."""
        return (
            device.type == "cuda"
            and stack_numel <= self.config.max_graph_elements
            and not torch.compiler.is_compiling()
            and not torch.cuda.is_current_stream_capturing()
        )

    def key(
        self, members: list[Member], dtype: torch.dtype, device: torch.device, group: Mapping
    ) -> tuple:
        """Everything a captured bucket graph depends on."""
        settings = repr(tuple(group.get(k) for k in MUON_KEYS))
        members_key = tuple(key for key, _ in members)
        return (device, dtype, members_key, settings, graph_key(), self.config)

    def lookup(self, key: Hashable) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def replay(self, entry: _Entry) -> Tensor:
        entry.graph.replay()
        return entry.out

    def maybe_capture(
        self,
        key: Hashable,
        stack: Tensor,
        partials: Tensor,
        orthogonalize: Callable[[Tensor, Tensor], Tensor],
    ) -> None:
        """Count ``key``; on its second sighting capture ``orthogonalize(stack, partials)``.

        Call after the eager result of this step has been computed: the warm-up run and the
        capture use ``stack`` as scratch (its contents are rewritten every step).
        """
        self._seen[key] += 1
        if self._seen[key] < 2 or key in self._entries:
            return
        side = torch.cuda.Stream(device=stack.device)
        side.wait_stream(torch.cuda.current_stream(stack.device))
        chosen = for_graph() if self.config.gpu_time_kernels else contextlib.nullcontext()
        with chosen:
            with torch.cuda.stream(side):  # warm-up off the capture (cuBLAS workspaces, etc.)
                orthogonalize(stack, partials)
            torch.cuda.current_stream(stack.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = orthogonalize(stack, partials)
        self._entries[key] = _Entry(graph, stack, partials, out)
        while len(self._entries) > self.config.max_graphs:
            self._entries.popitem(last=False)


# --------------------------------------------------------------------------------------------
# The fused step
# --------------------------------------------------------------------------------------------


def _momentum_stack(
    grads: list[Tensor],
    bufs: list[Tensor],
    members: list[Member],
    dtype: torch.dtype,
    momentum: float,
    nesterov: bool,
    buffers: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Momentum + Nesterov + stack + cast of one bucket, one Triton pass per run.

    Returns the wide ``(K, s, L)`` stack in ``dtype`` and the per-tile sums of squares of its
    entries, ``(K, tiles)`` float32 (``partials.sum(1).sqrt()`` are the Frobenius norms), in
    ``buffers`` when given (a captured graph's static inputs).
    """
    elementwise = triton_module("kernels.elementwise")
    if buffers is None:
        n, m = members[0][0][:2]
        s, L = min(n, m), max(n, m)
        K = sum(key[2] for key, _ in members)
        out = grads[members[0][1]].new_empty((K, s, L), dtype=dtype)
        partials = out.new_empty((K, elementwise.num_tiles(s, L)), dtype=torch.float32)
    else:
        out, partials = buffers
    for (n, m, k, _, _), idx, start in runs(members):
        stop = start + len(idx) * k
        elementwise.momentum_stack(
            [grads[i] for i in idx],
            [bufs[i] for i in idx],
            out[start:stop],
            partials[start:stop],
            n=n,
            m=m,
            momentum=momentum,
            nesterov=nesterov,
        )
    return out, partials


def fused_muon(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_bufs: list[Tensor],
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
    adjust_lr_fn: str | None,
    group: Mapping[str, Any],
    graphs: BucketGraphs | None = None,
) -> None:
    """The batched Muon step on the Triton element-wise kernels (see the module docstring).

    Preconditions: :func:`applies` holds. ``graphs``: the optimizer's cache, or None to run
    every bucket eagerly. Cost: one read of G and B and one write of B and the stack per bucket,
    one read of W and O and one write of W per run, plus the orthogonalisation.
    """
    view = group.get("matrix_view", "auto")
    dtype = iteration_dtype_of(group, params[0])
    blocks: list[tuple[tuple, list[int], Tensor]] = []
    for members in buckets(params, [(p.device,) for p in params], view):
        device = params[members[0][1]].device
        key = graphs.key(members, dtype, device, group) if graphs is not None else None
        entry = graphs.lookup(key) if graphs is not None else None
        if entry is not None and graphs.usable(entry.stack.numel(), device):
            buffers = (entry.stack, entry.partials)
            _momentum_stack(grads, momentum_bufs, members, dtype, momentum, nesterov, buffers)
            O = graphs.replay(entry)
        else:
            X, partials = _momentum_stack(grads, momentum_bufs, members, dtype, momentum, nesterov)
            O = orthogonalize(X, group, norms=partials.sum(1).sqrt())
            if graphs is not None and graphs.usable(X.numel(), device):
                graphs.maybe_capture(
                    key, X, partials, lambda X, P: orthogonalize(X, group, P.sum(1).sqrt())
                )
        for run_key, idx, start in runs(members):
            n, m, k = run_key[:3]
            block = O[start : start + len(idx) * k]
            blocks.append((run_key, idx, block.mT if n > m else block))

    apply_update = triton_module("kernels.elementwise").apply_update
    for (n, m, _, _, _), idx, block in blocks:
        scale = -lr * adjust_lr_ratio(adjust_lr_fn, n, m)
        apply_update([params[i] for i in idx], block, factor=1 - lr * weight_decay, scale=scale)
