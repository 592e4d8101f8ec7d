"""Every config key says what a reload does with it (Key.applies in mpd/config/schema.py):
the workers apply it (live), the master alone does (master), or only a restart can
(restart). A key in none of these, a live key that no worker reads, or a master key that a
worker reads (its copy would go stale on reload) fails here."""

from __future__ import annotations

import ast
import signal
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
from conftest import ROOT

from mpd.config import schema as configmod
from mpd.config.schema import LIVE, MASTER, RESTART, SCHEMA, Key

PACKAGE = ROOT / "mpd"
# What runs in a worker, and what runs in the master only.
WORKER_SIDE = [*(PACKAGE / "worker").glob("*.py"), *(PACKAGE / "logs").glob("*.py"),
               *(PACKAGE / "apps").glob("*.py")]
MASTER_SIDE = [*(PACKAGE / "master").glob("*.py"), *(PACKAGE / "ops").glob("*.py"),
               PACKAGE / "reloading.py", PACKAGE / "config" / "access.py"]


def unclassified(keys: Iterable[Key]) -> list[str]:
    return [key.dotted for key in keys if key.applies not in (LIVE, MASTER, RESTART)]


def config_reads(paths: Iterable[Path]) -> set[str]:
    """The Config attributes these modules read (`config.x`, `self.config.x`), with what
    the Config methods and properties they call read in turn (`self.x` in schema.py)."""
    reads: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and (
                    isinstance(node.value, ast.Name) and node.value.id == "config"
                    or isinstance(node.value, ast.Attribute) and node.value.attr == "config"):
                reads.add(node.attr)
    tree = ast.parse((PACKAGE / "config" / "schema.py").read_text())
    config_class = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Config")
    for method in config_class.body:
        if isinstance(method, ast.FunctionDef) and method.name in reads:
            reads |= {n.attr for n in ast.walk(method) if isinstance(n, ast.Attribute)
                      and isinstance(n.value, ast.Name) and n.value.id == "self"}
    return reads


def keys(applies: str) -> set[str]:
    return {key.attr for key in SCHEMA if key.applies == applies}


def test_every_key_is_classified():
    assert unclassified(SCHEMA) == []
    assert len(SCHEMA) > 30 and keys(LIVE) and keys(MASTER) and keys(RESTART)
    stray = Key("server", "new_thing", 1, int, "", "A key someone forgot to classify.")
    assert unclassified([*SCHEMA, stray]) == ["server.new_thing"]  # the check can fail


def test_the_live_keys_are_what_a_worker_reads_and_a_master_key_is_no_worker_s():
    read_in_workers = config_reads(WORKER_SIDE)
    assert "idle_timeout" in read_in_workers and "max_clients" in read_in_workers  # it reads
    assert sorted(keys(LIVE) - read_in_workers) == []  # sent to workers that never read it
    assert sorted(keys(MASTER) & read_in_workers) == []  # a worker's copy would go stale


def test_a_master_key_is_read_by_the_master():
    assert sorted(keys(MASTER) - config_reads(MASTER_SIDE)) == []


def test_reload_refuses_a_restart_key_and_takes_the_others(tmp_path):
    path = tmp_path / "mpd.toml"
    path.write_text("[workers]\nidle_timeout = 5\n")
    current = configmod.load(str(path))
    path.write_text("[workers]\nidle_timeout = 6\nworker_timeout = 9\n[control]\n"
                    "allow_uids = [1234]\n")
    new = configmod.reload(current)
    assert (new.idle_timeout, new.worker_timeout, new.allow_uids) == (6, 9, (1234,))
    assert new.generation == current.generation + 1
    path.write_text("[workers]\nidle_timeout = 6\n[server]\nbacklog = 7\n[daemon]\n"
                    "pidfile = \"/tmp/x.pid\"\n")
    with pytest.raises(configmod.ConfigError, match="need a restart: backlog, pidfile"):
        configmod.reload(current)


def test_a_reload_reaches_running_workers_and_says_what_changed(mpd_factory):
    server = mpd_factory({"workers": {"workers": 2, "first_frame_timeout": 30}})
    quiet = server.connect()  # sends nothing: closed once the reloaded timeout is over
    start = time.monotonic()
    server.write_config({**server.settings, "workers": {"workers": 2, "first_frame_timeout": 1,
                                                        "worker_timeout": 20}})
    server.signal(signal.SIGHUP)
    reloaded = server.wait_event("config.reloaded")
    assert reloaded["changed"] == ["workers.first_frame_timeout", "workers.worker_timeout"]
    quiet.settimeout(10)
    assert quiet.recv(10) == b""  # the worker that had it applied the live key...
    assert time.monotonic() - start < 5  # ...not the 30 s it started with
    timed_out = server.wait_event("client.timed_out")
    assert timed_out["first_frame"] == 1
    quiet.close()
