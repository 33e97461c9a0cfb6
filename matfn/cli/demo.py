"""``matfn demo``: what the toolkit does, in about two minutes on a laptop CPU.

1. the accuracy report (quick) and the speed table (quick);
2. figures: the singular-value maps of every Newton–Schulz schedule, with the singular values
   that msign actually produces on a test matrix (fp32 and bf16) on top;
3. a short training run of a tiny causal character-level transformer on the Python Language
   Reference text that ships with CPython (:mod:`pydoc_data.topics`): AdamW, Muon, and
   Muon + QK-Clip, with loss and max-logit curves.

Everything is written into one output folder, named at the end.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

import matfn
from matfn.coefficients import scalar_map, schedule

from . import bench, report
from .report import spectrum_matrix
from .toy_model import load_corpus, train_lm

__all__ = ["main", "plot_schedules", "plot_training", "SCHEDULES"]

#: (label, method, steps) of the schedules drawn in the singular-value figure.
SCHEDULES: list[tuple[str, str, int]] = [
    ("keller (5)", "keller", 5),
    ("tuned (5)", "tuned", 5),
    ("polar_express (5)", "polar_express", 5),
    ("polar_express (8)", "polar_express", 8),
    ("cubic (12)", "cubic", 12),
]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_schedules(out_dir: Path, device: str = "cpu") -> Path:
    """``schedules.png``: scalar maps ``σ/‖M‖_F ↦ f(σ)`` and msign's actual singular values.

    The dots are the singular values of ``msign(M)`` for a ``128×256`` matrix whose singular
    values are log-spaced in ``[1e-4, 1]·‖M‖_F``-ish (fp32: filled, bf16: open), so the figure
    shows that the matrix iteration does exactly what its scalar polynomial says.
    """
    plt = _pyplot()
    x = np.geomspace(1e-4, 1, 1000)
    xz = np.linspace(0, 1, 20001)  # the compositions oscillate fast near 1: sample densely
    s = 128
    sigma = np.geomspace(1.0, 1e-4, s)
    A = spectrum_matrix(s, 2 * s, sigma, seed=1)
    xs = sigma / np.linalg.norm(A)
    M = torch.from_numpy(A).float().to(device)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for i, (label, method, steps) in enumerate(SCHEDULES):
        coeffs, factor = schedule(method, steps)
        color = f"C{i}"
        axes[0].plot(x, scalar_map(coeffs, x / factor), color=color, lw=1.4, label=label)
        axes[1].plot(xz, scalar_map(coeffs, xz / factor), color=color, lw=0.7)
        for dt, kw in (
            (torch.float32, {"s": 9}),
            (torch.bfloat16, {"s": 16, "facecolors": "none"}),
        ):
            X = matfn.msign(M, method=method, steps=steps, compute_dtype=dt)
            _, _, Vh = np.linalg.svd(A, full_matrices=False)
            # σ_i(X) along the input's right singular vectors: ‖X v_i‖ keeps the pairing with σ_i
            sv = np.linalg.norm(X.double().cpu().numpy() @ Vh.T, axis=0)
            axes[0].scatter(xs, sv, color=color, lw=0.6, **kw)
    axes[0].set_xscale("log")
    axes[0].set(
        xlabel="σ / ‖M‖_F",
        ylabel="singular value of msign(M)",
        ylim=(-0.05, 1.35),
        title="scalar maps (lines) and msign on a 128×256 matrix (● fp32, ○ bf16)",
    )
    axes[0].axhline(1, color="k", lw=0.5, ls="--")
    axes[0].legend(fontsize=8, loc="upper left")
    axes[1].set(
        xlim=(0.0, 1.0),
        ylim=(0.6, 1.3),
        xlabel="σ / ‖M‖_F",
        title="the same maps on a linear axis: each schedule's band around 1",
    )
    axes[1].axhline(1, color="k", lw=0.5, ls="--")
    axes[0].title.set_fontsize(9)
    fig.tight_layout()
    path = out_dir / "schedules.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _smooth(y: list[float], k: int = 10) -> np.ndarray:
    a = np.asarray(y, dtype=np.float64)
    if len(a) <= 1:
        return a
    out = np.empty_like(a)
    acc = a[0]
    for i, v in enumerate(a):
        acc = acc + (v - acc) / min(i + 1, k)
        out[i] = acc
    return out


def plot_training(results: list[Any], tau: float, out_dir: Path) -> list[Path]:
    """``training_loss.png`` and ``max_logit.png`` from :class:`TrainResult` objects."""
    plt = _pyplot()
    paths = []
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for i, r in enumerate(results):
        # the clipped run follows Muon's loss closely: dashed so that both stay visible
        ls = "--" if "Clip" in r.name else "-"
        ax.plot(_smooth(r.loss), ls=ls, color=f"C{i}", label=f"{r.name} (val {r.val_loss:.3f})")
    ax.set(xlabel="step", ylabel="train loss (nats/char, smoothed)", title="tiny char-LM")
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "training_loss.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for r in results:
        ax.plot(r.max_logit, label=r.name)
    ax.axhline(tau, color="k", lw=0.8, ls="--", label=f"QK-Clip τ = {tau:g}")
    ax.set(xlabel="step", ylabel="max attention logit (all heads)", title="max-logit per step")
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "max_logit.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def train_all(steps: int, tau: float, device: str, console: Any) -> tuple[list[Any], str]:
    """The three runs (AdamW, Muon, Muon + QK-Clip) with rich progress bars."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    text, source = load_corpus()
    runs = [
        ("AdamW", "adamw", None),
        ("Muon", "muon", None),
        (f"Muon + QK-Clip (τ={tau:g})", "muon", tau),
    ]
    results = []
    with Progress(
        TextColumn("{task.description:<28}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}  max-logit {task.fields[ml]:6.2f}"),
        TimeRemainingColumn(),
        console=console,
    ) as bar:
        for name, kind, clip in runs:
            tid = bar.add_task(name, total=steps, loss=float("nan"), ml=float("nan"))

            def cb(step: int, loss: float, ml: float, tid: Any = tid) -> None:
                bar.update(tid, advance=1, loss=loss, ml=ml)

            results.append(
                train_lm(
                    name, kind, steps=steps, qk_clip_tau=clip, text=text, device=device, callback=cb
                )
            )
    return results, source


