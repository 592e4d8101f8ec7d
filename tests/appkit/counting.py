"""rooms, with a room that answers "#count\n" with "count N\n" (to the asker only): N is
the lines the room carried, its state, which must survive every move of the room."""

from __future__ import annotations

from typing import Any

from mpd.apps import rooms
from mpd.apps.interface import Application


class CountingMember(rooms.Member):
    def data_received(self, data: bytes) -> None:
        if self.joined and (self.buf + data).startswith(b"#count\n"):
            rest = (self.buf + data)[len(b"#count\n"):]
            self.buf = b""
            self.transport.write(b"count %d\n" % self.transport.group.lines)
            if rest:
                super().data_received(rest)
            return
        super().data_received(data)


def application(**options: Any) -> Application:
    base = rooms.application(**options)
    return Application(name="counting", protocol=CountingMember, group=rooms.Room,
                       refusal=base.refusal, state_version=base.state_version,
                       reads_state=base.reads_state)
