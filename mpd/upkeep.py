"""The worker's upkeep: what its loop does once a second rather than per event, so that
serving a readable client with whole frames pays for none of it. Here: the log lines
about accept pauses, one when a pause begins and one when it is over.

Upkeep is a part of the Worker class (worker.py), kept in a file of its own as handoff.py
is; it works on the worker's connections and state."""

from __future__ import annotations

from mpd import log as logmod
from mpd.config import Config
from mpd.connection import Connection

UPKEEP_EVERY = 1.0  # seconds between two rounds of upkeep

log = logmod.get_logger()


class Upkeep:
    # The worker's state it works on (worker.py sets it up).
    config: Config
    conns: dict[int, Connection]
    accepting: bool
    max_clients: int

    def init_upkeep(self) -> None:
        self.next_upkeep = 0.0
        self.pause_reason = ""  # why accepting stopped, while a pause lasts ("": none)
        self.paused_since = 0.0
        self.pauses = 0  # times accepting stopped since the pause began

    def upkeep(self, now: float) -> None:
        self.next_upkeep = now + UPKEEP_EVERY
        if self.pause_reason and self.accepting:
            self.end_pause(now)

    # --- accept pauses: two lines each, however often they repeat ------------------------

    def note_pause(self, reason: str, now: float) -> None:
        """Accepting stopped. Log it when a pause begins; while it lasts (a retry after
        EMFILE every 0.1 s, a full worker that frees and fills a place), only count."""
        self.pauses += 1
        if self.pause_reason:
            return
        self.pause_reason, self.paused_since = reason, now
        log.warning("worker.accept_paused", reason=reason, clients=len(self.conns),
                    max_clients=self.max_clients)

    def end_pause(self, now: float) -> None:
        """Accepting has gone on for a round of upkeep: the pause is over."""
        log.info("worker.accept_resumed", reason=self.pause_reason, pauses=self.pauses,
                 paused_for=round(now - self.paused_since, 3), clients=len(self.conns))
        self.pause_reason, self.pauses = "", 0
