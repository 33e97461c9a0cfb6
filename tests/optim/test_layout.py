"""optim's import rules: matfn's declared API only, no cycles, no Triton at import time."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import optim

OPTIM = pathlib.Path(optim.__file__).parent
#: What optim may import from matfn (matfn.functional is its declared interface).
ALLOWED_MATFN = {
    "matfn",
    "matfn.functional",
    "matfn.kernels.elementwise",
    "matfn.kernels.max_logit",
}


def _imports(path: pathlib.Path) -> list[tuple[ast.AST, str, bool]]:
    """``(node, absolute module, inside a function)`` for every import of ``path``."""
    tree = ast.parse(path.read_text())
    in_function = set()
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            in_function.update(id(n) for n in ast.walk(fn))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = "optim"
                names = [f"{base}.{node.module}"] if node.module else []
                names += [
                    f"{base}.{node.module or ''}.{a.name}".replace("..", ".") for a in node.names
                ]
            else:
                names = [node.module or ""]
        else:
            continue
        out += [(node, name, id(node) in in_function) for name in names]
    return out


def _modules() -> dict[str, pathlib.Path]:
    return {("optim" if f.stem == "__init__" else f"optim.{f.stem}"): f for f in OPTIM.glob("*.py")}


def test_optim_imports_only_the_declared_matfn_api_at_module_level():
    for name, path in _modules().items():
        for _, mod, inside in _imports(path):
            if mod.startswith(("matfn", "optim")):
                assert not inside, f"{name}: function-level import of {mod}"
            if mod.startswith("matfn"):
                assert mod in ALLOWED_MATFN, f"{name} imports {mod}"


def test_no_import_cycle_inside_optim():
    modules = _modules()
    graph = {
        name: {m for _, m, _ in _imports(path) if m in modules and m != name}
        for name, path in modules.items()
    }

    def visit(node: str, stack: list[str]) -> None:
        for dep in graph[node]:
            assert dep not in stack, f"import cycle: {' -> '.join([*stack, dep])}"
            visit(dep, [*stack, dep])

    for name in graph:
        visit(name, [name])


def test_import_optim_does_not_import_triton():
    code = "import optim, sys; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=OPTIM.parent)
