#!/usr/bin/env python3
"""The Python baseline for mpd's benchmarks: a minimal level-triggered select.epoll ping
server. One recv() and one send() per request; frames are handled minimally: one 20-byte
reply per NUL received (no `C` key frames, no hand-off, no limits, no logging).

It is what "Python itself costs" for this protocol, so that mpd's figures can be read as
a ratio against it (and against baseline_epoll.c, the floor), measured side by side.

usage: baseline_epoll.py [--port 0] [--workers 0] [--scale-to N]
  --port 0 lets the kernel pick; the port is in the first stdout line,
    {"event": "baseline.started", "port": P, ...}, as mpd logs it.
  --workers 0 (default) serves in this one process. --workers N forks N processes that
    share the listening socket, a minimal pre-fork server, so that the respawn and scale
    scenarios have a baseline: the parent respawns a child that dies and prints
    {"event": "worker.ready", "worker_pid": ..., "worker_slot": ...} when a child serves;
    SIGUSR1 grows it to --scale-to children. SIGTERM ends it.
Listens on 127.0.0.1 only. Runs on Python 3.9+ with the standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import resource
import select
import signal
import socket
import sys
import time

REPLY = b"hello, server ping!\0"


def serve(listener: socket.socket) -> None:
    ep = select.epoll()
    lfd = listener.fileno()
    ep.register(lfd, select.EPOLLIN | getattr(select, "EPOLLEXCLUSIVE", 0))
    conns: dict[int, socket.socket] = {}
    while True:
        for fd, _events in ep.poll():
            if fd == lfd:
                for _ in range(32):
                    try:
                        sock, _addr = listener.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break
                    sock.setblocking(False)
                    conns[sock.fileno()] = sock
                    ep.register(sock.fileno(), select.EPOLLIN)
                continue
            sock = conns[fd]
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                ep.unregister(fd)
                del conns[fd]
                sock.close()
                continue
            frames = data.count(0)
            if frames:
                with contextlib.suppress(OSError):
                    sock.send(REPLY if frames == 1 else REPLY * frames)


def emit(event: str, **fields: object) -> None:
    line = json.dumps({"ts": time.time(), "event": event, "pid": os.getpid(), **fields})
    os.write(1, (line + "\n").encode())


class PreFork:
    """A minimal supervisor: fork N children, respawn the dead, grow on SIGUSR1."""

    def __init__(self, listener: socket.socket, workers: int, scale_to: int):
        self.listener = listener
        self.target = workers
        self.scale_to = scale_to
        self.children: dict[int, int] = {}  # pid -> slot
        self.ready_r, self.ready_w = os.pipe()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.pending = b""

    def spawn(self, slot: int) -> None:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                signal.set_wakeup_fd(-1)
                for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGUSR1):
                    signal.signal(sig, signal.SIG_DFL)
                with contextlib.suppress(OSError, AttributeError):
                    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
                os.close(self.ready_r)
                self.wake_r.close()
                self.wake_w.close()
                os.write(self.ready_w, f"{slot} {os.getpid()}\n".encode())
                os.close(self.ready_w)
                serve(self.listener)
            finally:
                os._exit(code)
        self.children[pid] = slot

    def run(self) -> int:
        signal.set_wakeup_fd(self.wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, lambda *_: None)
        for slot in range(self.target):
            self.spawn(slot)
        ready = 0
        poller = select.poll()
        poller.register(self.ready_r, select.POLLIN)
        poller.register(self.wake_r.fileno(), select.POLLIN)
        while True:
            for fd, _ev in poller.poll():
                if fd == self.ready_r:
                    self.pending += os.read(self.ready_r, 4096)
                    *lines, self.pending = self.pending.split(b"\n")
                    for line in lines:
                        slot, pid = (int(x) for x in line.split())
                        emit("worker.ready", worker_pid=pid, worker_slot=slot)
                        ready += 1
                        if ready == self.target:
                            emit("baseline.ready", workers=self.target)
                    continue
                with contextlib.suppress(BlockingIOError):
                    signums = self.wake_r.recv(256)
                    for signum in signums:
                        if signum == signal.SIGTERM:
                            for pid in self.children:
                                with contextlib.suppress(ProcessLookupError):
                                    os.kill(pid, signal.SIGKILL)
                            return 0
                        if signum == signal.SIGUSR1 and self.scale_to > self.target:
                            for slot in range(self.target, self.scale_to):
                                self.spawn(slot)
                            self.target = self.scale_to
                self.reap()

    def reap(self) -> None:
        while True:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = self.children.pop(pid, None)
            if slot is not None:
                emit("worker.exited", worker_pid=pid, worker_slot=slot)
                self.spawn(slot)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--scale-to", type=int, default=0)
    args = p.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", args.port))
    listener.listen(4096)
    listener.setblocking(False)
    emit("baseline.started", impl="python", port=listener.getsockname()[1],
         workers=args.workers, python=sys.version.split()[0])
    if args.workers <= 0:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
        serve(listener)
        return 0
    return PreFork(listener, args.workers, args.scale_to).run()


if __name__ == "__main__":
    sys.exit(main())
