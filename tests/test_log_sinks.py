"""The log sinks on real fds: a full pipe, stream socket, datagram socket or tty never
blocks a write; what does not fit is queued up to the bound, then dropped and counted; a
reader that comes back gets every queued line whole and in order, then the count."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import pty
import re
import signal
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import read_all

from mpd.logs import log as logmod
from mpd.logs import sinks as logsink

LINES = 5000


@contextlib.contextmanager
def must_not_block(seconds: float = 10.0) -> Iterator[None]:
    """Fail (instead of hanging the suite) if the body blocks: SIGALRM interrupts a
    blocking write(2), and the handler raises."""
    def expired(_signum: int, _frame: Any) -> None:
        raise AssertionError(f"blocked for {seconds} s")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def numbered(i: int, size: int = 100) -> bytes:
    head = f"line {i:06d} "
    return (head + "x" * (size - len(head) - 1) + "\n").encode()


def fill(sink: logsink.Sink, count: int = LINES) -> None:
    with must_not_block():
        for i in range(count):
            sink.write(numbered(i))


def check_whole_and_in_order(data: bytes) -> list[int]:
    lines = data.split(b"\n")
    assert lines.pop() == b""
    numbers = []
    for line in lines:
        assert re.fullmatch(rb"line (\d{6}) x+", line), line[:40]
        numbers.append(int(line[5:11]))
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
    return numbers


class Reports:
    """Stands in for mpd.log's callback: what the sink reports once it drains."""

    def __init__(self, drops: logsink.Drops):
        self.drops = drops
        self.counts: list[int] = []

    def __call__(self) -> None:
        self.counts.append(self.drops.unreported)
        self.drops.unreported = 0


def drain_through(sink: logsink.Sink, read_fd: int) -> bytes:
    """The reader is back: read, flush, until the sink has nothing queued."""
    received = b""
    with must_not_block():
        while True:
            received += read_all(read_fd)
            if sink.flush():
                return received + read_all(read_fd)


@pytest.mark.parametrize("kind", ["pipe", "stream socket", "tty"])
def test_a_full_stream_sink_never_blocks_and_counts_what_it_drops(kind: str) -> None:
    if kind == "pipe":
        read_fd, write_fd = os.pipe()
    elif kind == "stream socket":
        a, b = socket.socketpair()
        read_fd, write_fd = os.dup(a.fileno()), os.dup(b.fileno())
        a.close()
        b.close()
    else:
        read_fd, write_fd = pty.openpty()
        os.set_blocking(read_fd, True)
        import tty

        tty.setraw(write_fd)  # no echo, no newline translation: the bytes as written
    os.set_blocking(read_fd, False)
    drops = logsink.Drops()
    sink = logsink.open_fd(write_fd, drops, limit=8192)
    reports = Reports(drops)
    sink.on_caught_up = reports
    try:
        fill(sink)
        # The inherited fd (the shell's, the parent's) was never made non-blocking.
        assert os.get_blocking(write_fd)
        assert sink.fileno() != write_fd or kind == "stream socket"
        assert 0 < sink.queued <= 8192
        assert drops.total > 0 and reports.counts == []
        received = drain_through(sink, read_fd)
        numbers = check_whole_and_in_order(received)
        assert len(numbers) + drops.total == LINES
        assert reports.counts == [drops.total]  # reported once, when it drained
        assert numbers[0] == 0  # the oldest are kept: lines are dropped at the tail
        # Drained: the next line goes straight through.
        sink.write(numbered(LINES))
        assert sink.queued == 0 and check_whole_and_in_order(read_all(read_fd)) == [LINES]
    finally:
        sink.close()
        os.close(read_fd)
        os.close(write_fd)


def test_lines_from_a_queue_reach_a_pipe_whole_in_batches_of_at_most_pipe_buf() -> None:
    read_fd, write_fd = os.pipe()
    fcntl.fcntl(write_fd, 1031, 4096)  # F_SETPIPE_SZ: one page, so it is full at once
    os.set_blocking(read_fd, False)
    drops = logsink.Drops()
    sink = logsink.open_fd(write_fd, drops, limit=1 << 20)
    try:
        long_line = b"L" * 10_000 + b"\n"  # longer than PIPE_BUF: may go in pieces
        with must_not_block():
            for i in range(200):
                sink.write(numbered(i, size=150))
            sink.write(long_line)
            for i in range(200, 300):
                sink.write(numbered(i, size=150))
        received = b""
        with must_not_block():
            while True:
                chunk = read_all(read_fd)
                # Each read of a one-page pipe returns what one write put there: whole
                # lines, except for the pieces of the long line.
                assert len(chunk) <= 4096
                received += chunk
                if sink.flush() and not chunk:
                    break
        assert drops.total == 0
        before, after = received.split(long_line)
        assert [int(x[5:11]) for x in before.splitlines()] == list(range(200))
        assert [int(x[5:11]) for x in after.splitlines()] == list(range(200, 300))
    finally:
        sink.close()
        os.close(read_fd)
        os.close(write_fd)


