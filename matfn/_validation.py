"""Input checks shared by every public function, so all of them raise the same messages.

Each check names the argument and says what was expected, in the style of ``scipy.linalg``.
"""

from __future__ import annotations

import torch

__all__ = [
    "check_matrix",
    "check_same_device",
    "assert_finite",
    "float_result_dtype",
]


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
        Fewer than ``min_ndim`` dims; non-square when ``square``; NaN or Inf entries.
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
