"""The bad-input table as data: what every public matrix function must do with bad input.

``MATRIX_FUNCTIONS`` lists every public matrix function with one line each; add a new one (e.g.
``solve_sylvester`` wrapped to take one matrix) by appending a :class:`MatrixFunction`.
``tests/matfn/test_bad_inputs.py`` runs every row of the tables below against every function.

Tables:

* ``BAD_INPUTS`` — inputs that must raise, with the exception type and a regex the message must
  match (it always names the argument, ```M``` by default: ``{arg}`` in the pattern);
* ``SQUARE_ONLY_BAD_INPUTS`` — extra rows for functions that need square matrices;
* ``EMPTY_SHAPES`` / ``SQUARE_EMPTY_SHAPES`` — empty in, empty out (same shape and dtype);
* ``LAYOUTS`` — non-contiguous views that must give the same result as a contiguous copy;
* ``MatrixFunction.bad_options`` — per-function bad keyword arguments (``eps``,
  ``compute_dtype``, ``steps``, …);
* ``DERIVATIVE_BAD_OPTIONS`` / ``COEFFICIENT_BAD_OPTIONS`` — the options of
  ``msign_jvp``/``msign_vjp`` (``rank_tol``, ``compute_dtype``) and of
  ``polar_express_coefficients`` (``lower``, ``safety``, ``cushion``);
* ``META_SHAPES`` — meta tensors: shape propagation or an error naming the argument.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import matfn

from .strategies import MatrixCase, SignCase

__all__ = [
    "BAD_INPUTS",
    "BadInput",
    "COEFFICIENT_BAD_OPTIONS",
    "DERIVATIVE_BAD_OPTIONS",
    "META_SHAPES",
    "EMPTY_SHAPES",
    "LAYOUTS",
    "Layout",
    "MATRIX_FUNCTIONS",
    "MatrixFunction",
    "SQUARE_EMPTY_SHAPES",
    "SQUARE_ONLY_BAD_INPUTS",
]


def _general_sample(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return MatrixCase(tuple(shape), dtype=dtype, cond=10.0, seed=1).tensor()


def _sign_sample(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    # Real eigenvalues in ±[0.3, 1] and a mildly non-normal basis: mcsgn converges in any dtype.
    *batch, n, _ = shape
    return (
        SignCase(n=n, batch=tuple(batch), kind="eig", gap=0.3, q_cond=2.0, seed=1)
        .tensor()
        .to(dtype)
    )


@dataclass(frozen=True)
class MatrixFunction:
    """A public matrix function ``fn(M, **kwargs)`` under test.

    ``sample(shape, dtype)`` builds a well-posed input of that shape (real eigenvalues for
    mcsgn-like functions); ``atol`` is the per-dtype tolerance for "same result as a contiguous
    copy" (different matmul kernels may run on views, so results agree to rounding, not bits).
    """

    name: str
    fn: Callable[..., torch.Tensor]
    square: bool = False
    arg: str = "M"
    kwargs: dict[str, Any] = field(default_factory=dict)
    sample: Callable[[tuple[int, ...], torch.dtype], torch.Tensor] = _general_sample
    bad_options: tuple[tuple[dict[str, Any], type[Exception], str], ...] = ()

    def __call__(self, M: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.fn(M, **{**self.kwargs, **kwargs})

    def __repr__(self) -> str:
        return self.name


#: Rows every function with an ``eps`` / ``compute_dtype`` option shares.
_EPS_DTYPE_OPTIONS = (
    ({"eps": 0.0}, ValueError, "`eps`.*> 0"),
    ({"eps": -1.0}, ValueError, "`eps`.*> 0"),
    ({"eps": float("nan")}, ValueError, "`eps`.*nan"),
    ({"eps": float("inf")}, ValueError, "`eps`.*finite"),
    ({"eps": "1e-7"}, TypeError, "`eps`.*real number"),
    ({"eps": True}, TypeError, "`eps`.*real number"),
    ({"compute_dtype": torch.int32}, ValueError, "`compute_dtype`.*int32"),
    ({"compute_dtype": torch.complex64}, ValueError, "`compute_dtype`.*complex64"),
    ({"compute_dtype": "float32"}, TypeError, "`compute_dtype`.*torch.dtype"),
    ({"compute_dtype": np.float32}, TypeError, "`compute_dtype`.*torch.dtype"),
)

_MSIGN_OPTIONS = (
    *_EPS_DTYPE_OPTIONS,
    ({"method": "newton"}, ValueError, "`method`"),
    ({"steps": 0}, ValueError, "`steps`"),
    ({"steps": -3}, ValueError, "`steps`"),
    ({"steps": 2.5}, ValueError, "`steps`"),
    ({"steps": "fast"}, ValueError, "`steps`"),
    ({"algorithm": "qr"}, ValueError, "`algorithm`"),
    ({"method": "keller", "steps": "auto"}, ValueError, "steps='auto'"),
    ({"method": "tuned", "steps": 3}, ValueError, "tables for 5 and 6"),
)

#: One line per public matrix function.
MATRIX_FUNCTIONS: tuple[MatrixFunction, ...] = (
    MatrixFunction("msign", matfn.msign, bad_options=_MSIGN_OPTIONS),
    MatrixFunction(
        "mcsgn",
        matfn.mcsgn,
        square=True,
        sample=_sign_sample,
        bad_options=(
            ({"method": "newton"}, ValueError, "`method`"),
            ({"steps": 0}, ValueError, "`steps`"),
            ({"steps": "fast"}, ValueError, "`steps`"),
            ({"method": "cubic", "steps": "auto"}, ValueError, "steps='auto'"),
        ),
    ),
    MatrixFunction(
        "mclip",
        matfn.mclip,
        bad_options=(
            *_MSIGN_OPTIONS,
            ({"form": "F1"}, ValueError, "`form`"),
            ({"max_sv": 0.0}, ValueError, "`max_sv`"),
            ({"max_sv": -1.0}, ValueError, "`max_sv`"),
            ({"max_sv": float("nan")}, ValueError, "`max_sv`"),
            ({"min_sv": -0.5}, ValueError, "`min_sv`"),
            ({"min_sv": 2.0, "max_sv": 1.0}, ValueError, "`min_sv`"),
            ({"min_sv": float("inf"), "max_sv": float("inf")}, ValueError, "`min_sv`"),
            ({"max_sv": "1"}, TypeError, "`max_sv`"),
        ),
    ),
)

#: The derivative's options, run with a well-posed ``(M, D)`` by ``test_derivative_options``.
DERIVATIVE_BAD_OPTIONS: tuple[tuple[dict[str, Any], type[Exception], str], ...] = (
    ({"method": "newton"}, ValueError, "`method`"),
    ({"compute_dtype": torch.float16}, ValueError, "`compute_dtype`.*float16"),
    ({"compute_dtype": torch.int32}, ValueError, "`compute_dtype`"),
    ({"compute_dtype": torch.complex64}, ValueError, "`compute_dtype`"),
    ({"compute_dtype": "float32"}, TypeError, "`compute_dtype`.*torch.dtype"),
    ({"rank_tol": -1.0}, ValueError, "`rank_tol`.*>= 0"),
    ({"rank_tol": float("nan")}, ValueError, "`rank_tol`"),
    ({"rank_tol": float("inf")}, ValueError, "`rank_tol`.*finite"),
    ({"rank_tol": "0"}, TypeError, "`rank_tol`"),
)

#: ``polar_express_coefficients(5, **kwargs)`` must raise.
COEFFICIENT_BAD_OPTIONS: tuple[tuple[dict[str, Any], type[Exception], str], ...] = (
    ({"lower": 0.0}, ValueError, "`lower`.*\\(0, 1\\)"),
    ({"lower": 1.0}, ValueError, "`lower`"),
    ({"lower": -0.5}, ValueError, "`lower`"),
    ({"lower": float("nan")}, ValueError, "`lower`"),
    ({"lower": "1e-3"}, TypeError, "`lower`"),
    ({"safety": 0.99}, ValueError, "`safety`.*>= 1"),
    ({"safety": float("inf")}, ValueError, "`safety`.*finite"),
    ({"safety": float("nan")}, ValueError, "`safety`"),
    ({"cushion": -0.1}, ValueError, "`cushion`"),
    ({"cushion": 1.0}, ValueError, "`cushion`.*\\[0, 1\\)"),
    ({"cushion": float("nan")}, ValueError, "`cushion`"),
)

#: Meta tensors (shape only): a function either propagates shape and dtype or raises an error
#: that names the argument. ``(shape, dtype)`` rows; run by ``test_meta_tensors``.
META_SHAPES: tuple[tuple[tuple[int, ...], torch.dtype], ...] = (
    ((4, 4), torch.float32),
    ((2, 3, 5, 5), torch.bfloat16),
    ((6, 6), torch.float64),
)


@dataclass(frozen=True)
class BadInput:
    """A bad input: ``make(n)`` builds it (``n`` = matrix side), and the expected error."""

    id: str
    make: Callable[[int], object]
    error: type[Exception]
    match: str

    def __repr__(self) -> str:
        return self.id


def _with(value: float, index: tuple[int, ...]) -> Callable[[int], torch.Tensor]:
    def make(n: int) -> torch.Tensor:
        x = torch.eye(n, dtype=torch.float32).repeat(2, 1, 1)
        x[index] = value
        return x

    return make


BAD_INPUTS: tuple[BadInput, ...] = (
    BadInput("0d", lambda n: torch.tensor(1.0), ValueError, r"`{arg}`.*at least 2 dim.*\(\)"),
    BadInput("1d", lambda n: torch.ones(n), ValueError, r"`{arg}`.*at least 2 dim.*\(3\)"),
    BadInput(
        "complex64",
        lambda n: torch.eye(n, dtype=torch.complex64),
        TypeError,
        "`{arg}`.*real.*complex",
    ),
    BadInput(
        "complex128",
        lambda n: torch.eye(n, dtype=torch.complex128),
        TypeError,
        "`{arg}`.*real.*complex",
    ),
    BadInput("sparse-coo", lambda n: torch.eye(n).to_sparse(), TypeError, "`{arg}`.*dense"),
    BadInput("sparse-csr", lambda n: torch.eye(n).to_sparse_csr(), TypeError, "`{arg}`.*dense"),
    BadInput(
        "int64", lambda n: torch.eye(n, dtype=torch.int64), TypeError, "`{arg}`.*floating.*int64"
    ),
    BadInput(
        "int8", lambda n: torch.eye(n, dtype=torch.int8), TypeError, "`{arg}`.*floating.*int8"
    ),
    BadInput(
        "uint8", lambda n: torch.eye(n, dtype=torch.uint8), TypeError, "`{arg}`.*floating.*uint8"
    ),
    BadInput(
        "bool", lambda n: torch.eye(n, dtype=torch.bool), TypeError, "`{arg}`.*floating.*bool"
    ),
    BadInput("numpy", lambda n: np.eye(n), TypeError, "`{arg}`.*torch.Tensor.*ndarray"),
    BadInput("list", lambda n: np.eye(n).tolist(), TypeError, "`{arg}`.*torch.Tensor.*list"),
    BadInput("none", lambda n: None, TypeError, "`{arg}`.*torch.Tensor.*NoneType"),
    BadInput("nan", _with(float("nan"), (0, 0, 1)), ValueError, "`{arg}`.*NaN or Inf"),
    BadInput("+inf", _with(float("inf"), (1, 2, 2)), ValueError, "`{arg}`.*NaN or Inf"),
    BadInput("-inf", _with(float("-inf"), (1, 0, 0)), ValueError, "`{arg}`.*NaN or Inf"),
    BadInput(
        "nan-f64",
        lambda n: torch.full((n, n), float("nan"), dtype=torch.float64),
        ValueError,
        "`{arg}`.*NaN or Inf",
    ),
    BadInput(
        "inf-bf16",
        lambda n: torch.eye(n, dtype=torch.bfloat16) * float("inf"),
        ValueError,
        "`{arg}`.*NaN or Inf",
    ),
)

SQUARE_ONLY_BAD_INPUTS: tuple[BadInput, ...] = (
    BadInput("wide", lambda n: torch.ones(n, n + 1), ValueError, r"`{arg}`.*square.*\(3, 4\)"),
    BadInput(
        "tall-batch", lambda n: torch.ones(2, n + 2, n), ValueError, r"`{arg}`.*square.*\(2, 5, 3\)"
    ),
    BadInput("vector-1xn", lambda n: torch.ones(1, n), ValueError, r"`{arg}`.*square"),
)

#: Empty inputs (0×n, n×0, 0×0, batch 0) for general and for square-only functions.
EMPTY_SHAPES: tuple[tuple[int, ...], ...] = (
    (0, 3),
    (3, 0),
    (0, 0),
    (0, 4, 5),
    (2, 0, 3, 3),
    (2, 3, 0, 4),
)
SQUARE_EMPTY_SHAPES: tuple[tuple[int, ...], ...] = ((0, 0), (0, 3, 3), (2, 0, 4, 4), (3, 0, 0))


@dataclass(frozen=True)
class Layout:
    """A non-contiguous input: ``make(sample, n, m, dtype)`` returns a strided view.

    ``sample(shape, dtype)`` is the function's well-posed input builder; entries of the base
    tensor outside the view are NaN, so reading them would show up in the result.
    """

    id: str
    make: Callable[[Callable[..., torch.Tensor], int, int, torch.dtype], torch.Tensor]

    def __repr__(self) -> str:
        return self.id


def _strided(base_shape: Callable[[int, int], tuple[int, ...]], view: Callable) -> Callable:
    def make(sample: Callable, n: int, m: int, dtype: torch.dtype) -> torch.Tensor:
        base = torch.full(base_shape(n, m), float("nan"), dtype=dtype)
        v = view(base)
        v.copy_(sample(tuple(v.shape), dtype))
        return v

    return make


def _stride0_cols(sample: Callable, n: int, m: int, dtype: torch.dtype) -> torch.Tensor:
    # A rank-one matrix v 1ᵀ with 1ᵀv > 0 (for square functions: one eigenvalue 1ᵀv, rest 0).
    v = torch.linspace(0.5, 1.5, n, dtype=torch.float64).unsqueeze(-1).to(dtype)
    return v.expand(n, m)


LAYOUTS: tuple[Layout, ...] = (
    Layout("mT", lambda sample, n, m, dtype: sample((2, m, n), dtype).mT),
    Layout("step2-cols", _strided(lambda n, m: (2, n, 2 * m), lambda x: x[..., ::2])),
    Layout("step2-rows", _strided(lambda n, m: (2, 2 * n, m), lambda x: x[..., ::2, :])),
    Layout("permuted-batch", _strided(lambda n, m: (n, 2, m), lambda x: x.permute(1, 0, 2))),
    Layout("expand-batch", lambda sample, n, m, dtype: sample((1, n, m), dtype).expand(3, -1, -1)),
    Layout("expand-stride0-cols", _stride0_cols),
)
