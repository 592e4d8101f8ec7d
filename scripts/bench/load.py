"""Scenarios under load: ping (closed loop), connrate (connect, one ping, close) and
handoff (a `C` key frame routed through the master), each against the baselines."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from common import NPROC, PINNED, cpu_of, median, p99_of, pct, rate_of, round_ratios, summarise
from harness import Bench, Server

PYTHON_BASELINES = ("py-rawfd", "py", "asyncio", "uvloop")  # pinned, one process each


def throughput_cases(b: Bench, mode: str, workers: int) -> list[dict[str, Any]]:
    """The side-by-side set: pinned (server and load on CPU 0) and spread (any CPU)."""
    pinned: list[tuple[str, Server | None]] = [
        ("c", b.c_baseline("c-1p-pinned", 0, PINNED)),
        ("py-rawfd", b.rawfd_baseline("py-rawfd-pinned", PINNED)),
        ("py", b.py_baseline("py-1p-pinned", 0, PINNED)),
        ("asyncio", b.asyncio_baseline("asyncio-pinned", PINNED)),
        ("uvloop", b.asyncio_baseline("uvloop-pinned", PINNED, uvloop=True)),
        ("mpd-1w", b.mpd("mpd-1w-pinned", 1, PINNED))]
    cases = [{"name": name, "server": server.start(), "mode": mode, "cpus": PINNED}
             for name, server in pinned if server is not None]
    if workers > 1:
        spread: list[tuple[str, Server | None]] = [
            (f"c-{workers}p", b.c_baseline(f"c-{workers}p-spread", workers, None)),
            (f"py-{workers}p", b.py_baseline(f"py-{workers}p-spread", workers, None)),
            (f"mpd-{workers}w", b.mpd(f"mpd-{workers}w-spread", workers, None))]
        cases += [{"name": name, "server": server.start(), "mode": mode, "cpus": None}
                  for name, server in spread if server is not None]
    return cases


def ratio_pairs(workers: int) -> list[tuple[str, str, str]]:
    """(server, baseline, placement) for the ratio tables: mpd against each baseline, and
    each Python baseline against C."""
    pairs = [("mpd-1w", base, "pinned") for base in ("c",) + PYTHON_BASELINES]
    pairs += [(py, "c", "pinned") for py in PYTHON_BASELINES]
    if workers > 1:
        pairs += [(f"mpd-{workers}w", f"c-{workers}p", "spread"),
                  (f"mpd-{workers}w", f"py-{workers}p", "spread")]
    return pairs


def throughput_tables(b: Bench, title: str, unit: str, per_count: dict[int, dict],
                      workers: int) -> None:
    rows = []
    ratio_rows = []
    for conns, results in per_count.items():
        summary = summarise(results)
        for name, s in summary.items():
            rows.append([conns, name, s["rate"], s["server_cpu_us_per_op"],
                         s["client_cpu_us_per_op"], s["p50_us"], s["p99_us"], s["p999_us"],
                         s["errors"]])
        for a, base, placement in ratio_pairs(workers):
            if a in results and base in results:
                ratio_rows.append([conns, f"{a} / {base}", placement,
                                   round_ratios(results, a, base, rate_of),
                                   round_ratios(results, a, base, cpu_of),
                                   round_ratios(results, a, base, p99_of)])
    b.report.heading(f"{title}: medians over rounds")
    b.report.table(["conns", "server", f"{unit}/s", "server CPU us/op", "client CPU us/op",
                    "p50 us", "p99 us", "p99.9 us", "errors"], rows)
    b.report.heading(f"{title}: ratios (median of per-round ratios)")
    b.report.table(["conns", "ratio", "placement", f"{unit}/s", "server CPU/op", "p99"],
                   ratio_rows)
    b.report.note(baselines_note(b))


def baselines_note(b: Bench) -> str:
    """What the baselines are, and which are missing here and why."""
    note = ("c = baseline_epoll.c; py-rawfd = baseline_rawfd.py (raw fds, os.read/os.write: "
            "the Python floor); py = baseline_epoll.py (socket objects); asyncio, uvloop = "
            "baseline_asyncio.py (a Protocol server)")
    if b.tools.uvloop_python:
        note += f"; uvloop run by {b.tools.uvloop_python}"
    missing = [] if b.tools.uvloop_python else [
        "uvloop: skipped, no interpreter here has it (pip install uvloop into "
        "bench-results/tools-venv, or pass --uvloop-python)"]
    if not b.tools.baseline_c:
        missing.append("c: skipped, no C compiler")
    return note + "." + "".join(f" {m}." for m in missing)


def scenario_ping(b: Bench) -> dict[str, Any]:
    a = b.args
    workers = NPROC
    cases = throughput_cases(b, "ping", workers)
    per_count: dict[int, dict] = {}
    for conns in a.ping_conns:
        per_count[conns] = b.run_cases(f"ping c={conns}", cases, conns, a.rounds, a.duration,
                                       a.warmup)
    throughput_tables(b, "ping (closed loop, 20-byte pings)", "req", per_count, workers)
    return {"workers": workers, "per_conns": {str(k): {"runs": v, "summary": summarise(v)}
                                              for k, v in per_count.items()}}


def scenario_connrate(b: Bench) -> dict[str, Any]:
    a = b.args
    workers = NPROC
    cases = throughput_cases(b, "connrate", workers)
    results = b.run_cases(f"connrate c={a.connrate_conns}", cases, a.connrate_conns,
                          a.rounds, a.duration, a.warmup)
    throughput_tables(b, f"connrate (connect, 1 ping, close; {a.connrate_conns} in flight)",
                      "conn", {a.connrate_conns: results}, workers)
    return {"workers": workers, "conns": a.connrate_conns, "runs": results,
            "summary": summarise(results)}


def dispatched(events: list[dict[str, Any]]) -> dict[str, Any]:
    lat = [e["latency_us"] for e in events
           if e.get("event") == "fd.dispatched" and isinstance(e.get("latency_us"), int)]
    return {"handoffs": len(lat), "handoff_p50_us": pct(lat, 0.5),
            "handoff_p99_us": pct(lat, 0.99), "handoff_max_us": max(lat) if lat else None}


def scenario_handoff(b: Bench) -> dict[str, Any]:
    a = b.args
    w = 4
    conns = a.connrate_conns
    mpd_info = b.mpd(f"mpd-{w}w-pinned", w, PINNED).start()
    # At level "warning" mpd would not log mpd.started (and so its port): start at "info",
    # then reload to "warning" (log_level is a live setting; the reload itself is silent).
    mpd_warn = b.mpd(f"mpd-{w}w-pinned-warnlog", w, PINNED).start()
    assert mpd_warn.config_path is not None
    b.write_mpd_config(mpd_warn.config_path, w, log_level="warning")
    os.kill(mpd_warn.pid, signal.SIGHUP)
    time.sleep(0.3)
    mpd_spread = b.mpd(f"mpd-{w}w-spread", w, None).start()
    cases = [
        {"name": "mpd-4w handoff", "server": mpd_info, "mode": "handoff", "cpus": PINNED,
         "collect": dispatched},
        {"name": "mpd-4w no-key", "server": mpd_info, "mode": "connrate", "cpus": PINNED},
        {"name": "mpd-4w handoff (log=warning)", "server": mpd_warn, "mode": "handoff",
         "cpus": PINNED},
        {"name": "py handoff-traffic", "mode": "handoff", "cpus": PINNED,
         "server": b.py_baseline("py-1p-pinned", 0, PINNED).start()},
        {"name": "mpd-4w handoff spread", "server": mpd_spread, "mode": "handoff",
         "cpus": None, "collect": dispatched},
        {"name": "mpd-4w no-key spread", "server": mpd_spread, "mode": "connrate",
         "cpus": None},
        # One connection in flight: the hand-off's own latency, without queueing; pinned
        # (no cross-CPU wake-ups, 30-50 us each here) and spread.
        {"name": "mpd-4w handoff 1-in-flight pinned", "server": mpd_info, "mode": "handoff",
         "cpus": PINNED, "conns": 1, "collect": dispatched},
        {"name": "mpd-4w handoff 1-in-flight", "server": mpd_spread, "mode": "handoff",
         "cpus": None, "conns": 1, "collect": dispatched},
        {"name": "mpd-4w no-key 1-in-flight", "server": mpd_spread, "mode": "connrate",
         "cpus": None, "conns": 1},
    ]
    c = b.c_baseline("c-1p-pinned", 0, PINNED)
    if c:
        cases.append({"name": "c handoff-traffic", "server": c.start(), "mode": "handoff",
                      "cpus": PINNED})
    results = b.run_cases(f"handoff c={conns}", cases, conns, a.rounds, a.duration, a.warmup)
    summary = summarise(results)
    rows = []
    for name, runs in results.items():
        s = summary[name]
        handed = [r["handoffs"] / r["completed"] for r in runs
                  if "handoffs" in r and r.get("completed")]
        rows.append([name, s["rate"], s["server_cpu_us_per_op"], s["master_cpu_us_per_op"]
                     if name.startswith("mpd") else None, s["p50_us"], s["p99_us"],
                     median([r["rate"] * r["handoffs"] / r["completed"] for r in runs
                             if "handoffs" in r and r.get("completed")]) if handed else None,
                     median(handed) if handed else None,
                     median([r["handoff_p50_us"] for r in runs if "handoffs" in r])
                     if handed else None,
                     median([r["handoff_p99_us"] for r in runs if "handoffs" in r])
                     if handed else None])
    b.report.heading(f"handoff (mpd with {w} workers; connect, `C`+key+ping in one send, "
                     f"reply, close; {conns} in flight unless said)")
    b.report.table(["case", "conn/s", "server CPU us/conn", "of which master",
                    "client p50 us", "client p99 us",
                    "hand-offs/s", "handed off", "server latency_us p50",
                    "server latency_us p99"], rows)
    pairs = [("mpd-4w handoff", "mpd-4w no-key", "pinned"),
             ("mpd-4w handoff", "mpd-4w handoff (log=warning)", "pinned"),
             ("mpd-4w handoff", "py handoff-traffic", "pinned"),
             ("mpd-4w handoff", "c handoff-traffic", "pinned"),
             ("mpd-4w handoff spread", "mpd-4w no-key spread", "spread"),
             ("mpd-4w handoff 1-in-flight", "mpd-4w no-key 1-in-flight", "spread")]
    b.report.table(["ratio", "placement", "conn/s", "server CPU/conn", "client p99"],
                   [[f"{x} / {y}", p, round_ratios(results, x, y, rate_of),
                     round_ratios(results, x, y, cpu_of), round_ratios(results, x, y, p99_of)]
                    for x, y, p in pairs if x in results and y in results])
    b.report.note("Server CPU per conn includes the master (it forwards every hand-off). "
                  "The baselines do no routing: they show what the same traffic costs "
                  "without it. Server latency_us is HANDOFF sent -> ADOPT taken, from "
                  "fd.dispatched, a debug line since issue 14: at info the hand-offs come "
                  "from mpd's counters and the latency columns stay empty (see "
                  "mpd_handoff_latency_seconds in `mpdctl metrics`).")
    return {"workers": w, "conns": conns, "runs": results, "summary": summary}


