"""The master <-> worker channel: an AF_UNIX SOCK_SEQPACKET socketpair per worker.

One message per datagram (so no framing, and an fd travels with its message):
    header  <BBH  version, type, length of the meta
    meta    the message's fields: a JSON object, except for HANDOFF and ADOPT, which
            travel once per hand-off and so use a fixed binary layout (HANDOFF_META)
    raw     optional bytes (the client bytes a HANDOFF/ADOPT carries)
Both ends are non-blocking. A send that meets EAGAIN is queued, fds held open, until the
socket is writable again; so neither side ever blocks on or dies of a slow peer.

Versions. 2 added the real client's address (a PROXY header's) to HANDOFF/ADOPT. A
master speaks each worker's version: its own workers speak VERSION, but after an upgrade
in place it adopts the previous release's workers, which speak 1 until the roll replaces
them (state.py carries each channel's version across the exec). Anything may decode
every version in VERSIONS; a message says its version in its header."""

from __future__ import annotations

import array
import contextlib
import enum
import errno
import json
import os
import socket
import struct
from collections import deque
from typing import Any, NamedTuple

from mpd.logs.log import get_logger
from mpd.worker.proxygate import NO_PEER, pack_peer, unpack_peer

VERSION = 2  # what this code speaks
VERSIONS = (1, 2)  # what it can speak to a peer and decode
HEADER = struct.Struct("<BBH")
MAX_MESSAGE = 128 * 1024  # bytes in one datagram; fits the default unix socket buffer
MAX_FDS = 4  # fds one message may carry
MAX_QUEUE = 100_000  # queued messages before the peer counts as gone

# HANDOFF/ADOPT meta: has_key, key, from_slot (-1: none), from_pid (0: none), sent_ns,
# owner (-1: none) and table (0: none), with rank and last in table's high bits. `owner` is
# the slot the sender computed with a slot table of `table` slots: tables are always slots
# 0..N-1, so N names one, and the master uses the sender's answer when its own table has
# the same size instead of computing it again (rendezvous hashing costs a third of a
# microsecond per slot). `rank`: in an ADOPT, the adopter's place in the key's ranking
# (0: the owner); in a HANDOFF, the place to look from (0 for a client handed off; more for
# one that a full slot passed on). `last`: no serving slot comes after the adopter in the
# ranking, so if it is full it refuses the client rather than pass it on. A table is at
# most 1024 slots: rank and last ride above it, in both versions (a worker of version 1
# that sees them takes the table for another and routes again, as it did). Version 2
# adds the real client's address (mpd.proxygate.PEER: 19 bytes, all zero without one).
HANDOFF_META_V1 = struct.Struct("<?iiiQii")
HANDOFF_META = struct.Struct("<?iiiQii19s")
TABLE_BITS, RANK_BITS = 16, 14  # table | rank << 16 | last << 30: a positive int32
LAST_SHIFT = TABLE_BITS + RANK_BITS
# The header and a HANDOFF/ADOPT meta in one struct ("<": no padding, so it is the two
# side by side): one pack or unpack a message instead of two and a concatenation.
FRAME_V1 = struct.Struct(HEADER.format + HANDOFF_META_V1.format[1:])
FRAME = struct.Struct(HEADER.format + HANDOFF_META.format[1:])
FD_SIZE = array.array("i").itemsize
# Plain ints, looked up once: socket's flags are IntFlag enums, and `flags & (MSG_CTRUNC |
# MSG_TRUNC)` on enums cost 1-1.8 us a message, a tenth of a hand-off's master time.
RECV_FLAGS = int(socket.MSG_CMSG_CLOEXEC)
TRUNCATED = int(socket.MSG_CTRUNC | socket.MSG_TRUNC)
DATA_TRUNCATED = int(socket.MSG_TRUNC)
SOL_SOCKET, SCM_RIGHTS = int(socket.SOL_SOCKET), int(socket.SCM_RIGHTS)
ANCILLARY_SPACE = socket.CMSG_SPACE(MAX_FDS * FD_SIZE)

log = get_logger()


class Kind(enum.IntEnum):
    """Every channel message, defined once. Fields travel in the JSON meta."""
    # worker -> master
    HELLO = 1      # slot, pid, version: the worker's loop is serving
    STATS = 2      # counters; also the heartbeat, about once a second
    HANDOFF = 3    # key, sent_ns, owner, table, rank + raw carried bytes + the client fd
    # master -> worker
    ROUTES = 10    # slots: the slot table
    ADOPT = 11     # key, from_slot, from_pid, sent_ns, rank, last + raw bytes + the client fd
    CONFIG = 12    # changed limits and log level after a reload
    DRAIN = 13     # retire: stop accepting, hand live clients to their new owners, exit
    STOP = 14      # graceful stop: stop accepting, finish clients, exit
    REOPEN_LOGS = 15  # open the log file anew at its path (logrotate renamed it)


