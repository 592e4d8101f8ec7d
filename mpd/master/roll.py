"""Upgrade in place, the new master's part after it adopted the old one's workers: replace
every worker of an older generation, slot by slot. A new-code worker starts beside the
slot's old one; once it says HELLO it takes the slot, and the old one retires into it
(every live client handed over with its unread bytes, replies already due written first,
as on a scale-down). New clients are never refused meanwhile: until the old worker's
RETIRE, both accept.

A new worker that does not become ready stops the roll: the slot's old worker keeps
serving, and the upgrade is reported failed (mpdctl status shows the generations)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import Callable, Protocol

from mpd.logs import log as logmod
from mpd.master.slots import Slots, WorkerProc
from mpd.wire.messages import Message, Retire

READY_TIMEOUT = 10.0  # seconds a new-code worker may take to say HELLO

log = logmod.get_logger()


class RollView(Protocol):
    """What the roll needs of the master."""
    slots: Slots
    generation: int
    state: str

    @property
    def target(self) -> int: ...

    def spawn_worker(self, slot: int, serving: bool = True) -> WorkerProc | None: ...

    def scale(self, count: int) -> str | None: ...

    def send(self, worker: WorkerProc, message: Message, fds: list[int] | None = None
             ) -> bool: ...


class Roll:
    def __init__(self, master: RollView, ended: Callable[[str | None], None]):
        self.master = master
        self.ended = ended  # told once: None when every slot is replaced, else why not
        self.started = time.monotonic()
        self.candidate: WorkerProc | None = None  # the new worker, until it is ready
        self.retiring: WorkerProc | None = None  # the old one, draining into it
        self.slot_started = 0.0
        self.replaced = 0

    def next_slot(self) -> int | None:
        """The first slot still served by an older generation."""
        for slot in self.master.slots.table:
            worker = self.master.slots.serving.get(slot)
            if worker is not None and worker.generation < self.master.generation:
                return slot
        return None

    def step(self) -> None:
        """Start on the next slot, or finish."""
        if self.candidate is not None or self.retiring is not None:
            return
        if self.master.state != "running":
            self.end(f"mpd is {self.master.state}")
            return
        slot = self.next_slot()
        if slot is None:
            self.end(None)
            return
        self.slot_started = time.monotonic()
        self.candidate = self.master.spawn_worker(slot, serving=False)
        if self.candidate is None:
            self.end(f"could not start a new worker for slot {slot}")

    def on_ready(self, worker: WorkerProc) -> None:
        """HELLO from a worker: if it is the candidate, it takes its slot."""
        if worker is not self.candidate:
            return
        slots = self.master.slots
        old = slots.serving.get(worker.slot)
        slots.serving[worker.slot] = worker
        self.candidate = None
        if old is None or old.generation >= self.master.generation:
            self.step()  # the old one died meanwhile and was respawned on new code
            return
        slots.retire(old)
        self.retiring = old
        self.master.send(old, Retire(epoch=slots.epoch, table=list(slots.table)))

    def on_exit(self, worker: WorkerProc) -> bool:
        """A worker was reaped. True when it was the candidate (the roll has failed: the
        caller must not respawn it; the old worker still serves its slot)."""
        if worker is self.candidate:
            self.candidate = None
            self.end(f"the new worker for slot {worker.slot} exited before it was ready")
            return True
        if worker is self.retiring:
            self.retiring = None
            self.replaced += 1
            log.info("upgrade.slot_replaced", worker_slot=worker.slot, old_pid=worker.pid,
                     seconds=round(time.monotonic() - self.slot_started, 3))
            self.step()
        return False

    def deadline(self) -> float | None:
        return self.slot_started + READY_TIMEOUT if self.candidate is not None else None

    def tick(self, now: float) -> None:
        if self.candidate is not None and now >= self.slot_started + READY_TIMEOUT:
            candidate = self.candidate
            with contextlib.suppress(ProcessLookupError):
                os.kill(candidate.pid, signal.SIGKILL)
            self.master.slots.retire(candidate)
            self.candidate = None
            self.end(f"the new worker for slot {candidate.slot} was not ready within "
                     f"{READY_TIMEOUT:g} s")

    def end(self, error: str | None) -> None:
        if error is None:
            log.info("upgrade.done", generation=self.master.generation, slots=self.replaced,
                     seconds=round(time.monotonic() - self.started, 3))
        self.ended(error)
