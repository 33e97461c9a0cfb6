"""``matfn bench``: wall-clock time of matfn's functions against torch baselines.

Baselines: ``torch.linalg.svd`` (msign as ``U Vᵀ``, mclip as ``U clip(Σ) Vᵀ``),
torch.optim.Muon's Newton–Schulz (``torch.optim._muon._zeropower_via_newtonschulz``, Keller's
quintic, 5 steps, bf16) when importable, ``torch.linalg.eig`` for mcsgn and dense
``torch.linalg.solve_triangular`` for ``tri_inv``/``tri_solve`` (forming the dense ``T`` from
``Q``, ``K`` counted in the baseline). Timing: Triton's ``do_bench``
(median, L2 flushed) on CUDA when Triton is importable, else ``torch.utils.benchmark`` (median of
blocked runs, all CPU threads).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

import matfn

from . import report

__all__ = ["BenchRow", "run_bench", "main"]

CPU_SIZES = (256, 512)
CPU_QUICK_SIZES = (128,)
CUDA_SIZES = (1024, 2048, 4096)
CUDA_QUICK_SIZES = (1024,)
#: SVD baselines only up to this n (a 4096×8192 SVD takes seconds per call).
SVD_MAX = 2048


@dataclass
class BenchRow:
    """One comparison: matfn's time against a baseline's on the same input."""

    op: str
    shape: str
    dtype: str
    matfn_ms: float
    baseline: str
    baseline_ms: float

    @property
    def speedup(self) -> float:
        """baseline time / matfn time (> 1: matfn is faster)."""
        return self.baseline_ms / self.matfn_ms if self.matfn_ms > 0 else math.nan


def time_ms(fn: Callable[[], Any], device: str, quick: bool = False) -> float:
    """Median wall-clock milliseconds of ``fn()`` (synchronised on CUDA)."""
    if device == "cuda":
        try:
            from triton.testing import do_bench

            return float(
                do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100, quantiles=[0.5])
            )
        except ImportError:
            pass
    from torch.utils.benchmark import Timer

    fn()  # warm-up (and first-call caches such as coefficient schedules)
    t = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return 1e3 * t.blocked_autorange(min_run_time=0.05 if quick else 0.3).median


def _torch_muon_ns() -> Callable[..., torch.Tensor] | None:
    try:
        from torch.optim._muon import _zeropower_via_newtonschulz
    except ImportError:
        return None
    return _zeropower_via_newtonschulz


def _svd_msign(M: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(M.float(), full_matrices=False)
    return U @ Vh


def _svd_clip(M: torch.Tensor) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(M.float(), full_matrices=False)
    return (U * S.clamp(max=1.0).unsqueeze(-2)) @ Vh


def _eig_sign(M: torch.Tensor) -> torch.Tensor:
    lam, P = torch.linalg.eig(M.double())
    return (P @ torch.diag_embed(torch.sgn(lam.real).to(P.dtype)) @ torch.linalg.inv(P)).real


def run_bench(
    device: str = "cpu",
    sizes: Sequence[int] | None = None,
    quick: bool = False,
    progress: bool = True,
    console: Any = None,
) -> list[BenchRow]:
    """Time every available comparison; returns the rows."""
    if sizes is None:
        if device == "cuda":
            sizes = CUDA_QUICK_SIZES if quick else CUDA_SIZES
        else:
            sizes = CPU_QUICK_SIZES if quick else CPU_SIZES
    gen = torch.Generator().manual_seed(0)
    half = torch.bfloat16 if device == "cuda" else torch.float32
    ns = _torch_muon_ns()
    jobs: list[tuple[str, str, str, Callable, str, Callable]] = []
    for n in sizes:
        for shape in ((n, n), (n, 2 * n)):
            M = torch.randn(*shape, generator=gen).to(device)
            label = f"{shape[0]}×{shape[1]}"
            dt = "bf16" if device == "cuda" else "fp32"
            jobs.append(
                (
                    "msign (polar_express, 5)",
                    label,
                    dt,
                    lambda M=M: matfn.msign(M),
                    "torch.linalg.svd (fp32)",
                    None if n > SVD_MAX else (lambda M=M: _svd_msign(M)),
                )
            )
            if ns is not None:
                Mh = M.to(half)
                jobs.append(
                    (
                        "msign (keller, 5)",
                        label,
                        dt,
                        lambda M=Mh: matfn.msign(M, method="keller", compute_dtype=half),
                        "torch.optim.Muon NS (bf16)",
                        lambda M=Mh: ns(M, (3.4445, -4.7750, 2.0315), 5, 1e-7),
                    )
                )
        Mw = torch.randn(n, 2 * n, generator=gen).to(device)
        lab = f"{n}×{2 * n}"
        jobs.append(
            (
                "mclip (F3, 8, fp32)",
                lab,
                "fp32",
                lambda M=Mw: matfn.mclip(M * (4 / math.sqrt(n))),
                "torch.linalg.svd (fp32)",
                None if n > SVD_MAX else (lambda M=Mw: _svd_clip(M * (4 / math.sqrt(n)))),
            )
        )
        if device == "cpu" or n <= 1024:
            A = torch.randn(n, n, generator=gen, dtype=torch.float64)
            P = torch.linalg.qr(A)[0] + 0.1 * A / math.sqrt(n)
            lam = torch.linspace(0.1, 1.0, n, dtype=torch.float64) * torch.where(
                torch.arange(n) % 2 == 0, 1.0, -1.0
            )
            S = ((P * lam) @ torch.linalg.inv(P)).float().to(device)
            jobs.append(
                (
                    "mcsgn (auto, fp32)",
                    f"{n}×{n}",
                    "fp32",
                    lambda S=S: matfn.mcsgn(S),
                    "torch.linalg.eig (fp64)",
                    lambda S=S: _eig_sign(S),
                )
            )
        if hasattr(matfn, "tri_inv"):
            N, d = min(4 * n, 8192), 64
            K = torch.nn.functional.normalize(torch.randn(N, d, generator=gen), dim=-1).to(device)
            eye = torch.eye(N, device=device)
            V = torch.randn(N, 64, generator=gen).to(device)

            def dense_t(K: torch.Tensor = K, eye: torch.Tensor = eye) -> torch.Tensor:
                # the baseline gets Q, K too: forming T is part of its cost
                return eye + torch.tril(K @ K.mT, -1)

            jobs.append(
                (
                    "tri_inv (d=64)",
                    f"n={N}",
                    "fp32",
                    lambda K=K: matfn.tri_inv(K, K),
                    "form T + solve_triangular(T, I)",
                    lambda eye=eye: torch.linalg.solve_triangular(dense_t(), eye, upper=False),
                )
            )
            jobs.append(
                (
                    "tri_solve (d=64, V n×64)",
                    f"n={N}",
                    "fp32",
                    lambda K=K, V=V: matfn.tri_solve(K, K, V),
                    "form T + solve_triangular(T, V)",
                    lambda V=V: torch.linalg.solve_triangular(dense_t(), V, upper=False),
                )
            )
    rows: list[BenchRow] = []
    bar = None
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        bar = Progress(
            TextColumn("[bold]bench[/] {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            console=console,
            transient=True,
        )
        bar.start()
        tid = bar.add_task("", total=len(jobs))
    try:
        for op, shape, dt, f, base, g in jobs:
            if bar is not None:
                bar.update(tid, description=f"{op} {shape}")
            rows.append(
                BenchRow(
                    op,
                    shape,
                    dt,
                    time_ms(f, device, quick),
                    base if g is not None else f"{base}: skipped (n > {SVD_MAX})",
                    time_ms(g, device, quick) if g is not None else math.nan,
                )
            )
            if bar is not None:
                bar.advance(tid)
    finally:
        if bar is not None:
            bar.stop()
    return rows


def render_rich(rows: list[BenchRow], title: str, console: Any) -> None:
    """Print the rows as a rich table."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col, just in (
        ("op", "left"),
        ("shape", "left"),
        ("dtype", "left"),
        ("matfn ms", "right"),
        ("baseline", "left"),
        ("baseline ms", "right"),
        ("speed-up", "right"),
    ):
        table.add_column(col, justify=just, no_wrap=True)
    for r in rows:
        table.add_row(
            r.op,
            r.shape,
            r.dtype,
            f"{r.matfn_ms:.3g}",
            r.baseline,
            f"{r.baseline_ms:.3g}",
            f"{r.speedup:.2f}×",
        )
    console.print(table)


