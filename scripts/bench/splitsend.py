"""The seed's mpclient2 against mpd and against servers without quick-ACK.

mpclient2 (built from the seed article) opens N connections, sends `C` and a key on each
in two send() calls, then loops over them: `M` in one send(), its text in another, wait
for the reply, sleep. Nagle's algorithm holds the text until the `M` is acknowledged, and
a server that delays its ACK (Linux: about 40 ms) makes every message wait that long; the
client's own pause bounds it otherwise (10 clients, 10 ms: about 580 replies in 6 s). A
server that sets TCP_QUICKACK when a read leaves a frame incomplete acknowledges the `M` at
once. Each round runs one mpclient2 against every server at the same time (they sleep
most of it) and counts the replies in a fixed window from the first one."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import time
from typing import Any

from common import NPROC, median, progress, ratio
from harness import Bench, Server

CLIENTS = 10
PAUSE_MS = 10
REPLY_LINE = b"recv from server:"
PAIRS = [("mpd", "c"), ("py-rawfd quickack", "c"), ("mpd", "py-rawfd quickack")]


def scenario_splitsend(b: Bench) -> dict[str, Any]:
    a = b.args
    seconds = a.splitsend_seconds
    title = (f"splitsend (the seed's mpclient2: {CLIENTS} clients, {PAUSE_MS} ms pause, "
             f"replies in {seconds:g} s from the first)")
    client = b.tools.build_mpclient2()
    if client is None:
        b.report.heading(title)
        b.report.note(f"Skipped: {b.tools.mpclient2_missing}.")
        return {"skipped": b.tools.mpclient2_missing}
    candidates: list[tuple[str, Server | None]] = [
        ("mpd", b.mpd(f"mpd-{NPROC}w-splitsend", NPROC, None)),
        ("c", b.c_baseline("c-1p-splitsend", 0, None)),
        ("py-rawfd quickack", b.rawfd_baseline("py-rawfd-quickack", None, quickack=True))]
    servers = {name: server.start() for name, server in candidates if server is not None}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
    for r in range(a.rounds):
        for name, res in run_clients(client, servers, seconds).items():
            res["round"] = r
            runs[name].append(res)
        progress(f"splitsend round {r + 1}/{a.rounds}: " + ", ".join(
            f"{name} {runs[name][-1]['replies']}" for name in servers))
    tables(b, title, runs, seconds)
    return {"clients": CLIENTS, "pause_ms": PAUSE_MS, "seconds": seconds, "runs": runs,
            "workers": NPROC}


def run_clients(client: str, servers: dict[str, Server],
                seconds: float) -> dict[str, dict[str, Any]]:
    """One mpclient2 per server, all at once; replies counted from each one's first."""
    procs = {name: subprocess.Popen([client, "127.0.0.1", str(s.port), str(CLIENTS),
                                     str(PAUSE_MS)], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True)
             for name, s in servers.items()}
    first: dict[str, float] = {}
    replies = dict.fromkeys(procs, 0)
    errors: dict[str, list[str]] = {name: [] for name in procs}
    pending = dict.fromkeys(procs, b"")
    deadline = time.monotonic() + seconds + 15  # the first reply comes within ~0.5 s
    try:
        with selectors.DefaultSelector() as sel:
            for name, proc in procs.items():
                assert proc.stdout is not None
                sel.register(proc.stdout, selectors.EVENT_READ, name)
            while sel.get_map():
                now = time.monotonic()
                if now > deadline or (len(first) == len(procs)
                                      and now > max(first.values()) + seconds):
                    break
                for key, _ in sel.select(0.05):
                    name = key.data
                    now = time.monotonic()
                    data = os.read(key.fd, 65536)
                    if not data:
                        sel.unregister(key.fileobj)
                        continue
                    *lines, pending[name] = (pending[name] + data).split(b"\n")
                    for line in lines:
                        if line.startswith(REPLY_LINE):
                            first.setdefault(name, now)
                            if now <= first[name] + seconds:
                                replies[name] += 1
                        elif b"error" in line:
                            errors[name].append(line.decode(errors="replace"))
    finally:
        for proc in procs.values():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if proc.stdout:
                proc.stdout.close()
    return {name: {"replies": replies[name] if name in first else 0,
                   "per_client": replies[name] / CLIENTS, "errors": errors[name],
                   "answered": name in first} for name in procs}


def tables(b: Bench, title: str, runs: dict[str, list[dict[str, Any]]],
           seconds: float) -> None:
    b.report.heading(title)
    b.report.table(["server", "replies (median)", "per client", "per round", "errors"],
                   [[name, median([r["replies"] for r in rs]),
                     median([r["per_client"] for r in rs]),
                     " ".join(str(r["replies"]) for r in rs),
                     sum(len(r["errors"]) for r in rs)] for name, rs in runs.items()])
    b.report.table(["ratio", "replies (median of per-round ratios)"],
                   [[f"{x} / {y}", median([ratio(rx["replies"], ry["replies"])
                                           for rx, ry in zip(runs[x], runs[y])])]
                    for x, y in PAIRS if x in runs and y in runs])
    b.report.note(f"mpd with {NPROC} workers (the `C` frames hand half the clients over); "
                  "c = baseline_epoll.c, which delays its ACKs as the seed's server does; "
                  "py-rawfd quickack = baseline_rawfd.py --quickack, the reference: "
                  "TCP_QUICKACK whenever a read leaves a frame incomplete. Without quick-ACK "
                  f"each message waits ~40 ms for the ACK of its `M`: about "
                  f"{seconds / (0.04 + PAUSE_MS / 1000) :.0f} replies in {seconds:g} s; the "
                  f"client's pause alone allows about {seconds / (PAUSE_MS / 1000):.0f}.")
