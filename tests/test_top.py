"""`mpdctl top`: the live view on a real pseudo-terminal (q and Ctrl-C quit, the terminal
comes back as it was), and its frames for scripts when not on a terminal."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import re
import select
import subprocess
import sys
import termios
import threading

import pytest
from conftest import ping, wait_until

CLEAR = b"\x1b[H\x1b[2J"


class Terminal:
    """mpdctl top run on its own pty, as the controlling terminal of its own session."""

    def __init__(self, server, *args: str):
        self.master_fd, slave_fd = pty.openpty()
        self.saved = termios.tcgetattr(slave_fd)
        self.slave_fd = slave_fd
        self.output = b""

        def take_terminal() -> None:  # in the child, after setsid: Ctrl-C reaches it
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mpd.ctl", "--socket", str(server.tmp / "mpd.sock"),
             "top", *args], stdin=slave_fd, stdout=slave_fd, stderr=slave_fd,
            start_new_session=True, preexec_fn=take_terminal)

    def read(self) -> bytes:
        """What the terminal shows so far (read without blocking)."""
        while select.select([self.master_fd], [], [], 0)[0]:
            try:
                chunk = os.read(self.master_fd, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not chunk:
                break
            self.output += chunk
        return self.output

    def frames(self) -> list[bytes]:
        return self.read().split(CLEAR)[1:]

    def type(self, keys: bytes) -> None:
        os.write(self.master_fd, keys)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for fd in (self.master_fd, self.slave_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


@pytest.fixture
def server(mpd_factory):
    return mpd_factory({"workers": {"workers": 2}})


@pytest.fixture
def terminal(server):
    opened: list[Terminal] = []

    def start(*args: str) -> Terminal:
        opened.append(Terminal(server, *args))
        return opened[-1]

    yield start
    for t in opened:
        t.close()


def worker_rows(frame: bytes, pids: list[int]) -> dict[int, list[str]]:
    """The table's row of each worker pid in a frame: its cells."""
    rows = {}
    for line in frame.decode(errors="replace").splitlines():
        cells = line.split()
        if len(cells) >= 10 and cells[1].isdigit() and int(cells[1]) in pids:
            rows[int(cells[1])] = cells
    return rows


@pytest.mark.parametrize("key", [b"q", b"\x03"], ids=["q", "ctrl-c"])
def test_top_refreshes_on_a_terminal_until_q_or_ctrl_c(server, terminal, key):
    pids = server.wait_workers(2)
    t = terminal("--interval", "0.2")
    frames = wait_until(lambda: len(t.frames()) >= 3 and t.frames(), what="three frames")
    for frame in frames[:3]:
        assert set(worker_rows(frame, pids)) == set(pids), frame
    assert b"SLOT" in frames[0] and b"REQ/S" in frames[0] and b"(q quits)" in frames[0]
    assert b"\x1b[?25l" in t.output  # the cursor hidden while it draws
    t.type(key)
    assert t.proc.wait(10) == 0
    assert t.read().endswith(b"\x1b[?25h\r\n")  # the cursor back
    assert termios.tcgetattr(t.slave_fd) == t.saved  # echo and line mode back
    assert b"Traceback" not in t.output


def test_top_shows_the_rates_of_a_busy_worker(server, terminal):
    pids = server.wait_workers(2)
    stop = threading.Event()

    def pinger() -> None:
        with server.connect() as sock:
            while not stop.is_set():
                ping(sock)

    load = threading.Thread(target=pinger)
    load.start()
    try:
        t = terminal("--interval", "0.3")

        def busy() -> bool:
            for frame in t.frames()[1:]:  # the first has no rates yet
                for cells in worker_rows(frame, pids).values():
                    if cells[4] != "-" and float(cells[4]) > 10 and float(cells[6]) > 0:
                        return True
            return False

        wait_until(busy, what="a frame with requests/s and CPU% of the busy worker")
        t.type(b"q")
        assert t.proc.wait(10) == 0
    finally:
        stop.set()
        load.join()


def test_top_not_on_a_terminal_prints_frames_and_exits(server):
    pids = server.wait_workers(2)
    with server.connect() as sock:
        ping(sock)
    result = subprocess.run([sys.executable, "-m", "mpd.ctl", "--socket",
                             str(server.tmp / "mpd.sock"), "top", "--frames", "2",
                             "--interval", "0.2"], capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert CLEAR not in result.stdout and b"\x1b" not in result.stdout
    headers = [m.start() for m in re.finditer(rb"^mpd ", result.stdout, re.M)]
    assert len(headers) == 2, result.stdout
    rows = worker_rows(result.stdout, pids)
    assert set(rows) == set(pids)
    assert all(cells[4] != "-" for cells in rows.values())  # rates from the baseline


def test_top_says_so_when_mpd_is_not_running(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mpd.ctl", "--socket",
                             str(tmp_path / "none.sock"), "top", "--frames", "1"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 3 and "not running" in result.stderr


def test_an_interval_out_of_range_is_a_usage_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mpd.ctl", "--socket",
                             str(tmp_path / "s"), "top", "--interval", "0"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "--interval" in result.stderr
