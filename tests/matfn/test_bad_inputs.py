"""The bad-input table of tests/bad_inputs.py, run over every public matrix function."""

from __future__ import annotations

import re

import pytest
import torch

import matfn
from tests.bad_inputs import (
    BAD_INPUTS,
    COEFFICIENT_BAD_OPTIONS,
    DERIVATIVE_BAD_OPTIONS,
    EMPTY_SHAPES,
    LAYOUTS,
    MATRIX_FUNCTIONS,
    META_SHAPES,
    SQUARE_EMPTY_SHAPES,
    SQUARE_ONLY_BAD_INPUTS,
)
from tests.strategies import DTYPE_NAMES, FLOAT_DTYPES

FUNCS = [pytest.param(f, id=f.name) for f in MATRIX_FUNCTIONS]
DTYPES = [pytest.param(d, id=DTYPE_NAMES[d]) for d in FLOAT_DTYPES]

#: "Same result as a contiguous copy": views may hit other matmul kernels, so agreement is to
#: rounding of the iteration (its compute dtype is float32 for every non-float64 input on CPU),
#: amplified by the iteration (≤ 1e3·ε), not bit-exact. Half-precision outputs add one rounding.
LAYOUT_TOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("bad", BAD_INPUTS, ids=repr)
@pytest.mark.parametrize("func", FUNCS)
def test_bad_input_raises(func, bad):
    with pytest.raises(bad.error, match=bad.match.format(arg=re.escape(func.arg))):
        func(bad.make(3))


@pytest.mark.parametrize("bad", SQUARE_ONLY_BAD_INPUTS, ids=repr)
@pytest.mark.parametrize("func", [p for p in FUNCS if p.values[0].square])
def test_non_square_raises(func, bad):
    with pytest.raises(bad.error, match=bad.match.format(arg=re.escape(func.arg))):
        func(bad.make(3))


@pytest.mark.parametrize("func", [p for p in FUNCS if not p.values[0].square])
def test_general_functions_accept_rectangular(func):
    for shape in [(3, 5), (5, 3), (1, 4), (4, 1)]:
        assert func(func.sample(shape, torch.float64)).shape == shape


@pytest.mark.parametrize("func", FUNCS)
def test_bad_options_raise(func):
    M = func.sample((4, 4), torch.float64)
    assert func.bad_options, "every function has option validation to test"
    for kwargs, error, match in func.bad_options:
        with pytest.raises(error, match=match):
            func(M, **kwargs)


@pytest.mark.parametrize("derivative", [matfn.msign_jvp, matfn.msign_vjp], ids=["jvp", "vjp"])
@pytest.mark.parametrize("row", DERIVATIVE_BAD_OPTIONS, ids=lambda r: str(r[0]))
def test_derivative_options(derivative, row):
    kwargs, error, match = row
    M = torch.randn(4, 6, dtype=torch.float64)
    with pytest.raises(error, match=match):
        derivative(M, torch.ones_like(M), **kwargs)


@pytest.mark.parametrize("row", COEFFICIENT_BAD_OPTIONS, ids=lambda r: str(r[0]))
def test_coefficient_options(row):
    kwargs, error, match = row
    with pytest.raises(error, match=match):
        matfn.polar_express_coefficients(5, **kwargs)


@pytest.mark.parametrize("shape_dtype", META_SHAPES, ids=str)
@pytest.mark.parametrize("func", FUNCS)
def test_meta_tensors(func, shape_dtype):
    shape, dtype = shape_dtype
    M = torch.empty(shape, dtype=dtype, device="meta")
    try:
        out = func(M)
    except (ValueError, TypeError, NotImplementedError) as err:
        assert f"`{func.arg}`" in str(err) and "meta" in str(err), err
        return
    assert out.is_meta and out.shape == M.shape and out.dtype == dtype


@pytest.mark.parametrize("derivative", [matfn.msign_jvp, matfn.msign_vjp], ids=["jvp", "vjp"])
def test_meta_tensors_derivative(derivative):
    M = torch.empty(2, 5, 3, device="meta")
    out = derivative(M, torch.empty(5, 3, dtype=torch.float64, device="meta"))
    assert out.is_meta and out.shape == M.shape and out.dtype == torch.float64


def test_meta_tensor_with_the_finite_check_names_the_argument():
    from matfn._validation import check_matrix

    with pytest.raises(ValueError, match="`Q` is a meta tensor"):
        check_matrix(torch.empty(3, 3, device="meta"), "Q")


