"""Logging never stalls serving. mpd's stdout is a real pipe: when nobody reads it, every
process keeps serving, handing off and answering the control socket, and drops lines
once its bounded queue is full; when the reader comes back, each process says how many it
dropped. A reader that keeps up loses no line."""

from __future__ import annotations

import array
import fcntl
import json
import os
import select
import signal
import socket
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    M_PING,
    ME,
    REPLY,
    ROOT,
    children,
    key_frame,
    keys_owned_by,
    recv_exact,
    toml_config,
    wait_until,
)

SLOTS = (0, 1, 2, 3)
REKEYERS = 8


class PipedMpd:
    """mpd with its stdout (and so every process's log) on a pipe that the test reads
    only when it chooses to."""

    def __init__(self, tmp: Path, settings: dict[str, dict[str, Any]]):
        self.socket_path = str(tmp / "mpd.sock")
        merged: dict[str, dict[str, Any]] = {"server": {"port": 0, "user": ME},
                                             "control": {"socket": self.socket_path}}
        for section, values in settings.items():
            merged.setdefault(section, {}).update(values)
        config = tmp / "mpd.toml"
        config.write_text(toml_config(merged))
        self.reader, writer = os.pipe()
        self.stderr_path = tmp / "stderr"
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mpd.cli", "--config", str(config)],
                stdout=writer, stderr=err, stdin=subprocess.DEVNULL, cwd=ROOT,
                start_new_session=True)
        os.close(writer)
        self.pid = self.proc.pid
        self.partial = b""
        self.events: list[dict[str, Any]] = []
        self.bad_lines: list[bytes] = []
        self.port = self.wait_event("mpd.started")["port"]
        self.wait_event("mpd.ready")

    def read(self, timeout: float = 0.05) -> None:
        """Read what the pipe holds now (waiting up to `timeout` for something)."""
        while select.select([self.reader], [], [], timeout)[0]:
            data = os.read(self.reader, 1 << 20)
            if not data:
                return
            lines = (self.partial + data).split(b"\n")
            self.partial = lines.pop()
            for line in lines:
                try:
                    self.events.append(json.loads(line))
                except ValueError:
                    self.bad_lines.append(line)
            timeout = 0

    def find(self, name: str, **fields: Any) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == name
                and all(e.get(k) == v for k, v in fields.items())]

    def wait_event(self, name: str, timeout: float = 15.0) -> dict[str, Any]:
        def found() -> Any:
            self.read()
            assert self.proc.poll() is None, self.stderr_path.read_text()
            return (self.find(name) or [None])[0]
        return wait_until(found, timeout, interval=0, what=name)

    def pipe_bytes(self) -> int:
        """Bytes written to the pipe and not read yet."""
        size = array.array("i", [0])
        fcntl.ioctl(self.reader, termios.FIONREAD, size)
        return size[0]

    def status(self, timeout: float = 5.0) -> dict[str, Any]:
        """A raw control request: the master must answer within `timeout`."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(self.socket_path)
            sock.sendall(b'{"version": 1, "command": "status"}\n')
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = sock.recv(65536)
                assert chunk, "the control socket closed without a reply"
                reply += chunk
        answer = json.loads(reply)
        assert answer["ok"], answer
        return answer

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.pid, signal.SIGKILL)
            self.proc.wait(10)
        os.close(self.reader)


class ReKeyer(threading.Thread):
    """A client that names a key of each slot in turn, each time with a ping: every
    re-key is a hand-off, and the adopting worker logs fd.dispatched (at debug)."""

    def __init__(self, port: int, keys: list[int]):
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.keys = keys
        self.halt = threading.Event()
        self.count = 0
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            while not self.halt.is_set():
                self.sock.sendall(key_frame(self.keys[self.count % len(self.keys)]) + M_PING)
                assert recv_exact(self.sock, len(REPLY)) == REPLY
                self.count += 1
        except Exception as e:  # noqa: BLE001 - the test reads it
            self.error = e
        finally:
            self.sock.close()


def start_rekeyers(port: int, count: int) -> list[ReKeyer]:
    owned = {slot: keys_owned_by(slot, SLOTS, count, seed=7) for slot in SLOTS}
    clients = [ReKeyer(port, [owned[slot][i] for slot in SLOTS]) for i in range(count)]
    for client in clients:
        client.start()
    return clients


def stop_rekeyers(clients: list[ReKeyer]) -> None:
    for client in clients:
        client.halt.set()
    for client in clients:
        client.join(10)
    assert [c.error for c in clients] == [None] * len(clients)
    assert all(c.count > 0 for c in clients)


def wait_served_again(clients: list[ReKeyer], counts: list[int]) -> None:
    wait_until(lambda: all(c.count > n for c, n in zip(clients, counts))
               or any(c.error for c in clients), what="every client served again")


def stuck_in_write(pid: int) -> bool:
    """True while `pid` sleeps in a pipe write (a non-blocking write never sleeps)."""
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return "pipe_write" in f.read()
    except FileNotFoundError:
        return False


def adopted_by_pid(server: PipedMpd) -> dict[int, int]:
    return {w["pid"]: w["adopted"] for w in server.status()["workers"]}


@pytest.fixture
def piped(tmp_path: Path):
    started: list[PipedMpd] = []

    def start(settings: dict[str, dict[str, Any]]) -> PipedMpd:
        server = PipedMpd(tmp_path, settings)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def test_a_reader_that_stops_reading_stalls_nothing(piped):
    server = piped({"workers": {"workers": 4}, "log": {"level": "debug", "buffer": 65536}})
    pids = [server.pid, *children(server.pid)]
    assert len(pids) == 5
    clients = start_rekeyers(server.port, REKEYERS)
    try:
        # Nobody reads: the pipe fills up (64 KiB), then each process's queue does.
        wait_until(lambda: server.pipe_bytes() > 60_000, what="the log pipe full")
        full_at = adopted_by_pid(server)
        # Keep handing off until every worker has adopted far more than its queue holds.
        while True:
            counts = [c.count for c in clients]
            assert not [pid for pid in pids if stuck_in_write(pid)]
            adopted = adopted_by_pid(server)  # the master answers meanwhile
            if all(adopted[pid] - full_at[pid] > 1500 for pid in full_at):
                break
            wait_served_again(clients, counts)
            assert [c.error for c in clients] == [None] * len(clients)
    finally:
        stop_rekeyers(clients)
        stopped = time.monotonic()
    # The reader is back: each worker says how many lines it dropped, and every line is
    # either in the log or in those counts.
    wait_until(lambda: _settled(server, stopped), interval=0.2,
               what="the workers' counters settled")
    workers = server.status()["workers"]
    adopted = {w["pid"]: w["adopted"] for w in workers}
    # At debug a hand-off is three lines of the adopting worker (channel.message of the
    # ADOPT, client.bound, fd.dispatched). Besides: worker.serving of each worker, and
    # each re-keyer's client.accepted and client.closed, and the client.bound of its first
    # key (slot 0's) when slot 0 accepted it (else that was a hand-off).
    expected = (3 * sum(adopted.values()) + len(workers) + 2 * REKEYERS
                + sum(w["accepted"] for w in workers if w["slot"] == 0))

    def accounted() -> bool:
        server.read()
        logged = [e for e in server.events
                  if e.get("pid") in adopted and e["event"] != "log.dropped"]
        dropped = sum(e["dropped"] for e in server.find("log.dropped") if e["pid"] in adopted)
        return len(logged) + dropped == expected
    wait_until(accounted, timeout=15, what="every line logged or counted as dropped")
    for pid in adopted:
        reports = server.find("log.dropped", pid=pid)
        assert reports and all(e["dropped"] > 0 and e["level"] == "warning" for e in reports)
    assert server.bad_lines == []  # every line whole
    server.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: server.read() or server.proc.poll() is not None, what="mpd exits")
    assert server.proc.returncode == 0


def _settled(server: PipedMpd, since: float) -> dict[int, int] | None:
    """The workers' adopted counts once every worker has reported after `since` (the
    clients stopped): after that, only heartbeats (STATS, with the counters) come."""
    status = server.status()
    age = time.monotonic() - since
    if all(w["heartbeat_age"] < age for w in status["workers"]):
        return {w["pid"]: w["adopted"] for w in status["workers"]}
    return None


def test_a_reader_that_keeps_up_loses_no_line(piped):
    server = piped({"workers": {"workers": 4}, "log": {"level": "debug"}})
    stop_reading = threading.Event()

    def keep_reading() -> None:
        while not stop_reading.is_set():
            server.read(0.01)
    reader = threading.Thread(target=keep_reading, daemon=True)
    reader.start()
    clients = start_rekeyers(server.port, 8)
    try:
        wait_until(lambda: sum(w["adopted"] for w in server.status()["workers"]) > 10_000,
                   timeout=60, interval=0.2, what="10,000 hand-offs")
    finally:
        stop_rekeyers(clients)
        stopped = time.monotonic()
    adopted = wait_until(lambda: _settled(server, stopped), interval=0.2,
                         what="the workers' counters settled")
    wait_until(lambda: all(len(server.find("fd.dispatched", pid=pid)) == count
                           for pid, count in adopted.items()),
               what="one fd.dispatched line per hand-off")
    stop_reading.set()
    reader.join(5)
    assert server.find("log.dropped") == []
    assert server.bad_lines == []
