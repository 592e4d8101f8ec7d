"""What /proc says about a process: state, parent, CPU seconds, start time, memory, fds,
children. Linux only, standard library only, and importing nothing else from mpd, so that
the benchmark driver (which runs on the bare standard library) and the tests share it, and
metrics can sample the master and its workers without a dependency.

Every function takes a pid; one that has gone raises ProcessLookupError unless it says
otherwise. A zombie still has a /proc entry: `alive` is False for it, `stat` still reads.
"""

from __future__ import annotations

import contextlib
import os
from typing import NamedTuple

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class Stat(NamedTuple):
    """The fields of /proc/PID/stat that mpd uses, from one read."""

    pid: int
    state: str  # R, S, D, Z, T, ...
    ppid: int
    user_seconds: float  # utime: its own, not its reaped children's
    system_seconds: float  # stime: in the kernel on its behalf (most of a socket's cost)
    start_time: float  # seconds after boot (with a pid, tells a reused pid apart)
    rss: int  # bytes resident (RSS, as the kernel counts it; cheap, unlike `memory`)

    @property
    def cpu_seconds(self) -> float:
        return self.user_seconds + self.system_seconds


class Memory(NamedTuple):
    """Bytes, from smaps_rollup (or smaps on kernels before 4.14)."""

    rss: int
    pss: int  # shared pages split between the processes that map them
    uss: int  # Private_Clean + Private_Dirty: what the process alone holds


def _read(path: str, pid: int) -> str:
    try:
        with open(path) as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessLookupError(pid) from None


def stat(pid: int) -> Stat:
    text = _read(f"/proc/{pid}/stat", pid)
    # The command name sits in parentheses and may hold spaces or ")": split at the last.
    fields = text.rsplit(")", 1)[1].split()
    return Stat(pid=pid, state=fields[0], ppid=int(fields[1]),
                user_seconds=int(fields[11]) / CLK_TCK,  # field 14
                system_seconds=int(fields[12]) / CLK_TCK,  # field 15
                start_time=int(fields[19]) / CLK_TCK,  # field 22
                rss=int(fields[21]) * PAGE_SIZE)  # field 24


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
        text = _read(f"/proc/{pid}/smaps_rollup", pid)
    except ProcessLookupError:
        if not os.path.exists(f"/proc/{pid}"):
            raise
        text = _read(f"/proc/{pid}/smaps", pid)  # no smaps_rollup: sum the mappings
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
