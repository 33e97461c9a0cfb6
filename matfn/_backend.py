"""Which implementation runs, and the frozen tuning configs of the Newton–Schulz kernels.

A leaf module: importing it never imports Triton (:func:`triton_available` probes it lazily
once), and it imports nothing else from the package.

* :func:`use_triton`: the Triton kernels run on CUDA tensors when Triton is importable and
  ``MATFN_DISABLE_TRITON`` (the one environment switch) is not ``"1"``.
* :class:`NewtonSchulzConfig` (:data:`NEWTON_SCHULZ`): which Newton–Schulz step runs for a batch
  (:mod:`matfn.msign.path`). :class:`MatmulConfig` (:data:`MATMUL`): how the Triton products
  load and launch (:mod:`matfn.kernels.matmul`). Both are frozen; tests and benchmarks replace
  the module attribute with ``dataclasses.replace(NEWTON_SCHULZ, ...)``, and the code reads the
  attribute at each call.
* :func:`graph_key`: everything that changes which kernels a Newton–Schulz call launches, part
  of a captured CUDA graph's key.
* :func:`triton_module`: the one place that imports a Triton kernel module lazily (on the first
  CUDA call), because ``import matfn`` must not import Triton.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass
from types import ModuleType

import torch

__all__ = [
    "triton_available",
    "use_triton",
    "triton_disabled",
    "triton_module",
    "NewtonSchulzConfig",
    "MatmulConfig",
    "NEWTON_SCHULZ",
    "MATMUL",
    "graph_key",
]


@functools.cache
def triton_available() -> bool:
    """Whether Triton can be imported (probed once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def triton_disabled() -> bool:
    """Whether ``MATFN_DISABLE_TRITON=1`` forces the torch path (the one environment switch)."""
    return os.environ.get("MATFN_DISABLE_TRITON") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels should run for these tensors.

    True when every tensor is on CUDA, Triton is importable and ``MATFN_DISABLE_TRITON`` is not
    ``"1"``. CPU tensors always take the torch path, also under ``TRITON_INTERPRET=1`` (tests
    call the kernel launchers directly to run them in the interpreter).
    """
    if triton_disabled() or not tensors:
        return False
    if not all(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors):
        return False
    return triton_available()


def triton_module(name: str) -> ModuleType:
    """The Triton module ``matfn.<name>`` (e.g. ``"msign.triton"``), imported on first use.

    The only lazy import of a matfn module: the kernel modules import Triton, which
    ``import matfn`` must not (CPU-only installs, start-up time); the path choice calls this
    once a CUDA batch is known to take a kernel.
    """
    return importlib.import_module(f"matfn.{name}")


@dataclass(frozen=True)
class NewtonSchulzConfig:
    """Which Newton–Schulz step runs for a batch ``X (B, s, L)``, ``s ≤ L`` (docs/math.md §1.4).

    "Work" is ``B · s² · L``, the multiply-adds of one ``X Xᵀ``. The thresholds come from the
    H100/H200 timings summarised in docs/benchmarks.md.
    """

    #: Smallest work sent to the Triton kernels ("GPU-bound"; ``algorithm="auto"`` picks Gram NS
    #: only from here). Why: below it a Triton launch's host time (about 50 µs) outweighs the
    #: halved symmetric products, and Gram NS's extra launches lose to the standard iteration.
    min_triton_work: int = 2**34
    #: Smallest short side ``s`` sent to the Triton kernels without TMA. Why: batches of many
    #: small matrices stay launch-bound, cuBLAS through the folded step is faster there.
    min_triton_side: int = 2048
    #: Work from which batches with ``s <`` :attr:`min_triton_side` still take the Triton kernels
    #: on GPUs whose products load by TMA (compute capability ≥ 9, both sides multiples of 8).
    #: Why: the TMA symmetric products beat cuBLAS there and cover their larger host time.
    min_tma_batch_work: int = 2**36
    #: Whether launch-bound bf16/fp16 CUDA batches take the folded cuBLAS step ``(B + aI) X``
    #: rather than the torch reference. Why: ``baddbmm(X, B, X)`` first copies X into its output.
    fold_launch_bound: bool = True
    #: ``batch · s³`` from which the folded step forms ``cA² + bA + aI`` in one Triton product
    #: (cuBLAS ``baddbmm`` and a diagonal add below). Why: one pass instead of a copy, a product
    #: and an add, worth a Triton launch from this size (64×512² is 2³³).
    min_triton_poly_work: int = 2**32
    #: bf16 batches on the folded step iterate in this dtype (None: bf16). Why: normalised
    #: iterates stay far inside fp16's range and fp16 rounds 8× more finely (docs/math.md §1.3(f)).
    folded_half_dtype: torch.dtype | None = torch.float16
    #: bf16 batches on the Triton kernels iterate in this dtype (None: bf16). Why: the kernels
    #: run fp16 and bf16 at one speed and fp16 rounds every product 8× more finely.
    triton_half_dtype: torch.dtype | None = torch.float16
    #: The Gram path iterates bf16 batches in this dtype. Why: bf16 Gram NS is unstable
    #: (``R ← Z R Z`` compounds bf16's rounding), fp16 with restarts is not (docs/math.md §1.3(f)).
    gram_half_dtype: torch.dtype = torch.float16
    #: Whether lists of mixed shapes may run on the grouped kernel (three launches per step for
    #: all shapes) instead of one stacked batch per shape.
    grouped_launch: bool = True
    #: Distinct shapes from which the grouped kernel runs. Why: below it the stacked batches'
    #: cuBLAS products are faster than the grouped launches' unsymmetric tiles.
    grouped_min_shapes: int = 16
    #: Entries from which :func:`matfn.msign.path.normalize` divides a CUDA batch by one Triton
    #: pass. Why: torch's broadcast divide by a ``(B, 1, 1)`` norm is not vectorised (3× the
    #: bandwidth time at 4096²), smaller batches keep torch's cheaper launches.
    min_triton_divide: int = 2**22


@dataclass(frozen=True)
class MatmulConfig:
    """How the Triton products of :mod:`matfn.kernels.matmul` load and launch."""

    #: Tensor-memory-accelerator loads (:mod:`matfn.kernels.matmul_tma`): ``"auto"`` (shipped:
    #: GPUs of compute capability ≥ 9, from :attr:`tma_min_work`), ``"always"`` wherever the
    #: operands allow (interpreter tests) or ``"never"`` (benchmark A/B).
    tma: str = "auto"
    #: Smallest product (``batch · M · N · K``) ``"auto"`` sends to the TMA kernel, except while
    #: a CUDA graph records. Why: each TMA launch builds descriptors on the host; below this
    #: the launch, not the loads, bounds the product.
    tma_min_work: int = 2**34
    #: Symmetric results with at least this many rows take rectangular TMA tiles (the full grid,
    #: tiles above the diagonal idle), fewer rows square ones (triangle grid). Why: the fastest
    #: per-config timings on the H100.
    tma_wide_symmetric_rows: int = 6144
    #: Programmatic dependent launch (compute capability ≥ 9) only for products of at most this
    #: many 128×128 output tiles per SM; 0 turns it off. Why: it hides the launch gap between
    #: short dependent products, longer ones have no gap worth hiding and measured slower.
    pdl_max_tiles_per_sm: int = 2


#: The Newton–Schulz path choice in force (replace, don't mutate: the dataclass is frozen).
NEWTON_SCHULZ = NewtonSchulzConfig()
#: The product kernels' loading and launch rules in force.
MATMUL = MatmulConfig()


def graph_key() -> tuple:
    """Everything that changes which kernels a Newton–Schulz call launches (hashable).

    Part of the key of a captured CUDA graph (:mod:`matfn._graphs`, the optimizer's bucket
    graphs): a graph captured under another config replays other kernels.
    """
    return (triton_disabled(), NEWTON_SCHULZ, MATMUL)
