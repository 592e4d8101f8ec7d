#!/usr/bin/env python3
"""Fallback load generator for machines without a C compiler: the modes, options and
output of loadgen.c (read its header), in Python, spread over several processes (-P,
default one per CPU) because one Python process saturates its core at about the request
rate of the Python server it is measuring. Prefer loadgen.c: run.py uses this only when
`cc` is missing, and its figures then say more about the client than about mpd.

usage: loadgen.py ping|connrate|handoff|idle -p PORT [-H 127.0.0.1] [-c N] [-d SEC]
                  [-w SEC] [-n MAX] [-s SEED] [-i INFLIGHT] [-P PROCS]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import multiprocessing
import os
import random
import resource
import select
import socket
import struct
import sys
import time
from typing import Any

PING = b"hello, client ping!\0"
REPLY_LEN = 20


def start_connect(addr: tuple[str, int], nodelay: bool = False) -> socket.socket | None:
    """A non-blocking socket with its connect under way; None if connect failed at once."""
    s = socket.socket()
    s.setblocking(False)
    if nodelay:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        s.connect(addr)
    except BlockingIOError:
        pass
    except OSError:
        s.close()
        return None
    return s


def establish(addr: tuple[str, int], n: int, inflight: int,
              limit: float) -> tuple[list[socket.socket], int]:
    """n connections, each pinged once; returns (established, lost)."""
    ready: list[socket.socket] = []
    lost = 0
    pending: dict[int, tuple[socket.socket, int]] = {}  # fd -> (sock, bytes got)
    ep = select.epoll()
    opened = 0
    deadline = time.monotonic() + limit
    while len(ready) + lost < n and time.monotonic() < deadline:
        while opened < n and len(pending) < inflight:
            opened += 1
            s = start_connect(addr, nodelay=True)
            if s is None:
                lost += 1
                continue
            pending[s.fileno()] = (s, -1)
            ep.register(s.fileno(), select.EPOLLOUT)
        for fd, _ev in ep.poll(0.1):
            s, got = pending[fd]
            try:
                if got < 0:
                    if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                        raise OSError("connect failed")
                    s.send(PING)
                    pending[fd] = (s, 0)
                    ep.modify(fd, select.EPOLLIN)
                    continue
                data = s.recv(4096)
                if not data:
                    raise OSError("eof")
                got += len(data)
                pending[fd] = (s, got)
                if got >= REPLY_LEN:
                    ep.unregister(fd)
                    del pending[fd]
                    ready.append(s)
            except OSError:
                ep.unregister(fd)
                del pending[fd]
                s.close()
                lost += 1
    for s, _got in pending.values():
        s.close()
    ep.close()
    return ready, lost + len(pending)


def worker(args: argparse.Namespace, conns: int, seed: int, pipe: Any) -> None:
    """One process's share of the load; sends its samples back through `pipe`."""
    addr = (args.H, args.p)
    rng = random.Random(seed)
    lat: list[float] = []
    completed = errors = lost = 0
    ep = select.epoll()
    state: dict[int, list[Any]] = {}  # fd -> [sock, phase, got, t0]
    if args.mode == "ping":
        socks, lost = establish(addr, conns, args.i, 30.0)
        pipe.send("ready")
        t_measure, t_end = pipe.recv()
        for s in socks:
            state[s.fileno()] = [s, 2, 0, time.monotonic()]
            ep.register(s.fileno(), select.EPOLLIN)
            s.send(PING)
    else:
        pipe.send("ready")
        t_measure, t_end = pipe.recv()

    def open_one() -> None:
        nonlocal errors
        t0 = time.monotonic()
        s = start_connect(addr)
        if s is None:
            errors += 1
            return
        state[s.fileno()] = [s, 1, 0, t0]
        ep.register(s.fileno(), select.EPOLLOUT)

    cycles = args.mode in ("connrate", "handoff")
    while True:
        now = time.monotonic()
        stop = now >= t_end or completed >= args.n
        if cycles and not stop:
            for _ in range(conns - len(state)):
                open_one()
        if stop and (not cycles or not state or now > t_end + 2):
            break
        for fd, _ev in ep.poll(0.05):
            st = state.get(fd)
            if st is None:
                continue
            s = st[0]
            try:
                if st[1] == 1:
                    if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                        raise OSError("connect failed")
                    key = b""
                    if args.mode == "handoff":
                        key = b"C" + bytes(rng.randrange(1, 256) for _ in range(4))
                    s.send(key + PING)
                    st[1] = 2
                    ep.modify(fd, select.EPOLLIN)
                    continue
                data = s.recv(4096)
                if not data:
                    raise OSError("eof")
                st[2] += len(data)
                if st[2] < REPLY_LEN:
                    continue
                tn = time.monotonic()
                completed += 1
                if t_measure <= tn < t_end:
                    lat.append((tn - st[3]) * 1e6)
                if cycles:  # abortive close (RST): no TIME_WAIT (see loadgen.c)
                    ep.unregister(fd)
                    del state[fd]
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    s.close()
                elif tn < t_end:
                    st[2] -= REPLY_LEN
                    st[3] = tn
                    s.send(PING)
            except OSError:
                errors += 1 if cycles else 0
                lost += 0 if cycles else 1
                ep.unregister(fd)
                del state[fd]
                s.close()
        if not cycles and not state:
            break
    for st in state.values():
        st[0].close()
    pipe.send({"lat": lat, "completed": completed, "errors": errors, "lost": lost,
               "cpu": sum(os.times()[:2])})


