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

# Worker counter -> (metric name without mpd_ and _total, help text). The timeouts are
# one family with a `kind` label.
COUNTERS: dict[str, tuple[str, str]] = {
    "accepted": ("accepted_connections", "Client connections accepted by the workers."),
    "requests": ("requests", "Requests (protocol frames) answered."),
    "handoffs_out": ("handoffs_out", "Clients handed to another slot through the master "
                     "(HANDOFF sent)."),
    "adopted": ("handoffs_in", "Handed-off clients adopted by their key's slot (ADOPT "
                "taken)."),
    "spilled": ("spilled", "Handed-off clients passed on to the next slot because this one "
                "was full."),
    "refused": ("refused", "Clients refused because every slot that could take them was "
                "full."),
    "protocol_errors": ("protocol_errors", "Clients closed for breaking the protocol."),
    "overflows": ("overflows", "Clients closed for leaving more than max_output_buffer of "
                  "replies unread."),
    "lost": ("lost_fds", "Clients lost because a worker had no free fd to receive them "
             "(fd.lost)."),
    "proxy_rejected": ("proxy_rejected", "Clients closed for want of a valid PROXY header."),
}
TIMEOUTS = {"idle_timeouts": "idle", "first_frame_timeouts": "first_frame"}


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


def daemon_families(snap: dict[str, Any]) -> Iterator[Any]:
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        InfoMetricFamily,
    )

    m, totals, workers = snap["master"], snap["totals"], snap["workers"]
    yield InfoMetricFamily("mpd", "The running mpd.", value={"version": m["version"]})
    for key, (name, text) in COUNTERS.items():
        yield CounterMetricFamily(f"mpd_{name}", text, value=totals[key])
    timeouts = CounterMetricFamily("mpd_timeouts", "Clients closed by a timeout: idle "
                                   "(idle_timeout), first_frame (first_frame_timeout).",
                                   labels=["kind"])
    for key, kind in TIMEOUTS.items():
        timeouts.add_metric([kind], totals[key])
    yield timeouts
    yield CounterMetricFamily("mpd_restarts", "Workers replaced after they died or hung.",
                              value=totals["restarts"])
    yield CounterMetricFamily("mpd_log_dropped_lines", "Log lines dropped because the log "
                              "sink fell behind (master and workers).",
                              value=m["log_dropped"] + totals["log_dropped"])
    yield CounterMetricFamily("mpd_master_cpu_seconds", "CPU seconds of the master "
                              "(user and system).", value=m["cpu_seconds"])
    yield CounterMetricFamily("mpd_workers_cpu_seconds", "CPU seconds of every worker that "
                              "ran, the living and the reaped.",
                              value=totals["cpu_seconds"])
    gauges = (
        ("mpd_clients", "Clients connected now.", sum(w["stats"].get("clients", 0)
                                                        for w in workers)),
        ("mpd_workers", "Workers configured (the slot count).", m["workers"]),
        ("mpd_workers_ready", "Workers serving now.", m["ready"]),
        ("mpd_held_handoffs", "Hand-offs the master holds while their slot respawns.",
         m["held"]),
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


def slot_families(snap: dict[str, Any]) -> Iterator[Any]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    slots = snap["slots"]
    labels = ["slot"]
    for key, (name, text) in COUNTERS.items():
        family = CounterMetricFamily(f"mpd_slot_{name}", text, labels=labels)
        for s in slots:
            family.add_metric([str(s["slot"])], s[key])
        yield family
    timeouts = CounterMetricFamily("mpd_slot_timeouts", "Clients closed by a timeout.",
                                   labels=["slot", "kind"])
    restarts = CounterMetricFamily("mpd_slot_restarts", "Workers of this slot replaced.",
                                   labels=labels)
    dropped = CounterMetricFamily("mpd_slot_log_dropped_lines", "Log lines the slot's "
                                  "workers dropped.", labels=labels)
    cpu = CounterMetricFamily("mpd_slot_cpu_seconds", "CPU seconds of the slot's workers, "
                              "the living and the reaped.", labels=labels)
    for s in slots:
        slot = str(s["slot"])
        for key, kind in TIMEOUTS.items():
            timeouts.add_metric([slot, kind], s[key])
        restarts.add_metric([slot], s["restarts"])
        dropped.add_metric([slot], s["log_dropped"])
        cpu.add_metric([slot], s.get("cpu_seconds", 0.0))
    yield from (timeouts, restarts, dropped, cpu)
    gauges = {name: GaugeMetricFamily(f"mpd_slot_{name}", text, labels=labels) for name, text in (
        ("clients", "Clients the slot's workers serve now."),
        ("max_clients", "Clients one worker of the slot serves at most."),
        ("worker_pid", "The pid of the slot's newest worker."),
        ("worker_uptime_seconds", "Seconds since the slot's newest worker started."),
        ("resident_memory_bytes", "Resident memory of the slot's workers."))}
    for slot, newest, clients, rss in per_slot_workers(snap["workers"]):
        for name, value in (("clients", clients), ("max_clients",
                                                   newest["stats"].get("max_clients", 0)),
                            ("worker_pid", newest["pid"]),
                            ("worker_uptime_seconds", newest["uptime"]),
                            ("resident_memory_bytes", rss)):
            gauges[name].add_metric([str(slot)], value)
    yield from gauges.values()


def per_slot_workers(workers: list[dict[str, Any]]) -> Iterator[tuple[int, dict, int, int]]:
    """(slot, its newest worker, clients of all its workers, their resident bytes): two
    workers share a slot during an upgrade's roll."""
    by_slot: dict[int, list[dict[str, Any]]] = {}
    for w in workers:  # in order of (slot, start)
        by_slot.setdefault(w["slot"], []).append(w)
    for slot, ws in sorted(by_slot.items()):
        yield (slot, ws[-1], sum(w["stats"].get("clients", 0) for w in ws),
               sum(w.get("rss", 0) for w in ws))


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

