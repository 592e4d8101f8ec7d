"""The metrics endpoint (`[metrics] listen`): a minimal HTTP/1.1 server for Prometheus,
served from the master's own selector like the control socket and the agent port: no
thread, nothing that waits on a peer. It answers `GET /metrics` (and HEAD) with
metrics.py's exposition, then closes; anything else gets a short error.

A slow or hostile scraper cannot stall the master: a request has REQUEST_TIMEOUT to
arrive whole and MAX_REQUEST bytes at most (request line and headers; a body is not
read), the answer REPLY_TIMEOUT to be taken, and at most LIMITS.peers wait for their
answer at once: a newcomer past that closes the oldest connection (slowloris holds a
place only until someone else needs it). The accept pause, the linger after the answer
and the deadlines are the server base's (server.py)."""

from __future__ import annotations

import selectors
import socket
import time
from typing import Callable

from mpd.logs import log as logmod
from mpd.ops.server import Limits, Peer, PortError, Server, open_port

MAX_REQUEST = 8192  # bytes of request line and headers
REQUEST_TIMEOUT = 5.0  # seconds from accept to a whole request
REPLY_TIMEOUT = 10.0  # seconds for the answer to be taken
LIMITS = Limits(peers=16, lingering=64, linger=1.0)
CACHE = 0.25  # seconds a rendering serves further scrapes

# The Accept header -> (body, content type)
Render = Callable[[str], "tuple[bytes, str]"]

log = logmod.get_logger()


class MetricsError(PortError):
    """The metrics port cannot be opened; the message says why."""


def open_socket(host: str, port: int, backlog: int = 64) -> socket.socket:
    """Bind the metrics port: open_socket(*config.host_port(config.metrics_listen))."""
    return open_port(host, port, "for metrics", MetricsError, backlog)


def parse(head: bytes) -> tuple[int, str, str]:
    """(status, reason or "", Accept header) for a request's head (line and headers)."""
    lines = head.decode("latin-1").split("\r\n") if b"\r\n" in head else \
        head.decode("latin-1").split("\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return 400, "expected a request line: GET /metrics HTTP/1.1", ""
    method, target = parts[0], parts[1]
    if method not in ("GET", "HEAD"):
        return 405, f"{method} is not served: GET /metrics", ""
    if target.split("?", 1)[0] != "/metrics":
        return 404, f"{target} is not here: GET /metrics", ""
    accept = ""
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "accept":
            accept = value.strip()
    return (200, "HEAD" if method == "HEAD" else "", accept)


REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           408: "Request Timeout", 431: "Request Header Fields Too Large",
           500: "Internal Server Error"}


def response(status: int, body: bytes, content_type: str = "text/plain; charset=utf-8",
             head_only: bool = False) -> bytes:
    extra = "Allow: GET, HEAD\r\n" if status == 405 else ""
    head = (f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n")
    return head.encode("ascii") + (b"" if head_only else body)


class MetricsServer(Server):
    name = "metrics"

    def __init__(self, sock: socket.socket, selector: selectors.BaseSelector, render: Render):
        super().__init__(sock, selector, LIMITS)
        self.render = render  # the Accept header -> (body, content type), from the snapshot
        self.rendered: dict[str, tuple[float, tuple[bytes, str]]] = {}  # by Accept
        self.served = 0

    def admit(self, peer: Peer) -> None:
        self.due_at(peer, peer.since + REQUEST_TIMEOUT)
        self.serve(peer)

    def received(self, peer: Peer, data: bytes) -> None:
        peer.inbuf += data
        end = peer.inbuf.find(b"\r\n\r\n")
        if end < 0:
            end = peer.inbuf.find(b"\n\n")
        if end < 0 or end > MAX_REQUEST:
            if len(peer.inbuf) > MAX_REQUEST:
                self.finish(peer, response(431, f"request head over {MAX_REQUEST} bytes\n"
                                           .encode()), REPLY_TIMEOUT)
            return
        # What follows the head (a body, a pipelined request) is read and thrown away.
        self.finish(peer, self.reply_to(bytes(peer.inbuf[:end])), REPLY_TIMEOUT)

    def expired(self, peer: Peer, now: float) -> None:
        self.finish(peer, response(408, f"request not whole within {REQUEST_TIMEOUT:g} s\n"
                                   .encode()))

    def reply_to(self, head: bytes) -> bytes:
        status, note, accept = parse(head)
        if status != 200:
            log.debug("metrics.bad_request", status=status, error=note)
            return response(status, (note + "\n").encode())
        try:
            body, content_type = self.scrape(accept)
        except Exception as e:  # noqa: BLE001 - the scrape fails, the master goes on
            log.exception("metrics.error", error=repr(e))
            return response(500, b"internal error: see mpd's log\n")
        self.served += 1
        return response(200, body, content_type, head_only=note == "HEAD")

    def scrape(self, accept: str) -> tuple[bytes, str]:
        """A rendering serves further scrapes for CACHE seconds: a flood of scrapes costs
        no more than a few renderings a second."""
        now = time.monotonic()
        cached = self.rendered.get(accept)
        if cached is not None and now - cached[0] < CACHE:
            return cached[1]
        answer = self.render(accept)
        self.rendered = {accept: (now, answer)}  # one Accept at a time: a flood of odd ones
        return answer                             # cannot grow it
