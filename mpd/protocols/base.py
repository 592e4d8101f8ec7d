"""What a client protocol is to the worker: bytes in; replies, a frame count and an
optional routing key out. The worker loop knows protocols only through this."""

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
