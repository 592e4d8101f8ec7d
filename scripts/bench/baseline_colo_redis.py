#!/usr/bin/env python3
"""The Redis design for rooms and relay, as Socket.IO's Redis adapter, Phoenix.PubSub's
Redis adapter and nginx-rtmp's auto_push build it: W worker processes accept with
SO_REUSEPORT, with no routing by key, so the members of one room (or stream) are spread
over the workers. Each worker keeps its local members per room and SUBSCRIBEs to the Redis
channel of every room it has local members in; every line a member sends (relay: every
chunk of a publisher's bytes) goes at once to the sender's local room-mates and is
PUBLISHed once to the room's channel, tagged with the worker's id and the sender's id; a
worker that receives it from Redis hands it to its own local members, and drops what it
published itself (Socket.IO's "ignore same uid"). With --via-redis every delivery goes
through Redis, the sender's own worker included (it skips the sender by its id).

Redis holds what the workers share: `n:<key>`, the members of a key across all workers
(INCR on join, DECR on leave: the `ok <n>` ack counts exactly, as long as no worker dies),
and `pub:<key>`, a stream's publisher (SET NX: a second publisher anywhere is refused).
A stream's end is a message on its channel: each worker then closes its local players once
what is due to them is out. A join is acknowledged only once the worker's SUBSCRIBE to the
key's channel is confirmed, so nothing published after the ack can miss the new member.

Redis is spoken the way ioredis and node-redis (behind Socket.IO) speak it, on the worker's
own event loop: two connections per worker (commands, and the subscriptions), each an
asyncio Protocol that writes RESP without waiting for the replies (automatic pipelining)
and parses what comes back with hiredis' Reader (the parser redis-py uses), replies
matched to their commands in order. --client redis-py instead uses redis-py's asyncio
client as it comes: PUBLISH and the other commands pipelined by a task per batch
(`pipeline(transaction=False)`), the subscriptions through its `PubSub`.

The protocols are colo_frames.py's; the output bound is asyncio's write-buffer high-water
mark (MAX_OUTPUT), as in baseline_colo_asyncio.py.

usage: baseline_colo_redis.py --protocol rooms|relay --redis-port P [--workers 2]
                              [--port 0] [--uvloop] [--via-redis] [--client hiredis|redis-py]
  Prints {"event": "baseline.started", "port": P, ...} once every worker serves.
Listens on 127.0.0.1 only; SIGTERM ends it and its workers. Needs hiredis (and redis-py
for --client redis-py); uvloop for --uvloop.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import json
import os
import resource
import signal
import socket
import struct
import sys
import time
from typing import Any, Callable, cast

from colo_frames import MAX_LINE, MAX_OUTPUT, NO_PUBLISHER, ack, lines_too_long, parse_join

LINGER_RESET = struct.pack("ii", 1, 0)
HEADER = struct.Struct("!cHI")  # kind (L: data, E: end of stream), worker id, sender id
Reply = Callable[[Any], None]


def resp(*args: bytes) -> bytes:
    """A command in RESP, as one bytes object."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        out += [b"$%d\r\n" % len(a), a, b"\r\n"]
    return b"".join(out)


class Link(asyncio.Protocol):
    """A connection to Redis: commands go out at once, replies come back in order."""

    def __init__(self, on_push: Callable[[list], None] | None = None) -> None:
        import hiredis

        self.reader = hiredis.Reader()
        self.replies: collections.deque[Reply | None] = collections.deque()
        self.on_push = on_push  # the subscriptions' connection: every reply is a push
        self.transport: asyncio.Transport | None = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def command(self, reply: Reply | None, *args: bytes) -> None:
        assert self.transport is not None
        self.transport.write(resp(*args))
        if self.on_push is None:
            self.replies.append(reply)

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        gets = reader.gets
        reply = gets()
        while reply is not False:
            if self.on_push is not None:
                self.on_push(reply)
            else:
                callback = self.replies.popleft()
                if callback is not None:
                    callback(reply)
            reply = gets()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


