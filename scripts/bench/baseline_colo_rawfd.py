#!/usr/bin/env python3
"""The Python floor for rooms and relay: the cheapest broadcast loop plain Python can run.
Raw fds (`listener._accept()`, `os.read`, `os.writev`), level-triggered `select.epoll`, no
socket object per client, no event-loop library. The protocols are colo_frames.py's.

A broadcast appends the chunk read (a read's whole lines, or the publisher's bytes) to
every member's output list through bound `list.append`s kept per group, and takes it back
off the sender's own list (rooms: not echoed); at the end of each loop turn every member
with output gets one `os.writev` of all that is due to it. What a member cannot take stays
in its list (EPOLLOUT until it drains); more than MAX_OUTPUT waiting cuts it off (relay:
with a reset, SO_LINGER {1, 0}).

usage: baseline_colo_rawfd.py --protocol rooms|relay [--port 0]
  The port is in the first stdout line, {"event": "baseline.started", "port": P, ...}.
Listens on 127.0.0.1 only; SIGTERM ends it. Python 3.9+, standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import select
import signal
import socket
import struct
import sys
import time

from colo_frames import MAX_LINE, MAX_OUTPUT, NO_PUBLISHER, ack, lines_too_long, parse_join

IOV_MAX = 1024
LINGER_RESET = struct.pack("ii", 1, 0)
EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT


class Member:
    __slots__ = ("fd", "out", "group", "buffer", "blocked", "closing")

    def __init__(self, fd: int, group: Group) -> None:
        self.fd = fd
        self.out: list[bytes] = []
        self.group = group
        self.buffer = b""  # rooms: a line not yet whole
        self.blocked = False  # waiting for EPOLLOUT
        self.closing = False  # relay: the stream ended; close once the output is out


class Group:
    """A room's members, or a stream's players (and its publisher)."""

    __slots__ = ("key", "members", "appends", "publisher")

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.members: list[Member] = []
        self.appends: list = []  # each member's out.append
        self.publisher: Member | None = None

    def add(self, member: Member) -> None:
        self.members.append(member)
        self.appends.append(member.out.append)

    def remove(self, member: Member) -> None:
        with contextlib.suppress(ValueError):
            self.members.remove(member)
            self.appends = [m.out.append for m in self.members if not m.closing]


class Server:
    def __init__(self, listener: socket.socket, protocol: str) -> None:
        self.listener = listener
        self.protocol = protocol
        self.rooms = protocol == "rooms"
        self.ep = select.epoll()
        self.joining: dict[int, bytes] = {}
        self.members: dict[int, Member] = {}
        self.groups: dict[bytes, Group] = {}
        self.dirty: set[Group] = set()
        # A relay publisher's bytes come in bulk: 256 KiB reads carried 1.2x the bytes/s
        # of 64 KiB ones here (pinned, 64 KiB frames); for lines the bigger buffer only
        # costs (0.6x the deliveries/s, 100 B lines).
        self.read_size = 65536 if self.rooms else 262144

    def run(self) -> None:
        lfd = self.listener.fileno()
        ep = self.ep
        ep.register(lfd, EPOLLIN)
        accept, poll, register = self.listener._accept, ep.poll, ep.register
        read, set_blocking = os.read, os.set_blocking
        members, joining, dirty = self.members, self.joining, self.dirty
        dirty_add, rooms = dirty.add, self.rooms
        size = self.read_size
        while True:
            for fd, events in poll():
                m = members.get(fd)
                if m is None:
                    if fd == lfd:
                        for _ in range(64):
                            try:
                                cfd, _addr = accept()
                            except OSError:  # BlockingIOError: none left
                                break
                            set_blocking(cfd, False)
                            joining[cfd] = b""
                            register(cfd, EPOLLIN)
                    elif fd in joining:
                        self.join(fd)
                    # else: closed earlier in this turn (a stream's end closes its players)
                    continue
                if events & EPOLLOUT:
                    self.drain(m)
                    if not events & EPOLLIN:
                        continue
                try:
                    data = read(fd, size)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:
                    self.leave(m)
                    continue
                group = m.group
                if rooms:
                    if m.buffer or data[-1] != 10:
                        data = self.whole_lines(m, data)
                        if not data:
                            continue
                    for append in group.appends:
                        append(data)
                    m.out.pop()  # not echoed: the sender's own copy, appended last
                    dirty_add(group)
                elif group.publisher is m:
                    for append in group.appends:
                        append(data)
                    dirty_add(group)
                # a player's bytes are read and discarded
            if dirty:
                self.flush()

    def whole_lines(self, m: Member, data: bytes) -> bytes:
        """The whole lines of `data` after what `m` sent before (b"" if none, or if a line
        is too long: then `m` is closed)."""
        data = m.buffer + data
        end = data.rfind(b"\n") + 1
        m.buffer = data[end:]
        if len(m.buffer) >= MAX_LINE or lines_too_long(data[:end]):
            self.leave(m)
            return b""
        return data[:end]

    def join(self, fd: int) -> None:
        try:
            data = os.read(fd, 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.forget(fd)
            return
        data = self.joining[fd] + data
        frame = parse_join(data, self.protocol)
        if frame is None:
            self.joining[fd] = data
            return
        if isinstance(frame, bytes):
            self.refuse(fd, frame)
            return
        kind, key, used = frame
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = Group(key)
        if kind == 0x50:  # P
            if group.publisher is not None:
                self.refuse(fd, NO_PUBLISHER)
                return
            m = group.publisher = Member(fd, group)
        else:
            m = Member(fd, group)
            group.add(m)
        del self.joining[fd]
        self.members[fd] = m
        with contextlib.suppress(OSError):
            os.write(fd, ack(len(group.members) + (group.publisher is not None)))
        rest = data[used:]
        if rest and (self.rooms or group.publisher is m):
            if self.rooms:
                rest = self.whole_lines(m, rest)
            if rest:
                for append in group.appends:
                    append(rest)
                if self.rooms:
                    m.out.pop()
                self.dirty.add(group)

    def refuse(self, fd: int, line: bytes) -> None:
        with contextlib.suppress(OSError):
            os.write(fd, line)
        self.forget(fd)

    def forget(self, fd: int) -> None:
        self.joining.pop(fd, None)
        self.ep.unregister(fd)
        os.close(fd)

    def flush(self) -> None:
        """One writev per member with output, for everything due to it."""
        writev = os.writev
        cut = []
        for group in self.dirty:
            for m in group.members:
                out = m.out
                if not out or m.blocked:
                    if m.blocked and sum(map(len, out)) > MAX_OUTPUT:
                        cut.append(m)
                    continue
                if len(out) > IOV_MAX:
                    out[:] = [b"".join(out)]
                try:
                    written = writev(m.fd, out)
                except BlockingIOError:
                    written = 0
                except OSError:
                    cut.append(m)
                    continue
                if len(out) == 1 and written == len(out[0]):
                    out.clear()
                elif self.keep_rest(m, written) > MAX_OUTPUT:
                    cut.append(m)
                    continue
                if m.closing and not out:
                    cut.append(m)
        self.dirty.clear()
        for m in cut:
            self.cut_off(m)

    def keep_rest(self, m: Member, written: int) -> int:
        """Drop what writev took from m.out; if anything is left, wait for EPOLLOUT.
        Returns the bytes left."""
        out = m.out
        i = 0
        while i < len(out) and written >= len(out[i]):
            written -= len(out[i])
            i += 1
        del out[:i]
        if out and written:
            out[0] = out[0][written:]
        left = sum(map(len, out))
        if left and not m.blocked:
            m.blocked = True
            self.ep.modify(m.fd, EPOLLIN | EPOLLOUT)
        return left

    def drain(self, m: Member) -> None:
        try:
            written = os.writev(m.fd, m.out[:IOV_MAX])
        except BlockingIOError:
            return
        except OSError:
            self.leave(m)
            return
        if self.keep_rest(m, written) == 0:
            m.blocked = False
            if m.closing:
                self.leave(m)
                return
            self.ep.modify(m.fd, EPOLLIN)

    def cut_off(self, m: Member) -> None:
        """Too far behind (relay: with a reset), or the stream ended and all is out."""
        if m.fd not in self.members:
            return
        if not self.rooms and not m.closing:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, m.fd)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            sock.detach()
        self.leave(m)

    def leave(self, m: Member) -> None:
        if self.members.pop(m.fd, None) is None:
            return
        self.ep.unregister(m.fd)
        os.close(m.fd)
        group = m.group
        if group.publisher is m:
            group.publisher = None
            group.appends = []
            for player in list(group.members):  # the stream ended: EOF once all is out
                player.closing = True
                if not player.out:
                    self.leave(player)
        else:
            group.remove(m)
        if not group.members and group.publisher is None:
            self.groups.pop(group.key, None)
            self.dirty.discard(group)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--protocol", choices=("rooms", "relay"), required=True)
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Nagle off, as asyncio and uvloop have it: else a member's next small write waits for
    # the (delayed) ACK of its last. Accepted sockets inherit it from the listener.
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    listener.bind(("127.0.0.1", args.port))
    listener.listen(4096)
    listener.setblocking(False)
    line = {"ts": time.time(), "event": "baseline.started", "impl": "python-rawfd",
            "protocol": args.protocol, "port": listener.getsockname()[1], "pid": os.getpid(),
            "python": sys.version.split()[0]}
    os.write(1, (json.dumps(line) + "\n").encode())
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    Server(listener, args.protocol).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
