#!/usr/bin/env python3
"""What a Python team would write for rooms (a chat) and relay (one publisher, many players
per stream) in one process: an asyncio `Protocol` server, the rooms (streams) in a dict,
a broadcast as a loop of `transport.write` over the members. With --uvloop, the same on
uvloop's event loop. The protocols are colo_frames.py's.

Each read's whole lines go out as one write per member (the bytes are the lines verbatim, in
order). The output bound is asyncio's own: the write-buffer high-water mark is MAX_OUTPUT,
and `pause_writing`, which the transport calls once more than that is waiting, cuts the
member off (relay: with a reset, SO_LINGER {1, 0}).

usage: baseline_colo_asyncio.py --protocol rooms|relay [--port 0] [--uvloop]
  The port is in the first stdout line, {"event": "baseline.started", "port": P, ...}.
Listens on 127.0.0.1 only; SIGTERM ends it. Python 3.9+; the standard library, plus uvloop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import signal
import socket
import struct
import sys
import time
from typing import cast

from colo_frames import MAX_LINE, MAX_OUTPUT, NO_PUBLISHER, ack, lines_too_long, parse_join

LINGER_RESET = struct.pack("ii", 1, 0)


class Group:
    """A room's members, or a stream's players and publisher. A leave replaces the list
    (copy on write), so that a broadcast under way goes on over the list it started with."""

    __slots__ = ("members", "publisher")

    def __init__(self) -> None:
        self.members: list[Member] = []
        self.publisher: Member | None = None


class Member(asyncio.Protocol):
    """A client: joining until its first frame is whole, then a member of its group."""

    transport: asyncio.Transport

    def __init__(self, server: Server) -> None:
        self.server = server
        self.buffer = b""
        self.group: Group | None = None
        self.key = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=MAX_OUTPUT)
        self.write = self.transport.write

    def data_received(self, data: bytes) -> None:
        group = self.group
        if group is None:
            self.join(data)
        elif self.server.rooms:
            self.lines(data, group)
        elif group.publisher is self:
            for player in group.members:
                player.write(data)
        # a player's bytes are read and discarded

    def join(self, data: bytes) -> None:
        data = self.buffer + data
        frame = parse_join(data, self.server.protocol)
        if frame is None:
            self.buffer = data
            return
        if isinstance(frame, bytes):
            self.write(frame)
            self.transport.close()
            return
        kind, self.key, used = frame
        self.buffer = b""
        if self.server.join(self, kind) and len(data) > used:
            self.data_received(data[used:])

    def lines(self, data: bytes, group: Group) -> None:
        if self.buffer:
            data = self.buffer + data
            self.buffer = b""
        if data[-1] != 10:
            end = data.rfind(b"\n") + 1
            self.buffer = data[end:]
            if len(self.buffer) >= MAX_LINE:
                self.transport.abort()
                return
            if not end:
                return
            data = data[:end]
        if len(data) > MAX_LINE and lines_too_long(data):
            self.transport.abort()
            return
        for member in group.members:
            if member is not self:
                member.write(data)

    def pause_writing(self) -> None:
        """More than MAX_OUTPUT waits for this member: cut it off (relay: a reset)."""
        self.server.leave(self)
        if not self.server.rooms:
            sock = self.transport.get_extra_info("socket")
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.leave(self)


class Server:
    def __init__(self, protocol: str) -> None:
        self.protocol = protocol
        self.rooms = protocol == "rooms"
        self.groups: dict[bytes, Group] = {}

    def join(self, member: Member, kind: int) -> bool:
        group = self.groups.get(member.key)
        if group is None:
            group = self.groups[member.key] = Group()
        if kind == 0x50:  # P
            if group.publisher is not None:
                member.write(NO_PUBLISHER)
                member.transport.close()
                return False
            group.publisher = member
        else:
            group.members = group.members + [member]
        member.group = group
        member.write(ack(len(group.members) + (group.publisher is not None)))
        return True

    def leave(self, member: Member) -> None:
        group, member.group = member.group, None
        if group is None:
            return
        if group.publisher is member:
            group.publisher = None
            players, group.members = group.members, []
            for player in players:  # the stream ended: each player gets EOF
                player.group = None
                player.transport.close()
        else:
            group.members = [m for m in group.members if m is not member]
        if not group.members and group.publisher is None:
            self.groups.pop(member.key, None)


async def serve(args: argparse.Namespace, impl: str, version: str) -> None:
    loop = asyncio.get_running_loop()
    state = Server(args.protocol)
    server = await loop.create_server(lambda: Member(state), "127.0.0.1", args.port,
                                      backlog=4096)
    line = {"ts": time.time(), "event": "baseline.started", "impl": impl, "version": version,
            "protocol": args.protocol, "port": server.sockets[0].getsockname()[1],
            "pid": os.getpid(), "python": sys.version.split()[0]}
    os.write(1, (json.dumps(line) + "\n").encode())
    await server.serve_forever()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--protocol", choices=("rooms", "relay"), required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--uvloop", action="store_true")
    args = p.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    if args.uvloop:
        try:
            import uvloop
        except ImportError:
            print(f"baseline_colo_asyncio: no uvloop for {sys.executable}", file=sys.stderr)
            return 69
        if hasattr(uvloop, "run"):  # 0.18+; install() is deprecated from Python 3.12 on
            uvloop.run(serve(args, "uvloop", uvloop.__version__))
        else:
            uvloop.install()
            asyncio.run(serve(args, "uvloop", uvloop.__version__))
    else:
        asyncio.run(serve(args, "asyncio", sys.version.split()[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
