"""How the master stops. A graceful stop (SIGTERM, SIGINT, mpdctl stop) stops listening
and lets the workers finish their clients, within workers.graceful_timeout; an immediate
one (SIGQUIT, a second stop, the graceful timeout) SIGKILLs them. With the HAProxy agent
on, a graceful stop warns HAProxy first: for agent.drain_delay the agent says "drain"
(HAProxy's word: no new clients) while mpd serves and accepts as before, so HAProxy sends
no new client before the listeners close.

    running -> draining (agent on) -> stopping -> stopped
          any of them -> halting (SIGKILL, then reap) -> stopped

Shutdown is a part the master owns (master.shutdown): it keeps the stop's deadlines, moves the
master's state along them, and is one of the master's services (its deadline and tick)."""

from __future__ import annotations

import contextlib
import socket
import time
from typing import Any, Protocol

from mpd.config.schema import Config
from mpd.logs import log as logmod
from mpd.master.slots import Slots, WorkerProc
from mpd.system.systemd import Notifier
from mpd.wire.messages import Message, Stop

KILL_WAIT = 5.0  # seconds to reap SIGKILLed workers before exiting regardless

log = logmod.get_logger()


class StopView(Protocol):
    """What the stop needs of the master."""
    config: Config
    state: str
    slots: Slots
    notifier: Notifier
    upgrades: Any  # upgrade.Upgrades: cancel()

    def send(self, worker: WorkerProc, message: Message, fds: list[int] | None = None
             ) -> bool: ...

    def kill(self, worker: WorkerProc) -> None: ...


class Shutdown:
    def __init__(self, master: StopView, listener: socket.socket, listener_shared: bool,
                 warns_haproxy: bool):
        """`listener_shared`: systemd holds the listening socket too (socket activation),
        and it must go on listening after we stop. `warns_haproxy`: the agent is on, so a graceful
        stop tells HAProxy first (agent.drain_delay)."""
        self.master = master
        self.listener = listener
        self.listener_shared = listener_shared
        self.warns_haproxy = warns_haproxy
        self.warn_deadline = 0.0  # "draining": the graceful stop proper begins at this time
        self.stop_deadline = 0.0  # stopping: SIGKILL what is left at this time
        self.kill_deadline = 0.0  # halting: exit at this time, reaped or not

    @property
    def halting(self) -> bool:
        return bool(self.kill_deadline)

    def stop(self, graceful: bool = True) -> str | None:
        """Graceful: workers finish their clients; a second stop (or graceful=False) stops
        at once. With the agent on, HAProxy is warned first (agent.drain_delay)."""
        if not graceful or self.master.state in ("draining", "stopping"):
            self.halt("quit")
            return None
        self.master.upgrades.cancel()
        self.master.notifier.stopping()
        if self.warns_haproxy and self.master.config.agent_drain_delay > 0:
            self.warn_haproxy()
        else:
            self.stop_serving()
        return None

    def warn_haproxy(self) -> None:
        """The agent says "drain" (state "draining"), while everything else goes on as
        before: workers serve and accept (HAProxy may still send a client until its next
        agent check) and are respawned. Once agent.drain_delay is over, HAProxy sends no
        more: then stop."""
        delay = self.master.config.agent_drain_delay
        log.info("mpd.draining", drain_delay=delay)
        self.master.state = "draining"
        self.warn_deadline = time.monotonic() + delay

    def stop_serving(self) -> None:
        """The graceful stop proper: stop listening; workers finish their clients."""
        master = self.master
        log.info("mpd.stopping", workers=len(master.slots.workers),
                 graceful_timeout=master.config.graceful_timeout)
        master.state = "stopping"
        self.stop_listening()
        self.stop_deadline = time.monotonic() + master.config.graceful_timeout
        for worker in master.slots.workers.values():
            master.slots.retire(worker)
            master.send(worker, Stop())

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
        master = self.master
        master.upgrades.cancel()
        log.warning("mpd.halting", reason=reason, workers=len(master.slots.workers))
        master.notifier.stopping()
        master.state = "stopping"
        self.stop_listening()
        self.warn_deadline = self.stop_deadline = 0.0
        self.kill_deadline = time.monotonic() + KILL_WAIT
        for worker in master.slots.workers.values():
            master.slots.retire(worker)
            master.kill(worker)

    # --- a service of the master's loop ----------------------------------------------------

    def deadline(self) -> float | None:
        return min((d for d in (self.warn_deadline, self.stop_deadline, self.kill_deadline)
                    if d), default=None)

    def tick(self, now: float) -> None:
        if self.warn_deadline and now >= self.warn_deadline:
            self.warn_deadline = 0.0
            self.stop_serving()
        if self.stop_deadline and now >= self.stop_deadline:
            self.halt("graceful_timeout")
        if self.kill_deadline and now >= self.kill_deadline:
            log.error("mpd.stop_incomplete", workers=list(self.master.slots.workers))
            self.master.state = "stopped"

    def close(self) -> None:
        pass

    def in_child(self) -> None:
        pass  # the listening socket is the worker's too