def pct(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def run_idle(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    socks, lost = establish((args.H, args.p), args.c, args.i, 60.0)
    print(json.dumps({"event": "idle.ready", "conns": args.c, "established": len(socks),
                      "lost": lost, "setup_s": round(time.monotonic() - t0, 3)}), flush=True)
    select.select([sys.stdin], [], [], args.d)
    for s in socks:
        s.close()
    print(json.dumps({"event": "idle.closed", "conns": len(socks)}), flush=True)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["ping", "connrate", "handoff", "idle"])
    p.add_argument("-H", default="127.0.0.1")
    p.add_argument("-p", type=int, required=True)
    p.add_argument("-c", type=int, default=100)
    p.add_argument("-d", type=float, default=5.0)
    p.add_argument("-w", type=float, default=0.0)
    p.add_argument("-n", type=int, default=100_000_000)
    p.add_argument("-s", type=int, default=0)
    p.add_argument("-i", type=int, default=256)
    p.add_argument("-P", type=int, default=len(os.sched_getaffinity(0)))
    args = p.parse_args()
    if ipaddress.ip_address(args.H) not in ipaddress.ip_network("127.0.0.0/8") or \
            not 0 < args.d <= 3600 or args.c <= 0:
        p.error("need a 127.0.0.0/8 host, -c > 0, 0 < -d <= 3600")
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.mode == "idle":
        return run_idle(args)
    procs = max(1, min(args.P, args.c))
    ctx = multiprocessing.get_context("fork")
    pipes, children = [], []
    for k in range(procs):
        share = args.c // procs + (1 if k < args.c % procs else 0)
        here, there = ctx.Pipe()
        child = ctx.Process(target=worker, args=(args, share, args.s * 1000 + k, there))
        child.start()
        pipes.append(here)
        children.append(child)
    for pipe in pipes:
        if not pipe.poll(60) or pipe.recv() != "ready":
            raise SystemExit("loadgen.py: a worker did not get ready")
    t_measure = time.monotonic() + args.w
    t_end = t_measure + args.d
    for pipe in pipes:
        pipe.send((t_measure, t_end))
    time.sleep(max(0.0, t_measure - time.monotonic()))
    print(json.dumps({"event": "measure.start"}), flush=True)
    time.sleep(max(0.0, t_end - time.monotonic()))
    print(json.dumps({"event": "measure.end"}), flush=True)
    parts = [pipe.recv() for pipe in pipes if pipe.poll(args.d + 30)]
    for child in children:
        child.join(5)
    lat = sorted(x for part in parts for x in part["lat"])
    cpu = sum(part["cpu"] for part in parts)  # the workers' whole lives, setup included
    ops = len(lat)
    print(json.dumps({
        "mode": args.mode, "conns": args.c, "window_s": args.d, "ops": ops,
        "rate": ops / args.d, "completed": sum(pt["completed"] for pt in parts),
        "errors": sum(pt["errors"] for pt in parts), "lost": sum(pt["lost"] for pt in parts),
        "client_cpu_s": cpu, "client_cpu_us_per_op": cpu * 1e6 / ops if ops else 0,
        "lat_us": {"p50": pct(lat, 0.5), "p90": pct(lat, 0.9), "p99": pct(lat, 0.99),
                   "p999": pct(lat, 0.999), "max": lat[-1] if lat else 0,
                   "mean": sum(lat) / ops if ops else 0},
        "hist_us": [], "impl": "python"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
