#!/usr/bin/env python3
"""The Python floor for mpd's benchmarks: the cheapest loop Python can run for the ping
protocol. Raw fds and nothing else: `listener._accept()` for the client's fd, `os.read`
and `os.write` on it, level-triggered `select.epoll`, no socket object per client, and one
dict holding the state of the frames left incomplete (key frames and split sends included,
see pingframes.py). A reply that does not fit in the socket's send buffer is dropped, as
in baseline_epoll.py: the suite's clients wait for each reply before they send again.

usage: baseline_rawfd.py [--port 0] [--quickack]
  The port is in the first stdout line, {"event": "baseline.started", "port": P, ...}.
  --quickack: set TCP_QUICKACK on a client whenever a read leaves a frame incomplete, so
    that its next segment is not held by Nagle's algorithm until the delayed ACK (about
    40 ms) of a split send such as the seed's mpclient2 (`M`, then its text). Only that
    path pays the syscall. The reference for the splitsend scenario.
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
import sys
import time

from pingframes import AT_START, KEY_FRAME, REPLY, parse


def quickack(fd: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fd)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
    finally:
        sock.detach()


def serve(listener: socket.socket, ack_partial: bool) -> None:
    ep = select.epoll()
    lfd = listener.fileno()
    ep.register(lfd, select.EPOLLIN)
    accept, poll, register, unregister = listener._accept, ep.poll, ep.register, ep.unregister
    read, write, close, set_blocking = os.read, os.write, os.close, os.set_blocking
    partial: dict[int, int] = {}  # fd -> state of its incomplete frame (see pingframes)
    key_frame, reply = KEY_FRAME, REPLY
    while True:
        for fd, _events in poll():
            if fd == lfd:
                for _ in range(32):
                    try:
                        cfd, _addr = accept()
                    except OSError:  # BlockingIOError: none left; others: try next time
                        break
                    set_blocking(cfd, False)
                    register(cfd, select.EPOLLIN)
                continue
            try:
                data = read(fd, 65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                unregister(fd)
                partial.pop(fd, None)
                close(fd)
                continue
            # The common case, tested inline: nothing pending, one whole plain frame.
            if (data[-1] == 0 and fd not in partial and data[0] != key_frame
                    and data.find(0) == len(data) - 1):
                frames = 1
            else:
                frames, state = parse(partial.pop(fd, AT_START), data)
                if state != AT_START:
                    partial[fd] = state
                    if ack_partial:
                        quickack(fd)
            if frames:
                # try/except: contextlib.suppress cost 0.8-0.9 us of server CPU a request in
                # this loop, pinned (0.26 us in timeit).
                try:  # noqa: SIM105
                    write(fd, reply if frames == 1 else reply * frames)
                except OSError:
                    pass


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--quickack", action="store_true")
    args = p.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", args.port))
    listener.listen(4096)
    listener.setblocking(False)
    line = {"ts": time.time(), "event": "baseline.started", "impl": "python-rawfd",
            "port": listener.getsockname()[1], "pid": os.getpid(), "quickack": args.quickack,
            "python": sys.version.split()[0]}
    os.write(1, (json.dumps(line) + "\n").encode())
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    serve(listener, args.quickack)
    return 0


if __name__ == "__main__":
    sys.exit(main())
