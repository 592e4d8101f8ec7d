"""The master <-> worker channel: an AF_UNIX SOCK_SEQPACKET socketpair per worker, one
message (messages.py) per datagram, so no framing, and fds travel with their message.
Both ends are non-blocking: a send that meets EAGAIN is queued, its fds held open, until
the socket is writable again, so neither side ever blocks on or dies of a slow peer."""

from __future__ import annotations

import array
import contextlib
import errno
import os
import socket
from collections import deque

from mpd.logs.log import get_logger
from mpd.wire import legacy
from mpd.wire.messages import VERSION, Client, Kind, Message, decode

MAX_MESSAGE = 128 * 1024  # bytes in one datagram; fits the default unix socket buffer
MAX_FDS = 64  # fds one message may carry (a chunk of a group's move carries its members')
MAX_QUEUE = 100_000  # queued messages before the peer counts as gone
VERSIONS = (legacy.VERSION, VERSION)  # what a channel can speak: the release before's too
FD_SIZE = array.array("i").itemsize
# Plain ints, looked up once: socket's flags are IntFlag enums, slow to combine per message.
RECV_FLAGS = int(socket.MSG_CMSG_CLOEXEC)
TRUNCATED = int(socket.MSG_CTRUNC | socket.MSG_TRUNC)
DATA_TRUNCATED = int(socket.MSG_TRUNC)
SOL_SOCKET, SCM_RIGHTS = int(socket.SOL_SOCKET), int(socket.SCM_RIGHTS)
ANCILLARY_SPACE = socket.CMSG_SPACE(MAX_FDS * FD_SIZE)

log = get_logger()


class ChannelClosed(Exception):
    """The peer closed its end (EOF) or the socket failed."""


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:  # noqa: SIM105 - a hand-off closes its fd twice; suppress() costs more
            os.close(fd)
        except OSError:
            pass