def test_a_full_datagram_sink_never_blocks_and_counts_what_it_drops(tmp_path: Path) -> None:
    path = str(tmp_path / "journal.sock")
    reader = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    reader.bind(path)
    reader.setblocking(False)
    drops = logsink.Drops()
    sink = logsink.DatagramSink(path, drops, limit=8192)
    reports = Reports(drops)
    sink.on_caught_up = reports
    try:
        fill(sink)  # the reader's queue holds net.unix.max_dgram_qlen datagrams
        assert 0 < sink.queued <= 8192 and drops.total > 0
        received = []
        with must_not_block():
            while True:
                with contextlib.suppress(BlockingIOError):
                    while True:
                        received.append(reader.recv(1 << 16))
                if sink.flush():
                    break
        with contextlib.suppress(BlockingIOError):
            while True:
                received.append(reader.recv(1 << 16))
        numbers = check_whole_and_in_order(b"".join(received))
        assert all(d.count(b"\n") == 1 for d in received)  # one line per datagram
        assert len(numbers) + drops.total == LINES
        assert reports.counts == [drops.total]
    finally:
        sink.close()
        reader.close()


def test_a_datagram_sink_follows_a_restarted_reader(tmp_path: Path) -> None:
    path = str(tmp_path / "log.sock")
    first = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    first.bind(path)
    sink = logsink.DatagramSink(path, logsink.Drops())
    fd = sink.fileno()
    assert sink.write(b"one\n")
    assert first.recv(100) == b"one\n"
    first.close()
    os.unlink(path)
    second = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    second.bind(path)
    try:
        assert sink.write(b"two\n")
        assert second.recv(100) == b"two\n"
        assert sink.fileno() == fd  # the same fd: an event loop may be watching it
    finally:
        sink.close()
        second.close()


def test_a_pipe_without_a_reader_drops_and_counts() -> None:
    read_fd, write_fd = os.pipe()
    drops = logsink.Drops()
    sink = logsink.open_fd(write_fd, drops)
    os.close(read_fd)
    try:
        with must_not_block():
            for i in range(10):
                sink.write(numbered(i))
        assert drops.total == 10 and sink.queued == 0
    finally:
        sink.close()
        os.close(write_fd)


def test_a_log_file_that_is_a_fifo_without_a_reader_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with must_not_block(), pytest.raises(OSError) as raised:
        logsink.open_file(str(fifo), logsink.Drops())
    assert raised.value.errno == errno.ENXIO


# --- through mpd.log, with fd 1 on a real pipe ---------------------------------------------

@contextlib.contextmanager
def stdout_on_a_pipe() -> Iterator[int]:
    """fd 1 is the write end of a pipe in the body; yields the read end. (Not a fixture:
    pytest points fd 1 at its capture file again between a test's setup and call.)"""
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    saved = os.dup(1)
    os.dup2(write_fd, 1)
    os.close(write_fd)
    logmod.forget_writer()  # the stdout sink of an earlier test is not this fd 1
    try:
        yield read_fd
    finally:
        for sink in logmod._sinks():
            sink.close()
        logmod.forget_writer()
        os.dup2(saved, 1)
        os.close(saved)
        os.close(read_fd)
        logmod.configure("info")


def json_lines(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.splitlines()]


def test_logging_into_a_full_pipe_reports_the_drops_once_it_drains() -> None:
    with stdout_on_a_pipe() as stdout_pipe:
        logmod.install(logmod.prepare("info", "json", "stdout", "", buffer=16384))
        log = logmod.get_logger()
        with must_not_block():
            for i in range(3000):
                log.info("test.line", n=i)
        dropped = logmod.dropped_total()
        assert dropped > 0 and logmod.backlog() >= 0
        received = b""
        with must_not_block():
            while logmod.backlog() >= 0:
                received += read_all(stdout_pipe)
                logmod.flush()
        events = json_lines(received + read_all(stdout_pipe))
        lines = [e["n"] for e in events if e["event"] == "test.line"]
        assert lines == list(range(len(lines)))
        assert events[-1]["event"] == "log.dropped" and events[-1]["level"] == "warning"
        assert events[-1]["dropped"] == dropped == events[-1]["total"]
        assert len(lines) + dropped == 3000


def test_a_forked_child_does_not_send_its_parents_queued_lines() -> None:
    with stdout_on_a_pipe() as stdout_pipe:
        logmod.install(logmod.prepare("info", "json", "stdout", "", buffer=1 << 20))
        log = logmod.get_logger()
        with must_not_block():
            for i in range(2000):  # more than the pipe holds: the rest is queued
                log.info("parent.line", n=i)
        assert logmod.backlog() >= 0
        pid = os.fork()
        if pid == 0:  # the child: nothing queued, nothing dropped, its own pid in its lines
            ok = logmod.backlog() < 0 and logmod.dropped_total() == 0
            ok = ok and logmod._identity["pid"] == os.getpid()
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        received = b""
        with must_not_block():
            while logmod.backlog() >= 0:
                received += read_all(stdout_pipe)
                logmod.flush()
        lines = [e["n"] for e in json_lines(received + read_all(stdout_pipe))]
        assert lines == list(range(2000))  # each once: the child sent none of them


