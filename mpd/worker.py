"""A worker: one level-triggered epoll loop over the shared listening socket, its channel
to the master, its clients and its signals. It knows the client protocol only through
the ClientProtocol interface; with `workers = 0` the master process runs it directly."""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import socket
import time
from typing import Any

from mpd import log as logmod
from mpd import testhooks as hooks
from mpd.channel import Channel, ChannelClosed, Kind, Message, close_fds
from mpd.config import Config
from mpd.protocols import PROTOCOLS, ProtocolError
from mpd.routing import owner
from mpd.signals import SignalQueue

RECV_SIZE = 32768
ACCEPT_BATCH = 32  # accepts per wake-up, so a burst spreads over the workers
HEARTBEAT = 1.0  # seconds between STATS messages (the master's liveness check)
ACCEPT_RETRY = 0.1  # seconds to pause accepting after EMFILE/ENFILE/ENOBUFS/ENOMEM
LOG_DRAIN = 0.5  # seconds an exiting worker may wait for its last log lines (LOG-HOOK)
EXIT_OK, EXIT_BOOT_ERROR = 0, 3  # 3: failed before serving (the master backs off harder)

IN, OUT = select.EPOLLIN, select.EPOLLOUT
INF = float("inf")
ACCEPT_SHORTAGE = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

log = logmod.get_logger()


class Connection:
    __slots__ = ("sock", "fd", "inbuf", "outbuf", "key", "owner", "table", "handoff_pending",
                 "pinned")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.fd = sock.fileno()
        self.inbuf = bytearray()  # received, not yet consumed (an incomplete frame)
        self.outbuf = bytearray()  # replies the client has not taken yet
        self.key: int | None = None
        self.owner: int | None = None  # the slot that owns its key, when it has one,
        self.table = 0  # by a slot table of this many slots (ROUTES may come before we hand off)
        self.handoff_pending = False  # hand off once the replies already due are out
        self.pinned = False  # a hand-off failed: serve it here whatever its key

    @property
    def idle(self) -> bool:
        return not self.inbuf and not self.outbuf


