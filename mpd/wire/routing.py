"""Which slot owns a routing key: keys, their 64-bit hashes, and rendezvous hashing.

A key is what a client names to meet the other clients of its stream, room or session:
bytes, a str (its UTF-8 bytes) or an int. Routing uses a 64-bit hash of it. The owner of
a key is the slot with the highest score(hash, slot) among the slots of the table; it
depends only on the key and the table, never on pids, so it survives respawns, and
growing from N to N+1 slots moves only the keys the new slot wins, about 1/(N+1).

The seed's int32 keys route exactly as they always did: an int in the int32 range
hashes to its unsigned 32 bits, and the score of a hash below 2**32 is the one mpd used
before keys were 64 bits."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

Key = Union[int, bytes]  # a key as mpd keeps it: a str becomes its UTF-8 bytes
MASK = (1 << 64) - 1
MAX_KEY_BYTES = 1024  # a longer bytes or str key is refused
INT64 = range(-(1 << 63), 1 << 63)
GOLDEN = 0x9E3779B97F4A7C15


def normalize(key: object) -> Key:
    """The key as mpd keeps it, or ValueError/TypeError saying why it cannot be one."""
    if isinstance(key, bool):
        raise TypeError("a key is bytes, str or int, not bool")
    if isinstance(key, int):
        if key not in INT64:
            raise ValueError(f"an int key must fit in 64 bits, got {key}")
        return key
    if isinstance(key, str):
        key = key.encode()
    if isinstance(key, (bytes, bytearray, memoryview)):
        key = bytes(key)
        if len(key) > MAX_KEY_BYTES:
            raise ValueError(f"a key is at most {MAX_KEY_BYTES} bytes, got {len(key)}")
        return key
    raise TypeError(f"a key is bytes, str or int, not {type(key).__name__}")


def key_hash(key: Key) -> int:
    """The 64-bit hash that routes `key` (normalized)."""
    if isinstance(key, int):
        if -(1 << 31) <= key < 1 << 31:
            return key & 0xFFFFFFFF
        return key & MASK
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


def show(key: Key | None) -> str | int | None:
    """A key for log lines and mpdctl: ints as they are, bytes as text where they are
    printable UTF-8, else as hex."""
    if key is None or isinstance(key, int):
        return key
    try:
        text = key.decode()
    except UnicodeDecodeError:
        return "0x" + key.hex()
    return text if text.isprintable() else "0x" + key.hex()


def score(h: int, slot: int) -> int:
    """splitmix64 of (hash, slot): a well-mixed 64-bit weight, the same in every process.
    The hash is rotated by 32 bits, so that one below 2**32 (every int32 key) scores as
    mpd scored int32 keys before keys were 64 bits."""
    z = (((h << 32) | (h >> 32)) & MASK ^ (slot & 0xFFFFFFFF)) + GOLDEN & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def owner(h: int, slots: Sequence[int]) -> int:
    """The slot that owns the key hashed `h` among `slots`: the first of its ranking."""
    return max(slots, key=lambda slot: score(h, slot))


def ranking(h: int, slots: Sequence[int]) -> list[int]:
    """Slots in the order a key prefers them: its owner first, then its fallbacks."""
    return sorted(slots, key=lambda slot: score(h, slot), reverse=True)


@dataclass(frozen=True)
class Routes:
    """The slots that own keys, numbered by the master: every change of the table is a
    new epoch, so a worker's answer about an owner says which table it used."""
    epoch: int
    table: tuple[int, ...]

    def owner(self, h: int) -> int | None:
        return owner(h, self.table) if self.table else None
