"""Argument checks of the ``matfn`` command: argparse ``type=`` converters and optional packages.

Every flag is converted by one of the small functions below, so a bad value is reported by
argparse itself (``matfn report: error: argument --sizes: …``, exit status 2) before any work
starts. :func:`missing_modules` and :func:`extra_message` say which optional packages a
subcommand lacks and which extra of the ``matfn`` distribution provides them.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

__all__ = [
    "DEVICES",
    "EXTRA_OF",
    "MAX_SAFETY",
    "MAX_STEPS",
    "MIN_LOWER",
    "REQUIRES",
    "safety_factor",
    "device_name",
    "extra_message",
    "finite_positive",
    "missing_modules",
    "open_unit_interval",
    "output_dir",
    "positive_int",
    "step_count",
    "triton_missing",
    "unit_interval",
]

#: The values ``--device`` accepts (``auto``: cuda when available, else cpu).
DEVICES = ("auto", "cpu", "cuda")

#: ``coeffs --steps`` must be below this (the schedule is fitted step by step in float64).
MAX_STEPS = 100

#: Smallest ``coeffs --lower``: the plot samples down to ``lower / 100``, which must stay a
#: normal float64.
MIN_LOWER = 1e-300

#: Largest ``coeffs --safety``: the coefficients are divided by ``safety**5``, which
#: underflows to 0 (or overflows) long before float64's range ends; useful values are ≈ 1.01.
MAX_SAFETY = 10.0

#: Optional packages each subcommand imports (top-level import names).
REQUIRES: dict[str, tuple[str, ...]] = {
    "report": ("rich", "scipy"),
    "coeffs": ("rich", "matplotlib"),
    "bench": ("rich",),
    "demo": ("rich", "matplotlib", "scipy"),
}

#: The extra of the ``matfn`` distribution that installs each optional package (see
#: pyproject.toml: ``report`` = rich, matplotlib, scipy; ``triton`` = triton).
EXTRA_OF: dict[str, str] = {
    "rich": "report",
    "matplotlib": "report",
    "scipy": "report",
    "triton": "triton",
}


# --------------------------------------------------------------------------- converters


def _interval(low: float, high: float | None, low_open: bool, high_open: bool) -> str:
    """``"in [1, 99]"``, ``"in (0, 1)"`` or ``">= 1"`` / ``"> 0"`` (no upper end)."""
    if high is None:
        return f"{'>' if low_open else '>='} {low:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def _integer_in(name: str, low: int, high: int | None, doc: str) -> Callable[[str], int]:
    """An argparse ``type=`` converter to an integer in ``[low, high]`` (``high`` None: no end)."""
    where = _interval(low, high, False, False)

    def convert(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer {where}, got {text!r}") from None
        if n < low or (high is not None and n > high):
            raise argparse.ArgumentTypeError(f"must be an integer {where}, got {text!r}")
        return n

    convert.__name__ = convert.__qualname__ = name
    convert.__doc__ = doc
    return convert


def _number_in(
    name: str,
    low: float,
    high: float | None,
    doc: str,
    *,
    low_open: bool = False,
    high_open: bool = False,
    at_least: float | None = None,
) -> Callable[[str], float]:
    """An argparse ``type=`` converter to a finite number in the interval (``high`` None: no end).

    ``at_least``: a further lower bound inside the interval, named in its own message.
    """
    where = _interval(low, high, low_open, high_open)
    must = "must be a finite number" if high is None else "must lie"

    def convert(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {where}, got {text!r}") from None
        above = x > low if low_open else x >= low
        below = high is None or (x < high if high_open else x <= high)
        if not (math.isfinite(x) and above and below):
            raise argparse.ArgumentTypeError(f"{must} {where}, got {text!r}")
        if at_least is not None and x < at_least:
            raise argparse.ArgumentTypeError(
                f"must lie {where} and be >= {at_least:g}, got {text!r}"
            )
        return x

    convert.__name__ = convert.__qualname__ = name
    convert.__doc__ = doc
    return convert


positive_int = _integer_in(
    "positive_int", 1, None, "An integer ``>= 1`` (``--sizes``, ``--threads``, ``--train-steps``)."
)
step_count = _integer_in(
    "step_count", 1, MAX_STEPS - 1, "An integer in ``[1, MAX_STEPS)`` (``coeffs --steps``)."
)
open_unit_interval = _number_in(
    "open_unit_interval",
    0.0,
    1.0,
    "A number in ``(0, 1)``, at least :data:`MIN_LOWER` (``coeffs --lower``).",
    low_open=True,
    high_open=True,
    at_least=MIN_LOWER,
)
unit_interval = _number_in(
    "unit_interval", 0.0, 1.0, "A number in ``[0, 1)`` (``coeffs --cushion``).", high_open=True
)
safety_factor = _number_in(
    "safety_factor", 1.0, MAX_SAFETY, "A number in ``[1, MAX_SAFETY]`` (``coeffs --safety``)."
)
finite_positive = _number_in(
    "finite_positive", 0.0, None, "A finite number ``> 0`` (``demo --tau``).", low_open=True
)


def device_name(text: str) -> str:
    """One of :data:`DEVICES`; ``cuda`` only when torch sees a CUDA device (``--device``).

    Parameters
    ----------
    text : str
        The command-line value.

    Returns
    -------
    str
        ``"auto"``, ``"cpu"`` or ``"cuda"`` (``auto`` is resolved when the command runs).

    Raises
    ------
    argparse.ArgumentTypeError
        When ``text`` is not a known device, or is ``cuda`` without CUDA.
    """
    name = text.strip().lower()
    if name not in DEVICES:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(DEVICES)}, got {text!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(
            "cuda requested but torch.cuda.is_available() is False (no CUDA device, or a "
            "CPU-only torch build); use --device cpu or --device auto"
        )
    return name


def output_dir(text: str) -> Path:
    """A folder that exists and is writable, or that can be created (``--out``).

    Nothing is created here: the command creates the folder when it writes its first file.

    Parameters
    ----------
    text : str
        The command-line value (``~`` is expanded).

    Returns
    -------
    pathlib.Path
        The folder.

    Raises
    ------
    argparse.ArgumentTypeError
        When the path is a file, or the folder (or its nearest existing parent) is not writable.
    """
    path = Path(text).expanduser()
    try:
        if path.exists():
            if not path.is_dir():
                raise argparse.ArgumentTypeError(f"{text!r} exists and is not a folder")
            if not os.access(path, os.W_OK | os.X_OK):
                raise argparse.ArgumentTypeError(f"folder {text!r} is not writable")
            return path
        parent = path.absolute().parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise argparse.ArgumentTypeError(
                f"cannot create folder {text!r}: {str(parent)!r} is not a folder"
            )
        if not os.access(parent, os.W_OK | os.X_OK):
            raise argparse.ArgumentTypeError(
                f"cannot create folder {text!r}: {str(parent)!r} is not writable"
            )
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot use {text!r} as a folder: {e}") from None
    return path


# --------------------------------------------------------------------------- optional packages


def missing_modules(names: Iterable[str]) -> list[str]:
    """The optional packages in ``names`` that cannot be imported.

    Each package is imported (top-level module only), so a later lazy import of it succeeds.

    Parameters
    ----------
    names : iterable of str
        Top-level import names, e.g. ``("rich", "scipy")``.

    Returns
    -------
    list of str
        The names that failed, in order; a package that is present but fails to import
        because of one of its own dependencies is listed with that reason.
    """
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            failed = (getattr(e, "name", None) or name).partition(".")[0]
            missing.append(name if failed == name else f"{name} ({e})")
    return missing


def triton_missing() -> bool:
    """Whether Triton is not importable (probed without importing it)."""
    try:
        return importlib.util.find_spec("triton") is None
    except (ImportError, ValueError):
        return True


def extra_message(command: str, missing: Iterable[str]) -> str:
    """The one-line hint for a subcommand whose optional packages are missing.

    Parameters
    ----------
    command : str
        The subcommand, e.g. ``"report"``.
    missing : iterable of str
        The missing packages (as :func:`missing_modules` returns them).

    Returns
    -------
    str
        E.g. ``matfn report needs the 'report' extra: pip install "matfn[report]"
        (missing: rich)``; several extras are named when the packages come from several.

    Examples
    --------
    >>> print(extra_message("report", ["rich"]))
    matfn report needs the 'report' extra: pip install "matfn[report]" (missing: rich)
    """
    missing = list(missing)
    extras = list(dict.fromkeys(EXTRA_OF.get(m.split(" ", 1)[0], "report") for m in missing))
    names = " and ".join(f"'{x}'" for x in extras)
    which = "extra" if len(extras) == 1 else "extras"
    return (
        f"matfn {command} needs the {names} {which}: "
        f'pip install "matfn[{",".join(extras)}]" (missing: {", ".join(missing)})'
    )
