"""Layers import only downwards, and no two modules import each other (directly or round a cycle).

The order (README "Layout"): errors -> files, profiling, config -> data -> prompts, evaluation -> runs -> sam
-> baselines -> train -> pipeline -> report -> experiment -> app -> cli -> __main__. Every ``import`` counts, at module level or
inside a function, so a cycle cannot hide behind a late import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "cxrsam"
LAYERS = [
    {"errors"},
    {"files", "profiling", "config"},
    {"data"},
    {"prompts", "evaluation"},
    {"runs"},
    {"sam"},
    {"baselines"},
    {"train"},
    {"pipeline"},
    {"report"},
    {"experiment"},
    {"app"},
    {"cli"},
    {"__main__"},
]
LAYER_OF = {part: index for index, parts in enumerate(LAYERS) for part in parts}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The cxrsam modules ``path`` imports, anywhere in the file (relative imports resolved)."""
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("cxrsam")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.startswith("cxrsam"):
                found.add(base)
                found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: {m for m in imports(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def layer(module: str) -> int | None:
    parts = module.split(".")
    return None if len(parts) < 2 else LAYER_OF.get(parts[1])


def test_every_subpackage_has_a_layer():
    assert {name.split(".")[1] for name in MODULES if "." in name} <= set(LAYER_OF)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_only_downwards(module):
    own = layer(module)
    if own is None:  # the package root
        return
    upward = sorted(m for m in GRAPH[module] if layer(m) is not None and (
        layer(m) > own or (layer(m) == own and m.split(".")[1] != module.split(".")[1])))
    assert not upward, f"{module} (layer {own}) imports from the same or a higher layer: {upward}"


def test_no_import_cycles():
    """Tarjan's strongly connected components over every cxrsam import: each must be a single module
    (package ``__init__`` files re-exporting their own modules are not cycles)."""
    def edges(name: str) -> set[str]:
        return {m for m in GRAPH[name] if not (MODULES[m].name == "__init__.py" and name.startswith(m + "."))}

    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges(node):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for name in sorted(MODULES):
        if name not in index:
            visit(name)
    assert not cycles, f"import cycles: {cycles}"