class Channel:
    """One end of a worker's socketpair. Owns every fd handed to send() until it is sent."""

    # One receive buffer for the whole process, made on first use: a buffer per channel
    # cost the master 128 KiB of heap per respawn. A process reads one channel at a time,
    # and receive() copies each message out before it returns.
    buffer = bytearray()
    view = memoryview(buffer)

    def __init__(self, sock: socket.socket, peer: str, version: int = VERSION):
        sock.setblocking(False)
        self.sock = sock
        self.peer = peer  # for log lines: "master" or "slot 3"
        self.version = version  # what the peer speaks (VERSIONS)
        self.queue: deque[tuple[bytes, list[int]]] = deque()
        self.queued_fds = 0  # fds held open in the queue: they count against our fd limit
        self.lost = 0  # clients whose fd the kernel could not pass us (no fd slot free)
        if not Channel.buffer:
            Channel.buffer = bytearray(MAX_MESSAGE)
            Channel.view = memoryview(Channel.buffer)

    @staticmethod
    def pair() -> tuple[socket.socket, socket.socket]:
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def wants_write(self) -> bool:
        return bool(self.queue)

    def send(self, message: Message, fds: list[int] | tuple[int, ...] = ()) -> None:
        """Send now, or queue on EAGAIN. Takes ownership of `fds`: they are closed once
        sent. Raises ValueError (too big, or a message the peer's version cannot carry) or
        ChannelClosed; the fds stay the caller's then."""
        data = message.encode() if self.version == VERSION else legacy.encode(message)
        if len(data) > MAX_MESSAGE:
            raise ValueError(f"channel message of {len(data)} bytes is over {MAX_MESSAGE}")
        if len(fds) > MAX_FDS:
            raise ValueError(f"channel message with {len(fds)} fds, over {MAX_FDS}")
        fds = list(fds)
        if self.queue or not self._send_one(data, fds):
            if len(self.queue) >= MAX_QUEUE:
                raise ChannelClosed(f"{self.peer}: {MAX_QUEUE} messages queued, peer not "
                                    "reading")
            self.queue.append((data, fds))
            self.queued_fds += len(fds)

    def _send_one(self, data: bytes, fds: list[int]) -> bool:
        """True when sent (fds then closed), False on EAGAIN."""
        try:
            if fds:  # socket.send_fds(), without its Python frame and enum lookups
                self.sock.sendmsg([data], [(SOL_SOCKET, SCM_RIGHTS, array.array("i", fds))])
            else:
                self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as e:
            # ETOOMANYREFS: the peer has not yet taken as many fds in flight as a user may
            # send (RLIMIT_NOFILE, when not root); like a full buffer, it passes as it reads.
            if e.errno in (errno.ENOBUFS, errno.ETOOMANYREFS):
                return False
            raise ChannelClosed(f"{self.peer}: send failed: {e.strerror}") from None
        close_fds(fds)
        return True

    def flush(self) -> bool:
        """Send what is queued; True once the queue is empty. Call on EVENT_WRITE."""
        while self.queue:
            data, fds = self.queue[0]
            if not self._send_one(data, fds):
                return False
            self.queue.popleft()
            self.queued_fds -= len(fds)
        return True

    def receive(self, limit: int = 64) -> list[Message]:
        """Up to `limit` messages that are waiting. Malformed ones are logged and dropped
        (their fds closed). Raises ChannelClosed on EOF once every message before it has
        been returned."""
        out: list[Message] = []
        reset_seen = False
        for _ in range(limit):
            try:
                size, ancillary, flags, _addr = self.sock.recvmsg_into(
                    [self.buffer], ANCILLARY_SPACE, RECV_FLAGS)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionResetError:
                # The peer closed with our messages unread. For datagram-style sockets the
                # kernel reports that once, *before* the messages the peer sent us, which
                # are still queued (a retiring worker's last HANDOFFs): read on.
                if reset_seen:
                    raise ChannelClosed(f"{self.peer}: connection reset") from None
                reset_seen = True
                continue
            except OSError as e:
                raise ChannelClosed(f"{self.peer}: receive failed: {e.strerror}") from None
            data = bytes(self.view[:size])
            fds: list[int] = []
            for level, kind, payload in ancillary:
                if level == SOL_SOCKET and kind == SCM_RIGHTS:
                    fds += array.array("i", payload[:len(payload) - len(payload) % FD_SIZE])
            if not data and not fds:
                if out:  # deliver what came before the EOF; the next call reports it
                    break
                raise ChannelClosed(f"{self.peer}: end of file")
            if flags & TRUNCATED:
                close_fds(fds)
                self.truncated(data, flags)
                continue
            try:
                out.append(decode(data, fds) if self.version == VERSION
                           else legacy.decode(data, fds))
            except ValueError as e:
                close_fds(fds)
                log.error("channel.error", peer=self.peer, error=str(e), size=len(data))
        return out

    def truncated(self, data: bytes, flags: int) -> None:
        """The kernel could not pass a message whole: too big (MSG_TRUNC), or this process
        had no free fd for what it carried (MSG_CTRUNC; the kernel closed those fds). A
        client so cut is lost: count it and say whose it was."""
        message = None
        if not flags & DATA_TRUNCATED:
            with contextlib.suppress(ValueError):
                message = (decode(data, []) if self.version == VERSION
                           else legacy.decode(data, []))
        if isinstance(message, Client):
            self.lost += 1
            log.error("fd.lost", peer=self.peer, kind=Kind(message.kind).name,
                      key=message.key, lost=self.lost,
                      error="no free fd to receive the client (EMFILE)")
        else:
            log.error("channel.error", peer=self.peer, error="message or fds truncated",
                      size=len(data))

    def close(self) -> None:
        """Close the socket and every fd still waiting in the queue."""
        while self.queue:
            close_fds(self.queue.popleft()[1])
        self.queued_fds = 0
        self.sock.close()
