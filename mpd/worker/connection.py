"""One client connection as a worker holds it: its socket, the bytes in each direction
that are not done yet, its routing key, where it stands in a hand-off, who the client
really is when a proxy said so (server.proxy_protocol), and when it last did something
(for the timeouts that the worker's upkeep enforces)."""

from __future__ import annotations

import socket

# Where a connection stands; one field, so no two flags can disagree. The states a
# connection is not served in come last: one comparison (>= WAITING) tells them apart.
SERVING = 0  # served here (its key, if any, is ours), or not yet keyed
PINNED = 1  # a hand-off failed: served here whatever its key
WAITING = 2  # owned elsewhere: replies already due go out first; not read meanwhile
HEADER = 3  # server.proxy_protocol: its PROXY header is not complete yet (proxyphase.py)
NEVER = 0.0  # `seen` of a client that has not sent a whole frame yet


class Connection:
    __slots__ = ("sock", "fd", "inbuf", "outbuf", "key", "owner", "table", "handoff",
                 "client", "header_due", "born", "seen", "eof")

    def __init__(self, sock: socket.socket, now: float):
        self.sock = sock
        self.fd = sock.fileno()
        self.inbuf = bytearray()  # received, not yet consumed (an incomplete frame)
        self.outbuf = bytearray()  # replies the client has not taken yet
        self.key: int | None = None
        self.owner: int | None = None  # the slot that owns its key, when it has one,
        self.table = 0  # by a slot table of this many slots (ROUTES may come before we hand off)
        self.handoff = SERVING
        # With server.proxy_protocol only: who the client is (the address that connected,
        # then the real one its PROXY header names), and until when it may take to send
        # that header (0.0 once it has).
        self.client: tuple[str, int] | None = None
        self.header_due = 0.0
        self.born = now  # the worker loop's clock (monotonic) when it came
        self.seen = NEVER  # when it last sent a whole frame or took some of its replies
        self.eof = False  # the client half-closed: write what is due, then close

    @property
    def idle(self) -> bool:
        return not self.inbuf and not self.outbuf

    def bind(self, key: int, owner: int | None, table: int) -> None:
        """The client named `key`, owned by slot `owner` under a table of `table` slots."""
        self.key, self.owner, self.table = key, owner, table
