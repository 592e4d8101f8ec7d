"""What a client protocol is to the worker: bytes in; replies, a frame count and an
optional routing key out. The worker loop knows protocols only through this."""

from __future__ import annotations

from typing import NamedTuple
from typing import Protocol as _Interface


class ProtocolError(Exception):
    """The client broke the protocol (for example an oversized frame): close that client only."""


class StatelessFrame(NamedTuple):
    """A protocol's offer to the worker loop, for its commonest case. A read that is exactly
    one frame, ending with the byte `end` (its only such byte), not starting with `keyed`,
    from a client with nothing pending, gets `reply` without a call into the protocol: the
    loop tests this inline. `feed` must give the same answer for such a read. The frame
    bound (`max_frame` bytes) must be at least the loop's read size, so that one read of
    a client with nothing pending cannot break it."""
    end: int  # the byte that ends every such frame
    keyed: int  # a frame that starts with this byte is not stateless (-1: none does)
    reply: bytes
    max_frame: int


class ClientProtocol(_Interface):
    name: str
    refusal: bytes  # sent to a client that no worker can take, just before it is closed
    stateless: StatelessFrame | None  # the loop's fast path, or None: feed() every read

    def feed(self, buf: bytearray, data: bytes) -> tuple[bytes, int, int | None]:
        """Consume `data` (appended to the connection's unconsumed bytes `buf`).

        Returns (replies, frames handled, key). Processing stops right after a frame that
        names a routing key, leaving the rest in `buf`, so the caller can hand the
        connection off with those bytes; call again with b"" to go on. Leaves an
        incomplete frame in `buf`. Raises ProtocolError on a frame past the bound."""
        ...
