"""Which slot owns a routing key: rendezvous (highest-random-weight) hashing.

The owner of a key is the slot with the highest score(key, slot). It depends only on the
key and the set of slots, never on pids, so it survives respawns; and growing from N to
N+1 slots moves only the keys the new slot wins, about 1/(N+1) of them."""

from __future__ import annotations

from collections.abc import Sequence

MASK = (1 << 64) - 1


def score(key: int, slot: int) -> int:
    """splitmix64 of (key, slot): a well-mixed 64-bit weight, the same in every process.
    (CPython's hash() of a tuple of ints is deterministic too, and faster, but it has no
    final avalanche: consecutive keys spread unevenly over the slots.)"""
    z = (((key & 0xFFFFFFFF) << 32) | (slot & 0xFFFFFFFF)) + 0x9E3779B97F4A7C15 & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def owner(key: int, slots: Sequence[int]) -> int:
    """The slot that owns `key` among `slots`. score() inlined: this runs twice per
    hand-off (in the worker and in the master), and a call per slot costs a third more."""
    base = (key & 0xFFFFFFFF) << 32
    best_score, best = -1, slots[0]
    for slot in slots:
        z = (base | (slot & 0xFFFFFFFF)) + 0x9E3779B97F4A7C15 & MASK
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        z ^= z >> 31
        if z > best_score:
            best_score, best = z, slot
    return best


def ranking(key: int, slots: Sequence[int]) -> list[int]:
    """Slots in the order a key prefers them: its owner first, then its fallbacks."""
    return sorted(slots, key=lambda slot: score(key, slot), reverse=True)
