"""Log rotation: logrotate renames the log file, then SIGUSR1 or `mpdctl reopen-logs`
(the shipped snippet's postrotate) makes every process, master and workers, open the
file anew at its path. Under load at level debug, so that every process writes all the
while, every line is found again, in the old file or the new one, and each process's
lines go to the old file until its `log.reopened`, the first of its lines in the new."""

from __future__ import annotations

import json
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    M_PING,
    REPLY,
    ROOT,
    key_frame,
    pid_alive,
    read_all,
    recv_exact,
    wait_until,
)

from mpd.logs import log as logmod

SNIPPET = ROOT / "packaging" / "mpd.logrotate"
VENV_BIN = os.path.dirname(sys.executable)  # mpdctl as the postrotate command finds it


def mpdctl(socket_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mpd.ctl", "--socket", str(socket_path),
                           *args], capture_output=True, text=True, timeout=30, cwd=ROOT)


def lines_of(path: Path) -> list[dict[str, Any]]:
    """The file's whole lines: a reader may see a line that a process is writing (one
    write() to a regular file is not atomic against a read) only in part."""
    text = path.read_bytes()
    return [json.loads(line) for line in text[:text.rfind(b"\n") + 1].splitlines()]


# --- the sink: a reopen keeps what is queued ------------------------------------------------

def test_a_reopen_sends_the_queued_lines_to_the_new_file_and_loses_none(tmp_path: Path):
    """A FIFO named as the log file, whose reader does not read: lines queue in the sink.
    Renamed and replaced by a new FIFO, the reopen keeps the queue for the new one."""
    path = tmp_path / "log.fifo"
    os.mkfifo(path)
    old_reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    epoll = select.epoll()
    log = logmod.get_logger()
    try:
        logmod.configure("info", "json", "file", str(path))
        dropped = logmod.dropped_total()  # this process's, since it started
        for i in range(3000):  # far more than a pipe holds
            log.info("test.line", n=i)
        queued_fd = logmod.watch_epoll(epoll)
        assert queued_fd >= 0, "nothing queued: the test would prove nothing"
        os.rename(path, tmp_path / "log.fifo.1")
        os.mkfifo(path)
        new_reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        assert logmod.reopen() is None
        assert logmod.log_file() == str(path)
        received_new = b""
        while logmod.watch_epoll(epoll) >= 0:  # the loop: wait writable, then flush
            received_new += read_all(new_reader)
            if epoll.poll(1.0):
                logmod.flush()
        received_new += read_all(new_reader)
        old = [e for e in map(json.loads, read_all(old_reader).splitlines())]
        new = [e for e in map(json.loads, received_new.splitlines())]
        numbers = [e["n"] for e in old + new if e["event"] == "test.line"]
        assert numbers == list(range(3000))
        assert old and [e["event"] for e in new].count("log.reopened") == 1
        assert logmod.dropped_total() == dropped
    finally:
        logmod.configure("info")
        epoll.close()
        os.close(old_reader)
        with_new = locals().get("new_reader")
        if with_new is not None:
            os.close(with_new)


def test_a_reopen_that_cannot_open_the_file_keeps_the_old_one(tmp_path: Path):
    folder = tmp_path / "logs"
    folder.mkdir()
    path = folder / "mpd.log"
    log = logmod.get_logger()
    try:
        logmod.configure("info", "json", "file", str(path))
        log.info("test.before")
        folder.rename(tmp_path / "gone")  # the path's directory is no more
        why_not = logmod.reopen()
        assert why_not == (f"cannot reopen the log file {path}: No such file or directory; "
                           "logging goes on to the old file")
        log.info("test.after")
        events = [e["event"] for e in lines_of(tmp_path / "gone" / "mpd.log")]
        assert events == ["test.before", "log.reopen_failed", "test.after"]
    finally:
        logmod.configure("info")


def test_with_logs_on_stdout_there_is_nothing_to_reopen():
    logmod.configure("info")
    assert logmod.log_file() is None
    assert logmod.reopen() is None


# --- real processes under load ----------------------------------------------------------------

