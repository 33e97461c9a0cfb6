"""The ``matfn`` command line: each subcommand runs in quick mode and writes its files."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import matfn
from matfn.cli import main
from matfn.cli.toy_model import load_corpus, train_lm

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def one_thread():
    # CI runs two pytest workers on two cores; more threads only oversubscribe.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cells(section: dict) -> list:
    return [v for row in section["rows"] for v in row["cells"].values()]


def test_report_quick_writes_tables(tmp_path, capsys):
    main(
        [
            "report",
            "--quick",
            "--sizes",
            "16",
            "--no-progress",
            "--markdown",
            "--out",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "report.json").read_text())
    assert (tmp_path / "report.md").read_text().count("| method |") >= 3
    sections = {s["title"].split(":")[0]: s for s in data["sections"]}
    # Every public function the report knows about is either measured or explicitly skipped.
    for name in ("msign", "mcsgn", "mclip"):
        assert name in sections and not sections[name]["skipped"], name
    for name, needs in (("solve_sylvester", "solve_sylvester"), ("tri_inv / tri_solve", "tri_inv")):
        skipped = bool(sections[name]["skipped"]) if name in sections else True
        assert skipped == (not hasattr(matfn, needs)), name
    msign = sections["msign"]
    rows = {(r["method"], r["dtype"]): r["cells"] for r in msign["rows"]}
    # No method crashed on well-posed input (errors would be strings).
    assert all(isinstance(v, list) for v in _cells(msign))
    # The exact path and the converged iteration agree with the float64 oracle to float32
    # rounding (16×32: ~1e-6); 5 steps of Keller's quintic stay in its ±0.3 band, not at 1.
    for label in ("svd", "polar_express (auto)"):
        for case in msign["cases"]:
            sigma_err, frob_err = rows[(label, "float32")][case]
            assert sigma_err < 1e-4 and frob_err < 1e-4, (label, case)
    assert rows[("keller (5)", "float32")]["κ=10"][0] > 0.1
    # bf16 iteration: the rounding floor, not float32 accuracy (and not garbage).
    assert 1e-4 < rows[("polar_express (auto)", "bfloat16")]["κ=10"][0] < 5e-2
    mclip = sections["mclip"]
    for row in mclip["rows"]:
        if row["dtype"] == "float32" and "auto" in row["method"]:
            for v in row["cells"].values():
                assert v[0] < 1e-3, row
    # float64 solvers agree with the scipy/SVD references to ~1e-14 on these well-conditioned
    # inputs; 1e-9 leaves room for conditioning without accepting a wrong formula (error ~1).
    for name in ("solve_sylvester", "msign_jvp / msign_vjp", "tri_inv / tri_solve"):
        sec = sections.get(name)
        if sec is None or sec["skipped"]:
            continue
        for row in sec["rows"]:
            if row["dtype"] == "float64":
                assert all(isinstance(v, list) and v[0] < 1e-9 for v in row["cells"].values()), row
    assert "msign: polar factor" in out and "κ=1000" in out


def test_coeffs_prints_and_plots(tmp_path, capsys):
    argv = ["coeffs", "--steps", "5", "--lower", "1e-3", "--safety", "1.02"]
    main([*argv, "--out", str(tmp_path)])
    out = capsys.readouterr().out
    # The modded-nanogpt table's first triple (see polar_express_coefficients' docstring).
    assert "8.156555" in out and "-22.483293" in out
    png = tmp_path / "polar_express_T5_lower0.001.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_coeffs_bad_lower_is_a_clean_error(tmp_path, capsys):
    # More flags and messages in test_cli_args.py.
    with pytest.raises(SystemExit) as exc:
        main(["coeffs", "--steps", "5", "--lower", "2", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "argument --lower: must lie in (0, 1), got '2'" in capsys.readouterr().err


def test_bench_quick(tmp_path):
    main(["bench", "--quick", "--sizes", "32", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "bench.json").read_text())
    ops = {r["op"] for r in data["rows"]}
    assert "msign (polar_express, 5)" in ops and "mcsgn (auto, fp32)" in ops
    assert all(r["matfn_ms"] > 0 and r["baseline_ms"] > 0 for r in data["rows"])
    assert (tmp_path / "bench.md").read_text().startswith("**matfn bench")


def test_demo_quick_writes_everything(tmp_path, capsys):
    main(["demo", "--out", str(tmp_path), "--train-steps", "4", "--sizes", "16"])
    out = capsys.readouterr().out
    for name in (
        "report.json",
        "report.md",
        "bench.json",
        "bench.md",
        "schedules.png",
        "training_loss.png",
        "max_logit.png",
        "training.json",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    runs = json.loads((tmp_path / "training.json").read_text())["runs"]
    assert [len(r["loss"]) for r in runs] == [4, 4, 4]
    assert all(math.isfinite(v) for r in runs for v in r["loss"] + r["max_logit"])
    assert str(tmp_path.resolve()) in out.replace("\n", "")


def test_qk_clip_caps_the_max_logit_of_the_toy_model():
    text = load_corpus()[0][:20000]
    kw = dict(steps=8, dim=32, num_heads=2, layers=1, batch=4, seq=32, text=text, lr=0.05)
    free = train_lm("muon", "muon", **kw)
    capped = train_lm("muon+clip", "muon", qk_clip_tau=0.5, **kw)
    assert free.loss[0] == capped.loss[0]  # same weights and batches before any clipping
    assert capped.clipped_steps >= 1
    # γ = τ/S is applied after each step, so from the second step on the forward sees logits
    # near τ (plus one update's growth), while the free run keeps growing past it.
    tau = 0.5
    assert all(c < f for c, f in zip(capped.max_logit[2:], free.max_logit[2:], strict=True))
    assert max(capped.max_logit[2:]) < 1.5 * tau
    assert free.max_logit[-1] > 3 * tau


def test_entry_points_and_import_weight():
    code = (
        "import sys, matfn\n"
        "assert not [m for m in sys.modules if m.startswith(('matfn.cli', 'optim'))]\n"
        "import matfn.cli\n"
        "heavy = [m for m in ('rich', 'matplotlib', 'scipy', 'triton') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "import runpy; sys.argv = ['matfn', '--help']\n"
        "runpy.run_module('matfn', run_name='__main__')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    for cmd in ("report", "coeffs", "bench", "demo"):
        assert cmd in res.stdout
