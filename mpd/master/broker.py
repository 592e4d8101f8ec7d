"""The hand-off broker, the master's side of a hand-off: routes a client that a worker
handed over (HANDOFF, with its fd and unread bytes) to a worker that can take it (ADOPT),
and holds it, for a bounded time, while none can.

A worker can take a client when it serves, has a place by its last heartbeat (clients and
max_clients, plus the ADOPTs sent to it since) and its channel holds less than a slot's
share of the master's fd budget (fdbudget.py). The client goes to its key's owner if the
owner can take it; while the owner's slot is respawning it waits for it up to
hold_timeout (not while the slot backs off); else to the next slot of the key's
rendezvous ranking that can (fd.spilled). When none can (every slot full), it is held
and retried as slots free places, up to full_wait; then it goes to its first serving slot
as the last: that worker takes it if it has a place by then, else refuses it with the
protocol's reply. A worker that is full when an ADOPT arrives passes the client back (a
HANDOFF with a rank); the broker then counts that worker full until its next heartbeat
and routes the client again.

Held clients and ADOPTs queued on channels cost the master fds: a client that it cannot
hold within its fd budget goes at once to a worker as the last, or is closed when no
worker's channel can take it (fd.over_budget).

It knows the slot table and a way to send; it neither forks nor reaps (master.py does).
The worker's side, giving a client away and adopting one, is mpd/worker/handoff.py."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from mpd.logs import log as logmod
from mpd.master.fdbudget import FdBudget
from mpd.master.slots import Slots, WorkerProc
from mpd.wire import routing
from mpd.wire.channel import Kind, Message, close_fds

HOLD_TIMEOUT = 1.0  # seconds a hand-off waits for its owner's respawn before a fallback
FULL_WAIT = 5.0  # seconds a hand-off waits for a place while every slot is full
HOLD_MAX = 30.0  # seconds a hand-off may wait when no worker at all can take it
ANY = 1 << 62  # max_clients of a worker that has not said yet: no limit known

log = logmod.get_logger()

# (worker, kind, meta, raw, fds) -> False when the worker's channel is gone (fds stay ours)
Send = Callable[[WorkerProc, Kind, "dict[str, Any]", bytes, "list[int]"], bool]
Count = Callable[[int, str], None]  # (slot, counter): a count the master keeps (tally.py)


@dataclass
class HeldClient:
    """A handed-off client that no worker can take right now."""
    meta: dict[str, Any]
    raw: bytes
    fd: int
    since: float = field(default_factory=time.monotonic)


class Broker:
    def __init__(self, slots: Slots, send: Send, count: Count = lambda _slot, _name: None,
                 hold_timeout: float = HOLD_TIMEOUT, hold_max: float = HOLD_MAX,
                 full_wait: float = FULL_WAIT, budget: FdBudget | None = None):
        self.slots = slots
        self.send = send
        self.count = count
        self.hold_timeout = hold_timeout
        self.hold_max = hold_max
        self.full_wait = full_wait
        self.budget = budget or FdBudget()
        self.held: list[HeldClient] = []  # oldest first
        self.next_retry = 0.0  # when a held client's lot changes by the clock alone
        self.queued = 0  # messages queued on channels (each may hold a client's fd): an
        # upper bound, counted again each turn while it is not 0

    def dispatch(self, sender: WorkerProc, message: Message) -> None:
        """A HANDOFF from `sender`: deliver it now, or hold it."""
        meta = message.meta
        if len(message.fds) != 1 or not isinstance(meta.get("key"), (int, type(None))):
            close_fds(message.fds)
            log.error("channel.error", worker_pid=sender.pid, worker_slot=sender.slot,
                      error="HANDOFF without exactly one fd and a key")
            return
        stats = sender.stats
        if meta.get("rank"):  # passed back: it was full when our ADOPT came
            stats["clients"] = stats["max_clients"] = max(stats.get("clients", 0),
                                                          stats.get("max_clients", 0))
        elif stats.get("clients"):  # one client fewer there, until its heartbeat says
            stats["clients"] -= 1
        meta["from_slot"], meta["from_pid"] = sender.slot, sender.pid
        fd = message.fds.pop()  # ours from here on: delivered, held, or dropped
        if not self.deliver(meta, message.raw, fd):
            self.held.append(HeldClient(meta, message.raw, fd, sent_at(meta)))
            self.next_retry = 0.0  # its deadlines count from the next turn on

    def deliver(self, meta: dict[str, Any], raw: bytes, fd: int, since: float | None = None,
                now: float | None = None) -> bool:
        """ADOPT to a worker that can take it (route), or, when the master cannot hold it
        within its fd budget, as the last to any that will. False: hold it."""
        if meta["key"] is None:
            target = self.least_busy(meta)
        else:
            target = self.route(meta, since, now)
            if target is None and self.budget.room(self.holding()) <= 0:
                target = self.over_budget(meta, fd)
                if target is None:
                    return True  # closed
        if target is None or not self.send(target, Kind.ADOPT, meta, raw, [fd]):
            return False
        # Count it now: the next heartbeat is up to a second away, and a burst would
        # otherwise all land on one worker.
        stats = target.stats
        stats["clients"] = stats.get("clients", 0) + 1
        if target.channel.queue:
            self.queued += 1
        return True

    def least_busy(self, meta: dict[str, Any]) -> WorkerProc | None:
        """For a keyless client from a retiring worker: its slot's new worker (an upgrade
        replaces the worker of a slot), else the least busy worker."""
        return self.slots.serving.get(meta.get("from_slot")) or min(
            self.slots.serving.values(), key=lambda w: w.clients, default=None)

    def can_take(self, worker: WorkerProc) -> bool:
        stats = worker.stats
        return (stats.get("clients", 0) < stats.get("max_clients", ANY)
                and len(worker.channel.queue) < self.budget.slot_share)

    def route(self, meta: dict[str, Any], since: float | None = None,
              now: float | None = None) -> WorkerProc | None:
        """The worker for a keyed client (sets its rank and whether it is the last), or
        None: hold it (its owner respawns, or every slot is full). `since`: when it was
        first handed off (default: from its meta), `now`: the clock (default: read)."""
        owner = self.owner(meta)
        target = self.slots.serving.get(owner)
        passed_back = bool(meta.get("rank"))  # by a full worker, which said so (fd.spilled)
        if target is not None and self.can_take(target):  # the common case: no clock read
            meta["rank"], meta["last"] = 0, False
            return target
        now = time.monotonic() if now is None else now
        since = sent_at(meta, now) if since is None else since
        if target is None and now - since < self.hold_timeout \
                and not self.slots.backing_off(owner, now):
            return None  # its slot is respawning: wait for it
        ranking = routing.ranking(meta["key"], self.slots.table)
        for place, slot in enumerate(ranking):
            worker = self.slots.serving.get(slot)
            if worker is not None and self.can_take(worker):
                meta["rank"], meta["last"] = place, False
                if place and not passed_back:
                    self.spilled(meta, owner, worker, self.why_not(target))
                return worker
        if now - since < self.full_wait:
            return None  # every slot is full: wait for a place
        return self.last(meta, ranking)

    def last(self, meta: dict[str, Any], ranking: list[int] | None = None) -> WorkerProc | None:
        """The first serving slot of the key's ranking whose channel has room, as the last:
        it takes the client if it has a place, else refuses it."""
        for place, slot in enumerate(ranking or routing.ranking(meta["key"], self.slots.table)):
            worker = self.slots.serving.get(slot)
            if worker is not None and len(worker.channel.queue) < self.budget.slot_share:
                meta["rank"], meta["last"] = place, True
                return worker
        return None

    def over_budget(self, meta: dict[str, Any], fd: int) -> WorkerProc | None:
        """Holding this client would pass the master's fd budget: give it to a worker as
        the last now, or close it when no worker's channel can take it."""
        target = self.last(meta)
        owner = self.owner(meta)
        self.count(owner, "over_budget")
        log.warning("fd.over_budget", key=meta["key"], worker_slot=owner,
                    to_slot=target.slot if target is not None else None,
                    holding=self.holding(), budget=self.budget.total)
        if target is None:
            close_fds([fd])
        return target

    def why_not(self, owner: WorkerProc | None) -> str:
        """Why the owner cannot take a client: respawning, full (by its heartbeat), or
        stalled (its channel holds its share of the master's fd budget: it does not read)."""
        if owner is None:
            return "respawning"
        stats = owner.stats
        return "full" if stats.get("clients", 0) >= stats.get("max_clients", ANY) else "stalled"

    def spilled(self, meta: dict[str, Any], owner: int, to: WorkerProc, why: str) -> None:
        """The owner cannot take the client: it goes to the next slot that can."""
        self.count(owner, "spilled")
        log.info("fd.spilled", key=meta["key"], worker_slot=owner, rank=meta["rank"],
                 to_slot=to.slot, reason=why)

    def owner(self, meta: dict[str, Any]) -> int:
        """The sender's answer stands if it used the same table: tables are always slots
        0..N-1 (Slots.resize), so the same size means the same table."""
        table = self.slots.table
        owner = meta.get("owner")
        if meta.get("table") != len(table) or not isinstance(owner, int) \
                or not 0 <= owner < len(table):
            owner = routing.owner(meta["key"], table)
        return owner

    # --- what the master holds: retried each turn of its loop --------------------------

    def holding(self) -> int:
        """Clients' fds the master holds: held here, or queued on a channel."""
        return len(self.held) + self.queued

    def receive_room(self) -> int:
        """How many messages to read from a channel now (FdBudget.receive_room)."""
        return self.budget.receive_room(self.holding())

    def retry_held(self) -> None:
        """Once a turn: recount what is queued on channels; deliver the held clients that
        can go now; drop what waited past hold_max."""
        workers = self.slots.workers.values()
        if self.queued:  # flushes took some off: count again (nothing queued: no loop)
            self.queued = sum(len(w.channel.queue) for w in workers)
        now = time.monotonic()
        self.budget.recount(now, lambda: len(self.held) + sum(
            len(fds) for w in workers for _data, fds in w.channel.queue))
        if not self.held or now < self.next_retry and not any(
                self.can_take(w) for w in self.slots.serving.values()):
            return  # nothing could go anywhere yet
        waiting, self.held = self.held, []
        for held in waiting:
            if self.deliver(held.meta, held.raw, held.fd, held.since, now):
                continue
            waited = now - held.since
            if waited >= self.hold_max:
                close_fds([held.fd])
                log.error("fd.dropped", key=held.meta["key"], reason="no worker took it",
                          waited=round(waited, 3))
            else:
                self.held.append(held)
        self.next_retry = self.next_deadline(now) or 0.0

    def drop_held(self, reason: str) -> None:
        for held in self.held:
            close_fds([held.fd])
            log.warning("fd.dropped", key=held.meta["key"], reason=reason)
        self.held = []

    def next_deadline(self, now: float) -> float | None:
        """The next time a held client's lot changes by the clock alone: its wait for its
        owner's respawn ends, its wait for a place ends (then it goes as the last), or its
        hold_max (then it is dropped). A place or a worker that appears meanwhile takes it
        at the next turn of the loop anyway."""
        due = [min((t for t in (h.since + self.hold_timeout, h.since + self.full_wait,
                                h.since + self.hold_max) if t > now), default=now)
               for h in self.held]
        return min(due) if due else None

    def held_fds(self) -> list[int]:
        return [held.fd for held in self.held]


def sent_at(meta: dict[str, Any], now: float | None = None) -> float:
    """When the client was first handed off (a worker's monotonic clock is ours), so that a
    client passed back by a full worker does not wait afresh; now if that is not known."""
    now = time.monotonic() if now is None else now
    sent_ns = meta.get("sent_ns")
    if type(sent_ns) is int and now - HOLD_MAX <= sent_ns / 1e9 <= now:
        return sent_ns / 1e9
    return now
