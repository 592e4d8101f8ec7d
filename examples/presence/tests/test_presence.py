"""mpd-presence on a real mpd: the installed package, served by its entry point's name
("presence"), over real sockets. Run with the package installed beside mpd:

    python -m pytest examples/presence/tests
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest


class Server:
    """`python -m mpd.cli` on a config of our own; its JSON log in a file."""

    def __init__(self, tmp: Path, protocol: str, workers: int, app: str = ""):
        self.tmp = tmp
        # A unix socket's path is at most 107 bytes: pytest's tmp_path may be longer.
        self.sockdir = Path(tempfile.mkdtemp(prefix="mpdp-"))
        self.socket = self.sockdir / "mpd.sock"
        (tmp / "mpd.toml").write_text(
            f'[server]\nport = 0\nprotocol = "{protocol}"\n'
            f'user = "{pwd.getpwuid(os.geteuid()).pw_name}"\n'
            f"[workers]\nworkers = {workers}\n"
            f'[control]\nsocket = "{self.socket}"\n'
            f"[app]\n{app}\n")
        self.log = tmp / "mpd.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mpd.cli", "--config", str(tmp / "mpd.toml"),
                 "--log-format", "json"], stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        self.port = self.wait_event("mpd.started")["port"]
        self.wait_event("mpd.ready")

    def events(self, name: str) -> list[dict[str, Any]]:
        data = self.log.read_bytes()
        found = []
        for line in data[:data.rfind(b"\n") + 1].splitlines():  # whole lines only
            try:
                event = json.loads(line)
            except ValueError:
                continue  # not mpd's: a Python warning, say
            if event.get("event") == name:
                found.append(event)
        return found

    def wait_event(self, name: str, timeout: float = 15.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while not self.events(name):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {name}: {self.log.read_text()[-2000:]}")
            time.sleep(0.02)  # a poll interval, bounded by the deadline
        return self.events(name)[0]

    def ctl(self, *args: str) -> dict[str, Any]:
        result = subprocess.run([sys.executable, "-m", "mpd.ctl", "--socket",
                                 str(self.socket), "--json", *args],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        shutil.rmtree(self.sockdir, ignore_errors=True)


class Client:
    def __init__(self, port: int, first_line: bytes = b""):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        self.buf = b""
        if first_line:
            self.sock.sendall(first_line)

    def line(self) -> str:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed with {self.buf!r} unread")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode()

    def said(self) -> str:
        """The next line a member said (notices, such as roll calls, come any time)."""
        return self.next_line(lambda line: not line.startswith("* "))

    def roll_call(self) -> str:
        return self.next_line(lambda line: line.startswith("* roll call"))

    def next_line(self, wanted: Callable[[str], bool], timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        skipped = []
        while time.monotonic() < deadline:
            line = self.line()
            if wanted(line):
                return line
            skipped.append(line)
        raise AssertionError(f"no such line within {timeout:g} s; got {skipped[-5:]}")

    def closed(self) -> bool:
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                return True
            self.buf += chunk


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Any]:
    started: list[Server] = []

    def start(workers: int = 2, app: str = "interval = 30",
              protocol: str = "presence") -> Server:
        started.append(Server(tmp_path, protocol, workers, app))
        return started[-1]

    yield start
    for s in started:
        s.stop()


def test_members_hear_each_other_and_who_comes_and_goes(server):
    mpd = server(workers=4)
    ada = Client(mpd.port, b"JOIN lobby ada\n")
    assert ada.line() == "* you are ada in lobby; here: ada"
    bob = Client(mpd.port, b"JOIN lobby bob\nhi ada\n")  # a line in the same write
    assert bob.line() == "* you are bob in lobby; here: ada, bob"
    assert ada.line() == "* bob joined"
    assert ada.line() == "bob: hi ada"
    ada.sock.sendall(b"hello bob\nwelcome\n")
    assert [bob.line(), bob.line()] == ["ada: hello bob", "ada: welcome"]
    other = Client(mpd.port, b"JOIN kitchen ada\n")  # another channel: its own nicks
    assert other.line() == "* you are ada in kitchen; here: ada"
    taken = Client(mpd.port, b"JOIN lobby bob\n")
    assert taken.line() == "error: nick taken" and taken.closed()
    bob.sock.close()
    assert ada.line() == "* bob left"  # and not the refused one


def test_the_roll_call_counts_lines_and_survives_a_move_of_the_channel(server):
    mpd = server(workers=2, app="interval = 0.3")
    ada = Client(mpd.port, b"JOIN lobby ada\n")
    assert ada.line() == "* you are ada in lobby; here: ada"
    bob = Client(mpd.port, b"JOIN lobby bob\n")
    assert ada.next_line(lambda line: line.endswith("joined")) == "* bob joined"
    ada.sock.sendall(b"one\ntwo\n")
    assert [bob.said(), bob.said()] == ["ada: one", "ada: two"]
    assert bob.roll_call() == "* roll call: 2 here (ada, bob), 2 lines"
    where = mpd.ctl("where", "lobby")
    other = 1 - where["slot"]
    mpd.ctl("move", "lobby", str(other))  # the channel moves: its members and its count
    assert mpd.ctl("where", "lobby")["slot"] == other
    bob.sock.sendall(b"three\n")
    assert ada.said() == "bob: three"
    # The timer was set again on the new worker, and the count came along.
    assert ada.roll_call() == "* roll call: 2 here (ada, bob), 3 lines"


def test_a_bad_option_is_a_config_error_in_one_line(tmp_path: Path):
    config = tmp_path / "mpd.toml"
    config.write_text('[server]\nport = 0\nprotocol = "presence"\n[app]\ninterval = -1\n')
    result = subprocess.run([sys.executable, "-m", "mpd.cli", "--config", str(config),
                             "--check-config"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 78
    (line,) = result.stderr.splitlines()
    assert "interval must be seconds, more than 0 and at most 86400, got -1" in line
