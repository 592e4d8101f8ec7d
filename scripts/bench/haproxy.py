#!/usr/bin/env python3
"""Through HAProxy against straight to mpd, in one run: requests/s (closed-loop pings on
--ping-conns connections) and hand-offs/s (connect, `C` key + ping in one send, reply,
close; --handoff-conns in flight) with the benchmark's load generator (loadgen.c) on both
paths, rounds interleaved, and the median of per-round ratios.

    python scripts/bench/haproxy.py                          # 3 rounds of 5 s per case
    python scripts/bench/haproxy.py --rounds 5 --duration 10 --workers 2

Straight: mpd on 127.0.0.1, PROXY protocol off. Through HAProxy: scripts/cluster with one
host, as shipped (send-proxy-v2 and the agent check on; HAProxy on 127.0.0.1, mpd on
127.0.0.2), with the same worker count. Nothing is pinned: HAProxy, mpd and the load
generator share the machine's CPUs, as on one box. Reported per case: rate, latency p50
and p99, mpd's CPU per operation (its whole process tree) and, through HAProxy, HAProxy's;
for the hand-off load, hand-offs/s from mpd's own fd.dispatched lines. Results in
bench-results/haproxy-<time>.json. Only loopback addresses are used; everything started is
stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import harness
import load
import tools
from common import procfs

CLUSTER = common.ROOT / "scripts" / "cluster"


class ThroughHAProxy:
    """The one-host cluster, seen by harness.Bench.loadgen as a server: its port is HAProxy's;
    cpu() is mpd's whole tree, master_cpu() HAProxy's (so the loadgen's "master" figure is
    HAProxy's CPU per operation here)."""

    def __init__(self, state: Path, port: int, workers: int, python: str,
                 proxy_protocol: bool = True):
        self.name, self.state, self.port = "through-haproxy", state, port
        self.python = python
        up = self.cluster("up", "1", "--workers", str(workers),
                          "--proxy-protocol" if proxy_protocol else "--no-proxy-protocol")
        if up.returncode != 0:
            raise SystemExit(f"bench: scripts/cluster up failed:\n{up.stdout}{up.stderr}")
        self.mpd_pid = int((state / "host1" / "mpd.pid").read_text())
        self.haproxy_pid = int((state / "haproxy.pid").read_text())
        self.tail = harness.LogTail(state / "host1" / "mpd.log")
        self.control_path = state / "host1" / "mpd.sock"  # for harness.Bench.adopted
        common.progress(f"started {self.name}: HAProxy (pid {self.haproxy_pid}) on "
                        f"127.0.0.1:{port}, mpd (pid {self.mpd_pid}) on 127.0.0.2:{port}")

    def cluster(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.python, str(CLUSTER), "--dir", str(self.state), "--port",
                               str(self.port), *args], capture_output=True, text=True,
                              timeout=120, cwd=common.ROOT)

    def cpu(self) -> float:
        return procfs.total_cpu_seconds(procfs.tree(self.mpd_pid))

    def master_cpu(self) -> float:
        return procfs.total_cpu_seconds([self.haproxy_pid])

    def check_alive(self, during: str) -> None:
        """As harness.Server.check_alive: raise if mpd or HAProxy is gone."""
        for name, pid in (("mpd", self.mpd_pid), ("HAProxy", self.haproxy_pid)):
            if not procfs.alive(pid):
                raise RuntimeError(f"{name} (pid {pid}) of {self.name} exited during {during}")

    def stop(self) -> None:
        self.cluster("down")
        shutil.rmtree(self.state, ignore_errors=True)


def free_port_pair() -> int:
    """A port free on 127.0.0.1 and 127.0.0.2, with the next one free for the agent."""
    import socket

    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        try:
            for host, p in (("127.0.0.2", port), ("127.0.0.2", port + 1)):
                with socket.socket() as other:
                    other.bind((host, p))
            return port
        except OSError:
            continue


