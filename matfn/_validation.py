"""Input checks shared by every public function, so all of them raise the same messages.

Each check names the argument and says what was expected, in the style of ``scipy.linalg``:
the tensors (:func:`check_matrix`) and the options (:func:`check_eps`,
:func:`check_compute_dtype`, :func:`check_rank_tol`, :func:`check_real`).
"""

from __future__ import annotations

import math
import numbers

import torch

__all__ = [
    "check_matrix",
    "check_same_device",
    "assert_finite",
    "float_result_dtype",
    "check_eps",
    "check_compute_dtype",
    "check_rank_tol",
    "check_real",
    "FLOAT_DTYPES",
]

#: The floating dtypes the functions compute in (float8 types have no matmul on every device).
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _shape(x: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in x.shape) + ")"


def check_matrix(
    x: object,
    name: str,
    *,
    square: bool = False,
    check_finite: bool = True,
    min_ndim: int = 2,
) -> torch.Tensor:
    """Validate a real, dense, floating tensor of shape ``(..., n, m)``.

    Parameters
    ----------
    x : object
        The value to check.
    name : str
        The argument's name, quoted in every message.
    square : bool
        Require ``n == m``.
    check_finite : bool
        Raise if any entry is NaN or infinite (one host sync).
    min_ndim : int
        The smallest number of dimensions accepted.

    Returns
    -------
    torch.Tensor
        ``x`` itself, unchanged.

    Raises
    ------
    TypeError
        Not a tensor; sparse or other non-strided layout; complex, integer or bool dtype.
    ValueError
        Fewer than ``min_ndim`` dims; non-square when ``square``; NaN or Inf entries; a meta
        tensor (no values) with ``check_finite``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(
            f"`{name}` must be a dense (strided) tensor, got layout {x.layout}; "
            "call .to_dense() first"
        )
    if x.is_complex():
        raise TypeError(
            f"`{name}` must be real, got complex dtype {x.dtype}; "
            "complex matrices are not supported"
        )
    if not x.is_floating_point():
        raise TypeError(
            f"`{name}` must have a floating dtype (float64/float32/float16/bfloat16), "
            f"got {x.dtype}; convert with .float()"
        )
    if x.ndim < min_ndim:
        raise ValueError(
            f"`{name}` must have at least {min_ndim} dimensions (..., n, m), got shape {_shape(x)}"
        )
    if square and x.shape[-1] != x.shape[-2]:
        raise ValueError(
            f"`{name}` must be square in its last two dimensions (..., n, n), got shape {_shape(x)}"
        )
    if check_finite:
        assert_finite(x, name)
    return x


def assert_finite(x: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` if ``x`` holds NaN or ±Inf (one host sync)."""
    assert_all_finite(**{name: x})


def non_finite_error(name: str) -> ValueError:
    """The error for NaN/Inf in the argument ``name`` (tensor or, tested on the host, a number)."""
    return ValueError(
        f"`{name}` contains NaN or Inf; pass finite values "
        "(or check_finite=False to skip this check)"
    )


def assert_all_finite(extra: torch.Tensor | None = None, **tensors: torch.Tensor | None) -> bool:
    """:func:`assert_finite` for several tensors with one host sync instead of one each.

    Raises for the first named tensor (in argument order) that holds NaN or ±Inf. ``extra``: an
    optional boolean scalar tensor fetched in the same sync, whose value is returned (so a caller
    can fold one more device-side test, e.g. "is any pivot zero", into this sync).
    """
    named = [(k, v) for k, v in tensors.items() if v is not None and v.numel()]
    for name, v in named:
        if v.is_meta:
            raise ValueError(
                f"`{name}` is a meta tensor (shape only): its values cannot be checked for "
                "NaN/Inf; pass check_finite=False, or real data"
            )
    flags = [torch.isfinite(v).all() for _, v in named]
    if extra is not None:
        flags.append(extra.reshape(()))
    if not flags:
        return False
    values = torch.stack(flags).tolist()
    for (name, _), ok in zip(named, values, strict=False):
        if not ok:
            raise non_finite_error(name)
    return bool(values[-1]) if extra is not None else False


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """Raise ``ValueError`` if the given tensors do not all live on one device."""
    named = [(k, v) for k, v in tensors.items() if v is not None]
    if not named:
        return
    first_name, first = named[0]
    for k, v in named[1:]:
        if v.device != first.device:
            raise ValueError(
                f"`{k}` is on {v.device} but `{first_name}` is on {first.device}; "
                "put all inputs on one device"
            )


def float_result_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The floating dtype that holds all inputs (``torch.result_type`` over the tensors)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _is_real_number(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_real(
    x: object,
    name: str,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
    finite: bool = True,
) -> float:
    """Validate a real number option in ``[low, high]`` (open ends as asked); return it as float.

    A 0-d real tensor counts as its value (read on the host). Raises ``TypeError`` for a
    non-number (bool, str, a tensor of other shape or dtype, complex) and ``ValueError`` for NaN,
    ±inf when ``finite`` or a value out of range; the message names ``name`` and the range.
    """
    if (
        isinstance(x, torch.Tensor)
        and x.ndim == 0
        and not x.is_meta
        and (x.is_floating_point() or (not x.is_complex() and x.dtype != torch.bool))
    ):
        x = x.item()
    if not _is_real_number(x):
        raise TypeError(f"`{name}` must be a real number, got {type(x).__name__} {x!r}")
    value = float(x)  # type: ignore[arg-type]
    lo_ok = value > low if low_open else value >= low
    hi_ok = value < high if high_open else value <= high
    # Comparisons, not math.isnan/isinf: torch.compile traces them on a symbolic float too.
    nan, inf = value != value, abs(value) == math.inf
    if nan or (finite and inf) or not (lo_ok and hi_ok):
        if math.isinf(high):
            where = f"{'>' if low_open else '>='} {low:g}"
        else:
            where = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        kind = "a finite number" if finite else "a number (inf allowed)"
        raise ValueError(f"`{name}` must be {kind} {where}, got {x!r}")
    return value


def check_eps(eps: object, name: str = "eps") -> float:
    """``eps`` (a normalisation floor) must be a finite number > 0."""
    return check_real(eps, name, low=0.0, low_open=True)


def check_rank_tol(rank_tol: object, name: str = "rank_tol") -> float | None:
    """``rank_tol`` must be None or a finite number ≥ 0."""
    if rank_tol is None:
        return None
    return check_real(rank_tol, name, low=0.0)


def check_compute_dtype(
    dtype: object,
    name: str = "compute_dtype",
    allowed: tuple[torch.dtype, ...] = FLOAT_DTYPES,
) -> torch.dtype | None:
    """``dtype`` must be None or one of ``allowed`` (real floating ``torch.dtype`` objects).

    ``TypeError`` for a non-dtype (a string such as ``"float32"``, a numpy dtype);
    ``ValueError`` for integer, complex or otherwise unsupported dtypes.
    """
    if dtype is None:
        return None
    names = ", ".join(str(d) for d in allowed)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(
            f"`{name}` must be a torch.dtype (one of {names}), got {type(dtype).__name__} {dtype!r}"
        )
    if dtype not in allowed:
        raise ValueError(f"`{name}` must be one of {names}, got {dtype}")
    return dtype
