"""What a worker counts and reports in its heartbeat (STATS), and what the master counts
beside it: one table, as HAProxy defines every statistic once in stat_fields[]. The worker's
stats dict (zeroed), the master's totals (tally.py), `mpdctl status` (commands.py), the
`mpd.stats` line (ops/statsline.py) and the Prometheus families (metrics.py) all read it, so a
new counter is one line here.

A counter only grows over a worker's life; the master adds up dead and living workers'
counts so that its totals never go backwards. A gauge is a level now (clients)."""

from __future__ import annotations

from dataclasses import dataclass

COUNTER, GAUGE = "counter", "gauge"

# Who counts it:
WORKER = "worker"  # the worker's loop, in its stats dict (zeroed())
CHANNEL = "channel"  # the worker's channel: client fds the kernel could not pass it
LOG = "log"  # the worker's logging: lines dropped while the sink fell behind
STATE = "state"  # the worker's state, told in each heartbeat (a gauge)
MASTER = "master"  # the master itself, per slot (Tally.count)


@dataclass(frozen=True)
class Counter:
    name: str  # its key in STATS, in the master's totals and in `status --json`
    help: str  # the metric's help text
    source: str = WORKER
    kind: str = COUNTER
    column: str = ""  # its header in `mpdctl status`'s table; "" = not shown there
    summed: str = ""  # the `mpd.stats` field it adds to; "" = not in that line
    metric: str = ""  # families mpd_<metric>[_total] and mpd_slot_<metric>[_total]; "" = none
    label: str = ""  # several counters in one family: this one's value of its label `kind`
    adds_up: bool = True  # False: a worker's limit; per slot the newest worker's, no total


COUNTERS: tuple[Counter, ...] = (
    Counter("clients", "Clients connected now.", STATE, GAUGE, "CLIENTS", metric="clients"),
    Counter("max_clients", "Clients one worker of the slot serves at most.", STATE, GAUGE,
            "MAX", metric="max_clients", adds_up=False),
    Counter("accepted", "Client connections accepted by the workers.", column="ACCEPTED",
            summed="accepted", metric="accepted_connections"),
    Counter("requests", "Requests (protocol frames) answered.", column="REQUESTS",
            summed="requests", metric="requests"),
    Counter("handoffs_out", "Clients handed to another slot through the master (HANDOFF "
            "sent).", column="HANDOFF", metric="handoffs_out"),
    Counter("adopted", "Handed-off clients adopted by their key's slot (ADOPT taken).",
            column="ADOPTED", summed="handoffs", metric="handoffs_in"),
    Counter("spilled", "Handed-off clients passed on to the next slot because their owner "
            "could not take them (by the owner when full, or by the master from its "
            "heartbeat).", summed="spilled", metric="spilled"),
    Counter("refused", "Clients refused because every slot that could take them was full.",
            column="REFUSED", summed="refused", metric="refused"),
    Counter("protocol_errors", "Clients closed for breaking the protocol.",
            summed="protocol_errors", metric="protocol_errors"),
    Counter("overflows", "Clients closed for leaving more than max_output_buffer of replies "
            "unread.", summed="overflows", metric="overflows"),
    Counter("idle_timeouts", "Clients closed by a timeout: idle (idle_timeout), first_frame "
            "(first_frame_timeout).", summed="timeouts", metric="timeouts", label="idle"),
    Counter("first_frame_timeouts", "Clients closed for sending no whole frame within "
            "first_frame_timeout.", summed="timeouts", metric="timeouts", label="first_frame"),
    Counter("lost", "Clients lost because a worker had no free fd to receive them (fd.lost).",
            CHANNEL, summed="lost", metric="lost_fds"),
    Counter("proxy_rejected", "Clients closed for want of a valid PROXY header.",
            summed="proxy_rejected", metric="proxy_rejected"),
    Counter("app_errors", "Connections or groups the application's code ended by raising "
            "(app.error).", column="APPERR", summed="app_errors", metric="app_errors"),
    Counter("groups", "Key groups in the workers now.", STATE, GAUGE, "GROUPS",
            metric="groups"),
    Counter("members", "Connections that are members of a key group now.", STATE, GAUGE,
            "MEMBERS", metric="group_members"),
    Counter("groups_made", "Key groups begun.", summed="groups", metric="groups_made"),
    Counter("groups_moved_in", "Key groups that moved here whole, with their members and "
            "state.", summed="moves", metric="groups_moved_in"),
    Counter("groups_moved_out", "Key groups that moved away whole.",
            metric="groups_moved_out"),
    Counter("moves_failed", "Moves of a key group refused or given up by a worker.",
            summed="moves_failed", metric="moves_failed"),
    Counter("over_budget", "Handed-off clients the master could not hold within its fd "
            "budget: given at once to a worker to take or refuse, or closed (fd.over_budget).",
            MASTER, summed="over_budget", metric="over_budget"),
    Counter("log_dropped", "Log lines dropped because the log sink fell behind (the master's "
            "own in the total).", LOG, summed="log_dropped", metric="log_dropped_lines"),
)

BY_NAME = {c.name: c for c in COUNTERS}


def zeroed() -> dict[str, int]:
    """A new worker's stats dict: every counter its loop keeps, at zero."""
    return {c.name: 0 for c in COUNTERS if c.source == WORKER}


def totalled() -> tuple[str, ...]:
    """The counters the master adds up across workers (tally.py): every one that only
    grows, the master's own included."""
    return tuple(c.name for c in COUNTERS if c.kind == COUNTER)


def reported() -> tuple[str, ...]:
    """What a worker's heartbeat tells, each shown in its row of `status`."""
    return tuple(c.name for c in COUNTERS if c.source != MASTER)


def columns() -> tuple[tuple[str, str], ...]:
    """(name, header) of the counters `mpdctl status` shows, in table order."""
    return tuple((c.name, c.column) for c in COUNTERS if c.column)


def summed() -> dict[str, tuple[str, ...]]:
    """The `mpd.stats` fields, each with the counters it adds up."""
    fields: dict[str, tuple[str, ...]] = {}
    for c in COUNTERS:
        if c.summed:
            fields[c.summed] = (*fields.get(c.summed, ()), c.name)
    return fields


def families(kind: str) -> dict[str, tuple[Counter, ...]]:
    """Metric families of this kind (counter or gauge), each with its counters (several
    when they share the family by a `kind` label); the family's help is its first one's."""
    found: dict[str, tuple[Counter, ...]] = {}
    for c in COUNTERS:
        if c.metric and c.kind == kind:
            found[c.metric] = (*found.get(c.metric, ()), c)
    return found
