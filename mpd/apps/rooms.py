"""rooms: a chat. A client joins a room by name; every line it sends reaches every other
member of the room, verbatim, and no one else.

    client -> server   J, one length byte L (1..255), L bytes of room name
    server -> client   ok <n>\\n        once it is a member (n: members now, it included)
    client -> server   lines ending in \\n (at most max_line bytes each), each delivered
                       to every other member, in the order its sender sent them

A room is a key group: its members meet in the worker that owns the room's name, and a
line is a local loop over them (one buffer shared by all). HAProxy can route the first
frame by the room's name with `req.payload_lv(1,1)` (packaging/haproxy/).

The room counts the lines it carried (`lines`, its state, which moves with it)."""

from __future__ import annotations

from typing import Any

from mpd.apps.interface import Application, Group, Protocol, ProtocolError, Transport

JOIN = 0x4A  # "J"
MAX_LINE = 65536


class Room(Group):
    def __init__(self, key: Any = None):
        self.lines = 0  # lines carried, since the room began (its state)

    def member_joined(self, transport: Transport) -> None:
        transport.write(b"ok %d\n" % len(self.members))

    def export_state(self) -> dict[str, int]:
        return {"lines": self.lines}

    def state_restored(self, state: Any) -> None:
        self.lines = state["lines"] if isinstance(state, dict) else 0


class Member(Protocol):
    """One client: its join frame, then its lines."""

    def __init__(self, max_line: int = MAX_LINE):
        self.transport: Any = None
        self.max_line = max_line
        self.buf = b""  # a frame or line not complete yet
        self.pending = False
        self.joined = False

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        if not self.joined:
            self.join(buf)
            return
        end = buf.rfind(b"\n") + 1
        if end:
            room = self.transport.group
            lines = buf.count(b"\n", 0, end)
            room.lines += lines
            room.broadcast(buf[:end], exclude=self.transport)  # every whole line at once
            self.transport.count_requests(lines)
        self.buf = buf[end:]
        self.pending = bool(self.buf)
        if len(self.buf) > self.max_line:
            raise ProtocolError(f"a line of over {self.max_line} bytes")

    def join(self, buf: bytes) -> None:
        if buf[0] != JOIN or (len(buf) > 1 and buf[1] == 0):
            self.transport.write(b"error: expected J, a length byte (1-255) and a room name\n")
            self.transport.close()
            return
        if len(buf) < 2 or len(buf) < 2 + buf[1]:
            self.buf, self.pending = buf, True  # the frame is not whole yet
            return
        end = 2 + buf[1]
        self.buf, self.pending, self.joined = b"", False, True
        self.transport.join(buf[2:end], buf[end:])

    def export_state(self) -> dict[str, Any]:
        return {"joined": self.joined, "buf": self.buf}

    def state_restored(self, state: Any) -> None:
        self.joined, self.buf = bool(state["joined"]), bytes(state["buf"])
        self.pending = bool(self.buf)


def application(max_line: int = MAX_LINE) -> Application:
    if not isinstance(max_line, int) or not 1 <= max_line <= 1 << 24:
        raise ValueError(f"max_line must be an integer from 1 to {1 << 24}, got {max_line!r}")
    return Application(name="rooms", protocol=lambda: Member(max_line), group=Room,
                       refusal=b"error: server full\n")
