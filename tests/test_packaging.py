"""The distribution as users install it: a wheel built from this checkout, read back."""

from __future__ import annotations

import email
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.fail(f"building the wheel failed:\n{result.stdout}\n{result.stderr}")
    (path,) = out.glob("matfn-*.whl")
    return zipfile.ZipFile(path)


def _metadata(wheel: zipfile.ZipFile) -> email.message.Message:
    (name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    return email.message_from_bytes(wheel.read(name))


def test_licence_is_spdx_and_shipped(wheel):
    meta = _metadata(wheel)
    assert meta["License-Expression"] == "MIT"
    assert any(n.endswith("licenses/LICENSE") for n in wheel.namelist())


def test_metadata_for_an_index(wheel):
    meta = _metadata(wheel)
    classifiers = meta.get_all("Classifier")
    assert "Typing :: Typed" in classifiers
    assert any(c.startswith("Programming Language :: Python :: 3.1") for c in classifiers)
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL"))
    assert {"Homepage", "Documentation", "Source", "Issues"} <= set(urls)
    assert meta["Requires-Python"] == ">=3.10"


def test_typed_packages(wheel):
    names = set(wheel.namelist())
    assert {"matfn/py.typed", "optim/py.typed"} <= names


def test_base_install_needs_torch_and_numpy_only(wheel):
    base = [r for r in _metadata(wheel).get_all("Requires-Dist") if "extra ==" not in r]
    assert sorted(r.split(">")[0].split("=")[0].split(";")[0].strip() for r in base) == [
        "numpy",
        "torch",
    ]


def test_extras_list_what_is_imported(wheel):
    reqs = _metadata(wheel).get_all("Requires-Dist")

    def extra(name: str) -> list[str]:
        return [r for r in reqs if f'extra == "{name}"' in r]

    report = " ".join(extra("report"))
    assert "rich" in report and "matplotlib" in report and "scipy" in report
    assert "tqdm" not in report and "scikit-learn" not in report
    # every GPU peer carries a marker, so `pip install matfn[bench]` works wherever it installs
    for r in extra("bench"):
        if not r.startswith("heavyball"):
            assert "platform_machine" in r, r
    assert any('python_version >= "3.12"' in r for r in extra("bench") if "emerging" in r)


def test_wheel_ships_the_library_not_the_tests(wheel):
    tops = {n.split("/")[0] for n in wheel.namelist()}
    assert "tests" not in tops and "benchmarks" not in tops
    assert {"matfn", "optim"} <= tops