KINDS = {kind.value: kind for kind in Kind}  # Kind(n) costs 0.3 us, this 0.02


class Message(NamedTuple):
    kind: Kind
    meta: dict[str, Any]
    raw: bytes
    fds: list[int]


class ChannelClosed(Exception):
    """The peer closed its end (EOF) or the socket failed."""


def encode(kind: Kind, meta: dict[str, Any] | None = None, raw: bytes = b"",
           version: int = VERSION) -> bytes:
    """One datagram, in the layout of `version` (a version-1 peer does not get the client's
    address: it could not read it)."""
    meta = meta or {}
    if kind is Kind.HANDOFF or kind is Kind.ADOPT:  # once per hand-off: kept lean
        get = meta.get
        key, from_slot, owner = get("key"), get("from_slot"), get("owner")
        fields = (key is not None, key or 0, -1 if from_slot is None else from_slot,
                  get("from_pid") or 0, get("sent_ns") or 0, -1 if owner is None else owner,
                  (get("table") or 0) | (get("rank") or 0) << TABLE_BITS
                  | bool(get("last")) << LAST_SHIFT)
        if version == 1:
            data = FRAME_V1.pack(version, kind, HANDOFF_META_V1.size, *fields) + raw
        else:
            peer = get("peer")
            data = FRAME.pack(version, kind, HANDOFF_META.size, *fields,
                              NO_PEER if peer is None else pack_peer(peer)) + raw
    else:
        body = json.dumps(meta, separators=(",", ":")).encode()
        data = HEADER.pack(version, kind, len(body)) + body + raw
    if len(data) > MAX_MESSAGE:
        raise ValueError(f"channel message of {len(data)} bytes is over {MAX_MESSAGE}")
    return data


def decode(data: bytes, fds: list[int]) -> Message:
    """Parse one datagram; raises ValueError saying what is wrong with it."""
    if len(data) < HEADER.size:
        raise ValueError(f"short message ({len(data)} bytes)")
    version, kind, meta_len = HEADER.unpack_from(data)
    if version not in VERSIONS:
        raise ValueError(f"unknown version {version}, expected one of {VERSIONS}")
    if kind not in KINDS:
        raise ValueError(f"unknown message type {kind}")
    kind = KINDS[kind]
    end = HEADER.size + meta_len
    if end > len(data):
        raise ValueError("meta length past the end of the message")
    if kind is Kind.HANDOFF or kind is Kind.ADOPT:
        layout = HANDOFF_META_V1 if version == 1 else HANDOFF_META
        if meta_len != layout.size:
            raise ValueError(f"{kind.name} meta of {meta_len} bytes, expected {layout.size} "
                             f"(version {version})")
        if version == 1:
            peer = NO_PEER
            _, _, _, has_key, key, from_slot, from_pid, sent_ns, owner, packed = \
                FRAME_V1.unpack_from(data)
        else:
            _, _, _, has_key, key, from_slot, from_pid, sent_ns, owner, packed, peer = \
                FRAME.unpack_from(data)
        table = packed & 0xFFFF
        rank, last = packed >> TABLE_BITS & 0x3FFF, bool(packed >> LAST_SHIFT & 1)
        meta = {"key": key if has_key else None,
                "from_slot": None if from_slot < 0 else from_slot,
                "from_pid": from_pid or None, "sent_ns": sent_ns or None,
                "owner": None if owner < 0 else owner, "table": table or None,
                "rank": rank, "last": last,
                "peer": None if peer == NO_PEER else unpack_peer(peer)}
    else:
        try:
            meta = json.loads(data[HEADER.size:end])
        except ValueError as e:
            raise ValueError(f"bad JSON meta: {e}") from None
        if not isinstance(meta, dict):
            raise ValueError("meta is not a JSON object")
    return Message(kind, meta, data[end:], fds)


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        # Not contextlib.suppress: 0.3 us more a call, and a hand-off closes its fd twice.
        try:  # noqa: SIM105
            os.close(fd)
        except OSError:
            pass


