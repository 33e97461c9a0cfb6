"""Newton–Schulz launchers (matfn.msign.triton) vs their torch twins (matfn.msign.reference).

Runs in the Triton interpreter on CPU (fp32/fp16; the interpreter has no bf16). Tolerances:
float32 kernels and torch differ only in summation order, ~1e-6 after 5 steps of polynomials with
coefficients ≤ 25 (we allow 2e-5 relative); fp16 operands round every product to 2⁻¹¹, and the
steps amplify it by up to the coefficient size, so we allow 3e-2 on the result (whose entries are
O(1/√s)) — still far below the O(1) difference of a wrong step.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.testing import assert_close

pytest.importorskip("triton")

import matfn.kernels.matmul as matmul  # noqa: E402
from matfn.coefficients import schedule  # noqa: E402
from matfn.msign import path  # noqa: E402
from matfn.msign.path import normalize  # noqa: E402
from matfn.msign.reference import (  # noqa: E402
    gram_newton_schulz_torch,
    gram_restarts,
    newton_schulz_torch,
    ns_step_torch,
    sign_step_torch,
)
from matfn.msign.triton import (  # noqa: E402
    gram_newton_schulz_triton,
    newton_schulz_triton,
    ns_step_folded,
    ns_step_triton,
    sign_step_triton,
)

ON_GPU = bool(os.environ.get("MATFN_TEST_ON_GPU")) and torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
RTOL = {torch.float32: 2e-5, torch.float16: 3e-2}
# (batch, s, L), s ≤ L: odd sizes across 16-tiles, batch, a single row, square.
SHAPES = [(1, 17, 40), (3, 24, 24), (2, 33, 70), (1, 1, 9)]


@pytest.fixture(autouse=True)
def _rect_blocks(monkeypatch):
    # Rectangular interpreter tiles: the symmetric products use the full grid with idle upper
    # tiles, the case the square tiles of test_matmul.py do not cover here.
    monkeypatch.setattr(
        matmul, "INTERPRET_BLOCKS", {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2}
    )


def _x0(shape, dtype, seed, factor=1.01):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(shape, generator=g, dtype=torch.float64)
    return normalize(M, factor, 1e-7, dtype).to(DEVICE)


def _close(out, ref, dtype, rtol=None):
    rtol = rtol or RTOL[dtype]
    assert torch.isfinite(out).all()
    err = (out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)
    assert err <= rtol, f"relative error {err:.2e} > {rtol:.0e}"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize(
    "abc", [(3.4445, -4.775, 2.0315), (1.5, -0.5, 0.0)], ids=["quintic", "cubic"]
)
def test_ns_step(shape, dtype, abc):
    X = _x0(shape, dtype, seed=shape[1])
    before = X.clone()
    _close(ns_step_triton(X, *abc), ns_step_torch(X.float(), *abc), dtype)
    assert torch.equal(X, before)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize(
    "abc", [(3.4445, -4.775, 2.0315), (1.5, -0.5, 0.0)], ids=["quintic", "cubic"]
)
@pytest.mark.parametrize("poly_work", [2**62, 0, None], ids=["cublas", "triton", "default"])
def test_ns_step_folded(shape, dtype, abc, poly_work, ns_config):
    """``(B + aI) X`` is the same step (one more rounding: a + B_ii in ``dtype``), with
    ``cA² + bA + aI`` from baddbmm + diagonal add or from the Triton epilogue."""
    if poly_work is not None:
        ns_config(min_triton_poly_work=poly_work)
    X = _x0(shape, dtype, seed=shape[1] + 2)
    before = X.clone()
    _close(ns_step_folded(X, *abc), ns_step_torch(X.float(), *abc), dtype)
    assert torch.equal(X, before)


@pytest.mark.parametrize("fold_small", [False, True])
def test_path_routes_cuda_steps(monkeypatch, ns_config, fold_small):
    """The size predicates and ``fold_launch_bound`` pick the step function."""
    monkeypatch.setattr(path, "use_triton", lambda *t: True)
    monkeypatch.setattr(path, "_KERNEL_DTYPES", (torch.float32,))
    ns_config(fold_launch_bound=fold_small, min_triton_work=8 * 8 * 16, min_triton_side=16)
    big, small, wide = torch.zeros(1, 8, 16), torch.zeros(1, 4, 8), torch.zeros(1, 16, 16)
    assert path.step_function(big) is ns_step_folded
    assert path.step_function(small) is (ns_step_folded if fold_small else ns_step_torch)
    assert path.step_function(wide) is ns_step_triton
    assert path.step_function(big.double()) is ns_step_torch


def test_folded_path_iterates_bf16_in_fp16_and_is_more_accurate(monkeypatch, ns_config):
    """bf16 batches on the folded path run in fp16: dtype restored, error below torch bf16's."""
    monkeypatch.setattr(path, "use_triton", lambda *t: True)
    ns_config(min_triton_work=0, min_triton_side=10**6)
    coeffs, factor = schedule("polar_express", 5)
    X = _x0((2, 24, 64), torch.float64, seed=3, factor=factor)
    assert path.iteration_dtype(X, torch.bfloat16) == torch.float16
    assert path.iteration_dtype(X, torch.float32) == torch.float32
    exact = newton_schulz_torch(X, coeffs)
    folded = path.newton_schulz(X.bfloat16(), coeffs)
    assert folded.dtype == torch.bfloat16
    err_folded = torch.linalg.norm(folded.double() - exact)
    err_torch = torch.linalg.norm(newton_schulz_torch(X.bfloat16(), coeffs).double() - exact)
    assert err_folded < err_torch, (err_folded, err_torch)
    ns_config(folded_half_dtype=None)
    assert path.iteration_dtype(X, torch.bfloat16) == torch.bfloat16


