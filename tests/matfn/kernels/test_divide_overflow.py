"""divide_by_norms: an overflowed (inf) or NaN norm gives NaN, never silent zeros.

Runs the kernel in Triton's interpreter on CPU (or on the GPU when present), like
``test_elementwise.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from matfn.kernels import elementwise  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CONFIG = elementwise.ElementwiseConfig(block=16) if DEVICE == "cpu" else elementwise.CONFIG


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_divide_by_norms_poisons_non_finite_norms(out_dtype):
    X = torch.randn(4, 5, 9, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    norms = torch.tensor([math.inf, math.nan, 2.0, 3.4e38], device=DEVICE)
    out = torch.empty_like(X, dtype=out_dtype)
    got = elementwise.divide_by_norms(X, norms, 1.01, 1e-7, out, config=CONFIG)
    assert torch.isnan(got[0]).all() and torch.isnan(got[1]).all()
    # finite norms are divided as before, correctly rounded: as torch's tensor-by-tensor divide
    # (a Python-scalar divisor would be applied as a reciprocal multiply on CUDA)
    denom = torch.tensor(2.0 * 1.01, dtype=torch.float32, device=DEVICE)
    torch.testing.assert_close(got[2], (X[2] / denom).to(out_dtype), rtol=0, atol=0)
    # 3.4e38 · 1.01 overflows float32 in the kernel: NaN as well
    assert torch.isnan(got[3]).all()
