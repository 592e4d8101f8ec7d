"""The hand-off broker, the master's side of a hand-off: routes a client that a worker
handed over (HANDOFF, with its fd and unread bytes) to the worker that owns the client's
key (ADOPT), and holds it for a short, bounded time while that slot has no worker. A slot
that is full passes the client back (a HANDOFF with a rank), and the broker offers it to
the next slot in the key's rendezvous ranking: only the last one refuses it.

It knows the slot table and a way to send; it neither forks nor reaps (master.py does).
The worker's side, giving a client away and adopting one, is handoff.py."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from mpd.logs import log as logmod
from mpd.master.slots import Slots, WorkerProc
from mpd.wire import routing
from mpd.wire.channel import Kind, Message, close_fds

HOLD_TIMEOUT = 1.0  # seconds a hand-off waits for its owner's respawn before a fallback
HOLD_MAX = 30.0  # seconds a hand-off may wait when no worker at all can take it

log = logmod.get_logger()

# (worker, kind, meta, raw, fds) -> False when the worker's channel is gone (fds stay ours)
Send = Callable[[WorkerProc, Kind, "dict[str, Any]", bytes, "list[int]"], bool]


@dataclass
class HeldClient:
    """A handed-off client whose owner slot has no worker right now."""
    meta: dict[str, Any]
    raw: bytes
    fd: int
    since: float = field(default_factory=time.monotonic)


class Broker:
    def __init__(self, slots: Slots, send: Send, hold_timeout: float = HOLD_TIMEOUT,
                 hold_max: float = HOLD_MAX):
        self.slots = slots
        self.send = send
        self.hold_timeout = hold_timeout
        self.hold_max = hold_max
        self.held: list[HeldClient] = []  # oldest first

    def dispatch(self, sender: WorkerProc, message: Message) -> None:
        """A HANDOFF from `sender`: deliver it now, or hold it."""
        meta = message.meta
        if len(message.fds) != 1 or not isinstance(meta.get("key"), (int, type(None))):
            close_fds(message.fds)
            log.error("channel.error", worker_pid=sender.pid, worker_slot=sender.slot,
                      error="HANDOFF without exactly one fd and a key")
            return
        meta["from_slot"], meta["from_pid"] = sender.slot, sender.pid
        fd = message.fds.pop()  # ours from here on: delivered, held, or dropped
        if not self.deliver(meta, message.raw, fd):
            self.held.append(HeldClient(meta, message.raw, fd))

    def deliver(self, meta: dict[str, Any], raw: bytes, fd: int,
                since: float | None = None) -> bool:
        """ADOPT to the key's owner; while the owner is respawning, wait hold_timeout (from
        `since`, else from now), then (or at once if the slot is backing off) take the next
        slot in the key's ranking. A client that a full slot passed on (rank > 0) goes to
        the next serving slot after it. False: nobody can take it now."""
        key = meta["key"]
        if key is None:  # a keyless client from a retiring worker: its slot's new worker
            # (an upgrade replaces the worker of a slot), else the least busy worker
            target = self.slots.serving.get(meta.get("from_slot")) or min(
                self.slots.serving.values(), key=lambda w: w.clients, default=None)
            if target is None or not self.send(target, Kind.ADOPT, meta, raw, [fd]):
                return False
            # Count it now: the next STATS is up to a second away, and a burst would
            # otherwise all land on one worker.
            target.stats["clients"] = target.clients + 1
            return True
        target = None
        if not meta.get("rank"):
            target = self.slots.serving.get(self.owner(meta))
            if target is not None:  # the common case: no ranking computed
                meta["rank"], meta["last"] = 0, len(self.slots.serving) == 1
        if target is None:
            target = self.fallback(meta, since)
            if target is None:
                return False
        return self.send(target, Kind.ADOPT, meta, raw, [fd])

    def owner(self, meta: dict[str, Any]) -> int:
        """The sender's answer stands if it used the same table: tables are always slots
        0..N-1 (Slots.resize), so the same size means the same table."""
        table = self.slots.table
        owner = meta.get("owner")
        if meta.get("table") != len(table) or not isinstance(owner, int) \
                or not 0 <= owner < len(table):
            owner = routing.owner(meta["key"], table)
        return owner

    def fallback(self, meta: dict[str, Any], since: float | None) -> WorkerProc | None:
        """The next serving slot in the key's ranking, when the owner cannot take the
        client: its wait for a respawning owner is over (or the owner's slot is backing
        off), or the slots before `rank` were full. Sets the target's rank and whether it
        is the last; None: hold it."""
        rank = meta.get("rank") or 0
        if not rank:
            now = time.monotonic()
            if (since is None or now - since < self.hold_timeout) \
                    and not self.slots.backing_off(self.owner(meta), now):
                return None
            rank = 1
        ranking = routing.ranking(meta["key"], self.slots.table)
        serving = [(place, self.slots.serving[slot]) for place, slot in enumerate(ranking)
                   if place >= rank and slot in self.slots.serving]
        if serving:
            meta["rank"], meta["last"] = serving[0][0], len(serving) == 1
            return serving[0][1]
        # Every slot after the one that passed it on is gone: back to that one, as the
        # last (if it is still full, it refuses the client).
        sender = self.slots.serving.get(meta.get("from_slot"))  # type: ignore[arg-type]
        if meta.get("rank") and sender is not None:
            meta["rank"], meta["last"] = rank - 1, True
            return sender
        return None

    def retry_held(self) -> None:
        """Deliver what can go now; drop what waited past hold_max."""
        waiting, self.held = self.held, []
        for held in waiting:
            if self.deliver(held.meta, held.raw, held.fd, held.since):
                continue
            waited = time.monotonic() - held.since
            if waited >= self.hold_max:
                close_fds([held.fd])
                log.error("fd.dropped", key=held.meta["key"], reason="no worker took it",
                          waited=round(waited, 3))
            else:
                self.held.append(held)

    def drop_held(self, reason: str) -> None:
        for held in self.held:
            close_fds([held.fd])
            log.warning("fd.dropped", key=held.meta["key"], reason=reason)
        self.held = []

    def next_deadline(self, now: float) -> float | None:
        """The next time a held client's lot changes by the clock alone: its wait for its
        owner ends (then any slot may take it), or its hold_max (then it is dropped). A
        worker that appears meanwhile takes it at the next turn of the loop anyway."""
        due = [h.since + (self.hold_timeout if now < h.since + self.hold_timeout
                          else self.hold_max) for h in self.held]
        return min(due) if due else None

    def held_fds(self) -> list[int]:
        return [held.fd for held in self.held]