class RedisPyLink:
    """The same two roles on redis-py's asyncio client (--client redis-py)."""

    def __init__(self, port: int, on_push: Callable[[list], None] | None = None) -> None:
        import redis.asyncio

        self.client = redis.asyncio.Redis(host="127.0.0.1", port=port)
        self.on_push = on_push
        self.queue: list[tuple[Reply | None, tuple[bytes, ...]]] = []
        self.wake = asyncio.Event()
        self.pubsub = self.client.pubsub() if on_push else None
        self.lost = asyncio.get_running_loop().create_future()

    async def start(self) -> None:
        await self.client.ping()
        task = self.read_pushes() if self.pubsub is not None else self.run_commands()
        asyncio.ensure_future(self.watch(task))

    async def watch(self, task: Any) -> None:
        try:
            await task
        except Exception as e:  # noqa: BLE001 - a broken link ends the worker
            self.lost.set_result(e)

    def command(self, reply: Reply | None, *args: bytes) -> None:
        if self.pubsub is not None:  # SUBSCRIBE / UNSUBSCRIBE
            act = self.pubsub.subscribe if args[0] == b"SUBSCRIBE" else self.pubsub.unsubscribe
            asyncio.ensure_future(act(*args[1:]))
            return
        self.queue.append((reply, args))
        self.wake.set()

    async def run_commands(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            batch, self.queue = self.queue, []
            async with self.client.pipeline(transaction=False) as pipe:
                for _reply, args in batch:
                    pipe.execute_command(*args)
                results = await pipe.execute()
            for (reply, _args), result in zip(batch, results):
                if reply is not None:
                    reply(result)

    async def read_pushes(self) -> None:
        assert self.pubsub is not None and self.on_push is not None
        await self.pubsub.subscribe(b"w:%d" % os.getpid())  # so that it is never idle
        on_push = self.on_push
        while True:
            message = await self.pubsub.get_message(timeout=None)
            if message is not None:
                on_push([message["type"].encode(), message["channel"], message["data"]])


class Group:
    """A room's (or stream's) local members on this worker."""

    __slots__ = ("key", "channel", "members", "publisher", "subscribed", "waiting", "joining")

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.channel = b"c:" + key
        self.members: list[Member] = []  # rooms: the members; relay: the players
        self.publisher: Member | None = None
        self.subscribed = False
        self.waiting: list[tuple[Member, int]] = []  # joins until SUBSCRIBE is confirmed
        self.joining = 0  # joins under way (from the first frame to the ack)


class Member(asyncio.Protocol):
    transport: asyncio.Transport

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.buffer = b""
        self.group: Group | None = None
        self.joining = False
        self.id = worker.next_id()
        self.header = HEADER.pack(b"L", worker.id, self.id)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=MAX_OUTPUT)
        self.write = self.transport.write

    def data_received(self, data: bytes) -> None:
        group = self.group
        if group is None:
            if self.joining:
                self.buffer += data
            else:
                self.join(data)
            return
        if self.worker.rooms:
            if self.buffer or data[-1] != 10:
                data = self.whole_lines(data)
                if not data:
                    return
            elif len(data) > MAX_LINE and lines_too_long(data):
                self.transport.abort()
                return
            self.worker.broadcast(self, group, data)
        elif group.publisher is self:
            self.worker.broadcast(self, group, data)

    def whole_lines(self, data: bytes) -> bytes:
        data = self.buffer + data
        end = data.rfind(b"\n") + 1
        self.buffer = data[end:]
        if len(self.buffer) >= MAX_LINE or lines_too_long(data[:end]):
            self.transport.abort()
            return b""
        return data[:end]

    def join(self, data: bytes) -> None:
        data = self.buffer + data
        frame = parse_join(data, self.worker.protocol)
        if frame is None:
            self.buffer = data
            return
        if isinstance(frame, bytes):
            self.write(frame)
            self.transport.close()
            return
        kind, key, used = frame
        self.buffer = data[used:]
        self.joining = True
        self.worker.join(self, key, kind)

    def joined(self) -> None:
        """The ack is out: the bytes that came with or after the first frame."""
        self.joining = False
        rest, self.buffer = self.buffer, b""
        if rest:
            self.data_received(rest)

    def pause_writing(self) -> None:
        """More than MAX_OUTPUT waits for this member: cut it off (relay: a reset)."""
        self.worker.leave(self)
        if not self.worker.rooms:
            sock = self.transport.get_extra_info("socket")
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.joining = False
        self.worker.leave(self)


