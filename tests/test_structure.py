"""The shape of the code: no import circle in mpd/, and modules and functions small
enough to read in one sitting (about 400 and 40 lines)."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "mpd"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 45


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The mpd modules `path` imports: at import time, lazily inside a function, or only
    for type checking (a circle of types is a circle for the reader too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name in modules and name != "mpd"}


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports(path, set(paths)) - {name} for name, path in paths.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every module that can reach itself, with one path that does."""
    found = []
    for start in sorted(graph):
        stack = [(start, [start])]
        seen: set[str] = set()
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph[node]):
                if nxt == start:
                    found.append([*path, start])
                    stack.clear()
                    break
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    return found


def test_no_import_circle_in_mpd():
    graph = import_graph()
    assert "mpd.master.broker" in graph["mpd.master.master"]  # it reads imports
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [
        ["a", "b", "c", "a"], ["b", "c", "a", "b"], ["c", "a", "b", "c"]]


def test_modules_and_functions_stay_small():
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if text.count("\n") > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: "
                                    f"{length} lines")
    assert too_long == []


# The Worker class and its parts.
WORKER_MODULES = ("worker.py", "serving.py", "handoff.py", "orders.py", "upkeep.py",
                  "proxyphase.py")


def test_a_worker_has_at_most_30_attributes():
    """CPython 3.11+ shares the keys of an object's first 30 attributes; past that every
    `self.x` on the worker's hot path costs more (35 attributes: a ping cost 3% more)."""
    names: set[str] = set()
    for module in WORKER_MODULES:
        tree = ast.parse((PACKAGE / "worker" / module).read_text())
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)
                    and n.name in ("Worker", "Serving", "Handover", "Orders", "Upkeep",
                                   "ProxyPhase")):
            for node in ast.walk(cls):
                if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    for target in targets:
                        for t in ast.walk(target):
                            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) \
                                    and t.value.id == "self":
                                names.add(t.attr)
    assert "conns" in names and "up" in names  # it reads the classes
    assert len(names) <= 30, sorted(names)
