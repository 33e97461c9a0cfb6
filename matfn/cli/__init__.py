"""The ``matfn`` command line: ``matfn report | coeffs | bench | demo``.

* ``matfn report``: accuracy of every function × method × dtype against the float64 oracles.
* ``matfn coeffs``: a Polar-Express schedule as a table and a plot of its scalar map.
* ``matfn bench``: speed against torch baselines (SVD, torch.optim.Muon's Newton–Schulz,
  dense triangular solves) on the best device present.
* ``matfn demo``: report + bench (quick), figures, and a short Muon + QK-Clip vs AdamW training
  run of a tiny transformer; everything lands in one output folder.

This package is the application layer: it uses matfn's public API and :mod:`optim`, and the
library never imports it. rich, matplotlib and scipy (the ``report`` extra) are imported when a
command first needs them, so ``import matfn.cli`` (and ``matfn --help``) stays light; a command
whose packages are missing says which extra to install and exits with status 2. Every flag is
checked by argparse (:mod:`~matfn.cli.args`) before any work starts. Also runnable as
``python -m matfn``; ``matfn --version`` prints the installed version.

Modules: :mod:`~matfn.cli.args` (flag converters, optional packages),
:mod:`~matfn.cli.report` (accuracy tables), :mod:`~matfn.cli.bench` (speed tables),
:mod:`~matfn.cli.demo` (the demo and its figures), :mod:`~matfn.cli.toy_model` (the tiny
transformer the demo, notebook 04 and the tests train).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import matfn
from matfn.coefficients import polar_express_coefficients, scalar_map

from . import bench, demo, report
from .args import (
    DEVICES,
    EXTRA_OF,
    REQUIRES,
    device_name,
    extra_message,
    finite_positive,
    missing_modules,
    open_unit_interval,
    output_dir,
    positive_int,
    safety_factor,
    step_count,
    triton_missing,
    unit_interval,
)

__all__ = ["main", "build_parser", "version"]

DEFAULT_DEMO_DIR = "matfn-demo-output"


def version() -> str:
    """The installed version of the ``matfn`` distribution.

    Returns
    -------
    str
        ``importlib.metadata.version("matfn")``; when the distribution is not installed (a
        source checkout on ``PYTHONPATH``), ``matfn.__version__`` followed by
        ``" (not installed)"``, or ``"unknown (not installed)"`` without one.
    """
    try:
        return importlib.metadata.version("matfn")
    except importlib.metadata.PackageNotFoundError:
        return f"{getattr(matfn, '__version__', 'unknown')} (not installed)"


def _device(name: str | None) -> str:
    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("matfn: --device cuda requested but torch.cuda.is_available() is False")
    return name


def _console() -> Any:
    from rich.console import Console

    # Wide enough for the report tables when the output is piped or captured.
    return Console(width=None if sys.stdout.isatty() else 160)


# --------------------------------------------------------------------------- report


def cmd_report(args: argparse.Namespace, console: Any = None) -> list[Path]:
    """Run ``matfn report``; returns the files written (only with ``--out``)."""
    console = console or _console()
    device = _device(args.device)
    env = report.environment(device)
    console.print(
        f"[bold]matfn report[/] on {device} ({env['device']}), torch {env['torch']}, "
        f"{env['threads']} threads, {env['date']}"
    )
    sections = report.run_report(
        device, args.sizes, quick=args.quick, progress=not args.no_progress, console=console
    )
    report.render_rich(sections, console)
    if args.markdown:
        console.print(report.render_markdown(sections), markup=False, highlight=False)
    files: list[Path] = []
    if args.out:
        files = report.save(sections, args.out, env)
        console.print(f"report written to {', '.join(str(f) for f in files)}")
    return files


# --------------------------------------------------------------------------- coeffs


def cmd_coeffs(args: argparse.Namespace, console: Any = None) -> list[Path]:
    """Run ``matfn coeffs``: print the schedule and plot its scalar map; returns the PNG path."""
    from rich.table import Table

    console = console or _console()
    try:
        coeffs = polar_express_coefficients(
            args.steps, lower=args.lower, safety=args.safety, cushion=args.cushion
        )
    except ValueError as e:
        raise SystemExit(f"matfn coeffs: {e}") from None
    sf = args.safety
    x = np.geomspace(args.lower, 1.0, 2001)
    table = Table(
        title=f"Polar Express: {args.steps} steps, lower={args.lower:g}, safety={sf:g}, "
        f"cushion={args.cushion:g}",
        caption="σ range: image of σ/‖M‖_F ∈ \\[lower, 1] (the input is divided by "
        "safety·‖M‖_F) after each step, in float64.",
        caption_justify="left",
    )
    for col in ("step", "a", "b", "c", "σ range after step", "max|σ−1|"):
        table.add_column(col, justify="right")
    y = x / sf
    for t, (a, b, c) in enumerate(coeffs):
        y = scalar_map([(a, b, c)], y)
        table.add_row(
            str(t + 1),
            f"{a:.6f}",
            f"{b:.6f}",
            f"{c:.6f}",
            f"[{y.min():.4g}, {y.max():.4g}]",
            f"{np.max(np.abs(y - 1)):.3g}",
        )
    console.print(table)
    console.print(
        "python: " + repr([tuple(round(v, 12) for v in abc) for abc in coeffs]),
        markup=False,
        highlight=False,
    )
    path = plot_schedule(coeffs, args.lower, sf, Path(args.out), args.steps, args.cushion)
    console.print(f"scalar map plotted to {path}")
    return [path]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_schedule(
    coeffs: list[tuple[float, float, float]],
    lower: float,
    safety: float,
    out_dir: Path,
    steps: int,
    cushion: float,
) -> Path:
    """PNG of the partial and full scalar maps ``σ ↦ p_t ∘ … ∘ p_1(σ/sf)`` and ``|f − 1|``."""
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    xl = np.geomspace(lower / 10, 1, 4001)
    xg = np.geomspace(lower / 100, 1, 2001)
    cmap = plt.get_cmap("viridis")
    for t in range(1, len(coeffs) + 1):
        last = t == len(coeffs)
        kw = {"lw": 2.0 if last else 1.0, "color": "C3" if last else cmap(t / len(coeffs))}
        ax1.semilogx(xl, scalar_map(coeffs[:t], xl / safety), label=f"after step {t}", **kw)
    ax1.axhline(1, color="k", lw=0.5, ls="--")
    ax1.axvline(lower, color="gray", lw=0.5, ls=":")
    ax1.set(xlabel="σ / ‖M‖_F", ylabel="output singular value", title="scalar map per step")
    ax1.legend(fontsize=7, ncol=2)
    err = np.abs(scalar_map(coeffs, xg / safety) - 1)
    ax2.loglog(xg, np.maximum(err, 1e-17), color="C3")
    ax2.axvline(lower, color="gray", lw=0.5, ls=":", label=f"lower = {lower:g}")
    ax2.set(xlabel="σ / ‖M‖_F", ylabel="|f(σ) − 1|", title="distance from 1 (float64)")
    ax2.legend(fontsize=8)
    fig.suptitle(
        f"Polar Express, {steps} steps, lower={lower:g}, safety={safety:g}, cushion={cushion:g}"
    )
    fig.tight_layout()
    path = out_dir / f"polar_express_T{steps}_lower{lower:g}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- bench / demo


def cmd_bench(args: argparse.Namespace, console: Any = None) -> list[Path]:
    """Run ``matfn bench``; returns the files written (only with ``--out``)."""
    console = console or _console()
    return bench.main(_device(args.device), args.sizes, args.quick, args.out, console)


def cmd_demo(args: argparse.Namespace, console: Any = None) -> list[Path]:
    """Run ``matfn demo``; returns every file written into the output folder."""
    console = console or _console()
    return demo.main(args, _device(args.device), console)


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser with the four subcommands."""
    p = argparse.ArgumentParser(
        prog="matfn",
        description="Matrix functions for matrix-function optimizers: accuracy report, "
        "coefficient schedules, benchmarks and a demo.",
    )
    p.add_argument("--version", action="version", version=f"matfn {version()}")
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        metavar="N",
        help="torch CPU threads, >= 1 (default: torch's choice)",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{report,coeffs,bench,demo}")

    def device_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--device",
            type=device_name,
            default=None,
            metavar="{" + ",".join(DEVICES) + "}",
            help="where to run (default: cuda when available, else cpu)",
        )

    r = sub.add_parser("report", help="error vs the float64 oracle for every function/method/dtype")
    device_arg(r)
    r.add_argument(
        "--sizes",
        type=positive_int,
        nargs="+",
        default=None,
        metavar="N",
        help="short side s ≥ 1 of the test matrices (default 64 256; --quick: 64)",
    )
    r.add_argument("--quick", action="store_true", help="one size (about 20 s on 2 CPU cores)")
    r.add_argument("--markdown", action="store_true", help="also print the tables as markdown")
    r.add_argument(
        "--out", type=output_dir, default=None, help="write report.json and report.md here"
    )
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_report)

    c = sub.add_parser("coeffs", help="print and plot a Polar-Express schedule")
    c.add_argument(
        "--steps", type=step_count, required=True, help="number of quintic steps, in [1, 99]"
    )
    c.add_argument(
        "--lower",
        type=open_unit_interval,
        required=True,
        help="smallest σ/‖M‖_F to lift, in (0, 1)",
    )
    c.add_argument(
        "--safety",
        type=safety_factor,
        default=1.01,
        help="safety factor sf in [1, 10] (default 1.01)",
    )
    c.add_argument(
        "--cushion", type=unit_interval, default=0.02, help="cushion λ in [0, 1) (default 0.02)"
    )
    c.add_argument("--out", type=output_dir, default=".", help="folder for the PNG (default .)")
    c.set_defaults(func=cmd_coeffs)

    b = sub.add_parser("bench", help="speed against torch baselines")
    device_arg(b)
    b.add_argument(
        "--sizes",
        type=positive_int,
        nargs="+",
        default=None,
        metavar="N",
        help="square sizes n ≥ 1 (matrices n×n and n×2n); default by device",
    )
    b.add_argument("--quick", action="store_true", help="small sizes, short timing")
    b.add_argument(
        "--out", type=output_dir, default=None, help="write bench.json and bench.md here"
    )
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser("demo", help="report + bench + figures + a Muon/QK-Clip training run")
    device_arg(d)
    d.add_argument(
        "--out",
        type=output_dir,
        default=DEFAULT_DEMO_DIR,
        help=f"output folder (default ./{DEFAULT_DEMO_DIR})",
    )
    d.add_argument("--quick", action="store_true", help="shorter training")
    d.add_argument(
        "--train-steps",
        type=positive_int,
        default=None,
        metavar="N",
        help="optimizer steps per training run, >= 1 (default 300; --quick: 100)",
    )
    d.add_argument(
        "--sizes",
        type=positive_int,
        nargs="+",
        default=None,
        metavar="N",
        help="sizes ≥ 1 for the report and bench parts (default: their quick sizes)",
    )
    d.add_argument(
        "--tau", type=finite_positive, default=10.0, help="QK-Clip threshold τ > 0 (default 10)"
    )
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``matfn`` script.

    Parses and checks every flag, checks that the subcommand's optional packages import, then
    runs it.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        0 on success; 2 (after a one-line message on stderr naming the extra to install) when
        an optional package is missing.

    Raises
    ------
    SystemExit
        With status 2 (argparse's usage error) for a bad flag, and 0 after ``--help`` or
        ``--version``.
    """
    args = build_parser().parse_args(argv)
    missing = missing_modules(REQUIRES[args.command])
    if missing:
        print(extra_message(args.command, missing), file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if _device(args.device if "device" in args else "cpu") == "cuda" and triton_missing():
        print(
            f"matfn {args.command}: triton is not installed, so matfn runs its torch paths on "
            'CUDA (no fused kernels); pip install "matfn[triton]" for them',
            file=sys.stderr,
        )
    try:
        args.func(args)
    except ModuleNotFoundError as e:  # an optional package imported further down
        top = (e.name or "").partition(".")[0]
        if top not in EXTRA_OF:
            raise
        print(extra_message(args.command, [top]), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