def test_the_stdout_pipe_itself_stays_blocking() -> None:
    with stdout_on_a_pipe() as stdout_pipe:
        logmod.configure("info", "json", "stdout", "")
        logmod.get_logger().info("test.line", n=1)
        assert os.get_blocking(1)  # the description shared with the parent is untouched
        assert json_lines(read_all(stdout_pipe))[0]["n"] == 1


def test_a_log_file_that_cannot_be_opened_leaves_the_old_logging_in_place(
        tmp_path: Path) -> None:
    good = tmp_path / "good.log"
    try:
        logmod.configure("info", "json", "file", str(good))
        with pytest.raises(logmod.LogSetupError) as raised:
            logmod.configure("debug", "json", "file", str(tmp_path / "missing" / "x.log"))
        assert "missing/x.log: No such file or directory" in str(raised.value)
        assert raised.value.key == "log.file"
        with pytest.raises(logmod.LogSetupError, match="Is a directory"):
            logmod.configure("debug", "json", "file", tempfile.gettempdir())
        logmod.get_logger().debug("not.written")
        logmod.get_logger().info("still.here")
    finally:
        logmod.configure("info")
    assert [e["event"] for e in json_lines(good.read_bytes())] == ["still.here"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_another_users_pipe_is_written_without_blocking_too() -> None:
    """mpd run as a user who may not reopen its stdout pipe (root's, mode 0600): the sink
    falls back to pwritev2(RWF_NOWAIT), and a full pipe still never blocks it."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: nobody, with root's pipe as its log fd
        code = 1
        try:
            os.close(read_fd)
            os.setgid(65534)
            os.setuid(65534)
            drops = logsink.Drops()
            sink = logsink.open_fd(write_fd, drops, limit=8192)
            if not logsink.nowait_supported(write_fd):
                code = 77  # an older kernel: this fallback is not there
            else:
                fill(sink)
                whole = isinstance(sink, logsink.NowaitSink) and os.get_blocking(write_fd)
                code = 0 if whole and drops.total > 0 and sink.queued > 0 else 2
        finally:
            os._exit(code)
    os.close(write_fd)
    try:
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if code == 77:
            pytest.skip("pwritev2(RWF_NOWAIT) is not supported on pipes by this kernel")
        assert code == 0
        check_whole_and_in_order(read_all_blocking_until_eof(read_fd))
    finally:
        os.close(read_fd)


def read_all_blocking_until_eof(fd: int) -> bytes:
    out = b""
    while chunk := os.read(fd, 1 << 16):
        out += chunk
    return out


# --- the loops' side --------------------------------------------------------------------------

def fifo_log(tmp_path: Path) -> tuple[Path, int]:
    """A FIFO as the log file, with a reader that does not read yet."""
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    return fifo, os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)


def test_a_selector_loop_waits_on_the_backlog_and_flushes_it(tmp_path: Path) -> None:
    import selectors

    fifo, reader = fifo_log(tmp_path)
    selector = selectors.DefaultSelector()
    log = logmod.get_logger()
    try:
        logmod.configure("info", "json", "file", str(fifo))
        logmod.watch(selector)
        assert selector.get_map() == {}  # nothing queued: nothing to wait for
        with must_not_block():
            for i in range(2000):
                log.info("test.line", n=i)
        logmod.watch(selector)
        assert [k.fd for k in selector.get_map().values()] == [logmod.backlog()]
        received = b""
        with must_not_block():
            while logmod.backlog() >= 0:  # the loop: wait, then the callback
                received += read_all(reader)
                for key, events in selector.select(1.0):
                    key.data(events)
                logmod.watch(selector)
        assert selector.get_map() == {}
        lines = [e["n"] for e in json_lines(received + read_all(reader))]
        assert lines == list(range(2000))
    finally:
        logmod.configure("info")
        logmod.watch(selector)
        selector.close()
        os.close(reader)


def test_a_reload_unregisters_the_watched_sink_before_closing_it(tmp_path: Path) -> None:
    import select

    fifo, reader = fifo_log(tmp_path)
    epoll = select.epoll()
    try:
        logmod.configure("info", "json", "file", str(fifo))
        with must_not_block():
            for i in range(2000):
                logmod.get_logger().info("test.line", n=i)
        watched = logmod.watch_epoll(epoll)
        assert watched >= 0 and watched == logmod.backlog()
        logmod.configure("info", "json", "file", str(tmp_path / "new.log"))
        # The FIFO's sink is closed; a new fd takes its number (a client, in a worker) and
        # the loop registers it. The loop's next turn must leave that one alone.
        reuse, other = os.pipe()
        try:
            assert reuse == watched  # the lowest free number: the closed sink's
            epoll.register(reuse, select.EPOLLIN)
            assert logmod.watch_epoll(epoll) == -1
            epoll.modify(reuse, select.EPOLLIN)  # ENOENT if the log had unregistered it
        finally:
            os.close(reuse)
            os.close(other)
        assert logmod.dropped_total() > 0  # what the FIFO had queued was dropped, counted
    finally:
        logmod.configure("info")
        epoll.close()
        os.close(reader)
