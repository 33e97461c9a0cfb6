"""Imports flow one way: no cycle among matfn's modules, and no matfn import inside a function.

Parsed with ``ast`` (nothing is imported): module-level and function-level imports, an import
of ``a.b.c`` counting as one of the package ``a.b`` too (its ``__init__`` runs first). The one
lazy import of Triton kernel modules is :func:`matfn._backend.triton_module` (``importlib``).
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
#: Modules that must not import a matfn/optim module inside a function.
ONE_WAY = (
    "matfn",
    "matfn._backend",
    "matfn._batching",
    "matfn._graphs",
    "matfn._validation",
    "matfn.coefficients",
    "matfn.derivatives",
    "matfn.functional",
    "matfn.mclip",
    "matfn.mcsgn",
    "matfn.oracles",
    "matfn.sylvester",
    "matfn.kernels",
    "matfn.kernels._tables",
    "matfn.kernels._tiles",
    "matfn.kernels.launch",
    "matfn.kernels.matmul",
    "matfn.kernels.matmul_tma",
    "matfn.kernels.recording",
    "matfn.msign",
    "matfn.msign.grouped",
    "matfn.msign.path",
    "matfn.msign.reference",
    "matfn.msign.triton",
)


def _modules() -> dict[str, tuple[pathlib.Path, bool]]:
    mods = {}
    for path in (ROOT / "matfn").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        package = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if package else parts)] = (path, package)
    return mods


def _imports(mod: str, path: pathlib.Path, package: bool, mods) -> list[tuple[str, bool]]:
    """``(imported module, inside a function)`` for every matfn/optim import of ``mod``."""
    tree = ast.parse(path.read_text())
    nested = {
        id(sub)
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for sub in ast.walk(node)
    }
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".")[: None if package else -1]
                base = base[: len(base) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names = [f"{base}.{a.name}" for a in node.names]
            targets = [n if n in mods else base for n in names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] in ("matfn", "optim"):
                out.append((target, id(node) in nested))
    return out


def _graph():
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    lazy = []
    for mod, (path, package) in mods.items():
        for target, inside in _imports(mod, path, package, mods):
            parts = target.split(".")
            for k in range(2, len(parts) + 1):  # the module and its packages below matfn
                dep = ".".join(parts[:k])
                if dep in mods and dep != mod and not mod.startswith(dep + "."):
                    edges[mod].add(dep)
            if inside:
                lazy.append((mod, target))
    return edges, lazy


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    edges, _ = _graph()
    assert _cycles(edges) == []


def test_no_function_level_imports_in_the_library():
    _, lazy = _graph()
    assert [(m, t) for m, t in lazy if m in ONE_WAY] == []
