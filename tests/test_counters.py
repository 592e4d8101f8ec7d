"""One counter table (mpd/wire/counters.py): no other module of mpd spells out a list of
counter names, the table's readers read it, and a real mpd reports every counter in it,
in `status`, in the metrics and in `mpd.stats`."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, ping, wait_until
from prometheus_client.parser import text_string_to_metric_families

from mpd.wire import counters

PACKAGE = ROOT / "mpd"
TABLE = PACKAGE / "wire" / "counters.py"
# The modules that must read the table rather than keep their own list.
READERS = ("master/tally.py", "ops/metrics.py", "ops/statsline.py", "ops/commands.py",
           "worker/worker.py")
COUNTED = {c.name for c in counters.COUNTERS if c.kind == counters.COUNTER}


def names_listed(tree: ast.AST) -> list[tuple[int, list[str]]]:
    """Each literal tuple, list, set or dict (its keys) that names two counters or more:
    directly, as the first item of its pairs, or as the first argument of its calls
    (Counter("requests", ...)): (line, the names)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            items = node.elts
        elif isinstance(node, ast.Dict):
            items = [k for k in node.keys if k is not None]
        else:
            continue
        named = []
        for item in items:
            if isinstance(item, (ast.Tuple, ast.List)) and item.elts:
                item = item.elts[0]  # a table of pairs: (name, header)
            elif isinstance(item, ast.Call) and item.args:
                item = item.args[0]
            if isinstance(item, ast.Constant) and item.value in COUNTED:
                named.append(item.value)
        if len(named) >= 2:
            found.append((node.lineno, named))
    return found


def imports_counters(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (
                node.module == "mpd.wire.counters"
                or node.module == "mpd.wire" and any(a.name == "counters" for a in node.names)):
            return True
    return False


def test_the_finder_finds_a_list_of_counter_names():
    """The check below must be able to fail: these are the lists the table replaced."""
    assert names_listed(ast.parse('T = ("accepted", "requests", "x")')) == [
        (1, ["accepted", "requests"])]
    assert len(names_listed(ast.parse('S = {"spilled": ("spilled",), "timeouts": '
                                      '("idle_timeouts", "first_frame_timeouts")}'))) == 1
    assert len(names_listed(ast.parse('C = (("adopted", "ADOPTED"), ("refused", "R"))'))) == 1
    assert names_listed(ast.parse('x = w["stats"].get("requests", 0)')) == []


def test_only_the_table_lists_the_counters():
    assert len(COUNTED) >= 12 and names_listed(ast.parse(TABLE.read_text()))  # it is there
    listed = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path != TABLE:
            found = names_listed(ast.parse(path.read_text()))
            if found:
                listed[str(path.relative_to(ROOT))] = found
    assert listed == {}


def test_every_reader_reads_the_table():
    assert [r for r in READERS if not imports_counters(PACKAGE / r)] == []
    assert not imports_counters(PACKAGE / "master" / "slots.py")  # the test can say no


def test_the_worker_starts_from_the_tables_zeroes():
    zeroed = counters.zeroed()
    assert set(zeroed) == {c.name for c in counters.COUNTERS if c.source == counters.WORKER}
    assert set(zeroed.values()) == {0} and "requests" in zeroed and "clients" not in zeroed


def test_a_running_mpd_reports_every_counter_of_the_table(mpd_factory):
    server = mpd_factory({"workers": {"workers": 2}})
    with server.connect() as sock:
        ping(sock)

    def ctl(*args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "mpd.ctl", "--config",
                                 str(server.config_path), *args],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        return result.stdout

    status = wait_until(lambda: (s := json.loads(ctl("--json", "status")))["totals"]
                        ["requests"] == 1 and s, what="the ping counted")
    for worker in status["workers"]:
        assert set(counters.reported()) <= set(worker), worker
    assert set(status["totals"]) >= COUNTED and all(set(s) >= COUNTED for s in status["slots"])
    shown = ctl("status").splitlines()
    header = next(line for line in shown if line.split()[:1] == ["SLOT"])
    assert all(c.column in header.split() for c in counters.COUNTERS if c.column)
    families = {f.name for f in text_string_to_metric_families(ctl("metrics"))}
    for c in counters.COUNTERS:
        if c.metric:
            assert f"mpd_slot_{c.metric}" in families, c.name
            assert f"mpd_{c.metric}" in families or not c.adds_up, c.name
