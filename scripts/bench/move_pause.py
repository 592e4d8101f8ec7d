#!/usr/bin/env python3
"""The pause a key group's members see when the group moves to another worker with its
state (issue 23), against a plain hand-off of the same connections in the same run; and
a whole `mpdctl scale` that moves 1,000 groups.

    python scripts/bench/move_pause.py                    # 10/100/1,000 members x 1 KiB/
                                                          # 100 KiB/1 MiB, then the scale
    python scripts/bench/move_pause.py --members 100 --state 102400 --moves 30
    python scripts/bench/move_pause.py --quick            # a second or so: the smoke test

mpd runs the counting rooms of tests/appkit (rooms whose state is their count of lines,
padded to a given size with "#pad N") on 2 workers. For each size of room, its members
join it; about half of them land on the other worker first and are handed off to the
room's (HANDOFF, ADOPT: the plain hand-off, measured by mpd from HANDOFF sent to ADOPT
taken, the mpd_handoff_latency histogram, taken before and after the joins). Then for
each state size the room moves back and forth between the two slots (`mpdctl move`,
over the control socket) --moves times, while every member keeps one request in flight
("#where", answered by the worker that serves it):

- pause (mpd): freeze on the old owner to restored on the new one, as the new owner
  logs it (group.moved pause_ms; the same clock in both processes);
- member's wait: each member's longest round trip during the move, less its median
  round trip outside moves (what the move added to what it saw);
- ratio: the pause's p99 over the plain hand-off's p99 (HANDOFF sent to ADOPT taken).

The scale: --groups rooms of --group-members members each on 2 workers, then
`scale 4` and `scale 2` (each returns once no group moves); reported: the scale's
seconds and the pauses of every group that moved (group.moved). Results in
bench-results/move_pause-<time>.json; the tables on stdout, for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import selectors
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import common
import harness
import tools
from common import pct, progress

from mpd.wire import latency

APPKIT = common.ROOT / "tests"
WHERE = b"#where\n"


def join_frame(name: bytes) -> bytes:
    return b"J" + bytes([len(name)]) + name


class Members:
    """The members of one room, each with one "#where" in flight while `running`."""

    def __init__(self, port: int, room: bytes, count: int):
        self.room = room
        self.socks: list[socket.socket] = []
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            sock.sendall(join_frame(room))
            self.socks.append(sock)
        for sock in self.socks:
            expect(sock, b"ok ")
        self.sent = [0.0] * count
        self.rtts: list[list[tuple[float, float]]] = [[] for _ in range(count)]  # (at, rtt)
        self.errors: list[str] = []
        self.running = threading.Event()
        self.halt = threading.Event()
        self.thread: threading.Thread | None = None

    def ask(self, line: bytes) -> bytes:
        """A command from the first member, outside the probing (blocking)."""
        self.socks[0].sendall(line)
        return expect(self.socks[0], b"")

    def start(self) -> None:
        for sock in self.socks:
            sock.setblocking(False)
        self.halt.clear()
        self.thread = threading.Thread(target=self.probe, daemon=True)
        self.thread.start()

    def probe(self) -> None:
        sel = selectors.DefaultSelector()
        bufs = [b""] * len(self.socks)
        for n, sock in enumerate(self.socks):
            sel.register(sock, selectors.EVENT_READ, n)
        idle = True
        while not self.halt.is_set():
            if self.running.is_set() and idle:
                idle = False
                now = time.monotonic()
                for n, sock in enumerate(self.socks):
                    self.sent[n] = now
                    sock.send(WHERE)
            for key, _ in sel.select(0.01):
                n = key.data
                try:
                    data = self.socks[n].recv(4096)
                except BlockingIOError:
                    continue
                if not data:
                    self.errors.append(f"member {n} closed")
                    sel.unregister(self.socks[n])
                    continue
                bufs[n] += data
                while b"\n" in bufs[n]:
                    line, _, bufs[n] = bufs[n].partition(b"\n")
                    now = time.monotonic()
                    if not line.startswith(b"where "):
                        self.errors.append(f"member {n}: {line[:60]!r}")
                    self.rtts[n].append((now, now - self.sent[n]))
                    if self.running.is_set():
                        self.sent[n] = now
                        self.socks[n].send(WHERE)
                    else:
                        self.sent[n] = 0.0
            if not self.running.is_set() and not any(self.sent):
                idle = True
        sel.close()

    def stop(self) -> None:
        self.running.clear()
        wait(lambda: not any(self.sent), 30, "the members' last answers")
        self.halt.set()
        if self.thread is not None:
            self.thread.join(10)
        for sock in self.socks:
            sock.setblocking(True)

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


def expect(sock: socket.socket, prefix: bytes) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError("closed by the server")
        line += chunk
    if not line.startswith(prefix):
        raise AssertionError(f"expected {prefix!r}, got {line!r}")
    return line.rstrip(b"\n")


def wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.002)
    return value


class Daemon:
    """mpd with the counting rooms, and its control socket."""

    def __init__(self, workdir: Path, python: str, workers: int, name: str):
        self.sock_path = Path(tempfile.mkdtemp(prefix="mpd-move-")) / "mpd.sock"
        config = workdir / f"{name}.toml"
        config.write_text(f"[server]\nport = 0\nprotocol = \"appkit.counting:application\"\n"
                          f"{harness.run_as(common.ROOT)}"
                          f"[workers]\nworkers = {workers}\nmax_clients = 20000\n"
                          f"[control]\nsocket = \"{self.sock_path}\"\n")
        self.server = harness.Server(name, "mpd", [python, "-m", "mpd.cli", "--config",
                                                   str(config)], None, workdir,
                                     lambda e: e.get("event") == "mpd.ready",
                                     config_path=config, workers=workers,
                                     env={"PYTHONPATH": str(APPKIT)})
        self.server.start()

    def control(self, command: str, **fields: Any) -> dict[str, Any]:
        reply = harness.control_request(str(self.sock_path), {"command": command, **fields})
        if not reply.get("ok"):
            raise RuntimeError(f"{command}: {reply.get('error')}")
        return reply

    def status(self) -> dict[str, Any]:
        return self.control("status")

    def where(self, room: bytes) -> dict[str, Any]:
        return self.control("where", key={"hex": room.hex()})

    def settled(self) -> bool:
        st = self.status()
        groups = st["master"]["groups"]
        return not groups["under_way"] and not groups["queued"] and all(
            w["state"] == "ready" for w in st["workers"]) and st["master"]["ready"] == len(
            st["workers"])

    def moved(self, mark: int) -> list[dict[str, Any]]:
        return [e for e in self.server.tail.since(mark) if e.get("event") == "group.moved"]

    def stop(self) -> None:
        self.server.stop()


def handoff_buckets(daemon: Daemon) -> list[int]:
    """The hand-off latency histogram's counts per bucket (latency.BOUNDS_US, then +Inf),
    from `mpdctl metrics`' mpd_handoff_latency_seconds (cumulative there)."""
    text = daemon.control("metrics")["text"]
    cumulative = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith("mpd_handoff_latency_seconds_bucket{")]
    assert len(cumulative) == len(latency.BOUNDS_US) + 1, cumulative
    return [int(c - b) for c, b in zip(cumulative, [0.0, *cumulative[:-1]])]