class Worker:
    def __init__(self, wid: int, protocol: str, via_redis: bool) -> None:
        self.id = wid
        self.tag = struct.pack("!H", wid)
        self.protocol = protocol
        self.rooms = protocol == "rooms"
        self.via_redis = via_redis
        self.groups: dict[bytes, Group] = {}  # by channel
        self.ids = 0
        self.cmd: Any = None
        self.sub: Any = None

    def next_id(self) -> int:
        self.ids += 1
        return self.ids

    # joining and leaving -----------------------------------------------------------------

    def join(self, member: Member, key: bytes, kind: int) -> None:
        channel = b"c:" + key
        group = self.groups.get(channel)
        if group is None:
            group = self.groups[channel] = Group(key)
            self.sub.command(None, b"SUBSCRIBE", channel)
        group.joining += 1
        if group.subscribed:
            self.admit(member, group, kind)
        else:
            group.waiting.append((member, kind))

    def on_push(self, reply: list) -> None:
        kind = reply[0]
        if kind == b"message":
            group = self.groups.get(reply[1])
            if group is not None:
                self.deliver(group, reply[2])
        elif kind == b"subscribe":
            group = self.groups.get(reply[1])
            if group is not None and not group.subscribed:
                group.subscribed = True
                waiting, group.waiting = group.waiting, []
                for member, join_kind in waiting:
                    self.admit(member, group, join_kind)

    def admit(self, member: Member, group: Group, kind: int) -> None:
        """Subscribed: claim the stream (a publisher), count the member in, then ack."""
        if member.transport.is_closing():
            self.joined(group)
            return
        key = group.key
        if kind == 0x50:  # P: a publisher, if the stream has none on any worker

            def claimed(ok: Any) -> None:
                if ok is None:
                    member.write(NO_PUBLISHER)
                    member.joining = False
                    member.transport.close()
                    self.joined(group)
                elif member.transport.is_closing():  # gone meanwhile
                    self.cmd.command(None, b"DEL", b"pub:" + key)
                    self.joined(group)
                else:
                    group.publisher = member
                    self.count_in(member, group)

            self.cmd.command(claimed, b"SET", b"pub:" + key, self.tag, b"NX")
        else:
            self.count_in(member, group)

    def count_in(self, member: Member, group: Group) -> None:
        key = b"n:" + group.key

        def counted(n: int) -> None:
            if member.transport.is_closing():  # gone before its ack
                self.cmd.command(None, b"DECR", key)
                if group.publisher is member:
                    group.publisher = None
                    self.cmd.command(None, b"DEL", b"pub:" + group.key)
            else:
                if group.publisher is not member:
                    group.members = group.members + [member]
                member.group = group
                member.write(ack(n))
            self.joined(group)
            if member.group is group:
                member.joined()

        self.cmd.command(counted, b"INCR", key)

    def joined(self, group: Group) -> None:
        group.joining -= 1
        self.drop_if_empty(group)

    def leave(self, member: Member) -> None:
        group, member.group = member.group, None
        if group is None:
            return
        self.cmd.command(None, b"DECR", b"n:" + group.key)
        if group.publisher is member:
            group.publisher = None
            self.cmd.command(None, b"DEL", b"pub:" + group.key)
            self.cmd.command(None, b"PUBLISH", group.channel, HEADER.pack(b"E", self.id, 0))
            self.end_stream(group)
        else:
            group.members = [m for m in group.members if m is not member]
        self.drop_if_empty(group)

    def end_stream(self, group: Group) -> None:
        """The publisher left: each local player gets EOF once what is due to it is out."""
        players, group.members = group.members, []
        for player in players:
            player.group = None
            self.cmd.command(None, b"DECR", b"n:" + group.key)
            player.transport.close()

    def drop_if_empty(self, group: Group) -> None:
        if group.members or group.publisher is not None or group.joining:
            return
        if self.groups.get(group.channel) is group:
            del self.groups[group.channel]
            self.sub.command(None, b"UNSUBSCRIBE", group.channel)

    # the broadcast ---------------------------------------------------------------------

    def broadcast(self, sender: Member, group: Group, data: bytes) -> None:
        if not self.via_redis:
            for member in group.members:
                if member is not sender:
                    member.write(data)
        self.cmd.command(None, b"PUBLISH", group.channel, sender.header + data)

    def deliver(self, group: Group, payload: bytes) -> None:
        """A message from the room's channel: for the local members, unless it is ours."""
        if payload[1:3] == self.tag:
            if not self.via_redis:
                return  # delivered locally already
            sender = struct.unpack_from("!I", payload, 3)[0]
        else:
            sender = -1
        if payload[0] == 0x45:  # E: the stream ended on another worker
            self.end_stream(group)
            self.drop_if_empty(group)
            return
        data = payload[HEADER.size:]
        for member in group.members:
            if member.id != sender:
                member.write(data)


