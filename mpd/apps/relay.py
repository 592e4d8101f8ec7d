"""relay: the seed's streaming case. One publisher per stream; every byte it sends is
copied to every player of the stream, from the moment the player joined.

    client -> server   P (publish) or S (play), one length byte L (1..255), L bytes of
                       stream name
    server -> client   ok <n>\\n        once it is in the stream (n: its members now, the
                       publisher and the players, it included); a second publisher gets
                       "error: stream has a publisher\\n" and is closed
    publisher -> server   any bytes: copied to every player, byte for byte
    players               what they send is read and thrown away

When the publisher leaves, each player is closed once everything due to it is written
(the stream ended). A player that falls behind by more than workers.max_output_buffer is
cut off with a reset (client.overflow): the kernel frees its queue at once, and the
publisher and the other players go on. A stream is a key group: its publisher and
players meet in the worker that owns its name, and a chunk is one buffer shared by every
player's queue."""

from __future__ import annotations

from typing import Any

from mpd.apps.interface import Application, Group, Protocol, Transport

PUBLISH, PLAY = 0x50, 0x53  # "P", "S"


class Stream(Group):
    def __init__(self, key: Any = None):
        self.publisher: Transport | None = None

    def member_joined(self, transport: Transport) -> None:
        if transport.get_protocol().role == PUBLISH:
            if self.publisher is not None:
                transport.write(b"error: stream has a publisher\n")
                transport.close()
                return
            self.publisher = transport
        transport.write(b"ok %d\n" % len(self.members))

    def member_left(self, transport: Transport, reason: str) -> None:
        if transport is self.publisher:
            self.publisher = None
            for player in self.members:
                player.close()  # once its queue is written: the stream ended

    def state_restored(self, state: Any) -> None:
        for member in self.members:  # the publisher came along, one of the members
            if member.get_protocol().role == PUBLISH:
                self.publisher = member


class Peer(Protocol):
    """A publisher or a player: its first frame says which."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.role = 0
        self.buf = b""  # a first frame not complete yet
        self.pending = False

    def data_received(self, data: bytes) -> None:
        if self.role:
            if self.role == PUBLISH:
                self.transport.group.broadcast(data, exclude=self.transport)
            return  # a player's bytes are thrown away
        buf = self.buf + data
        if buf[0] not in (PUBLISH, PLAY) or (len(buf) > 1 and buf[1] == 0):
            self.transport.write(b"error: expected P or S, a length byte (1-255) and a "
                                 b"stream name\n")
            self.transport.close()
            return
        if len(buf) < 2 or len(buf) < 2 + buf[1]:
            self.buf, self.pending = buf, True
            return
        end = 2 + buf[1]
        self.role, self.buf, self.pending = buf[0], b"", False
        self.transport.join(buf[2:end], buf[end:])

    def export_state(self) -> dict[str, Any]:
        return {"role": self.role, "buf": self.buf}

    def state_restored(self, state: Any) -> None:
        self.role, self.buf = int(state["role"]), bytes(state["buf"])
        self.pending = bool(self.buf)


def application() -> Application:
    return Application(name="relay", protocol=Peer, group=Stream,
                       refusal=b"error: server full\n")
