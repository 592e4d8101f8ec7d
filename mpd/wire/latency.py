"""Hand-off latency (HANDOFF sent to ADOPT taken) as a histogram with fixed buckets.

A worker counts each hand-off it adopts into one bucket (a bisect and an increment: a
fraction of a microsecond, against the tens that a hand-off costs) and sends the bucket
counts with its heartbeat (STATS); the master sums them over its workers, the living and
the dead (tally.py), and shows them as a Prometheus histogram (metrics.py) and as the
percentiles of its periodic `mpd.stats` line. A fixed set of buckets is what lets counts
from many processes add up; the price is that a percentile is known to within its
bucket (estimated as Prometheus's histogram_quantile() does). The largest latency is
exact: each worker sends the largest since its last heartbeat."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

# Upper bounds in microseconds, steps of about 1.5x where hand-offs are (30 us to 10 ms);
# a last bucket (+Inf) takes the rest. A change of these is a change of the channel's
# STATS: a master sums only counts made with its own bounds (see Histogram.counts).
BOUNDS_US: tuple[int, ...] = (
    10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 750, 1000, 1500, 2000, 3000, 5000, 7500,
    10_000, 20_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 5_000_000)


class Histogram:
    """One worker's hand-off latencies since it started, and the largest since it last
    reported."""
    __slots__ = ("buckets", "sum_us", "peak_us")

    def __init__(self) -> None:
        self.buckets = [0] * (len(BOUNDS_US) + 1)  # the last: above every bound (+Inf)
        self.sum_us = 0
        self.peak_us = 0

    def observe(self, us: int) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le).
        self.buckets[bisect_left(BOUNDS_US, us)] += 1
        self.sum_us += us
        if us > self.peak_us:
            self.peak_us = us

    def report(self) -> dict[str, object]:
        """What the heartbeat carries; the peak starts again from zero."""
        peak, self.peak_us = self.peak_us, 0
        return {"latency": {"bounds": len(BOUNDS_US), "buckets": list(self.buckets),
                            "sum_us": self.sum_us, "peak_us": peak}}


def counts(report: object) -> tuple[list[int], int, int] | None:
    """(buckets, sum_us, peak_us) of a heartbeat's "latency", or None when it is missing
    or was made with other bounds (a worker of other code, during an upgrade's roll)."""
    if not isinstance(report, dict) or report.get("bounds") != len(BOUNDS_US):
        return None
    buckets, total, peak = report.get("buckets"), report.get("sum_us"), report.get("peak_us")
    if (not isinstance(buckets, list) or len(buckets) != len(BOUNDS_US) + 1
            or not all(type(b) is int and b >= 0 for b in buckets)
            or type(total) is not int or type(peak) is not int):
        return None
    return buckets, total, peak


def quantile(buckets: Sequence[int], q: float) -> float | None:
    """The q-quantile (0 < q < 1) of bucket counts, in microseconds, interpolated within
    its bucket as Prometheus's histogram_quantile() does (the first bucket from zero);
    None without a count. In the last bucket (+Inf) the answer is its lower bound."""
    total = sum(buckets)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(buckets):
        if count and seen + count >= rank:
            if i == len(BOUNDS_US):
                return float(BOUNDS_US[-1])
            low = BOUNDS_US[i - 1] if i else 0
            return low + (BOUNDS_US[i] - low) * (rank - seen) / count
        seen += count
    return float(BOUNDS_US[-1])  # not reached: the loop ends at the total


def add(into: list[int], buckets: Sequence[int]) -> None:
    for i, count in enumerate(buckets):
        into[i] += count


def minus(now: Sequence[int], before: Sequence[int]) -> list[int]:
    return [a - b for a, b in zip(now, before)]
