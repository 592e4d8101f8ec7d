"""The metrics endpoint (`[metrics] listen`): a minimal HTTP/1.1 server for Prometheus,
served from the master's own selector like the control socket and the agent port: no
thread, nothing that waits on a peer. It answers `GET /metrics` (and HEAD) with
metrics.py's exposition, then closes; anything else gets a short error.

A slow or hostile scraper cannot stall the master: a request has REQUEST_TIMEOUT to
arrive whole and MAX_REQUEST bytes at most (request line and headers; a body is not
read), the answer REPLY_TIMEOUT to be taken, and at most MAX_CONNECTIONS are open at
once: a newcomer past that closes the oldest connection (slowloris holds a place only
until someone else needs it). Out of fds, accepting pauses instead of spinning."""

from __future__ import annotations

import contextlib
import selectors
import socket
import time
from typing import Callable

from mpd.logs import log as logmod
from mpd.system import tcp

MAX_REQUEST = 8192  # bytes of request line and headers
REQUEST_TIMEOUT = 5.0  # seconds from accept to a whole request
REPLY_TIMEOUT = 10.0  # seconds for the answer to be taken
LINGER = 1.0  # seconds to read a peer's leftovers after the answer, so the close is no reset
MAX_CONNECTIONS = 16
ACCEPT_BATCH = 64
PAUSE = 0.5  # seconds accepting stops after EMFILE/ENFILE/ENOBUFS/ENOMEM

# The Accept header -> (body, content type)
Render = Callable[[str], "tuple[bytes, str]"]

log = logmod.get_logger()


class MetricsError(Exception):
    """The metrics port cannot be opened; the message says why."""


def open_socket(host: str, port: int, backlog: int = 64) -> socket.socket:
    """Bind the metrics port: open_socket(*config.host_port(config.metrics_listen))."""
    try:
        return tcp.listen(host, port, backlog)
    except OSError as e:
        raise MetricsError(f"cannot listen on {tcp.where(host, port)} for metrics: "
                         f"{e.strerror}") from None


class Scraper:
    __slots__ = ("sock", "inbuf", "outbuf", "deadline", "answered", "since")

    def __init__(self, sock: socket.socket, now: float):
        self.sock = sock
        self.inbuf = bytearray()
        self.outbuf = b""
        self.since = now
        self.deadline = now + REQUEST_TIMEOUT
        self.answered = False  # the answer is queued: what the peer sends now is discarded


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


class MetricsServer:
    def __init__(self, sock: socket.socket, selector: selectors.BaseSelector, render: Render):
        self.sock = sock
        self.selector = selector
        self.render = render
        self.peers: dict[int, Scraper] = {}  # by fd, oldest first
        self.paused_until = 0.0
        self.served = 0
        selector.register(sock, selectors.EVENT_READ, self.on_accept)

    def on_accept(self, _events: int) -> None:
        now = time.monotonic()
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in tcp.SHORTAGE:
                    self.pause(e)
                    return
                continue  # ECONNABORTED and kin: that peer gave up
            if len(self.peers) >= MAX_CONNECTIONS:
                self.drop(next(iter(self.peers.values())))  # the oldest
            conn.setblocking(False)
            peer = Scraper(conn, now)
            self.peers[conn.fileno()] = peer
            self.selector.register(conn, selectors.EVENT_READ,
                                   lambda events, p=peer: self.on_event(p, events))

    def on_event(self, peer: Scraper, events: int) -> None:
        if self.peers.get(peer.sock.fileno()) is not peer:
            return
        try:
            if events & selectors.EVENT_WRITE:
                self.flush(peer)
            if events & selectors.EVENT_READ and self.peers.get(peer.sock.fileno()) is peer:
                self.on_readable(peer)
        except Exception as e:  # noqa: BLE001 - a bug with one scraper ends that one only
            log.exception("metrics.error", error=repr(e))
            self.drop(peer)

    def on_readable(self, peer: Scraper) -> None:
        try:
            data = peer.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.drop(peer)
            return
        if not data:
            self.drop(peer)  # gone: before asking, or done reading our answer
            return
        if peer.answered:
            return  # lingering: a body or a pipelined request, read and thrown away
        peer.inbuf += data
        end = peer.inbuf.find(b"\r\n\r\n")
        if end < 0:
            end = peer.inbuf.find(b"\n\n")
        if end < 0 or end > MAX_REQUEST:
            if len(peer.inbuf) > MAX_REQUEST:
                self.answer(peer, response(431, f"request head over {MAX_REQUEST} bytes\n"
                                           .encode()))
            return
        self.answer(peer, self.reply_to(bytes(peer.inbuf[:end])))

    def reply_to(self, head: bytes) -> bytes:
        status, note, accept = parse(head)
        if status != 200:
            log.debug("metrics.bad_request", status=status, error=note)
            return response(status, (note + "\n").encode())
        try:
            body, content_type = self.render(accept)
        except Exception as e:  # noqa: BLE001 - the scrape fails, the master goes on
            log.exception("metrics.error", error=repr(e))
            return response(500, b"internal error: see mpd's log\n")
        self.served += 1
        return response(200, body, content_type, head_only=note == "HEAD")

    def answer(self, peer: Scraper, data: bytes) -> None:
        peer.answered = True
        peer.inbuf = bytearray()
        peer.outbuf = data
        peer.deadline = time.monotonic() + REPLY_TIMEOUT
        self.flush(peer)

    def flush(self, peer: Scraper) -> None:
        try:
            sent = peer.sock.send(peer.outbuf) if peer.outbuf else 0
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.drop(peer)
            return
        peer.outbuf = peer.outbuf[sent:]
        if peer.outbuf:
            self.selector.modify(peer.sock, selectors.EVENT_READ | selectors.EVENT_WRITE,
                                 lambda events, p=peer: self.on_event(p, events))
            return
        # All sent: half-close, and read the peer's leftovers until its EOF (or LINGER), so
        # that closing never resets the connection under an answer not yet read.
        with contextlib.suppress(OSError):
            peer.sock.shutdown(socket.SHUT_WR)
        peer.deadline = min(peer.deadline, time.monotonic() + LINGER)
        self.selector.modify(peer.sock, selectors.EVENT_READ,
                             lambda events, p=peer: self.on_event(p, events))

    def drop(self, peer: Scraper) -> None:
        if self.peers.pop(peer.sock.fileno(), None) is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(peer.sock)
        peer.sock.close()

    def pause(self, error: OSError) -> None:
        log.warning("metrics.accept_failed", error=error.strerror, retry_in=PAUSE)
        self.selector.unregister(self.sock)
        self.paused_until = time.monotonic() + PAUSE

    def deadline(self) -> float | None:
        """When tick() next has work that the clock alone brings."""
        due = [p.deadline for p in self.peers.values()]
        if self.paused_until:
            due.append(self.paused_until)
        return min(due) if due else None

    def tick(self, now: float) -> None:
        """Close the scrapers past their deadline (a stalled request gets a 408 first, best
        effort); resume accepting after a pause."""
        if self.paused_until and now >= self.paused_until:
            self.paused_until = 0.0
            self.selector.register(self.sock, selectors.EVENT_READ, self.on_accept)
        for peer in [p for p in self.peers.values() if now >= p.deadline]:
            if not peer.answered:
                with contextlib.suppress(OSError):
                    peer.sock.send(response(408, f"request not whole within "
                                                 f"{REQUEST_TIMEOUT:g} s\n".encode()))
            self.drop(peer)

    def close(self) -> None:
        for peer in list(self.peers.values()):
            self.drop(peer)
        if not self.paused_until:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(self.sock)
        self.sock.close()
