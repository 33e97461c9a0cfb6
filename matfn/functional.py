"""The building blocks :mod:`optim` composes, declared here so that it needs no private names.

Everything here is stable for the optimizer package; users call the functions of :mod:`matfn`.

- :func:`to_wide`: a batch ``(B, n, m)`` as wide matrices ``(B, s, L)``, ``s ≤ L``, and whether
  it was transposed.
- :func:`use_triton`: whether the Triton kernels run for these tensors.
- :data:`METHODS`, :func:`default_compute_dtype`, :func:`normalize_for_iteration`,
  :func:`run_newton_schulz`, :func:`msign_wide`: msign's steps on wide batches.
- :func:`iteration_dtype`: the dtype a bf16 batch is iterated in.
- :func:`graph_key`: the kernel choices a captured CUDA graph depends on (``triton_disabled()``
  and the frozen configs of :mod:`matfn._backend`).
- :func:`for_graph`: a context in which kernels are chosen for graph replay (GPU time).
- :func:`mclip`: singular-value clipping (the ``update="mclip"`` rule).
- :func:`triton_module`: a Triton kernel module (``"kernels.elementwise"``,
  ``"kernels.max_logit"``), imported on first use so that ``import optim`` loads no Triton.
"""

from ._backend import graph_key, triton_module, use_triton
from ._batching import to_wide
from .kernels.recording import for_graph
from .mclip import mclip
from .msign import (
    METHODS,
    default_compute_dtype,
    msign_wide,
    normalize_for_iteration,
    run_newton_schulz,
)
from .msign.path import iteration_dtype

__all__ = [
    "METHODS",
    "default_compute_dtype",
    "for_graph",
    "graph_key",
    "iteration_dtype",
    "mclip",
    "msign_wide",
    "normalize_for_iteration",
    "run_newton_schulz",
    "to_wide",
    "triton_module",
    "use_triton",
]
