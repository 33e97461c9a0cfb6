"""The package's architecture as tests: imports flow one way, light imports, references resolve.

- Module imports (top-level and inside functions) of ``matfn`` and ``optim`` form no cycle.
- Inside functions, only Triton kernel modules (which import ``triton`` at their top) may be
  imported lazily, so that ``import matfn`` stays free of Triton; nothing else hides a cycle.
- The library never imports the command-line application (``matfn.cli``), and ``matfn`` never
  imports ``optim``; ``optim`` uses ``matfn``'s public API, ``matfn.functional`` and the kernel
  modules declared for it.
- ``import matfn, optim`` loads neither triton, scipy nor matplotlib.
- The only environment switch is ``MATFN_DISABLE_TRITON``.
- Every ``docs/math.md §N`` cited from code or docs names a section of docs/math.md, and no
  file cites notes that are not in the repository.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("matfn", "optim")
#: What optim may import from matfn: the public API, the declared building blocks and the
#: kernel modules of its own passes.
OPTIM_MAY_IMPORT = (
    "matfn",
    "matfn.functional",
    "matfn.kernels.elementwise",
    "matfn.kernels.max_logit",
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {
        _module_name(p): p
        for pkg in PACKAGES
        for p in sorted((ROOT / pkg).rglob("*.py"))
        if "__pycache__" not in p.parts
    }


MODULES = _modules()


def _resolve(module: str, path: Path, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The project modules an import statement loads (an imported name that is a submodule
    counts as that submodule)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] in PACKAGES]
    if node.level:
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{node.module}" if node.module else package
    else:
        base = node.module or ""
    if base.split(".")[0] not in PACKAGES:
        return []
    out = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        out.append(sub if sub in MODULES else base)
    return out


def _imports() -> dict[str, list[tuple[str, bool, int]]]:
    """module -> [(imported module, inside a function, line)]."""
    edges: dict[str, list[tuple[str, bool, int]]] = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        found: list[tuple[str, bool, int]] = []

        def visit(node: ast.AST, nested: bool) -> None:
            for child in ast.iter_child_nodes(node):
                inner = nested or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
                if isinstance(child, ast.Import | ast.ImportFrom):
                    for target in _resolve(module, path, child):
                        if target != module:
                            found.append((target, nested, child.lineno))
                visit(child, inner)

        visit(tree, False)
        edges[module] = found
    return edges


EDGES = _imports()
LIBRARY = [m for m in MODULES if not (m == "matfn.__main__" or m.startswith("matfn.cli"))]


def _loads_triton(module: str, seen: frozenset = frozenset()) -> bool:
    """Whether importing ``module`` imports triton (its own top-level imports, transitively)."""
    tree = ast.parse(MODULES[module].read_text())
    for node in tree.body:
        if isinstance(node, ast.Import) and any(a.name == "triton" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "triton":
            return True
    return any(
        _loads_triton(t, seen | {module})
        for t, nested, _ in EDGES[module]
        if not nested and t in MODULES and t not in seen
    )


def test_no_import_cycles():
    graph = {m: {t for t, _, _ in EDGES[m] if t in MODULES} for m in LIBRARY}
    # a package's __init__ importing its own submodules is how packages are built; a submodule
    # importing its package's __init__ back (or anything that does) is the cycle we forbid.
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def dfs(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t) :] + [t])
            elif t in graph and not state.get(t):
                dfs(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if not state.get(m):
            dfs(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_function_level_imports_are_only_lazy_triton_kernels():
    bad = [
        f"{MODULES[m].relative_to(ROOT)}:{line} imports {t}"
        for m in LIBRARY
        for t, nested, line in EDGES[m]
        if nested and not (t in MODULES and _loads_triton(t))
    ]
    assert not bad, "function-level imports of project modules:\n" + "\n".join(bad)


def test_library_never_imports_the_cli_and_matfn_never_imports_optim():
    bad = []
    for m in LIBRARY:
        for t, _, line in EDGES[m]:
            if t.startswith("matfn.cli") or (m.startswith("matfn") and t.startswith("optim")):
                bad.append(f"{MODULES[m].relative_to(ROOT)}:{line} imports {t}")
    assert not bad, "\n".join(bad)


def test_optim_uses_only_the_declared_matfn_api():
    bad = [
        f"{MODULES[m].relative_to(ROOT)}:{line} imports {t}"
        for m in LIBRARY
        if m.startswith("optim")
        for t, _, line in EDGES[m]
        if t.startswith("matfn") and t not in OPTIM_MAY_IMPORT
    ]
    assert not bad, "\n".join(bad)


def test_import_is_light():
    code = (
        "import sys, matfn, optim; "
        "heavy = [m for m in ('triton', 'scipy', 'matplotlib') if m in sys.modules]; "
        "print(heavy); sys.exit(bool(heavy))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_one_environment_switch():
    pattern = re.compile(r"MATFN_[A-Z_]+")
    found = {
        name
        for m in LIBRARY
        for name in pattern.findall(MODULES[m].read_text())
        if "environ" in MODULES[m].read_text()
    }
    assert found <= {"MATFN_DISABLE_TRITON"}, found


def _cited_files() -> list[Path]:
    files = [p for pkg in (*PACKAGES, "benchmarks", "tests") for p in (ROOT / pkg).rglob("*.py")]
    files += [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [p for p in files if "__pycache__" not in p.parts and p.name != "test_layout.py"]


def test_no_references_to_notes_outside_the_repository():
    pattern = re.compile(r"math[ -]spec|CONVENTIONS\.md|DESIGN\.md|shared/", re.IGNORECASE)
    bad = [
        f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
        for p in _cited_files()
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not bad, "\n".join(bad)


def test_math_references_resolve():
    math_md = ROOT / "docs" / "math.md"
    if not math_md.exists():
        pytest.fail("docs/math.md is missing")
    headings = [line for line in math_md.read_text().splitlines() if line.startswith("#")]
    numbers = {m.group(1) for h in headings for m in [re.match(r"#+\s*(\d+(?:\.\d+)?)", h)] if m}
    cite = re.compile(r"docs/math\.md[,]? §\s*(\d+(?:\.\d+)?)")
    bad = [
        f"{p.relative_to(ROOT)}: §{n}"
        for p in _cited_files()
        for n in cite.findall(p.read_text())
        if n not in numbers
    ]
    assert not bad, "citations of missing docs/math.md sections:\n" + "\n".join(sorted(set(bad)))
