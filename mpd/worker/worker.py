"""A worker: one level-triggered epoll loop over the shared listening socket, its link to
the master, its clients and its signals. It knows the client protocol only through the
ClientProtocol interface, and its master only through the link (link.py): under a master
a channel, in single-process mode (`workers = 0`) a stand-in, with the same loop."""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import time
from typing import Any, Callable

from mpd.apps import PROTOCOLS
from mpd.config.schema import Config
from mpd.logs import log as logmod
from mpd.system import tcp
from mpd.system import testhooks as hooks
from mpd.wire.channel import Kind, Message
from mpd.worker.connection import WAITING, Connection
from mpd.worker.handoff import Handover
from mpd.worker.link import Link, MasterLink, StandaloneLink
from mpd.worker.orders import EXIT_BOOT_ERROR, EXIT_CRASH, EXIT_OK, Orders
from mpd.worker.proxyphase import ProxyPhase
from mpd.worker.serving import RECV_SIZE, Serving
from mpd.worker.upkeep import Upkeep

ACCEPT_BATCH = 32  # accepts per wake-up, so a burst spreads over the workers
ACCEPT_RETRY = 0.1  # seconds to pause accepting after EMFILE/ENFILE/ENOBUFS/ENOMEM

IN, OUT = select.EPOLLIN, select.EPOLLOUT
INF = float("inf")

log = logmod.get_logger()

def run_worker(config: Config, listener: socket.socket, channel: socket.socket, slot: int,
               slots: tuple[int, ...]) -> int:
    """A forked worker's life, under its master."""
    return Worker(config, listener, MasterLink(channel), slot, slots).run()


def run_single(config: Config, listener: socket.socket) -> int:
    """Single-process mode: this process serves, with no master."""
    return Worker(config, listener, StandaloneLink()).run()


