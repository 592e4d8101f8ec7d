"""One small non-blocking server for the master's operator-facing ports, served from the
master's own selector: the control socket (control.py), the metrics endpoint
(httpmetrics.py) and the HAProxy agent port (agent.py). What they share is here, once:

- the accept loop: at most `batch` accepts per wake-up, so no port starves the loop;
- one accept pause: out of fds or memory (tcp.SHORTAGE) accept() fails while the
  listening socket stays readable, so it leaves the selector for RETRY seconds instead
  of spinning; one line when a pause begins (ops.accept_paused) and one when accepting
  has gone on for PAUSE_OVER seconds (ops.accept_resumed, with the retries);
- one linger: once a peer's last answer is out, half-close and read its leftovers to EOF
  (`linger` seconds at most), so closing never resets a connection under an unread
  answer;
- one deadline sweep: each peer has one deadline, and tick() acts on those that passed;
- a bound on connections: past `peers` a newcomer takes the place of the one that
  evictable() names (each server says who), and past `lingering` a finished peer is
  closed at once.

A server keeps only what is its own: what it makes of a newcomer (admit), of the bytes a
peer sends (received), of a peer whose deadline passed (expired), and whom to evict."""

from __future__ import annotations

import contextlib
import functools
import selectors
import socket
import time
from dataclasses import dataclass

from mpd.logs import log as logmod
from mpd.system import tcp


class PortError(Exception):
    """An operator port cannot be opened; the message says which and why."""


def open_port(host: str, port: int, purpose: str, error: type[PortError] = PortError,
              backlog: int = 64) -> socket.socket:
    """Bind an operator port (the agent's, the metrics'); `purpose` ends the error's line."""
    try:
        return tcp.listen(host, port, backlog)
    except OSError as e:
        raise error(f"cannot listen on {tcp.where(host, port)} {purpose}: "
                    f"{e.strerror}") from None


RETRY = 0.1  # seconds out of the selector after a shortage, before accept() is tried again
PAUSE_OVER = 1.0  # seconds without a shortage before a pause counts as over

log = logmod.get_logger()


@dataclass(frozen=True)
class Limits:
    peers: int  # connections served at once
    lingering: int = 256  # connections reading out their last answer at once
    batch: int = 64  # accepts per wake-up
    linger: float = 1.0  # seconds a peer may take to close after its last answer is out
    backlog: int = 1 << 20  # answer bytes a peer may leave unread (send()) before it is dropped


class Peer:
    __slots__ = ("sock", "inbuf", "outbuf", "since", "deadline", "done", "shut", "eof",
                 "events")

    def __init__(self, sock: socket.socket, now: float):
        self.sock = sock
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.since = now  # when its wait began: accepted, or its last request answered
        self.deadline = 0.0  # when tick() acts on it (0: never)
        self.done = False  # its last answer is queued: what it sends now is thrown away
        self.shut = False  # half-closed: its last answer is out, waiting for its EOF
        self.eof = False  # it half-closed first: once its answer is out, close
        self.events = 0  # what it is registered for in the selector (0: not registered)


