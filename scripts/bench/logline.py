#!/usr/bin/env python3
"""The cost of one `fd.dispatched` info line, the line mpd logs per hand-off.

    python scripts/bench/logline.py > /dev/null        # JSON line, stdout on /dev/null
    python scripts/bench/logline.py > /tmp/x.log       # JSON line, stdout a regular file
    python scripts/bench/logline.py --journal          # journald's native protocol, to a
                                                       # socket this script reads
Run it from a checkout (it imports the mpd beside it), so that two versions can be compared
side by side. It prints, on stderr, the best of 7 rounds in microseconds per line and how
many lines were dropped (a queue that overflowed would make lines look cheap). On a pipe a
timeit loop outruns any reader, so the figure there says more about the reader."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from mpd.logs import log as logmod  # noqa: E402
from mpd.system import systemd  # noqa: E402

try:
    from mpd.logs import journal as journalmod  # noqa: E402
except ImportError:  # an older mpd: journald's protocol was in mpd/system/systemd.py
    journalmod = systemd

NUMBER = 200_000
FIELDS = {"key": 123456789, "from_slot": 0, "from_pid": 4242, "to_slot": 1, "to_pid": 4343,
          "carried": 23, "latency_us": 42}


def json_line() -> float:
    logmod.configure("info", "json", "stdout", "")
    logmod.set_role("worker", 1)
    log = logmod.get_logger()

    def line() -> None:
        log.info("fd.dispatched", **FIELDS)
    return min(timeit.repeat(line, number=NUMBER, repeat=7)) / NUMBER


def journal_line() -> float:
    """Lines to a datagram socket standing in for journald's: 8 at a time (its queue
    holds net.unix.max_dgram_qlen, 10 by default), read between batches, off the clock."""
    path = os.path.join(tempfile.mkdtemp(), "journal")
    reader = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    reader.bind(path)
    reader.setblocking(False)
    st = os.fstat(1)
    os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    journalmod.JOURNAL_SOCKET = path
    if hasattr(systemd, "JournalSender"):  # an older mpd: a blocking sender
        systemd.JournalSender.__init__.__defaults__ = (path,)
    logmod.configure("info", "auto" if hasattr(logmod, "prepare") else "json", "stdout", "")
    logmod.set_role("worker", 1)
    log = logmod.get_logger()
    best = 1.0
    for _ in range(7):
        total = 0.0
        for _ in range(5000):
            start = time.perf_counter()
            for _ in range(8):
                log.info("fd.dispatched", **FIELDS)
            total += time.perf_counter() - start
            try:
                while True:
                    reader.recv(65536)
            except BlockingIOError:
                pass
        best = min(best, total / 40_000)
    return best


def main() -> None:
    journal = "--journal" in sys.argv[1:]
    best = journal_line() if journal else json_line()
    kind = "journald" if journal else {
        0o010000: "pipe", 0o020000: "char device", 0o100000: "file",
        0o140000: "socket"}.get(os.fstat(1).st_mode & 0o170000, "other")
    dropped = getattr(logmod, "dropped_total", lambda: "n/a")()  # older mpd: no queue
    print(f"fd.dispatched line: {best * 1e6:.2f} us (to: {kind}; lines dropped: {dropped})",
          file=sys.stderr)


if __name__ == "__main__":
    main()
