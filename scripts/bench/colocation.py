#!/usr/bin/env python3
"""Co-location against the alternatives (issue 24): broadcast in rooms (a chat) and relay
(one publisher, many players per stream), mpd's applications against every other way a
Python team would build them, side by side in one run.

    python scripts/bench/colocation.py                        # every load, both placements
    python scripts/bench/colocation.py --quick                # smoke run, under a minute
    python scripts/bench/colocation.py --scenarios rooms --rooms 100 --lines 100 --rounds 5
    python scripts/bench/colocation.py --scenarios handoff    # hand-offs at join (mpd only)

Targets (--targets): asyncio and uvloop (an asyncio Protocol server, baseline_colo_asyncio.py),
rawfd (the Python floor, baseline_colo_rawfd.py), c (the floor, baseline_colo.c), redis:1
and redis:2 (the Redis design with 1 and 2 workers and a real redis-server,
baseline_colo_redis.py), mpd:1 and mpd:2 (this checkout's mpd with `server.protocol` rooms
or relay and 1 or 2 workers); mpd:W@V is version V of mpd (a directory with mpd/, or a git
revision, as ab.py takes them), to measure a change step by step. A target that cannot
run here is skipped, saying why: mpd until it speaks the protocol (it refuses the config,
exit 78), Redis without redis-server or hiredis, uvloop without uvloop.

Scenarios: rooms (rooms of --rooms members, --lines byte lines), relay (1 publisher and
--players players per stream, --frames byte frames), each under loadgen_colo.c's closed
loop (or --rate per sender), pinned (every server process and the load generator on CPU
0) and spread (any CPU); handoff: mpd with 2 workers where only one slot accepts clients
(MPD_TEST_ACCEPT_SLOTS), so the rooms of the other slot have every member joined through
a hand-off, at a fixed rate (--handoff-rate): each worker's CPU per delivery, from the
load generator's deliveries per room and /proc (which worker holds each room's
connections), run twice with the accepting slot swapped so that each worker is compared
with itself on the same rooms.

Reported per load: deliveries/s, bytes/s, server CPU per delivery and per byte (every
server process: mpd's whole tree; the Redis design's workers and redis-server), the client's
CPU, delivery latency p50/p99/max, and everything the load generator found wrong; every
figure also as the median of per-round ratios to the baselines of the same run; then
issue 24's targets. Results in bench-results/colo-<time>.json and .md; logs in
bench-results/colo-<time>/. Only 127.0.0.1 is contacted; everything started is stopped.
Runs on Python 3.9+ with the standard library (the baselines need their own packages).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from colo_report import handoff_ratio, load_tables, report_targets, worker_split
from colo_run import Load, run_rounds
from colo_servers import (
    ALL_TARGETS,
    Interpreters,
    RedisDesign,
    Skipped,
    known,
    start_mpd,
    start_target,
)
from common import PINNED, ROOT, T0, Report, fmt, median, progress, ratio
from harness import Bench, control_request
from run import machine, prepare

PLACEMENTS = {"pinned": PINNED, "spread": None}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenarios", default="rooms,relay,handoff",
                   help="comma-separated: rooms, relay, handoff (default: all three)")
    p.add_argument("--targets", default=",".join(ALL_TARGETS),
                   help=f"comma-separated (default {','.join(ALL_TARGETS)})")
    p.add_argument("--placements", help="pinned,spread (default; quick: pinned)")
    p.add_argument("--quick", action="store_true", help="small loads, one short round")
    p.add_argument("--rooms", help="members per room (default 10,100,1000)")
    p.add_argument("--lines", help="line sizes in bytes (default 100,4096)")
    p.add_argument("--players", help="players per stream (default 10,100,1000)")
    p.add_argument("--frames", help="frame sizes in bytes (default 1024,16384,65536)")
    p.add_argument("--groups", type=int, help="rooms (streams) per load (default: 8 rooms "
                   "up to 100 members, 2 beyond; 4 streams up to 100 players, 1 beyond)")
    p.add_argument("--rate", type=float, default=0.0,
                   help="messages per second per sender (default 0: closed loop)")
    p.add_argument("--offered", type=float,
                   help="rooms: also each rooms load at this many deliveries/s offered in "
                   "all (a fixed rate per sender), for latencies at a load every target "
                   "can carry; 0: no such load (default 50000; quick 5000)")
    p.add_argument("--handoff-members", type=int, help="members per room (default 100)")
    p.add_argument("--handoff-rooms", type=int, help="rooms (default 8)")
    p.add_argument("--handoff-rate", type=float, default=2.0,
                   help="lines per second per member (default 2; 0: closed loop)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3; quick 1)")
    p.add_argument("--duration", type=float, help="seconds measured (default 3)")
    p.add_argument("--warmup", type=float, help="seconds before measuring (default 0.5)")
    p.add_argument("--drain", type=float, default=5.0,
                   help="at most this long for the last messages after the window")
    p.add_argument("--redis-client", choices=("hiredis", "redis-py"), default="hiredis",
                   help="how the Redis design's workers speak to Redis (see "
                   "baseline_colo_redis.py)")
    p.add_argument("--mpd-python", help="interpreter for mpd and the Python baselines")
    p.add_argument("--uvloop-python", help="interpreter with uvloop (default: found)")
    p.add_argument("--redis-python", help="interpreter with hiredis for the Redis design")
    p.add_argument("--out", default=str(ROOT / "bench-results"), help="results directory")
    args = p.parse_args(argv)
    q = args.quick
    defaults = {"rounds": 1 if q else 3, "duration": 0.5 if q else 3.0,
                "warmup": 0.2 if q else 0.5, "placements": "pinned" if q else "pinned,spread",
                "rooms": "10" if q else "10,100,1000", "lines": "100" if q else "100,4096",
                "players": "10" if q else "10,100,1000",
                "frames": "16384" if q else "1024,16384,65536",
                "groups": 2 if q else None, "offered": 5000.0 if q else 50000.0,
                "handoff_members": 10 if q else 100,
                "handoff_rooms": 4 if q else 8}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if q:
        args.drain = min(args.drain, 3.0)
    for key in ("rooms", "lines", "players", "frames"):
        setattr(args, key, [int(x) for x in str(getattr(args, key)).split(",") if x])
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    args.targets = [t for t in args.targets.split(",") if t]
    args.placements = [x for x in args.placements.split(",") if x]
    bad = ([s for s in args.scenarios if s not in ("rooms", "relay", "handoff")]
           + [t for t in args.targets if not known(t)]
           + [x for x in args.placements if x not in PLACEMENTS])
    if bad:
        p.error(f"unknown: {', '.join(bad)}")
    args.keep_hist = False  # what harness.Bench asks of its arguments
    return args


def loads_of(args: argparse.Namespace, protocol: str) -> list[Load]:
    if protocol == "rooms":
        loads = []
        for m in args.rooms:
            for size in args.lines:
                groups = args.groups or (8 if m <= 100 else 2)
                loads.append(Load("rooms", m, size, groups, args.rate))
                if args.offered:
                    senders = min(m, max(1, 65536 // size))  # loadgen_colo's default
                    rate = args.offered / (groups * senders * (m - 1))
                    loads.append(Load("rooms", m, size, groups, rate, args.offered))
        return loads
    return [Load("relay", m, size, args.groups or (4 if m <= 100 else 1), args.rate)
            for m in args.players for size in args.frames]


class Colocation:
    def __init__(self, args: argparse.Namespace, bench: Bench, py: Interpreters,
                 loadgen: str) -> None:
        self.args, self.b, self.py, self.loadgen = args, bench, py, loadgen
        self.report = bench.report
        self.seed = int(time.time()) % 100000 * 1000  # room names new in every run

    def next_seed(self) -> int:
        self.seed += 100
        return self.seed

    def scenario_loads(self, protocol: str) -> dict[str, Any]:
        """Every load of `protocol` against every target, per placement."""
        a = self.args
        out: dict[str, Any] = {}
        for placement in a.placements:
            cpus = PLACEMENTS[placement]
            servers: dict[str, Any] = {}
            skipped: dict[str, str] = {}
            for target in a.targets:
                try:
                    servers[target] = start_target(self.b, self.py, target, protocol,
                                                   placement, cpus, a.redis_client)
                except Skipped as e:
                    skipped[target] = str(e)
                    progress(f"{protocol} {placement}: {target} skipped: {e}")
            cases = [{"name": t, "server": s, "cpus": cpus} for t, s in servers.items()]
            for load in loads_of(a, protocol):
                key = f"{protocol}/{load.members}/{load.size}" + (
                    f"@{load.offered:g}" if load.offered else "")
                runs = run_rounds(f"{load.label} {placement}", cases, self.loadgen, load,
                                  a.rounds, a.duration, a.warmup, a.drain, self.next_seed(),
                                  redis_share) if cases else {}
                load_tables(self.report, f"{load.label}, {placement}", runs, skipped)
                out.setdefault(key, {})[placement] = {"label": load.label, "runs": runs,
                                                      "skipped": skipped}
            self.b.stop_all()
        return out

    def scenario_handoff(self) -> dict[str, Any]:
        """mpd:2 accepting on slot 0 only, then on slot 1 only: per worker, CPU per
        delivery of rooms joined through a hand-off against rooms joined directly."""
        a = self.args
        load = Load("rooms", a.handoff_members, 100, a.handoff_rooms, a.handoff_rate)
        out: dict[str, Any] = {}
        for placement in a.placements:
            cpus = PLACEMENTS[placement]
            cases = []
            try:
                for accepting in (0, 1):
                    server = start_mpd(self.b, f"handoff-accept{accepting}", 2, "rooms",
                                       cpus, {"MPD_TEST_ACCEPT_SLOTS": str(accepting)})
                    cases.append({"name": f"accept {accepting}", "server": server,
                                  "cpus": cpus, "accepting": accepting,
                                  "owners_among": server.workers_pids()})
            except Skipped as e:
                progress(f"handoff {placement}: skipped: {e}")
                out[placement] = {"skipped": str(e)}
                self.report.heading(f"hand-offs at join, {placement}")
                self.report.note(f"Skipped: {e}")
                self.b.stop_all()
                continue
            runs = run_rounds(f"handoff {load.label} {placement}", cases, self.loadgen, load,
                              a.rounds, a.duration, a.warmup, a.drain, self.next_seed(),
                              self.slots_after_run)
            out[placement] = self.handoff_tables(placement, load, runs)
            self.b.stop_all()
        return out

    def slots_after_run(self, case: dict[str, Any], res: dict[str, Any]) -> None:
        """mpd's own view after a hand-off run: which pid is which slot, and whether only
        the accepting slot accepted (else the test hook is not honoured)."""
        server = case["server"]
        res["accepting"] = case["accepting"]
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            assert server.config_path is not None
            status = control_request(str(self.b.control_socket(server.config_path)),
                                     {"command": "status"})
            res["slots"] = {int(w["slot"]): int(w["pid"]) for w in status["workers"]}
            res["accepted"] = {int(w["slot"]): w.get("accepted") for w in status["workers"]}

    def handoff_tables(self, placement: str, load: Load, runs: dict[str, list[dict]]
                       ) -> dict[str, Any]:
        rows, ratios, within, honoured = [], [], [], True
        by_round = {r["round"]: r for r in runs.get("accept 1", [])}
        for run_a in runs.get("accept 0", []):
            run_b = by_round.get(run_a["round"])
            splits = []
            for run in (run_a, run_b):
                if run is None:
                    splits.append(None)
                    continue
                split = worker_split(run, run["accepting"], run.get("slots", {}))
                other = 1 - run["accepting"]
                accepted = run.get("accepted", {}).get(other)
                honoured &= accepted == 0
                splits.append(split)
                if split:
                    # a worker idle for a short window shows 0 s of CPU (clock ticks): NaN, not 0
                    within.append(ratio(split["handed_off"], split["direct"]))
                    rows.append([run["round"], run["accepting"], split["direct_rooms"],
                                 split["direct"], split["handed_off_rooms"],
                                 split["handed_off"], within[-1],
                                 "yes" if accepted == 0 else f"no ({accepted} accepted)"])
            ratios.append(handoff_ratio(splits[0], splits[1]))
        self.report.heading(f"hand-offs at join, {placement} ({load.label}; mpd:2)")
        self.report.table(["round", "accepting slot", "direct rooms", "direct us/delivery",
                           "handed-off rooms", "handed-off us/delivery",
                           "handed-off / direct (this run)", "only that slot accepted"], rows)
        result = median(ratios)
        self.report.note(f"Each worker against itself on the same rooms (accepting slot "
                         f"swapped, geometric mean of the two workers), median over rounds: "
                         f"**{fmt(result)}** (per round: "
                         f"{', '.join(fmt(r) for r in ratios)}). Server CPU per delivery of "
                         "one worker = its CPU / the deliveries to members of the rooms it "
                         "holds (/proc tells which worker holds each room's connections).")
        entry = {"runs": runs, "ratio": result, "per_round": ratios,
                 "within_run": median(within)}
        if not honoured:
            entry["skipped"] = ("MPD_TEST_ACCEPT_SLOTS is not honoured: a slot outside it "
                                "accepted clients (see the table)")
            entry["ratio"] = float("nan")
        return entry


def redis_share(case: dict[str, Any], res: dict[str, Any]) -> None:
    server = case["server"]
    if isinstance(server, RedisDesign):
        res["redis_cpu_s"] = res.get("cpu_by_pid", {}).get(server.redis.pid, float("nan"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stamp, out_dir, workdir, _nofile, tools = prepare(args.out, "colo", args.mpd_python,
                                                      True, args.uvloop_python)
    loadgen = tools.build_c("loadgen_colo")
    if loadgen is None:
        raise SystemExit("colocation: needs a C compiler for loadgen_colo.c")
    py = Interpreters(tools.mpd_python, tools.uvloop_python, args.redis_python)
    report = Report()
    meta = machine(tools)
    meta.update(redis_python=py.redis, redis_uvloop=py.redis_uvloop)
    report.emit([f"# co-location against the alternatives {stamp}", "",
                 f"{meta['nproc']} CPUs ({meta['cpu_model']}), kernel {meta['kernel']}, "
                 f"mpd on Python {meta['mpd_python'].split()[0]}, git {meta['git']}; "
                 f"rounds {args.rounds}, {args.duration:g} s per run after {args.warmup:g} s "
                 f"warm-up{', QUICK' if args.quick else ''}; pinned = every server process "
                 "and the load generator on CPU 0; spread = any CPU. uvloop: "
                 f"{py.uvloop or 'none'}; Redis design: {py.redis or 'none'} (client "
                 f"{args.redis_client}{', on uvloop' if py.redis_uvloop else ''})."])
    bench = Bench(args, tools, workdir, report)
    colo = Colocation(args, bench, py, loadgen)
    results: dict[str, Any] = {"meta": meta, "args": vars(args), "loads": {}, "failed": {}}

    def run_one(name: str) -> None:
        if name == "handoff":
            results["handoff"] = colo.scenario_handoff()
        else:
            results["loads"].update(colo.scenario_loads(name))

    bench.run_scenarios(args.scenarios, run_one, results["failed"])
    results["targets"] = report_targets(report, results)
    results["elapsed_s"] = time.monotonic() - T0
    path = out_dir / f"colo-{stamp}.json"
    path.write_text(json.dumps(results, indent=1, default=str))
    Path(path.with_suffix(".md")).write_text("\n".join(report.lines) + "\n")
    progress(f"results: {path} (and {path.with_suffix('.md').name}); logs in {workdir}")
    if results["failed"]:
        progress(f"FAILED scenarios: {', '.join(results['failed'])}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
