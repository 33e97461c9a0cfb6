"""The ``matfn`` command's flags and messages: ``--version``, argparse errors before any work,
and a one-line hint naming the extra when an optional package is missing.

The work functions are replaced by ones that fail the test when called, so "rejected before
any work starts" is checked directly rather than by timing.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import matfn
import matfn.cli as cli
from matfn.cli import args as cli_args
from matfn.cli import bench, demo, main, report

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ("report", "coeffs", "bench", "demo")


def _fail(*_args, **_kwargs):
    raise AssertionError("work started although the command line should have been rejected")


@pytest.fixture
def no_work(monkeypatch):
    """Every work function fails the test when called."""
    for name in ("cmd_report", "cmd_coeffs", "cmd_bench", "cmd_demo", "polar_express_coefficients"):
        monkeypatch.setattr(cli, name, _fail)
    monkeypatch.setattr(report, "run_report", _fail)
    monkeypatch.setattr(bench, "run_bench", _fail)
    monkeypatch.setattr(demo, "main", _fail)
    monkeypatch.setattr(torch, "set_num_threads", _fail)


@pytest.fixture
def record(monkeypatch):
    """Replace the subcommands by recorders; returns the list of parsed namespaces."""
    seen: list[argparse.Namespace] = []

    def rec(args, console=None):
        seen.append(args)
        return []

    for name in ("cmd_report", "cmd_coeffs", "cmd_bench", "cmd_demo"):
        monkeypatch.setattr(cli, name, rec)
    return seen


# --------------------------------------------------------------------------- --version


def test_version_flag_prints_the_installed_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"matfn {importlib.metadata.version('matfn')}\n"


def test_version_falls_back_to_dunder_version_when_not_installed(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert cli.version() == f"{matfn.__version__} (not installed)"
    monkeypatch.delattr(matfn, "__version__")
    assert cli.version() == "unknown (not installed)"


def test_version_through_python_m_matfn():
    res = subprocess.run(
        [sys.executable, "-m", "matfn", "--version"], cwd=ROOT, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("matfn ") and res.stdout.split()[1][0].isdigit()


# --------------------------------------------------------------------------- invalid flags

# (argv, flag named in the message, fragment of the expected range); {file} is a regular file.
INVALID = [
    (["--threads", "0", "report"], "--threads", ">= 1"),
    (["--threads", "two", "report"], "--threads", ">= 1"),
    (["report", "--sizes", "-3"], "--sizes", ">= 1"),
    (["report", "--sizes", "64", "0"], "--sizes", ">= 1"),
    (["report", "--sizes", "1.5"], "--sizes", ">= 1"),
    (["report", "--device", "tpu"], "--device", "auto, cpu, cuda"),
    (["report", "--out", "{file}"], "--out", "not a folder"),
    (["bench", "--sizes", "0"], "--sizes", ">= 1"),
    (["bench", "--device", "gpu"], "--device", "auto, cpu, cuda"),
    (["bench", "--out", "{file}/sub"], "--out", "not a folder"),
    (["coeffs", "--steps", "0", "--lower", "1e-3"], "--steps", "[1, 99]"),
    (["coeffs", "--steps", "100", "--lower", "1e-3"], "--steps", "[1, 99]"),
    (["coeffs", "--steps", "2.5", "--lower", "1e-3"], "--steps", "[1, 99]"),
    (["coeffs", "--steps", "5", "--lower", "0"], "--lower", "(0, 1)"),
    (["coeffs", "--steps", "5", "--lower", "1"], "--lower", "(0, 1)"),
    (["coeffs", "--steps", "5", "--lower", "2"], "--lower", "(0, 1)"),
    (["coeffs", "--steps", "5", "--lower", "nan"], "--lower", "(0, 1)"),
    (["coeffs", "--steps", "5", "--lower", "1e-320"], "--lower", "1e-300"),
    (["coeffs", "--steps", "5", "--lower", "1e-3", "--safety", "0.5"], "--safety", "[1, 10]"),
    (["coeffs", "--steps", "5", "--lower", "1e-3", "--safety", "inf"], "--safety", "[1, 10]"),
    (["coeffs", "--steps", "5", "--lower", "1e-3", "--safety", "1e300"], "--safety", "[1, 10]"),
    (["coeffs", "--steps", "5", "--lower", "1e-3", "--cushion", "-0.1"], "--cushion", "[0, 1)"),
    (["coeffs", "--steps", "5", "--lower", "1e-3", "--cushion", "1"], "--cushion", "[0, 1)"),
    (["coeffs", "--steps", "5", "--lower", "1e-3", "--out", "{file}"], "--out", "not a folder"),
    (["demo", "--tau", "-5"], "--tau", "> 0"),
    (["demo", "--tau", "0"], "--tau", "> 0"),
    (["demo", "--tau", "inf"], "--tau", "> 0"),
    (["demo", "--tau", "ten"], "--tau", "> 0"),
    (["demo", "--train-steps", "0"], "--train-steps", ">= 1"),
    (["demo", "--sizes", "-3"], "--sizes", ">= 1"),
    (["demo", "--device", "x"], "--device", "auto, cpu, cuda"),
    (["demo", "--out", "{file}"], "--out", "not a folder"),
]


@pytest.mark.parametrize(
    ("argv", "flag", "expected"), INVALID, ids=[" ".join(a) for a, _, _ in INVALID]
)
def test_invalid_flag_exits_2_before_any_work(argv, flag, expected, tmp_path, capsys, no_work):
    file = tmp_path / "a-file"
    file.write_text("")
    argv = [a.replace("{file}", str(file)) for a in argv]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {flag}:" in err, err
    assert expected in err, err
    assert "Traceback" not in err


def test_cuda_without_cuda_is_a_flag_error(monkeypatch, capsys, no_work):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for cmd in ("report", "bench", "demo"):
        with pytest.raises(SystemExit) as exc:
            main([cmd, "--device", "cuda"])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "argument --device:" in err and "torch.cuda.is_available() is False" in err


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write anywhere"
)
def test_unwritable_out_folder_is_a_flag_error(tmp_path, capsys, no_work):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        for argv in (["bench", "--out", str(locked)], ["bench", "--out", str(locked / "new")]):
            with pytest.raises(SystemExit) as exc:
                main(argv)
            assert exc.value.code == 2
            assert "not writable" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)


def test_missing_subcommand_is_a_usage_error(capsys, no_work):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    assert "required" in capsys.readouterr().err


# --------------------------------------------------------------------------- valid flags


def test_valid_flags_reach_the_command_converted(tmp_path, monkeypatch, record):
    threads: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    monkeypatch.chdir(tmp_path)
    new = tmp_path / "a" / "b"
    assert main(["--threads", "1", "report", "--sizes", "16", "32", "--out", str(new)]) == 0
    assert main(["bench", "--device", "cpu", "--sizes", "8", "--quick"]) == 0
    coeffs = ["coeffs", "--steps", "99", "--lower", "1e-300", "--safety", "10", "--cushion", "0"]
    assert main([*coeffs, "--out", str(tmp_path)]) == 0
    assert main(["demo", "--tau", "1e-3", "--train-steps", "1", "--device", "auto"]) == 0
    r, b, c, d = record
    assert r.sizes == [16, 32] and r.out == new and threads == [1]
    assert not new.exists()  # checked as creatable, created only by the command
    assert b.device == "cpu" and b.sizes == [8] and b.out is None
    assert (c.steps, c.lower, c.safety, c.cushion, c.out) == (99, 1e-300, 10.0, 0.0, tmp_path)
    assert d.tau == 1e-3 and d.train_steps == 1 and d.out == Path(cli.DEFAULT_DEMO_DIR)


# --------------------------------------------------------------------------- optional packages

NEEDS = [(cmd, name) for cmd in COMMANDS for name in cli_args.REQUIRES[cmd]]
ARGV = {
    "report": ["report", "--quick"],
    "coeffs": ["coeffs", "--steps", "3", "--lower", "0.1"],
    "bench": ["bench", "--quick"],
    "demo": ["demo", "--quick"],
}


@pytest.mark.parametrize(("cmd", "name"), NEEDS)
def test_missing_package_names_the_extra(cmd, name, tmp_path, monkeypatch, capsys, no_work):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError
    assert main(ARGV[cmd]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"matfn {cmd} needs the 'report' extra: pip install \"matfn[report]\" (missing: {name})\n"
    )


def test_several_missing_packages_are_listed(monkeypatch, capsys, no_work):
    monkeypatch.setitem(sys.modules, "rich", None)
    monkeypatch.setitem(sys.modules, "scipy", None)
    assert main(["report"]) == 2
    assert "(missing: rich, scipy)" in capsys.readouterr().err


def test_a_package_not_needed_by_the_command_is_not_required(monkeypatch, record):
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["bench", "--quick"]) == 0


def test_missing_package_found_while_running_names_the_extra(monkeypatch, capsys):
    def needs_scipy(args, console=None):
        raise ModuleNotFoundError("No module named 'scipy'", name="scipy.linalg")

    monkeypatch.setattr(cli, "cmd_report", needs_scipy)
    assert main(["report"]) == 2
    assert 'pip install "matfn[report]" (missing: scipy)' in capsys.readouterr().err

    def broken(args, console=None):
        raise ModuleNotFoundError("No module named 'not_an_extra'", name="not_an_extra")

    monkeypatch.setattr(cli, "cmd_report", broken)
    with pytest.raises(ModuleNotFoundError):
        main(["report"])


def test_cuda_without_triton_is_a_note_not_an_error(monkeypatch, capsys, record):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "triton", None)
    assert main(["bench", "--device", "cuda"]) == 0
    assert record[0].device == "cuda"
    assert 'pip install "matfn[triton]"' in capsys.readouterr().err


def test_missing_extra_exits_2_without_a_traceback():
    code = (
        "import sys, runpy\n"
        "sys.modules['rich'] = None\n"
        "sys.argv = ['matfn', 'report', '--quick']\n"
        "runpy.run_module('matfn', run_name='__main__')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr == (
        "matfn report needs the 'report' extra: pip install \"matfn[report]\" (missing: rich)\n"
    )
    assert res.stdout == ""
