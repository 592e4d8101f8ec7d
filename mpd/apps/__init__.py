"""Applications on mpd: the interface an application is written against (interface.py),
how `server.protocol` finds one (loader.py), and the applications mpd ships: ping (the
seed's protocol), rooms (a chat) and relay (a stream's publisher and its players).

    from mpd.apps import Application, Group, Protocol, ProtocolError
"""

from __future__ import annotations

from mpd.apps.interface import (
    Application,
    Group,
    Protocol,
    ProtocolError,
    StatelessFrame,
    Timer,
    Transport,
)

__all__ = ["Application", "Group", "Protocol", "ProtocolError", "StatelessFrame", "Timer",
           "Transport"]
