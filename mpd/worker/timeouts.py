"""Clients' timeouts, found by sweeps rather than a timer per connection, so that serving
a client pays for none of them (a completed frame costs one attribute store: the
connection's `seen` stamp, from the loop's clock).

- first_frame_timeout: a new client waits in the client table's `newcomers` (in order of
  arrival) until it completes its first frame; each round looks at them only, so the
  cost is a dict entry per accepted client, however many clients are served.
- idle_timeout: every client, once every tenth of idle_timeout (at least a second): one
  that neither completed a frame nor took any output for that long is closed. A client
  that only receives (a relay's player) is active while bytes flow to it.

So a client is closed up to a second (first frame) or a tenth of idle_timeout (idle)
after its time is up."""

from __future__ import annotations

from mpd.apps.interface import IDLE
from mpd.config.schema import Config
from mpd.logs import log as logmod
from mpd.worker.clients import Clients

ROUND = 1.0  # seconds between two rounds of upkeep

log = logmod.get_logger()


class Timeouts:
    def __init__(self, config: Config, clients: Clients, stats: dict[str, int]):
        self.config = config
        self.clients = clients
        self.stats = stats
        self.next_idle_sweep = 0.0

    def sweep(self, now: float) -> None:
        first_frame = self.expire_newcomers(now)
        idle = self.expire_idle(now) if now >= self.next_idle_sweep else 0
        if first_frame or idle:
            log.info("client.timed_out", first_frame=first_frame, idle=idle,
                     clients=len(self.clients.conns))

    def expire_newcomers(self, now: float) -> int:
        """Close the clients that had first_frame_timeout to complete a frame and did not;
        forget those that did (or left)."""
        newcomers = self.clients.newcomers
        limit = self.config.first_frame_timeout
        if not limit:
            newcomers.clear()
            return 0
        conns = self.clients.conns
        closed = 0
        for fd, conn in list(newcomers.items()):
            if conn.seen or conns.get(fd) is not conn:
                del newcomers[fd]
            elif now - conn.born >= limit:
                self.clients.close(conn, IDLE, detail="first_frame_timeout")
                closed += 1
            else:
                break  # in order of arrival: the rest came later
        self.stats["first_frame_timeouts"] += closed
        return closed

    def expire_idle(self, now: float) -> int:
        limit = self.config.idle_timeout
        self.next_idle_sweep = now + max(ROUND, limit / 10)
        if not limit:
            return 0
        stale = [conn for conn in self.clients.conns.values()
                 if now - (conn.seen or conn.born) >= limit]
        for conn in stale:
            self.clients.close(conn, IDLE, detail="idle_timeout")
        self.stats["idle_timeouts"] += len(stale)
        return len(stale)
