"""Where log lines go, without ever blocking: a bounded queue in front of each sink.

A line is written at once when nothing is queued; what the sink does not take now (a full
pipe, a busy journald) waits in the queue, and the event loop writes it when the sink's
fd turns writable (mpd.log's backlog_fd() and flush()). Lines are dropped only when the
queue is full, and counted; the count is reported once the queue empties.

How each kind of fd is written without O_NONBLOCK on an inherited open file description
(the flag would be shared with the parent shell and every other process on it):
- pipe, FIFO, tty: reopened through /proc/self/fd/N with O_NONBLOCK: a new description of
  its own (if that is refused, pwritev2 with RWF_NOWAIT). Up to PIPE_BUF bytes of whole
  lines go in one write, which a pipe takes whole or not at all, so lines of several
  processes never interleave.
- stream socket (journald's stdout stream): send(MSG_DONTWAIT) on a dup of the fd.
- regular file: plain write(2); a file cannot say EAGAIN, so nothing ever queues.
- datagram socket (journald's native socket, /dev/log): our own socket, connected, so
  that poll() says writable only when the receiver's queue has room."""

from __future__ import annotations

import errno
import itertools
import os
import select
import socket
import stat
import time
from collections import deque
from typing import Callable

QUEUE_BYTES = 1 << 20  # bytes one sink may hold for a slow reader, per process
ATOMIC = select.PIPE_BUF  # a write of at most this many bytes to a pipe is never split
RETRY = 0.01  # seconds between write attempts from write() while lines are queued
RECONNECT = 1.0  # seconds between reconnects of a datagram socket whose reader went away
# send() on a datagram socket whose reader is gone or was never there
RECONNECT_ERRORS = (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTDIR, errno.ENOTCONN,
                    errno.EDESTADDRREQ)


class Drops:
    """Lines this process could not deliver: the total, and those not yet reported."""

    __slots__ = ("total", "unreported")

    def __init__(self) -> None:
        self.total = 0
        self.unreported = 0

    def add(self, lines: int) -> None:
        self.total += lines
        self.unreported += lines


