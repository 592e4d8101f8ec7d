#!/usr/bin/env python3
"""Upgrade in place under live connections: how long `mpdctl upgrade` takes, per slot,
and what clients see meanwhile.

    python scripts/bench/upgrade.py                       # 4 workers, 1,000 connections
    python scripts/bench/upgrade.py --conns 200 --rounds 1

mpd runs from a copy of this checkout's mpd/ package (the "installed" code); each round
starts it, opens the keyed connections (a `C` frame, then a ping every --interval seconds
each), bumps the copy's __version__, asks for the upgrade over the control socket and
keeps pinging until upgrade.done and --after seconds more. Reported: the upgrade's
duration and each slot's replacement time (from mpd's own log), the reply latency p50,
p99 and max before and during the roll, replies/s, and errors (any reset, refusal, EOF
or wrong reply). Standard library only; results in bench-results/upgrade-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import selectors
import shutil
import socket
import struct
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import common
import harness
import tools

PING = b"Mupgrade bench ping\0"
REPLY = b"hello, server ping!\0"


class Clients:
    """Keyed connections pinging at a steady pace from one selector loop."""

    def __init__(self, port: int, count: int, interval: float, seed: int):
        rng = random.Random(seed)
        self.selector = selectors.DefaultSelector()
        self.interval = interval
        self.samples: list[tuple[float, float]] = []  # (reply time, latency)
        self.errors: list[str] = []
        self.conns = []
        for i in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.setblocking(False)
            key = rng.randint(-2**31, 2**31 - 1)
            state = {"sock": sock, "buf": b"", "sent": 0.0,
                     "due": time.monotonic() + interval * i / count}
            sock.sendall(b"C" + struct.pack("<i", key))
            self.selector.register(sock, selectors.EVENT_READ, state)
            self.conns.append(state)

    def run_until(self, stop: float) -> None:
        while True:
            now = time.monotonic()
            if now >= stop:
                return
            for state in self.conns:
                if not state["sent"] and now >= state["due"]:
                    try:
                        state["sock"].send(PING)
                    except OSError as e:
                        self.fail(state, f"send: {e}")
                        continue
                    state["sent"] = now
            for key, _ in self.selector.select(0.002):
                self.on_readable(key.data)

    def on_readable(self, state: dict[str, Any]) -> None:
        try:
            data = state["sock"].recv(4096)
        except BlockingIOError:
            return
        except OSError as e:
            self.fail(state, f"recv: {e}")
            return
        if not data:
            self.fail(state, "EOF")
            return
        state["buf"] += data
        while len(state["buf"]) >= len(REPLY):
            reply, state["buf"] = state["buf"][:len(REPLY)], state["buf"][len(REPLY):]
            now = time.monotonic()
            if reply != REPLY or not state["sent"]:
                self.fail(state, f"unexpected reply {reply!r}")
                return
            self.samples.append((now, now - state["sent"]))
            state["sent"] = 0.0
            state["due"] = now + self.interval

    def fail(self, state: dict[str, Any], why: str) -> None:
        self.errors.append(why)
        self.selector.unregister(state["sock"])
        state["sock"].close()
        self.conns.remove(state)

    def close(self) -> None:
        for state in self.conns:
            state["sock"].close()
        self.selector.close()


def control(path: Path, command: str) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(json.dumps({"version": 1, "command": command}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            data += sock.recv(65536)
    return json.loads(data)


def latency_summary(samples: list[tuple[float, float]], start: float, end: float
                    ) -> dict[str, float]:
    window = sorted(lat for t, lat in samples if start <= t < end)
    if not window:
        return {"replies": 0}
    return {"replies_per_s": round(len(window) / max(end - start, 1e-9)),
            "p50_ms": round(common.pct(window, 0.5) * 1000, 2),
            "p99_ms": round(common.pct(window, 0.99) * 1000, 2),
            "max_ms": round(window[-1] * 1000, 2)}


def ts(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["ts"].replace("Z", "+00:00")).timestamp()


def one_round(args: argparse.Namespace, workdir: Path, python: str, n: int) -> dict[str, Any]:
    home = workdir / f"installed-{n}"
    shutil.copytree(common.ROOT / "mpd", home / "mpd", ignore=shutil.ignore_patterns("__pycache__"))
    sock_path = workdir / f"mpd-{n}.sock"
    config = workdir / f"mpd-{n}.toml"
    config.write_text(f"[server]\nport = 0\n{harness.run_as(common.ROOT)}"
                      f"[workers]\nworkers = {args.workers}\n"
                      f"[control]\nsocket = \"{sock_path}\"\n")
    server = harness.Server(f"mpd-upgrade-{n}", "mpd", [python, "-m", "mpd.cli", "--config",
                                                     str(config)],
                        None, workdir, lambda e: e.get("event") == "mpd.ready",
                        config_path=config, workers=args.workers, cwd=home)
    server.start()
    clients = Clients(server.port, args.conns, args.interval, seed=n)
    try:
        clients.run_until(time.monotonic() + args.before)
        init = home / "mpd" / "__init__.py"
        init.write_text(init.read_text().replace('__version__ = "', '__version__ = "9.'))
        mark = server.tail.mark()
        started = time.monotonic()
        reply = control(sock_path, "upgrade")
        assert reply.get("ok"), reply
        while not any(e.get("event") in ("upgrade.done", "upgrade.failed")
                      for e in server.tail.since(mark)):
            clients.run_until(time.monotonic() + 0.05)
            if time.monotonic() - started > 60:
                raise SystemExit("upgrade: no upgrade.done within 60 s")
        done_at = time.monotonic()
        clients.run_until(done_at + args.after)
        events = server.tail.since(mark)
    finally:
        clients.close()
        server.stop()
    by_name = {e["event"]: e for e in events}
    if "upgrade.failed" in by_name:
        raise SystemExit(f"upgrade failed: {by_name['upgrade.failed']}")
    slots = [e["seconds"] for e in events if e["event"] == "upgrade.slot_replaced"]
    return {
        "upgrade_s": round(ts(by_name["upgrade.done"]) - ts(by_name["upgrade.started"]), 3),
        "preflight_s": round(ts(by_name["upgrade.exec"]) - ts(by_name["upgrade.started"]), 3),
        "exec_to_adopted_s": round(ts(by_name["upgrade.adopted"])
                                   - ts(by_name["upgrade.exec"]), 3),
        "roll_s": by_name["upgrade.done"]["seconds"], "slot_s": slots,
        "before": latency_summary(clients.samples, started - args.before, started),
        "during": latency_summary(clients.samples, started, done_at),
        "after": latency_summary(clients.samples, done_at, done_at + args.after),
        "errors": clients.errors, "connections": args.conns,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--conns", type=int, default=1000)
    p.add_argument("--interval", type=float, default=0.1, help="seconds between a "
                   "connection's pings")
    p.add_argument("--before", type=float, default=2.0)
    p.add_argument("--after", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--mpd-python")
    p.add_argument("--out", default=str(common.ROOT / "bench-results"))
    args = p.parse_args(argv)
    common.raise_nofile()
    python = tools.find_mpd_python(args.mpd_python)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    workdir = Path(args.out) / f"upgrade-{stamp}"
    workdir.mkdir(parents=True)
    rounds = [one_round(args, workdir, python, n) for n in range(args.rounds)]
    result = {"workers": args.workers, "conns": args.conns, "interval": args.interval,
              "rounds": rounds, "machine": {"cpus": os.cpu_count(), "python": sys.version}}
    (Path(args.out) / f"upgrade-{stamp}.json").write_text(json.dumps(result, indent=2))
    print(f"upgrade of {args.workers} workers with {args.conns} connections pinging every "
          f"{args.interval:g} s; {args.rounds} rounds\n")
    print("| round | upgrade s | pre-flight s | exec to adopted s | roll s | per slot s | "
          "p99 ms before / during | max ms before / during | replies/s before / during "
          "| errors |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, r in enumerate(rounds):
        b, d = r["before"], r["during"]
        print(f"| {n} | {r['upgrade_s']} | {r['preflight_s']} | {r['exec_to_adopted_s']} | "
              f"{r['roll_s']} | {', '.join(f'{s:g}' for s in r['slot_s'])} | "
              f"{b.get('p99_ms')} / {d.get('p99_ms')} | {b.get('max_ms')} / {d.get('max_ms')} "
              f"| {b.get('replies_per_s')} / {d.get('replies_per_s')} | {len(r['errors'])} |")
    return 0 if all(not r["errors"] for r in rounds) else 1


if __name__ == "__main__":
    sys.exit(main())
