"""Where every key group is: the master's directory of placements, for an application
with groups. The master sends every client that joins a grouped key to the worker the
directory names (or, for a key with no group, to the key's owner, and records it there),
so that the clients of one key always meet in one process: workers never decide that
alone, because only the master sees every worker.

A placement is made by an ADOPT (each numbered: gseq, so that a group that ends while
another client is on its way to it is not forgotten, GroupEnded) and changed by a move
(moves.py). It is forgotten when its group ends or its worker dies. A group that spilled
to another slot than its key's owner (the owner was full) is pinned there, as is one an
operator moved (`mpdctl move`): moves put groups where routing says, and pins say where
that is for those keys. Everything here is derived from the workers; a master that
dies takes its workers with it, and an upgrade carries the directory in its state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mpd.master.slots import WorkerProc
from mpd.wire.messages import key_from_json, key_to_json
from mpd.wire.routing import Key, key_hash


@dataclass
class Placement:
    worker: WorkerProc
    key_hash: int
    gseq: int = 0  # the newest ADOPT sent for the key
    pin: int | None = None  # a slot the group stays in, whatever its key's owner


class Directory:
    def __init__(self) -> None:
        self.placements: dict[Key, Placement] = {}

    def __len__(self) -> int:
        return len(self.placements)

    def get(self, key: Key) -> Placement | None:
        return self.placements.get(key)

    def place(self, key: Key, h: int, worker: WorkerProc, pin: bool = False) -> int:
        """A client of `key` goes to `worker` (ADOPT): its gseq."""
        placement = self.placements.get(key)
        if placement is None or placement.worker is not worker:
            gseq = placement.gseq if placement is not None else 0
            placement = self.placements[key] = Placement(worker, h, gseq)
        if pin:
            placement.pin = worker.slot
        placement.gseq += 1
        return placement.gseq

    def moved(self, key: Key, worker: WorkerProc) -> None:
        placement = self.placements.get(key)
        if placement is not None:
            placement.worker = worker

    def pin(self, key: Key, slot: int | None) -> None:
        placement = self.placements.get(key)
        if placement is not None:
            placement.pin = slot

    def ended(self, worker: WorkerProc, key: Key, gseq: int) -> bool:
        """The group of `key` on `worker` has no member left: forgotten, unless a client
        is on its way to it (an ADOPT sent after the group's newest)."""
        placement = self.placements.get(key)
        if placement is None or placement.worker is not worker or placement.gseq != gseq:
            return False
        del self.placements[key]
        return True

    def forget(self, key: Key) -> None:
        self.placements.pop(key, None)

    def of(self, worker: WorkerProc) -> list[Key]:
        return [k for k, p in self.placements.items() if p.worker is worker]

    def worker_gone(self, worker: WorkerProc, keep: set[Key]) -> list[Key]:
        """A worker died: its groups died with it (but those in `keep`, whose move has all
        of their transfer on its way). The keys forgotten."""
        gone = [k for k in self.of(worker) if k not in keep]
        for key in gone:
            del self.placements[key]
        return gone

    def counts(self) -> dict[int, int]:
        """Groups per slot."""
        out: dict[int, int] = {}
        for placement in self.placements.values():
            out[placement.worker.slot] = out.get(placement.worker.slot, 0) + 1
        return out

    # --- across an upgrade's exec --------------------------------------------------------

    def dump(self) -> list[dict[str, Any]]:
        return [{"key": key_to_json(k), "pid": p.worker.pid, "gseq": p.gseq, "pin": p.pin}
                for k, p in self.placements.items()]

    def restore(self, data: Any, workers: dict[int, WorkerProc]) -> None:
        """Placements an old master had; those of workers that are gone are dropped."""
        for item in data if isinstance(data, list) else []:
            worker = workers.get(item.get("pid"))
            if worker is None:
                continue
            key = key_from_json(item.get("key"))
            if key is None:
                continue
            self.placements[key] = Placement(worker, key_hash(key), int(item.get("gseq", 0)),
                                             item.get("pin"))