def render_markdown(rows: list[BenchRow], title: str) -> str:
    """The rows as a GitHub markdown table."""
    lines = [
        f"**{title}**",
        "",
        "| op | shape | dtype | matfn ms | baseline | baseline ms | speed-up |",
        "|---|---|---|---:|---|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.op} | {r.shape} | {r.dtype} | {r.matfn_ms:.3g} | {r.baseline} | "
            f"{r.baseline_ms:.3g} | {r.speedup:.2f}× |"
        )
    return "\n".join(lines) + "\n"


def main(
    device: str,
    sizes: Sequence[int] | None,
    quick: bool,
    out: Path | None,
    console: Any,
    progress: bool = True,
) -> list[Path]:
    """``matfn bench``: run, print, and (with ``out``) write ``bench.json``/``bench.md``."""
    env = report.environment(device)
    title = (
        f"matfn bench on {device} ({env['device']}), torch {env['torch']}, "
        f"{env['threads']} threads, {env['date']}"
    )
    rows = run_bench(device, sizes, quick, progress, console)
    render_rich(rows, title, console)
    if _torch_muon_ns() is None:
        console.print("[yellow]torch.optim._muon not importable: no torch Muon baseline[/]")
    files: list[Path] = []
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(
            json.dumps({"meta": env, "rows": [asdict(r) for r in rows]}, indent=1)
        )
        (out / "bench.md").write_text(render_markdown(rows, title))
        files = [out / "bench.json", out / "bench.md"]
        console.print(f"bench written to {', '.join(str(f) for f in files)}")
    return files
