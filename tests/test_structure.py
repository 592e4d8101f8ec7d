"""The shape of the code: no import circle in mpd/, imports that run down its layers (the
master never imports the worker), no mixins (a part is a class that owns its state,
reached through an attribute), no class that re-declares another's methods as stubs, and
modules and functions small enough to read in one sitting. The caps guide: a part is never
split across files to meet them."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "mpd"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 50


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


# mpd's subpackages (and top-level modules) from the ground up: each imports only from
# the layers below its own, so that `ls mpd/` reads as the design, bottom to top.
LAYERS = [{"config"}, {"logs"}, {"system", "wire"}, {"apps"}, {"reloading"},
          {"worker", "ops"}, {"master"}, {"start"}, {"cli", "ctl"}]
# Never, whatever the layers: the master is given the worker's loop (spawn.WorkerMain).
NEVER = [("master", "worker")]


def package_of(module: str) -> str:
    return module.split(".")[1]


def imports_against_the_layers(graph: dict[str, set[str]]) -> list[str]:
    layer = {package: n for n, packages in enumerate(LAYERS) for package in packages}
    wrong = []
    for module, imported in sorted(graph.items()):
        mine = package_of(module)
        for other in sorted(imported):
            theirs = package_of(other)
            if theirs != mine and (layer[theirs] >= layer[mine] or (mine, theirs) in NEVER):
                wrong.append(f"{module} imports {other}")
    return wrong


def test_every_import_runs_down_the_layers():
    graph = {m: i for m, i in import_graph().items() if m != "mpd"}
    assert {package_of(m) for m in graph} == set().union(*LAYERS)  # every package is placed
    assert imports_against_the_layers(graph) == []
    assert imports_against_the_layers({"mpd.master.a": {"mpd.worker.b"},  # it can fail
                                       "mpd.config.c": {"mpd.logs.d"}}) == [
        "mpd.config.c imports mpd.logs.d", "mpd.master.a imports mpd.worker.b"]


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


def classes() -> list[tuple[str, ast.ClassDef]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                found.append((f"{path.relative_to(ROOT)}:{node.lineno} {node.name}", node))
    return found


def base_names(cls: ast.ClassDef) -> list[str]:
    return [ast.unparse(base) for base in cls.bases]


def is_data_or_interface(cls: ast.ClassDef) -> bool:
    """A dataclass, a NamedTuple or a typing.Protocol: its annotations are its fields or
    what it asks of others, not another class's state."""
    decorators = [ast.unparse(d) for d in cls.decorator_list]
    return any(d.startswith("dataclass") for d in decorators) or any(
        b in ("NamedTuple", "Protocol", "Interface", "_Interface") or b.endswith(".Protocol")
        for b in base_names(cls))


def test_no_mixins_and_no_stubs_of_another_files_methods():
    found = classes()
    assert any(name.endswith(" Worker") for name, _ in found)  # it reads the classes
    mixins = [name for name, cls in found  # an interface may gather interfaces
              if len(base_names(cls)) > 1 and not is_data_or_interface(cls)]
    assert mixins == []
    stubs = [f"{name}.{ast.unparse(node.target)}" for name, cls in found
             if not is_data_or_interface(cls)
             for node in cls.body if isinstance(node, ast.AnnAssign) and node.value is None
             and "Callable" in ast.unparse(node.annotation)]
    assert stubs == []
