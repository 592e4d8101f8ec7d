"""presence: channels with nicknames, written against mpd's application interface.

    JOIN <channel> <nick>\\n   the first line: join a channel (each name 1 to 64 bytes)
    <text>\\n                  every later line: "<nick>: <text>\\n" to the channel's others

Each connection gets its own Member object (a Protocol). The first line calls
transport.join(channel): mpd moves the connection to the worker that owns the channel,
with what export_state() returned, so every member of a channel is in one process. There
the channel is a Group: it sees members join and leave, broadcasts to them with a local
loop, and keeps a timer (the roll call) and a count of lines said, which is its state: if
the channel moves to another worker (a scale, an upgrade, `mpdctl move`), export_state()
and state_restored() carry the count, and the timer is set again there."""

from __future__ import annotations

from typing import Any

from mpd.apps import Application, Group, Protocol, ProtocolError, Transport

MAX_NAME = 64  # bytes of a channel's name or a nickname
MAX_LINE = 4096  # bytes of a line


class Channel(Group):
    """The members of one channel, in the worker that owns its name."""

    def __init__(self, key: bytes, interval: float):
        # mpd sets the group's own parts (key, members, timers) once this returns: a
        # timer cannot be set here, so the first member_joined() sets it.
        self.interval = interval
        self.said = 0  # lines carried since the channel began: its state
        self.timer: Any = None

    def nicks(self) -> list[str]:
        return [m.get_protocol().nick for m in self.members if not m.get_protocol().refused]

    def member_joined(self, transport: Transport) -> None:
        me = transport.get_protocol()
        if any(m is not transport and m.get_protocol().nick == me.nick for m in self.members):
            me.refused = True
            transport.write(b"error: nick taken\n")
            transport.close()  # once that line is written; member_left() follows
            return
        here = ", ".join(self.nicks())
        transport.write(f"* you are {me.nick} in {self.key.decode()}; here: {here}\n".encode())
        self.broadcast(f"* {me.nick} joined\n".encode(), exclude=transport)
        if self.timer is None:
            self.arm()

    def member_left(self, transport: Transport, reason: str) -> None:
        # `reason` is why the connection ended ("eof", "reset", "idle", ...); never a move.
        me = transport.get_protocol()
        if not me.refused:
            self.broadcast(f"* {me.nick} left\n".encode())

    def roll_call(self) -> None:
        nicks = self.nicks()
        self.broadcast(f"* roll call: {len(nicks)} here ({', '.join(nicks)}), "
                       f"{self.said} lines\n".encode())
        self.arm()

    def arm(self) -> None:
        self.timer = self.call_later(self.interval, self.roll_call)

    def export_state(self) -> dict[str, int]:
        return {"said": self.said}  # plain data: it may cross to another process

    def state_restored(self, state: Any) -> None:
        self.said = state["said"]
        self.arm()  # timers do not move with a group: set it again here


class Member(Protocol):
    """One connection: its JOIN line, then its lines."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.nick = ""  # set by the JOIN line
        self.refused = False
        self.buf = b""  # a line not complete yet

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return  # on its way out
        buf = self.buf + data
        if not self.nick:
            self.first_line(buf)
            return
        end = buf.rfind(b"\n") + 1
        if end:
            lines = buf[:end].split(b"\n")[:-1]
            prefix = self.nick.encode() + b": "
            channel = self.transport.group
            channel.said += len(lines)
            channel.broadcast(b"".join(prefix + line + b"\n" for line in lines),
                              exclude=self.transport)
            self.transport.count_requests(len(lines))
        self.buf = buf[end:]
        if len(self.buf) > MAX_LINE:  # mpd closes this connection, logs and counts it
            raise ProtocolError(f"a line of over {MAX_LINE} bytes")

    def first_line(self, buf: bytes) -> None:
        end = buf.find(b"\n")
        if end < 0:
            if len(buf) > 2 * MAX_NAME + 8:
                raise ProtocolError("no JOIN line")
            self.buf = buf
            return
        words = buf[:end].split()
        if len(words) != 3 or words[0] != b"JOIN" or not all(
                len(w) <= MAX_NAME for w in words[1:]):
            self.transport.write(b"error: expected JOIN <channel> <nick>\n")
            self.transport.close()
            return
        self.nick, self.buf = words[2].decode(errors="replace"), b""
        # The rest of this read is fed to data_received() after the join: here, or in
        # the worker that owns the channel (on a fresh Member, after state_restored()).
        self.transport.join(words[1], buf[end + 1:])

    def export_state(self) -> dict[str, Any]:
        return {"nick": self.nick, "refused": self.refused, "buf": self.buf}

    def state_restored(self, state: Any) -> None:
        self.nick, self.refused, self.buf = state["nick"], state["refused"], state["buf"]


def application(interval: float = 30.0) -> Application:
    """The factory mpd calls, with the options of the config's [app] table."""
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) \
            or not 0 < interval <= 86400:
        raise ValueError(f"interval must be seconds, more than 0 and at most 86400, got "
                         f"{interval!r}")
    return Application(name="presence", protocol=Member,
                       group=lambda key: Channel(key, float(interval)),
                       state_version=1, reads_state=(1,), refusal=b"error: server full\n")