class Worker(Serving, Handover, Orders, Upkeep, ProxyPhase):
    def __init__(self, config: Config, listener: socket.socket, link: Link,
                 slot: int | None = None, slots: tuple[int, ...] = ()):
        self.config = config
        self.slots = slots  # the slot table: who owns which key (ROUTES updates it)
        self.listener = listener
        self.link = link
        self.slot = slot
        self.protocol = PROTOCOLS[config.protocol]
        # The listener's family and type as ints: the properties convert to enums per call.
        self.family, self.kind = int(listener.family), int(listener.type)
        self.pid = os.getpid()
        self.conns: dict[int, Connection] = {}
        self.max_clients = config.clients_per_worker()  # and the fd limit: upkeep.py
        self.accepting = False
        self.listening = True  # our copy of the listening socket is open and listens
        self.accept_retry_at = 0.0  # monotonic time to retry accepting after a shortage
        self.stopping = False  # graceful: no new clients; close each at a frame boundary
        self.draining = False  # retiring: hand every client to its new owner, then exit
        self.stop_deadline = 0.0  # when stopping: close whatever is left at this time
        self.running = True
        self.next_heartbeat = 0.0
        self.next_timer = 0.0  # the earliest of the times above: one check per turn
        self.now = 0.0  # the loop's clock, read once a turn
        self.link_writable_wanted = False  # the link's fd is in epoll for OUT too
        self.debug = logmod.enabled("debug")
        self.stats = {"accepted": 0, "requests": 0, "handoffs_out": 0, "adopted": 0,
                      "spilled": 0, "refused": 0, "protocol_errors": 0, "overflows": 0}
        self.init_upkeep()
        self.init_proxy()  # server.proxy_protocol: the PROXY header phase (proxyphase.py)
        # What the master may tell us: one table, as nginx keeps one switch.
        self.on_message_kind: dict[Kind, Callable[[Message], None]] = {
            Kind.ADOPT: self.adopt, Kind.ROUTES: self.on_routes, Kind.CONFIG: self.on_config,
            Kind.DRAIN: self.on_drain, Kind.STOP: lambda _message: self.stop(),
            Kind.REOPEN_LOGS: lambda _message: logmod.reopen()}

    # --- the loop ---------------------------------------------------------------------

    def run(self) -> int:
        """Boot, then serve until stopped. An exception before the loop serves is a boot
        error (exit 3: the master backs off); one that escapes the loop later is a crash."""
        if hooks.crash_requested():
            log.error("worker.test_crash")
            return EXIT_BOOT_ERROR
        self.boot()
        try:
            self.serve()
        except Exception as e:  # noqa: BLE001 - logged; the master respawns the slot at once
            log.exception("worker.crashed", error=repr(e))
            return EXIT_CRASH
        self.shutdown()
        return EXIT_OK

    def boot(self) -> None:
        self.epoll = select.epoll()
        self.signals = self.link.signals(self)
        self.epoll.register(self.signals.fileno(), IN)
        if self.link.fileno() >= 0:
            self.epoll.register(self.link.fileno(), IN)
        self.init_limits()  # and start accepting
        self.link.hello(self.slot)
        log.info("worker.serving", max_clients=self.max_clients)

    def serve(self) -> None:
        """The loop. Its common case is served right here, with locals: a client with nothing
        pending whose read is one stateless frame; the rest in serving.py (README: design)."""
        conns, poll, monotonic, stats = self.conns, self.epoll.poll, time.monotonic, self.stats
        readv, write, inbox = os.readv, os.write, bytearray(RECV_SIZE)
        into, view, (end, keyed, reply, size) = (inbox,), memoryview(inbox), self.fast_path()
        requests, log_fd = 0, -1  # stats at the heartbeat; LOG-HOOK: the sink's fd if behind
        now = self.now = monotonic()
        while self.running and not (self.stopping and not conns):
            fd = -1  # the fd whose event is handled: a bug there ends that one peer only
            try:
                if now >= self.next_timer:
                    stats["requests"], requests = stats["requests"] + requests, 0
                    self.on_timers(now)
                log_fd = logmod.watch_epoll(self.epoll)  # LOG-HOOK
                ready = poll(self.next_timer - now if self.next_timer < INF else -1)
                now = self.now = monotonic()  # the clients' stamp: no clock read per request
                for fd, events in ready:
                    conn = conns.get(fd)
                    if conn is None:
                        self.on_other(fd, events, log_fd)
                    elif events != IN or conn.handoff >= WAITING or conn.inbuf or conn.outbuf:
                        self.on_event(conn, events)
                    else:  # the common case: one read, the protocol's test inline, one write
                        try:
                            n = readv(fd, into)
                        except OSError as e:
                            self.read_failed(conn, e)
                            continue
                        if n and inbox[n - 1] == end and inbox[0] != keyed \
                                and inbox.find(end, 0, n) == n - 1:
                            conn.seen = now
                            requests += 1
                            try:
                                sent = write(fd, reply)
                            except OSError:  # full (EAGAIN) or failed: write() tries again
                                sent = 0
                            if sent != size:
                                self.write(conn, reply[sent:])
                        else:  # EOF, part of a frame, several frames, a key frame
                            self.received(conn, view[:n].tobytes())
            except Exception as e:  # noqa: BLE001 - the rest of the turn's events come again
                self.contain(fd, e)  # (level-triggered) at the next poll
                now = self.now = monotonic()
        stats["requests"] += requests

    def fast_path(self) -> tuple[int, int, bytes, int]:
        """The protocol's fast path for the loop: (end, keyed, reply, len(reply)). Without
        one, `end` is -1, which no byte equals: every read then goes to feed()."""
        offer = getattr(self.protocol, "stateless", None)
        if offer is None or offer.max_frame < RECV_SIZE:
            return -1, -1, b"", 0
        return offer.end, offer.keyed, offer.reply, len(offer.reply)

    def on_other(self, fd: int, events: int, log_fd: int) -> None:
        """An event on something other than a client."""
        if fd == self.listener.fileno():
            self.accept()
        elif fd == self.link.fileno():
            self.on_link(events)
        elif fd == self.signals.fileno():
            self.signals.dispatch()
        elif fd == log_fd:  # the log sink can take queued lines again
            logmod.flush()

    def contain(self, fd: int, error: Exception) -> None:
        """A bug met in handling one event: log it with what it was about, end that one
        peer, and go on. A client is closed; accepting pauses as after EMFILE; the timers
        wait a second; a failing channel to the master is a lost master."""
        conn = self.conns.get(fd)
        if conn is not None:
            log.exception("client.error", fd=fd, key=conn.key, error=repr(error))
            self.discard(conn)
            return
        where = {self.listener.fileno(): "accept", self.link.fileno(): "channel",
                 self.signals.fileno(): "signals"}.get(fd, "timers") if fd >= 0 else "timers"
        log.exception("loop.error", where=where, fd=fd, error=repr(error))
        if where == "accept":
            self.pause_accepting("error", retry=True)
        elif where == "channel":
            self.orphaned()
        elif where == "timers":
            self.next_heartbeat = max(self.next_heartbeat, self.now + 1)
            self.up.next_upkeep = max(self.up.next_upkeep, self.now + 1)
            self.stop_deadline = self.stop_deadline and max(self.stop_deadline, self.now + 1)
            self.accept_retry_at = self.accept_retry_at and max(self.accept_retry_at,
                                                                self.now + 1)
            self.rearm()

    def discard(self, conn: Connection) -> None:
        """Close a client whose state a bug may have left half-changed."""
        if self.conns.get(conn.fd) is conn:
            del self.conns[conn.fd]
            with contextlib.suppress(OSError, ValueError):
                self.epoll.unregister(conn.fd)
        self.newcomers.pop(conn.fd, None)
        conn.sock.close()
        self.resume_accepting()

    def rearm(self) -> None:
        """Recompute the next time the loop has timed work (heartbeat, retry, deadline,
        upkeep)."""
        self.next_timer = min(self.accept_retry_at or INF, self.stop_deadline or INF,
                              self.next_heartbeat, self.up.next_upkeep,
                              self.header_timer() if self.gate is not None else INF)

    def on_timers(self, now: float) -> None:
        if self.accept_retry_at and now >= self.accept_retry_at:
            self.accept_retry_at = 0.0
            self.resume_accepting()
        if now >= self.next_heartbeat:
            self.next_heartbeat = now + self.link.heartbeat
            if hooks.hang_requested():
                hooks.hang()
            self.report()
        if now >= self.up.next_upkeep:
            self.upkeep(now)
        if self.gate is not None and now >= self.header_timer():
            self.expire_headers(now)
        if self.stopping and (not self.conns or now >= self.stop_deadline):
            self.running = False
        self.rearm()

    # --- accepting ----------------------------------------------------------------------

    def resume_accepting(self) -> None:
        if self.accepting or self.stopping or self.accept_retry_at or not self.listening:
            return
        if len(self.conns) >= self.max_clients:
            return
        # EPOLLEXCLUSIVE: a new client wakes one worker, not all (no thundering herd).
        self.epoll.register(self.listener.fileno(), IN | select.EPOLLEXCLUSIVE)
        self.accepting = True

    def pause_accepting(self, reason: str, retry: bool = False) -> None:
        if self.accepting:
            self.epoll.unregister(self.listener.fileno())
            self.accepting = False
            if reason == "max_clients":
                self.report()  # tell the master now: it may auto-scale
        now = time.monotonic()
        if retry:
            self.accept_retry_at = now + ACCEPT_RETRY
            self.rearm()
        self.note_pause(reason, now)

    def accept(self) -> None:
        if not self.accepting:  # an event of this turn, from before we stopped accepting
            return
        conns, register = self.conns, self.epoll.register
        raw_accept = self.listener._accept  # (fd, address): see the note below
        family, kind = self.family, self.kind
        max_clients = self.max_clients
        gate = self.gate
        for _ in range(ACCEPT_BATCH):
            if len(conns) >= max_clients:
                self.pause_accepting("max_clients")
                return
            try:
                # socket.accept() is _accept() plus a socket() built from the listener's
                # family and type properties, which convert to enums on every call:
                # about 2 us a client, a fifth of a connection's whole cost here.
                fd, addr = raw_accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client gave up while queued
            except OSError as e:
                if e.errno in tcp.SHORTAGE:  # out of fds or memory: back off, no spin
                    self.pause_accepting(errno.errorcode[e.errno], retry=True)
                    self.refresh_limits()  # prlimit may have cut our fd limit
                    return
                if e.errno in (errno.EPROTO, errno.EPERM, errno.ENETDOWN, errno.EHOSTUNREACH):
                    continue
                if e.errno == errno.EINVAL:  # the master shut the listening down: a stop
                    self.stop_listening()
                    return
                raise
            sock = socket.socket(family, kind, 0, fd)
            sock.setblocking(False)
            conn = Connection(sock, self.now)
            if gate is not None and not self.expect_header(conn, addr):
                continue  # server.proxy_protocol, and not from server.proxy_from: closed
            conns[fd] = conn  # add(), inlined: this is the connection-rate path
            self.newcomers[fd] = conn  # until its first frame (upkeep.py)
            register(fd, IN)
            self.stats["accepted"] += 1
            if self.debug:
                log.debug("client.accepted", fd=sock.fileno(), peer=_peer(addr),
                          clients=len(self.conns))

    def add(self, conn: Connection) -> None:
        self.epoll.register(conn.fd, IN)  # first: an fd epoll refuses is never a client
        self.conns[conn.fd] = conn


def _peer(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"[{addr[0]}]:{addr[1]}" if ":" in str(addr[0]) else f"{addr[0]}:{addr[1]}"
    return str(addr)
