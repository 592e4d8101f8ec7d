"""One client connection as a worker holds it, and the transport its protocol object
sees (apps/interface.py's Transport): its socket, what mpd holds of its input (bytes read
but not yet given to the protocol: a join's rest, a hand-off's carried bytes), its queue
of output (references to shared buffers: a broadcast is one buffer for every member), its
key and group, where it stands (its phase), and its clocks for the timeouts.

Output is queued and sent at the end of the loop's turn, one system call per connection
for everything due to it (Clients.flush_dirty). The transport's methods that change more
than the connection itself go to the worker's client table (clients.py)."""

from __future__ import annotations

import select
import socket
from typing import Any, Callable

from mpd.apps.interface import CLOSED, OVERFLOW, Group, Timer
from mpd.wire.peer import Address
from mpd.wire.routing import Key

# Where a connection stands. The loop's inline path serves only SERVING connections; the
# others are handled by the client table.
SERVING = 0
LEAVING = 1  # joined a key another worker serves: due output goes first, then it goes
HEADER = 2  # server.proxy_protocol: its PROXY header is not complete yet (proxyphase.py)
FROZEN = 3  # its group is moving: not read, and what it is given waits (moves.py)
CLOSED_PHASE = 4
NEVER = 0.0  # `seen` of a client that has not completed a frame yet
OUT = select.EPOLLOUT


class Connection:
    __slots__ = ("sock", "fd", "clients", "protocol", "inq", "outq", "outbytes", "mask",
                 "key", "key_hash", "group", "gseq", "phase", "pinned", "held", "peer",
                 "header_due", "born", "seen", "eof", "closing", "paused")

    def __init__(self, sock: socket.socket, clients: Any, now: float):
        """`clients`: the worker's client table (clients.py), which made it."""
        self.sock = sock
        self.fd = sock.fileno()
        self.clients = clients
        self.protocol: Any = None  # made at once, or lazily for a stateless offer
        self.inq = b""  # bytes mpd holds for the protocol (a join's rest, carried bytes)
        self.outq: list[Any] = []  # bytes (and memoryviews of a partly sent one) due
        self.outbytes = 0
        self.mask = 0  # the epoll events it is registered for
        self.key: Key | None = None
        self.key_hash = 0
        self.group: Group | None = None
        self.gseq = 0  # the ADOPT that brought it, for a group's key (GroupEnded)
        self.phase = SERVING
        self.pinned = False  # a hand-off failed: served here whatever its key (no groups)
        self.held = False  # input is held (inq, or the protocol's partial frame)
        self.peer: Address | None = None  # the client (a PROXY header's, when it names one)
        self.header_due = 0.0  # server.proxy_protocol: the header's deadline, until it is in
        self.born = now  # the loop's clock (monotonic) when it came
        self.seen = NEVER  # when it last completed a frame or took some of its output
        self.eof = False  # the client half-closed
        self.closing = ""  # why it is closed once its output is written ("": it is not)
        self.paused = False  # the protocol paused reading

    # --- the transport -------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.closing or self.phase == CLOSED_PHASE:
            return  # closing or closed: what it would say is not sent
        if not isinstance(data, bytes):
            data = bytes(data)
        if not data:
            return
        # Frozen (its group is arriving here): queued, and sent once thawed (clients.py).
        if not self.outq and self.phase != FROZEN:
            self.clients.dirty.append(self)
        self.outq.append(data)
        self.outbytes += len(data)
        # A client that does not take what it is sent: past the bound, closed with a reset
        # at the end of the turn (what a flush could not send counts: clients.py).
        if self.outbytes > self.clients.max_output and self.mask & OUT:
            self.closing = OVERFLOW
            self.clients.dirty.append(self)

    def writelines(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.write(chunk)

    def close(self) -> None:
        self.clients.close_when_written(self, CLOSED)

    def abort(self) -> None:
        self.clients.close(self, CLOSED, reset=True)

    def is_closing(self) -> bool:
        return bool(self.closing) or self.phase == CLOSED_PHASE

    def pause_reading(self) -> None:
        if not self.paused:
            self.paused = True
            self.clients.watch(self)

    def resume_reading(self) -> None:
        if self.paused:
            self.paused = False
            self.clients.watch(self)
            if self.inq:
                self.clients.feed_held(self)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            if self.peer is not None:
                return self.peer
            try:
                return self.sock.getpeername()
            except OSError:
                return default
        if name == "sockname":
            try:
                return self.sock.getsockname()
            except OSError:
                return default
        if name == "key":
            return self.key
        return self.clients.extra_info(name, default)

    def get_protocol(self) -> Any:
        return self.protocol

    def join(self, key: bytes | str | int, rest: bytes = b"") -> None:
        self.clients.join(self, key, rest)

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> Timer:
        return self.clients.timers.call_later(self, delay, callback, args)

    def count_requests(self, frames: int = 1) -> None:
        self.clients.stats["requests"] += frames

    # --- mpd's own ---------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        """Nothing held in either direction: a graceful stop may close it now."""
        return not self.held and not self.outq

    def __repr__(self) -> str:
        return f"<Connection fd={self.fd} key={self.key!r} phase={self.phase}>"
