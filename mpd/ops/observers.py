"""How people watch mpd besides `mpdctl status`: the periodic `mpd.stats` log line and the
Prometheus endpoint (`[metrics] listen`, httpmetrics.py). Both read the master's
snapshot, as `status` and `mpdctl metrics` do.

`mpd.stats` is what an operator's log gets at info instead of a line per hand-off: every
`log.stats_interval` seconds, when anything was counted meanwhile, one line with the
counts of the interval, the clients and workers now, and the hand-off latency's p50 and
p99 (estimated from the histogram's buckets) and its exact maximum. One line a minute
leaves journald's rate limit (10,000 lines per 30 s per service, by default) to the
rare lines that matter; `fd.dispatched`, one per hand-off, is at debug."""

from __future__ import annotations

import selectors
import socket
import time
from typing import Any, Protocol

from mpd.config.schema import Config
from mpd.logs import log as logmod
from mpd.master.tally import Tally
from mpd.ops import metrics
from mpd.ops.httpmetrics import MetricsServer
from mpd.wire import counters, latency

CACHE = 0.25  # seconds a rendering serves further scrapes: a flood of them costs no more

# The interval's counts in mpd.stats: field -> the counter(s) of the snapshot's totals
SUMMED = {**counters.summed(), "restarts": ("restarts",)}

log = logmod.get_logger()


class Master(Protocol):
    config: Config
    tally: Tally

    def snapshot(self, usage: bool = False) -> dict[str, Any]: ...


class Observers:
    def __init__(self, master: Master, metrics_sock: socket.socket | None):
        self.master = master
        self.sock = metrics_sock
        self.http: MetricsServer | None = None
        self.next_stats = 0.0  # when the next mpd.stats is due (0: not scheduled)
        self.last: tuple[float, dict[str, int], list[int]] = (0.0, {}, [])  # at the last one
        self.rendered: dict[str, tuple[float, tuple[bytes, str]]] = {}  # by Accept

    def start(self, selector: selectors.BaseSelector) -> None:
        self.last = self.mark(time.monotonic())
        if self.sock is not None:
            self.http = MetricsServer(self.sock, selector, self.scrape)
            self.scrape("")  # imports prometheus_client now, not in a scraper's turn

    def scrape(self, accept: str) -> tuple[bytes, str]:
        now = time.monotonic()
        cached = self.rendered.get(accept)
        if cached is not None and now - cached[0] < CACHE:
            return cached[1]
        answer = metrics.render(self.master.snapshot(usage=True), accept)
        self.rendered = {accept: (now, answer)}  # one Accept at a time: a flood of odd
        return answer                             # ones cannot grow it

    def deadline(self) -> float | None:
        due = [d for d in (self.next_stats, self.http and self.http.deadline()) if d]
        return min(due) if due else None

    def tick(self, now: float) -> None:
        if self.http is not None:
            self.http.tick(now)
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

    def in_child(self) -> None:
        """In a forked worker: the port is the master's (its selector is closed already)."""
        if self.http is not None:
            for peer in self.http.peers.values():
                peer.sock.close()
        if self.sock is not None:
            self.sock.close()

    def close(self) -> None:
        if self.http is not None:
            self.http.close()
        elif self.sock is not None:
            self.sock.close()
