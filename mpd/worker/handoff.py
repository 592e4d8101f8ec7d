"""The worker's side of moving one client between workers: where a client that joins a
key belongs, giving it away (HANDOFF to the master, with every byte mpd holds for it and
its protocol object's exported state) and adopting one the master hands over (ADOPT).
The master's side is master/broker.py; a whole group's move is moves.py.

Where a joining client belongs:
- in single-process mode, and for a client pinned here by a failed hand-off: here;
- an application with groups: in its group's worker. If the group is here (and not
  moving), the client joins it at once; otherwise the master decides, because only the
  master knows where every group is: the client is handed over with no owner named;
- an application without groups (ping): its key's owner by the slot table, as computed
  here with the routes of the latest epoch (the master takes that answer for the same
  epoch)."""

from __future__ import annotations

import contextlib
import socket
import time
from typing import Any

from mpd.apps import state as statecodec
from mpd.apps.interface import ERROR, Application
from mpd.logs import log as logmod
from mpd.wire.channel import ChannelClosed, close_fds
from mpd.wire.messages import Client, Kind
from mpd.wire.peer import format_peer
from mpd.wire.routing import Routes, key_hash, normalize, show
from mpd.worker.clients import Clients
from mpd.worker.connection import LEAVING, SERVING, Connection

NONBLOCK = int(socket.SOCK_NONBLOCK)

log = logmod.get_logger()


