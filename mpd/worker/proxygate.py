"""The worker's side of `server.proxy_protocol`: who may send a PROXY header (the
addresses in `server.proxy_from`), how long it may take (`server.proxy_timeout`), the log
line and counter for every client turned away. Parsing the header is proxy.py's job; the
real client's address rides hand-offs in wire/peer.py's layout.

The gate holds no sockets: the worker keeps a connection's bytes in its own buffer until
proxy.parse() has a header, and closes what the gate says to reject."""

from __future__ import annotations

import functools
import ipaddress
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from mpd.config.checks import network
from mpd.logs import log as logmod
from mpd.wire.peer import format_peer
from mpd.worker.proxy import Address, ProxyError, ProxyHeader

log = logmod.get_logger()


class Sources:
    """The addresses a PROXY header is accepted from."""

    def __init__(self, entries: Iterable[str]):
        self.networks = tuple(network(entry) for entry in entries)
        # A proxy connects from a handful of addresses: remember each answer.
        self.allows = functools.lru_cache(maxsize=1024)(self._allows)

    def _allows(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # an IPv4 proxy seen through an IPv6 listener
        return any(address in net for net in self.networks
                   if net.version == address.version)


class ProxyGate:
    """What a worker consults for each client while server.proxy_protocol is on."""

    def __init__(self, config: Any):
        self.sources = Sources(config.proxy_from)
        self.timeout: float = config.proxy_timeout
        # (deadline, fd), in order. Not the connection itself: holding every client
        # accepted in the last proxy_timeout seconds alive would weigh on the collector.
        self.waiting: deque[tuple[float, int]] = deque()
        self.rejected = 0  # clients turned away, for the worker's STATS

    def apply(self, config: Any) -> None:
        """A reload changed proxy_from or proxy_timeout (a changed timeout applies to new
        clients; a shorter one may fire up to the difference late for the ones before)."""
        self.sources = Sources(config.proxy_from)
        self.timeout = config.proxy_timeout

    def admits(self, peer: Any) -> bool:
        """May this connecting address (socket.accept()'s) send a PROXY header at all?"""
        return isinstance(peer, tuple) and self.sources.allows(peer[0])

    def expect(self, conn: Any, now: float | None = None) -> float:
        """Start the clock on a connection's header; returns its deadline, which the worker
        keeps in conn.header_due until the header is complete (then sets it to 0.0)."""
        due = (time.monotonic() if now is None else now) + self.timeout
        self.waiting.append((due, conn.fd))
        return due

    @property
    def next_due(self) -> float:
        """The earliest deadline still queued (inf when none): for the worker's timer."""
        return self.waiting[0][0] if self.waiting else float("inf")

    def overdue(self, now: float, conns: Mapping[int, Any]) -> Iterator[Any]:
        """Connections still waiting for their header past their deadline. Entries of
        clients that finished their header or left are dropped on the way (a new client
        on the same fd has a deadline of its own)."""
        while self.waiting and self.waiting[0][0] <= now:
            due, fd = self.waiting.popleft()
            conn = conns.get(fd)
            if conn is not None and conn.header_due == due:
                yield conn

    def admitted(self, fd: int, peer: Any, header: ProxyHeader) -> Address | None:
        """The header is complete: the client's real address (None for the proxy's own
        health check, LOCAL, or an UNKNOWN one, which are served as they come)."""
        if logmod.enabled("debug"):
            log.debug("client.proxied", fd=fd, client=format_peer(header.source),
                      proxy=format_peer(peer), command=header.command, version=header.version)
        return header.source

    # --- clients turned away: the worker closes them, the gate says why ----------------

    def reject_untrusted(self, fd: int, peer: Any) -> None:
        self._reject(fd, peer, "untrusted", f"{format_peer(peer)} is not in "
                     "server.proxy_from, so it may not send a PROXY header")

    def reject_malformed(self, fd: int, peer: Any, error: ProxyError) -> None:
        self._reject(fd, peer, "malformed", f"{error} (server.proxy_protocol is on: clients "
                     "must come through the proxy)")

    def reject_timeout(self, fd: int, peer: Any) -> None:
        self._reject(fd, peer, "timeout", "no complete PROXY header within "
                     f"server.proxy_timeout ({self.timeout:g} s)")

    def _reject(self, fd: int, peer: Any, reason: str, error: str) -> None:
        self.rejected += 1
        log.warning("client.proxy_rejected", fd=fd, peer=format_peer(peer), reason=reason,
                    error=error)
