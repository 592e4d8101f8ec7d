"""What the master's loop asks of each subsystem it owns besides the workers (the stop,
held hand-offs, upgrades, systemd's notifier, the mpd.stats line, the control socket, the
metrics endpoint, the agent port): one small interface, so that the loop iterates one
list instead of naming each. A service registers its own fds in the master's selector
when it is made, each with its reaction (the loop calls `key.data(events)`)."""

from __future__ import annotations

import time
from typing import Protocol

from mpd.master.broker import Broker
from mpd.wire.channel import close_fds


class Service(Protocol):
    def deadline(self) -> float | None:
        """When tick() next has work that the clock alone brings (None: nothing timed)."""

    def tick(self, now: float) -> None:
        """The timed duties, once a loop turn."""

    def close(self) -> None:
        """The master exits: close what is open, undo what is ours to undo."""

    def in_child(self) -> None:
        """In a forked worker, first thing: close the fds that are the master's (the
        master's selector is closed already: unregister nothing)."""


class HeldClients:
    """The broker's held hand-offs as a service: retried each turn, dropped at exit, and
    not a forked worker's to deliver."""

    def __init__(self, broker: Broker):
        self.broker = broker

    def deadline(self) -> float | None:
        return self.broker.next_deadline(time.monotonic())

    def tick(self, now: float) -> None:
        self.broker.retry_held()

    def close(self) -> None:
        self.broker.drop_held("stopping")

    def in_child(self) -> None:
        close_fds(self.broker.held_fds())
