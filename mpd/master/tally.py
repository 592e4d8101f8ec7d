"""The master's running totals of what its workers did: counters that never go backwards,
per slot and in all, though workers die and are replaced, and slots come and go.

A worker's counters start from zero and ride its heartbeat (STATS). When a worker is
reaped, its last counts (its final STATS, read before its channel is closed), its
latency histogram and its CPU seconds (from wait4's rusage) go into its slot's `kept`
totals; a slot's figure is then its reaped workers' plus its living workers' (two during an
upgrade's roll). Slots keep these totals when a scale-down removes them, so the sum
over every slot, the total, only grows; a slot that comes back goes on from where it was.
An upgrade in place carries the kept totals across the exec (upgradestate.py).

`status`, `metrics` and the periodic `mpd.stats` line all read from here, so they agree."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from mpd.master.slots import Slots, WorkerProc
from mpd.system import procfs
from mpd.wire import counters, latency

COUNTERS = counters.totalled()  # what only grows: the workers' counts and the master's


@dataclass
class Totals:
    """Counts of one slot (or of all), the latency histogram and CPU seconds."""
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    buckets: list[int] = field(default_factory=lambda: [0] * (len(latency.BOUNDS_US) + 1))
    sum_us: int = 0
    cpu_seconds: float = 0.0

    def add(self, other: Totals) -> None:
        for name in COUNTERS:
            self.counts[name] += other.counts[name]
        latency.add(self.buckets, other.buckets)
        self.sum_us += other.sum_us
        self.cpu_seconds += other.cpu_seconds

    def add_worker(self, worker: WorkerProc, cpu_seconds: float) -> None:
        for name in COUNTERS:
            self.counts[name] += worker.stats.get(name, 0)
        if worker.latency is not None:
            latency.add(self.buckets, worker.latency[0])
            self.sum_us += worker.latency[1]
        self.cpu_seconds += cpu_seconds

    def dump(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "buckets": list(self.buckets),
                "sum_us": self.sum_us, "cpu_seconds": self.cpu_seconds}

    @classmethod
    def load(cls, data: Any) -> Totals:
        """Totals from dump(); what is missing or malformed counts as zero."""
        totals = cls()
        if not isinstance(data, dict):
            return totals
        counts = data.get("counts") if isinstance(data.get("counts"), dict) else {}
        for name in COUNTERS:
            if type(counts.get(name)) is int:
                totals.counts[name] = counts[name]
        buckets = data.get("buckets")
        if isinstance(buckets, list) and len(buckets) == len(totals.buckets) \
                and all(type(b) is int for b in buckets):
            totals.buckets = list(buckets)
        if type(data.get("sum_us")) is int:
            totals.sum_us = data["sum_us"]
        if isinstance(data.get("cpu_seconds"), (int, float)):
            totals.cpu_seconds = float(data["cpu_seconds"])
        return totals


def usage(pid: int) -> tuple[float, int]:
    """CPU seconds and resident bytes of a process; zeros once it has gone."""
    with contextlib.suppress(ProcessLookupError):
        stat = procfs.stat(pid)
        return stat.cpu_seconds, stat.rss
    return 0.0, 0


class Tally:
    def __init__(self) -> None:
        # By slot: what its reaped workers did, and what the master counted itself.
        self.kept: dict[int, Totals] = {}
        self.peak_us = 0  # the largest hand-off latency heard since take_peak()

    def heard(self, worker: WorkerProc, report: Any) -> None:
        """A heartbeat's latency histogram (latency.Histogram.report)."""
        found = latency.counts(report)
        if found is not None:
            buckets, sum_us, peak_us = found
            worker.latency = (buckets, sum_us)
            self.peak_us = max(self.peak_us, peak_us)

    def heard_before(self, worker: WorkerProc, saved: Any) -> None:
        """The histogram an old master had heard (upgradestate.py), until the next heartbeat."""
        if isinstance(saved, list) and len(saved) == 2:
            found = latency.counts({"bounds": len(latency.BOUNDS_US), "buckets": saved[0],
                                    "sum_us": saved[1], "peak_us": 0})
            if found is not None:
                worker.latency = (found[0], found[1])

    def keep_reaped(self, worker: WorkerProc, cpu_seconds: float) -> None:
        """A reaped worker's last counts go to its slot's kept totals."""
        self.kept.setdefault(worker.slot, Totals()).add_worker(worker, cpu_seconds)

    def count(self, slot: int, name: str) -> None:
        """One more of a count the master keeps itself (counters.py, source MASTER, or a
        spill it decided): no worker reports it, so it goes to the slot's kept totals as a
        reaped worker's counts do."""
        self.kept.setdefault(slot, Totals()).counts[name] += 1

    def take_peak(self) -> int:
        peak, self.peak_us = self.peak_us, 0
        return peak

    def slots(self, workers: Iterable[WorkerProc], cpu: dict[int, float]) -> dict[int, Totals]:
        """Every slot's totals, kept and living (CPU seconds of the living by pid, from
        `cpu`; a worker not in it counts none)."""
        out = {slot: Totals() for slot in self.kept}
        for slot, kept in self.kept.items():
            out[slot].add(kept)
        for worker in workers:
            out.setdefault(worker.slot, Totals()).add_worker(worker, cpu.get(worker.pid, 0.0))
        return out

    def dump(self) -> dict[str, Any]:
        """For the state across an upgrade's exec."""
        return {str(slot): totals.dump() for slot, totals in self.kept.items()}

    def restore(self, data: Any) -> None:
        if isinstance(data, dict):
            for slot, totals in data.items():
                with contextlib.suppress(ValueError):
                    self.kept[int(slot)] = Totals.load(totals)


def overall(per_slot: dict[int, Totals]) -> Totals:
    total = Totals()
    for totals in per_slot.values():
        total.add(totals)
    return total


def figures(tally: Tally, slots: Slots, with_usage: bool) -> dict[str, Any]:
    """For the master's snapshot: each slot's totals (the table's, and any other a living
    worker is in) with its restarts, the total, the latency histogram in all, and with
    `with_usage` CPU seconds (in the totals too) and resident bytes of each worker by pid
    (a read of /proc/PID/stat each)."""
    workers = list(slots.workers.values())
    use = {w.pid: usage(w.pid) for w in workers} if with_usage else {}
    per_slot = tally.slots(workers, {pid: cpu for pid, (cpu, _rss) in use.items()})
    total = overall(per_slot)
    cpu = (lambda t: {"cpu_seconds": round(t.cpu_seconds, 3)}) if with_usage else (
        lambda t: {})
    shown = sorted(set(slots.table) | {w.slot for w in workers})
    return {
        "slots": [{"slot": slot, **per_slot.get(slot, Totals()).counts,
                   "restarts": slots.restarts(slot), **cpu(per_slot.get(slot, Totals()))}
                  for slot in shown],
        "totals": {**total.counts, "restarts": slots.total_restarts(), **cpu(total)},
        "latency": {"bounds_us": list(latency.BOUNDS_US), "buckets": total.buckets,
                    "sum_us": total.sum_us},
        "usage": {pid: {"cpu_seconds": round(cpu, 3), "rss": rss}
                  for pid, (cpu, rss) in use.items()},
    }