class Channel:
    """One end of a worker's socketpair. Owns every fd handed to send() until it is sent."""

    # One receive buffer for the whole process, made on first use: recv_fds() would
    # allocate (and, at this size, mmap) MAX_MESSAGE bytes on every call, and one buffer
    # per channel cost the master 128 KiB of heap per respawn. A process reads one channel
    # at a time, and receive() copies each message out before it returns.
    buffer = bytearray()
    view = memoryview(buffer)

    def __init__(self, sock: socket.socket, peer: str, version: int = VERSION):
        sock.setblocking(False)
        self.sock = sock
        self.peer = peer  # for log lines: "master" or "slot 3"
        self.version = version  # the channel version the peer speaks (VERSIONS)
        self.queue: deque[tuple[bytes, list[int]]] = deque()
        self.lost = 0  # clients whose fd the kernel could not pass us (no fd slot free)
        if not Channel.buffer:
            Channel.buffer = bytearray(MAX_MESSAGE)
            Channel.view = memoryview(Channel.buffer)

    @staticmethod
    def pair() -> tuple[socket.socket, socket.socket]:
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def wants_write(self) -> bool:
        return bool(self.queue)

    def send(self, kind: Kind, meta: dict[str, Any] | None = None, raw: bytes = b"",
             fds: list[int] | tuple[int, ...] = ()) -> None:
        """Send now, or queue on EAGAIN. Takes ownership of `fds`: they are closed once
        sent. Raises ValueError (too big) or ChannelClosed; the fds stay the caller's then."""
        data = encode(kind, meta, raw, self.version)
        fds = list(fds)
        if self.queue:
            self._enqueue(data, fds)
            return
        if not self._send_one(data, fds):
            self._enqueue(data, fds)

    def _enqueue(self, data: bytes, fds: list[int]) -> None:
        if len(self.queue) >= MAX_QUEUE:
            raise ChannelClosed(f"{self.peer}: {MAX_QUEUE} messages queued, peer not reading")
        self.queue.append((data, fds))

    def _send_one(self, data: bytes, fds: list[int]) -> bool:
        """True when sent (fds then closed), False on EAGAIN."""
        try:
            if fds:  # socket.send_fds(), without its Python frame and enum lookups
                self.sock.sendmsg([data], [(SOL_SOCKET, SCM_RIGHTS, array.array("i", fds))])
            else:
                self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as e:
            if e.errno == errno.ENOBUFS:
                return False
            raise ChannelClosed(f"{self.peer}: send failed: {e.strerror}") from None
        close_fds(fds)
        return True

    def flush(self) -> bool:
        """Send what is queued; True once the queue is empty. Call on EVENT_WRITE."""
        while self.queue:
            data, fds = self.queue[0]
            if not self._send_one(data, fds):
                return False
            self.queue.popleft()
        return True

    def receive(self, limit: int = 64) -> list[Message]:
        """Up to `limit` messages that are waiting. Malformed ones are logged and dropped
        (their fds closed). Raises ChannelClosed on EOF once every message before it has
        been returned."""
        out: list[Message] = []
        reset_seen = False
        for _ in range(limit):
            try:
                size, ancillary, flags, _addr = self.sock.recvmsg_into(
                    [self.buffer], ANCILLARY_SPACE, RECV_FLAGS)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionResetError:
                # The peer closed with our messages unread. For datagram-style sockets the
                # kernel reports that once, *before* the messages the peer sent us, which
                # are still queued (a retiring worker's last HANDOFFs): read on.
                if reset_seen:
                    raise ChannelClosed(f"{self.peer}: connection reset") from None
                reset_seen = True
                continue
            except OSError as e:
                raise ChannelClosed(f"{self.peer}: receive failed: {e.strerror}") from None
            data = bytes(self.view[:size])
            fds: list[int] = []
            for level, kind, payload in ancillary:
                if level == SOL_SOCKET and kind == SCM_RIGHTS:
                    fds += array.array("i", payload[:len(payload) - len(payload) % FD_SIZE])
            if not data and not fds:
                if out:  # deliver what came before the EOF; the next call reports it
                    break
                raise ChannelClosed(f"{self.peer}: end of file")
            if flags & TRUNCATED:
                close_fds(fds)
                self.truncated(data, flags)
                continue
            try:
                out.append(decode(data, fds))
            except ValueError as e:
                close_fds(fds)
                log.error("channel.error", peer=self.peer, error=str(e), size=len(data))
        return out

    def truncated(self, data: bytes, flags: int) -> None:
        """The kernel could not pass a message whole: too big (MSG_TRUNC), or this process
        had no free fd for what it carried (MSG_CTRUNC; the kernel closed those fds). A
        HANDOFF or ADOPT so cut lost its client: count it and say whose it was."""
        message = None
        if not flags & DATA_TRUNCATED:
            with contextlib.suppress(ValueError):
                message = decode(data, [])
        if message is not None and message.kind in (Kind.HANDOFF, Kind.ADOPT):
            self.lost += 1
            log.error("fd.lost", peer=self.peer, kind=message.kind.name,
                      key=message.meta["key"], lost=self.lost,
                      error="no free fd to receive the client (EMFILE)")
        else:
            log.error("channel.error", peer=self.peer, error="message or fds truncated",
                      size=len(data))

    def close(self) -> None:
        """Close the socket and every fd still waiting in the queue."""
        while self.queue:
            close_fds(self.queue.popleft()[1])
        self.sock.close()
