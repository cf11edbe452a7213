"""The package is a ladder of floors that imports only downward, and has no import circles.

The floors are the table under "### Floors" in the README's Layout section (the one source: this test
reads it). Every module of qlora_dist sits on exactly one floor; every import, function-level ones
included (an import hidden in a function is still a dependency), points to its own floor or a lower one.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "qlora_dist"
README = PACKAGE.parent / "README.md"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> dict[str, int]:
    """The qlora_dist modules `path` imports, each with the line of its first import (relative imports
    resolved; `from pkg import mod` counts mod)."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for name in names:
            if name in modules and name != here:
                found[name] = min(found.get(name, node.lineno), node.lineno)
    return found


def graph() -> dict[str, dict[str, int]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imports_of(f, modules) for f in files}


def floors(readme_text: str) -> list[tuple[str, list[str]]]:
    """The README's floors table, ground floor first: (floor name, its entries) — `name` a top-level
    module, `name/` a folder of modules."""
    section = readme_text.split("### Floors", 1)[1]
    rows = []
    for line in section.splitlines()[1:]:
        if rows and not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and re.fullmatch(r"\d+", cells[0]):
            rows.append((cells[1].split("`")[0].strip() or cells[1], re.findall(r"`([\w/]+)`", cells[2])))
    return rows


def floor_of(module: str, table: list[tuple[str, list[str]]]) -> int | None:
    """The floor of a qlora_dist module (the package's own __init__ is the ground)."""
    parts = module.split(".")[1:]
    if not parts:
        return 0
    for level, (_, entries) in enumerate(table):
        for entry in entries:
            if (entry.endswith("/") and parts[0] == entry[:-1]) or (len(parts) == 1 and parts[0] == entry):
                return level
    return None


def upward_imports(edges: dict[str, dict[str, int]], table) -> list[str]:
    """One message per import that points up a floor: file, line, both modules and both floors."""
    out = []
    for module, targets in sorted(edges.items()):
        here = floor_of(module, table)
        for target, line in sorted(targets.items()):
            there = floor_of(target, table)
            if here is not None and there is not None and there > here:
                path = module.replace(".", "/") + (".py" if not (PACKAGE.parent / module.replace(".", "/")).is_dir()
                                                   else "/__init__.py")
                out.append(f"{path}:{line}: imports {target}, which is on floor {there} ({table[there][0]}), "
                           f"from floor {here} ({table[here][0]}): imports may only point to the same floor or down")
    return out


def cycles(edges) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))
    for v in edges:
        if v not in index:
            visit(v)
    return out


@pytest.fixture(scope="module")
def table():
    return floors(README.read_text())


def test_every_module_has_one_floor(table):
    names = [entry for _, entries in table for entry in entries]
    assert len(table) >= 6 and len(names) == len(set(names)), names
    placed = {m: floor_of(m, table) for m in graph()}
    assert [m for m, level in placed.items() if level is None] == []
    print("\n".join(f"floor {i} {name}: {', '.join(entries)}" for i, (name, entries) in enumerate(table)))


def test_imports_only_point_down(table):
    edges = graph()
    arrows = sum(len(t) for t in edges.values())
    print(f"{len(edges)} modules, {arrows} import arrows, {len(table)} floors")
    assert upward_imports(edges, table) == []


def test_an_upward_import_is_named_with_file_line_and_floors(table):
    """The check can fail: config (foundations) importing the planner is reported with both floors."""
    edges = {m: dict(t) for m, t in graph().items()}
    edges["qlora_dist.config"]["qlora_dist.memory"] = 7
    found = upward_imports(edges, table)
    assert len(found) == 1
    assert re.fullmatch(r"qlora_dist/config\.py:7: imports qlora_dist\.memory, which is on floor 3 \(.+\), from "
                        r"floor 0 \(foundations\): imports may only point to the same floor or down", found[0]), found


def test_no_import_circles():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_top_level_lists_the_stages_and_errors_imports_nothing():
    top = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir() if p.name != "__pycache__"}
    assert {"data", "model", "train", "evaluate", "launch"} <= top
    assert {"config", "recipe", "memory", "preflight", "errors", "compat", "precision", "paths", "dist"} <= top
    tree = ast.parse((PACKAGE / "errors.py").read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
