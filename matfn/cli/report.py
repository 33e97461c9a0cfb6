"""``matfn report``: accuracy of every matrix function against the float64 oracles.

Test matrices have a prescribed spectrum (``U diag(σ) Vᵀ`` with Haar-random ``U``, ``V`` and
log-spaced ``σ`` from 1 down to ``1/κ``), so every cell of the table says how a method behaves on
a given condition number. References come from :mod:`matfn.oracles` (float64 SVD/eig/scipy).
A section whose function is missing from :mod:`matfn` is skipped with a note.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import matfn
from matfn import oracles

__all__ = ["Section", "build_sections", "run_report", "render_rich", "render_markdown"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}

#: Sizes (short side s) used when none are given; the CPU keeps bf16 to s ≤ this.
DEFAULT_SIZES = (64, 256)
QUICK_SIZES = (64,)
CPU_BF16_MAX = 128


@dataclass
class Row:
    """One table row: a method/dtype/shape and, per case, the metric values (or an error)."""

    method: str
    dtype: str
    shape: str
    cells: dict[str, list[float] | str] = field(default_factory=dict)


@dataclass
class Section:
    """One table: a function, its metrics and cases (condition numbers), and its rows."""

    title: str
    metrics: list[str]
    cases: list[str]
    rows: list[Row] = field(default_factory=list)
    note: str = ""
    skipped: str = ""


# --------------------------------------------------------------------------- test matrices


def _orthonormal(rng: np.random.Generator, n: int, r: int) -> np.ndarray:
    q, rr = np.linalg.qr(rng.standard_normal((n, r)))
    return q * np.sign(np.diag(rr))


def spectrum_matrix(n: int, m: int, sigma: np.ndarray, seed: int) -> np.ndarray:
    """``U diag(σ) Vᵀ`` (float64, ``n×m``) with Haar-random orthonormal ``U``, ``V``."""
    rng = np.random.default_rng(seed)
    r = len(sigma)
    return (_orthonormal(rng, n, r) * sigma) @ _orthonormal(rng, m, r).T


def _geom(hi: float, lo: float, r: int) -> np.ndarray:
    return np.geomspace(hi, lo, r)


def _t(a: np.ndarray, dtype: torch.dtype, device: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype)


def _f64(x: torch.Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float64).numpy()


def _rel(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-300))


# --------------------------------------------------------------------------- sections

Task = Callable[[], list[float]]


def _msign_section(device: str, sizes: Sequence[int], conds: Sequence[float]) -> tuple:
    sec = Section(
        "msign: polar factor U Vᵀ (input s×2s float32, iteration in `dtype`)",
        ["max|σ−1|", "‖X−UVᵀ‖F/√r"],
        [f"κ={c:g}" for c in conds],
        note="κ = σ_max/σ_min of the input; σ log-spaced. Polar Express and tuned are 5-step "
        "schedules designed for σ/‖M‖_F ≥ 1e-3 (tuned 1e-2); keller does not converge by design; "
        "'auto' iterates until converged for the dtype.",
    )
    methods = [
        ("polar_express", None, "polar_express (5)"),
        ("polar_express", 8, "polar_express (8)"),
        ("polar_express", "auto", "polar_express (auto)"),
        ("tuned", None, "tuned (5)"),
        ("keller", None, "keller (5)"),
        ("cubic", None, "cubic (12)"),
        ("svd", None, "svd"),
    ]
    tasks: list[tuple[Row, str, Task]] = []
    for s in sizes:
        for dname in ("float32", "bfloat16"):
            if dname == "bfloat16" and device == "cpu" and s > CPU_BF16_MAX:
                continue
            for method, steps, label in methods:
                row = Row(label, dname, f"{s}×{2 * s}")
                sec.rows.append(row)
                for ci, cond in enumerate(conds):

                    def task(s=s, dname=dname, method=method, steps=steps, cond=cond, ci=ci):
                        A = spectrum_matrix(s, 2 * s, _geom(1.0, 1.0 / cond, s), seed=10 + ci)
                        M = _t(A, torch.float32, device)
                        X = matfn.msign(M, method=method, steps=steps, compute_dtype=DTYPES[dname])
                        Xd, O = _f64(X), oracles.msign_oracle(A)
                        sv = np.linalg.svd(Xd, compute_uv=False)
                        return [
                            float(np.max(np.abs(sv - 1))),
                            float(np.linalg.norm(Xd - O) / math.sqrt(s)),
                        ]

                    tasks.append((row, sec.cases[ci], task))
    return sec, tasks


def _mcsgn_section(device: str, sizes: Sequence[int], conds: Sequence[float]) -> tuple:
    sec = Section(
        "mcsgn: matrix sign P sign(Λ) P⁻¹ (non-symmetric s×s, real eigenvalues ±[1/κ, 1])",
        ["‖S−S*‖F/‖S*‖F", "‖S²−I‖F/√s"],
        [f"κ={c:g}" for c in conds],
        note="P = orthogonal·(I + 0.3·Gaussian/√s) (mildly non-normal). Fixed step counts are "
        "checked for convergence and raise MatrixSignConvergenceError when they fall short.",
    )
    methods = [
        ("polar_express", None, "polar_express (auto, default)"),
        ("polar_express", 8, "polar_express (8)"),
        ("tuned", 6, "tuned (6)"),
        ("svd", None, "eig (reference path)"),
    ]
    tasks = []
    for s in sizes:
        for dname in ("float32", "bfloat16"):
            if dname == "bfloat16" and device == "cpu" and s > CPU_BF16_MAX:
                continue
            for method, steps, label in methods:
                if method == "svd" and dname != "float32":
                    continue
                row = Row(label, dname, f"{s}×{s}")
                sec.rows.append(row)
                for ci, cond in enumerate(conds):

                    def task(s=s, dname=dname, method=method, steps=steps, cond=cond, ci=ci):
                        rng = np.random.default_rng(20 + ci)
                        lam = _geom(1.0, 1.0 / cond, s) * np.where(np.arange(s) % 2, -1.0, 1.0)
                        P = _orthonormal(rng, s, s) @ (
                            np.eye(s) + 0.3 * rng.standard_normal((s, s)) / math.sqrt(s)
                        )
                        A = (P * lam) @ np.linalg.inv(P)
                        kw: dict[str, Any] = {"method": method, "steps": steps}
                        if method != "svd":
                            kw["compute_dtype"] = DTYPES[dname]
                        S = _f64(matfn.mcsgn(_t(A, torch.float32, device), **kw))
                        ref = oracles.mcsgn_oracle(A)
                        return [
                            _rel(S, ref),
                            float(np.linalg.norm(S @ S - np.eye(s)) / math.sqrt(s)),
                        ]

                    tasks.append((row, sec.cases[ci], task))
    return sec, tasks


def _mclip_section(device: str, sizes: Sequence[int], spreads: Sequence[float]) -> tuple:
    sec = Section(
        "mclip: clip singular values into [0, 1] (input s×2s float32, iteration in `dtype`)",
        ["max|σ−clip(σ)|", "‖Y−Y*‖F/‖Y*‖F"],
        [f"σ∈[{1 / c:.2g},{c:g}]" for c in spreads],
        note="Default steps = 8 Polar-Express steps per inner msign.",
    )
    forms = ("F3", "F2", "dilation")
    tasks = []
    for s in sizes:
        for dname in ("float32", "bfloat16"):
            if dname == "bfloat16" and device == "cpu" and s > CPU_BF16_MAX:
                continue
            for form in forms:
                for steps in (None, "auto") if dname == "float32" else (None,):
                    label = f"{form} ({'auto' if steps == 'auto' else 8})"
                    row = Row(label, dname, f"{s}×{2 * s}")
                    sec.rows.append(row)
                    for ci, spread in enumerate(spreads):

                        def task(s=s, dname=dname, form=form, steps=steps, spread=spread, ci=ci):
                            sigma = _geom(spread, 1.0 / spread, s)
                            A = spectrum_matrix(s, 2 * s, sigma, seed=30 + ci)
                            Y = matfn.mclip(
                                _t(A, torch.float32, device),
                                form=form,
                                steps=steps,
                                compute_dtype=DTYPES[dname],
                            )
                            Yd = _f64(Y)
                            sv = np.linalg.svd(Yd, compute_uv=False)
                            target = np.sort(np.clip(sigma, 0.0, 1.0))[::-1]
                            return [
                                float(np.max(np.abs(sv - target))),
                                _rel(Yd, oracles.mclip_oracle(A)),
                            ]

                        tasks.append((row, sec.cases[ci], task))
    return sec, tasks


def _sylvester_section(device: str, sizes: Sequence[int], conds: Sequence[float]) -> tuple:
    from scipy.linalg import solve_sylvester

    sec = Section(
        "solve_sylvester: A X + X B = C, X s×2s (A, B symmetric positive definite, eig. [1/κ, 1])",
        ["‖X−X*‖F/‖X*‖F", "‖AX+XB−C‖F/‖C‖F"],
        [f"κ={c:g}" for c in conds],
        note="Against scipy.linalg.solve_sylvester in float64.",
    )
    tasks = []
    for s in sizes:
        for dname in ("float32", "float64"):
            row = Row("sign iteration (default)", dname, f"{s}×{2 * s}")
            sec.rows.append(row)
            for ci, cond in enumerate(conds):

                def task(s=s, dname=dname, cond=cond, ci=ci):
                    rng = np.random.default_rng(40 + ci)
                    Qa, Qb = _orthonormal(rng, s, s), _orthonormal(rng, 2 * s, 2 * s)
                    A = (Qa * _geom(1.0, 1.0 / cond, s)) @ Qa.T
                    B = (Qb * _geom(1.0, 1.0 / cond, 2 * s)) @ Qb.T
                    C = rng.standard_normal((s, 2 * s))
                    dt = DTYPES[dname]
                    X = _f64(
                        matfn.solve_sylvester(
                            _t(A, dt, device), _t(B, dt, device), _t(C, dt, device)
                        )
                    )
                    ref = solve_sylvester(A, B, C)
                    return [_rel(X, ref), _rel(A @ X + X @ B, C)]

                tasks.append((row, sec.cases[ci], task))
    return sec, tasks


def _derivative_section(device: str, sizes: Sequence[int], conds: Sequence[float]) -> tuple:
    sec = Section(
        "msign_jvp / msign_vjp: derivative of msign (input s×2s, full rank)",
        ["‖D−D*‖F/‖D*‖F"],
        [f"κ={c:g}" for c in conds],
        note="Reference: the float64 SVD closed form (docs/math.md §4.2), matfn.oracles.",
    )
    tasks = []
    for s in sizes:
        for fname in ("msign_jvp", "msign_vjp"):
            fn = getattr(matfn, fname)
            oracle = getattr(oracles, f"{fname}_oracle")
            for method in ("sylvester", "svd"):
                for dname in ("float32", "float64"):
                    row = Row(f"{fname} ({method})", dname, f"{s}×{2 * s}")
                    sec.rows.append(row)
                    for ci, cond in enumerate(conds):

                        def task(
                            s=s, dname=dname, fn=fn, oracle=oracle, method=method, cond=cond, ci=ci
                        ):
                            A = spectrum_matrix(s, 2 * s, _geom(1.0, 1.0 / cond, s), seed=50 + ci)
                            seed = 60 + ci + (10 if fn is matfn.msign_vjp else 0)
                            D = np.random.default_rng(seed).standard_normal((s, 2 * s))
                            dt = DTYPES[dname]
                            out = _f64(fn(_t(A, dt, device), _t(D, dt, device), method=method))
                            return [_rel(out, oracle(A, D))]

                        tasks.append((row, sec.cases[ci], task))
    return sec, tasks


def _triangular_section(device: str, sizes: Sequence[int], _conds: Sequence[float]) -> tuple:
    sec = Section(
        "tri_inv / tri_solve: T = diag(λ) + tril(Q Kᵀ, −1), n×n with rank d = 16",
        ["max|Y−Y*|/max|Y*|", "‖TY−I‖max"],
        ["DeltaNet", "general"],
        note="DeltaNet: Q = K with unit rows, λ = 1. General: Q ≠ K Gaussian/(2√d), "
        "λ ∈ [1, 2]. tri_solve (V n×32): Y = T⁻¹V and the residual ‖TY−V‖max. Reference: "
        "scipy.linalg.solve_triangular on the dense T in float64.",
    )
    d = 16
    tasks = []

    def make(n: int, case: str, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        if case == "DeltaNet":
            K = rng.standard_normal((n, d))
            K /= np.linalg.norm(K, axis=1, keepdims=True)
            return K, K.copy(), np.ones(n)
        Q = rng.standard_normal((n, d)) / (2 * math.sqrt(d))
        K = rng.standard_normal((n, d)) / (2 * math.sqrt(d))
        return Q, K, rng.uniform(1.0, 2.0, n)

    for s in sizes:
        n = 4 * s
        for fname in ("tri_inv", "tri_solve"):
            fn = getattr(matfn, fname)
            for dname in ("float32", "float64"):
                row = Row(fname, dname, f"n={n}")
                sec.rows.append(row)
                for ci, case in enumerate(sec.cases):

                    def task(n=n, fname=fname, fn=fn, dname=dname, case=case, ci=ci):
                        from scipy.linalg import solve_triangular

                        Q, K, lam = make(n, case, 70 + ci)
                        T = np.diag(lam) + np.tril(Q @ K.T, -1)
                        dt = DTYPES[dname]
                        args = [_t(Q, dt, device), _t(K, dt, device)]
                        if fname == "tri_inv":
                            rhs = np.eye(n)
                        else:
                            rhs = np.random.default_rng(80 + ci).standard_normal((n, 32))
                            args.append(_t(rhs, dt, device))
                        Y = _f64(fn(*args, diag=_t(lam, dt, device)))
                        ref = solve_triangular(T, rhs, lower=True)
                        return [
                            float(np.max(np.abs(Y - ref)) / np.max(np.abs(ref))),
                            float(np.max(np.abs(T @ Y - rhs))),
                        ]

                    tasks.append((row, sec.cases[ci], task))
    return sec, tasks


#: (title used in skip notes, required public names, builder, condition numbers/cases)
SECTIONS: list[tuple[str, tuple[str, ...], Callable[..., tuple], tuple[float, ...]]] = [
    ("msign", ("msign",), _msign_section, (10.0, 1e3)),
    ("mcsgn", ("mcsgn",), _mcsgn_section, (10.0, 1e3)),
    ("mclip", ("mclip",), _mclip_section, (4.0, 100.0)),
    ("solve_sylvester", ("solve_sylvester",), _sylvester_section, (10.0, 1e3)),
    ("msign_jvp / msign_vjp", ("msign_jvp", "msign_vjp"), _derivative_section, (10.0, 1e2)),
    ("tri_inv / tri_solve", ("tri_inv", "tri_solve"), _triangular_section, ()),
]


def build_sections(
    device: str = "cpu", sizes: Sequence[int] | None = None, quick: bool = False
) -> list[tuple[Section, list[tuple[Row, str, Task]]]]:
    """The report's sections and the work items that fill them (nothing is computed yet)."""
    if sizes is None:
        sizes = QUICK_SIZES if quick else DEFAULT_SIZES
    out = []
    for name, needs, builder, cases in SECTIONS:
        missing = [n for n in needs if not hasattr(matfn, n)]
        if missing:
            sec = Section(name, [], [])
            sec.skipped = f"skipped: {', '.join('matfn.' + m for m in missing)} not available"
            out.append((sec, []))
            continue
        section_sizes = sizes
        if name in ("msign_jvp / msign_vjp", "solve_sylvester") and device == "cpu":
            # the float64 references and the sign iterations on 3s×3s blocks dominate the time
            section_sizes = [s for s in sizes if s <= 128] or [min(sizes)]
        try:
            out.append(builder(device, section_sizes, cases))
        except (ImportError, AttributeError) as e:  # a reference (e.g. scipy) not installed
            sec = Section(name, [], [])
            sec.skipped = f"skipped: {e}"
            out.append((sec, []))
    return out


