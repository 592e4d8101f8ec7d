"""Serving a worker's clients outside the loop's common case: reads that are not one
stateless frame (partial frames, several frames, key frames and the hand-off they start,
EOF and half-close), replies that do not fit the socket at once (the output buffer and
its bound), the stop at a frame boundary, and closing. The common case (a readable client
with nothing pending, one stateless frame read) is served inline in the loop
(worker.py); whatever it cannot finish, it hands to the methods here.

Serving is a part of the Worker class (worker.py), kept in a file of its own as
handoff.py is; it works on the worker's connections, epoll and stats."""

from __future__ import annotations

import contextlib
import select
import socket
from typing import Callable

from mpd.apps import ClientProtocol, ProtocolError
from mpd.config.schema import Config
from mpd.logs import log as logmod
from mpd.worker.connection import WAITING, Connection
from mpd.worker.proxygate import format_peer

RECV_SIZE = 32768  # bytes read at a time

IN, OUT = select.EPOLLIN, select.EPOLLOUT

log = logmod.get_logger()


class Serving:
    # The worker's state it works on (worker.py sets it up).
    config: Config
    protocol: ClientProtocol
    conns: dict[int, Connection]
    newcomers: dict[int, Connection]
    epoll: select.epoll
    slot: int | None
    slots: tuple[int, ...]
    now: float
    stopping: bool
    accepting: bool
    debug: bool
    stats: dict[str, int]
    owner_of: Callable[[Connection, int], int | None]
    hand_off: Callable[[Connection], None]
    read_header: Callable[[Connection], None]
    resume_accepting: Callable[[], None]

    def on_event(self, conn: Connection, events: int) -> None:
        """A client's event outside the loop's common case."""
        if events & OUT:
            self.flush(conn)
        if events & ~OUT and conn.fd in self.conns:
            self.on_readable(conn)

    def on_readable(self, conn: Connection) -> None:
        if conn.handoff >= WAITING:  # not read as a client now (connection.py)
            if conn.handoff == WAITING:  # its unread bytes belong to the next owner
                self.flush(conn)
            else:  # HEADER: its PROXY header comes first (proxyphase.py)
                self.read_header(conn)
            return
        try:
            data = conn.sock.recv(RECV_SIZE)
        except OSError as e:
            self.read_failed(conn, e)
            return
        self.received(conn, data)

    def read_failed(self, conn: Connection, error: OSError) -> None:
        """A read that raised: nothing to read after all (EAGAIN), or the connection failed
        (ECONNRESET, for one: the suite's clients close with RST)."""
        if not isinstance(error, (BlockingIOError, InterruptedError)):
            self.close(conn, error.strerror or "error")

    def received(self, conn: Connection, data: bytes) -> None:
        """What a read of a served client gave: bytes for the protocol, or an EOF."""
        if not data:
            if conn.outbuf and not conn.eof:
                self.half_closed(conn)
            else:  # nothing due, or a second EOF: a hang-up
                self.close(conn, "eof")
            return
        self.consume(conn, data)

    def half_closed(self, conn: Connection) -> None:
        """The client half-closed (shutdown SHUT_WR) with replies still due: stop reading,
        write them, then close (flush() does); bounded by max_output_buffer and, for a
        client that stops reading, by idle_timeout."""
        conn.eof = True
        self.epoll.modify(conn.fd, OUT)

    def consume(self, conn: Connection, data: bytes) -> None:
        """Feed bytes to the protocol, write back its replies, and hand the client off
        when it names a key that another slot owns."""
        try:
            replies, frames, key = self.protocol.feed(conn.inbuf, data)
            while key is not None:
                conn.bind(key, self.owner_of(conn, key), len(self.slots))
                if conn.owner != self.slot:
                    if frames:
                        self.stats["requests"] += frames
                        self.write(conn, replies)
                    if conn.fd in self.conns:
                        self.hand_off(conn)
                    return
                if self.debug:
                    log.debug("client.bound", fd=conn.fd, key=key,
                              client=format_peer(conn.client))
                conn.seen = self.now
                more, more_frames, key = self.protocol.feed(conn.inbuf, b"")
                replies += more
                frames += more_frames
        except ProtocolError as e:
            self.stats["protocol_errors"] += 1
            log.warning("client.protocol_error", fd=conn.fd, error=str(e),
                        client=format_peer(conn.client))
            self.close(conn, "protocol_error")
            return
        if frames:
            conn.seen = self.now
            self.stats["requests"] += frames
            self.write(conn, replies)
        if conn.inbuf:
            quick_ack(conn.sock)
        elif self.stopping and not conn.outbuf and conn.fd in self.conns:
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
        conn.seen = self.now  # it reads: not idle
        if not conn.outbuf:
            if conn.handoff == WAITING:
                self.hand_off(conn)
                return
            if conn.eof:
                self.close(conn, "eof")
                return
            self.epoll.modify(conn.fd, IN)
            if self.stopping and conn.idle:
                self.close(conn, "stopping")

    def close(self, conn: Connection, reason: str) -> None:
        del self.conns[conn.fd]
        self.newcomers.pop(conn.fd, None)
        # Unregister first: close() alone leaves the epoll entry live while another copy
        # of the socket exists, and the master's copy of a handed-off fd can outlive this
        # whole exchange (waking us may preempt it just before it closes that copy); a
        # dead client's level-triggered HUP would then spin this loop until it does.
        self.epoll.unregister(conn.fd)
        conn.sock.close()
        if self.debug:
            log.debug("client.closed", fd=conn.fd, reason=reason, clients=len(self.conns),
                      client=format_peer(conn.client))
        if not self.accepting:
            self.resume_accepting()


def quick_ack(sock: socket.socket) -> None:
    """ACK what the client sent now, not after the delayed-ACK timer (40 ms or more): a
    client that sends one frame in two writes with Nagle's algorithm on (the seed's
    mpclient2 sends `M`, then its text) holds the second until the first is acknowledged,
    and a server that has no reply to piggyback the ACK on delays it. Only a read that
    leaves a frame incomplete pays this call. The kernel clears quick-ACK mode again on
    its own, so it is set each time."""
    with contextlib.suppress(OSError):  # a socket that write() just closed
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
