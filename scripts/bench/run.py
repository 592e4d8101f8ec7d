#!/usr/bin/env python3
"""mpd's benchmark driver: runs mpd and the baselines side by side and prints ratios.

    python scripts/bench/run.py --scenarios all            # the full suite (~13 min)
    python scripts/bench/run.py --quick --scenarios all    # smoke test, well under a minute
    python scripts/bench/run.py --scenarios ping,handoff --rounds 5 --duration 5

Scenarios: ping (closed-loop pings at 10/100/1000/10000 connections), connrate (connect, one
ping, close), handoff (`C` key frame + ping, routed through the master), splitsend (the
seed's mpclient2, which sends each message in two pieces), respawn (SIGKILL a worker, time
until its slot serves again), memory (RSS/USS idle and with 10,000 idle connections), scale
(1 -> 30 workers). Every figure is reported as a ratio against a baseline run in the same
invocation (the machine is shared and noisy): baseline_epoll.c (C, the floor),
baseline_rawfd.py (the Python floor: raw fds, os.read/os.write), baseline_epoll.py (Python
epoll with socket objects), baseline_asyncio.py (an asyncio Protocol server, and the same on
uvloop where an interpreter has it: --uvloop-python), and, for hand-off, mpd itself without
the key frame. The last table sums up issue 13's targets against this run.

Per-core comparisons pin the server and the load generator to the same CPU (taskset -c 0
equivalent): with them on different cores throughput swings 2-3x between runs. Server CPU
is utime+stime of the server's whole process tree from /proc/PID/stat, sampled when the
load generator opens and closes its measurement window.

Output: a progress line per step on stderr, the tables on stdout, and
bench-results/bench-<time>.json (+ latest.json, .md with the tables); servers' logs in
bench-results/run-<time>/. The C programs are built there with `cc -O2` at run time; with
no C compiler, scripts/bench/loadgen.py (multi-process Python) is used instead and the C
baseline is skipped. Only 127.0.0.1 is ever contacted; every server started is killed.
Runs on Python 3.9+ with the standard library only; mpd is run with --mpd-python (default:
this interpreter if it can import mpd, else the repository's .venv or .ci-venv-*).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from common import NPROC, PINNED, ROOT, T0, Report, progress, raise_nofile
from harness import Bench
from lifecycle import scenario_memory, scenario_respawn, scenario_scale
from load import scenario_connrate, scenario_handoff, scenario_ping
from splitsend import scenario_splitsend
from targets import report_targets
from tools import Tools, find_mpd_python

SCENARIOS: dict[str, Callable[[Bench], dict[str, Any]]] = {
    "ping": scenario_ping,
    "connrate": scenario_connrate,
    "handoff": scenario_handoff,
    "splitsend": scenario_splitsend,
    "respawn": scenario_respawn,
    "memory": scenario_memory,
    "scale": scenario_scale,
}


def machine(tools: Tools) -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mpd_py = subprocess.run([tools.mpd_python, "-c", "import sys; print(sys.version)"],
                            capture_output=True, text=True, timeout=30).stdout.strip()
    commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                            capture_output=True, text=True, timeout=30).stdout.strip()
    return {"nproc": os.cpu_count(), "cpus_allowed": NPROC, "cpu_model": model,
            "kernel": platform.release(), "mpd_python": mpd_py, "driver_python":
            sys.version.split()[0], "cc": tools.cc_version, "git": commit,
            "nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
            "somaxconn": Path("/proc/sys/net/core/somaxconn").read_text().strip(),
            "uvloop_python": tools.uvloop_python}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="mpd benchmarks against side-by-side baselines",
                                epilog="Scenarios: " + ", ".join(SCENARIOS))
    p.add_argument("--scenarios", default="all",
                   help="comma-separated: " + ",".join(SCENARIOS) + ", or all (default)")
    p.add_argument("--quick", action="store_true",
                   help="about a second per scenario with small counts (smoke test)")
    p.add_argument("--rounds", type=int, help="interleaved rounds per case (default 3; 1 quick)")
    p.add_argument("--duration", type=float, help="seconds measured per run (default 3)")
    p.add_argument("--warmup", type=float, help="seconds before measuring (default 0.5)")
    p.add_argument("--ping-conns", help="connection counts for ping (default 10,100,1000,10000)")
    p.add_argument("--connrate-conns", type=int, help="cycles in flight (default 32)")
    p.add_argument("--memory-conns", type=int, help="idle connections (default 10000)")
    p.add_argument("--splitsend-seconds", type=float,
                   help="splitsend: seconds of replies counted per round (default 6)")
    p.add_argument("--respawn-kills", type=int, help="workers killed, one per slot (default 8)")
    p.add_argument("--scale-to", type=int, default=30, help="workers to scale to (default 30)")
    p.add_argument("--mpd-python", help="interpreter that runs mpd and the Python baseline")
    p.add_argument("--uvloop-python", help="interpreter with uvloop for that baseline "
                   "(default: --mpd-python's, else bench-results/tools-venv's, if it has "
                   "uvloop; else the uvloop baseline is skipped)")
    p.add_argument("--out", default=str(ROOT / "bench-results"), help="results directory")
    p.add_argument("--no-cc", action="store_true",
                   help="act as if there were no C compiler (Python load generator, no C "
                        "baseline)")
    p.add_argument("--client-batch", action="store_true",
                   help="run the load generator under SCHED_BATCH, so that a client woken by "
                        "a reply does not preempt the server on a shared CPU (pinned runs): "
                        "without it a server slower than the client is switched out every "
                        "few requests and charged the switches")
    p.add_argument("--keep-hist", action="store_true",
                   help="keep latency histograms in the JSON (for plots)")
    args = p.parse_args(argv)
    q = args.quick
    defaults = {"rounds": 1 if q else 3, "duration": 0.3 if q else 3.0,
                "warmup": 0.1 if q else 0.5, "ping_conns": "10,1000" if q else
                "10,100,1000,10000", "connrate_conns": 16 if q else 32,
                "memory_conns": 1000 if q else 10000, "respawn_kills": 2 if q else 8,
                "splitsend_seconds": 1.5 if q else 6.0}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.ping_conns = [int(x) for x in str(args.ping_conns).split(",") if x]
    names = list(SCENARIOS) if args.scenarios == "all" else args.scenarios.split(",")
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    args.names = names
    return args


def prepare(out: str, prefix: str, mpd_python: str | None, use_cc: bool = True,
            uvloop_python: str | None = None) -> tuple[str, Path, Path, tuple[int, int], Tools]:
    """What every driver does first: a time stamp, the run's directory under `out`, the fd
    limit raised, itself off the pinned CPU, the load generator built. Returns the stamp,
    `out` as a Path, the run's directory, the (soft, hard) fd limit and the tools."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = Path(out)
    workdir = out_dir / f"{prefix}-{stamp}"
    workdir.mkdir(parents=True, exist_ok=True)
    nofile = raise_nofile()
    # The driver keeps off the pinned CPU so that it does not disturb per-core runs.
    if NPROC > 1:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, [c for c in os.sched_getaffinity(0) if c not in PINNED])
    tools = Tools(out_dir / "build", find_mpd_python(mpd_python), use_cc, uvloop_python)
    tools.build()
    return stamp, out_dir, workdir, nofile, tools


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stamp, out_dir, workdir, nofile, tools = prepare(args.out, "run", args.mpd_python,
                                                     not args.no_cc, args.uvloop_python)
    report = Report()
    meta = machine(tools)
    progress(f"machine: {meta['nproc']} CPUs, {meta['cpu_model']}, kernel {meta['kernel']}, "
             f"mpd on Python {meta['mpd_python'].split()[0]}, RLIMIT_NOFILE {nofile}")
    needed = max(args.ping_conns + [args.memory_conns]) + 64
    if nofile[0] < needed:
        progress(f"warning: RLIMIT_NOFILE {nofile[0]} < {needed}: big counts will fail")
    report.emit([f"# mpd benchmarks {stamp}", "",
                 f"{meta['nproc']} CPUs ({meta['cpu_model']}), kernel {meta['kernel']}, "
                 f"mpd on Python {meta['mpd_python'].split()[0]}, git {meta['git']}; "
                 f"rounds {args.rounds}, {args.duration:g} s per run after {args.warmup:g} s "
                 f"warm-up{', QUICK' if args.quick else ''}. pinned = server and load "
                 "generator on CPU 0; spread = any CPU"
                 + ("; load generator under SCHED_BATCH." if args.client_batch else ".")])
    bench = Bench(args, tools, workdir, report)
    results: dict[str, Any] = {"meta": meta, "args": {k: v for k, v in vars(args).items()},
                               "scenarios": {}, "failed": {}}

    def run_one(name: str) -> None:
        results["scenarios"][name] = SCENARIOS[name](bench)

    bench.run_scenarios(args.names, run_one, results["failed"])
    results["targets"] = report_targets(report, results["scenarios"])
    results["elapsed_s"] = time.monotonic() - T0
    path = out_dir / f"bench-{stamp}.json"
    path.write_text(json.dumps(results, indent=1, default=str))
    shutil.copyfile(path, out_dir / "latest.json")
    (out_dir / f"bench-{stamp}.md").write_text("\n".join(report.lines) + "\n")
    progress(f"results: {path} (and {path.with_suffix('.md').name}); logs in {workdir}")
    if results["failed"]:
        progress(f"FAILED scenarios: {', '.join(results['failed'])}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
