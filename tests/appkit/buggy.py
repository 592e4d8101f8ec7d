"""rooms with bugs on cue: a line "boom\n" raises in data_received (that member ends), a
line "hook\n" makes the room's next member_joined raise (that room ends), a line
"timer\n" arms a room timer that raises (that room ends), a line "ctimer\n" a timer of that
member's connection that raises (that member ends). Everything else is rooms."""

from __future__ import annotations

from typing import Any

from mpd.apps import rooms
from mpd.apps.interface import Application, Transport


class BuggyRoom(rooms.Room):
    def __init__(self, key: Any = None):
        super().__init__(key)
        self.armed = False

    def member_joined(self, transport: Transport) -> None:
        if self.armed:
            raise RuntimeError("a bug in member_joined")
        super().member_joined(transport)

    def fire(self) -> None:
        raise RuntimeError("a bug in a timer")


class BuggyMember(rooms.Member):
    def data_received(self, data: bytes) -> None:
        if self.joined:
            for cue, act in ((b"boom\n", self.boom), (b"hook\n", self.arm),
                             (b"ctimer\n", self.ctimer), (b"timer\n", self.timer)):
                if cue in data:
                    data = data.replace(cue, b"")
                    act()
        if data:
            super().data_received(data)

    def boom(self) -> None:
        raise RuntimeError("a bug in data_received")

    def arm(self) -> None:
        self.transport.group.armed = True

    def timer(self) -> None:
        self.transport.group.call_later(0.05, self.transport.group.fire)

    def ctimer(self) -> None:
        self.transport.call_later(0.05, self.fire)

    def fire(self) -> None:
        raise RuntimeError("a bug in a connection's timer")


def application() -> Application:
    return Application(name="buggy", protocol=BuggyMember, group=BuggyRoom,
                       refusal=b"error: server full\n")


def broken_factory() -> Application:
    raise ValueError("this factory always fails")