class Load:
    """Short connections through every worker (accepted by one, mostly handed to their
    key's owner: client.accepted, fd.dispatched, client.closed at debug), and control
    pings to the master (control.command at debug), from threads, until stopped."""

    def __init__(self, port: int, control: Path, threads: int = 3):
        self.port = port
        self.control = control
        self.halt = threading.Event()
        self.connections = 0
        self.control_pings = 0
        self.errors: list[BaseException] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.clients, args=(seed,), daemon=True)
                        for seed in range(threads)]
        self.threads.append(threading.Thread(target=self.pings, daemon=True))
        for t in self.threads:
            t.start()

    def clients(self, seed: int) -> None:
        rng = random.Random(seed)
        try:
            while not self.halt.is_set():
                with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
                    sock.sendall(key_frame(rng.randint(-2**31, 2**31 - 1)) + M_PING)
                    assert recv_exact(sock, len(REPLY)) == REPLY
                with self.lock:
                    self.connections += 1
        except BaseException as e:  # noqa: BLE001 - the test reads it
            self.errors.append(e)

    def pings(self) -> None:
        try:
            while not self.halt.is_set():
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(10)
                    sock.connect(str(self.control))
                    sock.sendall(b'{"version": 1, "command": "ping"}\n')
                    assert json.loads(sock.makefile("rb").readline())["ok"] is True
                self.control_pings += 1
                self.halt.wait(0.005)
        except BaseException as e:  # noqa: BLE001 - the test reads it
            self.errors.append(e)

    def wait_more(self, count: int, what: str) -> None:
        mark = self.connections
        wait_until(lambda: self.connections >= mark + count or self.errors, 30, what=what)
        assert not self.errors, self.errors

    def stop(self) -> None:
        self.halt.set()
        for t in self.threads:
            t.join(15)
        assert not self.errors, self.errors


def settings(tmp_path: Path, workers: int) -> dict[str, dict[str, Any]]:
    # The harness captures stdout into tmp/mpd.log: the log file is that very file, so the
    # harness sees mpd.started and mpd.ready there.
    return {"workers": {"workers": workers},
            "log": {"level": "debug", "target": "file", "file": str(tmp_path / "mpd.log")}}


def status(socket_path: Path) -> dict[str, Any]:
    result = mpdctl(socket_path, "--json", "status")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def rotate_under_load(server, tmp_path: Path, reopen) -> None:
    """Rename the log under load, let `reopen` make mpd open a new one, and find every line."""
    log, rotated = tmp_path / "mpd.log", tmp_path / "mpd.log.1"
    sock = tmp_path / "mpd.sock"
    workers = server.wait_workers(3)
    processes = {server.pid, *workers}
    load = Load(server.port, sock)
    try:
        load.wait_more(1000, "1,000 connections before the rename")
        reopen(log, rotated)
        wait_until(lambda: log.exists() and processes <= {
            e["pid"] for e in lines_of(log) if e["event"] == "log.reopened"},
            what="log.reopened from the master and each worker in the new file")
        load.wait_more(1000, "1,000 connections after the reopen")
    finally:
        load.stop()
    old_size = rotated.stat().st_size
    # Every connection's lines, once mpd has counted them all (heartbeats: 1 s).
    wait_until(lambda: (lambda t: t["accepted"] == load.connections and t["clients"] == 0)(
        status(sock)["totals"]), what="mpd's counters to take in every connection")
    totals = status(sock)["totals"]
    events = lines_of(rotated) + lines_of(log)
    counts = Counter(e["event"] for e in events)
    assert counts["client.accepted"] == load.connections
    assert counts["client.closed"] == load.connections
    assert counts["fd.dispatched"] == totals["adopted"] > 1000  # most keys change slot
    master_pings = [e for e in events if e["event"] == "control.command"
                    and e["command"] == "ping"]
    assert len(master_pings) == load.control_pings > 10
    assert not counts["log.dropped"] and not counts["log.reopen_failed"]
    assert counts["log.reopened"] == len(processes)
    # Each process wrote to the old file until it had the new one, and only then there.
    assert not [e for e in lines_of(rotated) if e["event"] == "log.reopened"]
    for pid in processes:
        first_new = next(e for e in lines_of(log) if e["pid"] == pid)
        assert first_new["event"] == "log.reopened", first_new
        assert any(e["pid"] == pid for e in lines_of(rotated)), f"pid {pid}: nothing old"
    assert rotated.stat().st_size == old_size  # nobody writes to the old file any more
    assert pid_alive(server.pid) and sorted(server.worker_pids()) == workers


def test_sigusr1_reopens_the_log_in_every_process_and_loses_no_line(mpd_factory, tmp_path):
    server = mpd_factory(settings(tmp_path, 3))

    def rename_then_signal(log: Path, rotated: Path) -> None:
        os.rename(log, rotated)
        size = rotated.stat().st_size  # the processes go on writing to the renamed file
        wait_until(lambda: rotated.stat().st_size > size + 10_000,
                   what="lines in the renamed file before the signal")
        server.signal(signal.SIGUSR1)

    rotate_under_load(server, tmp_path, rename_then_signal)


def logrotate_config(tmp_path: Path) -> Path:
    """The shipped snippet, pointed at the test's log file (its only change)."""
    text = SNIPPET.read_text()
    assert "/var/log/mpd/*.log {" in text
    config = tmp_path / "logrotate.conf"
    config.write_text(text.replace("/var/log/mpd/*.log", str(tmp_path / "*.log")))
    return config


