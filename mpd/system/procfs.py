"""What /proc/PID/stat says about a process: state, parent, CPU seconds, start time, RSS,
from one read; the master samples its workers with it for `status --usage` and the
metrics. Linux only, standard library only, and importing nothing else from mpd, so that
the benchmarks' and tests' /proc kit (scripts/bench/procfs.py) builds on it.

A pid that has gone raises ProcessLookupError; a zombie still has a /proc entry and reads.
"""

from __future__ import annotations

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
    rss: int  # bytes resident (RSS, as the kernel counts it; cheap, unlike smaps)

    @property
    def cpu_seconds(self) -> float:
        return self.user_seconds + self.system_seconds


def read(path: str, pid: int) -> str:
    try:
        with open(path) as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessLookupError(pid) from None


def stat(pid: int) -> Stat:
    text = read(f"/proc/{pid}/stat", pid)
    # The command name sits in parentheses and may hold spaces or ")": split at the last.
    fields = text.rsplit(")", 1)[1].split()
    return Stat(pid=pid, state=fields[0], ppid=int(fields[1]),
                user_seconds=int(fields[11]) / CLK_TCK,  # field 14
                system_seconds=int(fields[12]) / CLK_TCK,  # field 15
                start_time=int(fields[19]) / CLK_TCK,  # field 22
                rss=int(fields[21]) * PAGE_SIZE)  # field 24