def handoffs_per_s(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Hand-offs per second over the span of the fd.dispatched lines (warm-up included,
    so this is a little under the measured window's rate)."""
    dispatched = [e for e in events if e.get("event") == "fd.dispatched"]
    if len(dispatched) < 2:  # at info (since issue 14): harness.counted_handoffs counts
        return {"handoffs": 0, "handoffs_per_s": 0.0}
    first, last = (run_ts(dispatched[0]), run_ts(dispatched[-1]))
    return {"handoffs": len(dispatched),
            "handoffs_per_s": (len(dispatched) - 1) / max(last - first, 1e-9),
            **load.dispatched(events)}


def run_ts(event: dict[str, Any]) -> float:
    from datetime import datetime

    return datetime.fromisoformat(event["ts"].replace("Z", "+00:00")).timestamp()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2, help="mpd workers on each path")
    p.add_argument("--ping-conns", type=int, default=100)
    p.add_argument("--handoff-conns", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=5.0, help="seconds measured per case")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--without-proxy-protocol", action="store_true",
                   help="also through HAProxy without send-proxy-v2 (mpd's PROXY cost)")
    p.add_argument("--mpd-python")
    p.add_argument("--out", default=str(common.ROOT / "bench-results"))
    args = p.parse_args(argv)
    args.keep_hist = False  # what harness.Bench.loadgen asks of its arguments
    common.raise_nofile()
    python = tools.find_mpd_python(args.mpd_python)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    workdir = Path(args.out) / f"haproxy-{stamp}"
    workdir.mkdir(parents=True)
    built = tools.Tools(workdir / "build", python)
    built.build()
    bench = harness.Bench(args, built, workdir, common.Report())
    clusters: list[ThroughHAProxy] = []
    try:
        paths: list[tuple[str, Any]] = [("straight", bench.mpd("straight", args.workers,
                                                               None).start())]
        for name, proxy_protocol in (("haproxy", True), ("haproxy-noproxy", False)):
            if name == "haproxy-noproxy" and not args.without_proxy_protocol:
                continue
            clusters.append(ThroughHAProxy(
                Path(tempfile.mkdtemp(prefix="mpd-bench-cluster-")), free_port_pair(),
                args.workers, python, proxy_protocol))
            paths.append((name, clusters[-1]))
        cases = [{"name": f"{path} {mode}", "server": server, "mode": mode, "cpus": None,
                  "conns": conns, **({"collect": handoffs_per_s} if mode == "handoff" else {})}
                 for mode, conns in (("ping", args.ping_conns),
                                     ("handoff", args.handoff_conns))
                 for path, server in paths]
        results = bench.run_cases("haproxy", cases, 0, args.rounds, args.duration,
                                  args.warmup)
    finally:
        bench.stop_all()
        for cluster in clusters:
            cluster.stop()
    summary = report(results, args)
    (Path(args.out) / f"haproxy-{stamp}.json").write_text(json.dumps(
        {"args": {k: v for k, v in vars(args).items()}, "runs": results, "summary": summary,
         "machine": {"cpus": os.cpu_count(), "python": sys.version,
                     "cc": built.cc_version}}, indent=1, default=str))
    errors = sum(r.get("errors", 0) + r.get("lost", 0) for runs in results.values()
                 for r in runs)
    return 0 if not errors else 1


def report(results: dict[str, list[dict]], args: argparse.Namespace) -> dict[str, Any]:
    summary = common.summarise(results)
    paths = [p for p in ("straight", "haproxy", "haproxy-noproxy")
             if f"{p} ping" in results]
    print(f"\n{args.workers} workers, {args.rounds} rounds of {args.duration:g} s per case, "
          "nothing pinned; ratios are medians of per-round ratios against straight to mpd\n")
    print("| load | path | rate /s | ratio | p99 us | mpd CPU us/op | HAProxy CPU us/op | "
          "errors |")
    print("|---|---|---|---|---|---|---|---|")
    out: dict[str, Any] = {}
    for mode, unit in (("ping", "requests"), ("handoff", "connections")):
        for path in paths:
            name = f"{path} {mode}"
            row = summary[name]
            ratio = common.round_ratios(results, name, f"straight {mode}", common.rate_of)
            haproxy_cpu = f"{row['master_cpu_us_per_op']:.1f}" if path != "straight" else ""
            print(f"| {mode} ({unit}) | {path} | {row['rate']:,.0f} | {ratio:.3f}x | "
                  f"{row['p99_us']:.0f} | {row['server_cpu_us_per_op']:.1f} | {haproxy_cpu} | "
                  f"{row['errors']} |")
            out[name] = {**row, "rate_ratio": ratio}
    for path in paths:
        name = f"{path} handoff"
        rate = common.median([r["handoffs_per_s"] for r in results[name]])
        ratio = common.round_ratios(results, name, "straight handoff",
                                 lambda r: r["handoffs_per_s"])
        print(f"| hand-offs (fd.dispatched) | {path} | {rate:,.0f} | {ratio:.3f}x | | | | |")
        out[f"{path} handoffs_per_s"] = {"rate": rate, "ratio": ratio}
    return out


if __name__ == "__main__":
    sys.exit(main())
