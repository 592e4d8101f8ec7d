"""A key group's move between workers, as bytes: what the old owner sends in MOVE_CHUNKs
(messages.py) and the new owner reads, once all of it has come. The members' fds ride
with the chunks, in member order; everything else a member has is here: the bytes mpd
held for its protocol, the output queued for it, its protocol object's state, who it is.

    head     key, the group's gseq, the application's state version, when the group was
             frozen (CLOCK_MONOTONIC ns: the new owner measures the pause), the group's
             state, the number of members
    member   peer, flags (eof, paused, closing), then its unread bytes, its output, its
             state

Bounded: a transfer is at most `limit` bytes (workers.max_group_state plus the members'
buffers), said in the first chunk, checked by the receiver before it takes any."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from mpd.wire.peer import NO_PEER, PEER, Address, pack_peer, unpack_peer
from mpd.wire.routing import Key

HEAD = struct.Struct("<BqHIIQII")  # key type, int key, key length, gseq, state version,
#                                    frozen_ns, group state length, members
MEMBER = struct.Struct(f"<{PEER.size}sBIII")  # peer, flags, unread, output, state lengths
EOF, PAUSED, CLOSING = 1, 2, 4
CHUNK_BYTES = 96 * 1024  # payload per MOVE_CHUNK: a datagram stays under MAX_MESSAGE
CHUNK_FDS = 64  # member fds per MOVE_CHUNK (channel.MAX_FDS)


@dataclass
class Member:
    peer: Address | None
    unread: bytes
    output: bytes
    state: bytes
    eof: bool = False
    paused: bool = False
    closing: str = ""


@dataclass
class Transfer:
    key: Key
    gseq: int
    state_version: int
    frozen_ns: int
    state: bytes
    members: list[Member] = field(default_factory=list)

    def pack(self) -> bytes:
        if isinstance(self.key, int):
            key_type, key_int, key_bytes = 1, self.key, b""
        else:
            key_type, key_int, key_bytes = 2, 0, self.key
        parts = [HEAD.pack(key_type, key_int, len(key_bytes), self.gseq, self.state_version,
                           self.frozen_ns, len(self.state), len(self.members)),
                 key_bytes, self.state]
        for m in self.members:
            flags = (EOF if m.eof else 0) | (PAUSED if m.paused else 0) | \
                (CLOSING if m.closing else 0)
            parts += [MEMBER.pack(NO_PEER if m.peer is None else pack_peer(m.peer), flags,
                                  len(m.unread), len(m.output), len(m.state)),
                      m.unread, m.output, m.state]
        return b"".join(parts)

    @classmethod
    def unpack(cls, data: bytes) -> Transfer:
        """Raises ValueError on bytes pack() cannot have made."""
        view = memoryview(data)
        if len(data) < HEAD.size:
            raise ValueError(f"a transfer of {len(data)} bytes has no head")
        key_type, key_int, key_len, gseq, version, frozen_ns, state_len, count = \
            HEAD.unpack_from(data)
        pos = HEAD.size
        if key_type == 1:
            key: Key = key_int
        elif key_type == 2:
            key = bytes(view[pos:pos + key_len])
            pos += key_len
        else:
            raise ValueError(f"a transfer with key type {key_type}")
        state, pos = take(view, pos, state_len)
        transfer = cls(key, gseq, version, frozen_ns, state)
        for _ in range(count):
            if pos + MEMBER.size > len(data):
                raise ValueError("a transfer cut short in its members")
            peer, flags, unread_len, output_len, mstate_len = MEMBER.unpack_from(data, pos)
            pos += MEMBER.size
            unread, pos = take(view, pos, unread_len)
            output, pos = take(view, pos, output_len)
            mstate, pos = take(view, pos, mstate_len)
            transfer.members.append(Member(
                None if peer == NO_PEER else unpack_peer(peer), unread, output, mstate,
                bool(flags & EOF), bool(flags & PAUSED), "closed" if flags & CLOSING else ""))
        if pos != len(data):
            raise ValueError(f"{len(data) - pos} bytes past the end of a transfer")
        return transfer


def take(view: memoryview, pos: int, length: int) -> tuple[bytes, int]:
    if pos + length > len(view):
        raise ValueError("a transfer cut short")
    return bytes(view[pos:pos + length]), pos + length


def chunks(data: bytes, fds: list[int]) -> list[tuple[bytes, list[int]]]:
    """The transfer's bytes and its members' fds cut into MOVE_CHUNK loads, in order."""
    count = max(1, -(-len(data) // CHUNK_BYTES), -(-len(fds) // CHUNK_FDS))
    return [(data[i * CHUNK_BYTES:(i + 1) * CHUNK_BYTES], fds[i * CHUNK_FDS:(i + 1) * CHUNK_FDS])
            for i in range(count)]
