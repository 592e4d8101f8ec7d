"""Client protocols, by the name `server.protocol` gives in the config. The worker loop
knows only their interface (base.py): bytes in, replies out, an optional routing key."""

from __future__ import annotations

from mpd.apps.base import ClientProtocol, ProtocolError
from mpd.apps.ping import PingProtocol

PROTOCOLS: dict[str, ClientProtocol] = {"ping": PingProtocol()}

__all__ = ["PROTOCOLS", "ClientProtocol", "ProtocolError"]