@pytest.mark.parametrize("algorithm", ["standard", "gram"])
@pytest.mark.parametrize("abc", [None, (1.5, -0.5, 0.0)], ids=["polar_express", "cubic"])
def test_result_dtype_written_by_the_last_epilogue(monkeypatch, algorithm, abc):
    """``out_dtype`` on the Triton path: the last product writes it (no cast launch), and the
    values are the fp16 iteration's, rounded once more (to float32 here, i.e. not at all)."""
    monkeypatch.setattr(path, "kernels_apply", lambda X: True)
    coeffs, factor = schedule("polar_express", 5)
    coeffs = coeffs if abc is None else [abc] * 3
    X = _x0((2, 20, 45), torch.float16, seed=5, factor=factor)
    run = path.newton_schulz if algorithm == "standard" else path.gram_newton_schulz
    same = run(X, coeffs)
    casts = []
    monkeypatch.setattr(path, "cast", lambda T, dtype: casts.append(dtype) or T.to(dtype))
    wide = run(X, coeffs, out_dtype=torch.float32)
    assert same.dtype == torch.float16 and wide.dtype == torch.float32 and not casts
    _close(wide, newton_schulz_torch(X.double(), coeffs), torch.float16)
    # the fp16 result is the float32 one rounded: within half an fp16 ulp, 2⁻¹¹ relative
    assert_close(same.float(), wide, rtol=2**-11, atol=2**-24)


@pytest.mark.parametrize("method", ["polar_express", "tuned", "cubic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_newton_schulz_schedules(method, dtype):
    coeffs, factor = schedule(method, 5 if method != "cubic" else 6)
    X = _x0((2, 20, 45), dtype, seed=7, factor=factor)
    _close(newton_schulz_triton(X, coeffs), newton_schulz_torch(X.float(), coeffs), dtype)


@pytest.mark.parametrize("shape", [(2, 20, 45), (1, 33, 33), (1, 3, 50)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_gram_newton_schulz(shape, dtype):
    coeffs, factor = schedule("polar_express", 5)
    restarts = gram_restarts(coeffs)
    X = _x0(shape, dtype, seed=11, factor=factor)
    out = gram_newton_schulz_triton(X, coeffs, restarts)
    # The Gram recurrence (R ← Z R Z, Q ← Q Z) amplifies float32 rounding by the polynomial
    # values (|q| ≤ 3e2 for this schedule, see gram_restarts): 2e-4 in float32.
    rtol = 2e-4 if dtype == torch.float32 else None
    _close(out, gram_newton_schulz_torch(X.float(), coeffs, restarts), dtype, rtol)
    # and the same polynomial as the standard iteration
    _close(out, newton_schulz_torch(X.double(), coeffs), dtype, rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("abc", [(1.875, -1.25, 0.375), (1.5, -0.5, 0.0)], ids=["quintic", "cubic"])
def test_sign_step_general_square(dtype, abc):
    """mcsgn's step: X² is not symmetric, the general kernel must be used throughout."""
    g = torch.Generator().manual_seed(3)
    Q = torch.randn(2, 21, 21, generator=g, dtype=torch.float64)
    lam = torch.linspace(-0.9, 0.9, 21, dtype=torch.float64)
    M = Q @ torch.diag_embed(lam.expand(2, -1)) @ torch.linalg.inv(Q)
    M = (M / torch.linalg.matrix_norm(M, keepdim=True)).to(dtype).to(DEVICE)
    assert not torch.allclose(M, M.mT)
    _close(sign_step_triton(M, *abc), sign_step_torch(M.float(), *abc), dtype)
