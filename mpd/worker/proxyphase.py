"""The worker's PROXY header phase (server.proxy_protocol): a client is taken only from
the addresses in server.proxy_from, and its first bytes go to mpd.worker.proxy.parse()
until they make a whole header; only then is its protocol object made and given the
bytes that follow. The connection then carries the real client's address (its `peer`,
the transport's get_extra_info("peername")) into its logs and hand-offs. A client that
sends a malformed header, or no whole header within server.proxy_timeout, is closed; the
gate (proxygate.py) logs why and counts it.

A connection in this phase is in the HEADER phase: the loop's one test for connections
not to serve inline sends it here, so a client whose header is done costs nothing more
per request than one that never had one."""

from __future__ import annotations

import time
from typing import Any, Callable

from mpd.worker import proxy
from mpd.worker.clients import Clients
from mpd.worker.connection import HEADER, LEAVING, SERVING, Connection
from mpd.worker.proxygate import ProxyGate

RECV_SIZE = 4096  # a header is at most proxy.MAX_HEADER bytes; the rest waits in the socket
# A late header is closed up to this many seconds late: then a stream of new clients,
# each with its own deadline, wakes the loop's timer at most ten times a second.
HEADER_SLACK = 0.1


class ProxyPhase:
    def __init__(self, config: Any, clients: Clients, stats: dict[str, int]):
        self.gate = ProxyGate(config)
        self.clients = clients
        self.stats = stats
        self.handoff: Any = None  # a retiring worker hands a client on once its header is in
        self.wake: Callable[[float], None] = lambda _when: None  # the loop's timer

    def apply(self, config: Any) -> None:
        self.gate.apply(config)

    def expect_header(self, conn: Connection, peer: Any) -> bool:
        """A client just accepted: from a trusted address, it enters the header phase
        (True); from any other, it is closed at once (False)."""
        gate = self.gate
        if not gate.admits(peer):
            gate.reject_untrusted(conn.fd, peer)
            self.stats["proxy_rejected"] = gate.rejected
            conn.sock.close()
            return False
        conn.peer = peer
        conn.phase = HEADER
        conn.header_due = gate.expect(conn)
        self.wake(conn.header_due + HEADER_SLACK)  # a no-op unless it is the first due
        return True

    def read_header(self, conn: Connection) -> None:
        """Bytes from a client in the header phase: keep them until they make a whole
        header, then serve what follows it (or, when retiring, hand the client on)."""
        clients = self.clients
        try:
            data = conn.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            clients.close(conn, "reset", detail=e.strerror)
            return
        if not data:
            clients.close(conn, "eof")
            return
        conn.inq += data
        gate = self.gate
        try:
            header = proxy.parse(conn.inq)
        except proxy.ProxyError as e:
            gate.reject_malformed(conn.fd, conn.peer, e)
            self.stats["proxy_rejected"] = gate.rejected
            clients.close(conn, "protocol_error")
            return
        if header is None:
            return
        conn.header_due = 0.0
        conn.phase = SERVING
        source = gate.admitted(conn.fd, conn.peer, header)
        if source is not None:  # else the proxy's own check, or a client it cannot name
            conn.peer = source
        conn.inq = conn.inq[header.length:]
        if self.handoff.retiring:
            conn.phase = LEAVING
            self.handoff.give(conn)
            return
        if conn.protocol is None and not clients.lazy and not clients.made(conn):
            return
        clients.feed_held(conn)

    def next_due(self) -> float:
        """When the loop's timer must next look at the header deadlines (inf: never)."""
        return self.gate.next_due + HEADER_SLACK

    def expire(self, now: float | None = None) -> None:
        """Close the clients whose header did not come in time."""
        gate = self.gate
        for conn in list(gate.overdue(time.monotonic() if now is None else now,
                                      self.clients.conns)):
            gate.reject_timeout(conn.fd, conn.peer)
            self.clients.close(conn, "idle")
        self.stats["proxy_rejected"] = gate.rejected
