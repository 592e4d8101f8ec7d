"""The worker's side of a hand-off: which slot owns a client's key, giving a client away
(HANDOFF, with every byte read but not consumed) when another slot owns it, and adopting
one that the master hands over (ADOPT). The master's side is broker.py.

Handover is a part of the Worker class (worker.py), kept in a file of its own so that the
hand-off reads in one place; it works on the worker's connections, epoll and link."""

from __future__ import annotations

import contextlib
import select
import socket
import time
from typing import Any, Callable

from mpd.apps import ClientProtocol
from mpd.config.schema import Config
from mpd.logs import log as logmod
from mpd.wire.channel import ChannelClosed, Message, close_fds
from mpd.wire.routing import owner
from mpd.worker.connection import PINNED, WAITING, Connection
from mpd.worker.link import Link
from mpd.worker.proxygate import format_peer

IN, OUT = select.EPOLLIN, select.EPOLLOUT
NONBLOCK = int(socket.SOCK_NONBLOCK)

log = logmod.get_logger()


class Handover:
    # The worker's state it works on (worker.py sets it up).
    config: Config
    protocol: ClientProtocol
    conns: dict[int, Connection]
    newcomers: dict[int, Connection]
    now: float
    epoll: select.epoll
    link: Link
    slot: int | None
    slots: tuple[int, ...]  # the slot table (ROUTES updates it); empty: every key is ours
    family: int
    kind: int
    pid: int
    draining: bool
    accepting: bool
    debug: bool
    stats: dict[str, int]
    max_clients: int
    consume: Callable[[Connection, bytes], None]
    add: Callable[[Connection], None]
    resume_accepting: Callable[[], None]
    watch_link: Callable[[], None]

    def owner_of(self, conn: Connection, key: int) -> int | None:
        """The slot that serves this client: ours to keep it (always, with no slot table:
        single-process mode); None when we are retiring (the master decides)."""
        if conn.handoff == PINNED or not self.slots:
            return self.slot
        if self.draining:
            return None
        return owner(key, self.slots)

    def hand_off(self, conn: Connection) -> None:
        """Give the client, with every byte read but not consumed, to the master, which
        passes it to the key's owner. Replies already due go out first, so the client's
        stream stays in order; until then the client is not read (WAITING)."""
        if conn.outbuf:
            conn.handoff = WAITING
            self.epoll.modify(conn.fd, OUT)
            return
        # Out of epoll before the fd leaves: an in-flight copy would keep the entry alive.
        self.epoll.unregister(conn.fd)
        try:
            # The owner we computed, and with which table; retiring, we let the master say.
            self.link.hand_off({"key": conn.key, "sent_ns": time.monotonic_ns(),
                                "owner": None if self.draining else conn.owner,
                                "table": conn.table, "peer": conn.client},
                               bytes(conn.inbuf), conn.fd)
        except (ValueError, ChannelClosed) as e:
            # The send failed, so the client stays here and is served in place.
            log.error("fd.handoff_failed", fd=conn.fd, key=conn.key, error=str(e))
            self.epoll.register(conn.fd, IN)
            conn.handoff = PINNED
            self.consume(conn, b"")
            return
        del self.conns[conn.fd]
        self.newcomers.pop(conn.fd, None)
        conn.sock.detach()  # the channel owns the fd now and closes it once it is sent
        self.stats["handoffs_out"] += 1
        self.watch_link()
        # Full, we do not refill this place from the backlog at once: if the key's owner is
        # full too, the master gives the client back to us (issue 20). A close, or the next
        # round of upkeep, resumes accepting.

    def adopt(self, message: Message) -> None:
        """Take a client handed over by the master: its carried bytes first, then its socket.
        Full, we pass it on to the next slot in its key's ranking, or refuse it as the last."""
        meta = message.meta
        if len(message.fds) != 1 or not isinstance(meta.get("key", 0), (int, type(None))):
            close_fds(message.fds)
            log.error("channel.error", kind="ADOPT", error="without exactly one fd and a valid key")
            return
        fd = message.fds.pop()  # ours from here on
        if len(self.conns) >= self.max_clients and not self.draining:
            if not self.pass_on(fd, message.raw, meta):
                self.refuse(fd, meta)
            return
        try:
            # Family and type given: no getsockopt() calls to detect them. SOCK_NONBLOCK
            # makes the object non-blocking without the ioctl of setblocking(): the file
            # is O_NONBLOCK already, a flag of the open file that the fd shares with the
            # sender's (its accept() set it), so a hand-off costs one system call fewer.
            sock = socket.socket(self.family, self.kind | NONBLOCK, 0, fd)
        except OSError as e:
            close_fds([fd])
            log.error("channel.error", kind="ADOPT", error=f"fd unusable: {e.strerror}")
            return
        conn = Connection(sock, self.now)
        conn.seen = self.now  # it sent its key frame
        conn.key = meta.get("key")
        conn.client = meta.get("peer")
        self.add(conn)
        if self.draining:  # it crossed our DRAIN: pass it on, bytes untouched
            conn.inbuf += message.raw
            self.hand_off(conn)
            return
        self.stats["adopted"] += 1
        sent_ns = meta.get("sent_ns")
        latency_us = (time.monotonic_ns() - sent_ns) // 1000 if sent_ns else None
        if latency_us is not None:
            self.link.latency.observe(latency_us)  # the heartbeat carries it (latency.py)
        if self.debug:  # per hand-off lines are for debugging; mpd.stats sums them up
            client = format_peer(conn.client)
            log.debug("client.bound", fd=conn.fd, key=conn.key, client=client)
            log.debug("fd.dispatched", key=conn.key, from_slot=meta.get("from_slot"),
                      from_pid=meta.get("from_pid"), to_slot=self.slot, to_pid=self.pid,
                      carried=len(message.raw), latency_us=latency_us, client=client)
        self.consume(conn, message.raw)

    def pass_on(self, fd: int, raw: bytes, meta: dict[str, Any]) -> bool:
        """We are full: give the client back to the master, for the next slot in its key's
        ranking (the broker's). False when we are the last that could take it, when it has
        no key (a retiring worker's keyless client went to the least busy worker already),
        or when the channel fails: then it is refused."""
        if meta.get("last") or meta.get("key") is None:
            return False
        rank = meta.get("rank") or 0
        try:
            self.link.hand_off({"key": meta["key"], "sent_ns": meta.get("sent_ns"),
                                "owner": meta.get("owner"), "table": meta.get("table"),
                                "rank": rank + 1}, raw, fd)
        except (ValueError, ChannelClosed):
            return False
        self.stats["spilled"] += 1
        self.watch_link()
        log.info("fd.spilled", key=meta["key"], rank=rank, clients=len(self.conns),
                 max_clients=self.max_clients)
        return True

    def refuse(self, fd: int, meta: dict[str, Any]) -> None:
        """Every slot is full: the client gets the protocol's refusal and is closed."""
        self.stats["refused"] += 1
        try:
            sock = socket.socket(self.family, self.kind, 0, fd)
        except OSError:
            close_fds([fd])
        else:
            with contextlib.suppress(OSError):
                sock.setblocking(False)
                sock.send(self.protocol.refusal)
            sock.close()
        log.warning("fd.refused", key=meta.get("key"), from_slot=meta.get("from_slot"),
                    reason="max_clients", clients=len(self.conns),
                    max_clients=self.max_clients)