def _train_section(
    args: argparse.Namespace, steps: int, device: str, out: Path, console: Any
) -> list[Path]:
    """Part 4 of the demo: three training runs, their table, figures and JSON."""
    from rich.table import Table

    files: list[Path] = []
    results, source = train_all(steps, args.tau, device, console)
    table = Table(title=f"char-level LM on the {source}", title_justify="left")
    for col in (
        "run",
        "train loss (last 20)",
        "val loss",
        "max-logit (max / last)",
        "steps clipped",
        "seconds",
    ):
        table.add_column(col, justify="left" if col == "run" else "right")
    for r in results:
        last = r.loss[-20:]
        table.add_row(
            r.name,
            f"{sum(last) / len(last):.3f}",
            f"{r.val_loss:.3f}",
            f"{max(r.max_logit):.2f} / {r.max_logit[-1]:.2f}",
            str(r.clipped_steps),
            f"{r.seconds:.1f}",
        )
    console.print(table)
    files += plot_training(results, args.tau, out)
    (out / "training.json").write_text(
        json.dumps(
            {
                "source": source,
                "tau": args.tau,
                "runs": [
                    {
                        "name": r.name,
                        "loss": r.loss,
                        "max_logit": r.max_logit,
                        "val_loss": r.val_loss,
                        "seconds": r.seconds,
                    }
                    for r in results
                ],
            }
        )
    )
    files.append(out / "training.json")

    return files


def main(args: argparse.Namespace, device: str, console: Any) -> list[Path]:
    """``matfn demo``; returns every file written."""
    from rich.rule import Rule

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    env = report.environment(device)
    console.print(Rule("[bold]matfn demo"))
    console.print(
        f"device: {device} ({env['device']}), torch {env['torch']}, {env['threads']} threads\n"
        "msign(M) = U Vᵀ (the Muon update direction), mcsgn (matrix sign), mclip (singular-value "
        "clipping), their derivatives, and Muon + QK-Clip — all against float64 references."
    )

    console.print(Rule("1. accuracy against float64 oracles (matfn report --quick)"))
    sections = report.run_report(device, args.sizes, quick=True, console=console)
    report.render_rich(sections, console)
    files += report.save(sections, out, env)

    console.print(Rule("2. speed against torch baselines (matfn bench --quick)"))
    files += bench.main(device, args.sizes, True, out, console)

    console.print(Rule("3. singular-value maps of the Newton–Schulz schedules"))
    with report.blas_one_thread():
        files.append(plot_schedules(out, device))
    console.print(f"wrote {files[-1]}")

    steps = args.train_steps or (100 if args.quick else 300)
    console.print(Rule(f"4. tiny transformer: AdamW vs Muon vs Muon + QK-Clip ({steps} steps)"))
    files += _train_section(args, steps, device, out, console)

    console.print(Rule("done"))
    console.print(f"All output is in [bold]{out.resolve()}[/]:")
    for f in files:
        console.print(f"  {f.name}")
    return files
