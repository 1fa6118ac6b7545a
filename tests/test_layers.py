"""The package's import graph, built with ``ast``: no cycle, no upward or sideways import, no private name
imported across modules. ``python tests/test_layers.py`` prints the graph layer by layer."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "cir_plugins"

# Bottom first. A module may import from its own unit and from the layers below its own, nothing else.
LAYERS = [
    ["cir_plugins", "errors"],
    ["_utils", "_atomic", "_console", "_loading", "_config"],
    ["protocol"],
    ["checks"],
    ["similarity"],
    ["data"],
    ["embedding"],
    ["metrics", "stats"],
    ["evaluation"],
    ["submission"],
    ["positives", "negatives"],
    ["training"],
    ["trained", "convert"],
    ["serve", "recipes", "share", "report"],
    ["cli"],
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[0] if len(parts) == 1 else parts[1]


def imports() -> list[tuple[str, str, str, int]]:
    """(importing module, imported module, name or "*", line) for every import of the package, at any depth."""
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    found = []
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
                if not target or not target.startswith("cir_plugins"):
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in modules:  # `from . import similarity`: the module itself
                        found.append((module, sub, "*", node.lineno))
                        aliases[alias.asname or alias.name] = sub
                    else:
                        found.append((module, target, alias.name, node.lineno))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("cir_plugins"):
                        found.append((module, alias.name, "*", node.lineno))
                        aliases[alias.asname or alias.name] = alias.name
        for node in ast.walk(tree):  # M._private through a module alias
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                found.append((module, aliases[node.value.id], node.attr, node.lineno))
    return [f for f in found if f[0] != f[1]]


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_every_unit_has_a_layer():
    units = {unit_of(module_name(p)) for p in ROOT.rglob("*.py")}
    assert units - set(RANK) == set(), "give each new module or package a layer in LAYERS"


def upward(found) -> list[str]:
    """The imports of a unit at its own layer or above (sideways or upward)."""
    return [f"{a}:{line} imports {b}" for a, b, _, line in found
            if unit_of(a) != unit_of(b) and RANK[unit_of(b)] >= RANK[unit_of(a)]]


def private_imports(found) -> list[str]:
    """The private names one module takes from another."""
    return [f"{a}:{line} takes {b}.{name}" for a, b, name, line in found if _private(name)]


def cycles(found) -> list[list[str]]:
    """The import cycles: Tarjan's strongly connected components of more than one module."""
    graph: dict[str, set[str]] = {}
    for a, b, _, _ in found:
        graph.setdefault(a, set()).add(b)
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_upward_or_sideways_import():
    assert upward(imports()) == []


def test_no_private_name_imported_across_modules():
    assert private_imports(imports()) == []


def test_no_import_cycle():
    assert cycles(imports()) == []


def test_the_checks_catch_what_they_look_for(tmp_path, monkeypatch):
    """The walker and the three rules: a planted cycle, upward import and private import are all found."""
    pkg = tmp_path / "cir_plugins"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("from .data.x import _hidden\n")
    (pkg / "data" / "x.py").write_text("from .. import errors\n_hidden = 1\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", pkg)
    found = imports()
    assert ("cir_plugins.errors", "cir_plugins.data.x", "_hidden", 1) in found
    assert ("cir_plugins.data.x", "cir_plugins.errors", "*", 1) in found
    assert upward(found) == ["cir_plugins.errors:1 imports cir_plugins.data.x"]
    assert private_imports(found) == ["cir_plugins.errors:1 takes cir_plugins.data.x._hidden"]
    assert cycles(found) == [["cir_plugins.data.x", "cir_plugins.errors"]]


if __name__ == "__main__":
    edges = sorted({(a, b) for a, b, _, _ in imports()})
    for rank, units in reversed(list(enumerate(LAYERS))):
        for unit in units:
            below = sorted({unit_of(b) for a, b in edges if unit_of(a) == unit and unit_of(b) != unit})
            print(f"layer {rank:2d}  {unit:12s} -> {', '.join(below) or '-'}")
