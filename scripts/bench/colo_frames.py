"""The rooms and relay protocols as the co-location baselines speak them: the first frame,
the bounds, the replies. Shared by baseline_colo_asyncio.py, baseline_colo_rawfd.py and
baseline_colo_redis.py (baseline_colo.c has its own copy in C); BENCHMARKS.md, "Co-location
against the alternatives", states the protocols.

First frame: one kind byte (`J` for rooms; `P` publish or `S` play for relay), one length
byte L (1..255), L bytes of key. A joined member gets `ok <n>\\n` first (n = members of the
key now, the joiner included). Rooms: then lines (at most MAX_LINE bytes, `\\n` included),
each delivered to every other member. Relay: the publisher's raw bytes to every player.
A member with more than MAX_OUTPUT bytes waiting in the server is cut off."""

from __future__ import annotations

from typing import Union

MAX_LINE = 65536  # rooms: a line, its `\n` included
MAX_OUTPUT = 262144  # bytes waiting in the server for one member before it is cut off
KINDS = {"rooms": b"J", "relay": b"PS"}
NO_PUBLISHER = b"error: stream has a publisher\n"

# parse_join's answers: (kind byte, key, bytes consumed), an error line, or None (need more)
Join = Union[tuple[int, bytes, int], bytes, None]


def parse_join(data: bytes, protocol: str) -> Join:
    """The first frame at the start of `data`."""
    if not data:
        return None
    kind = data[0]
    if kind not in KINDS[protocol]:
        want = " or ".join(repr(chr(k)) for k in KINDS[protocol])
        return f"error: first frame must start with {want}\n".encode()
    if len(data) < 2:
        return None
    length = data[1]
    if length == 0:
        return b"error: empty key\n"
    if len(data) < 2 + length:
        return None
    return kind, data[2:2 + length], 2 + length


def ack(members: int) -> bytes:
    return b"ok %d\n" % members


def lines_too_long(complete: bytes) -> bool:
    """Whether a run of whole lines holds one longer than MAX_LINE (cheap when the run
    itself is short enough)."""
    if len(complete) <= MAX_LINE:
        return False
    start = 0
    while start < len(complete):
        end = complete.index(b"\n", start) + 1
        if end - start > MAX_LINE:
            return True
        start = end
    return False