def handoff_latency(before: list[int], after: list[int]) -> dict[str, Any]:
    """The hand-offs between two looks at the histogram (their difference)."""
    buckets = latency.minus(after, before)
    count = sum(buckets)
    return {"count": count, **{f"p{int(q * 100)}_ms": round(latency.quantile(buckets, q) /
                                                               1000, 3) if count else None
                               for q in (0.5, 0.99)}}


def summary(values: list[float]) -> dict[str, float | int]:
    return {"n": len(values), "p50_ms": round(pct(values, 0.5), 3),
            "p99_ms": round(pct(values, 0.99), 3), "max_ms": round(max(values), 3)
            if values else float("nan")}


def room_case(daemon: Daemon, members: int, states: list[int], moves: int, n: int
              ) -> list[dict[str, Any]]:
    """One room of `members`: joined (the hand-offs), then moved `moves` times per state
    size, probed by its members."""
    room = b"bench-%d-%d" % (members, n)
    time.sleep(harness.HEARTBEAT_SETTLE)  # every hand-off so far in the workers' heartbeats
    before = handoff_buckets(daemon)
    group = Members(daemon.server.port, room, members)
    time.sleep(harness.HEARTBEAT_SETTLE)  # the workers' next heartbeats count the joins
    handoff = handoff_latency(before, handoff_buckets(daemon))
    results = []
    try:
        for size in states:
            assert group.ask(b"#pad %d\n" % size) == b"pad %d" % size
            group.start()
            try:
                results.append(move_case(daemon, group, members, size, moves, handoff))
            finally:
                group.stop()
            progress(f"{members} members, {size} B of state: pause p99 "
                     f"{results[-1]['pause']['p99_ms']} ms, member's wait p99 "
                     f"{results[-1]['wait']['p99_ms']} ms, hand-off p99 {handoff['p99_ms']} ms")
    finally:
        group.close()
    return results


