"""How the master stops. A graceful stop (SIGTERM, SIGINT, mpdctl stop) stops listening
and lets the workers finish their clients, within workers.graceful_timeout; an immediate
one (SIGQUIT, a second stop, the graceful timeout) SIGKILLs them. With the HAProxy agent
on, a graceful stop drains first: for agent.drain_delay the agent says "drain" while mpd
serves and accepts as before, so HAProxy sends no new client before the listeners close.

    running -> draining (agent on) -> stopping -> stopped
          any of them -> halting (SIGKILL, then reap) -> stopped

The master's loop checks the deadlines each turn (check_stop_deadlines). Stopping is a part of the
Master class (master.py), kept in a file of its own as upgrade.py is; it works on the
master's state, slots and workers."""

from __future__ import annotations

import contextlib
import socket
import time
from typing import Any, Callable

from mpd.config.schema import Config
from mpd.logs import log as logmod
from mpd.master.slots import Slots, WorkerProc
from mpd.ops.agent import AgentServer
from mpd.system.systemd import Notifier
from mpd.wire.channel import Kind

KILL_WAIT = 5.0  # seconds to reap SIGKILLed workers before exiting regardless

log = logmod.get_logger()


class Stopping:
    # The master's state it works on (master.py sets it up).
    config: Config
    state: str
    listener: socket.socket
    listener_shared: bool
    slots: Slots
    notifier: Notifier
    upgrades: Any  # upgrade.Upgrades: cancel()
    agent: AgentServer | None
    drain_deadline: float
    stop_deadline: float
    kill_deadline: float
    send: Callable[[WorkerProc, Kind], bool]
    kill: Callable[[WorkerProc], None]

    def stop(self, graceful: bool = True) -> str | None:
        """Graceful: workers finish their clients; a second stop (or graceful=False) stops
        at once. With the agent on, HAProxy is told to drain first (agent.drain_delay)."""
        if not graceful or self.state in ("draining", "stopping"):
            self.halt("quit")
            return None
        self.upgrades.cancel()
        self.notifier.stopping()
        if self.agent is not None and self.config.agent_drain_delay > 0:
            self.drain()
        else:
            self.stop_serving()
        return None

    def drain(self) -> None:
        """The agent says drain, while everything else goes on as before: workers serve and
        accept (HAProxy may still send a client until its next agent check) and are
        respawned. Once agent.drain_delay is over, HAProxy sends no more: then stop."""
        delay = self.config.agent_drain_delay
        log.info("mpd.draining", drain_delay=delay)
        self.state = "draining"
        self.drain_deadline = time.monotonic() + delay

    def stop_serving(self) -> None:
        """The graceful stop proper: stop listening; workers finish their clients."""
        log.info("mpd.stopping", workers=len(self.slots.workers),
                 graceful_timeout=self.config.graceful_timeout)
        self.state = "stopping"
        self.stop_listening()
        self.stop_deadline = time.monotonic() + self.config.graceful_timeout
        for worker in self.slots.workers.values():
            self.slots.retire(worker)
            self.send(worker, Kind.STOP)

    def stop_listening(self) -> None:
        """New clients are refused from now on, in every process at once: shutdown() of a
        listening socket ends the listening of every copy (the workers' too, whatever they
        are busy with), and resets the connections queued in its backlog, which no one
        would accept any more. Not with a socket that systemd holds for socket activation:
        it goes on listening, and what queues there starts the next mpd."""
        if self.listener.fileno() < 0:
            return
        if not self.listener_shared:
            with contextlib.suppress(OSError):
                self.listener.shutdown(socket.SHUT_RD)
        self.listener.close()

    def halt(self, reason: str) -> None:
        """Stop now: SIGKILL every worker, then exit once they are reaped (bounded)."""
        if self.kill_deadline:
            return
        self.upgrades.cancel()
        log.warning("mpd.halting", reason=reason, workers=len(self.slots.workers))
        self.notifier.stopping()
        self.state = "stopping"
        self.stop_listening()
        self.drain_deadline = self.stop_deadline = 0.0
        self.kill_deadline = time.monotonic() + KILL_WAIT
        for worker in self.slots.workers.values():
            self.slots.retire(worker)
            self.kill(worker)

    def check_stop_deadlines(self, now: float) -> None:
        if self.drain_deadline and now >= self.drain_deadline:
            self.drain_deadline = 0.0
            self.stop_serving()
        if self.stop_deadline and now >= self.stop_deadline:
            self.halt("graceful_timeout")
        if self.kill_deadline and now >= self.kill_deadline:
            log.error("mpd.stop_incomplete", workers=list(self.slots.workers))
            self.state = "stopped"
