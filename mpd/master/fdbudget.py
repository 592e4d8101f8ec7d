"""The master's fd budget: how many clients' fds it may hold at once (hand-offs the broker
holds, ADOPTs queued on a channel whose worker does not read), so that it never runs out
of fds itself and `mpdctl` always gets in (issue 20).

The budget is its fd limit (the soft RLIMIT_NOFILE, read again at each count), less the
fds it holds besides clients (counted in /proc/self/fd at most once a second), less
RESERVE: fds kept free for what it must still open (control connections, a respawned
worker's channel, an upgrade's pre-flight pipe, metrics and agent peers). One slot's
channel may hold at most half of it, so a stopped worker cannot take it all. Channels are
read only as far as there are free fds for the clients their messages may carry, as a
worker reads its own (worker/acceptor.py, receive_room)."""

from __future__ import annotations

import os
from typing import Callable

from mpd.config.schema import fd_soft_limit

RESERVE = 16  # fds the master keeps free for itself (control connections first)
RECOUNT = 1.0  # seconds between two counts of the master's own fds
RECEIVE_BATCH = 64  # channel messages read at a time, when free fds allow


class FdBudget:
    def __init__(self) -> None:
        self.limit = fd_soft_limit()
        self.own = 0  # fds held besides clients, at the last count
        self.next_count = 0.0  # when to count them again
        self.total = 0  # clients' fds the master may hold at once
        self.slot_share = 1  # of those, what one slot's channel may hold
        self.set_limit(self.limit)

    def set_limit(self, limit: int) -> None:
        self.limit = limit
        self.total = max(0, limit - self.own - RESERVE)
        self.slot_share = max(1, self.total // 2)  # read per hand-off: an attribute

    def recount(self, now: float, holding: Callable[[], int]) -> None:
        """Count the fds held besides clients' (at most once a second); `holding` says how
        many clients' fds are held now."""
        if now < self.next_count:
            return
        self.next_count = now + RECOUNT
        opened = open_fds()
        if opened is not None:
            self.own = max(0, opened - holding())
        self.set_limit(fd_soft_limit())

    def room(self, holding: int) -> int:
        """How many more clients it may hold, holding `holding` now."""
        return self.total - holding

    def receive_room(self, holding: int) -> int:
        """How many channel messages to read now: each may carry a client's fd, and the
        fds of a batch are all open at once. None: the channels wait (Channels.pause)."""
        free = self.limit - self.own - holding - RESERVE  # the reserve stays free
        if free < 2 * RECEIVE_BATCH:  # near the limit: count what is open, exactly
            opened = open_fds()
            free = min(free, self.limit - opened - RESERVE) if opened is not None else 0
        return max(0, min(RECEIVE_BATCH, free))


def open_fds() -> int | None:
    """How many fds this process has open, or None when it has none left to look."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the listing's own
    except OSError:  # EMFILE: no fd to open the listing with
        return None
