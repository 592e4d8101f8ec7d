"""One client connection as a worker holds it: its socket, the bytes in each direction
that are not done yet, its routing key, and where it stands in a hand-off."""

from __future__ import annotations

import socket

# Where a connection stands in a hand-off; one field, so no two flags can disagree.
SERVING = 0  # served here (its key, if any, is ours), or not yet keyed
WAITING = 1  # owned elsewhere: replies already due go out first; not read meanwhile
PINNED = 2  # a hand-off failed: served here whatever its key


class Connection:
    __slots__ = ("sock", "fd", "inbuf", "outbuf", "key", "owner", "table", "handoff")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.fd = sock.fileno()
        self.inbuf = bytearray()  # received, not yet consumed (an incomplete frame)
        self.outbuf = bytearray()  # replies the client has not taken yet
        self.key: int | None = None
        self.owner: int | None = None  # the slot that owns its key, when it has one,
        self.table = 0  # by a slot table of this many slots (ROUTES may come before we hand off)
        self.handoff = SERVING

    @property
    def idle(self) -> bool:
        return not self.inbuf and not self.outbuf

    def bind(self, key: int, owner: int | None, table: int) -> None:
        """The client named `key`, owned by slot `owner` under a table of `table` slots."""
        self.key, self.owner, self.table = key, owner, table
