"""The worker's upkeep: what its loop does once a second rather than per event, so that
serving a readable client with whole frames pays for none of it (a request costs one
attribute store: the connection's `seen` stamp, from the loop's clock). Here: clients'
timeouts, and the log lines about accept pauses, one when a pause begins and one when it
is over.

The fd limit is followed here too: max_clients never exceeds what it leaves for clients,
and the channel is read only as far as there are free fds for the clients its messages
may carry (a message whose fd finds no free slot loses its client: fd.lost).

Timeouts are found by sweeps, not per-connection timers. A new client waits in
`newcomers` (in order of arrival) until it sends its first whole frame; each round looks
at them only, so the first-frame timeout costs a dict entry per accepted client, however
many clients are served. The idle timeout looks at every client, once every tenth of
idle_timeout (at least a second). So a client is closed up to a second (first frame) or a
tenth of idle_timeout (idle) after its time is up.

Upkeep is a part of the Worker class (worker.py), kept in a file of its own as handoff.py
is; it works on the worker's connections and state."""

from __future__ import annotations

import os
from typing import Callable

from mpd.config.schema import Config, fd_soft_limit
from mpd.logs import log as logmod
from mpd.worker.connection import Connection
from mpd.worker.link import Link

UPKEEP_EVERY = 1.0  # seconds between two rounds of upkeep
RECEIVE_BATCH = 64  # channel messages read at a time, when free fds allow

log = logmod.get_logger()


class UpkeepState:
    """Upkeep's own state, in one attribute of the worker: CPython shares the keys of an
    object's first 30 attributes, and past that every `self.x` of the hot path costs more
    (a worker with 35 attributes served a ping 3% slower). tests/test_structure.py counts."""
    __slots__ = ("next_upkeep", "next_idle_sweep", "fd_limit", "fds_base", "pause_reason",
                 "paused_since", "last_pause", "pauses")

    def __init__(self) -> None:
        self.next_upkeep = 0.0
        self.next_idle_sweep = 0.0
        self.fd_limit = fd_soft_limit()
        self.fds_base = 0  # fds held besides clients: counted at boot
        self.pause_reason = ""  # why accepting stopped, while a pause lasts ("": none)
        self.paused_since = 0.0
        self.last_pause = 0.0  # when accepting last stopped (a pause's retries included)
        self.pauses = 0  # times accepting stopped since the pause began


class Upkeep:
    # The worker's state it works on (worker.py sets it up).
    config: Config
    conns: dict[int, Connection]
    accepting: bool
    max_clients: int
    debug: bool
    stats: dict[str, int]
    link: Link
    close: Callable[[Connection, str], None]
    resume_accepting: Callable[[], None]
    pause_accepting: Callable[..., None]

    def init_upkeep(self) -> None:
        self.newcomers: dict[int, Connection] = {}  # by fd: no whole frame from them yet
        self.up = UpkeepState()

    def upkeep(self, now: float) -> None:
        self.up.next_upkeep = now + UPKEEP_EVERY
        self.refresh_limits()
        self.resume_accepting()  # a place that a hand-off freed (handoff.py)
        # Over only when accepting went on for a whole round: a retry after EMFILE turns
        # accepting on in this very turn, before any accept() could fail again.
        if self.up.pause_reason and self.accepting and now - self.up.last_pause >= UPKEEP_EVERY:
            self.end_pause(now)
        first_frame = self.expire_newcomers(now)
        idle = 0
        if now >= self.up.next_idle_sweep:
            idle = self.expire_idle(now)
        if first_frame or idle:
            log.info("client.timed_out", first_frame=first_frame, idle=idle,
                     clients=len(self.conns))

    # --- timeouts ------------------------------------------------------------------------

    def expire_newcomers(self, now: float) -> int:
        """Close the clients that had first_frame_timeout to send a whole frame and did
        not; forget those that did (or left). Returns how many were closed."""
        limit = self.config.first_frame_timeout
        if not limit:
            self.newcomers.clear()
            return 0
        closed = 0
        for fd, conn in list(self.newcomers.items()):
            if conn.seen or self.conns.get(fd) is not conn:
                del self.newcomers[fd]
            elif now - conn.born >= limit:
                self.close(conn, "first_frame_timeout")  # close() forgets it
                closed += 1
            else:
                break  # in order of arrival: the rest came later
        self.stats["first_frame_timeouts"] += closed
        return closed

    def expire_idle(self, now: float) -> int:
        """Close the clients that neither sent a whole frame nor took a reply for
        idle_timeout (a half-closed client that stopped reading among them)."""
        limit = self.config.idle_timeout
        self.up.next_idle_sweep = now + max(UPKEEP_EVERY, limit / 10)
        if not limit:
            return 0
        stale = [conn for conn in self.conns.values()
                 if now - (conn.seen or conn.born) >= limit]
        for conn in stale:
            self.close(conn, "idle_timeout")
        self.stats["idle_timeouts"] += len(stale)
        return len(stale)

    # --- the fd limit ----------------------------------------------------------------------

    def init_limits(self) -> None:
        """At boot: the fds the worker holds besides its clients, and its limits."""
        self.up.fds_base = len(os.listdir("/proc/self/fd")) - 1  # the listing's own fd
        self.set_limits(fd_soft_limit())

    def set_limits(self, fd_limit: int) -> None:
        """max_clients under this fd limit; accept or not to match."""
        self.up.fd_limit = fd_limit
        self.max_clients = self.config.clients_per_worker(fd_limit)
        if len(self.conns) < self.max_clients:
            self.resume_accepting()
        elif self.accepting:
            self.pause_accepting("max_clients")

    def refresh_limits(self) -> None:
        """Follow the fd limit when it changes under us (prlimit), within a second."""
        fd_limit = fd_soft_limit()
        if fd_limit != self.up.fd_limit:
            self.set_limits(fd_limit)
            log.warning("worker.fd_limit", fd_limit=fd_limit, max_clients=self.max_clients,
                        clients=len(self.conns))

    def receive_room(self) -> int:
        """How many channel messages to read now: each may carry a client's fd. At least
        one, or the channel (its STOP too) would stall."""
        free = self.up.fd_limit - self.up.fds_base - len(self.conns) - self.link.queued
        return max(1, min(RECEIVE_BATCH, free - 1))

    # --- accept pauses: two lines each, however often they repeat ------------------------

    def note_pause(self, reason: str, now: float) -> None:
        """Accepting stopped. Log it when a pause begins; while it lasts (a retry after
        EMFILE every 0.1 s, a full worker that frees and fills a place), only count."""
        self.up.pauses += 1
        self.up.last_pause = now
        if self.up.pause_reason:
            return
        self.up.pause_reason, self.up.paused_since = reason, now
        log.warning("worker.accept_paused", reason=reason, clients=len(self.conns),
                    max_clients=self.max_clients)

    def end_pause(self, now: float) -> None:
        """Accepting has gone on for a round of upkeep: the pause is over."""
        log.info("worker.accept_resumed", reason=self.up.pause_reason, pauses=self.up.pauses,
                 paused_for=round(now - self.up.paused_since, 3), clients=len(self.conns))
        self.up.pause_reason, self.up.pauses = "", 0
