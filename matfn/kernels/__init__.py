"""GEMM building blocks shared by several ops, and launch helpers.

:mod:`matfn.kernels.matmul` (batched products with a fused epilogue, the symmetric tiling) and
:mod:`matfn.kernels.matmul_tma` (its TMA-loaded twin), :mod:`matfn.kernels.launch` (device
queries, programmatic dependent launch), :mod:`matfn.kernels.elementwise` and
:mod:`matfn.kernels.max_logit`. Importing this package never imports Triton: the modules that do
are imported on the first CUDA call (:func:`matfn._backend.triton_module`);
:mod:`matfn.kernels.recording` is Triton-free.
"""
