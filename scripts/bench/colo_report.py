"""The co-location benchmark's tables: per load and placement, every target's figures and
their ratios to the baselines of the same run; the hand-off comparison; issue 24's
targets against this run (as targets.py does for issue 13's)."""

from __future__ import annotations

import math
import operator
from typing import Any, Callable

from colo_run import errors_of
from common import Report, median, p99_of, rate_of, ratio, round_ratios

REFS = ("c", "rawfd", "asyncio", "redis:2")  # the baselines every figure is divided by
Runs = dict[str, list[dict[str, Any]]]


def cpu_of(r: dict[str, Any]) -> float:
    return r.get("server_cpu_us_per_op", float("nan"))


def summary(runs: list[dict[str, Any]]) -> dict[str, float]:
    def med(key: Callable[[dict[str, Any]], float]) -> float:
        return median([key(r) for r in runs])

    return {"rate": med(rate_of), "bytes_per_s": med(lambda r: r["bytes_per_s"]),
            "cpu_us": med(cpu_of), "cpu_ns_per_byte": med(lambda r: r.get(
                "server_cpu_ns_per_byte", float("nan"))),
            "redis_share": med(lambda r: r.get("redis_cpu_s", float("nan")) /
                               r["server_cpu_s"] if r.get("server_cpu_s") else float("nan")),
            "client_us": med(lambda r: r["client_cpu_us_per_op"]),
            "p50": med(lambda r: r["lat_us"]["p50"]), "p99": med(p99_of),
            "max": med(lambda r: r["lat_us"]["max"]), "wrong": sum(map(errors_of, runs))}


def load_tables(report: Report, title: str, runs: Runs, skipped: dict[str, str]) -> None:
    report.heading(title)
    rows = []
    for name, results in runs.items():
        s = summary(results)
        share = s["redis_share"]
        rows.append([name, s["rate"], s["bytes_per_s"] / 1e6, s["cpu_us"],
                     s["cpu_ns_per_byte"], f"{share:.0%}" if share == share else "",
                     s["client_us"], s["p50"], s["p99"], s["max"], s["wrong"]])
    rows += [[name, "-", "-", "-", "-", "", "-", "-", "-", "-", f"skipped: {why}"]
             for name, why in skipped.items()]
    report.table(["target", "deliveries/s", "MB/s", "server CPU us/delivery",
                  "server CPU ns/byte", "of which Redis", "client CPU us/delivery",
                  "p50 us", "p99 us", "max us", "wrong"], rows)
    refs = [ref for ref in REFS if ref in runs]
    if not refs:
        return
    ratio_rows = []
    for name in runs:
        row: list[Any] = [name]
        for key in (rate_of, cpu_of, p99_of):
            row += [round_ratios(runs, name, ref, key) if ref != name else 1.0
                    for ref in refs]
        ratio_rows.append(row)
    report.table(["target"] + [f"{what} / {ref}" for what in ("deliveries/s", "CPU/delivery",
                                                             "p99") for ref in refs],
                 ratio_rows)
    report.note("Ratios: median of per-round ratios, each within one round. Within a load "
                "every message has the same size, so bytes/s and CPU per byte divide as "
                "deliveries/s and CPU per delivery do. wrong = lost + duplicates + out of "
                "order + misrouted + corrupt + closed + refused + rooms whose acks were not "
                "1..n, over every round.")


def worker_split(run: dict[str, Any], accepting: int, slots: dict[int, int]
                 ) -> dict[str, float] | None:
    """For one run with MPD_TEST_ACCEPT_SLOTS=accepting: server CPU us per delivery of
    the accepting slot's worker (rooms joined directly) and of the other's (rooms whose
    members all came through a hand-off). slots: {slot: pid}."""
    if set(slots) != {0, 1} or not run.get("owner_by_group") or "cpu_by_pid" not in run:
        return None
    per_pid_deliveries: dict[int, int] = {}
    for group, pid in run["owner_by_group"].items():
        per_pid_deliveries[pid] = (per_pid_deliveries.get(pid, 0)
                                   + run["group_deliveries"][int(group)])
    out: dict[str, float] = {}
    for slot, pid in slots.items():
        kind = "direct" if slot == accepting else "handed_off"
        delivered = per_pid_deliveries.get(pid, 0)
        cpu = run["cpu_by_pid"].get(pid, float("nan"))
        rate = delivered / run["window_s"]
        out[kind] = cpu / run["wall_s"] / rate * 1e6 if rate else float("nan")
        out[f"{kind}_rooms"] = sum(1 for p in run["owner_by_group"].values() if p == pid)
        out[f"{kind}_slot"] = slot
    return out