class HandOff:
    def __init__(self, app: Application, clients: Clients, link: Any, stats: dict[str, int],
                 slot: int | None, routes: Routes, family: int, kind: int):
        self.app = app
        self.clients = clients
        self.link = link
        self.stats = stats
        self.slot = slot  # None in single-process mode: every key is ours
        self.routes = routes  # the master's ROUTES update them
        self.family, self.kind = family, kind  # the listener's: an adopted fd is one of its
        self.retiring = False  # every client goes: the master decides where
        # The owner join() found for the client it sent away, with the routes it used:
        # give() takes it, when nothing changed meanwhile, instead of ranking again.
        self.found: tuple[Connection, Routes, int | None] | None = None
        self.groups: Any = None  # worker/groups.py (the worker sets it)
        self.acceptor: Any = None

    # --- a client joins a key ----------------------------------------------------------

    def join(self, conn: Connection, key: Any, rest: bytes) -> None:
        """transport.join(): bind the connection to `key`, here or on the key's worker. In
        an application with groups a connection joins one key; without groups a key only
        routes, and a new one routes the connection again (ping's C frames)."""
        if conn.key is not None and self.app.group is not None:
            raise RuntimeError(f"this connection joined {show(conn.key)!r} already")
        conn.key = normalize(key)
        conn.key_hash = key_hash(conn.key)
        conn.inq = bytes(rest) + conn.inq
        conn.held = bool(conn.inq)
        if self.slot is None or conn.pinned:
            self.bind_here(conn)
        elif self.app.group is not None:
            group = self.groups.local(conn.key)
            if group is not None and not self.retiring:
                self.groups.add(conn, group)
            else:
                conn.phase = LEAVING  # the master knows where its group is
        elif self.retiring:
            conn.phase = LEAVING
        else:
            owner = self.routes.owner(conn.key_hash)
            if owner == self.slot:
                self.bind_here(conn)
            else:
                conn.phase = LEAVING
                self.found = (conn, self.routes, owner)

    def bind_here(self, conn: Connection) -> None:
        if self.app.group is not None:
            self.groups.add(conn, self.groups.local(conn.key) or self.groups.create(conn.key))
        elif self.clients.debug:
            log.debug("client.bound", fd=conn.fd, key=show(conn.key),
                      client=format_peer(conn.peer))

    # --- giving a client away ------------------------------------------------------------

    def give(self, conn: Connection) -> None:
        """Hand the client over to the master, once the output already due to it is
        written (its stream stays in order; until then it is not read)."""
        if conn.phase != LEAVING or conn.outq:
            self.clients.watch(conn)
            return
        try:
            state = statecodec.dumps(conn.protocol.export_state()) if conn.protocol else b""
        except Exception as e:  # noqa: BLE001 - the application's bug ends this client
            self.clients.app_failed(conn, "export_state", e)
            return
        owner, found, self.found = None, self.found, None
        if self.app.group is None and not self.retiring and conn.key is not None:
            if found is not None and found[0] is conn and found[1] is self.routes:
                owner = found[2]
            else:
                owner = self.routes.owner(conn.key_hash)
        message = Client(Kind.HANDOFF, conn.key, conn.key_hash, conn.inq, state, conn.peer,
                         time.monotonic_ns(), owner, self.routes.epoch)
        self.clients.forget(conn)  # out of epoll first: an in-flight copy keeps it alive
        try:
            self.link.send(message, [conn.fd])
        except (ValueError, ChannelClosed) as e:
            self.failed(conn, str(e))
            return
        conn.sock.detach()  # the channel owns the fd now and closes it once it is sent
        conn.phase = LEAVING
        self.stats["handoffs_out"] += 1
        self.link.watch()
        # Full, we do not refill this place from the backlog at once: if the key's owner is
        # full too, the master gives the client back to us (issue 20). A close, or the next
        # round of upkeep, resumes accepting.

    def failed(self, conn: Connection, error: str) -> None:
        """The hand-off could not be sent: without groups, the client is served here
        whatever its key (pinned); with groups it cannot be (its group may live
        elsewhere), so it is closed."""
        log.error("fd.handoff_failed", fd=conn.fd, key=show(conn.key), error=error)
        self.clients.conns[conn.fd] = conn
        self.clients.epoll.register(conn.fd, 0)
        conn.mask = 0
        if self.app.group is not None or conn.protocol is None and self.app.stateless is None:
            self.clients.close(conn, ERROR)
            return
        conn.phase, conn.pinned = SERVING, True
        self.clients.watch(conn)
        self.bind_here(conn)
        self.clients.feed_held(conn)

    # --- adopting one ---------------------------------------------------------------------

    def adopt(self, message: Client) -> None:
        """Take a client the master hands over: its socket, its protocol object restored
        from its state, its key (its group joined), then the bytes it carried. Full, a
        client of a key with no group here is passed on to the next slot of its key's
        ranking, or refused as the last."""
        if len(message.fds) != 1:
            close_fds(message.fds)
            log.error("channel.error", kind="ADOPT", error="without exactly one fd")
            return
        if self.retiring:  # it crossed our RETIRE: back to the master, untouched
            self.pass_on(message, count=False)
            return
        fd = message.fds.pop()  # ours from here on
        grouped = self.app.group is not None and self.groups.local(message.key) is not None
        if self.acceptor.full() and not grouped:
            message.fds = [fd]
            if message.last or message.key is None or not self.pass_on(message):
                self.refuse(message)
            return
        try:
            # Family and type given: no getsockopt() calls to detect them; SOCK_NONBLOCK
            # without setblocking()'s ioctl (the file is O_NONBLOCK already: its accept()).
            sock = socket.socket(self.family, self.kind | NONBLOCK, 0, fd)
        except OSError as e:
            close_fds([fd])
            log.error("channel.error", kind="ADOPT", error=f"fd unusable: {e.strerror}")
            return
        conn = self.clients.adopted(sock)
        conn.peer, conn.gseq = message.peer, message.gseq
        conn.key, conn.key_hash, conn.inq = message.key, message.key_hash, message.unread
        if not self.restore(conn, message.state):
            return
        self.stats["adopted"] += 1
        self.observe(message, conn)
        if conn.key is not None:
            self.bind_here(conn)
        self.clients.feed_held(conn)

    def restore(self, conn: Connection, state: bytes) -> bool:
        """The protocol object of an adopted client: a fresh one, its transport set, its
        state restored (instead of connection_made)."""
        if not state and self.app.stateless is not None:
            return True  # made at its first read, as a new client's would be
        protocol = conn.protocol = self.app.protocol()
        protocol.transport = conn
        try:
            protocol.state_restored(statecodec.loads(state))
        except Exception as e:  # noqa: BLE001
            self.clients.app_failed(conn, "state_restored", e)
            return False
        conn.held = bool(protocol.pending) or bool(conn.inq)
        return True

    def observe(self, message: Client, conn: Connection) -> None:
        """The hand-off's latency (the heartbeat carries the histogram); a line at debug."""
        latency_us = (time.monotonic_ns() - message.sent_ns) // 1000 if message.sent_ns else None
        if latency_us is not None:
            self.link.latency.observe(latency_us)
        if self.clients.debug:
            log.debug("fd.dispatched", key=show(conn.key), from_slot=message.from_slot,
                      from_pid=message.from_pid, to_slot=self.slot,
                      to_pid=self.clients.extra["pid"], carried=len(message.unread),
                      latency_us=latency_us, client=format_peer(conn.peer))

    def pass_on(self, message: Client, count: bool = True) -> bool:
        """Give an offered client back to the master: full, for the next slot in its key's
        ranking; retiring, for wherever it belongs now. False when the channel fails."""
        passed = Client(Kind.HANDOFF, message.key, message.key_hash, message.unread,
                        message.state, message.peer, message.sent_ns,
                        None if self.retiring else message.owner, message.epoch,
                        message.rank + 1 if count else 0, passed_on=count)
        try:
            self.link.send(passed, message.fds)
        except (ValueError, ChannelClosed):
            return False
        message.fds = []
        self.link.watch()
        if count:
            self.stats["spilled"] += 1
            log.info("fd.spilled", key=show(message.key), rank=message.rank,
                     clients=len(self.clients.conns), max_clients=self.acceptor.max_clients)
        return True

    def refuse(self, message: Client) -> None:
        """Every slot is full: the client gets the application's refusal and is closed."""
        self.stats["refused"] += 1
        fds, message.fds = message.fds, []
        for fd in fds:
            try:
                sock = socket.socket(self.family, self.kind | NONBLOCK, 0, fd)
            except OSError:
                close_fds([fd])
                continue
            with contextlib.suppress(OSError):
                sock.send(self.app.refusal)
            sock.close()
        log.warning("fd.refused", key=show(message.key), from_slot=message.from_slot,
                    reason="max_clients", clients=len(self.clients.conns),
                    max_clients=self.acceptor.max_clients)
