"""The application's timers in a worker: call_later() of a connection (its transport) or
of a group, kept in one heap that the loop looks at when its next one is due. A timer
dies with its owner: a connection that closes or leaves, a group that ends or moves (the
group's new worker sets its timers again in state_restored()). A callback that raises
ends its owner, as any of the application's callbacks does. A timer of a frozen owner (a
group on its way to another worker) that falls due is parked: called when the move is
called off (unpark), dropped when the group has moved (cancel_all)."""

from __future__ import annotations

import heapq
import time
from typing import Any, Callable

from mpd.apps.interface import Group, Timer
from mpd.logs import log as logmod
from mpd.worker.connection import FROZEN, Connection

INF = float("inf")

log = logmod.get_logger()


class Timers:
    def __init__(self, clients: Any, groups: Any):
        self.clients = clients
        self.groups = groups
        self.heap: list[tuple[float, int, Timer]] = []
        self.by_owner: dict[int, set[Timer]] = {}  # id(owner): its live timers
        self.parked: dict[int, list[Timer]] = {}  # id(owner): due while it was frozen
        self.count = 0  # ties in the heap go by order of arming
        self.wake: Callable[[float], None] = lambda _when: None  # the loop's timer

    def call_later(self, owner: Any, delay: float, callback: Callable[..., Any],
                   args: tuple[Any, ...]) -> Timer:
        if not callable(callback):
            raise TypeError("call_later() needs a callable")
        timer = Timer(time.monotonic() + max(0.0, float(delay)), callback, args, owner)
        self.by_owner.setdefault(id(owner), set()).add(timer)
        self.count += 1
        heapq.heappush(self.heap, (timer.when, self.count, timer))
        self.wake(timer.when)
        return timer

    def next_due(self) -> float:
        heap = self.heap
        while heap and heap[0][2].cancelled:
            heapq.heappop(heap)
        return heap[0][0] if heap else INF

    def run_due(self, now: float) -> None:
        """Call every timer that is due, each inside its owner's boundary."""
        heap = self.heap
        while heap and heap[0][0] <= now:
            _, _, timer = heapq.heappop(heap)
            if timer.cancelled:
                continue
            owner = timer.owner
            if self.frozen(owner):
                self.parked.setdefault(id(owner), []).append(timer)
                continue
            live = self.by_owner.get(id(owner))
            if live is not None:
                live.discard(timer)
            timer.cancelled = True  # it ran: cancel() is a no-op from now
            try:
                timer.callback(*timer.args)
            except Exception as e:  # noqa: BLE001 - the application's bug ends the owner
                if isinstance(owner, Connection):
                    self.clients.app_failed(owner, "timer", e)
                elif isinstance(owner, Group):
                    self.groups.fail(owner, "timer", e)
                else:
                    log.exception("app.error", where="timer", error=repr(e))

    def frozen(self, owner: Any) -> bool:
        if isinstance(owner, Connection):
            return owner.phase >= FROZEN
        return isinstance(owner, Group) and owner.key in self.groups.moving

    def unpark(self, owner: Any) -> None:
        """The owner serves here again: its timers that fell due meanwhile run now."""
        for timer in self.parked.pop(id(owner), ()):
            heapq.heappush(self.heap, (timer.when, 0, timer))

    def cancel_all(self, owner: Any) -> None:
        self.parked.pop(id(owner), None)
        for timer in self.by_owner.pop(id(owner), ()):
            timer.cancelled = True
