"""The HAProxy agent check (`[agent] listen`): on each connection mpd writes one line that
tells HAProxy how to treat this host, then closes. Served from the master's own selector
on the server base (server.py), like the control socket: non-blocking, no thread, and
nothing waits on the peer (the line fits any socket buffer; the linger after it is
bounded), so a slow or hostile agent client can never stall the master.

The line (HAProxy's configuration manual, "agent-check"): words that set the server's
administrative state (`ready`, `drain`), its operational state (`up`, `down`) and its
weight as a share of the configured one (`60%`). agent_line() computes it from the
master's state; HAProxy asks every `agent-inter` (2 s by default)."""

from __future__ import annotations

import selectors
import socket
from typing import Callable

from mpd.ops.server import Limits, Peer, PortError, Server, open_port

LIMITS = Limits(peers=1, lingering=256, linger=1.0)  # a peer is answered as it is accepted
MIN_WEIGHT = 1  # percent: a full host still counts, so HAProxy never sees a zero weight
                # (a zero weight is a drain) from load alone



class AgentError(PortError):
    """The agent port cannot be opened; the message says why."""


def open_socket(host: str, port: int, backlog: int = 64) -> socket.socket:
    """Bind the agent port: open_socket(*config.host_port(config.agent_listen))."""
    return open_port(host, port, "for the agent check", AgentError, backlog)


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


class AgentServer(Server):
    """The agent port in the master's selector. `line()` gives the current answer (the
    master builds it with agent_line())."""
    name = "agent"

    def __init__(self, sock: socket.socket, selector: selectors.BaseSelector,
                 line: Callable[[], str]):
        super().__init__(sock, selector, LIMITS)
        self.line = line
        self.served = 0

    def admit(self, peer: Peer) -> None:
        """The line at once, then the linger: whatever the peer sent (HAProxy's
        agent-send) is read to its EOF, so the close is a FIN, not a reset that could
        discard the line before HAProxy reads it."""
        self.served += 1
        self.finish(peer, (self.line() + "\n").encode("ascii"))
