"""The worker's client table: every connection it serves, the one way a connection comes
(made(): accepted, or adopted from another worker) and the one way it goes (close()),
and serving it outside the loop's inline path: reading, giving bytes to its protocol
object inside a boundary, EOF and half-close, the output queue and its bound, closing.

Output is never written where it is produced: write() queues a reference to the buffer
and marks the connection dirty, a group's broadcast appends one shared buffer to each
member's queue and marks the group, and flush_dirty() sends each queue with one sendmsg
at the end of the loop's turn: a broadcast to a hundred members is a hundred list appends,
and a hundred system calls per turn however many lines it carried. A member that cannot
take more is written on EPOLLOUT, and past workers.max_output_buffer it is reset.

The worker's other parts are reached through attributes the worker sets (groups, handoff,
acceptor, timers, proxy)."""

from __future__ import annotations

import contextlib
import select
import socket
import struct
from typing import Any

from mpd.apps.interface import (
    EOF,
    ERROR,
    OVERFLOW,
    PROTOCOL_ERROR,
    RESET,
    STOP,
    Application,
    ProtocolError,
)
from mpd.logs import log as logmod
from mpd.wire.peer import format_peer
from mpd.wire.routing import show
from mpd.worker.connection import CLOSED_PHASE, FROZEN, HEADER, LEAVING, SERVING, Connection

RECV_SIZE = 65536  # bytes read at a time
IOV_MAX = 1024  # buffers one sendmsg() may take
IN, OUT = select.EPOLLIN, select.EPOLLOUT
GONE = select.EPOLLHUP | select.EPOLLERR
RESET_ON_CLOSE = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset

log = logmod.get_logger()


