"""The API reference builds with warnings as errors and covers the public API.

Skipped unless the ``docs`` extra is installed (``pip install -e ".[docs]"``; ``make test``'s
venv has it). CI also runs ``make docs``; this test keeps the reference covered by ``make test``
and checks what the build alone does not: every name a public ``__all__`` exports is rendered.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mkdocs")
pytest.importorskip("mkdocstrings")
pytest.importorskip("mkdocstrings_handlers.python")
pytest.importorskip("material")

ROOT = Path(__file__).resolve().parents[1]

# module source -> the API page that must render every name of its __all__
COVERED = {
    "matfn/__init__.py": "api/matfn/index.html",
    "matfn/coefficients.py": "api/matfn/index.html",
    "matfn/oracles.py": "api/matfn/index.html",
    "optim/__init__.py": "api/optim/index.html",
}


def _all_names(source: Path) -> list[str]:
    for node in ast.parse(source.read_text()).body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            return list(ast.literal_eval(node.value))
    raise AssertionError(f"{source} has no __all__")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, "mkdocs build --strict failed:\n" + proc.stdout + proc.stderr
    return out


def test_docs_build_strict(site: Path) -> None:
    for page in ["index.html", "api/matfn/index.html", "api/optim/index.html"]:
        assert (site / page).is_file(), page


@pytest.mark.parametrize("source", sorted(COVERED))
def test_public_names_are_documented(site: Path, source: str) -> None:
    html = (site / COVERED[source]).read_text()
    anchors = set(re.findall(r'<h[1-6] id="([^"]+)"', html))
    missing = [
        name
        for name in _all_names(ROOT / source)
        if not any(a == name or a.endswith("." + name) for a in anchors)
    ]
    assert not missing, f"{source}: __all__ names missing from {COVERED[source]}: {missing}"