class Sink:
    """One destination with a bounded queue. Subclasses provide _send(data) -> bytes taken
    (raising BlockingIOError when the sink takes nothing now) and fileno()."""

    stream = True  # bytes may be taken in part; datagrams go whole or not at all
    count_refused = True  # a line write() refuses is lost (False: the caller sends it on)

    def __init__(self, drops: Drops, limit: int = QUEUE_BYTES):
        self.drops = drops
        self.limit = limit
        self.queue: deque[bytes] = deque()
        self.queued = 0  # bytes in the queue
        self.partial = False  # the head is the rest of a line the sink took in part
        self.retry_at = 0.0
        self.on_caught_up: Callable[[], None] | None = None  # set by mpd.log: log.dropped

    def _send(self, data: bytes) -> int:
        raise NotImplementedError

    def fileno(self) -> int:
        raise NotImplementedError

    def write(self, data: bytes) -> bool:
        """Write or queue one line (or datagram); never blocks. False when the sink
        refused it (EPIPE, EMSGSIZE, ...): counted as dropped unless count_refused is
        off, for a caller that sends it elsewhere. A line that finds the queue full is
        dropped and counted."""
        if self.queue:
            now = time.monotonic()
            if now >= self.retry_at:  # no event loop may be watching: try now and then
                self.flush()
            if self.queue:
                self._enqueue(data)
                return True
        try:
            taken = self._send(data)
        except (BlockingIOError, InterruptedError):
            taken = 0
        except OSError:
            if self.count_refused:
                self.drops.add(1)
            return False
        if taken != len(data):
            if taken:
                self.partial = True
            self._enqueue(data[taken:], force=bool(taken))
        elif self.drops.unreported and self.on_caught_up is not None:
            self.on_caught_up()
        return True

    def _enqueue(self, data: bytes, force: bool = False) -> None:
        if not force and self.queued + len(data) > self.limit:
            self.drops.add(1)
            return
        self.queue.append(data)
        self.queued += len(data)

    def flush(self) -> bool:
        """Write what the sink takes now; True when nothing is left queued."""
        queue = self.queue
        while queue:
            batch, count = self._batch()
            try:
                taken = self._send(batch)
            except InterruptedError:
                continue
            except BlockingIOError:
                self.retry_at = time.monotonic() + RETRY
                return False
            except OSError:
                self._lose(count)
                continue
            self._consume(taken, count)
            if taken < len(batch):
                self.retry_at = time.monotonic() + RETRY
                return False
        if self.drops.unreported and self.on_caught_up is not None:
            self.on_caught_up()
        return not queue

    def _batch(self) -> tuple[bytes, int]:
        """The next write: whole lines up to ATOMIC bytes (so that a pipe takes them whole);
        a longer line, the rest of a split one, or a datagram goes alone."""
        queue = self.queue
        head = queue[0]
        if not self.stream or self.partial or len(head) >= ATOMIC or len(queue) == 1:
            return head, 1
        size, count = len(head), 1
        for item in itertools.islice(queue, 1, None):
            if size + len(item) > ATOMIC:
                break
            size += len(item)
            count += 1
        return b"".join(itertools.islice(queue, count)), count

    def _consume(self, taken: int, count: int) -> None:
        """Remove `taken` bytes of the first `count` queued items."""
        queue = self.queue
        self.queued -= taken
        for _ in range(count):
            head = queue[0]
            if taken >= len(head):
                taken -= len(head)
                queue.popleft()
                self.partial = False
            else:
                queue[0] = head[taken:]
                self.partial = True
                return

    def _lose(self, count: int) -> None:
        """A hard error (EPIPE: the reader is gone; ENOSPC, EIO, ...) on the first `count`
        queued items: they are lost, and counted."""
        for _ in range(count):
            self.queued -= len(self.queue.popleft())
        self.partial = False
        self.drops.add(count)

    def discard(self) -> int:
        """Forget what is queued (a forked child: those lines are the parent's)."""
        count = len(self.queue)
        self.queue.clear()
        self.queued = 0
        self.partial = False
        return count

    def write_out(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the queue to go out (at exit); True if it did."""
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self.fileno(), select.POLLOUT)
        while not self.flush():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            poller.poll(left * 1000)
        return True

    def close(self) -> None:
        """Release what the sink opened (never the fd it was given)."""

    def forget(self) -> None:
        """Let go of the fd without closing it: python-daemon closed it already, and its
        number may belong to something else now."""
        self.discard()


class FdSink(Sink):
    """write(2) to an fd: a regular file as it is, anything else through a non-blocking
    description of its own (see the module's docstring)."""

    def __init__(self, fd: int, drops: Drops, limit: int = QUEUE_BYTES, own: bool = False):
        super().__init__(drops, limit)
        self.fd = fd
        self.own = own  # we opened it: close() closes it
        self._send = self._write  # type: ignore[method-assign]

    def _write(self, data: bytes) -> int:
        return os.write(self.fd, data)

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.own:
            self.own = False
            os.close(self.fd)

    def forget(self) -> None:
        self.discard()
        self.own = False


class NowaitSink(FdSink):
    """An fd we may not reopen: each write is pwritev2(RWF_NOWAIT), per call."""

    def __init__(self, fd: int, drops: Drops, limit: int = QUEUE_BYTES):
        super().__init__(fd, drops, limit)
        pwritev, nowait = os.pwritev, os.RWF_NOWAIT
        self._send = lambda data: pwritev(fd, [data], -1, nowait)  # type: ignore[method-assign]


class OwnSocket(Sink):
    """A sink that writes to a socket object of its own."""

    sock: socket.socket

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def forget(self) -> None:
        self.discard()
        self.sock.detach()


class SocketSink(OwnSocket):
    """send(MSG_DONTWAIT) on a connected stream socket shared with other processes."""

    def __init__(self, sock: socket.socket, drops: Drops, limit: int = QUEUE_BYTES):
        super().__init__(drops, limit)
        self.sock = sock
        send, flags = sock.send, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
        self._send = lambda data: send(data, flags)  # type: ignore[method-assign]


class DatagramSink(OwnSocket):
    """Datagrams to an AF_UNIX socket path (journald's, /dev/log), one per entry, over a
    non-blocking socket of our own connected to it. If the reader restarts, the same
    socket connects again (at most once per RECONNECT seconds): its fd, which an event
    loop may be watching, stays the same."""

    stream = False

    def __init__(self, path: str, drops: Drops, limit: int = QUEUE_BYTES,
                 connect_now: bool = True):
        super().__init__(drops, limit)
        self.path = path
        self.reconnect_at = 0.0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                                  | socket.SOCK_NONBLOCK)
        try:
            self.sock.connect(path)
        except OSError:  # nobody listens there (yet)
            if connect_now:
                self.sock.close()
                raise
            self.reconnect_at = time.monotonic() + RECONNECT

    def _send(self, data: bytes) -> int:  # type: ignore[override]
        try:
            return self.sock.send(data)
        except OSError as e:
            now = time.monotonic()
            if e.errno not in RECONNECT_ERRORS or now < self.reconnect_at:
                raise
            self.reconnect_at = now + RECONNECT
            self.sock.connect(self.path)  # the reader restarted: a new socket at the path
            return self.sock.send(data)


def open_fd(fd: int, drops: Drops, limit: int = QUEUE_BYTES) -> Sink:
    """A sink for an inherited fd (stdout), never setting O_NONBLOCK on the fd itself."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return FdSink(fd, drops, limit)  # closed: every line fails with EBADF, counted
    if stat.S_ISREG(mode):
        return FdSink(fd, drops, limit)
    if stat.S_ISSOCK(mode):
        dup = os.dup(fd)
        try:
            sock = socket.socket(fileno=dup)
        except OSError:
            os.close(dup)
            return FdSink(fd, drops, limit)
        return SocketSink(sock, drops, limit)
    try:
        own = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC
                      | os.O_NOCTTY | os.O_APPEND)
    except OSError:
        # Another user's pipe (EACCES), no /proc, no reader left on a FIFO (ENXIO):
        # pwritev2(RWF_NOWAIT) says EAGAIN without the flag where the kernel supports it
        # for this kind of file (pipes, on recent kernels); else write to the fd as it
        # is, and a full pipe blocks (the README says so).
        if nowait_supported(fd):
            return NowaitSink(fd, drops, limit)
        return FdSink(fd, drops, limit)
    return FdSink(own, drops, limit, own=True)


def nowait_supported(fd: int) -> bool:
    try:
        os.pwritev(fd, [b""], -1, os.RWF_NOWAIT)  # nothing written; EOPNOTSUPP if unsupported
    except (OSError, AttributeError):
        return False
    return True


class FileSink(FdSink):
    """A log file named by its path. reopen() puts the file now at that path (logrotate
    renamed the old one away) in place of the old one under the same fd number, in one
    dup3(): until then lines go to the old file, from then on to the new one, and none is
    lost in between. What is queued (only a FIFO named as the log file ever queues) stays
    queued and goes to the new file."""

    def __init__(self, path: str, drops: Drops, limit: int = QUEUE_BYTES):
        super().__init__(open_append(path), drops, limit, own=True)
        self.path = path

    def reopen(self) -> None:
        """Raises OSError when the path cannot be opened: the old file stays in use."""
        self.flush()  # what the old file takes now goes there, in order
        fresh = open_append(self.path)
        try:
            os.dup2(fresh, self.fd, inheritable=False)  # atomic: no moment without a file
        finally:
            os.close(fresh)


def open_append(path: str) -> int:
    """A log file's fd, opened for appending (OSError when it cannot be). O_NONBLOCK does
    nothing to a regular file, and keeps a FIFO or a tty named as the log file from
    blocking: a FIFO without a reader fails at once (ENXIO) instead of waiting for one."""
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK
                   | os.O_NOCTTY, 0o640)


def open_file(path: str, drops: Drops) -> FileSink:
    """A sink for the log file at `path` (OSError when it cannot be opened)."""
    return FileSink(path, drops)
