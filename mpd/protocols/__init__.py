"""Client protocols. The worker loop knows only this interface: bytes in, replies out,
and an optional routing key; `server.protocol` in the config picks one by name."""

from __future__ import annotations

from typing import Protocol as _Interface


class ProtocolError(Exception):
    """The client broke the protocol (for example an oversized frame): close that client only."""


class ClientProtocol(_Interface):
    name: str
    refusal: bytes  # sent to a client that no worker can take, just before it is closed

    def feed(self, buf: bytearray, data: bytes) -> tuple[bytes, int, int | None]:
        """Consume `data` (appended to the connection's unconsumed bytes `buf`).

        Returns (replies, frames handled, key). Processing stops right after a frame that
        names a routing key, leaving the rest in `buf`, so the caller can hand the
        connection off with those bytes; call again with b"" to go on. Leaves an
        incomplete frame in `buf`. Raises ProtocolError on a frame past the bound."""
        ...


def _registry() -> dict[str, ClientProtocol]:
    from mpd.protocols.ping import PingProtocol

    return {"ping": PingProtocol()}


PROTOCOLS = _registry()
