"""The import graph of src/gigadiff against the layer table of docs/design.md: every import (top-level, inside a
function or under TYPE_CHECKING) goes to the same floor or a lower one, and no cycle exists between modules or
between subpackages."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src"
PACKAGE = "gigadiff"


def modules() -> dict[str, Path]:
    found = {}
    for path in (SOURCE / PACKAGE).rglob("*.py"):
        name = ".".join(path.relative_to(SOURCE).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the gigadiff modules it imports, anywhere in its text."""
    edges: dict[str, set[str]] = {name: set() for name in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target not in (name, PACKAGE):
                    edges[name].add(target)
    return edges


def floors() -> dict[str, int]:
    """Top-level module or subpackage -> its floor, from the table in docs/design.md."""
    text = (ROOT / "docs" / "design.md").read_text()
    table = {}
    for floor, cells in re.findall(r"^\| (\d+) \| [^|]+ \| (.+) \|$", text, flags=re.M):
        for part in re.findall(r"`([\w.]+)`", cells):
            assert part not in table, f"{part} is on two floors of the layer table"
            table[part] = int(floor)
    return table


def part(module: str) -> str:
    """The top-level module or subpackage a module belongs to (gigadiff.vae.tiled -> vae)."""
    return module.split(".")[1] if "." in module else module


def cycles(nodes: set[str], edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_floor():
    table = floors()
    parts = {part(m) for m in modules() if m != PACKAGE}
    assert parts == set(table), f"missing from the table: {parts - set(table)}; not modules: {set(table) - parts}"


def test_no_import_goes_up_a_floor():
    table, mods = floors(), modules()
    upward = [f"{a} (floor {table[part(a)]}) imports {b} (floor {table[part(b)]})"
              for a, targets in imports(mods).items() if a != PACKAGE
              for b in targets if table[part(b)] < table[part(a)]]  # fmt: skip
    assert not upward, "\n".join(upward)


def test_no_import_cycles_between_modules_or_subpackages():
    mods = modules()
    edges = imports(mods)
    assert cycles(set(mods), edges) == []
    grouped: dict[str, set[str]] = {}
    for a, targets in edges.items():
        grouped.setdefault(part(a), set()).update(part(b) for b in targets if part(b) != part(a))
    assert cycles(set(grouped), grouped) == []


def test_the_checker_sees_imports_inside_functions_and_under_type_checking(tmp_path, monkeypatch):
    """A cycle hidden in a function and an upward import under TYPE_CHECKING are both found."""
    pkg = tmp_path / "src" / PACKAGE
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from gigadiff import b\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from gigadiff.a import f\n")
    monkeypatch.setattr(sys.modules[__name__], "SOURCE", tmp_path / "src")
    mods = modules()
    edges = imports(mods)
    assert edges[f"{PACKAGE}.a"] == {f"{PACKAGE}.b"} and edges[f"{PACKAGE}.b"] == {f"{PACKAGE}.a"}
    assert cycles(set(mods), edges) == [[f"{PACKAGE}.a", f"{PACKAGE}.b"]]
