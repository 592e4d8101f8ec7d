"""Running loadgen_colo against a server: the server's CPU sampled per process when the
load generator opens and closes its window (harness.Bench.loadgen's way, kept per pid so
that one worker can be told from another), and rounds of cases interleaved."""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from typing import Any, Callable

import procnet
from common import ALL_CPUS, NPROC, fmt, procfs, progress


@dataclass
class Load:
    """One load: rooms of `members` members (relay: streams of 1 publisher and `members`
    players), `groups` of them, messages of `size` bytes; closed loop unless `rate`
    (messages per second per sender; `offered`: the deliveries per second that makes)."""

    protocol: str
    members: int
    size: int
    groups: int
    rate: float = 0.0
    offered: float = 0.0

    @property
    def label(self) -> str:
        who = "members" if self.protocol == "rooms" else "players"
        unit = "B lines" if self.protocol == "rooms" else "B frames"
        loop = (f", {self.offered:,.0f} deliveries/s offered" if self.offered else
                f", {self.rate:g}/s per sender" if self.rate else ", closed loop")
        return (f"{self.protocol} {self.members} {who} x {self.groups}, "
                f"{self.size:,} {unit}{loop}")


def cpu_by_pid(pids: list[int]) -> dict[int, float]:
    out = {}
    for pid in pids:
        try:
            out[pid] = procfs.cpu_seconds(pid)
        except (OSError, ValueError, IndexError):
            continue
    return out


def run_load(loadgen: str, server: Any, load: Load, cpus: list[int] | None,
             duration: float, warmup: float, drain: float, seed: int,
             owners_among: list[int] | None = None) -> dict[str, Any]:
    """One run of loadgen_colo; the result with the server's CPU over the window added:
    server_cpu_s, server_cpu_us_per_op (per delivery), server_cpu_ns_per_byte and
    cpu_by_pid; with `owners_among`, also owner_by_group: which of those pids serves each
    room (from the ports the load generator reports once everyone has joined)."""
    procs = 1 if cpus is not None else max(1, min(NPROC, load.groups))
    argv = [loadgen, load.protocol, "-p", str(server.port), "-c", str(load.members),
            "-r", str(load.groups), "-l", str(load.size), "-d", f"{duration:g}",
            "-w", f"{warmup:g}", "-D", f"{drain:g}", "-s", str(seed), "-P", str(procs)]
    if load.rate:
        argv += ["-R", f"{load.rate:g}"]

    def setup() -> None:
        os.sched_setaffinity(0, cpus if cpus is not None else ALL_CPUS)

    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, preexec_fn=setup)
    marks: dict[str, tuple[float, dict[int, float]]] = {}
    ports: dict[int, int] = {}  # group -> a member's local port
    owner: dict[int, int] = {}  # group -> pid of the server process holding that member
    result: dict[str, Any] = {}
    deadline = time.monotonic() + duration + warmup + drain + 120
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = json.loads(raw)
            event = line.get("event")
            if event in ("measure.start", "measure.end"):
                marks[event] = (time.monotonic(), cpu_by_pid(server.pids()))
            elif event == "colo.joined":
                first, joined = line["first"], line["ports"]
                ports.update({first + i: port for i, port in enumerate(joined)})
                if owners_among:
                    held = procnet.owners(owners_among, server.port, joined)
                    owner.update({first + i: held[port] for i, port in enumerate(joined)
                                  if port in held})
            elif "mode" in line:
                result = line
            if time.monotonic() > deadline:
                break
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.stderr:
        proc.stderr.close()
    if not result:
        raise RuntimeError(f"loadgen_colo against {server.name} gave no result "
                           f"(exit {proc.returncode}): {err.strip()[-2000:]}")
    if "measure.start" in marks and "measure.end" in marks:
        (t1, c1), (t2, c2) = marks["measure.start"], marks["measure.end"]
        per_pid = {pid: c2[pid] - c1[pid] for pid in c2 if pid in c1}
        cpu = sum(per_pid.values())
        wall = t2 - t1
        result.update(server_cpu_s=cpu, server_util=cpu / wall if wall > 0 else float("nan"),
                      cpu_by_pid=per_pid, wall_s=wall)
        result["server_cpu_us_per_op"] = (result["server_util"] / result["rate"] * 1e6
                                          if result["rate"] else float("nan"))
        result["server_cpu_ns_per_byte"] = result["server_cpu_us_per_op"] * 1e3 / load.size
    result["ports"] = ports
    result["owner_by_group"] = owner
    return result


def errors_of(r: dict[str, Any]) -> int:
    """Everything the load generator counts as wrong."""
    return sum(r.get(k, 0) for k in ("lost", "duplicates", "out_of_order", "misrouted",
                                     "corrupt", "errors", "join_errors", "ack_mismatch"))


def run_rounds(label: str, cases: list[dict[str, Any]], loadgen: str, load: Load,
               rounds: int, duration: float, warmup: float, drain: float, seed_base: int,
               after: Callable[[dict[str, Any], dict[str, Any]], None] | None = None
               ) -> dict[str, list[dict[str, Any]]]:
    """Each case (name, server, cpus) once per round, the order rotated each round. Every
    case of a round uses the same room names (seed), so a routing server splits them the
    same way; the next round has new ones."""
    results: dict[str, list[dict[str, Any]]] = {c["name"]: [] for c in cases}
    for r in range(rounds):
        order = cases[r % len(cases):] + cases[:r % len(cases)]
        for case in order:
            server = case["server"]
            res = run_load(loadgen, server, load, case["cpus"], duration, warmup, drain,
                           seed_base + r, case.get("owners_among"))
            server.check_alive(f"{label} round {r + 1} {case['name']}")
            res["round"] = r
            if after is not None:
                after(case, res)
            results[case["name"]].append(res)
            progress(f"{label} round {r + 1}/{rounds} {case['name']}: "
                     f"{res['rate']:,.0f} deliveries/s, {res['bytes_per_s'] / 1e6:,.1f} MB/s, "
                     f"server {fmt(res.get('server_cpu_us_per_op'))} us/delivery, client "
                     f"{res['client_cpu_us_per_op']:.2f}, p99 {res['lat_us']['p99']:,.0f} us"
                     + (f", WRONG {errors_of(res)}" if errors_of(res) else ""))
    return results
