#!/usr/bin/env python3
"""What the metrics cost, in process: a hand-off's latency observation in the worker
(latency.Histogram.observe), and one rendering of the exposition in the master
(metrics.render of a snapshot like the master's) for a few worker counts.

    python scripts/bench/metrics_cost.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from mpd.master import tally  # noqa: E402
from mpd.ops import metrics  # noqa: E402
from mpd.wire import latency  # noqa: E402


def best_of(fn: Any, number: int, repeat: int = 5) -> float:
    """Seconds per call, the best of `repeat` runs of `number` calls."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - start) / number)
    return best


def snapshot(workers: int) -> dict[str, Any]:
    """A snapshot with usage, shaped like Master.snapshot(usage=True)'s."""
    stats = {name: 12345 for name in tally.COUNTERS} | {"clients": 100, "max_clients": 20000}
    totals = {name: 12345 * workers for name in tally.COUNTERS}
    return {
        "master": {"version": "0.1.0", "log_dropped": 0, "cpu_seconds": 1.5, "rss": 30 << 20,
                   "workers": workers, "ready": workers, "held": 0, "uptime": 100.0,
                   "config_generation": 1},
        "workers": [{"slot": i, "pid": 1000 + i, "state": "ready", "stats": dict(stats),
                     "uptime": 100.0, "cpu_seconds": 2.0, "rss": 22 << 20}
                    for i in range(workers)],
        "slots": [{"slot": i, **{name: 12345 for name in tally.COUNTERS}, "restarts": 0,
                   "cpu_seconds": 2.0} for i in range(workers)],
        "totals": {**totals, "restarts": 0, "cpu_seconds": 2.0 * workers},
        "latency": {"bounds_us": list(latency.BOUNDS_US),
                    "buckets": [100] * (len(latency.BOUNDS_US) + 1), "sum_us": 10**9},
    }


def main() -> int:
    h = latency.Histogram()
    values = [37, 120, 55, 900, 61, 48, 3100, 75] * 1000
    per = best_of(lambda: [h.observe(v) for v in values], 20) / len(values)
    print(f"Histogram.observe: {per * 1e9:.0f} ns per hand-off")
    start = time.perf_counter()
    metrics.render(snapshot(1))
    print(f"first render (imports prometheus_client): {(time.perf_counter() - start) * 1e3:.0f} ms")
    for n in (1, 4, 16, 64):
        snap = snapshot(n)
        text, _ = metrics.render(snap)
        per = best_of(lambda s=snap: metrics.render(s), 20)
        print(f"render, {n:2d} workers: {per * 1e3:.2f} ms, {len(text):,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
