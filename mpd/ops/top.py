"""`mpdctl top`: a live view of every slot, refreshed in place on a terminal (as `pm2 monit`
and `circus-top` do), or a number of frames printed one after another for scripts.

It is mpdctl's own view over `status` (with {"usage": true}: CPU seconds and resident
memory of each process, from /proc): the daemon serves no command of its own for it.
Rates are differences between two samples over the time between them: requests/s and
hand-offs/s (ADOPT taken) of each worker, and its CPU% (of one core). A worker seen for
the first time (just started) shows "-" until the next sample.

On a terminal: the screen is redrawn every --interval seconds; `q` (or Ctrl-C) quits, and
the terminal is put back as it was, whatever happened. Elsewhere (a pipe, a file):
--frames frames (default 1), each after --interval seconds, then exit 0."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import sys
import termios
import time
import tty
from collections.abc import Iterator
from typing import Any, Callable, TextIO

from mpd.ops import tables

Reply = dict[str, Any]
Send = Callable[..., Reply]  # send("status", usage=True) -> the reply

COLUMNS = ("SLOT", "PID", "STATE", "CLIENTS", "REQ/S", "HANDOFF/S", "CPU%", "RSS", "RESTARTS",
           "UPTIME")
CLEAR = "\x1b[H\x1b[2J"  # cursor home, erase the screen
HIDE_CURSOR, SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"


class Sample:
    """One status reply and when it was taken."""

    def __init__(self, reply: Reply, at: float):
        self.reply = reply
        self.at = at
        self.by_pid = {w["pid"]: w for w in reply["workers"]}


def rate(now: Sample, before: Sample | None, pid: int, key: str, scale: float = 1.0) -> str:
    """The per-second change of a worker's figure between two samples, or "-"."""
    if before is None or now.at <= before.at or key not in before.by_pid.get(pid, {}):
        return "-"
    delta = now.by_pid[pid].get(key, 0) - before.by_pid[pid][key]
    per_second = max(0.0, delta / (now.at - before.at)) * scale
    return f"{per_second:.1f}" if scale != 1.0 else f"{per_second:.0f}"


def size(rss: int | None) -> str:
    if rss is None:
        return "-"
    if rss < 1024:
        return f"{rss} B"
    value = float(rss)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GiB":
            break
    return f"{value:.1f} {unit}"


def frame(now: Sample, before: Sample | None) -> list[str]:
    """The lines of one frame."""
    m, totals = now.reply["master"], now.reply["totals"]
    head = [f"mpd {m['version']}  pid {m['pid']}  {m['state']}  up "
            f"{tables.duration(m['uptime'])}  workers {m['ready']}/{m['workers']} ready  "
            f"clients {totals.get('clients', 0)}  master CPU "
            f"{master_cpu(now, before)}  RSS {size(m.get('rss'))}",
            f"since start: requests {totals['requests']}  hand-offs {totals['adopted']}  "
            f"refused {totals['refused']}  protocol errors {totals['protocol_errors']}  "
            f"overflows {totals['overflows']}  restarts {totals['restarts']}", ""]
    rows = [[str(w["slot"]), str(w["pid"]), w["state"], str(w["clients"]),
             rate(now, before, w["pid"], "requests"), rate(now, before, w["pid"], "adopted"),
             rate(now, before, w["pid"], "cpu_seconds", 100.0), size(w.get("rss")),
             str(w["restarts"]), tables.duration(w["uptime"])]
            for w in now.reply["workers"]]
    return head + tables.table(COLUMNS, rows)


def master_cpu(now: Sample, before: Sample | None) -> str:
    m = now.reply["master"]
    if before is None or "cpu_seconds" not in m or now.at <= before.at:
        return "-"
    spent = m["cpu_seconds"] - before.reply["master"].get("cpu_seconds", 0.0)
    return f"{max(0.0, spent) * 100 / (now.at - before.at):.1f}%"


def samples(send: Send) -> Iterator[Sample]:
    while True:
        yield Sample(send("status", usage=True), time.monotonic())


def view(send: Send, args: Any) -> int:
    """mpdctl top: `send` makes one request; args has interval and frames."""
    if os.isatty(sys.stdin.fileno()) and os.isatty(sys.stdout.fileno()):
        return live(send, args.interval, sys.stdin, sys.stdout)
    return printed(send, args.interval, args.frames, sys.stdout)


def printed(send: Send, interval: float, frames: int, out: TextIO) -> int:
    """Not on a terminal: a baseline sample, then `frames` frames `interval` apart."""
    before = Sample(send("status", usage=True), time.monotonic())
    for i in range(frames):
        time.sleep(interval)  # the span the rates are measured over
        now = Sample(send("status", usage=True), time.monotonic())
        if i:
            out.write("\n")
        out.write("\n".join(frame(now, before)) + "\n")
        out.flush()
        before = now
    return 0


def live(send: Send, interval: float, keys: TextIO, out: TextIO) -> int:
    """On a terminal: redraw every `interval` seconds until `q` or Ctrl-C."""
    fd = keys.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)  # keys one at a time, unechoed; Ctrl-C still interrupts
        out.write(HIDE_CURSOR)
        before: Sample | None = None
        for now in samples(send):
            width, height = shutil.get_terminal_size()
            lines = [line[:width] for line in frame(now, before)][:max(1, height - 1)]
            out.write(CLEAR + "\n".join(lines) + "\n(q quits)")
            out.flush()
            before = now
            if quit_pressed(fd, interval):
                return 0
    except KeyboardInterrupt:
        return 0
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        out.write(SHOW_CURSOR + "\n")
        out.flush()
    return 0  # not reached: samples() never ends


def quit_pressed(fd: int, interval: float) -> bool:
    """Wait up to `interval` seconds for keys; True when one of them is q."""
    deadline = time.monotonic() + interval
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        with contextlib.suppress(InterruptedError):
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                typed = os.read(fd, 64)
                if not typed or b"q" in typed.lower():
                    return True
