"""The worker's PROXY header phase (server.proxy_protocol): a client is taken only from
the addresses in server.proxy_from, and its first bytes go to mpd.proxy.parse() until they
make a whole header; only then does the client protocol see any. The connection then
carries the real client's address (Connection.client) into its logs and hand-offs. A
client that sends a malformed header, or no whole header within server.proxy_timeout, is
closed; the gate (mpd.proxygate) logs why and counts it.

A connection in this phase is one of the worker's clients in the HEADER state: the loop's
one test for connections not to serve (handoff >= WAITING) sends it here, so a client
whose header is done costs nothing more per request than one that never had one.

ProxyPhase is a part of the Worker class (worker.py), kept in a file of its own as
handoff.py is; it works on the worker's connections and state."""

from __future__ import annotations

import time
from typing import Any, Callable

from mpd.config.schema import Config
from mpd.worker import proxy
from mpd.worker.connection import HEADER, SERVING, Connection
from mpd.worker.proxygate import ProxyGate

RECV_SIZE = 4096  # a header is at most proxy.MAX_HEADER bytes; the rest waits in the socket
# A late header is closed up to this many seconds late: then a stream of new clients,
# each with its own deadline, wakes the loop's timer at most ten times a second.
HEADER_SLACK = 0.1


class ProxyPhase:
    # The worker's state it works on (worker.py sets it up).
    config: Config
    conns: dict[int, Connection]
    stats: dict[str, int]
    draining: bool
    next_timer: float
    consume: Callable[[Connection, bytes], None]
    close: Callable[[Connection, str], None]
    hand_off: Callable[[Connection], None]

    def init_proxy(self) -> None:
        self.gate: ProxyGate | None = None
        if self.config.proxy_protocol:
            self.gate = ProxyGate(self.config)

    def expect_header(self, conn: Connection, peer: Any) -> bool:
        """A client just accepted: from a trusted address, it enters the header phase
        (True); from any other, it is closed at once (False)."""
        gate = self.gate
        assert gate is not None
        if not gate.admits(peer):
            gate.reject_untrusted(conn.fd, peer)
            self.stats["proxy_rejected"] = gate.rejected
            conn.sock.close()
            return False
        conn.client = peer
        conn.handoff = HEADER
        conn.header_due = gate.expect(conn)
        if conn.header_due + HEADER_SLACK < self.next_timer:
            self.next_timer = conn.header_due + HEADER_SLACK
        return True

    def read_header(self, conn: Connection) -> None:
        """Bytes from a client in the header phase: keep them until they make a whole
        header, then serve what follows it (or, when retiring, hand the client on)."""
        try:
            data = conn.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.close(conn, e.strerror or "error")
            return
        if not data:
            self.close(conn, "eof")
            return
        conn.inbuf += data
        gate = self.gate
        assert gate is not None
        try:
            header = proxy.parse(conn.inbuf)
        except proxy.ProxyError as e:
            gate.reject_malformed(conn.fd, conn.client, e)
            self.stats["proxy_rejected"] = gate.rejected
            self.close(conn, "proxy_rejected")
            return
        if header is None:
            return
        conn.header_due = 0.0
        conn.handoff = SERVING
        source = gate.admitted(conn.fd, conn.client, header)
        if source is not None:  # else the proxy's own check, or a client it cannot name
            conn.client = source
        if self.draining:
            del conn.inbuf[:header.length]
            self.hand_off(conn)
            return
        # The client's bytes as if just received: the protocol's fast path takes them.
        rest = bytes(conn.inbuf[header.length:])
        conn.inbuf.clear()
        self.consume(conn, rest)

    def header_timer(self) -> float:
        """When the loop's timer must next look at the header deadlines (inf: never)."""
        assert self.gate is not None
        return self.gate.next_due + HEADER_SLACK

    def expire_headers(self, now: float | None = None) -> None:
        """Close the clients whose header did not come in time."""
        gate = self.gate
        assert gate is not None
        for conn in list(gate.overdue(time.monotonic() if now is None else now, self.conns)):
            gate.reject_timeout(conn.fd, conn.client)
            self.close(conn, "proxy_timeout")
        self.stats["proxy_rejected"] = gate.rejected
