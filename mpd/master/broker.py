"""The hand-off broker, the master's side of a hand-off: routes a client that a worker
handed over (HANDOFF, with its fd, unread bytes and state) to the worker that should
serve it (ADOPT), and holds it for a short, bounded time while that worker cannot take
it yet.

- A keyless client (a retiring worker's): its slot's new worker, else the least busy.
- A key of an application without groups (ping): the key's owner by the routes. The
  sender's answer stands when it used routes of the same epoch. While the owner's slot
  has no worker (a respawn), the client waits hold_timeout, then goes down its key's
  ranking; a full slot passes the client back (passed_on) and the broker offers it to
  the next slot of the ranking: only the last one refuses it.
- A key of an application with groups: where the directory says its group is
  (directory.py), held while the group moves (moves.py) or while its worker retires; a
  key with no group goes to its owner as above, and the directory records it there
  (pinned, when a full owner passed it on: the group lives where its first member
  spilled to, and its next members follow).

It knows the slots, the directory and a way to send; it neither forks nor reaps."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from mpd.logs import log as logmod
from mpd.master.directory import Directory
from mpd.master.slots import Slots, WorkerProc
from mpd.wire import routing
from mpd.wire.channel import close_fds
from mpd.wire.messages import Client, Kind
from mpd.wire.routing import show

HOLD_TIMEOUT = 1.0  # seconds a hand-off waits for its owner's respawn before a fallback
HOLD_MAX = 30.0  # seconds a hand-off may wait when no worker at all can take it

log = logmod.get_logger()

# (worker, message, fds) -> False when the worker's channel is gone (fds stay ours)
Send = Callable[..., bool]


@dataclass
class HeldClient:
    """A handed-off client that no worker can take right now."""
    client: Client  # its fd in client.fds
    since: float = field(default_factory=time.monotonic)


class Broker:
    def __init__(self, slots: Slots, send: Send, directory: Directory | None = None,
                 moves: Any = None, hold_timeout: float = HOLD_TIMEOUT,
                 hold_max: float = HOLD_MAX):
        self.slots = slots
        self.send = send
        self.directory = directory  # None: the application has no groups
        self.moves = moves  # the master's moves.py, with a directory
        self.hold_timeout = hold_timeout
        self.hold_max = hold_max
        self.held: list[HeldClient] = []  # oldest first

    def dispatch(self, sender: WorkerProc, message: Client) -> None:
        """A HANDOFF from `sender`: deliver it now, or hold it."""
        if len(message.fds) != 1:
            close_fds(message.fds)
            message.fds = []
            log.error("channel.error", worker_pid=sender.pid, worker_slot=sender.slot,
                      error="HANDOFF without exactly one fd")
            return
        message.from_slot, message.from_pid = sender.slot, sender.pid
        if message.passed_on and self.directory is not None and message.key is not None:
            placement = self.directory.get(message.key)
            if placement is not None and placement.worker is sender:
                self.directory.forget(message.key)  # it had no group after all
        held = HeldClient(message)
        message.fds = list(message.fds)  # ours from here on: delivered, held, or dropped
        if not self.deliver(message, None):
            self.held.append(held)

    def deliver(self, client: Client, since: float | None) -> bool:
        """ADOPT it to the worker that should serve it now; False: nobody can yet."""
        if client.key is None:
            return self.deliver_keyless(client)
        if self.directory is not None and not client.passed_on:
            placement = self.directory.get(client.key)
            if self.moves.moving(client.key):
                return False  # its group is on its way: the new owner takes it after
            if placement is not None:
                worker = placement.worker
                if worker.state == "stopping" or self.slots.workers.get(worker.pid) is not worker:
                    return False  # its worker retires: the group moves first
                # Its group's worker takes a member even when full; if the group ended
                # meanwhile, a full worker passes it back (and the placement is forgotten).
                client.rank, client.last = 0, False
                return self.adopt(worker, client, placement.key_hash, pin=False)
        target = None
        if not client.rank and not client.passed_on:
            target = self.slots.serving.get(self.owner(client))
            if target is not None:  # the common case: no ranking computed
                client.rank, client.last = 0, len(self.slots.serving) == 1
        if target is None:
            target = self.fallback(client, since)
            if target is None:
                return False
        return self.adopt(target, client, client.key_hash, pin=client.rank > 0)

    def adopt(self, worker: WorkerProc, client: Client, h: int, pin: bool) -> bool:
        if self.directory is not None and client.key is not None:
            client.gseq = self.directory.place(client.key, h, worker, pin)
        client.kind = Kind.ADOPT
        client.passed_on = False
        return self.send(worker, client, client.fds)

    def deliver_keyless(self, client: Client) -> bool:
        """A keyless client from a retiring worker: its slot's new worker (an upgrade
        replaces the worker of a slot), else the least busy worker."""
        target = self.slots.serving.get(client.from_slot) or min(  # type: ignore[arg-type]
            self.slots.serving.values(), key=lambda w: w.clients, default=None)
        client.kind = Kind.ADOPT
        if target is None or not self.send(target, client, client.fds):
            return False
        # Count it now: the next STATS is up to a second away, and a burst would
        # otherwise all land on one worker.
        target.stats["clients"] = target.clients + 1
        return True

    def owner(self, client: Client) -> int | None:
        """The sender's answer stands if it used the routes of this epoch."""
        routes = self.slots.routes
        if client.epoch == routes.epoch and client.owner is not None \
                and client.owner in routes.table:
            return client.owner
        return routes.owner(client.key_hash)

    def fallback(self, client: Client, since: float | None) -> WorkerProc | None:
        """The next serving slot in the key's ranking, when the owner cannot take the
        client: its wait for a respawning owner is over (or the owner's slot is backing
        off), or the slots before `rank` were full. Sets the target's rank and whether it
        is the last; None: hold it."""
        rank = client.rank
        routes = self.slots.routes
        if not rank:
            now = time.monotonic()
            owner = self.owner(client)
            if (since is None or now - since < self.hold_timeout) \
                    and not self.slots.backing_off(owner, now):  # type: ignore[arg-type]
                return None
            rank = 1
        ranking = routing.ranking(client.key_hash, routes.table)
        serving = [(place, self.slots.serving[slot]) for place, slot in enumerate(ranking)
                   if place >= rank and slot in self.slots.serving]
        if serving:
            client.rank, client.last = serving[0][0], len(serving) == 1
            return serving[0][1]
        # Every slot after the one that passed it on is gone: back to that one, as the
        # last (if it is still full, it refuses the client).
        sender = self.slots.serving.get(client.from_slot)  # type: ignore[arg-type]
        if client.rank and sender is not None:
            client.rank, client.last = rank - 1, True
            return sender
        return None

    def retry_held(self) -> None:
        """Deliver what can go now; drop what waited past hold_max."""
        waiting, self.held = self.held, []
        for held in waiting:
            if self.deliver(held.client, held.since):
                continue
            waited = time.monotonic() - held.since
            if waited >= self.hold_max:
                close_fds(held.client.fds)
                log.error("fd.dropped", key=show(held.client.key), reason="no worker took it",
                          waited=round(waited, 3))
            else:
                self.held.append(held)

    def drop_held(self, reason: str) -> None:
        for held in self.held:
            close_fds(held.client.fds)
            log.warning("fd.dropped", key=show(held.client.key), reason=reason)
        self.held = []

    def next_deadline(self, now: float) -> float | None:
        """The next time a held client's lot changes by the clock alone: its wait for its
        owner ends (then any slot may take it), or its hold_max (then it is dropped). A
        worker that appears meanwhile takes it at the next turn of the loop anyway."""
        due = [h.since + (self.hold_timeout if now < h.since + self.hold_timeout
                          else self.hold_max) for h in self.held]
        return min(due) if due else None

    def held_fds(self) -> list[int]:
        return [fd for held in self.held for fd in held.client.fds]
