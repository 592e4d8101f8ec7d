"""Moving key groups, the master's side (the workers' is worker/moves.py): which groups
must move, starting their moves a few at a time, relaying each move's chunks from the old
owner to the new one, and ending it: MOVED from the new owner commits it (the directory
names the new worker; the old one is told MOVE_DONE; clients held for the key go on to
the new owner), a failure or a deadline calls it off (MOVE_ABORT to both ends: the group
serves on where it was).

A group must move when the worker that serves it is not the one its key's routes name
(the slot of its pin, else its key's owner) and that one is ready: after a scale, while
an upgrade's roll replaces a slot's worker, when a new worker joins, on `mpdctl move`
and `mpdctl drain`. plan() looks once over the directory after such a change; moves
then go WINDOW at a time, so each group's pause stays short (its own transfer only).

A dead worker: an old owner that dies before its transfer is all on its way takes its
group with it (the new owner is told to forget the pieces); one that dies after leaves
the move to finish. A new owner that dies before MOVED calls the move off: the group
serves on at the old owner. The master holds nothing that only it knows: the groups and
their members are in the workers, which die with the master."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from mpd.logs import log as logmod
from mpd.master.directory import Directory, Placement
from mpd.master.slots import Slots, WorkerProc
from mpd.wire.channel import close_fds
from mpd.wire.latency import BOUNDS_US, Histogram
from mpd.wire.messages import (
    GroupInfo,
    GroupQuery,
    Kind,
    MoveAbort,
    MoveChunk,
    Moved,
    MoveDone,
    MoveFailed,
    MoveOut,
    key_to_json,
)
from mpd.wire.routing import Key, key_hash, show

WINDOW = 8  # moves under way at once
MOVE_TIMEOUT = 10.0  # seconds a move may take before it is called off
INFO_FRESH = 2.0  # seconds a worker's answer about a group serves mpdctl where

log = logmod.get_logger()

Send = Callable[..., bool]  # (worker, message, fds) -> False when its channel is gone


@dataclass
class Move:
    id: int
    key: Key
    source: WorkerProc
    target: WorkerProc
    started: float = field(default_factory=time.monotonic)
    complete: bool = False  # every chunk of the transfer was relayed to the target


class Moves:
    def __init__(self, slots: Slots, directory: Directory | None, send: Send,
                 routes_changed: Callable[[], None]):
        self.slots = slots
        self.directory = directory  # None: the application has no groups; nothing moves
        self.send = send
        self.routes_changed = routes_changed  # every worker learns them; plan() follows
        self.under_way: dict[int, Move] = {}
        self.by_key: dict[Key, Move] = {}
        self.queue: deque[Key] = deque()  # groups to move, in plan() order
        self.skip: set[Key] = set()  # failed since the last plan(): not tried again yet
        self.last_id = 0
        self.done = 0
        self.failed = 0
        self.pauses = Histogram()  # what members saw (freeze to restore), from MOVED
        self.failures: dict[Key, str] = {}  # why a key's last move failed (mpdctl move)
        self.ended_since = False  # a move ended since the broker last asked
        self.queries: dict[int, Key] = {}  # GROUP_QUERY sent, by id (mpdctl where)
        self.infos: dict[Key, tuple[float, int, GroupInfo]] = {}  # answers: when, pid, info
        self.paused = False  # an upgrade is about to exec: no move starts (upgrade.py)

    def moving(self, key: Key) -> bool:
        return key in self.by_key

    # --- which groups move -------------------------------------------------------------

    def desired(self, placement: Placement) -> WorkerProc | None:
        """The worker that should serve the group: its pin's slot's, else its key's owner's,
        if that worker is ready (else None: the group waits where it is)."""
        routes = self.slots.routes
        slot = placement.pin if placement.pin in routes.table else routes.owner(
            placement.key_hash)
        worker = self.slots.serving.get(slot) if slot is not None else None
        return worker if worker is not None and worker.state == "ready" else None

    def misplaced(self, placement: Placement) -> bool:
        target = self.desired(placement)
        return target is not None and target is not placement.worker

    def plan(self) -> None:
        """Look over every group once (after a change of routes or workers)."""
        if self.directory is None:
            return
        self.skip.clear()
        self.queue = deque(key for key, placement in self.directory.placements.items()
                           if key not in self.by_key and self.misplaced(placement))
        self.start_more()

    def start_more(self) -> None:
        assert self.directory is not None or not self.queue
        while self.queue and len(self.under_way) < WINDOW and not self.paused:
            key = self.queue.popleft()
            placement = self.directory.get(key)  # type: ignore[union-attr]
            if placement is None or key in self.by_key or key in self.skip:
                continue
            target = self.desired(placement)
            if target is None or target is placement.worker:
                continue
            self.start(key, placement.worker, target)

    def start(self, key: Key, source: WorkerProc, target: WorkerProc) -> None:
        self.last_id += 1
        move = Move(self.last_id, key, source, target)
        if not self.send(source, MoveOut(move=move.id, key=key_to_json(key),
                                         to_slot=target.slot)):
            return
        self.under_way[move.id] = move
        self.by_key[key] = move
        log.debug("group.move_started", key=show(key), move=move.id, from_slot=source.slot,
                  from_pid=source.pid, to_slot=target.slot, to_pid=target.pid)

    # --- a move under way: the workers' messages -----------------------------------------

    def on_chunk(self, sender: WorkerProc, chunk: MoveChunk) -> None:
        """Relay a chunk of the transfer to the new owner, fds and all."""
        move = self.under_way.get(chunk.move)
        if move is None or sender is not move.source:
            close_fds(chunk.fds)  # a move called off: its pieces go nowhere
            chunk.fds = []
            return
        if not self.send(move.target, chunk, chunk.fds):
            self.call_off(move, "the new owner's channel is gone")
            return
        chunk.fds = []  # the target's channel owns them now
        if chunk.last:
            move.complete = True

    def on_moved(self, sender: WorkerProc, moved: Moved) -> None:
        move = self.under_way.get(moved.move)
        if move is None or sender is not move.target:
            return
        self.end(move)
        if self.directory is not None:
            self.directory.moved(move.key, move.target)
        self.failures.pop(move.key, None)
        self.send(move.source, MoveDone(move=move.id))
        self.done += 1
        self.pauses.observe(moved.pause_us)
        self.start_more()

    def on_failed(self, sender: WorkerProc, failed: MoveFailed) -> None:
        move = self.under_way.get(failed.move)
        if move is None:
            return
        self.call_off(move, failed.reason)

    def call_off(self, move: Move, reason: str) -> None:
        """The move is over, unmade: both ends are told (the old owner serves on; if it
        died meanwhile, the group is gone with both: its placement is forgotten)."""
        self.end(move)
        self.failed += 1
        self.skip.add(move.key)
        self.failures[move.key] = reason
        placement = self.directory.get(move.key) if self.directory is not None else None
        if placement is not None and placement.worker is move.source and \
                self.slots.workers.get(move.source.pid) is not move.source:
            self.directory.forget(move.key)  # type: ignore[union-attr]
        log.warning("group.move_failed", key=show(move.key), move=move.id,
                    from_slot=move.source.slot, to_slot=move.target.slot, error=reason)
        for worker in (move.source, move.target):
            self.send(worker, MoveAbort(move=move.id))
        self.start_more()

    def done_since_retry(self) -> bool:
        """Did a move end since the last call? (Clients held for its key may go now.)"""
        ended, self.ended_since = self.ended_since, False
        return ended

    def end(self, move: Move) -> None:
        self.ended_since = True
        self.under_way.pop(move.id, None)
        if self.by_key.get(move.key) is move:
            del self.by_key[move.key]

    # --- workers that die, and the clock ------------------------------------------------

    def worker_gone(self, worker: WorkerProc) -> set[Key]:
        """Moves from or to a dead worker; the keys whose group lives on (its transfer was
        all relayed: the new owner may still restore it)."""
        keep: set[Key] = set()
        for move in list(self.under_way.values()):
            if move.source is worker and move.complete:
                keep.add(move.key)
            elif move.source is worker:
                self.end(move)
                self.send(move.target, MoveAbort(move=move.id))
            elif move.target is worker:
                self.call_off(move, "the new owner died")
        return keep

    def deadline(self) -> float | None:
        return min((m.started + MOVE_TIMEOUT for m in self.under_way.values()), default=None)

    def tick(self, now: float) -> None:
        for move in list(self.under_way.values()):
            if now >= move.started + MOVE_TIMEOUT:
                self.call_off(move, f"not done within {MOVE_TIMEOUT:g} s")

    def close(self) -> None:
        pass

    def in_child(self) -> None:
        pass

    def status(self) -> dict[str, Any]:
        """For `status` and the metrics: the moves' counts, and the pause that members saw
        (freeze to restore, by MOVED) as a histogram (latency.BOUNDS_US)."""
        pauses = self.pauses
        return {"placed": len(self.directory) if self.directory is not None else None,
                "under_way": len(self.under_way), "queued": len(self.queue),
                "done": self.done, "failed": self.failed,
                "drained": sorted(self.slots.drained),
                "pause": {"bounds_us": list(BOUNDS_US), "buckets": list(pauses.buckets),
                          "sum_us": pauses.sum_us, "max_us": pauses.peak_us}}

    # --- across an upgrade's exec (state.py): the counts go on -------------------------

    def dump(self) -> dict[str, Any]:
        return {"last_id": self.last_id, "done": self.done, "failed": self.failed,
                "buckets": list(self.pauses.buckets), "sum_us": self.pauses.sum_us,
                "max_us": self.pauses.peak_us}

    def restore(self, data: Any) -> None:
        """What an old master counted (none from a release before moves had counts)."""
        if not isinstance(data, dict):
            return
        self.last_id = int(data.get("last_id", 0))
        self.done, self.failed = int(data.get("done", 0)), int(data.get("failed", 0))
        buckets = data.get("buckets")
        if isinstance(buckets, list) and len(buckets) == len(self.pauses.buckets):
            self.pauses.buckets = [int(b) for b in buckets]
            self.pauses.sum_us = int(data.get("sum_us", 0))
            self.pauses.peak_us = int(data.get("max_us", 0))

    def reactions(self) -> dict[int, Callable[[WorkerProc, Any], None]]:
        """The channel messages this part takes."""
        return {Kind.MOVE_CHUNK: self.on_chunk, Kind.MOVED: self.on_moved,
                Kind.MOVE_FAILED: self.on_failed, Kind.GROUP_INFO: self.on_group_info}

    # --- what operators ask (ops/keycommands.py) -----------------------------------------

    def where(self, key: Key) -> dict[str, Any]:
        """Which slot and worker serve `key` here, and its group's members (asked of that
        worker: known at a later call, within a loop turn or two)."""
        routes = self.slots.routes
        h = key_hash(key)
        owner = routes.owner(h)
        placement = self.directory.get(key) if self.directory is not None else None
        worker = placement.worker if placement is not None else self.slots.serving.get(owner)
        reply: dict[str, Any] = {
            "key": show(key), "owner_slot": owner, "grouped": self.directory is not None,
            "placed": placement is not None, "moving": key in self.by_key,
            "pin": placement.pin if placement is not None else None,
            "slot": worker.slot if worker is not None else owner,
            "pid": worker.pid if worker is not None else None, "members": None,
            "failed": self.failures.get(key)}
        if placement is not None:
            answered = self.infos.get(key)
            if answered is not None and answered[1] == placement.worker.pid \
                    and time.monotonic() - answered[0] < INFO_FRESH:
                reply["members"] = max(0, answered[2].members)
            elif key not in self.queries.values():
                self.last_id += 1
                self.queries[self.last_id] = key
                self.send(placement.worker, GroupQuery(query=self.last_id, key=key_to_json(key)))
        return reply

    def on_group_info(self, sender: WorkerProc, info: GroupInfo) -> None:
        key = self.queries.pop(info.query, None)
        if key is not None:
            self.infos[key] = (time.monotonic(), sender.pid, info)
            if len(self.infos) > 1024:  # answers for mpdctl where: a few are enough
                self.infos.pop(next(iter(self.infos)))

    def move_key(self, key: Key, slot: int) -> str | None:
        """mpdctl move: the group of `key` to `slot`, pinned there while it lives."""
        if self.directory is None:
            return "this application has no key groups: nothing to move"
        placement = self.directory.get(key)
        if placement is None:
            return f"no group of key {show(key)!r} on this host"
        if slot not in self.slots.routes.table:
            return (f"slot {slot} takes no keys: the slots that do are "
                    f"{list(self.slots.routes.table)}")
        worker = self.slots.serving.get(slot)
        if worker is None or worker.state != "ready":
            return f"slot {slot} has no ready worker now; try again"
        if key in self.by_key:
            return f"key {show(key)!r} is moving already"
        self.directory.pin(key, slot)
        self.failures.pop(key, None)
        self.skip.discard(key)
        if placement.worker is not worker:
            self.queue.appendleft(key)
            self.start_more()
        return None

    def drain(self, slot: int, drained: bool) -> str | None:
        """mpdctl drain / undrain: route no key to `slot` (its groups move away), or again."""
        if slot not in self.slots.table:
            return f"no slot {slot} (the slots are 0 to {self.slots.target - 1})"
        if drained and not [s for s in self.slots.routes.table if s != slot]:
            return f"slot {slot} is the last that takes keys: scale up first"
        if self.directory is not None and drained:
            for placement in self.directory.placements.values():
                if placement.pin == slot:
                    placement.pin = None  # a pin to a drained slot goes with the drain
        self.slots.drain(slot, drained)
        self.routes_changed()
        return None
