"""Replay launch-bound matrix functions from captured CUDA graphs (``cuda_graph=True``).

A 5-step msign issues 17–20 kernels. At 1024², or for a batch of 64 matrices of 512², each runs
for a few microseconds, so an eager call is bound by the host issuing them (several times its
GPU time; docs/benchmarks.md); tri_inv and tri_solve issue about 8 Triton launches. With
``cuda_graph=True`` (the default of msign, mclip, tri_inv and tri_solve; mcsgn's is off, as its
default ``steps="auto"`` syncs) these functions capture the call once per key and replay it
afterwards: copy the inputs into the graph's static inputs, replay, clone the static
output. The captured kernels are chosen by GPU time, not launch cost
(:mod:`matfn.kernels.recording`).

How it stays correct:

* The key holds everything the captured kernels depend on: the function and the arguments bound
  to it (a ``functools.partial``; a per-step coefficient table by value, as the tuple of float
  triples :func:`matfn.coefficients.check_table` returns), the inputs' shapes, strides, dtypes
  and devices, the current stream (a graph's static buffers are used in that stream's order
  only) and the kernel configs (:func:`matfn._backend.graph_key`).
* The first call with a key runs eagerly on a side stream (Triton autotuning, cuBLAS workspaces;
  its result is returned), then captures. At most :data:`MAX_GRAPHS` graphs are kept, least
  recently used dropped; each holds a private memory pool for its intermediates.
* Inputs whose products exceed :data:`MAX_WORK` multiply-adds run eagerly: they are GPU-bound,
  and a graph would pin their intermediates for no gain. So do inputs above
  :data:`MAX_INPUT_BYTES`, whose copies into the graph cost more than the launches saved, CPU
  inputs, calls under ``torch.compile`` or inside a capture already under way, and calls that
  autograd records.
* The result is a fresh tensor (a clone of the static output), never an alias of the cache; a
  call may also return a tuple of tensors (a result and a device-side check flag, read by the
  caller after the replay has been issued).
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

from . import _backend
from .kernels import recording

__all__ = [
    "MAX_GRAPHS",
    "MAX_WORK",
    "MAX_INPUT_BYTES",
    "input_bytes",
    "gram_work",
    "graph_applies",
    "ns_graph_applies",
    "replay_or_capture",
    "clear",
]

#: Most captured graphs kept (per process; least recently used dropped).
MAX_GRAPHS = 16
#: Largest problem captured, in multiply-adds of its largest product (for Newton–Schulz one
#: ``X Xᵀ``, ``batch · s² · L`` for sides ``s ≤ L``). Why: up to here an eager call still costs
#: more host time than GPU time (48 × 768², 2.2·10¹⁰: 1.5 ms of GPU work, 1.9 ms of host time
#: for its TMA launches on an H100); above it the kernels outlast their launches and the copies
#: in and out only add time (docs/benchmarks.md).
MAX_WORK = 2**35
#: Largest total input size captured, in bytes. Why: every replay copies the inputs into the
#: graph's static buffers, and for large, cheap problems the copies outweigh the launches saved
#: (8192 DeltaNet chunks of 64×128: 536 MB of Q and K, 1.10 ms replayed against 0.66 ms eager).
MAX_INPUT_BYTES = 2**27


Result = torch.Tensor | tuple[torch.Tensor, ...]


@dataclass
class _Entry:
    graph: torch.cuda.CUDAGraph
    static_in: tuple[torch.Tensor, ...]
    static_out: Result


_ENTRIES: OrderedDict[Hashable, _Entry] = OrderedDict()
_LOCK = threading.Lock()


def gram_work(M: torch.Tensor) -> int:
    """Multiply-adds of one ``X Xᵀ`` of ``M (..., n, m)`` in its wide orientation."""
    return M.numel() * min(M.shape[-2:])


def input_bytes(*tensors: torch.Tensor) -> int:
    """Bytes a replay copies into the graph's static inputs."""
    return sum(T.numel() * T.element_size() for T in tensors)


def ns_graph_applies(M: torch.Tensor) -> bool:
    """:func:`graph_applies` for a Newton–Schulz call on ``M`` (msign, mcsgn, mclip)."""
    return graph_applies(M, work=gram_work(M))


def graph_applies(*tensors: torch.Tensor, work: int) -> bool:
    """Whether a call may be captured or replayed now (see the module docstring).

    ``work``: multiply-adds of the call's largest product.
    """
    return (
        all(T.is_cuda for T in tensors)
        and 0 < work <= MAX_WORK
        and input_bytes(*tensors) <= MAX_INPUT_BYTES
        and not any(T.requires_grad for T in tensors)
        and not torch.compiler.is_compiling()
        and not torch.cuda.is_current_stream_capturing()
    )


def clear() -> None:
    """Drop every captured graph (and the memory their pools hold)."""
    with _LOCK:
        _ENTRIES.clear()


def _key(call: functools.partial, tensors: tuple[torch.Tensor, ...]) -> tuple:
    stream = torch.cuda.current_stream(tensors[0].device).stream_id
    bound = (call.func, call.args, tuple(sorted(call.keywords.items())))
    geometry = tuple((T.shape, T.stride(), T.dtype, T.device) for T in tensors)
    return (bound, geometry, stream, _backend.graph_key())


def replay_or_capture(call: functools.partial, *tensors: torch.Tensor) -> Result:
    """``call(*tensors)``, replayed from the graph captured for this key.

    The key is ``call``'s function and bound arguments (which must be hashable) and the tensors'
    geometry, so what the graph computes cannot drift from what the key says; the first call
    with a key runs ``call`` eagerly, then captures it. ``call`` must be a pure function of the
    tensors' values (no host syncs, no data-dependent control flow): the captured kernels are
    replayed on new values. It returns a tensor or a tuple of tensors, and so does this (fresh
    clones of the graph's outputs).
    """
    key = _key(call, tensors)
    with _LOCK:
        entry = _ENTRIES.get(key)
        if entry is not None:
            _ENTRIES.move_to_end(key)
    if entry is None:
        return _capture(key, call, tensors)
    for static, T in zip(entry.static_in, tensors, strict=True):
        static.copy_(T)
    entry.graph.replay()
    if isinstance(entry.static_out, tuple):
        return tuple(out.clone() for out in entry.static_out)
    return entry.static_out.clone()


def _capture(key: Hashable, fn: Callable[..., Result], tensors: tuple[torch.Tensor, ...]):
    stream = torch.cuda.current_stream(tensors[0].device)
    static_in = tuple(torch.empty_like(T).copy_(T) for T in tensors)
    side = torch.cuda.Stream(device=tensors[0].device)
    side.wait_stream(stream)
    # kernels chosen by GPU time (kernels.recording), the same ones in the warm-up (autotuning,
    # cuBLAS workspaces; off the capture) and in the graph
    with recording.for_graph():
        with torch.cuda.stream(side):
            result = fn(*static_in)
        stream.wait_stream(side)
        for out in result if isinstance(result, tuple) else (result,):
            out.record_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
            static_out = fn(*static_in)
    stream.wait_stream(side)
    with _LOCK:
        _ENTRIES[key] = _Entry(graph, static_in, static_out)
        while len(_ENTRIES) > MAX_GRAPHS:
            _ENTRIES.popitem(last=False)
    return result
