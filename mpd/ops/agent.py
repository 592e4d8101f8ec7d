"""The HAProxy agent check (`[agent] listen`): on each connection mpd writes one line that
tells HAProxy how to treat this host, then closes. Served from the master's own selector
like the control socket: non-blocking, no thread, and nothing waits on the peer (the
line is written once, best effort, and the connection closed at once), so a slow or
hostile agent client can never stall the master.

The line (HAProxy's configuration manual, "agent-check"): words that set the server's
administrative state (`ready`, `drain`), its operational state (`up`, `down`) and its
weight as a share of the configured one (`60%`). agent_line() computes it from the
master's state; HAProxy asks every `agent-inter` (2 s by default)."""

from __future__ import annotations

import contextlib
import selectors
import socket
import time
from typing import Callable

from mpd.logs import log as logmod
from mpd.system import tcp

ACCEPT_BATCH = 64  # connections served per wake-up; the rest wait for the next turn
PAUSE = 0.5  # seconds accepting stops after EMFILE/ENFILE/ENOBUFS/ENOMEM (no busy loop)
MIN_WEIGHT = 1  # percent: a full host still counts, so HAProxy never sees a zero weight
                # (a zero weight is a drain) from load alone

log = logmod.get_logger()


class AgentError(Exception):
    """The agent port cannot be opened; the message says why."""


def open_socket(host: str, port: int, backlog: int = 64) -> socket.socket:
    """Bind the agent port: open_socket(*config.host_port(config.agent_listen))."""
    try:
        return tcp.listen(host, port, backlog)
    except OSError as e:
        raise AgentError(f"cannot listen on {tcp.where(host, port)} for the agent check: "
                         f"{e.strerror}") from None


def agent_line(state: str, ready: int, clients: int, capacity: int) -> str:
    """What HAProxy should do with this host, from the master's state:

    - `state` "running" (or "starting") with a ready worker: "up ready N%", N the share of
      capacity still free (clients against capacity), at least MIN_WEIGHT;
    - `state` "draining" (a graceful stop's first agent.drain_delay seconds, while mpd
      still serves and accepts), "stopping" (the graceful stop proper) or "upgrading", or
      no ready worker: "drain" (no new clients; the ones it has stay and finish);
    - `state` "halting" (immediate stop) or "stopped": "down".

    `ready` is workers ready, `clients` those they serve, `capacity` the clients they can
    take (workers times workers.max_clients). "ready" and "up" are in every serving line
    because HAProxy keeps a drain or a down until the agent reverts it itself."""
    if state in ("halting", "stopped"):
        return "down"
    if state in ("draining", "stopping", "upgrading") or ready <= 0:
        return "drain"
    free = 1.0 - clients / capacity if capacity > 0 else 0.0
    weight = max(MIN_WEIGHT, min(100, int(free * 100 + 0.5)))
    return f"up ready {weight}%"


class AgentServer:
    """The agent port in the master's selector. `line()` gives the current answer (the
    master builds it with agent_line()); tick() is called once per loop turn."""

    def __init__(self, sock: socket.socket, selector: selectors.BaseSelector,
                 line: Callable[[], str]):
        self.sock = sock
        self.selector = selector
        self.line = line
        self.paused_until = 0.0  # accepting stopped after a shortage of fds or memory
        self.served = 0
        selector.register(sock, selectors.EVENT_READ, self.on_accept)

    def on_accept(self, _events: int) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in tcp.SHORTAGE:
                    self.pause(e)
                    return
                continue  # ECONNABORTED and kin: that client gave up
            self.answer(conn, (self.line() + "\n").encode("ascii"))

    def answer(self, conn: socket.socket, data: bytes) -> None:
        """One non-blocking send (a line fits any socket buffer), then close. Whatever the
        peer sent is read first, without waiting, so the close is a FIN, not a reset that
        could discard the line before HAProxy reads it."""
        with contextlib.closing(conn):
            conn.setblocking(False)
            with contextlib.suppress(OSError):
                conn.send(data)
                conn.recv(4096)
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_WR)
        self.served += 1

    def pause(self, error: OSError) -> None:
        log.warning("agent.accept_failed", error=error.strerror, retry_in=PAUSE)
        self.selector.unregister(self.sock)
        self.paused_until = time.monotonic() + PAUSE

    def tick(self, now: float | None = None) -> None:
        """Resume accepting once a pause is over (the master's loop turns at least once a
        second)."""
        if self.paused_until and (time.monotonic() if now is None else now) >= self.paused_until:
            self.paused_until = 0.0
            self.selector.register(self.sock, selectors.EVENT_READ, self.on_accept)

    def deadline(self) -> float | None:
        return self.paused_until or None

    def in_child(self) -> None:
        self.sock.close()  # the master's selector is closed already

    def close(self) -> None:
        if not self.paused_until:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(self.sock)
        self.sock.close()
