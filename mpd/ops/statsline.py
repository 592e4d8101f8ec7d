"""The periodic `mpd.stats` log line, one of the master's services: how people watch mpd
in its log, besides `mpdctl status` and the Prometheus endpoint (httpmetrics.py). All
read the master's snapshot.

`mpd.stats` is what an operator's log gets at info instead of a line per hand-off: every
`log.stats_interval` seconds, when anything was counted meanwhile, one line with the
counts of the interval, the clients and workers now, and the hand-off latency's p50 and
p99 (estimated from the histogram's buckets) and its exact maximum. One line a minute
leaves journald's rate limit (10,000 lines per 30 s per service, by default) to the
rare lines that matter; `fd.dispatched`, one per hand-off, is at debug."""

from __future__ import annotations

import time
from typing import Any, Protocol

from mpd.config.schema import Config
from mpd.logs import log as logmod
from mpd.wire import counters, latency

# The interval's counts in mpd.stats: field -> the counter(s) of the snapshot's totals
SUMMED = {**counters.summed(), "restarts": ("restarts",)}

log = logmod.get_logger()


class Peaks(Protocol):
    def take_peak(self) -> int: ...  # the longest hand-off since the last call, in us


class StatsView(Protocol):
    """What the stats line reads of the master."""
    config: Config
    tally: Peaks

    def snapshot(self, usage: bool = False) -> dict[str, Any]: ...


class StatsLine:
    def __init__(self, master: StatsView):
        self.master = master
        self.next_stats = 0.0  # when the next mpd.stats is due (0: not scheduled)
        self.last: tuple[float, dict[str, int], list[int]] = (0.0, {}, [])  # at the last one

    def start(self) -> None:
        """Count from now (after an upgrade's adopt: from the old master's totals)."""
        self.last = self.mark(time.monotonic())

    def deadline(self) -> float | None:
        return self.next_stats or None

    def tick(self, now: float) -> None:
        interval = self.master.config.log_stats_interval
        if not interval:
            self.next_stats = 0.0
            return
        if not self.next_stats or self.next_stats > now + interval:  # new, or shortened
            self.next_stats = now + interval
        if now >= self.next_stats:
            self.next_stats = now + interval
            self.summarise(now)

    def mark(self, now: float, snapshot: dict[str, Any] | None = None
             ) -> tuple[float, dict[str, int], list[int]]:
        snapshot = snapshot or self.master.snapshot()
        # The master's own count of a thing (its dropped log lines) adds to the workers'.
        master = snapshot["master"]
        totals = {k: v + master.get(k, 0) if k in counters.BY_NAME else v
                  for k, v in snapshot["totals"].items()}
        return now, totals, list(snapshot["latency"]["buckets"])

    def summarise(self, now: float) -> None:
        """Log mpd.stats for the interval since the last one, if anything was counted."""
        snapshot = self.master.snapshot()
        (before, counted, buckets), self.last = self.last, self.mark(now, snapshot)
        _, totals, buckets_now = self.last
        peak = self.master.tally.take_peak()
        counts = {field: sum(totals[k] - counted.get(k, 0) for k in keys)
                  for field, keys in SUMMED.items()}
        if not any(counts.values()):
            return
        handoffs = latency.minus(buckets_now, buckets) if buckets else buckets_now
        percentiles = {f"handoff_p{round(q * 100)}_us": round(value)
                       for q in (0.5, 0.99) if (value := latency.quantile(handoffs, q))
                       is not None}  # none without a hand-off: no field, not a null
        if percentiles:
            percentiles["handoff_max_us"] = peak
        log.info("mpd.stats", seconds=round(now - before, 1), **counts,
                 clients=sum(w["stats"].get("clients", 0) for w in snapshot["workers"]),
                 workers=snapshot["master"]["ready"], **percentiles)

    def close(self) -> None:
        pass

    def in_child(self) -> None:
        pass