def test_the_shipped_logrotate_snippet_rotates_without_losing_a_line(mpd_factory, tmp_path):
    logrotate = shutil.which("logrotate") or "/usr/sbin/logrotate"
    if not os.path.exists(logrotate):
        pytest.skip("logrotate is not installed (apt-get install logrotate): cannot run the "
                    "shipped snippet")
    server = mpd_factory(settings(tmp_path, 3))
    config = logrotate_config(tmp_path)
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
           "MPDCTL_SOCKET": str(tmp_path / "mpd.sock")}

    def run_logrotate(log: Path, rotated: Path) -> None:
        result = subprocess.run([logrotate, "--force", "--verbose", "--state",
                                 str(tmp_path / "logrotate.state"), str(config)],
                                capture_output=True, text=True, timeout=60, env=env)
        assert result.returncode == 0, result.stderr
        assert "running postrotate script" in result.stderr
        assert rotated.exists() and not (tmp_path / "mpd.log.1.gz").exists()  # delaycompress

    rotate_under_load(server, tmp_path, run_logrotate)


def test_mpdctl_reopen_logs_says_what_it_did_and_why_not(mpd_factory, tmp_path):
    server = mpd_factory(settings(tmp_path, 2))
    server.wait_workers(2)
    sock = tmp_path / "mpd.sock"
    os.rename(tmp_path / "mpd.log", tmp_path / "mpd.log.1")
    result = mpdctl(sock, "reopen-logs")
    assert result.returncode == 0, result.stderr
    assert result.stdout == (f"mpd: {tmp_path}/mpd.log reopened by the master, and 2 workers "
                             "told to\n")
    wait_until(lambda: len([e for e in lines_of(tmp_path / "mpd.log")
                            if e["event"] == "log.reopened"]) == 3, what="3 log.reopened")
    # A log file that cannot be opened: a clear error, and mpd logs on to the old file.
    os.rename(tmp_path, tmp_path.with_name(tmp_path.name + "-moved"))
    moved = tmp_path.with_name(tmp_path.name + "-moved")
    try:
        result = mpdctl(moved / "mpd.sock", "reopen-logs")
        assert result.returncode == 1
        assert result.stderr == (f"mpdctl: cannot reopen the log file {tmp_path}/mpd.log: No "
                                 "such file or directory; logging goes on to the old file\n")
        assert mpdctl(moved / "mpd.sock", "ping").returncode == 0
        failed = [e for e in lines_of(moved / "mpd.log") if e["event"] == "log.reopen_failed"]
        assert [e["pid"] for e in failed] == [server.pid]  # the workers were not told
    finally:
        moved.rename(tmp_path)


def test_mpdctl_reopen_logs_with_logs_on_stdout_has_nothing_to_do(mpd_factory, tmp_path):
    mpd_factory({"workers": {"workers": 1}})
    result = mpdctl(tmp_path / "mpd.sock", "reopen-logs")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ("mpd: logs do not go to a file (log.target): nothing to "
                             "reopen\n")


def test_sigusr1_to_a_worker_does_not_end_it(mpd_factory, tmp_path):
    """`systemctl kill -s USR1 mpd` without --kill-whom=main reaches the workers too."""
    server = mpd_factory(settings(tmp_path, 2))
    workers = server.wait_workers(2)
    for pid in workers:
        os.kill(pid, signal.SIGUSR1)
    server.signal(signal.SIGUSR1)
    wait_until(lambda: len([e for e in lines_of(tmp_path / "mpd.log")
                            if e["event"] == "log.reopened"]) == 3, what="3 log.reopened")
    assert server.worker_pids() == workers


def test_single_process_mode_reopens_on_sigusr1(mpd_factory, tmp_path):
    server = mpd_factory(settings(tmp_path, 0))
    os.rename(tmp_path / "mpd.log", tmp_path / "mpd.log.1")
    server.signal(signal.SIGUSR1)
    wait_until(lambda: (tmp_path / "mpd.log").exists() and [
        e["event"] for e in lines_of(tmp_path / "mpd.log")] == ["log.reopened"],
        what="log.reopened in the new file")
    with server.connect() as sock:
        sock.sendall(b"hello\0")
        assert recv_exact(sock, len(REPLY)) == REPLY
    wait_until(lambda: [e["event"] for e in lines_of(tmp_path / "mpd.log")][-1:]
               == ["client.closed"], what="the client's lines in the new file")
    assert "log.reopened" not in {e["event"] for e in lines_of(tmp_path / "mpd.log.1")}
    assert re.search(r'"event": ?"mpd.ready"', (tmp_path / "mpd.log.1").read_text())