@pytest.mark.parametrize("func", FUNCS)
def test_nan_check_can_be_disabled(func):
    # check_finite=False skips the host-syncing check (the optimizer hot path); NaN propagates
    # (mcsgn also needs check_convergence=False, else a NaN iterate raises as non-convergent).
    M = func.sample((4, 4), torch.float32)
    M[1, 2] = float("nan")
    kwargs = {"check_convergence": False} if func.name == "mcsgn" else {}
    out = func(M, check_finite=False, **kwargs)
    assert out.shape == M.shape
    assert torch.isnan(out).any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("func", FUNCS)
def test_empty_in_empty_out(func, dtype):
    for shape in SQUARE_EMPTY_SHAPES if func.square else EMPTY_SHAPES:
        M = torch.empty(shape, dtype=dtype)
        out = func(M)
        assert out.shape == M.shape and out.dtype == dtype, shape


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("func", FUNCS)
def test_zero_matrix_gives_exact_zeros(func, dtype):
    shapes = [(1, 1), (4, 4), (2, 3, 3)] if func.square else [(1, 1), (3, 5), (5, 3), (2, 4, 4)]
    for shape in shapes:
        out = func(torch.zeros(shape, dtype=dtype))
        assert out.dtype == dtype and out.shape == shape
        assert torch.equal(out, torch.zeros_like(out)), shape
    # One zero matrix inside a batch does not disturb the others and stays exactly zero.
    M = func.sample((3, 4, 4), dtype)
    M[1] = 0
    out = func(M)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert out[0].abs().max() > 0.1 and out[2].abs().max() > 0.1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("func", FUNCS)
def test_input_unchanged_and_dtype_preserved(func, dtype):
    n, m = (6, 6) if func.square else (5, 8)
    for M in (func.sample((n, m), dtype), func.sample((2, m, n), dtype).mT):
        before = M.clone()
        stride, ptr = M.stride(), M.data_ptr()
        out = func(M)
        assert torch.equal(M, before), "input was modified"
        assert M.stride() == stride and M.data_ptr() == ptr
        assert out.dtype == dtype and out.shape == M.shape and out.device == M.device
        assert out.data_ptr() != M.data_ptr(), "output aliases the input"
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=repr)
@pytest.mark.parametrize("func", FUNCS)
def test_non_contiguous_equals_contiguous(func, layout, dtype):
    n, m = (5, 5) if func.square else (4, 7)
    M = layout.make(func.sample, n, m, dtype)
    assert not M.is_contiguous()
    out = func(M)
    ref = func(M.contiguous())
    tol = LAYOUT_TOL[dtype]
    torch.testing.assert_close(out, ref, atol=tol, rtol=0)


def _devices() -> list[torch.device]:
    devs = [torch.device("cpu")]
    if torch.cuda.is_available():
        devs += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return devs


@pytest.mark.parametrize("func", FUNCS)
def test_output_on_input_device(func):
    for device in _devices():
        M = func.sample((4, 4), torch.float32).to(device)
        assert func(M).device == device


@pytest.mark.parametrize("func", FUNCS)
def test_mixed_devices(func):
    # Every matrix function here takes one tensor, so "mixed devices" means a tensor argument
    # on another device than M; none exists yet. Multi-tensor functions (solve_sylvester, …)
    # added to MATRIX_FUNCTIONS get a real check through matfn._validation.check_same_device.
    if len(_devices()) < 2:
        pytest.skip("needs two devices")
    from matfn._validation import check_same_device

    a, b = (torch.zeros(2, 2, device=d) for d in _devices()[:2])
    with pytest.raises(ValueError, match="`B` is on .* but `A` is on"):
        check_same_device(A=a, B=b)


def test_assert_all_finite_names_the_first_bad_tensor_in_one_sync():
    """One host sync for several tensors (tri_inv/tri_solve check Q, K, V, diag and the zero
    pivots together): the first non-finite one in argument order is named; ``extra`` is fetched
    in the same sync and returned."""
    from matfn._validation import assert_all_finite

    ok, bad = torch.ones(3), torch.tensor([1.0, float("inf")])
    assert assert_all_finite(torch.tensor(True), a=ok, b=None, c=torch.empty(0)) is True
    assert assert_all_finite(a=ok) is False
    with pytest.raises(ValueError, match="`b` contains NaN or Inf"):
        assert_all_finite(torch.tensor(False), a=ok, b=bad, c=bad * float("nan"))
    with pytest.raises(ValueError, match="`c` contains"):
        assert_all_finite(a=ok, c=torch.tensor([float("nan")]))
