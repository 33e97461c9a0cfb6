"""Fused Triton kernels for CUDA tensors; each has a torch twin in the module it accelerates.

Importing this package never imports Triton: kernel modules are loaded on first CUDA use by
:mod:`matfn.kernels.dispatch`.
"""
