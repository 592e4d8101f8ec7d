"""The master's figures as Prometheus metrics: `mpdctl metrics` and the `[metrics] listen`
HTTP endpoint (httpmetrics.py) both print render() of the master's snapshot, the one that
`status` shows, so the two agree.

The text comes from prometheus_client's own exposition functions (the Prometheus text
format, or OpenMetrics when the scraper asks for it in Accept), over a collector that
builds the families from a snapshot on each scrape. Only those functions are used: no
registry of live metric objects (the numbers live in the workers and reach the master
with their heartbeats), and no HTTP server thread (the master is single-threaded; its
own selector serves the endpoint). prometheus_client is imported on first use (about 50
ms and 3 MB, for asyncio, http.server and wsgiref that it brings along): a master that
is never scraped never pays for it.

Families come twice: `mpd_X` for the whole daemon, `mpd_slot_X{slot="N"}` per slot. The
totals count every worker that ever ran, so they never go backwards across respawns and
scale-downs (tally.py); a slot's counters go on across its workers' respawns too. Sum
one or the other, never both."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from mpd.wire import counters


def render(snapshot: dict[str, Any], accept: str = "") -> tuple[bytes, str]:
    """The exposition of a master's snapshot (taken with usage) and its content type, in
    the format that an HTTP Accept header asks for (the Prometheus text format by
    default)."""
    from prometheus_client.exposition import choose_encoder

    encoder, content_type = choose_encoder(accept)
    return encoder(Snapshot(snapshot)), content_type


class Snapshot:
    """A prometheus_client collector over one snapshot (generate_latest calls collect)."""

    def __init__(self, snapshot: dict[str, Any]):
        self.snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        yield from daemon_families(self.snapshot)
        yield from slot_families(self.snapshot)
        yield latency_family(self.snapshot["latency"])
        yield from moves_families(self.snapshot["master"].get("groups"))


def daemon_families(snap: dict[str, Any]) -> Iterator[Any]:
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        InfoMetricFamily,
    )

    m, totals, workers = snap["master"], snap["totals"], snap["workers"]
    yield InfoMetricFamily("mpd", "The running mpd.", value={"version": m["version"]})
    # The daemon's figure adds the master's own count of the same thing (its log lines).
    yield from counter_families("mpd_", [], [([], {name: totals[name] + m.get(name, 0)
                                                   for name in counters.totalled()})])
    yield CounterMetricFamily("mpd_restarts", "Workers replaced after they died or hung.",
                              value=totals["restarts"])
    yield CounterMetricFamily("mpd_master_cpu_seconds", "CPU seconds of the master "
                              "(user and system).", value=m["cpu_seconds"])
    yield CounterMetricFamily("mpd_workers_cpu_seconds", "CPU seconds of every worker that "
                              "ran, the living and the reaped.",
                              value=totals["cpu_seconds"])
    for name, (c, *_) in counters.families(counters.GAUGE).items():
        if c.adds_up:
            yield GaugeMetricFamily(f"mpd_{name}", c.help,
                                    value=sum(w["stats"].get(c.name, 0) for w in workers))
    gauges = (
        ("mpd_workers", "Workers configured (the slot count).", m["workers"]),
        ("mpd_workers_ready", "Workers serving now.", m["ready"]),
        ("mpd_held_handoffs", "Hand-offs the master holds while their slot respawns or "
         "every slot is full.", m["held"]),
        ("mpd_uptime_seconds", "Seconds since mpd started (across upgrades in place).",
         m["uptime"]),
        ("mpd_config_generation", "The number of the config that runs (1 at start, one more "
         "per reload).", m["config_generation"]),
        ("mpd_master_resident_memory_bytes", "Resident memory of the master.", m["rss"]),
        ("mpd_workers_resident_memory_bytes", "Resident memory of every worker, summed "
         "(pages they share counted in each).", sum(w.get("rss", 0) for w in workers)),
    )
    for name, text, value in gauges:
        yield GaugeMetricFamily(name, text, value=value)


def counter_families(prefix: str, labels: list[str],
                     rows: list[tuple[list[str], dict[str, Any]]]) -> Iterator[Any]:
    """A family per counter metric of the table (counters.py), with a sample per row (its
    label values, its figures); counters that share a family add their `kind` label."""
    from prometheus_client.core import CounterMetricFamily

    for name, members in counters.families(counters.COUNTER).items():
        kind = ["kind"] if members[0].label else []
        family = CounterMetricFamily(f"{prefix}{name}", members[0].help,
                                     labels=[*labels, *kind])
        for values, figures in rows:
            for c in members:
                family.add_metric([*values, *([c.label] if c.label else [])], figures[c.name])
        yield family


def slot_families(snap: dict[str, Any]) -> Iterator[Any]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    slots = snap["slots"]
    labels = ["slot"]
    yield from counter_families("mpd_slot_", labels, [([str(s["slot"])], s) for s in slots])
    restarts = CounterMetricFamily("mpd_slot_restarts", "Workers of this slot replaced.",
                                   labels=labels)
    cpu = CounterMetricFamily("mpd_slot_cpu_seconds", "CPU seconds of the slot's workers, "
                              "the living and the reaped.", labels=labels)
    for s in slots:
        restarts.add_metric([str(s["slot"])], s["restarts"])
        cpu.add_metric([str(s["slot"])], s.get("cpu_seconds", 0.0))
    yield from (restarts, cpu)
    table = counters.families(counters.GAUGE)
    gauges = {name: GaugeMetricFamily(f"mpd_slot_{name}", text, labels=labels) for name, text in (
        *((name, c.help) for name, (c, *_) in table.items()),
        ("worker_pid", "The pid of the slot's newest worker."),
        ("worker_uptime_seconds", "Seconds since the slot's newest worker started."),
        ("resident_memory_bytes", "Resident memory of the slot's workers."))}
    for slot, ws in per_slot_workers(snap["workers"]):
        newest = ws[-1]
        for name, (c, *_) in table.items():  # a limit is the newest worker's; a level adds up
            value = sum(w["stats"].get(c.name, 0) for w in ws) if c.adds_up else \
                newest["stats"].get(c.name, 0)
            gauges[name].add_metric([str(slot)], value)
        for name, value in (("worker_pid", newest["pid"]),
                            ("worker_uptime_seconds", newest["uptime"]),
                            ("resident_memory_bytes", sum(w.get("rss", 0) for w in ws))):
            gauges[name].add_metric([str(slot)], value)
    yield from gauges.values()


def per_slot_workers(workers: list[dict[str, Any]]) -> Iterator[tuple[int, list[dict]]]:
    """(slot, its workers, the newest last): two workers share a slot during an upgrade's
    roll."""
    by_slot: dict[int, list[dict[str, Any]]] = {}
    for w in workers:  # in order of (slot, start)
        by_slot.setdefault(w["slot"], []).append(w)
    yield from sorted(by_slot.items())


def latency_family(lat: dict[str, Any]) -> Any:
    from prometheus_client.core import HistogramMetricFamily
    from prometheus_client.utils import floatToGoString

    buckets, cumulative = [], 0
    for bound, count in zip([*lat["bounds_us"], None], lat["buckets"]):
        cumulative += count
        buckets.append(("+Inf" if bound is None else floatToGoString(bound / 1e6), cumulative))
    return HistogramMetricFamily("mpd_handoff_latency_seconds", "Hand-off latency: HANDOFF "
                                 "sent by one worker to ADOPT taken by another.",
                                 buckets=buckets, sum_value=lat["sum_us"] / 1e6)



def moves_families(groups: dict[str, Any] | None) -> Iterator[Any]:
    """The master's count of key groups' moves (done: the new owner took the group;
    failed: refused or called off, the group served on where it was) and the pause their
    members saw, from the group's freeze on the old owner to its restore on the new one."""
    from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
    from prometheus_client.utils import floatToGoString

    if not groups or "pause" not in groups:
        return
    moves = CounterMetricFamily("mpd_group_moves", "Moves of a key group with its members "
                                "and state to another worker, by how they ended.",
                                labels=["result"])
    moves.add_metric(["done"], groups["done"])
    moves.add_metric(["failed"], groups["failed"])
    yield moves
    pause, buckets, cumulative = groups["pause"], [], 0
    for bound, count in zip([*pause["bounds_us"], None], pause["buckets"]):
        cumulative += count
        buckets.append(("+Inf" if bound is None else floatToGoString(bound / 1e6), cumulative))
    yield HistogramMetricFamily("mpd_group_move_pause_seconds", "The pause a moved group's "
                                "members saw: frozen on the old owner until restored on the "
                                "new one.", buckets=buckets, sum_value=pause["sum_us"] / 1e6)