class Clients:
    def __init__(self, app: Application, max_output: int, stats: dict[str, int],
                 extra: dict[str, Any]):
        self.app = app
        self.max_output = max_output  # workers.max_output_buffer
        self.stats = stats
        self.extra = extra  # get_extra_info()'s worker-wide answers: slot, pid
        self.conns: dict[int, Connection] = {}
        self.dirty: list[Connection] = []  # output queued this turn
        self.dirty_groups: list[Any] = []  # groups that broadcast this turn (groups.py)
        self.newcomers: dict[int, Connection] = {}  # no frame from them yet (timeouts.py)
        self.lazy = app.stateless is not None  # protocol objects made at the first read
        self.now = 0.0  # the loop's clock, read once a turn
        self.stopping = False  # graceful stop: each client closes once it is idle
        self.keep_members = False  # retiring: a group's members wait for its move instead
        self.debug = logmod.enabled("debug")
        self.epoll: Any = None  # the worker's, from boot on
        # The worker's other parts (worker.py sets them).
        self.groups: Any = None
        self.handoff: Any = None
        self.acceptor: Any = None
        self.timers: Any = None
        self.proxy: Any = None

    # --- a connection comes --------------------------------------------------------------

    def accepted(self, sock: socket.socket, peer: Any) -> None:
        """A client the acceptor took: served from now (its protocol object made now, or
        at its first read for an application with a stateless offer), or first its PROXY
        header read (server.proxy_protocol; one from an untrusted address is closed)."""
        conn = Connection(sock, self, self.now)
        if self.proxy is not None and not self.proxy.expect_header(conn, peer):
            return
        fd = conn.fd
        self.epoll.register(fd, IN)
        conn.mask = IN
        self.conns[fd] = conn
        self.newcomers[fd] = conn
        self.stats["accepted"] += 1
        if self.debug:
            log.debug("client.accepted", fd=fd, peer=format_peer(peer), clients=len(self.conns))
        if not self.lazy and conn.phase == SERVING:
            self.made(conn)

    def adopted(self, sock: socket.socket) -> Connection:
        """A client another worker handed over: registered, not yet read (its protocol
        object comes from its state: handoff.py)."""
        conn = Connection(sock, self, self.now)
        conn.seen = self.now  # it completed the frame that joined
        self.epoll.register(conn.fd, IN)
        conn.mask = IN
        self.conns[conn.fd] = conn
        return conn

    def made(self, conn: Connection) -> bool:
        """The protocol object of a new connection: connection_made(). False when it
        raised (the connection is closed then)."""
        protocol = conn.protocol = self.app.protocol()
        try:
            protocol.connection_made(conn)
        except Exception as e:  # noqa: BLE001 - the application's bug ends this client only
            self.app_failed(conn, "connection_made", e)
            return False
        return True

    # --- reading -------------------------------------------------------------------------

    def on_event(self, conn: Connection, events: int) -> None:
        """An event of a client outside the loop's inline path."""
        if events & OUT:
            self.flush(conn)
        if conn.phase == CLOSED_PHASE or not events & ~OUT:
            return
        if conn.mask & IN:
            self.readable(conn)
        elif events & GONE:  # not read (paused, ended, moving): a reset must still end it
            self.close(conn, RESET)

    def readable(self, conn: Connection) -> None:
        if conn.phase == HEADER:
            self.proxy.read_header(conn)
            return
        if conn.phase != SERVING or conn.paused or conn.eof:
            return  # an event from before it stopped being read
        try:
            data = conn.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.close(conn, RESET, detail=e.strerror)
            return
        self.received(conn, data)

    def read_failed(self, conn: Connection, error: OSError) -> None:
        """The loop's inline read raised."""
        if not isinstance(error, (BlockingIOError, InterruptedError)):
            self.close(conn, RESET, detail=error.strerror)

    def received(self, conn: Connection, data: bytes) -> None:
        """What a read gave: bytes for the protocol, or the client's EOF."""
        if data:
            self.feed(conn, data)
        else:
            self.end_of_input(conn)

    def feed(self, conn: Connection, data: bytes) -> None:
        """Give bytes to the protocol object; then what it gave back at a join (its
        `rest`), while the connection is still served here."""
        protocol = conn.protocol
        if protocol is None:
            if self.key_frame(conn, data) or not self.made(conn):
                return
            protocol = conn.protocol
        try:
            protocol.data_received(data)
            while conn.inq and conn.phase == SERVING and not conn.paused:
                data, conn.inq = conn.inq, b""
                protocol.data_received(data)
        except ProtocolError as e:
            self.stats["protocol_errors"] += 1
            log.warning("client.protocol_error", fd=conn.fd, key=show(conn.key), error=str(e),
                        client=format_peer(conn.peer))
            self.close(conn, PROTOCOL_ERROR)
            return
        except Exception as e:  # noqa: BLE001 - the application's bug ends this client only
            self.app_failed(conn, "data_received", e)
            return
        self.after_input(conn)

    def after_input(self, conn: Connection) -> None:
        """The protocol took what it was given: stamp the connection, and hand it over or
        close it if that is what the input led to."""
        pending = conn.protocol.pending
        conn.held = pending or bool(conn.inq)
        if not pending:
            conn.seen = self.now
        if conn.phase == LEAVING:
            self.handoff.give(conn)
        elif self.stopping and conn.idle and conn.phase == SERVING and self.may_stop(conn):
            self.close(conn, STOP)

    def may_stop(self, conn: Connection) -> bool:
        """A stopping worker may close this idle client (not a member that waits for its
        group's move off a retiring worker)."""
        return conn.group is None or not self.keep_members

    def feed_held(self, conn: Connection) -> None:
        """Bytes mpd held for the protocol (carried by a hand-off, or read before a pause)
        go to it now."""
        if conn.inq and conn.phase == SERVING and not conn.paused:
            data, conn.inq = conn.inq, b""
            if conn.protocol is None and self.answered(conn, data):
                return
            self.feed(conn, data)

    def key_frame(self, conn: Connection, data: bytes) -> bool:
        """The stateless offer's key frame at the start of a read of a connection with no
        protocol object yet (ping's `C` frame that the seed's mpclient2 sends first): the
        connection joins that key without one, and what followed is served as any read.
        False: not such a frame."""
        offer = self.app.stateless
        if offer is None or not offer.key_size or data[0] != offer.keyed \
                or len(data) <= offer.key_size:
            return False
        end = offer.key_size + 1
        self.handoff.join(conn, int.from_bytes(data[1:end], "little", signed=True), data[end:])
        conn.seen = self.now
        if conn.phase == LEAVING:
            self.handoff.give(conn)
        elif conn.inq:
            self.feed_held(conn)
        elif self.stopping and conn.phase == SERVING:
            self.close(conn, STOP)
        return True

    def answered(self, conn: Connection, data: bytes) -> bool:
        """The application's stateless offer for bytes held for a connection with no
        protocol object yet (a ping carried by a hand-off): one stateless frame gets its
        reply at once, as the loop's inline path gives it. False: not such a frame."""
        offer = self.app.stateless
        if offer is None or len(data) > offer.max_frame or data[-1] != offer.end \
                or data[0] == offer.keyed or data.find(offer.end) != len(data) - 1:
            return False
        conn.seen, conn.held = self.now, False
        self.stats["requests"] += 1
        try:
            sent = conn.sock.send(offer.reply)
        except OSError:  # full (EAGAIN) or failed: the queue tries again
            sent = 0
        if sent != len(offer.reply):
            conn.write(offer.reply[sent:])
        if self.stopping and conn.phase == SERVING:
            self.close_when_written(conn, STOP)
        return True

    def end_of_input(self, conn: Connection) -> None:
        """The client half-closed: the protocol's eof_received() says whether to keep the
        connection; otherwise it is closed once its output is written."""
        if conn.eof:
            self.close(conn, EOF)  # a second EOF: it hung up
            return
        conn.eof = True
        keep = None
        if conn.protocol is not None:
            try:
                keep = conn.protocol.eof_received()
            except Exception as e:  # noqa: BLE001
                self.app_failed(conn, "eof_received", e)
                return
        if conn.phase == CLOSED_PHASE:
            return  # the protocol closed it
        if keep:
            self.watch(conn)  # not read any more; written as before
        else:
            self.close_when_written(conn, EOF)

    # --- writing -------------------------------------------------------------------------

    def flush_dirty(self) -> None:
        """Send what each connection was given this turn (Connection.write), then what
        each group's members were (Group.broadcast)."""
        if self.dirty:
            dirty, self.dirty = self.dirty, []
            for conn in dirty:
                if conn.closing == OVERFLOW:
                    if conn.phase != CLOSED_PHASE:
                        self.overflowed(conn)
                elif conn.outq and not conn.mask & OUT and conn.phase < FROZEN:
                    self.flush(conn)
        if self.dirty_groups:
            groups, self.dirty_groups = self.dirty_groups, []
            for group in groups:
                group._dirty = False
                for conn in group.members:  # a snapshot: a failed send closes a member
                    if conn.outq and conn.phase < FROZEN:
                        if not conn.mask & OUT:
                            self.flush(conn)
                        elif self.queued(conn) > self.max_output:  # behind: still growing
                            self.overflowed(conn)

    def drop_dirty(self) -> None:
        """Forget what this turn queued (a flush that failed): written on EPOLLOUT, or
        with the next turn's output."""
        for group in self.dirty_groups:
            group._dirty = False
        self.dirty, self.dirty_groups = [], []

    def queued(self, conn: Connection) -> int:
        """The bytes in the connection's queue (broadcasts append without counting)."""
        conn.outbytes = total = sum(map(len, conn.outq))
        return total

    def flush(self, conn: Connection) -> None:
        """Send as much of the queue as the socket takes, in one system call."""
        outq = conn.outq
        try:
            sent = conn.sock.send(outq[0]) if len(outq) == 1 else conn.sock.sendmsg(
                outq if len(outq) <= IOV_MAX else outq[:IOV_MAX])
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as e:
            self.close(conn, RESET, detail=e.strerror)
            return
        if sent:
            conn.seen = self.now  # it takes what it is sent: not idle
            if len(outq) == 1:
                if sent == len(outq[0]):
                    outq.clear()
                else:
                    outq[0] = memoryview(outq[0])[sent:]
            elif sent == sum(map(len, outq)):
                outq.clear()  # the usual case: all of it, counted in C
            else:
                self.sent_part(outq, sent)
        if outq:
            if self.queued(conn) > self.max_output:
                self.overflowed(conn)
            elif not conn.mask & OUT:
                self.watch(conn, out=True)  # the rest when epoll says it can take it
            return
        conn.outbytes = 0
        if conn.mask & OUT:
            self.watch(conn, out=False)
        if conn.phase or conn.closing or self.stopping:  # (served, as usual: nothing waits)
            self.written(conn)

    @staticmethod
    def sent_part(outq: list[Any], sent: int) -> None:
        """Take the `sent` bytes a send took off the front of the queue."""
        drop = 0
        for buf in outq:
            if sent < len(buf):
                break
            sent -= len(buf)
            drop += 1
        del outq[:drop]
        if sent:
            outq[0] = memoryview(outq[0])[sent:]

    def written(self, conn: Connection) -> None:
        """Everything due to the connection is out: what was waiting for that now."""
        if conn.phase == LEAVING:
            self.handoff.give(conn)
        elif conn.closing:
            self.close(conn, conn.closing)
        elif self.stopping and conn.idle and conn.phase == SERVING and self.may_stop(conn):
            self.close(conn, STOP)

    def overflowed(self, conn: Connection) -> None:
        self.stats["overflows"] += 1
        log.warning("client.overflow", fd=conn.fd, key=show(conn.key), buffered=conn.outbytes,
                    max_output_buffer=self.max_output, client=format_peer(conn.peer))
        conn.closing = ""
        self.close(conn, OVERFLOW, reset=True)

    def watch(self, conn: Connection, out: bool | None = None) -> None:
        """Register the events the connection's state asks for, if they changed: input
        while it is served and not paused or ended; output (`out`, else as it was) while
        a send left some of its queue (flush())."""
        mask = IN if (conn.phase in (SERVING, HEADER) and not conn.paused and not conn.eof
                      and not conn.closing) else 0
        if conn.mask & OUT if out is None else out:
            mask |= OUT
        if mask != conn.mask and conn.phase < FROZEN:
            self.epoll.modify(conn.fd, mask)
            conn.mask = mask

    # --- a connection goes -------------------------------------------------------------

    def close_when_written(self, conn: Connection, reason: str) -> None:
        if conn.outq:
            conn.closing = reason
            if conn.group is not None:
                self.groups.changed(conn.group)  # no more broadcasts to it
            self.watch(conn)
        else:
            self.close(conn, reason)

    def close(self, conn: Connection, reason: str, reset: bool = False,
              detail: str | None = None) -> None:
        """The one way a connection ends here: out of the table, its socket closed (with a
        reset if asked), its timers cancelled, out of its group, connection_lost()."""
        if conn.phase == CLOSED_PHASE:
            return
        if self.conns.get(conn.fd) is conn:
            del self.conns[conn.fd]
            # Unregister first: close() alone leaves the epoll entry live while another
            # copy of the socket exists (the master's copy of a handed-off fd can outlive
            # this exchange), and a dead client's level-triggered HUP would spin the loop.
            self.unwatch(conn.fd)
        self.newcomers.pop(conn.fd, None)
        conn.phase = CLOSED_PHASE
        if reset:
            with contextlib.suppress(OSError):
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_ON_CLOSE)
        conn.sock.close()
        conn.outq, conn.outbytes = [], 0
        if self.timers.by_owner or self.timers.parked:
            self.timers.cancel_all(conn)
        if conn.group is not None:
            self.groups.leave(conn, reason)
        if conn.protocol is not None:
            try:
                conn.protocol.connection_lost(reason)
            except Exception as e:  # noqa: BLE001
                log.exception("app.error", where="connection_lost", fd=conn.fd,
                              key=show(conn.key), error=repr(e))
                self.stats["app_errors"] += 1
        if self.debug:
            log.debug("client.closed", fd=conn.fd, reason=reason, detail=detail,
                      clients=len(self.conns), client=format_peer(conn.peer))
        if not self.acceptor.accepting:
            self.acceptor.resume()

    def forget(self, conn: Connection) -> None:
        """The connection left this worker whole (handed over, or moved with its group):
        out of the table and epoll; no connection_lost, its socket is not closed here. Its
        place is not refilled from the backlog at once: if the key's owner is full too,
        the master gives the client back here (a close, or the next round, resumes
        accepting)."""
        if self.conns.get(conn.fd) is conn:
            del self.conns[conn.fd]
            self.unwatch(conn.fd)
        self.newcomers.pop(conn.fd, None)
        if self.timers.by_owner or self.timers.parked:
            self.timers.cancel_all(conn)

    def unwatch(self, fd: int) -> None:
        try:  # noqa: SIM105 - every connection passes here; suppress() costs more
            self.epoll.unregister(fd)
        except (OSError, ValueError):
            pass

    def freeze(self, conn: Connection) -> None:
        """The connection's group is moving: out of the table and epoll, neither read nor
        written; its timers parked (timers.py)."""
        if self.conns.get(conn.fd) is conn:
            del self.conns[conn.fd]
            with contextlib.suppress(OSError, ValueError):
                self.epoll.unregister(conn.fd)
        self.newcomers.pop(conn.fd, None)
        conn.phase, conn.mask = FROZEN, 0
        if conn.group is not None:
            self.groups.changed(conn.group)

    def thaw(self, conn: Connection) -> None:
        """Served again (a move called off, or a group just restored here)."""
        conn.phase = SERVING
        if conn.group is not None:
            self.groups.changed(conn.group)
        self.conns[conn.fd] = conn
        self.epoll.register(conn.fd, 0)
        self.watch(conn, out=False)
        if conn.outq:
            self.dirty.append(conn)
        self.timers.unpark(conn)

    def discard(self, conn: Connection) -> None:
        """Close a client whose state a bug may have left half-changed: nothing of the
        application runs."""
        conn.protocol = None
        conn.group = None
        with contextlib.suppress(Exception):
            self.close(conn, ERROR)
        if self.conns.get(conn.fd) is conn:  # close() itself failed half-way
            del self.conns[conn.fd]
            with contextlib.suppress(OSError, ValueError):
                self.epoll.unregister(conn.fd)
            conn.sock.close()

    def app_failed(self, conn: Connection, where: str, error: Exception) -> None:
        """An exception in the application's code about one connection: that connection
        ends, with the traceback logged."""
        self.stats["app_errors"] += 1
        log.exception("app.error", where=where, fd=conn.fd, key=show(conn.key), error=repr(error),
                      client=format_peer(conn.peer))
        self.close(conn, ERROR)

    # --- what the transport asks of the worker ---------------------------------------------

    def join(self, conn: Connection, key: Any, rest: bytes) -> None:
        self.handoff.join(conn, key, rest)

    def extra_info(self, name: str, default: Any) -> Any:
        return self.extra.get(name, default)
