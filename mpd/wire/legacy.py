"""Channel version 2, spoken by the workers of the release before this one. After an
upgrade in place from that release the master adopts its workers, which read and write
only version 2, until the roll replaces them; this module translates between those
bytes and this code's messages (messages.py). The release before serves the ping
protocol only: its clients have int32 keys and no state, and it has no groups."""

from __future__ import annotations

import json
import struct
from typing import Any

from mpd.wire.messages import (
    HEADER,
    Client,
    Config,
    Hello,
    Kind,
    Message,
    Retire,
    Routes,
    Stats,
    Stop,
    json_meta,
)
from mpd.wire.peer import NO_PEER, PEER, pack_peer, unpack_peer

VERSION = 2
# has_key, key, from_slot (-1 none), from_pid, sent_ns, owner (-1 none), table | rank << 16
# | last << 30, peer; then the client's unread bytes.
HANDOFF_META = struct.Struct(f"<?iiiQii{PEER.size}s")
TABLE_BITS, RANK_BITS = 16, 14
LAST_SHIFT = TABLE_BITS + RANK_BITS


def decode(data: bytes, fds: list[int]) -> Message:
    """A version-2 datagram as this code's message; ValueError says what is wrong."""
    if len(data) < HEADER.size:
        raise ValueError(f"short message ({len(data)} bytes)")
    version, kind, meta_len = HEADER.unpack_from(data)
    if version != VERSION:
        raise ValueError(f"version {version}, expected {VERSION}")
    end = HEADER.size + meta_len
    if end > len(data):
        raise ValueError("meta length past the end of the message")
    message: Message
    if kind == Kind.HANDOFF:
        if meta_len != HANDOFF_META.size:
            raise ValueError(f"HANDOFF meta of {meta_len} bytes, expected {HANDOFF_META.size}")
        has_key, key, from_slot, from_pid, sent_ns, owner, packed, peer = \
            HANDOFF_META.unpack_from(data, HEADER.size)
        rank = packed >> TABLE_BITS & ((1 << RANK_BITS) - 1)
        message = Client(Kind.HANDOFF, key if has_key else None,
                         key & 0xFFFFFFFF if has_key else 0, data[end:], b"",
                         None if peer == NO_PEER else unpack_peer(peer), sent_ns,
                         None, 0, rank, False, rank > 0)
    elif kind in (Kind.HELLO, Kind.STATS):
        meta = json_meta(data, end)
        message = (Hello.from_fields(meta) if kind == Kind.HELLO
                   else Stats.from_fields({"values": meta}))
    else:
        raise ValueError(f"a version-2 worker does not send message type {kind}")
    message.fds = fds
    return message


def encode(message: Message) -> bytes:
    """The version-2 bytes of a message the master sends; ValueError for one that a
    version-2 worker cannot read."""
    if isinstance(message, Client) and message.kind == Kind.ADOPT:
        if message.state or not isinstance(message.key, (int, type(None))):
            raise ValueError("a version-2 worker takes no client state and int keys only")
        key = message.key
        packed = message.rank << TABLE_BITS | int(message.last) << LAST_SHIFT
        return HEADER.pack(VERSION, Kind.ADOPT, HANDOFF_META.size) + HANDOFF_META.pack(
            key is not None, key or 0, -1 if message.from_slot is None else message.from_slot,
            message.from_pid or 0, message.sent_ns, -1, packed,
            NO_PEER if message.peer is None else pack_peer(message.peer)) + message.unread
    meta: dict[str, Any]
    if isinstance(message, (Routes, Retire)):
        meta = {"slots": list(message.table)}
    elif isinstance(message, Config):
        meta = dict(message.settings)
    elif isinstance(message, Stop):
        meta = {}
    else:
        raise ValueError(f"a version-2 worker does not read {message.kind.name}")
    body = json.dumps(meta, separators=(",", ":")).encode()
    return HEADER.pack(VERSION, message.kind, len(body)) + body
