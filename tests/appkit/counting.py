"""rooms, with a room that says what it carried, for the tests of moves: its state must
survive every move of the room.

    #count\\n     answered to the asker only with "count N\\n": N is the lines the room
                 carried (rooms.Room.lines, its state)
    #pad N\\n     the room's state grows to N bytes more (a group state of a given size:
                 tests/test_move_faults.py, scripts/bench/move_pause.py); answered "pad N\\n"
    #where\\n     answered "where PID\\n": the worker that serves the member
    #announce\\n  answered "announce\\n"; from then on, the room's state_restored() writes
                 "you moved\\n" to each member and broadcasts "room moved to PID\\n" (a
                 restored group speaks to its members before they are served again)

These lines may come anywhere in a member's stream (split or coalesced with others); they
are neither counted nor broadcast. Every other line is rooms'."""

from __future__ import annotations

import os
from typing import Any

from mpd.apps import rooms
from mpd.apps.interface import Application


class CountingRoom(rooms.Room):
    def __init__(self, key: Any = None):
        super().__init__(key)
        self.pad = b""
        self.announce = False

    def export_state(self) -> dict[str, Any]:
        return {"lines": self.lines, "pad": self.pad, "announce": self.announce}

    def state_restored(self, state: Any) -> None:
        super().state_restored(state)
        self.pad = bytes(state.get("pad", b"")) if isinstance(state, dict) else b""
        self.announce = bool(state.get("announce")) if isinstance(state, dict) else False
        if self.announce:
            for member in self.members:
                member.write(b"you moved\n")
            self.broadcast(b"room moved to %d\n" % os.getpid())


class CountingMember(rooms.Member):
    def data_received(self, data: bytes) -> None:
        if not self.joined or (b"#" not in data and not self.buf.startswith(b"#")):
            super().data_received(data)
            return
        buf, self.buf, self.pending = self.buf + data, b"", False
        start = 0  # the lines from here up to a command go to rooms as they are
        pos = 0
        while (end := buf.find(b"\n", pos) + 1):
            if buf.startswith(b"#", pos):
                if start < pos:
                    super().data_received(buf[start:pos])
                self.command(buf[pos:end - 1])
                start = end
            pos = end
        if start < len(buf):
            super().data_received(buf[start:])

    def command(self, line: bytes) -> None:
        room = self.transport.group
        word, _, arg = line.partition(b" ")
        if word == b"#count":
            self.transport.write(b"count %d\n" % room.lines)
        elif word == b"#pad":
            room.pad = os.urandom(int(arg))
            self.transport.write(b"pad %d\n" % len(room.pad))
        elif word == b"#where":
            self.transport.write(b"where %d\n" % os.getpid())
        elif word == b"#announce":
            room.announce = True
            self.transport.write(b"announce\n")
        else:  # a line that only looks like a command: rooms' like any other
            super().data_received(line + b"\n")


def application(state_version: int = 1, **options: Any) -> Application:
    base = rooms.application(**options)
    return Application(name="counting", protocol=CountingMember, group=CountingRoom,
                       refusal=base.refusal, state_version=state_version,
                       reads_state=(state_version,))