def handoff_ratio(split_a: dict[str, float] | None, split_b: dict[str, float] | None) -> float:
    """Accepting slot 0 (a) then slot 1 (b), same rooms: each worker's CPU per delivery
    with its rooms handed off over the same worker's with them joined directly, the two
    workers' ratios' geometric mean."""
    if not split_a or not split_b:
        return float("nan")
    r1 = ratio(split_a["handed_off"], split_b["direct"])  # slot 1's worker
    r0 = ratio(split_b["handed_off"], split_a["direct"])  # slot 0's worker
    return math.sqrt(r0 * r1) if r0 == r0 and r1 == r1 else float("nan")


Row = tuple[str, float, str, Callable[[float, float], bool], float, str]


def target_rows(results: dict[str, Any]) -> list[Row]:
    le, ge = operator.le, operator.ge
    rows: list[Row] = []

    def runs(key: str, placement: str) -> tuple[Runs, str]:
        entry = results.get("loads", {}).get(key, {}).get(placement, {})
        return entry.get("runs", {}), entry.get("skipped", {}).get(
            "mpd:1" if placement == "pinned" else "mpd:2", "")

    r, why = runs("rooms/100/100", "pinned")
    rows += [("rooms 100 members, 100 B, pinned: mpd:1 server CPU/delivery / rawfd",
              round_ratios(r, "mpd:1", "rawfd", cpu_of), "<= 1.15", le, 1.15, why),
             ("rooms 100 members, 100 B, pinned: mpd:1 server CPU/delivery / asyncio",
              round_ratios(r, "mpd:1", "asyncio", cpu_of), "<= 0.8", le, 0.8, why)]
    r, why = runs("rooms/100/100", "spread")
    rows.append(("rooms 100 members, 100 B, spread: mpd:2 / redis:2 server CPU/delivery "
                 "(Redis included)", round_ratios(r, "mpd:2", "redis:2", cpu_of), "<= 0.5",
                 le, 0.5, why))
    offered = results.get("args", {}).get("offered")
    r, why = runs(f"rooms/100/100@{offered:g}" if offered else "-", "spread")
    rows.append((f"rooms 100 members, 100 B, {offered or 0:,.0f} deliveries/s offered, "
                 "spread: mpd:2 / redis:2 p99 delivery latency",
                 round_ratios(r, "mpd:2", "redis:2", p99_of), "<= 0.5", le, 0.5, why))
    r, why = runs("relay/100/65536", "pinned")
    rows += [("relay 100 players, 64 KiB, pinned: mpd:1 bytes/s / c",
              round_ratios(r, "mpd:1", "c", rate_of), ">= 0.8", ge, 0.8, why),
             ("relay 100 players, 64 KiB, pinned: mpd:1 server CPU/byte / c",
              round_ratios(r, "mpd:1", "c", cpu_of), "<= 1.3", le, 1.3, why)]
    handoff = results.get("handoff", {})
    for placement in ("pinned", "spread"):
        entry = handoff.get(placement)
        if entry is not None:
            rows.append((f"hand-offs at join, {placement}: CPU/delivery of rooms joined "
                         "through a hand-off / joined directly", entry.get("ratio", math.nan),
                         "<= 1.02", le, 1.02, entry.get("skipped", "")))
    if not handoff:
        rows.append(("hand-offs at join: CPU/delivery, handed-off rooms / direct rooms",
                     math.nan, "<= 1.02", le, 1.02, "the handoff scenario did not run"))
    return rows


def report_targets(report: Report, results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = target_rows(results)
    report.heading("issue 24's targets against this run (ratios: median of per-round ratios)")
    table = []
    for what, figure, goal, compare, bound, why in rows:
        if figure != figure:
            met = f"pending: {why}" if why else "not measured (see above)"
        else:
            met = "yes" if compare(figure, bound) else "no"
        table.append([what, figure, goal, met])
    report.table(["target", "this run", "goal", "met"], table)
    return [{"target": what, "figure": figure, "goal": goal, "why": why}
            for what, figure, goal, _c, _b, why in rows]
