"""The layout keeps its promises: imports go one way, and functions stay readable.

Layers, top to bottom: remus.node (entry points, the only package that knows
both sides) -> remus.primary / remus.backup (a side's roles and devices) ->
remus.common (protocol, config, role-neutral devices and services). No side
imports the other, nothing imports upwards, no module is part of an import
cycle (imports inside functions count: they are still a dependency), and no
function is longer than MAX_FUNCTION_LINES.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"remus.node": "node", "remus.primary": "primary", "remus.backup": "backup",
            "remus.common": "common"}
# Which top-level package may import which (itself always).
MAY_IMPORT = {
    "remus.node": {"remus.primary", "remus.backup", "remus.common"},
    "remus.primary": {"remus.common"},
    "remus.backup": {"remus.common"},
    "remus.common": set(),
}
MAX_FUNCTION_LINES = 60


def module_sources(root: Path = ROOT) -> dict[str, str]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((package, *parts))] = path.read_text()
    return out


def _is_package(name: str, modules: dict[str, str]) -> bool:
    return any(m.startswith(name + ".") for m in modules)


def imports_of(name: str, source: str, modules: dict[str, str]) -> set[str]:
    """The project modules `name` imports, anywhere in its source."""
    found = set()
    package = name if _is_package(name, modules) else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
    return {m for m in found if m in modules and m != name}


def top_package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def layer_violations(modules: dict[str, str]) -> list[str]:
    out = []
    for name, source in modules.items():
        mine = top_package(name)
        for dep in sorted(imports_of(name, source, modules)):
            theirs = top_package(dep)
            if theirs != mine and theirs not in MAY_IMPORT.get(mine, set()):
                out.append(f"{name} imports {dep}")
    return out


def import_cycles(modules: dict[str, str]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph = {n: imports_of(n, s, modules) for n, s in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
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
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return cycles


def long_functions(modules: dict[str, str], limit: int = MAX_FUNCTION_LINES) -> list[str]:
    out = []
    for name, source in modules.items():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    out.append(f"{name}.{node.name} (line {node.lineno}): {lines} lines")
    return out


def test_no_import_crosses_the_layers():
    assert layer_violations(module_sources()) == []


def test_no_import_cycles():
    assert import_cycles(module_sources()) == []


def test_no_function_is_too_long_to_read_at_once():
    assert long_functions(module_sources()) == []


def test_every_module_is_scanned():
    modules = module_sources()
    for expected in ("remus.node.cli", "remus.primary.protecting", "remus.backup.standing_by",
                     "remus.common.node", "remus.common.roles"):
        assert expected in modules


# The checker itself, on made-up trees: each rule must catch what it is for.

def test_checker_sees_one_side_importing_the_other():
    modules = {"remus.primary.a": "from remus.backup.b import x\n",
               "remus.backup.b": "x = 1\n",
               "remus.common.c": "import remus.primary.a\n"}
    assert layer_violations(modules) == ["remus.primary.a imports remus.backup.b",
                                         "remus.common.c imports remus.primary.a"]


def test_checker_lets_entry_points_import_both_sides():
    modules = {"remus.node.cli": "from remus.primary import a\nfrom remus.backup.b import x\n",
               "remus.primary.a": "", "remus.backup.b": "x = 1\n"}
    assert layer_violations(modules) == []


def test_checker_sees_a_cycle_through_a_function_level_import():
    modules = {"remus.common.a": "from remus.common.b import f\n",
               "remus.common.b": "def f():\n    from remus.common import a\n",
               "remus.common.c": "from remus.common.a import g\n"}
    assert import_cycles(modules) == [["remus.common.a", "remus.common.b"]]


def test_checker_sees_a_cycle_through_a_package_init():
    modules = {"remus.common.p": "from remus.common.p.m import X\n",
               "remus.common.p.m": "from remus.common.p import Y\n"}
    assert import_cycles(modules) == [["remus.common.p", "remus.common.p.m"]]


def test_checker_resolves_relative_imports():
    modules = {"remus.common.p": "", "remus.common.p.m": "from . import n\n",
               "remus.common.p.n": "from .m import X\n"}
    assert import_cycles(modules) == [["remus.common.p.m", "remus.common.p.n"]]


def test_checker_measures_functions_from_def_to_last_line():
    def function(header: str, body_lines: int) -> str:
        return header + "".join(f"    x{i} = {i}\n" for i in range(body_lines))
    source = function("def just_fits():\n", 59) + function("async def one_too_many():\n", 60)
    assert long_functions({"remus.common.a": source}) == [
        "remus.common.a.one_too_many (line 61): 61 lines"]
