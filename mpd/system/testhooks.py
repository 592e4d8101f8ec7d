"""Fault injection for the test suite, switched on only by environment variables (most
name a trigger file). Unset (as in production), each check is one dict lookup.

MPD_TEST_CRASH_FILE  while this file exists, a starting worker exits at once (code 3),
                     as a worker with a broken build would: a crash loop.
MPD_TEST_HANG_FILE   when this file appears, the next worker to notice it deletes it
                     and stops its loop for good, as a deadlocked worker would.
MPD_TEST_HOLD_FILE   while this file exists, a new worker waits before it starts (up to
                     HOLD_MAX seconds), as a slow one would: an upgrade's roll stays on
                     its slot meanwhile.
MPD_TEST_MOVE_HOLD_FILE  while this file exists, a worker that reaches the step of a key
                     group's move that the file names stops there (up to HOLD_MAX
                     seconds), as a worker that stalls or dies at that step would:
                     "export" (the old owner: the group frozen and exported, nothing sent
                     yet) or "restore" (the new owner: every chunk in, nothing restored
                     nor acknowledged). It first writes "STEP PID" to FILE.held, so that
                     a test knows who holds (its log lines wait while it holds).
MPD_TEST_ACCEPT_SLOTS  comma-separated slot numbers: only the workers of these slots
                     accept clients (the others get theirs through hand-offs), so that
                     a benchmark can make every member of a room join through another
                     worker. Unset: every worker accepts.
MPD_TEST_FAULT       comma-separated places where a bug is simulated (an exception
                     raised): master.stats (each STATS the master handles),
                     master.reload (each reload, by SIGHUP or mpdctl)."""

from __future__ import annotations

import os
import time

CRASH_FILE = os.environ.get("MPD_TEST_CRASH_FILE")
HANG_FILE = os.environ.get("MPD_TEST_HANG_FILE")
HOLD_FILE = os.environ.get("MPD_TEST_HOLD_FILE")
MOVE_HOLD_FILE = os.environ.get("MPD_TEST_MOVE_HOLD_FILE")
HOLD_MAX = 60.0  # seconds: a test that forgets the file does not leave a worker for good
ACCEPT_SLOTS = frozenset(int(s) for s in os.environ.get("MPD_TEST_ACCEPT_SLOTS", "").split(",")
                         if s.strip().isdigit())
FAULTS = frozenset(filter(None, os.environ.get("MPD_TEST_FAULT", "").split(",")))


class SimulatedBug(Exception):
    """The simulated bug of MPD_TEST_FAULT."""


def fault(place: str) -> None:
    if place in FAULTS:
        raise SimulatedBug(f"simulated bug at {place} (MPD_TEST_FAULT)")


def accepts(slot: int | None) -> bool:
    """Whether the worker of `slot` accepts clients (MPD_TEST_ACCEPT_SLOTS; single-process
    mode, slot None, always does)."""
    return not ACCEPT_SLOTS or slot is None or slot in ACCEPT_SLOTS


def crash_requested() -> bool:
    return bool(CRASH_FILE) and os.path.exists(CRASH_FILE)


def hang_requested() -> bool:
    if not HANG_FILE:
        return False
    try:
        os.unlink(HANG_FILE)  # one worker hangs per trigger
    except FileNotFoundError:
        return False
    return True


def hang() -> None:
    while True:
        time.sleep(3600)


def hold() -> None:
    """Wait while MPD_TEST_HOLD_FILE exists (bounded): a worker that is slow to start."""
    deadline = time.monotonic() + HOLD_MAX
    while HOLD_FILE and os.path.exists(HOLD_FILE) and time.monotonic() < deadline:
        time.sleep(0.01)


def move_hold(step: str) -> None:
    """MPD_TEST_MOVE_HOLD_FILE: stop at this step of a move while the file names it."""
    if not MOVE_HOLD_FILE:
        return
    try:
        with open(MOVE_HOLD_FILE) as f:
            if f.read().strip() != step:
                return
    except FileNotFoundError:
        return
    with open(MOVE_HOLD_FILE + ".held", "w") as f:
        f.write(f"{step} {os.getpid()}\n")
    deadline = time.monotonic() + HOLD_MAX
    while os.path.exists(MOVE_HOLD_FILE) and time.monotonic() < deadline:
        time.sleep(0.01)
