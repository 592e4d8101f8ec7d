"""The slot table: which worker processes exist, which one serves each slot, and what
each slot remembers across its workers' deaths (restarts, the back-off of a slot whose
workers fail before they serve).

Workers live in numbered slots 0..N-1; a respawned worker takes the slot of the one it
replaces, so routing by slot survives respawns. This module is the master's data about
them; the master (master.py) forks and reaps, the broker (handoff.py) routes to them."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from mpd.wire.channel import Channel
from mpd.wire.routing import Routes

BACKOFF_FIRST = 0.1  # seconds before the second respawn of a failing slot; doubles after each
FLOOR_WAIT = 1.0  # the longest wait of a failing slot while no other slot serves


@dataclass
class WorkerProc:
    """The master's view of one worker process."""
    slot: int
    pid: int
    channel: Channel
    started: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    state: str = "starting"  # starting -> ready -> stopping
    stats: dict[str, int] = field(default_factory=dict)
    generation: int = 1  # the master's generation (upgrades) that started it
    version: str = ""  # mpd's version in the worker, from its HELLO
    config_generation: int = 1  # the number of the config it runs, from its STATS
    latency: tuple[list[int], int] | None = None  # hand-off latency: buckets, sum (tally.py)

    @property
    def clients(self) -> int:
        return self.stats.get("clients", 0)


@dataclass
class SlotHistory:
    """What survives a worker's death: how often this slot crashed, when to retry."""
    restarts: int = 0
    failures: int = 0  # workers in a row that ended before they served
    respawn_at: float = 0.0


class Slots:
    """Every worker process by pid, the one serving each slot, and each slot's history."""

    def __init__(self, count: int):
        self.workers: dict[int, WorkerProc] = {}  # by pid, retiring ones included
        self.serving: dict[int, WorkerProc] = {}  # by slot: the workers that take clients
        self.history: dict[int, SlotHistory] = {}  # by slot
        self.table: tuple[int, ...] = tuple(range(count))  # always 0..N-1: see resize()
        self.epoch = 1  # the routes' number: one more with each change (routing.Routes)
        self.drained: set[int] = set()  # slots that own no key (mpdctl drain SLOT)
        self._routes = Routes(0, ())  # `routes`, as of its epoch
        self.retired_restarts = 0  # restarts of slots that a scale-down removed

    @property
    def target(self) -> int:
        return len(self.table)

    @property
    def routes(self) -> Routes:
        """The slots that own keys: the table's, but the drained ones. Made again only
        when the epoch moves, which every change of the table or of the drained slots
        does (each hand-off reads them)."""
        routes = self._routes
        if routes.epoch != self.epoch:
            routes = self._routes = Routes(
                self.epoch, tuple(s for s in self.table if s not in self.drained))
        return routes

    def drain(self, slot: int, drained: bool) -> None:
        """Take a slot out of the routes (its keys go to their next slots), or back."""
        if (slot in self.drained) != drained:
            self.drained ^= {slot}
            self.epoch += 1

    def add(self, worker: WorkerProc, serving: bool = True) -> SlotHistory:
        """A new worker; it takes its slot now, or (an upgrade's) once it is ready."""
        self.workers[worker.pid] = worker
        if serving:
            self.serving[worker.slot] = worker
        history = self.history.setdefault(worker.slot, SlotHistory())
        history.respawn_at = 0.0
        return history

    def remove(self, pid: int) -> WorkerProc | None:
        """Forget a reaped worker; None when the pid was not one of ours."""
        worker = self.workers.pop(pid, None)
        if worker is not None and self.serving.get(worker.slot) is worker:
            del self.serving[worker.slot]
        return worker

    def retire(self, worker: WorkerProc) -> None:
        """The worker takes no more clients; it is on its way out."""
        worker.state = "stopping"
        if self.serving.get(worker.slot) is worker:
            del self.serving[worker.slot]

    def resize(self, count: int) -> list[WorkerProc]:
        """Make the table slots 0..count-1 (a new epoch of the routes). Returns the serving
        workers whose slot is gone, now retired."""
        if len(self.table) != count:
            self.epoch += 1
        self.table = tuple(range(count))
        self.drained = {s for s in self.drained if s < count}
        gone = [w for w in self.serving.values() if w.slot >= count]
        for worker in gone:
            self.retire(worker)
        for slot in [s for s in self.history if s >= count]:
            self.retired_restarts += self.history.pop(slot).restarts
        return gone

    def ready_count(self) -> int:
        return sum(1 for w in self.workers.values() if w.state == "ready")

    def clients(self) -> int:
        return sum(w.clients for w in self.workers.values())

    def restarts(self, slot: int) -> int:
        history = self.history.get(slot)
        return history.restarts if history else 0

    def total_restarts(self) -> int:
        """Restarts of every slot since mpd started, removed slots included."""
        return self.retired_restarts + sum(h.restarts for h in self.history.values())

    def backing_off(self, slot: int, now: float) -> bool:
        history = self.history.get(slot)
        return history is not None and history.respawn_at > now

    def empty_slots(self, now: float) -> list[int]:
        """Slots of the table with no serving worker whose back-off is over."""
        return [slot for slot in self.table
                if slot not in self.serving and not self.backing_off(slot, now)]

    def next_respawn(self) -> float | None:
        due = [h.respawn_at for h in self.history.values() if h.respawn_at]
        return min(due) if due else None

    def schedule_respawn(self, slot: int, served: bool, backoff_max: float) -> float:
        """Count a death; return the seconds to wait before refilling the slot.

        A worker that served and then died is no crash loop of the code (killed, out of
        memory): its slot is refilled at once. Only workers that fail before they serve
        back off: the first at once, then waits doubling from BACKOFF_FIRST up to
        backoff_max. And never while the house is empty: when no other slot serves, the
        wait is FLOOR_WAIT at most, so some slot always tries again soon."""
        history = self.history.setdefault(slot, SlotHistory())
        history.restarts += 1
        history.failures = 0 if served else history.failures + 1
        delay = 0.0
        if history.failures > 1:
            delay = min(backoff_max, BACKOFF_FIRST * 2 ** (history.failures - 2))
            if not any(w.state == "ready" for w in self.serving.values() if w.slot != slot):
                delay = min(delay, FLOOR_WAIT)
        history.respawn_at = time.monotonic() + delay
        return delay

    def respawn_now(self, slot: int) -> None:
        """A worker killed on purpose (hung): its slot is refilled at once."""
        history = self.history.setdefault(slot, SlotHistory())
        history.restarts += 1
        history.respawn_at = time.monotonic()