class Worker:
    def __init__(self, config: Config, listener: socket.socket, channel: Channel | None,
                 slot: int | None = None, slots: tuple[int, ...] = ()):
        self.config = config
        self.slots = slots  # the slot table: who owns which key (ROUTES updates it)
        self.listener = listener
        self.channel = channel
        self.slot = slot
        self.protocol = PROTOCOLS[config.protocol]
        # The listener's family and type as ints: the properties convert to enums per call.
        self.family, self.kind = int(listener.family), int(listener.type)
        self.pid = os.getpid()
        self.conns: dict[int, Connection] = {}
        self.epoll = select.epoll()
        self.accepting = False
        self.accept_retry_at = 0.0  # monotonic time to retry accepting after a shortage
        self.stopping = False  # graceful: no new clients; close each at a frame boundary
        self.draining = False  # retiring: hand every client to its new owner, then exit
        self.stop_deadline = 0.0  # when stopping: close whatever is left at this time
        self.running = True
        self.next_heartbeat = 0.0
        self.next_timer = 0.0  # the earliest of the three times above: one check per turn
        self.debug = logmod.enabled("debug")
        self.stats = {"accepted": 0, "requests": 0, "handoffs_out": 0, "adopted": 0,
                      "refused": 0, "protocol_errors": 0, "overflows": 0}
        if channel is None:  # single-process mode: the master's signals are ours
            self.signals = SignalQueue([signal.SIGTERM, signal.SIGINT, signal.SIGQUIT,
                                        signal.SIGHUP])
        else:  # the master coordinates INT (ctrl-C hits the whole group), HUP, TTIN, TTOU
            self.signals = SignalQueue([signal.SIGTERM, signal.SIGQUIT],
                                       ignore=[signal.SIGINT, signal.SIGHUP, signal.SIGTTIN,
                                               signal.SIGTTOU])

    # --- the loop ---------------------------------------------------------------------

    def run(self) -> int:
        if hooks.crash_requested():
            log.error("worker.test_crash")
            return EXIT_BOOT_ERROR
        self.epoll.register(self.signals.fileno(), IN)
        if self.channel is not None:
            self.epoll.register(self.channel.fileno(), IN)
        self.resume_accepting()
        if self.channel is not None:
            self.channel.send(Kind.HELLO, {"slot": self.slot, "pid": os.getpid()})
        log.info("worker.serving", max_clients=self.config.max_clients)
        lfd = self.listener.fileno()
        sfd = self.signals.fileno()
        cfd = self.channel.fileno() if self.channel is not None else -1
        conns = self.conns
        poll = self.epoll.poll
        monotonic = time.monotonic
        log_fd = -1  # LOG-HOOK: the log sink's fd while lines wait for it, else -1
        while self.running:
            now = monotonic()
            if now >= self.next_timer:
                self.on_timers(now)
            log_fd = logmod.watch_epoll(self.epoll)  # LOG-HOOK
            for fd, events in poll(self.next_timer - now if self.next_timer < INF else -1):
                conn = conns.get(fd)
                if conn is not None:
                    if events & OUT:
                        self.flush(conn)
                    if events & ~OUT and fd in conns:
                        self.on_readable(conn)
                elif fd == lfd:
                    self.accept()
                elif fd == cfd:
                    self.on_channel(events)
                elif fd == sfd:
                    self.on_signals()
                elif fd == log_fd:  # LOG-HOOK
                    logmod.flush()
            if self.stopping and not conns:
                self.running = False
        self.shutdown()
        return EXIT_OK

    def rearm(self) -> None:
        """Recompute the next time the loop has timed work (heartbeat, retry, deadline)."""
        self.next_timer = min(self.accept_retry_at or INF, self.stop_deadline or INF,
                              self.next_heartbeat if self.channel is not None else INF)

    def on_timers(self, now: float) -> None:
        if self.accept_retry_at and now >= self.accept_retry_at:
            self.accept_retry_at = 0.0
            self.resume_accepting()
        if self.channel is not None and now >= self.next_heartbeat:
            self.next_heartbeat = now + HEARTBEAT
            if hooks.hang_requested():
                hooks.hang()
            self.send_stats()
        if self.stopping and (not self.conns or now >= self.stop_deadline):
            self.running = False
        self.rearm()

    # --- accepting ----------------------------------------------------------------------

    def resume_accepting(self) -> None:
        if self.accepting or self.stopping or self.accept_retry_at:
            return
        if len(self.conns) >= self.config.max_clients:
            return
        # EPOLLEXCLUSIVE: a new client wakes one worker, not all (no thundering herd).
        self.epoll.register(self.listener.fileno(), IN | select.EPOLLEXCLUSIVE)
        self.accepting = True

    def pause_accepting(self, reason: str, retry: bool = False) -> None:
        if self.accepting:
            self.epoll.unregister(self.listener.fileno())
            self.accepting = False
            if self.channel is not None and reason == "max_clients":
                self.send_stats()  # tell the master now: it may auto-scale
        if retry:
            self.accept_retry_at = time.monotonic() + ACCEPT_RETRY
            self.rearm()
        log.warning("worker.accept_paused", reason=reason, clients=len(self.conns),
                    max_clients=self.config.max_clients)

    def accept(self) -> None:
        conns, register = self.conns, self.epoll.register
        raw_accept = self.listener._accept  # (fd, address): see the note below
        family, kind = self.family, self.kind
        max_clients = self.config.max_clients
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
                if e.errno in ACCEPT_SHORTAGE:  # out of fds or memory: back off, no spin
                    self.pause_accepting(errno.errorcode[e.errno], retry=True)
                    return
                if e.errno in (errno.EPROTO, errno.EPERM, errno.ENETDOWN, errno.EHOSTUNREACH):
                    continue
                raise
            sock = socket.socket(family, kind, 0, fd)
            sock.setblocking(False)
            conn = Connection(sock)
            conns[conn.fd] = conn  # add(), inlined: this is the connection-rate path
            register(conn.fd, IN)
            self.stats["accepted"] += 1
            if self.debug:
                log.debug("client.accepted", fd=sock.fileno(), peer=_peer(addr),
                          clients=len(self.conns))

    def add(self, conn: Connection) -> None:
        self.conns[conn.fd] = conn
        self.epoll.register(conn.fd, IN)

    # --- serving ------------------------------------------------------------------------

    def on_readable(self, conn: Connection) -> None:
        if conn.handoff_pending:  # its unread bytes belong to the next owner
            self.flush(conn)
            return
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
        self.consume(conn, data)

    def consume(self, conn: Connection, data: bytes) -> None:
        """Feed bytes to the protocol, write back its replies, and hand the client off
        when it names a key that another slot owns."""
        try:
            replies, frames, key = self.protocol.feed(conn.inbuf, data)
            while key is not None:
                conn.key = key
                conn.owner, conn.table = self.owner_of(conn, key), len(self.slots)
                if conn.owner != self.slot:
                    if frames:
                        self.stats["requests"] += frames
                        self.write(conn, replies)
                    if conn.fd in self.conns:
                        self.hand_off(conn)
                    return
                if self.debug:
                    log.debug("client.bound", fd=conn.fd, key=key)
                more, more_frames, key = self.protocol.feed(conn.inbuf, b"")
                replies += more
                frames += more_frames
        except ProtocolError as e:
            self.stats["protocol_errors"] += 1
            log.warning("client.protocol_error", fd=conn.fd, error=str(e))
            self.close(conn, "protocol_error")
            return
        if frames:
            self.stats["requests"] += frames
            self.write(conn, replies)
        if self.stopping and conn.idle and conn.fd in self.conns:
            self.close(conn, "stopping")

    def write(self, conn: Connection, data: bytes) -> None:
        if conn.outbuf:  # earlier replies still wait: keep the order
            conn.outbuf += data
        else:
            try:
                sent = conn.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as e:
                self.close(conn, e.strerror or "error")
                return
            if sent == len(data):
                return
            conn.outbuf += data[sent:]
            self.epoll.modify(conn.fd, IN | OUT)
        if len(conn.outbuf) > self.config.max_output_buffer:
            self.stats["overflows"] += 1
            log.warning("client.overflow", fd=conn.fd, buffered=len(conn.outbuf),
                        max_output_buffer=self.config.max_output_buffer)
            self.close(conn, "overflow")

    def flush(self, conn: Connection) -> None:
        try:
            sent = conn.sock.send(conn.outbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.close(conn, e.strerror or "error")
            return
        del conn.outbuf[:sent]
        if not conn.outbuf:
            if conn.handoff_pending:
                self.hand_off(conn)
                return
            self.epoll.modify(conn.fd, IN)
            if self.stopping and conn.idle:
                self.close(conn, "stopping")

    # --- routing and hand-off --------------------------------------------------------------

    def owner_of(self, conn: Connection, key: int) -> int | None:
        """The slot that serves this client: ours to keep it; None when we are retiring
        (the master decides)."""
        if conn.pinned or self.channel is None or not self.slots:
            return self.slot
        if self.draining:
            return None
        return owner(key, self.slots)

    def hand_off(self, conn: Connection) -> None:
        """Give the client, with every byte read but not consumed, to the master, which
        passes it to the key's owner. Replies already due go out first, so the client's
        stream stays in order; until then the client is not read."""
        assert self.channel is not None
        if conn.outbuf:
            conn.handoff_pending = True
            self.epoll.modify(conn.fd, OUT)
            return
        conn.handoff_pending = False
        # Out of epoll before the fd leaves: an in-flight copy would keep the entry alive.
        self.epoll.unregister(conn.fd)
        try:
            # The owner we computed, and with which table; retiring, we let the master say.
            self.channel.send(Kind.HANDOFF, {"key": conn.key, "sent_ns": time.monotonic_ns(),
                                             "owner": None if self.draining else conn.owner,
                                             "table": conn.table},
                              bytes(conn.inbuf), [conn.fd])
        except (ValueError, ChannelClosed) as e:
            # The send failed, so the client stays here and is served in place.
            log.error("fd.handoff_failed", fd=conn.fd, key=conn.key, error=str(e))
            self.epoll.register(conn.fd, IN)
            conn.pinned = True
            self.consume(conn, b"")
            return
        del self.conns[conn.fd]
        conn.sock.detach()  # the channel owns the fd now and closes it once it is sent
        self.stats["handoffs_out"] += 1
        if self.channel.wants_write:
            self.epoll.modify(self.channel.fileno(), IN | OUT)
        if not self.accepting:
            self.resume_accepting()

    def adopt(self, message: Message) -> None:
        """Take a client handed over by the master: its carried bytes first, then its socket."""
        meta = message.meta
        if len(message.fds) != 1 or not isinstance(meta.get("key", 0), (int, type(None))):
            close_fds(message.fds)
            log.error("channel.error", error="ADOPT without exactly one fd and a valid key")
            return
        try:
            # Family and type given: no getsockopt() calls to detect them.
            sock = socket.socket(self.family, self.kind, 0, message.fds[0])
        except OSError as e:
            close_fds(message.fds)
            log.error("channel.error", error=f"ADOPT fd unusable: {e.strerror}")
            return
        sock.setblocking(False)
        sent_ns = meta.get("sent_ns")
        latency_us = (time.monotonic_ns() - sent_ns) // 1000 if isinstance(sent_ns, int) else None
        if len(self.conns) >= self.config.max_clients:
            self.stats["refused"] += 1
            with contextlib.suppress(OSError):
                sock.send(self.protocol.refusal)
            sock.close()
            log.warning("fd.refused", key=meta.get("key"), from_slot=meta.get("from_slot"),
                        reason="max_clients", clients=len(self.conns),
                        max_clients=self.config.max_clients)
            return
        conn = Connection(sock)
        conn.key = meta.get("key")
        self.add(conn)
        if self.draining:  # it crossed our DRAIN: pass it on, bytes untouched
            conn.inbuf += message.raw
            self.hand_off(conn)
            return
        if self.debug:
            log.debug("client.bound", fd=conn.fd, key=conn.key)
        self.stats["adopted"] += 1
        log.info("fd.dispatched", key=conn.key, from_slot=meta.get("from_slot"),
                 from_pid=meta.get("from_pid"), to_slot=self.slot, to_pid=self.pid,
                 carried=len(message.raw), latency_us=latency_us)
        self.consume(conn, message.raw)

    def close(self, conn: Connection, reason: str) -> None:
        del self.conns[conn.fd]
        # Unregister first: close() alone leaves the epoll entry live while another copy
        # of the socket exists, and the master's copy of a handed-off fd can outlive this
        # whole exchange (waking us may preempt it just before it closes that copy); a
        # dead client's level-triggered HUP would then spin this loop until it does.
        self.epoll.unregister(conn.fd)
        conn.sock.close()
        if self.debug:
            log.debug("client.closed", fd=conn.fd, reason=reason, clients=len(self.conns))
        if not self.accepting:
            self.resume_accepting()

    # --- master and signals ---------------------------------------------------------------

    def on_channel(self, events: int) -> None:
        assert self.channel is not None
        try:
            if events & OUT and self.channel.flush():
                self.epoll.modify(self.channel.fileno(), IN)
            for message in self.channel.receive():
                self.on_message(message)
        except ChannelClosed:
            # The master is gone: no one would route, supervise or reap us. Leave now.
            log.warning("worker.orphaned", reason="channel closed")
            self.running = False

    def on_message(self, message: Message) -> None:
        if self.debug:
            log.debug("channel.message", kind=message.kind.name, size=len(message.raw))
        if message.kind is Kind.ADOPT:
            self.adopt(message)
        elif message.kind is Kind.ROUTES:
            self.slots = tuple(message.meta.get("slots", ()))
        elif message.kind is Kind.STOP:
            self.stop()
        elif message.kind is Kind.DRAIN:
            self.drain(tuple(message.meta.get("slots", ())))
        elif message.kind is Kind.CONFIG:
            self.apply(message.meta)
        else:
            close_fds(message.fds)
            log.warning("channel.error", error=f"unexpected {message.kind.name} from master")

    def send_stats(self) -> None:
        assert self.channel is not None
        try:
            self.channel.send(Kind.STATS, {"clients": len(self.conns), **self.stats})
        except ChannelClosed:
            log.warning("worker.orphaned", reason="channel closed")
            self.running = False
            return
        if self.channel.wants_write:
            self.epoll.modify(self.channel.fileno(), IN | OUT)

    def apply(self, settings: dict[str, Any]) -> None:
        """Take changed limits and log level from a reload."""
        self.config = self.config.replace(**settings)
        logmod.configure_from(self.config)
        self.debug = logmod.enabled("debug")
        if len(self.conns) < self.config.max_clients:
            self.resume_accepting()
        elif self.accepting:
            self.pause_accepting("max_clients")

    def on_signals(self) -> None:
        for sig in self.signals.drain():
            if sig in (signal.SIGTERM, signal.SIGINT):
                self.stop()
            elif sig == signal.SIGQUIT:
                log.info("worker.quit")
                os._exit(EXIT_OK)
            elif sig == signal.SIGHUP:
                self.reload_standalone()

    def reload_standalone(self) -> None:
        from mpd import config as configmod

        try:
            new = configmod.reload(self.config)
            logmod.configure_from(new)  # LOG-HOOK: a log file that cannot be opened: refused
        except configmod.ConfigError as e:
            log.error("config.reload_failed", error=str(e))
            return
        self.apply({k: getattr(new, k) for k in configmod.LIVE_SETTINGS})
        log.info("config.reloaded", path=new.path)

    def stop(self) -> None:
        """Graceful: no new clients; each client is closed once its replies are out."""
        if self.stopping:
            return
        self.stopping = True
        self.stop_deadline = time.monotonic() + self.config.graceful_timeout
        self.rearm()
        if self.accepting:
            self.epoll.unregister(self.listener.fileno())
            self.accepting = False
        if self.draining:
            return
        log.info("worker.stopping", clients=len(self.conns))
        for conn in list(self.conns.values()):
            if conn.idle:
                # Take what the client already sent: a frame it started is finished and
                # answered before its connection is closed.
                self.on_readable(conn)
            if conn.fd in self.conns and conn.idle:
                self.close(conn, "stopping")

    def drain(self, slots: tuple[int, ...]) -> None:
        """Retire: stop accepting and hand every client, with its unread bytes, to the owner
        of its key under the new slot table (or to any worker when it has no key)."""
        if self.draining or self.channel is None:
            return
        self.slots = slots
        log.info("worker.draining", clients=len(self.conns))
        self.draining = True
        self.stop()
        for conn in list(self.conns.values()):
            self.hand_off(conn)

    def shutdown(self) -> None:
        for conn in list(self.conns.values()):
            self.close(conn, "shutdown")
        if self.channel is not None:
            self.send_stats()
            self.channel.sock.setblocking(True)
            self.channel.sock.settimeout(1.0)  # last stats out; bounded
            with contextlib.suppress(ChannelClosed, OSError):
                self.channel.flush()
        log.info("worker.stopped", **self.stats)
        logmod.drain(LOG_DRAIN)  # LOG-HOOK: its last lines, if the sink is slow; bounded


def _peer(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"[{addr[0]}]:{addr[1]}" if ":" in str(addr[0]) else f"{addr[0]}:{addr[1]}"
    return str(addr)
