"""The master's side of moving key groups (mpd/master/moves.py with directory.py), on its
own: which groups a change of routes moves, a few at a time, and how a move ends when a
worker at either end dies. The workers are the master's records of them; what the master
sends is recorded instead of sent (the real processes are tests/test_moves.py's)."""

from __future__ import annotations

import os
from typing import Any

import pytest

from mpd.logs import log as logmod
from mpd.master.directory import Directory
from mpd.master.moves import WINDOW, Moves
from mpd.master.slots import Slots, WorkerProc
from mpd.wire import routing
from mpd.wire.messages import Kind, MoveChunk, Moved


@pytest.fixture(autouse=True)
def quiet_log() -> None:
    logmod.configure(target="file", path=os.devnull)


class Master:
    """Slots, a directory and the moves part, with the messages it sends recorded."""

    def __init__(self, workers: int):
        self.slots = Slots(workers)
        self.directory = Directory()
        self.sent: list[tuple[int, Any]] = []  # (pid, message)
        self.moves = Moves(self.slots, self.directory, self.send, self.moves_plan)
        self.pid = 100
        for slot in range(workers):
            self.spawn(slot)

    def send(self, worker: WorkerProc, message: Any, fds: list[int] | None = None) -> bool:
        if self.slots.workers.get(worker.pid) is not worker:
            return False  # its channel is gone
        self.sent.append((worker.pid, message))
        return True

    def moves_plan(self) -> None:
        self.moves.plan()

    def spawn(self, slot: int) -> WorkerProc:
        self.pid += 1
        worker = WorkerProc(slot=slot, pid=self.pid, channel=None)  # type: ignore[arg-type]
        worker.state = "ready"
        self.slots.add(worker)
        return worker

    def kill(self, worker: WorkerProc) -> None:
        self.slots.remove(worker.pid)
        self.directory.worker_gone(worker, self.moves.worker_gone(worker))

    def kinds(self, pid: int | None = None) -> list[str]:
        return [Kind(m.kind).name for p, m in self.sent if pid is None or p == pid]


def chunk(move: int) -> MoveChunk:
    """A whole transfer in one chunk, as it comes from the old owner (no fds here)."""
    message = MoveChunk(move, 0, True, 1, b"x")
    message.fds = []
    return message


def keys_of(slot: int, slots: tuple[int, ...], count: int) -> list[bytes]:
    names = (b"room-%d" % n for n in range(10_000))
    return [k for k in names if routing.owner(routing.key_hash(k), slots) == slot][:count]


def place(master: Master, key: bytes, slot: int) -> None:
    master.directory.place(key, routing.key_hash(key), master.slots.serving[slot])


def test_a_scale_moves_the_groups_whose_owner_changed_a_window_at_a_time():
    master = Master(2)
    moving = keys_of(2, (0, 1, 2), WINDOW + 3)  # owned by slot 2 once there are three
    staying = keys_of(0, (0, 1, 2), 5)
    for key in moving + staying:
        place(master, key, routing.owner(routing.key_hash(key), (0, 1)))
    master.slots.resize(3)
    new = master.spawn(2)
    master.moves.plan()
    assert master.kinds().count("MOVE_OUT") == WINDOW  # the rest wait their turn
    assert master.moves.status()["queued"] == 3
    for pid, order in list(master.sent):
        worker = master.slots.workers[pid]
        master.moves.on_chunk(worker, chunk(order.move))
        master.moves.on_moved(new, Moved(move=order.move, members=2, size=1, pause_us=1500))
    assert master.kinds().count("MOVE_OUT") == WINDOW + 3  # each end let another start
    assert master.kinds(new.pid).count("MOVE_CHUNK") == WINDOW
    assert master.kinds().count("MOVE_DONE") == WINDOW
    assert all(master.directory.get(k).worker is new for k in moving[:WINDOW])
    assert all(master.directory.get(k).worker.slot == 0 for k in staying)
    status = master.moves.status()
    assert status["done"] == WINDOW and sum(status["pause"]["buckets"]) == WINDOW


def test_the_new_owner_dying_calls_the_move_off_and_the_group_stays():
    master = Master(2)
    (key,) = keys_of(0, (0, 1), 1)
    place(master, key, 0)
    old, new = master.slots.serving[0], master.slots.serving[1]
    assert master.moves.move_key(key, 1) is None
    (order,) = [m for _, m in master.sent]
    master.moves.on_chunk(old, chunk(order.move))
    master.kill(new)
    assert master.kinds(old.pid) == ["MOVE_OUT", "MOVE_ABORT"]  # it serves on
    assert master.directory.get(key).worker is old
    assert master.moves.where(key)["failed"] == "the new owner died"


def test_the_old_owner_dying_before_its_transfer_is_out_takes_the_group():
    master = Master(2)
    (key,) = keys_of(0, (0, 1), 1)
    place(master, key, 0)
    old, new = master.slots.serving[0], master.slots.serving[1]
    master.moves.move_key(key, 1)
    master.kill(old)
    assert master.kinds(new.pid) == ["MOVE_ABORT"]  # forget any piece of it
    assert master.directory.get(key) is None and not master.moves.moving(key)


def test_the_old_owner_dying_after_its_transfer_leaves_the_move_to_finish_or_fail():
    """All of it relayed: the new owner may restore the group (it holds the sockets). If
    it does not, the group is gone with both ends: its placement is forgotten, so that the
    key's next client starts afresh instead of waiting for a dead worker."""
    for finished in (True, False):
        master = Master(2)
        (key,) = keys_of(0, (0, 1), 1)
        place(master, key, 0)
        old, new = master.slots.serving[0], master.slots.serving[1]
        master.moves.move_key(key, 1)
        (order,) = [m for _, m in master.sent]
        master.moves.on_chunk(old, chunk(order.move))
        master.kill(old)
        assert master.moves.moving(key) and master.directory.get(key).worker is old
        if finished:
            master.moves.on_moved(new, Moved(move=order.move, members=1, size=1, pause_us=9))
            assert master.directory.get(key).worker is new
        else:
            master.kill(new)
            assert master.directory.get(key) is None
        assert not master.moves.moving(key)
