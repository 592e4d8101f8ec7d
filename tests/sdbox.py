"""A throw-away systemd 252 (sdbox) for the tests that need a real one, and mpd installed
the way the README says: a venv of Debian's Python outside /root, linked into
/usr/local/bin, the shipped unit as it is."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import ROOT, toml_config

# The throw-away systemd box (its README is beside it); MPD_SDBOX points elsewhere.
SDBOX = Path(os.environ.get("MPD_SDBOX") or ROOT.parent / "shared" / "tools" / "sdbox" / "sdbox")
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's: readable by a DynamicUser, unlike pyenv's
VENV_ROOT = Path("/opt/mpd-test")  # outside /tmp, /var/tmp (fresh in the box) and /root

CLIENT = """
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
s.sendall(b"hello, client ping!\\0" * 3)
data = b""
while len(data) < 60:
    chunk = s.recv(100)
    if not chunk:
        break
    data += chunk
print(data == b"hello, server ping!\\0" * 3)
"""


def box_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to boot systemd in namespaces"
    for tool in ("unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not SDBOX.exists():
        return f"sdbox not found at {SDBOX}: set MPD_SDBOX=/path/to/sdbox"
    if not os.path.exists("/lib/systemd/systemd"):
        return "systemd is not installed"
    if not os.path.exists(SYSTEM_PYTHON):
        return f"{SYSTEM_PYTHON} is missing"
    return None


needs_box = pytest.mark.skipif(box_unavailable() is not None,
                               reason=box_unavailable() or "")


def build_system_venv() -> Path:
    """mpd installed (not editable) into a venv of the system Python, reused while the
    source is unchanged: the unit's ExecStart runs it inside the box."""
    digest = hashlib.sha256()
    for path in sorted([*(ROOT / "mpd").rglob("*.py"), ROOT / "pyproject.toml"]):
        digest.update(path.read_bytes())
    venv = VENV_ROOT / f"venv-{digest.hexdigest()[:16]}"
    done = venv / ".complete"
    if not done.exists():
        shutil.rmtree(venv, ignore_errors=True)  # a half-built one from an interrupted run
        VENV_ROOT.mkdir(parents=True, exist_ok=True)
        os.chmod(VENV_ROOT, 0o755)
        old_umask = os.umask(0o022)  # the service's DynamicUser must read it
        try:
            subprocess.run([SYSTEM_PYTHON, "-m", "venv", str(venv)], check=True)
            # From a copy of the package's sources: setuptools builds in the tree (build/),
            # and a stale build/lib of an older layout would be installed along.
            with tempfile.TemporaryDirectory() as source:
                shutil.copytree(ROOT / "mpd", Path(source) / "mpd",
                                ignore=shutil.ignore_patterns("__pycache__"))
                for name in ("pyproject.toml", "README.md"):
                    shutil.copy(ROOT / name, source)
                subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet",
                                "--no-cache-dir", source], check=True, cwd="/")
        finally:
            os.umask(old_umask)
        done.touch()
    return venv


class Box:
    """One sdbox: systemd 252 as PID 1 with journald, torn down whatever happens."""

    def __init__(self) -> None:
        parent = tempfile.mkdtemp(prefix="mpd-sdbox-")
        self.dir = os.path.join(parent, "box")
        subprocess.run([str(SDBOX), "up", self.dir], check=True, capture_output=True,
                       timeout=120)
        self.parent = parent

    def run(self, *cmd: str, check: bool = False, timeout: float = 60
            ) -> subprocess.CompletedProcess:
        result = subprocess.run([str(SDBOX), "exec", self.dir, "--", *cmd],
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{cmd} exited {result.returncode}: {result.stderr}")
        return result

    def copy(self, text: str, dest: str) -> None:
        src = os.path.join(self.parent, "payload")
        with open(src, "w") as f:
            f.write(text)
        subprocess.run([str(SDBOX), "cp", self.dir, src, dest], check=True,
                       capture_output=True, timeout=60)

    def journal(self, *match: str) -> list[dict]:
        out = self.run("journalctl", "-u", "mpd", "-o", "json", "--no-pager", *match).stdout
        entries = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        return entries

    def events(self, name: str | None = None) -> list[dict]:
        """mpd's events, rebuilt from their MPD_* journal fields (MESSAGE is a sentence);
        values that read as JSON (numbers, lists) are decoded."""
        found = []
        for entry in self.journal():
            if "MPD_EVENT" not in entry:
                continue
            event = {}
            for key, value in entry.items():
                if key.startswith("MPD_"):
                    try:
                        event[key[4:].lower()] = json.loads(value)
                    except (ValueError, TypeError):
                        event[key[4:].lower()] = value
            event["event"] = entry["MPD_EVENT"]
            if name is None or event.get("event") == name:
                found.append(event)
        return found

    def down(self) -> None:
        subprocess.run([str(SDBOX), "down", self.dir], capture_output=True, timeout=120)
        shutil.rmtree(self.parent, ignore_errors=True)


def install(box: Box, venv: Path, config: dict, socket_unit: bool = False) -> None:
    """The README's steps: mpd and mpdctl linked into /usr/local/bin (inside the box only:
    its / is an overlay), the shipped unit as it is, the config at /etc/mpd.toml."""
    for tool in ("mpd", "mpdctl"):
        box.run("ln", "-sf", f"{venv}/bin/{tool}", f"/usr/local/bin/{tool}", check=True)
    box.copy((ROOT / "packaging" / "mpd.service").read_text(),
             "/etc/systemd/system/mpd.service")
    if socket_unit:
        box.copy((ROOT / "packaging" / "mpd.socket").read_text(),
                 "/etc/systemd/system/mpd.socket")
    box.copy(toml_config(config), "/etc/mpd.toml")
    box.run("systemctl", "daemon-reload", check=True)


def prop(box: Box, name: str, unit: str = "mpd") -> str:
    return box.run("systemctl", "show", "-p", name, "--value", unit).stdout.strip()


def mpdctl_status(box: Box, venv: Path) -> dict:
    result = box.run(f"{venv}/bin/mpdctl", "--json", "status", check=True)
    return json.loads(result.stdout)


def ping_inside(box: Box, venv: Path, port: int = 1990) -> bool:
    return box.run(f"{venv}/bin/python", "-c", CLIENT, str(port)).stdout.strip() == "True"


BASE = {"server": {"port": 1990}, "workers": {"workers": 2, "graceful_timeout": 2}}