def _fmt(v: list[float] | str | None, k: int) -> str:
    if v is None:
        return "—"
    if isinstance(v, str):
        return v
    x = v[k]
    return "nan" if not math.isfinite(x) else f"{x:.1e}"


def _error_text(e: Exception) -> str:
    name = type(e).__name__
    return "no conv." if "Convergence" in name else name


def blas_one_thread() -> Any:
    """Limit numpy's BLAS to one thread while the float64 oracles run.

    The oracles are small; a multi-threaded OpenBLAS on a busy machine (``pytest -n 2`` on two
    cores) spins and can be 50× slower than one thread. No-op without threadpoolctl.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def run_report(
    device: str = "cpu",
    sizes: Sequence[int] | None = None,
    quick: bool = False,
    progress: bool = True,
    console: Any = None,
) -> list[Section]:
    """Compute every section (with a rich progress bar) and return the filled tables."""
    plan = build_sections(device, sizes, quick)
    total = sum(len(t) for _, t in plan)
    bar = None
    if progress:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        bar = Progress(
            TextColumn("[bold]report[/] {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
    task_id = None
    if bar is not None:
        bar.start()
        task_id = bar.add_task("", total=total)
    try:
        with blas_one_thread():
            for sec, tasks in plan:
                for row, case, fn in tasks:
                    if bar is not None:
                        bar.update(task_id, description=f"{sec.title.split(':')[0]} {row.method}")
                    try:
                        row.cells[case] = fn()
                    except Exception as e:  # a failing method is a result, not a crash
                        row.cells[case] = _error_text(e)
                    if bar is not None:
                        bar.advance(task_id)
    finally:
        if bar is not None:
            bar.stop()
    return [sec for sec, _ in plan]


def render_rich(sections: list[Section], console: Any) -> None:
    """Print each section as a rich table (skipped sections as a one-line note)."""
    from rich.table import Table

    for sec in sections:
        if sec.skipped:
            console.print(f"[yellow]{sec.title}: {sec.skipped}[/]")
            continue
        table = Table(
            title=sec.title, title_justify="left", caption=sec.note, caption_justify="left"
        )
        for col in ("method", "dtype", "shape"):
            table.add_column(col, no_wrap=True)
        for case in sec.cases:
            for metric in sec.metrics:
                table.add_column(f"{metric}\n{case}", justify="right", no_wrap=True)
        for row in sec.rows:
            vals = [
                _fmt(row.cells.get(case), k) for case in sec.cases for k in range(len(sec.metrics))
            ]
            table.add_row(row.method, row.dtype, row.shape, *vals)
        console.print(table)


def render_markdown(sections: list[Section]) -> str:
    """The tables as GitHub markdown (for the README)."""
    lines: list[str] = []
    for sec in sections:
        if sec.skipped:
            lines += [f"*{sec.title}: {sec.skipped}*", ""]
            continue
        heads = ["method", "dtype", "shape"] + [
            f"{m} ({c})" for c in sec.cases for m in sec.metrics
        ]
        lines += [f"**{sec.title}**", "", "| " + " | ".join(heads) + " |"]
        lines.append("|" + "|".join("---" if i < 3 else "---:" for i in range(len(heads))) + "|")
        for row in sec.rows:
            vals = [_fmt(row.cells.get(c), k) for c in sec.cases for k in range(len(sec.metrics))]
            lines.append("| " + " | ".join([row.method, row.dtype, row.shape, *vals]) + " |")
        lines += ["", sec.note, ""]
    return "\n".join(lines)


def save(sections: list[Section], out_dir: Any, meta: dict[str, Any]) -> list[Any]:
    """Write ``report.json`` and ``report.md`` into ``out_dir``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pj, pm = out / "report.json", out / "report.md"
    pj.write_text(json.dumps({"meta": meta, "sections": [asdict(s) for s in sections]}, indent=1))
    pm.write_text(render_markdown(sections) + "\n")
    return [pj, pm]


def environment(device: str) -> dict[str, Any]:
    """Device name, versions and date for the report header."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = _cpu_name() or platform.processor() or platform.machine()
    return {
        "device": name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""