class Server:
    name = "server"  # who logs: control, metrics, agent

    def __init__(self, sock: socket.socket, selector: selectors.BaseSelector, limits: Limits):
        self.sock = sock
        self.selector = selector
        self.limits = limits
        self.peers: dict[int, Peer] = {}  # served, by fd, oldest first
        self.lingering: dict[int, Peer] = {}  # done: their last answer goes out, then EOF
        self.due = 0.0  # no peer's deadline is before this (0: no deadline)
        self.paused_until = 0.0  # out of the selector after a shortage, until then
        self.pause_began = 0.0  # a pause and its retries began then (0: no pause)
        self.last_shortage = 0.0
        self.pauses = 0  # shortages since the pause began
        selector.register(sock, selectors.EVENT_READ, self.on_accept)

    # --- what each server says ------------------------------------------------------------

    def make_peer(self, conn: socket.socket, now: float) -> Peer:
        return Peer(conn, now)

    def admit(self, peer: Peer) -> None:
        """A newcomer: serve() it, or finish() it at once."""
        self.serve(peer)

    def received(self, peer: Peer, data: bytes) -> None:
        """Bytes from a peer that is still served."""
        raise NotImplementedError

    def expired(self, peer: Peer, now: float) -> None:
        """A served peer's deadline passed."""
        self.drop(peer)

    def evictable(self) -> Peer:
        """The peer that makes way when a newcomer finds every place taken: the oldest."""
        return next(iter(self.peers.values()))

    def evict(self, peer: Peer) -> None:
        self.finish(peer)

    # --- accepting ------------------------------------------------------------------------

    def on_accept(self, _events: int) -> None:
        now = time.monotonic()
        for _ in range(self.limits.batch):
            try:
                conn, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in tcp.SHORTAGE:
                    self.pause(e, now)
                    return
                continue  # ECONNABORTED and kin: that peer gave up
            conn.setblocking(False)
            peer = None
            try:
                peer = self.make_peer(conn, now)
                self.admit(peer)
            except Exception as e:  # noqa: BLE001 - one peer must not end the master
                log.exception("ops.error", server=self.name, error=repr(e))
                if peer is not None:
                    self.drop(peer)
                else:
                    self.forget(conn)

    def serve(self, peer: Peer) -> None:
        """Take a place in the table (making one if need be), and read what it sent."""
        if len(self.peers) >= self.limits.peers:
            self.evict(self.evictable())
        self.peers[peer.sock.fileno()] = peer
        self.watch(peer)
        self.on_readable(peer)  # a request already there is answered in this very turn

    def pause(self, error: OSError, now: float) -> None:
        """Out of fds or memory: leave the selector for RETRY; one line per pause, however
        many retries it takes."""
        self.selector.unregister(self.sock)
        self.paused_until = now + RETRY
        self.last_shortage = now
        self.pauses += 1
        if not self.pause_began:
            self.pause_began = now
            log.warning("ops.accept_paused", server=self.name, error=error.strerror,
                        retry_in=RETRY)

    def swap_listener(self, sock: socket.socket) -> None:
        """Accept on `sock` from now on, and close the listening socket it replaces."""
        if not self.paused_until:
            self.selector.unregister(self.sock)
            self.selector.register(sock, selectors.EVENT_READ, self.on_accept)
        self.sock.close()
        self.sock = sock

    # --- serving a peer -------------------------------------------------------------------

    def on_event(self, peer: Peer, events: int) -> None:
        if peer.sock.fileno() < 0:
            return  # dropped earlier in this turn
        try:
            if events & selectors.EVENT_WRITE:
                self.flush(peer)
            if events & selectors.EVENT_READ and peer.sock.fileno() >= 0:
                self.on_readable(peer)
        except Exception as e:  # noqa: BLE001 - a bug with one peer ends that peer only
            log.exception("ops.error", server=self.name, error=repr(e))
            self.drop(peer)

    def on_readable(self, peer: Peer) -> None:
        try:
            data = peer.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.drop(peer)
            return
        if not data:
            if not peer.outbuf:
                self.drop(peer)  # gone, or done reading its last answer
                return
            peer.eof = True  # half-closed: it still takes the answers it asked for
            if peer.done:
                self.watch(peer)
            else:
                self.finish(peer)
        elif not peer.done:
            self.received(peer, data)

    def send(self, peer: Peer, data: bytes) -> None:
        """Queue an answer; a peer that leaves more than `backlog` unread is dropped."""
        peer.outbuf += data
        if len(peer.outbuf) > self.limits.backlog:
            self.drop(peer)
        else:
            self.flush(peer)

    def finish(self, peer: Peer, answer: bytes = b"", within: float | None = None) -> None:
        """`answer` is the peer's last: it has `within` seconds (linger) to take it, then
        `linger` to close. Past `lingering` such peers, one best-effort send, then close."""
        fd = peer.sock.fileno()
        self.peers.pop(fd, None)
        peer.done = True
        peer.inbuf = bytearray()
        peer.outbuf += answer
        self.due_at(peer, time.monotonic() + (self.limits.linger if within is None else within))
        if fd not in self.lingering:
            if len(self.lingering) >= self.limits.lingering:
                with contextlib.suppress(OSError):
                    peer.sock.send(peer.outbuf)
                self.forget(peer.sock)
                return
            self.lingering[fd] = peer
        self.flush(peer)

    def flush(self, peer: Peer) -> None:
        if peer.outbuf:
            try:
                sent = peer.sock.send(peer.outbuf)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.drop(peer)
                return
            del peer.outbuf[:sent]
        if peer.done and not peer.outbuf and not peer.shut:
            if peer.eof:
                self.drop(peer)
                return
            peer.shut = True
            with contextlib.suppress(OSError):
                peer.sock.shutdown(socket.SHUT_WR)
            self.due_at(peer, min(peer.deadline, time.monotonic() + self.limits.linger))
        self.watch(peer)

    def watch(self, peer: Peer) -> None:
        """Register for what the peer needs now: its bytes (unless it is at EOF), and
        writability while an answer waits."""
        events = (0 if peer.eof else selectors.EVENT_READ) | (
            selectors.EVENT_WRITE if peer.outbuf else 0)
        if events == peer.events:
            return
        react = functools.partial(self.on_event, peer)
        if peer.events:
            self.selector.modify(peer.sock, events, react)
        else:
            self.selector.register(peer.sock, events, react)
        peer.events = events

    def drop(self, peer: Peer) -> None:
        fd = peer.sock.fileno()
        if fd < 0:
            return
        if self.peers.get(fd) is peer:
            del self.peers[fd]
        elif self.lingering.get(fd) is peer:
            del self.lingering[fd]
        peer.done = True
        self.forget(peer.sock)

    def forget(self, sock: socket.socket) -> None:
        """Close a peer's socket, whatever state a bug may have left it in."""
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(sock)
        sock.close()

    # --- the clock: a service of the master's loop ----------------------------------------

    def due_at(self, peer: Peer, deadline: float) -> None:
        peer.deadline = deadline
        if not self.due or deadline < self.due:
            self.due = deadline

    def deadline(self) -> float | None:
        due = [d for d in (self.due, self.paused_until,
                           self.pause_began and self.last_shortage + PAUSE_OVER) if d]
        return min(due) if due else None

    def tick(self, now: float) -> None:
        """Resume accepting after a pause (and say when the pause is over); act on the
        peers whose deadline passed: a finished one is closed, a served one expired()."""
        if self.paused_until and now >= self.paused_until:
            self.paused_until = 0.0
            self.selector.register(self.sock, selectors.EVENT_READ, self.on_accept)
        if self.pause_began and not self.paused_until \
                and now >= self.last_shortage + PAUSE_OVER:
            log.info("ops.accept_resumed", server=self.name, pauses=self.pauses,
                     paused_for=round(self.last_shortage + RETRY - self.pause_began, 3))
            self.pause_began, self.pauses = 0.0, 0
        if self.due and now >= self.due:
            self.sweep(now)

    def sweep(self, now: float) -> None:
        self.due = 0.0
        for peer in [*self.peers.values(), *self.lingering.values()]:
            if not peer.deadline or peer.sock.fileno() < 0:
                continue
            if now < peer.deadline:
                self.due_at(peer, peer.deadline)
            elif peer.done:
                self.drop(peer)
            else:
                self.expired(peer, now)

    def close(self) -> None:
        for peer in [*self.peers.values(), *self.lingering.values()]:
            self.drop(peer)
        if not self.paused_until:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(self.sock)
        self.sock.close()

    def in_child(self) -> None:
        """In a forked worker: every socket here is the master's (its selector is closed)."""
        for peer in [*self.peers.values(), *self.lingering.values()]:
            peer.sock.close()
        self.sock.close()
