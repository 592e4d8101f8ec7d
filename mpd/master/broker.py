"""The hand-off broker, the master's side of a hand-off: routes a client that a worker
handed over (HANDOFF, with its fd, unread bytes and state) to a worker that can take it
(ADOPT), and holds it, for a bounded time, while none can.

- A client of a key group's key (an application with groups) goes where the directory
  says its group is (directory.py): its group's worker takes a member even when full.
  While the group moves (moves.py), or its worker retires, the client is held, and goes
  to the group's new worker once it is there.
- Any other keyed client goes to its key's owner by the routes if the owner can take it:
  it serves, has a place by its last heartbeat (clients and max_clients, plus the ADOPTs
  sent to it since) and its channel holds less than a slot's share of the master's fd
  budget (fdbudget.py). While the owner's slot is respawning it waits for it up to
  hold_timeout (not while the slot backs off); else it goes to the next slot of the key's
  rendezvous ranking that can (fd.spilled). When none can (every slot full), it is held
  and retried as slots free places, up to full_wait; then it goes to its first serving
  slot as the last: that worker takes it if it has a place by then, else refuses it with
  the application's refusal. A worker that is full when an ADOPT arrives passes the client
  back (passed_on); the broker then counts that worker full until its next heartbeat and
  routes the client again. A grouped key's first client placed by a spill pins its group
  to the slot it spilled to (its next members follow it there).
- A keyless client (a retiring worker's): its slot's new worker, else the least busy.

Held clients and ADOPTs queued on channels cost the master fds: a client that it cannot
hold within its fd budget goes at once to a worker as the last, or is closed when no
worker's channel can take it (fd.over_budget).

It knows the slots, the directory and a way to send; it neither forks nor reaps. The
worker's side, giving a client away and adopting one, is mpd/worker/handoff.py."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from mpd.logs import log as logmod
from mpd.master import fdbudget
from mpd.master.directory import Directory
from mpd.master.fdbudget import FdBudget
from mpd.master.slots import Slots, WorkerProc
from mpd.wire import routing
from mpd.wire.channel import close_fds
from mpd.wire.messages import Client, Kind
from mpd.wire.routing import show

HOLD_TIMEOUT = 1.0  # seconds a hand-off waits for its owner's respawn before a fallback
FULL_WAIT = 5.0  # seconds a hand-off waits for a place while every slot is full
HOLD_MAX = 30.0  # seconds a hand-off may wait when no worker at all can take it
ANY = 1 << 62  # max_clients of a worker that has not said yet: no limit known

log = logmod.get_logger()

Send = Callable[..., bool]  # (worker, message, fds) -> False when its channel is gone
Count = Callable[[int, str], None]  # (slot, counter): a count the master keeps (tally.py)


@dataclass
class HeldClient:
    """A handed-off client that no worker can take right now (its fd in client.fds)."""
    client: Client
    since: float = field(default_factory=time.monotonic)


class Broker:
    def __init__(self, slots: Slots, send: Send, count: Count = lambda _slot, _name: None,
                 directory: Directory | None = None, moves: Any = None,
                 hold_timeout: float = HOLD_TIMEOUT, hold_max: float = HOLD_MAX,
                 full_wait: float = FULL_WAIT, budget: FdBudget | None = None):
        self.slots = slots
        self.send = send
        self.count = count
        self.directory = directory  # None: the application has no groups
        self.moves = moves  # the master's moves.py: which groups are on their way
        self.hold_timeout = hold_timeout
        self.hold_max = hold_max
        self.full_wait = full_wait
        self.budget = budget or FdBudget()
        self.held: list[HeldClient] = []  # oldest first
        self.next_retry = 0.0  # when a held client's lot changes by the clock alone

    def dispatch(self, sender: WorkerProc, message: Client) -> None:
        """A HANDOFF from `sender`: deliver it now, or hold it."""
        if len(message.fds) != 1:
            close_fds(message.fds)
            message.fds = []
            log.error("channel.error", worker_pid=sender.pid, worker_slot=sender.slot,
                      error="HANDOFF without exactly one fd")
            return
        stats = sender.stats
        if message.passed_on:  # it was full when our ADOPT came
            stats["clients"] = stats["max_clients"] = max(stats.get("clients", 0),
                                                          stats.get("max_clients", 0))
            if self.directory is not None and message.key is not None:
                placement = self.directory.get(message.key)
                if placement is not None and placement.worker is sender:
                    self.directory.forget(message.key)  # its group had ended there
        elif stats.get("clients"):  # one client fewer there, until its heartbeat says
            stats["clients"] -= 1
        message.from_slot, message.from_pid = sender.slot, sender.pid
        message.fds = list(message.fds)  # ours from here on: delivered, held, or dropped
        if not self.deliver(message):
            self.held.append(HeldClient(message, sent_at(message)))
            self.next_retry = 0.0  # its deadlines count from the next turn on

    def deliver(self, client: Client, since: float | None = None,
                now: float | None = None) -> bool:
        """ADOPT to a worker that can take it, or, when the master cannot hold it within
        its fd budget, as the last to any that will. False: hold it."""
        if client.key is None:
            target = self.least_busy(client)
        elif self.directory is not None and self.grouped(client):
            return self.to_group(client)
        else:
            target = self.route(client, since, now)
            if target is None and self.budget.room(self.holding()) <= 0:
                target = self.over_budget(client)
                if target is None:
                    return not client.fds  # closed, or held in the reserve
            if target is not None and self.directory is not None:
                client.gseq = self.directory.place(client.key, client.key_hash, target,
                                                   pin=client.rank > 0)
        return target is not None and self.adopt(target, client)

    def grouped(self, client: Client) -> bool:
        """The key has a group (or one on its way): the directory decides, not the routes."""
        assert self.directory is not None and client.key is not None
        return self.moves.moving(client.key) or self.directory.get(client.key) is not None

    def to_group(self, client: Client) -> bool:
        """To the worker of the key's group: held while it moves or its worker retires."""
        assert self.directory is not None and client.key is not None
        placement = self.directory.get(client.key)
        if placement is None or self.moves.moving(client.key):
            return False
        worker = placement.worker
        if worker.state == "stopping" or self.slots.workers.get(worker.pid) is not worker:
            return False  # its worker retires: the group moves first
        # Its group's worker takes a member even when full; if the group ended meanwhile,
        # a full worker passes it back, and the placement is forgotten (dispatch()).
        client.rank, client.last = 0, False
        client.gseq = self.directory.place(client.key, placement.key_hash, worker)
        return self.adopt(worker, client)

    def adopt(self, target: WorkerProc, client: Client) -> bool:
        client.kind = Kind.ADOPT
        client.passed_on = False
        if not self.send(target, client, client.fds):
            return False
        # Count it now: the next heartbeat is up to a second away, and a burst would
        # otherwise all land on one worker.
        stats = target.stats
        stats["clients"] = stats.get("clients", 0) + 1
        return True

    def least_busy(self, client: Client) -> WorkerProc | None:
        """For a keyless client from a retiring worker: its slot's new worker (an upgrade
        replaces the worker of a slot), else the least busy worker."""
        return self.slots.serving.get(client.from_slot) or min(  # type: ignore[arg-type]
            self.slots.serving.values(), key=lambda w: w.clients, default=None)

    def can_take(self, worker: WorkerProc) -> bool:
        stats = worker.stats
        return (stats.get("clients", 0) < stats.get("max_clients", ANY)
                and len(worker.channel.queue) < self.budget.slot_share)

    def route(self, client: Client, since: float | None = None,
              now: float | None = None) -> WorkerProc | None:
        """The worker for a keyed client (sets its rank and whether it is the last), or
        None: hold it (its owner respawns, or every slot is full). `since`: when it was
        first handed off (default: from its sent_ns), `now`: the clock (default: read)."""
        owner = self.owner(client)
        target = self.slots.serving.get(owner) if owner is not None else None
        if target is not None and self.can_take(target):  # the common case: no clock read
            client.rank, client.last = 0, False
            return target
        now = time.monotonic() if now is None else now
        since = sent_at(client, now) if since is None else since
        if target is None and now - since < self.hold_timeout \
                and not self.slots.backing_off(owner, now):  # type: ignore[arg-type]
            return None  # its slot is respawning: wait for it
        ranking = routing.ranking(client.key_hash, self.slots.routes.table)
        for place, slot in enumerate(ranking):
            worker = self.slots.serving.get(slot)
            if worker is not None and self.can_take(worker):
                client.rank, client.last = place, False
                if place and not client.passed_on:
                    self.spilled(client, owner, worker, self.why_not(target))
                return worker
        if now - since < self.full_wait:
            return None  # every slot is full: wait for a place
        return self.last(client, ranking)

    def last(self, client: Client, ranking: list[int] | None = None) -> WorkerProc | None:
        """The first serving slot of the key's ranking whose channel has room, as the last:
        it takes the client if it has a place, else refuses it."""
        for place, slot in enumerate(ranking or routing.ranking(client.key_hash,
                                                                self.slots.routes.table)):
            worker = self.slots.serving.get(slot)
            if worker is not None and len(worker.channel.queue) < self.budget.slot_share:
                client.rank, client.last = place, True
                return worker
        return None

    def over_budget(self, client: Client) -> WorkerProc | None:
        """Holding this client would pass the master's fd budget: give it to a worker as
        the last now, or, when no worker's channel can take it, hold it in the first half
        of the reserve while the workers read their channels (a busy worker's, in a burst),
        then close it."""
        target = self.last(client)
        if target is None and self.budget.room(self.holding()) > -(fdbudget.RESERVE // 2):
            return None
        owner = self.owner(client)
        if owner is not None:
            self.count(owner, "over_budget")
        log.warning("fd.over_budget", key=show(client.key), worker_slot=owner,
                    to_slot=target.slot if target is not None else None,
                    holding=self.holding(), budget=self.budget.total)
        if target is None:
            close_fds(client.fds)
            client.fds = []
        return target

    def why_not(self, owner: WorkerProc | None) -> str:
        """Why the owner cannot take a client: respawning, full (by its heartbeat), or
        stalled (its channel holds its share of the master's fd budget: it does not read)."""
        if owner is None:
            return "respawning"
        stats = owner.stats
        return "full" if stats.get("clients", 0) >= stats.get("max_clients", ANY) else "stalled"

    def spilled(self, client: Client, owner: int | None, to: WorkerProc, why: str) -> None:
        """The owner cannot take the client: it goes to the next slot that can."""
        if owner is not None:
            self.count(owner, "spilled")
        log.info("fd.spilled", key=show(client.key), worker_slot=owner, rank=client.rank,
                 to_slot=to.slot, reason=why)

    def owner(self, client: Client) -> int | None:
        """The sender's answer stands if it used the routes of this epoch."""
        routes = self.slots.routes
        if client.epoch == routes.epoch and client.owner is not None \
                and client.owner in routes.table:
            return client.owner
        return routes.owner(client.key_hash)

    # --- what the master holds: retried each turn of its loop --------------------------

    def holding(self) -> int:
        """Clients' fds the master holds: held here, or queued on a channel."""
        return sum((w.channel.queued_fds for w in self.slots.workers.values()),
                   len(self.held))

    def receive_room(self) -> int:
        """How many messages to read from a channel now (FdBudget.receive_room)."""
        return self.budget.receive_room(self.holding())

    def retry_held(self) -> None:
        """Once a turn: recount what is queued on channels; deliver the held clients that
        can go now; drop what waited past hold_max."""
        now = time.monotonic()
        self.budget.recount(now, self.holding)
        if not self.held or now < self.next_retry and not any(
                self.can_take(w) for w in self.slots.serving.values()) and not (
                self.directory is not None and self.moves.done_since_retry()):
            return  # nothing could go anywhere yet
        waiting, self.held = self.held, []
        for held in waiting:
            if self.deliver(held.client, held.since, now):
                continue
            waited = now - held.since
            if waited >= self.hold_max:
                close_fds(held.client.fds)
                log.error("fd.dropped", key=show(held.client.key), reason="no worker took it",
                          waited=round(waited, 3))
            else:
                self.held.append(held)
        self.next_retry = self.next_deadline(now) or 0.0

    def drop_held(self, reason: str) -> None:
        for held in self.held:
            close_fds(held.client.fds)
            log.warning("fd.dropped", key=show(held.client.key), reason=reason)
        self.held = []

    def next_deadline(self, now: float) -> float | None:
        """The next time a held client's lot changes by the clock alone: its wait for its
        owner's respawn ends, its wait for a place ends (then it goes as the last), or its
        hold_max (then it is dropped). A place, a worker or a group that arrives meanwhile
        takes it at the next turn of the loop anyway."""
        due = [min((t for t in (h.since + self.hold_timeout, h.since + self.full_wait,
                                h.since + self.hold_max) if t > now), default=now)
               for h in self.held]
        return min(due) if due else None

    def held_fds(self) -> list[int]:
        return [fd for held in self.held for fd in held.client.fds]


def sent_at(client: Client, now: float | None = None) -> float:
    """When the client was first handed off (a worker's monotonic clock is ours), so that a
    client passed back by a full worker does not wait afresh; now if that is not known."""
    now = time.monotonic() if now is None else now
    sent = client.sent_ns / 1e9
    return sent if now - HOLD_MAX <= sent <= now else now
