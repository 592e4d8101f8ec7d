"""/proc helpers of the benchmark driver and the tests: whether a process is alive, its
CPU seconds, memory, fds, children and descendants, and zombies, on top of mpd's own
/proc/PID/stat reader (mpd/system/procfs.py). Linux only, standard library only: the
driver runs on the bare standard library (python -S), and the tests put this folder on
their path (tests/conftest.py).

Every function takes a pid; one that has gone raises ProcessLookupError unless it says
otherwise. A zombie still has a /proc entry: `alive` is False for it, `stat` still reads.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent.parent
if str(ROOT) not in sys.path:
    # mpd from this checkout, ahead of any installed mpd (an editable install of another
    # worktree, say); mpd.system.procfs imports nothing beyond the standard library.
    sys.path.insert(1, str(ROOT))

from mpd.system.procfs import Stat, read, stat  # noqa: E402, F401 - Stat, stat: the kit's too


class Memory(NamedTuple):
    """Bytes, from smaps_rollup (or smaps on kernels before 4.14)."""

    rss: int
    pss: int  # shared pages split between the processes that map them
    uss: int  # Private_Clean + Private_Dirty: what the process alone holds


def alive(pid: int) -> bool:
    """True while pid exists and is not a zombie."""
    try:
        return stat(pid).state != "Z"
    except ProcessLookupError:
        return False


def cpu_seconds(pid: int) -> float:
    """utime + stime of pid."""
    return stat(pid).cpu_seconds


def total_cpu_seconds(pids: list[int]) -> float:
    """utime + stime summed over pids, leaving out those that have gone."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            total += stat(pid).cpu_seconds
    return total


def start_time(pid: int) -> float:
    """When pid started, in seconds after boot."""
    return stat(pid).start_time


def memory(pid: int) -> Memory:
    """RSS, PSS and USS of pid, in bytes. smaps_rollup walks the page tables: costlier than
    `stat(pid).rss`, so sample it, do not poll it."""
    try:
        text = read(f"/proc/{pid}/smaps_rollup", pid)
    except ProcessLookupError:
        if not os.path.exists(f"/proc/{pid}"):
            raise
        text = read(f"/proc/{pid}/smaps", pid)  # no smaps_rollup: sum the mappings
    values = {"Rss": 0, "Pss": 0, "Private_Clean": 0, "Private_Dirty": 0}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == "kB":
            name = parts[0].rstrip(":")
            if name in values:
                values[name] += int(parts[1]) * 1024
    return Memory(rss=values["Rss"], pss=values["Pss"],
                  uss=values["Private_Clean"] + values["Private_Dirty"])


def fd_count(pid: int) -> int:
    """Open file descriptors of pid."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessLookupError(pid) from None


def children(pid: int) -> list[int]:
    """Direct children of pid (zombies included): /proc/PID/task/*/children, or a scan of
    every process's parent where the kernel lacks that file (CONFIG_PROC_CHILDREN)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessLookupError(pid) from None
    out: list[int] = []
    found = False
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(p) for p in f.read().split()]
            found = True
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out if found else [s.pid for s in _all_stats() if s.ppid == pid]


def tree(pid: int) -> list[int]:
    """pid and its descendants, parents before their children; [] if pid has gone."""
    pids: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(ProcessLookupError):
            todo += children(p)
            pids.append(p)
    return pids


def zombies_of(pid: int) -> list[int]:
    """Children of pid that have exited and wait to be reaped."""
    return [s.pid for s in _all_stats() if s.ppid == pid and s.state == "Z"]


def _all_stats() -> list[Stat]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(ProcessLookupError):
                out.append(stat(int(entry)))
    return out