def move_case(daemon: Daemon, group: Members, members: int, size: int, moves: int,
              handoff: dict[str, Any]) -> dict[str, Any]:
    pauses: list[float] = []
    waits: list[float] = []
    windows: list[tuple[float, float]] = []
    for n in range(moves):
        group.running.set()
        time.sleep(0.05)  # round trips outside the move first
        slot = daemon.where(group.room)["slot"]
        mark = daemon.server.tail.mark()
        t0 = time.monotonic()
        daemon.control("move", key={"hex": group.room.hex()}, slot=1 - slot)
        # The new owner's log line says it is done (polling the log costs the daemon
        # nothing; polling `where` would ask the worker each time).
        moved = wait(lambda m=mark: daemon.moved(m), 60, f"move {n} of {group.room!r}")
        t1 = time.monotonic()
        time.sleep(0.05)
        assert daemon.where(group.room)["slot"] == 1 - slot
        group.running.clear()
        wait(lambda: not any(group.sent), 30, "the members' answers")
        pauses.append(moved[0]["pause_ms"])
        windows.append((t0, t1))
    if group.errors:
        raise RuntimeError(f"members saw errors: {group.errors[:5]}")
    for rtts in group.rtts:
        outside = [rtt for at, rtt in rtts if not any(a <= at <= b + 0.05 for a, b in windows)]
        typical = pct(outside, 0.5) if outside else 0.0
        for a, b in windows:
            inside = [rtt for at, rtt in rtts if a <= at <= b + 0.05]
            if inside:
                waits.append(max(0.0, max(inside) - typical) * 1000)
        rtts.clear()
    pause = summary(pauses)
    return {"members": members, "state_bytes": size, "moves": moves, "pause": pause,
            "wait": summary(waits), "handoff": handoff,
            "ratio_p99": round(common.ratio(pause["p99_ms"], handoff["p99_ms"]), 1)}


