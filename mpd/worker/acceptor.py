"""The worker's accepting: taking new clients off the shared listening socket in batches,
pausing when it is full (max_clients) or out of fds or memory (a retry after a short
wait, never a spin), and following the fd limit. A client that cannot be taken yet waits
in the kernel's backlog. A pause is logged twice however often it repeats: when it
begins, and when accepting has gone on for a whole round of upkeep."""

from __future__ import annotations

import errno
import os
import select
import socket
from typing import Any, Callable

from mpd.config.schema import Config, fd_soft_limit
from mpd.logs import log as logmod
from mpd.system import tcp
from mpd.worker.clients import Clients

ACCEPT_BATCH = 32  # accepts per wake-up, so a burst spreads over the workers
ACCEPT_RETRY = 0.1  # seconds to pause accepting after EMFILE/ENFILE/ENOBUFS/ENOMEM
RECEIVE_BATCH = 64  # channel messages read at a time, when free fds allow
IN = select.EPOLLIN

log = logmod.get_logger()


class Acceptor:
    def __init__(self, config: Config, listener: socket.socket, clients: Clients):
        self.config = config
        self.listener = listener
        self.fd = listener.fileno()
        # The listener's family and type as ints: the properties convert to enums per call.
        self.family, self.kind = int(listener.family), int(listener.type)
        self.clients = clients
        self.epoll: Any = None
        self.accepting = False
        self.listening = True  # our copy of the listening socket is open and listens
        self.allowed = True  # False: this slot does not accept (MPD_TEST_ACCEPT_SLOTS)
        self.retry_at = 0.0  # when to try accepting again after a shortage (0: no wait)
        self.fd_limit = fd_soft_limit()
        self.fds_base = 0  # fds held besides clients: counted at boot
        self.max_clients = config.clients_per_worker()
        self.pause_reason = ""  # why accepting stopped, while a pause lasts ("": none)
        self.paused_since = 0.0
        self.last_pause = 0.0  # when accepting last stopped (a pause's retries included)
        self.pauses = 0  # times accepting stopped since the pause began
        self.on_full: Any = None  # called when a pause for max_clients begins (heartbeat)
        self.wake: Callable[[float], None] = lambda _when: None  # the loop's timer: a retry

    def boot(self, epoll: Any) -> None:
        self.epoll = epoll
        self.fds_base = len(os.listdir("/proc/self/fd")) - 1  # the listing's own fd
        self.set_limits(fd_soft_limit())

    def full(self) -> bool:
        return len(self.clients.conns) >= self.max_clients

    # --- accepting ----------------------------------------------------------------------

    def accept(self, now: float) -> None:
        if not self.accepting:  # an event of this turn, from before we stopped
            return
        conns = self.clients.conns
        raw_accept = self.listener._accept  # (fd, address): accept() without its enums
        family, kind, max_clients = self.family, self.kind, self.max_clients
        for _ in range(ACCEPT_BATCH):
            if len(conns) >= max_clients:
                self.pause("max_clients", now)
                return
            try:
                fd, addr = raw_accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client gave up while queued
            except OSError as e:
                if e.errno in tcp.SHORTAGE:  # out of fds or memory: back off, no spin
                    self.pause(errno.errorcode[e.errno], now, retry=True)
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
            self.clients.accepted(sock, addr)

    def resume(self) -> None:
        """Accept again if nothing stands in the way (called whenever a client leaves)."""
        if self.accepting or self.clients.stopping or self.retry_at or not self.listening \
                or not self.allowed:
            return
        if len(self.clients.conns) >= self.max_clients:
            return
        # EPOLLEXCLUSIVE: a new client wakes one worker, not all (no thundering herd).
        self.epoll.register(self.fd, IN | select.EPOLLEXCLUSIVE)
        self.accepting = True

    def pause(self, reason: str, now: float, retry: bool = False) -> None:
        if self.accepting:
            self.epoll.unregister(self.fd)
            self.accepting = False
            if reason == "max_clients" and self.on_full is not None:
                self.on_full()  # tell the master now: it may auto-scale
        if retry:
            self.retry_at = now + ACCEPT_RETRY
            self.wake(self.retry_at)
        self.note_pause(reason, now)

    def retry(self, now: float) -> None:
        """The wait after a shortage is over."""
        if self.retry_at and now >= self.retry_at:
            self.retry_at = 0.0
            self.resume()

    def stop_listening(self) -> None:
        """Close our copy of the listening socket: once every process has, new clients are
        refused (in single-process mode ours is the only one)."""
        if self.accepting:
            self.epoll.unregister(self.fd)
            self.accepting = False
        self.listening = False
        self.listener.close()

    # --- the fd limit ----------------------------------------------------------------------

    def set_limits(self, fd_limit: int) -> None:
        """max_clients under this fd limit; accept or not to match."""
        self.fd_limit = fd_limit
        self.max_clients = self.config.clients_per_worker(fd_limit)
        if len(self.clients.conns) < self.max_clients:
            self.resume()
        elif self.accepting:
            self.pause("max_clients", self.clients.now)

    def refresh_limits(self) -> None:
        """Follow the fd limit when it changes under us (prlimit), within a second."""
        fd_limit = fd_soft_limit()
        if fd_limit != self.fd_limit:
            self.set_limits(fd_limit)
            log.warning("worker.fd_limit", fd_limit=fd_limit, max_clients=self.max_clients,
                        clients=len(self.clients.conns))

    def receive_room(self, queued: int) -> int:
        """How many channel messages to read now: each may carry a client's fd (its fd
        headroom is small under a low fd limit). At least one, or the channel (its STOP
        too) would stall."""
        free = self.fd_limit - self.fds_base - len(self.clients.conns) - queued
        return max(1, min(RECEIVE_BATCH, free - 1))

    # --- pauses: two lines each, however often they repeat --------------------------------

    def note_pause(self, reason: str, now: float) -> None:
        self.pauses += 1
        self.last_pause = now
        if self.pause_reason:
            return
        self.pause_reason, self.paused_since = reason, now
        log.warning("worker.accept_paused", reason=reason, clients=len(self.clients.conns),
                    max_clients=self.max_clients)

    def each_round(self, now: float, round_seconds: float) -> None:
        """Once a round: follow the fd limit; a pause is over only when accepting went on
        for a whole round (a retry after EMFILE turns accepting on in this very turn,
        before any accept() could fail again)."""
        self.refresh_limits()
        self.resume()  # a place that a hand-off freed (clients.forget)
        if self.pause_reason and self.accepting and now - self.last_pause >= round_seconds:
            log.info("worker.accept_resumed", reason=self.pause_reason, pauses=self.pauses,
                     paused_for=round(now - self.paused_since, 3),
                     clients=len(self.clients.conns))
            self.pause_reason, self.pauses = "", 0
