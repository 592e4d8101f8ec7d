"""A key group moving between workers, the workers' side (the master's is
master/moves.py). The master orders it (MOVE_OUT) when a key's owner changes: a scale,
an upgrade's roll, `mpdctl move` or `mpdctl drain`.

The old owner, at a frame boundary (between two reads: everything read was given to the
protocols, whose partial frames are in their state):
1. freezes the group: its members are neither read nor written, its timers parked;
2. exports the group's state and each member's, checks their size
   (workers.max_group_state), and sends the transfer (wire/transfer.py: every member's
   unread bytes, pending output and state) with copies of the members' fds, in chunks
   through the master;
3. keeps the group, frozen, until the master says how it ended: MOVE_DONE (the new
   owner serves it: close our copies, forget it, silently) or MOVE_ABORT (serve it on,
   as if nothing happened: nothing of it was read or written meanwhile).
The new owner takes the chunks, and once all have come restores the group (the group
factory, then each member's protocol object with its state, then the group's state)
before it reads a byte of any member; it sends MOVED, and starts reading them once that
message has left its channel, so that a new owner that dies before the master knows
has read nothing the old owner would miss."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from mpd.apps import state as statecodec
from mpd.apps.interface import Application, Group
from mpd.config.schema import Config
from mpd.logs import log as logmod
from mpd.system import testhooks as hooks
from mpd.wire.channel import ChannelClosed, close_fds
from mpd.wire.messages import (
    MoveAbort,
    MoveChunk,
    Moved,
    MoveDone,
    MoveFailed,
    MoveOut,
    key_from_json,
)
from mpd.wire.routing import key_hash, show
from mpd.wire.transfer import Member, Transfer, chunks
from mpd.worker.clients import Clients
from mpd.worker.connection import CLOSED_PHASE, FROZEN, Connection

NONBLOCK = int(socket.SOCK_NONBLOCK)
INF = float("inf")

log = logmod.get_logger()


@dataclass
class Outgoing:
    """A group frozen here while its transfer is on its way."""
    group: Group
    members: list[Connection]
    size: int


@dataclass
class Incoming:
    """A transfer arriving, chunk by chunk."""
    total: int
    data: bytearray = field(default_factory=bytearray)
    fds: list[int] = field(default_factory=list)
    seq: int = 0


class Moves:
    def __init__(self, config: Config, app: Application, clients: Clients, groups: Any,
                 timers: Any, link: Any, stats: dict[str, int], family: int, kind: int):
        self.config = config
        self.app = app
        self.clients = clients
        self.groups = groups
        self.timers = timers
        self.link = link
        self.stats = stats
        self.family, self.kind = family, kind
        self.outgoing: dict[int, Outgoing] = {}
        self.incoming: dict[int, Incoming] = {}
        self.unsent: list[list[Connection]] = []  # restored; reading waits for MOVED to go

    @property
    def busy(self) -> bool:
        """A move is under way: a retiring worker stays until it ends."""
        return bool(self.outgoing or self.incoming)

    def deadline(self) -> float:
        return INF  # the master times moves out and says so (MOVE_ABORT)

    def tick(self, _now: float) -> None:
        pass

    # --- the old owner ----------------------------------------------------------------

    def move_out(self, order: MoveOut) -> None:
        try:
            key = key_from_json(order.key)
        except ValueError as e:
            self.refuse(order.move, str(e))
            return
        group = self.groups.groups.get(key)
        if group is None or key in self.groups.moving:
            self.refuse(order.move, f"no group of key {show(key)!r} here")
            return
        frozen_ns = time.monotonic_ns()
        self.groups.moving.add(key)
        members = list(group._members)
        for conn in members:
            self.clients.freeze(conn)
        try:
            transfer = self.export(group, members, frozen_ns)
        except Exception as e:  # noqa: BLE001 - the application's bug: the group stays here
            self.thaw(group, members)
            self.refuse(order.move, f"export_state raised {e!r}")
            self.groups.fail(group, "export_state", e)
            return
        state_bytes = len(transfer.state) + sum(len(m.state) for m in transfer.members)
        if state_bytes > self.config.max_group_state:
            self.thaw(group, members)
            self.refuse(order.move, f"the state of key {show(key)!r} is {state_bytes} bytes, "
                        f"over workers.max_group_state ({self.config.max_group_state})")
            return
        hooks.move_hold("export")  # MPD_TEST_MOVE_HOLD_FILE (tests only)
        data = transfer.pack()
        if not self.send(order.move, data, members):
            self.thaw(group, members)
            return
        self.outgoing[order.move] = Outgoing(group, members, len(data))

    def export(self, group: Group, members: list[Connection], frozen_ns: int) -> Transfer:
        transfer = Transfer(group.key, group._gseq, self.app.state_version, frozen_ns,
                            statecodec.dumps(group.export_state()))
        for conn in members:
            protocol = conn.protocol
            transfer.members.append(Member(
                conn.peer, conn.inq, b"".join(bytes(b) for b in conn.outq),
                statecodec.dumps(protocol.export_state()) if protocol is not None else b"",
                conn.eof, conn.paused, conn.closing))
        return transfer

    def send(self, move: int, data: bytes, members: list[Connection]) -> bool:
        """The transfer in chunks, with copies of the members' fds (ours stay open until
        the master says how the move ended)."""
        pieces = chunks(data, [conn.fd for conn in members])
        try:
            for seq, (piece, fds) in enumerate(pieces):
                copies = [os.dup(fd) for fd in fds]
                try:
                    self.link.send(MoveChunk(move, seq, seq == len(pieces) - 1, len(data),
                                             piece), copies)
                except (ValueError, ChannelClosed):
                    close_fds(copies)  # still ours: the channel did not take them
                    raise
        except (OSError, ValueError, ChannelClosed) as e:
            log.error("group.move_failed", move=move, error=str(e))
            self.refuse(move, f"cannot send the group: {e}")
            return False
        self.link.watch()
        return True

    def thaw(self, group: Group, members: list[Connection]) -> None:
        self.groups.moving.discard(group.key)
        for conn in members:
            self.clients.thaw(conn)
        self.timers.unpark(group)
        for conn in members:
            self.clients.feed_held(conn)

    def done(self, order: MoveDone) -> None:
        """The new owner serves the group: our copies go, without a word to the
        application (its connections live on elsewhere)."""
        out = self.outgoing.pop(order.move, None)
        if out is None:
            return
        group = out.group
        self.groups.moving.discard(group.key)
        if self.groups.groups.get(group.key) is group:
            del self.groups.groups[group.key]
        self.timers.cancel_all(group)
        for conn in out.members:
            self.timers.cancel_all(conn)
            conn.sock.close()
        self.stats["groups_moved_out"] += 1
        self.clients.acceptor.resume()

    def abort(self, order: MoveAbort) -> None:
        out = self.outgoing.pop(order.move, None)
        if out is not None:
            log.warning("group.move_aborted", key=show(out.group.key), move=order.move,
                        members=len(out.members))
            self.thaw(out.group, out.members)
            return
        arriving = self.incoming.pop(order.move, None)
        if arriving is not None:
            close_fds(arriving.fds)

    def refuse(self, move: int, reason: str) -> None:
        self.stats["moves_failed"] += 1
        log.error("group.move_failed", move=move, error=reason)
        try:
            self.link.send(MoveFailed(move=move, reason=reason))
            self.link.watch()
        except (ChannelClosed, ValueError):
            pass

    # --- the new owner ----------------------------------------------------------------

    def chunk(self, message: MoveChunk) -> None:
        arriving = self.incoming.get(message.move)
        if arriving is None:
            if message.seq != 0:
                return  # the rest of a move already given up: its fds are closed for us
            limit = self.config.max_group_state + (self.config.max_output_buffer + 65536) * 4096
            if message.total > limit:
                self.refuse(message.move, f"a transfer of {message.total} bytes, over "
                            f"{limit}")
                return
            arriving = self.incoming[message.move] = Incoming(message.total)
        arriving.fds += message.fds
        message.fds = []
        if message.seq != arriving.seq or len(arriving.data) + len(message.payload) > \
                arriving.total:
            self.incoming.pop(message.move)
            close_fds(arriving.fds)
            self.refuse(message.move, f"chunk {message.seq} out of order or past the size")
            return
        arriving.seq += 1
        arriving.data += message.payload
        if message.last:
            del self.incoming[message.move]
            hooks.move_hold("restore")  # MPD_TEST_MOVE_HOLD_FILE (tests only)
            self.restore(message.move, arriving)

    def restore(self, move: int, arriving: Incoming) -> None:
        try:
            transfer = Transfer.unpack(bytes(arriving.data))
            if len(transfer.members) != len(arriving.fds):
                raise ValueError(f"{len(transfer.members)} members and "
                                 f"{len(arriving.fds)} fds")
            if transfer.state_version not in self.app.reads_state:
                raise ValueError(f"state version {transfer.state_version}, this code "
                                 f"reads {list(self.app.reads_state)}")
        except ValueError as e:
            close_fds(arriving.fds)
            self.refuse(move, f"cannot restore the group: {e}")
            return
        try:
            group = self.groups.create(transfer.key)
        except Exception as e:  # noqa: BLE001
            close_fds(arriving.fds)
            self.refuse(move, f"the group factory raised {e!r}")
            return
        group._gseq = transfer.gseq
        members = [self.member(group, m, fd) for m, fd in zip(transfer.members, arriving.fds)]
        members = [conn for conn in members if conn is not None]
        try:
            group.state_restored(statecodec.loads(transfer.state))
        except Exception as e:  # noqa: BLE001
            self.groups.fail(group, "state_restored", e)
        self.stats["groups_moved_in"] += 1
        pause_ms = round((time.monotonic_ns() - transfer.frozen_ns) / 1e6, 3)
        log.info("group.moved", key=show(group.key), move=move, members=len(members),
                 bytes=len(arriving.data), pause_ms=pause_ms)
        with contextlib.suppress(ChannelClosed, ValueError):
            self.link.send(Moved(move=move, members=len(members), size=len(arriving.data),
                                 pause_us=int(pause_ms * 1000)))
        self.link.watch()
        if self.link.wants_write:
            self.unsent.append(members)  # read once MOVED has left (link_flushed)
        else:
            self.resume(members)

    def member(self, group: Group, m: Member, fd: int) -> Connection | None:
        """One member restored: its socket, its held input and queued output, its protocol
        object with its state. Not read yet."""
        try:
            sock = socket.socket(self.family, self.kind | NONBLOCK, 0, fd)
        except OSError:
            close_fds([fd])
            return None
        # Frozen from the start: out of the table and epoll (thaw() puts it in, one
        # register and one modify) until the master knows it is here.
        conn = Connection(sock, self.clients, self.clients.now)
        conn.seen, conn.phase = self.clients.now, FROZEN
        conn.key, conn.key_hash, conn.peer = group.key, key_hash(group.key), m.peer
        conn.inq, conn.held = m.unread, bool(m.unread)
        conn.eof, conn.paused, conn.closing = m.eof, m.paused, m.closing
        if m.output:
            conn.outq, conn.outbytes = [m.output], len(m.output)
        protocol = conn.protocol = self.app.protocol()
        protocol.transport = conn
        self.groups.attach(conn, group)
        try:
            protocol.state_restored(statecodec.loads(m.state))
        except Exception as e:  # noqa: BLE001
            self.clients.thaw(conn)
            self.clients.app_failed(conn, "state_restored", e)
            return None
        conn.held = bool(protocol.pending) or bool(conn.inq)
        return conn

    def resume(self, members: list[Connection]) -> None:
        for conn in members:
            if conn.phase != CLOSED_PHASE:  # closed meanwhile (its group failed)
                self.clients.thaw(conn)
        for conn in members:
            self.clients.feed_held(conn)

    def link_flushed(self) -> None:
        while self.unsent:
            self.resume(self.unsent.pop(0))

    def close(self) -> None:
        """The worker exits: whatever is frozen or arriving is let go (the master has its
        own copies; a frozen group whose move did not end dies with us, as on a crash)."""
        for out in self.outgoing.values():
            for conn in out.members:
                conn.sock.close()
        for arriving in self.incoming.values():
            close_fds(arriving.fds)
        self.outgoing.clear()
        self.incoming.clear()