def scale_case(daemon: Daemon, groups: int, per_group: int, state: int) -> dict[str, Any]:
    """`groups` rooms on 2 workers, then scale 4 and scale 2: each scale's seconds and the
    pauses of the groups it moved."""
    rooms = []
    for n in range(groups):
        rooms.append(Members(daemon.server.port, b"scale-%d" % n, per_group))
        if state:
            rooms[-1].ask(b"#pad %d\n" % state)
    out: dict[str, Any] = {"groups": groups, "members": groups * per_group,
                           "state_bytes": state}
    try:
        for count in (4, 2):
            mark = daemon.server.tail.mark()
            t0 = time.monotonic()
            daemon.control("scale", workers=count)
            wait(lambda c=count: daemon.settled() and len(daemon.status()["workers"]) == c,
                 120, f"scale {count}")
            seconds = time.monotonic() - t0
            pauses = [e["pause_ms"] for e in daemon.moved(mark)]
            out[f"scale_{count}"] = {"seconds": round(seconds, 3), "moved": len(pauses),
                                     "pause": summary(pauses)}
            progress(f"scale {count} with {groups} groups: {seconds:.2f} s, {len(pauses)} "
                     f"moved, pause p99 {out[f'scale_{count}']['pause']['p99_ms']} ms")
    finally:
        for room in rooms:
            room.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--members", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--state", type=int, nargs="+", default=[1024, 100 * 1024, 1 << 20],
                   help="bytes of group state (the room's padding)")
    p.add_argument("--moves", type=int, default=20, help="moves per case")
    p.add_argument("--groups", type=int, default=1000, help="rooms in the scale case")
    p.add_argument("--group-members", type=int, default=2)
    p.add_argument("--group-state", type=int, default=1024)
    p.add_argument("--quick", action="store_true", help="one small case of each: a smoke run")
    p.add_argument("--mpd-python")
    p.add_argument("--out", default=str(common.ROOT / "bench-results"))
    args = p.parse_args(argv)
    if args.quick:
        args.members, args.state, args.moves, args.groups = [10], [1024], 2, 20
    common.raise_nofile()
    python = tools.find_mpd_python(args.mpd_python)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    workdir = Path(args.out) / f"move_pause-{stamp}"
    workdir.mkdir(parents=True)
    random.seed(1)
    daemon = Daemon(workdir, python, 2, "mpd-rooms")
    try:
        cases = [case for n, members in enumerate(args.members)
                 for case in room_case(daemon, members, args.state, args.moves, n)]
    finally:
        daemon.stop()
    daemon = Daemon(workdir, python, 2, "mpd-scale")
    try:
        scale = scale_case(daemon, args.groups, args.group_members, args.group_state)
    finally:
        daemon.stop()
    result = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]),
              "cases": cases, "scale": scale,
              "machine": {"cpus": os.cpu_count(), "python": sys.version}}
    (Path(args.out) / f"move_pause-{stamp}.json").write_text(json.dumps(result, indent=2))
    print(f"### move pause\n\n{args.moves} moves per case, 2 workers; pause: mpd's freeze to "
          "restore (group.moved); member's wait: a member's longest round trip during a move "
          "less its median outside; hand-off: HANDOFF sent to ADOPT taken, the same "
          "connections joining the room\n")
    print("| members | state | pause p50 / p99 / max ms | member's wait p50 / p99 / max ms | "
          "hand-off p50 / p99 ms (n) | pause p99 / hand-off p99 |")
    print("|---|---|---|---|---|---|")
    for c in cases:
        pz, wt, h = c["pause"], c["wait"], c["handoff"]
        print(f"| {c['members']} | {c['state_bytes']} B | {pz['p50_ms']} / {pz['p99_ms']} / "
              f"{pz['max_ms']} | {wt['p50_ms']} / {wt['p99_ms']} / {wt['max_ms']} | "
              f"{h['p50_ms']} / {h['p99_ms']} ({h['count']}) | {c['ratio_p99']} |")
    print(f"\n### move scale\n\n{scale['groups']} groups of {args.group_members} members, "
          f"{scale['state_bytes']} B of state each, on 2 workers\n")
    print("| command | seconds | groups moved | pause p50 / p99 / max ms |")
    print("|---|---|---|---|")
    for count in (4, 2):
        s = scale[f"scale_{count}"]
        pz = s["pause"]
        print(f"| `mpdctl scale {count}` | {s['seconds']} | {s['moved']} | {pz['p50_ms']} / "
              f"{pz['p99_ms']} / {pz['max_ms']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
