"""For the tests that run a real HAProxy (Debian's package): find or install it, and drive
scripts/cluster as a user would, reading what the mpd hosts logged."""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from conftest import ROOT

CLUSTER = ROOT / "scripts" / "cluster"
SHIPPED = ROOT / "packaging" / "haproxy" / "mpd.cfg"
_found: dict[str, str] = {}


def directives(path: Path, section: str) -> list[str]:
    """The directive lines of one section of an HAProxy config, comments stripped."""
    out, inside = [], False
    for line in path.read_text().splitlines():
        if line and not line[0].isspace():
            inside = line.split("#")[0].strip() == section
            continue
        code = line.split("#", 1)[0].strip()
        if inside and code:
            out.append(code)
    return out


def haproxy() -> str:
    """The haproxy binary; installed with apt-get when missing and we are root (as CI
    runs); else the test is skipped, saying why."""
    if "path" in _found:
        return _found["path"]
    path = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")
    if path is None:
        path = _install()
    _found["path"] = path
    return path


def _install() -> str:
    if os.geteuid() != 0:
        pytest.skip("haproxy is not installed, and only root can install it "
                    "(apt-get install haproxy)")
    if shutil.which("apt-get") is None:
        pytest.skip("haproxy is not installed, and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    errors = ""
    for steps in ([["apt-get", "install", "-y", "haproxy"]],
                  [["apt-get", "update"], ["apt-get", "install", "-y", "haproxy"]]):
        for step in steps:
            run = subprocess.run(step, capture_output=True, text=True, env=env, timeout=900)
            errors = run.stderr[-500:]
        path = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")
        if path is not None:
            return path
    pytest.skip(f"haproxy is not installed, and apt-get could not install it: {errors}")


def check_config(text: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    """`haproxy -c` on a config text."""
    path = tmp / "check.cfg"
    path.write_text(text)
    return subprocess.run([haproxy(), "-c", "-f", str(path)], capture_output=True, text=True,
                          timeout=30)


def cluster_module() -> ModuleType:
    """scripts/cluster as a module (it has no .py suffix), for its pure functions."""
    if "cluster" in sys.modules:
        return sys.modules["cluster"]
    loader = importlib.machinery.SourceFileLoader("cluster", str(CLUSTER))
    spec = importlib.util.spec_from_loader("cluster", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["cluster"] = module  # dataclasses look their module up there
    loader.exec_module(module)
    return module


def free_port() -> int:
    """A port free on 127.0.0.1 together with the next one (the agent port), so a test
    cluster does not meet another run's."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port < 65535:
            with socket.socket() as agent:
                try:
                    agent.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port


class Cluster:
    """`scripts/cluster` in a state directory of its own, on a port of its own."""

    def __init__(self, state: Path, port: int):
        self.state, self.port = state, port

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        haproxy()  # installed (or the test skipped) before the script looks for it
        return subprocess.run([sys.executable, str(CLUSTER), "--dir", str(self.state),
                               "--port", str(self.port), *args],
                              capture_output=True, text=True, timeout=timeout, cwd=ROOT)

    def start_run(self, *args: str) -> subprocess.Popen[str]:
        """scripts/cluster, without waiting for it."""
        return subprocess.Popen([sys.executable, str(CLUSTER), "--dir", str(self.state),
                                 "--port", str(self.port), *args], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, cwd=ROOT)

    def up(self, hosts: int, *options: str) -> None:
        result = self.run("up", str(hosts), *options)
        assert result.returncode == 0, result.stdout + result.stderr
        self.hosts = hosts

    def down(self) -> None:
        self.run("down")

    def status(self) -> dict[str, Any]:
        result = self.run("status", "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def servers(self) -> dict[tuple[str, str], dict[str, Any]]:
        """HAProxy's view of each (backend, server), from its runtime API, in this process
        (cluster.status() runs the script and asks every host too)."""
        return {(s["backend"], s["server"]): s
                for s in cluster_module().servers(self.state)}

    def host_address(self, k: int) -> str:
        return f"127.0.0.{k + 1}"

    def events(self, k: int, name: str | None = None) -> list[dict[str, Any]]:
        """What host k logged so far (whole lines only)."""
        out = []
        with open(self.state / f"host{k}" / "mpd.log", "rb") as f:
            data = f.read()
        for line in data[:data.rfind(b"\n") + 1].splitlines():
            event = json.loads(line)
            if name is None or event.get("event") == name:
                out.append(event)
        return out

    def host_pid(self, k: int) -> int:
        return int((self.state / f"host{k}" / "mpd.pid").read_text())

    def pids(self) -> list[int]:
        """HAProxy's and every host master's pid, from their pidfiles."""
        out = []
        for path in [self.state / "haproxy.pid",
                     *sorted(self.state.glob("host*/mpd.pid"))]:
            with contextlib.suppress(OSError, ValueError):
                out.append(int(path.read_text()))
        return out
