"""The package is layered: no module imports one of a higher layer, and no modules import
each other in a circle.

Layers, low to high: the blocks (tiling, permutations, encoder, attention, pretext,
classifier, checkpoint, metrics) < data < explain, export, probe < engine < cli. The package
root is the public face above them all (nothing inside the package imports it).
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "patchssl"

LAYERS: dict[str, int] = {
    **dict.fromkeys(
        [
            "_version",
            "_optional",
            "_validation",
            "_lazy",
            "tiling",
            "permutations",
            "encoder",
            "attention",
            "pretext",
            "classifier",
            "checkpoint",
            "metrics",
        ],
        0,
    ),
    "data": 1,
    **dict.fromkeys(["explain", "export", "probe"], 2),
    "engine": 3,
    **dict.fromkeys(["cli", "__main__"], 4),
    "": 5,  # the package root
}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


MODULES = _modules()


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    assert top in LAYERS, f"{module}: give its part of the package a layer in LAYERS"
    return LAYERS[top]


def _resolve(name: str) -> str:
    """The module of the package that an imported dotted name lives in."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _imports(module: str) -> dict[str, int]:
    """Modules of the package that ``module`` imports (anywhere in it), with a line each."""
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name == "patchssl" or name.startswith("patchssl."):
                target = _resolve(name)
                if target != module:
                    found.setdefault(target, node.lineno)
    return found


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_imports(module):
    importlib.import_module(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_from_a_higher_layer(module):
    own = _layer(module)
    wrong = {
        f"{target} (line {line})": _layer(target)
        for target, line in _imports(module).items()
        if _layer(target) > own
    }
    assert not wrong, f"{module} (layer {own}) imports higher layers: {wrong}"


def test_no_import_cycles():
    # A package importing its own submodules (to re-export their names) is no cycle.
    graph = {
        module: {
            target
            for target in _imports(module)
            if not (module == "patchssl" or target.startswith(module + "."))
        }
        for module in MODULES
    }
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = [*path[path.index(module) :], module]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        for target in sorted(graph[module]):
            visit(target, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
