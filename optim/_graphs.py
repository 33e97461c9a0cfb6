"""CUDA-graph replay of Muon's per-bucket orthogonalisation (host overhead, not GPU work).

A GPT-2-small Muon step issues about 90 kernels. Replaying the normalise + Newton–Schulz part
of each bucket as one captured CUDA graph issues it in microseconds (on the H100 host the step's
host time fell from 2.8 to 1.8 ms), and the graphs take the kernels that are fastest on the GPU
rather than those cheapest to launch (:data:`GPU_TIME_KERNELS`): 2.93 ms a step on the H200
against 4.1–5.8 ms eager (docs/benchmarks.md). It is opt-in (``Muon(..., cuda_graphs=True)``):
each graph pins its intermediates in a private memory pool, and replayed updates differ from
eager ones by the iteration's rounding.

How it stays correct:

* A graph is captured for a bucket only the second time the same key is seen (shapes, member
  count, dtype, device, the group's Newton–Schulz settings and the dispatch switches), so a
  changing set of gradients does not capture one-offs; at most :data:`MAX_GRAPHS` are kept
  (least recently used dropped), each bucket at most :data:`MAX_ELEMENTS` entries (large
  buckets are GPU-bound: a graph gains nothing and would pin their intermediates).
* The graph reads a static stack buffer that the momentum kernel writes every step, and writes
  a static output that the update kernel reads right after, in stream order.
* Never while a capture is already under way (a user graphing the whole step), under
  ``torch.compile``, or off CUDA.
* The cache is not state: ``state_dict``, ``deepcopy`` and pickling drop it (it is rebuilt).
"""

from __future__ import annotations

import contextlib
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

from matfn.kernels import recording

__all__ = ["BucketGraphs", "MAX_GRAPHS", "MAX_ELEMENTS", "GPU_TIME_KERNELS"]

#: Most graphs kept per optimizer (each holds a private pool for its intermediates).
MAX_GRAPHS = 8
#: Largest bucket stack (entries) that is captured: 2²⁶ is 128 MB in bf16. GPT-2-small's
#: buckets are 28 M and 57 M entries.
MAX_ELEMENTS = 2**26
#: Whether the captured graphs take the kernels that are fastest on the GPU
#: (:mod:`matfn.kernels.recording`: the TMA products with programmatic dependent launch for
#: every bucket they can load) instead of the eager step's, which avoid Triton launches for
#: their host cost. GPT-2 small on the H200: 2.93 ms a step against 3.85 with the eager step's
#: kernels (docs/benchmarks.md). Replayed updates then differ from eager ones by the iteration's
#: rounding (fp16 products in another order), not bitwise; off, they are the same.
GPU_TIME_KERNELS = True


@dataclass
class _Entry:
    graph: torch.cuda.CUDAGraph
    stack: torch.Tensor
    partials: torch.Tensor
    out: torch.Tensor


class BucketGraphs:
    """Per-optimizer cache of captured orthogonalisation graphs, keyed by bucket."""

    def __init__(self) -> None:
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._seen: Counter = Counter()

    def __deepcopy__(self, memo: dict) -> BucketGraphs:
        return BucketGraphs()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def usable(stack_numel: int, device: torch.device) -> bool:
        """Whether this bucket may be replayed from a graph now."""
        return (
            device.type == "cuda"
            and stack_numel <= MAX_ELEMENTS
            and not torch.compiler.is_compiling()
            and not torch.cuda.is_current_stream_capturing()
        )

    def lookup(self, key: Hashable) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def replay(self, entry: _Entry) -> torch.Tensor:
        entry.graph.replay()
        return entry.out

    def maybe_capture(
        self,
        key: Hashable,
        stack: torch.Tensor,
        partials: torch.Tensor,
        orthogonalize: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
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
        kernels = recording.for_graph() if GPU_TIME_KERNELS else contextlib.nullcontext()
        with kernels:
            with torch.cuda.stream(side):  # warm-up off the capture (cuBLAS workspaces, etc.)
                orthogonalize(stack, partials)
            torch.cuda.current_stream(stack.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = orthogonalize(stack, partials)
        self._entries[key] = _Entry(graph, stack, partials, out)
        while len(self._entries) > MAX_GRAPHS:
            self._entries.popitem(last=False)