async def connect(worker: Worker, port: int, client: str) -> None:
    loop = asyncio.get_running_loop()
    if client == "redis-py":
        worker.cmd = RedisPyLink(port)
        worker.sub = RedisPyLink(port, worker.on_push)
        await worker.cmd.start()
        await worker.sub.start()
        return
    _t, worker.cmd = await loop.create_connection(Link, "127.0.0.1", port)
    _t, worker.sub = await loop.create_connection(lambda: Link(worker.on_push),
                                                  "127.0.0.1", port)


async def serve_worker(args: argparse.Namespace, wid: int, port: int, ready_fd: int) -> None:
    loop = asyncio.get_running_loop()
    worker = Worker(wid, args.protocol, args.via_redis)
    await connect(worker, args.redis_port, args.client)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    # Nagle off, as asyncio's create_server(host, port) has it: given a socket made with
    # proto 0, asyncio leaves it on (its _set_nodelay checks for IPPROTO_TCP), and every
    # member's next line would wait for the delayed ACK of its last (40 ms).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", port))
    server = await loop.create_server(lambda: Member(worker), sock=sock, backlog=4096)
    os.write(ready_fd, b"%d %d\n" % (wid, os.getpid()))
    os.close(ready_fd)
    lost = [worker.cmd.lost, worker.sub.lost]
    await asyncio.wait(lost, return_when=asyncio.FIRST_COMPLETED)
    server.close()
    print(f"baseline_colo_redis: worker {wid} lost its Redis connection", file=sys.stderr)
    os._exit(3)


def run_worker(args: argparse.Namespace, wid: int, port: int, ready_fd: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    main = serve_worker(args, wid, port, ready_fd)
    if args.uvloop:
        import uvloop

        if hasattr(uvloop, "run"):
            uvloop.run(main)
            return
        uvloop.install()
    asyncio.run(main)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--protocol", choices=("rooms", "relay"), required=True)
    p.add_argument("--redis-port", type=int, required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--uvloop", action="store_true")
    p.add_argument("--via-redis", action="store_true",
                   help="every delivery through Redis (default: local members at once)")
    p.add_argument("--client", choices=("hiredis", "redis-py"), default="hiredis")
    args = p.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    versions = {"python": sys.version.split()[0]}
    try:
        import hiredis

        versions["hiredis"] = hiredis.__version__
        if args.client == "redis-py":
            import redis

            versions["redis-py"] = redis.__version__
        if args.uvloop:
            import uvloop

            versions["uvloop"] = uvloop.__version__
    except ImportError as e:
        print(f"baseline_colo_redis: {e} (for {sys.executable})", file=sys.stderr)
        return 69
    # The port: bound (not listening) here with SO_REUSEPORT until every worker listens.
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind(("127.0.0.1", args.port))
    port = holder.getsockname()[1]
    ready_r, ready_w = os.pipe()
    children = []
    for wid in range(args.workers):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(ready_r)
                holder.close()
                run_worker(args, wid, port, ready_w)
                code = 0
            finally:
                os._exit(code)
        children.append(pid)
    os.close(ready_w)

    def stop(*_: Any) -> None:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    got = b""
    with os.fdopen(ready_r, "rb") as ready:
        for _ in range(args.workers):
            line = ready.readline()
            if not line:
                print("baseline_colo_redis: a worker failed to start", file=sys.stderr)
                stop()
            got += line
    holder.close()
    line = {"ts": time.time(), "event": "baseline.started", "impl": "redis-design",
            "protocol": args.protocol, "port": port, "pid": os.getpid(),
            "workers": args.workers, "client": args.client, "via_redis": args.via_redis,
            "redis_port": args.redis_port, "worker_pids": [int(x.split()[1]) for x in
                                                           got.splitlines()], **versions}
    os.write(1, (json.dumps(line) + "\n").encode())
    while True:
        pid, status = os.wait()
        if pid in children:
            print(f"baseline_colo_redis: worker {pid} exited ({status})", file=sys.stderr)
            stop()


if __name__ == "__main__":
    sys.exit(main())
