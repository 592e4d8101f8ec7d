#!/usr/bin/env python3
"""mpd's benchmark driver: runs mpd and the baselines side by side and prints ratios.

    python scripts/bench/run.py --scenarios all            # the full suite (~10 min)
    python scripts/bench/run.py --quick --scenarios all    # smoke test, well under a minute
    python scripts/bench/run.py --scenarios ping,handoff --rounds 5 --duration 5

Scenarios: ping (closed-loop pings at 10/100/1000/10000 connections), connrate (connect,
one ping, close), handoff (`C` key frame + ping, routed through the master), respawn
(SIGKILL a worker, time until its slot serves again), memory (RSS/USS idle and with
10,000 idle connections), scale (1 -> 30 workers). Every figure is reported as a ratio
against a baseline run in the same invocation (the machine is shared and noisy):
scripts/bench/baseline_epoll.py (minimal Python epoll server) and baseline_epoll.c (the
same in C, the floor), and, for hand-off, mpd itself without the key frame.

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
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
T0 = time.monotonic()
ALL_CPUS = sorted(os.sched_getaffinity(0))  # before the driver moves off the pinned CPU
NPROC = len(ALL_CPUS)
PINNED = [0]  # the CPU that server and load generator share in per-core comparisons


def progress(message: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {message}", file=sys.stderr, flush=True)


# --- /proc helpers -------------------------------------------------------------------------------

def children(pid: int) -> list[int]:
    """Direct children of pid: /proc/PID/task/*/children, else a scan of /proc/*/stat."""
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    found_file = False
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(p) for p in f.read().split()]
            found_file = True
        except (FileNotFoundError, ProcessLookupError):
            pass
    if found_file:
        return out
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError), \
                    open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry))
    return out


def tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo += children(p)
    return pids


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes (their own, not their reaped children's)."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return ticks / CLK_TCK


def memory(pid: int) -> dict[str, int]:
    """Bytes: rss, pss and uss (Private_Clean + Private_Dirty) from smaps_rollup."""
    values: dict[str, int] = {}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                values[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return {"rss": values.get("Rss", 0), "pss": values.get("Pss", 0),
            "uss": values.get("Private_Clean", 0) + values.get("Private_Dirty", 0)}


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def raise_nofile() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit; servers and load generators inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# --- statistics ----------------------------------------------------------------------------------

def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def median(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def ratio(a: float | None, b: float | None) -> float:
    """a / b for two positive figures; NaN (printed "-") when either is missing or <= 0."""
    if a is None or b is None or a != a or b != b or a <= 0 or b <= 0:
        return float("nan")
    return a / b


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


class Report:
    """Tables, printed as they are made and collected for the .md file."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def heading(self, text: str) -> None:
        self.emit(["", f"### {text}", ""])

    def note(self, text: str) -> None:
        self.emit([text, ""])

    def table(self, headers: list[str], rows: list[list[Any]]) -> None:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
        self.emit(lines + [""])

    def emit(self, lines: list[str]) -> None:
        self.lines += lines
        print("\n".join(lines), flush=True)


# --- building the tools --------------------------------------------------------------------------

class Tools:
    def __init__(self, build_dir: Path, mpd_python: str, use_cc: bool = True):
        self.build_dir = build_dir
        self.mpd_python = mpd_python
        self.cc = (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
                   if use_cc else None)
        self.loadgen: list[str] = []
        self.baseline_c: list[str] | None = None
        self.cc_version = ""

    def build(self) -> None:
        self.build_dir.mkdir(parents=True, exist_ok=True)
        if self.cc:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                self.cc_version = subprocess.run([self.cc, "--version"], capture_output=True,
                                                 text=True, timeout=10).stdout.splitlines()[0]
            for name in ("loadgen", "baseline_epoll"):
                out = self.build_dir / name
                cmd = [self.cc, "-O2", "-Wall", "-o", str(out), str(HERE / f"{name}.c")]
                progress(f"build: {' '.join(cmd)}")
                subprocess.run(cmd, check=True, timeout=120)
            self.loadgen = [str(self.build_dir / "loadgen")]
            self.baseline_c = [str(self.build_dir / "baseline_epoll")]
        else:
            progress("build: no C compiler: Python load generator, no C baseline")
            self.loadgen = [self.mpd_python, str(HERE / "loadgen.py")]


def find_mpd_python(requested: str | None) -> str:
    if requested:
        return requested
    candidates = [sys.executable] + [str(ROOT / v / "bin" / "python")
                                     for v in (".venv", ".ci-venv-3.11", ".ci-venv-3.13",
                                               ".ci-venv-3.9")]
    for python in candidates:
        if not os.path.exists(python):
            continue
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            if subprocess.run([python, "-c", "import mpd.cli"], cwd=ROOT, timeout=30,
                              capture_output=True).returncode == 0:
                return python
    raise SystemExit("bench: no Python that can import mpd; pass --mpd-python")


# --- servers -------------------------------------------------------------------------------------

class LogTail:
    """Reads a JSON-lines log file as it grows."""

    def __init__(self, path: Path):
        self.path = path
        self.pos = 0
        self.partial = b""
        self.events: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except FileNotFoundError:
            return []
        self.pos += len(data)
        data = self.partial + data
        *lines, self.partial = data.split(b"\n")
        new = []
        for line in lines:
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    new.append(event)
        self.events += new
        return new

    def mark(self) -> int:
        self.poll()
        return len(self.events)

    def since(self, mark: int) -> list[dict[str, Any]]:
        self.poll()
        return self.events[mark:]

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float,
                 what: str, start: int = 0, alive_pid: int | None = None,
                 interval: float = 0.001) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        checked = start
        while True:
            self.poll()
            for event in self.events[checked:]:
                if predicate(event):
                    return event
            checked = len(self.events)
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout}s waiting for {what} "
                                   f"in {self.path}")
            if alive_pid is not None and not alive(alive_pid):
                raise RuntimeError(f"server exited while waiting for {what}; see {self.path}")
            time.sleep(interval)


class Server:
    """A server process (mpd or a baseline) in its own session, with its log on disk."""

    def __init__(self, name: str, kind: str, argv: list[str], cpus: list[int] | None,
                 workdir: Path, ready: Callable[[dict[str, Any]], bool],
                 config_path: Path | None = None, workers: int = 0, cwd: Path = ROOT):
        self.name, self.kind, self.argv, self.cpus = name, kind, argv, cpus
        self.cwd = cwd  # for mpd: the source tree it runs from (`python -m mpd.cli`)
        self.ready = ready
        self.config_path = config_path
        self.workers = workers
        self.log_path = workdir / f"{name}.log"
        self.err_path = workdir / f"{name}.stderr"
        self.proc: subprocess.Popen[bytes] | None = None
        self.tail = LogTail(self.log_path)
        self.port = 0
        self.start_s = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> Server:
        cpus = self.cpus

        def setup() -> None:
            # Spread (cpus None) means every CPU, not the driver's own affinity.
            os.sched_setaffinity(0, cpus if cpus is not None else ALL_CPUS)

        t = time.monotonic()
        with open(self.log_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL, cwd=self.cwd,
                                         start_new_session=True, preexec_fn=setup)
        started = self.tail.wait_for(lambda e: "port" in e, timeout, f"{self.name} start",
                                     alive_pid=self.pid)
        self.port = int(started["port"])
        self.tail.wait_for(self.ready, timeout, f"{self.name} ready", alive_pid=self.pid)
        self.start_s = time.monotonic() - t
        progress(f"started {self.name} (pid {self.pid}, port {self.port}, "
                 f"{'cpu ' + ','.join(map(str, cpus)) if cpus else 'any cpu'}, "
                 f"ready in {self.start_s * 1000:.0f} ms)")
        return self

    def pids(self) -> list[int]:
        return tree(self.pid)

    def workers_pids(self) -> list[int]:
        return children(self.pid)

    def cpu(self) -> float:
        return cpu_seconds(self.pids())

    def master_cpu(self) -> float:
        return cpu_seconds([self.pid])

    def stop(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        # Whatever is left of its session (workers included): the group is ours alone.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


class Bench:
    def __init__(self, args: argparse.Namespace, tools: Tools, workdir: Path, report: Report):
        self.args = args
        self.tools = tools
        self.workdir = workdir
        self.report = report
        self.servers: list[Server] = []
        self.seq = 0
        # Control sockets live in a short directory: AF_UNIX paths stop at 107 bytes, and
        # the results directory may be deep (a test's tmp_path, say).
        self.sockdir = Path(tempfile.mkdtemp(prefix="mpd-bench-"))

    def control_socket(self, config_path: Path) -> Path:
        return self.sockdir / (config_path.stem + ".sock")

    # server factories --------------------------------------------------------------------

    def _name(self, name: str) -> str:
        self.seq += 1
        return f"{self.seq:02d}-{name}"

    def mpd(self, name: str, workers: int, cpus: list[int] | None, log_level: str = "info",
            max_clients: int = 20000, tree: Path = ROOT) -> Server:
        name = self._name(name)
        config = self.workdir / f"{name}.toml"
        self.write_mpd_config(config, workers, log_level, max_clients, tree)
        server = Server(name, "mpd", [self.tools.mpd_python, "-m", "mpd.cli", "--config",
                                      str(config)], cpus, self.workdir,
                        lambda e: e.get("event") in ("mpd.ready",), config, workers, tree)
        return self.track(server)

    def write_mpd_config(self, path: Path, workers: int, log_level: str = "info",
                         max_clients: int = 20000, tree: Path = ROOT) -> None:
        path.write_text(
            "[server]\nlisten = \"127.0.0.1\"\nport = 0\nbacklog = 4096\n" + run_as(tree) +
            f"[workers]\nworkers = {workers}\nmax_clients = {max_clients}\n"
            "graceful_timeout = 2.0\n"
            f"[control]\nsocket = \"{self.control_socket(path)}\"\n"
            f"[log]\nlevel = \"{log_level}\"\nformat = \"json\"\n")

    def py_baseline(self, name: str, workers: int, cpus: list[int] | None,
                    scale_to: int = 0) -> Server:
        name = self._name(name)
        argv = [self.tools.mpd_python, str(HERE / "baseline_epoll.py"), "--workers",
                str(workers), "--scale-to", str(scale_to)]
        ready = ((lambda e: e.get("event") == "baseline.ready") if workers
                 else (lambda e: e.get("event") == "baseline.started"))
        return self.track(Server(name, "py", argv, cpus, self.workdir, ready, workers=workers))

    def c_baseline(self, name: str, workers: int, cpus: list[int] | None) -> Server | None:
        if not self.tools.baseline_c:
            return None
        name = self._name(name)
        argv = self.tools.baseline_c + ["-w", str(workers)]
        return self.track(Server(name, "c", argv, cpus, self.workdir,
                                 lambda e: e.get("event") == "baseline.started",
                                 workers=workers))

    def track(self, server: Server) -> Server:
        self.servers.append(server)
        return server

    def stop_all(self) -> None:
        for server in self.servers:
            server.stop()
        self.servers = []

    # the load generator ------------------------------------------------------------------

    def loadgen(self, mode: str, server: Server, conns: int, duration: float, warmup: float,
                cpus: list[int] | None, extra: list[str] | None = None) -> dict[str, Any]:
        # Pinned: one load-generator process on the server's CPU. Spread: one per CPU, as
        # a single client thread would ping-pong with the server and use one core at most.
        procs = 1 if cpus is not None else NPROC
        argv = self.tools.loadgen + [mode, "-p", str(server.port), "-c", str(conns),
                                     "-d", f"{duration:g}", "-w", f"{warmup:g}",
                                     "-s", str(self.seq), "-P", str(procs)] + (extra or [])

        def setup() -> None:
            # Spread (cpus None) means every CPU, not the driver's own affinity.
            os.sched_setaffinity(0, cpus if cpus is not None else ALL_CPUS)

        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, preexec_fn=setup)
        marks: dict[str, tuple[float, float]] = {}
        result: dict[str, Any] = {}
        deadline = time.monotonic() + duration + warmup + 90
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                if time.monotonic() > deadline:
                    break
                line = json.loads(raw)
                event = line.get("event")
                if event in ("measure.start", "measure.end"):
                    marks[event] = (time.monotonic(), server.cpu(), server.master_cpu())
                elif "mode" in line:
                    result = line
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if not result:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"loadgen {mode} against {server.name} gave no result: {err}")
        if proc.stderr:
            proc.stderr.close()
        if "measure.start" in marks and "measure.end" in marks:
            (t1, c1, m1), (t2, c2, m2) = marks["measure.start"], marks["measure.end"]
            wall = t2 - t1
            util = (c2 - c1) / wall if wall > 0 else float("nan")
            result["server_cpu_s"] = c2 - c1
            result["server_util"] = util
            result["server_cpu_us_per_op"] = (util / result["rate"] * 1e6
                                              if result.get("rate") else float("nan"))
            # The top process alone: mpd's master, or the baseline's parent / only process.
            result["master_cpu_us_per_op"] = ((m2 - m1) / wall / result["rate"] * 1e6
                                              if result.get("rate") and wall > 0
                                              else float("nan"))
        if not self.args.keep_hist:
            result.pop("hist_us", None)
        return result

    # cases: several servers, several rounds, interleaved ---------------------------------

    def run_cases(self, label: str, cases: list[dict[str, Any]], mode_conns: int,
                  rounds: int, duration: float, warmup: float) -> dict[str, list[dict]]:
        """Each case: name, server, mode, cpus (of the load generator). Runs every case once
        per round, rotating the order each round, so drift hits all cases alike."""
        results: dict[str, list[dict]] = {c["name"]: [] for c in cases}
        for r in range(rounds):
            order = cases[r % len(cases):] + cases[:r % len(cases)]
            for case in order:
                server = case["server"]
                mark = server.tail.mark()
                res = self.loadgen(case["mode"], server, case.get("conns", mode_conns),
                                   duration, warmup, case["cpus"])
                res["round"] = r
                if case.get("collect"):
                    res.update(case["collect"](server.tail.since(mark)))
                results[case["name"]].append(res)
                progress(f"{label} round {r + 1}/{rounds} {case['name']}"
                         + (f" (c={case['conns']})" if "conns" in case else "") + ": "
                         f"{res['rate']:,.0f}/s, server {fmt(res.get('server_cpu_us_per_op'))}"
                         f" us/op, client {res['client_cpu_us_per_op']:.2f} us/op, "
                         f"p99 {res['lat_us']['p99']:.0f} us"
                         + (f", errors {res['errors']}" if res.get("errors") else "")
                         + (f", lost {res['lost']}" if res.get("lost") else ""))
        return results


# --- summarising ---------------------------------------------------------------------------------

def summarise(results: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    out = {}
    for name, runs in results.items():
        out[name] = {
            "rate": median([r["rate"] for r in runs]),
            "server_cpu_us_per_op": median([r.get("server_cpu_us_per_op", float("nan"))
                                            for r in runs]),
            "client_cpu_us_per_op": median([r["client_cpu_us_per_op"] for r in runs]),
            "master_cpu_us_per_op": median([r.get("master_cpu_us_per_op", float("nan"))
                                            for r in runs]),
            "server_util": median([r.get("server_util", float("nan")) for r in runs]),
            "p50_us": median([r["lat_us"]["p50"] for r in runs]),
            "p99_us": median([r["lat_us"]["p99"] for r in runs]),
            "p999_us": median([r["lat_us"]["p999"] for r in runs]),
            "errors": sum(r.get("errors", 0) + r.get("lost", 0) for r in runs),
        }
    return out


def round_ratios(results: dict[str, list[dict]], a: str, b: str,
                 key: Callable[[dict], float]) -> float:
    """Median over rounds of key(a)/key(b), each ratio taken within one round."""
    if a not in results or b not in results:
        return float("nan")
    by_round = {r["round"]: r for r in results[b]}
    return median([ratio(key(r), key(by_round[r["round"]])) for r in results[a]
                   if r["round"] in by_round])


def rate_of(r: dict) -> float:
    return r["rate"]


def cpu_of(r: dict) -> float:
    return r.get("server_cpu_us_per_op", float("nan"))


def p99_of(r: dict) -> float:
    return r["lat_us"]["p99"]


# --- scenarios -----------------------------------------------------------------------------------

def throughput_cases(b: Bench, mode: str, workers: int) -> list[dict[str, Any]]:
    """The side-by-side set: pinned (server and load on CPU 0) and spread (any CPU)."""
    cases = []
    c1 = b.c_baseline("c-1p-pinned", 0, PINNED)
    if c1:
        cases.append({"name": "c", "server": c1.start(), "mode": mode, "cpus": PINNED})
    cases.append({"name": "py", "server": b.py_baseline("py-1p-pinned", 0, PINNED).start(),
                  "mode": mode, "cpus": PINNED})
    cases.append({"name": "mpd-1w", "server": b.mpd("mpd-1w-pinned", 1, PINNED).start(),
                  "mode": mode, "cpus": PINNED})
    if workers > 1:
        cn = b.c_baseline(f"c-{workers}p-spread", workers, None)
        if cn:
            cases.append({"name": f"c-{workers}p", "server": cn.start(), "mode": mode,
                          "cpus": None})
        cases.append({"name": f"py-{workers}p",
                      "server": b.py_baseline(f"py-{workers}p-spread", workers, None).start(),
                      "mode": mode, "cpus": None})
        cases.append({"name": f"mpd-{workers}w",
                      "server": b.mpd(f"mpd-{workers}w-spread", workers, None).start(),
                      "mode": mode, "cpus": None})
    return cases


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
        pairs = [("mpd-1w", "py", "pinned"), ("mpd-1w", "c", "pinned")]
        if workers > 1:
            pairs += [(f"mpd-{workers}w", f"py-{workers}p", "spread"),
                      (f"mpd-{workers}w", f"c-{workers}p", "spread")]
        for a, base, placement in pairs:
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
                  "fd.dispatched.")
    return {"workers": w, "conns": conns, "runs": results, "summary": summary}


def scenario_respawn(b: Bench) -> dict[str, Any]:
    """SIGKILL each worker once (one kill per slot: a slot killed twice within 5 s is backed
    off on purpose) and time kill -> worker.ready of its replacement, for mpd and for the
    Python pre-fork baseline (fork a child that serves, respawn on SIGCHLD)."""
    a = b.args
    kills = a.respawn_kills
    out: dict[str, Any] = {}
    for label, server in (("mpd", b.mpd(f"mpd-{kills}w-respawn", kills, None)),
                          ("py", b.py_baseline(f"py-{kills}p-respawn", kills, None))):
        server.start()
        times, boots = [], []
        for slot in range(kills):
            victims = {e["worker_pid"]: e["worker_slot"] for e in server.tail.events
                       if e.get("event") == "worker.ready"}
            pids = {s: p for p, s in victims.items() if alive(p) and p in
                    server.workers_pids()}
            victim = pids[slot]
            mark = server.tail.mark()
            t = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            ev = server.tail.wait_for(
                lambda e, s=slot, v=victim: e.get("event") == "worker.ready"
                and e.get("worker_slot") == s and e.get("worker_pid") != v,
                10.0, f"{label} slot {slot} respawn", start=mark, alive_pid=server.pid,
                interval=0.0005)
            times.append((time.monotonic() - t) * 1000)
            if "boot_ms" in ev:
                boots.append(ev["boot_ms"])
            progress(f"respawn {label} slot {slot}: {times[-1]:.1f} ms")
            time.sleep(0.05)
        out[label] = {"kill_to_ready_ms": times, "p50_ms": median(times), "max_ms": max(times),
                      "boot_ms": boots}
        server.stop()
    b.report.heading(f"respawn (SIGKILL a worker -> its replacement serves; {kills} kills, "
                     "one per slot)")
    rows = [[k, v["p50_ms"], v["max_ms"], median(v["boot_ms"]) if v["boot_ms"] else None]
            for k, v in out.items()]
    b.report.table(["server", "kill -> ready p50 ms", "max ms", "fork -> HELLO p50 ms"], rows)
    b.report.table(["ratio", "kill -> ready p50"],
                   [["mpd / py pre-fork", ratio(out["mpd"]["p50_ms"], out["py"]["p50_ms"])]])
    return out


def scenario_memory(b: Bench) -> dict[str, Any]:
    a = b.args
    conns = a.memory_conns
    servers = [("mpd-1w", b.mpd("mpd-1w-memory", 1, None)),
               (f"mpd-{NPROC}w", b.mpd(f"mpd-{NPROC}w-memory", NPROC, None)),
               ("py", b.py_baseline("py-1p-memory", 0, None))]
    c = b.c_baseline("c-1p-memory", 0, None)
    if c:
        servers.append(("c", c))
    out: dict[str, Any] = {}
    for label, server in servers:
        server.start()
        time.sleep(0.2)

        def sample(s: Server = server) -> dict[str, Any]:
            workers = s.workers_pids() if s.kind == "mpd" else []
            return {"master": memory(s.pid), "workers": [memory(p) for p in workers],
                    "worker_fds": [fd_count(p) for p in workers],
                    "fds": fd_count(s.pid)}

        idle = sample()
        proc = subprocess.Popen(b.tools.loadgen + ["idle", "-p", str(server.port), "-c",
                                                   str(conns), "-d", "120"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            assert proc.stdout is not None and proc.stdin is not None
            ready = json.loads(proc.stdout.readline() or b"{}")
            time.sleep(0.2)
            loaded = sample()
            proc.stdin.close()
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        time.sleep(0.3)
        after = sample()
        server.stop()

        def total(s: dict[str, Any]) -> int:
            if s["workers"]:
                return sum(w["uss"] for w in s["workers"])
            return s["master"]["uss"]

        established = ready.get("established", 0)
        per_conn = (total(loaded) - total(idle)) / established if established else None
        out[label] = {"idle": idle, "loaded": loaded, "after_close": after,
                      "established": established, "bytes_per_conn": per_conn}
        progress(f"memory {label}: {established} conns, {fmt(per_conn)} B/conn")
    rows = []
    for label, m in out.items():
        idle, loaded, after = m["idle"], m["loaded"], m["after_close"]
        has_workers = bool(idle["workers"])
        rows.append([label, idle["master"]["rss"] / 1e6,
                     sum(w["uss"] for w in idle["workers"]) / 1e6 if has_workers
                     else idle["master"]["uss"] / 1e6,
                     sum(w["uss"] for w in loaded["workers"]) / 1e6 if has_workers
                     else loaded["master"]["uss"] / 1e6,
                     sum(w["uss"] for w in after["workers"]) / 1e6 if has_workers
                     else after["master"]["uss"] / 1e6,
                     m["bytes_per_conn"],
                     "/".join(str(f) for f in loaded["worker_fds"]) or "-"])
    b.report.heading(f"memory (idle, then {conns} idle connections, each pinged once)")
    b.report.table(["server", "master RSS MB", "serving USS MB idle",
                    f"USS MB with {conns}", "USS MB after close", "bytes/conn",
                    "fds per worker"], rows)
    def footprint(m: dict[str, Any]) -> int:
        """Idle: the master's RSS plus every worker's USS (what one more server costs)."""
        return m["idle"]["master"]["rss"] + sum(w["uss"] for w in m["idle"]["workers"])

    b.report.table(["ratio", "bytes/conn", "idle footprint (master RSS + workers' USS)"],
                   [[f"{x} / {y}", ratio(out[x]["bytes_per_conn"], out[y]["bytes_per_conn"]),
                     ratio(footprint(out[x]), footprint(out[y]))]
                    for x, y in (("mpd-1w", "py"), ("mpd-1w", "c")) if x in out and y in out])
    b.report.note("USS = Private_Clean + Private_Dirty from smaps_rollup; 'serving' = the "
                  "workers for mpd, the process itself for the baselines. Kernel socket "
                  "buffers are not in any of these; the C baseline keeps no per-connection "
                  "state in user space, so its bytes/conn is 0 and that ratio is undefined.")
    return out


def run_as(tree: Path) -> str:
    """`user = "root"` when run as root and the tree knows server.user: mpd refuses a root
    start without it, and older trees (ab.py) would refuse the unknown key."""
    if os.geteuid() != 0 or "Key(\"server\", \"user\"" not in (
            tree / "mpd" / "config.py").read_text():
        return ""
    return "user = \"root\"\n"


def control_request(path: str, request: dict[str, Any]) -> dict[str, Any]:
    """One request on mpd's control socket, as mpdctl sends it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(path)
        sock.sendall(json.dumps({"version": 1, **request}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)


def scenario_scale(b: Bench) -> dict[str, Any]:
    """mpd: `scale 30` on the control socket (what `mpdctl scale 30` sends), timed to the
    30th worker.ready event; then the whole `mpdctl scale 1` and `mpdctl scale 30` commands
    as a user runs them. Baseline: the Python pre-fork server grows on SIGUSR1."""
    target = b.args.scale_to
    out: dict[str, Any] = {}
    mpd = b.mpd("mpd-scale", 1, None).start()
    py = b.py_baseline("py-scale", 1, None, scale_to=target).start()
    for label, server in (("mpd", mpd), ("py", py)):
        mark = server.tail.mark()
        first = {e["worker_pid"] for e in server.tail.events if e.get("event") == "worker.ready"}
        t = time.monotonic()
        if label == "mpd":
            assert server.config_path is not None
            sock_path = str(b.control_socket(server.config_path))
            reply = control_request(sock_path, {"command": "scale", "workers": target})
            if not reply.get("ok"):
                raise RuntimeError(f"scale refused: {reply}")
        else:
            os.kill(server.pid, signal.SIGUSR1)
        ready: list[float] = []
        seen = set(first)
        deadline = t + 60
        while len(ready) < target - 1 and time.monotonic() < deadline:
            for e in server.tail.since(mark):
                if e.get("event") == "worker.ready" and e.get("worker_pid") not in seen:
                    seen.add(e["worker_pid"])
                    ready.append((time.monotonic() - t) * 1000)
            mark = len(server.tail.events)
            time.sleep(0.001)
        workers = len(server.workers_pids())
        out[label] = {"ready": len(ready) + 1, "target": target,
                      "all_ready_ms": ready[-1] if len(ready) == target - 1 else None,
                      "first_ready_ms": ready[0] if ready else None,
                      "processes": workers}
        if label == "mpd":  # the user's view: the mpdctl commands, interpreter start included
            assert server.config_path is not None
            ctl = [b.tools.mpd_python, "-m", "mpd.ctl", "--config", str(server.config_path),
                   "--timeout", "60", "scale"]
            subprocess.run(ctl + ["1"], check=True, capture_output=True, timeout=90)
            t = time.monotonic()
            subprocess.run(ctl + [str(target)], check=True, capture_output=True, timeout=90)
            out[label]["mpdctl_scale_ms"] = (time.monotonic() - t) * 1000
            progress(f"scale mpd: `mpdctl scale {target}` took "
                     f"{fmt(out[label]['mpdctl_scale_ms'])} ms")
        progress(f"scale {label}: {len(ready) + 1}/{target} ready in "
                 f"{fmt(out[label]['all_ready_ms'])} ms")
        t = time.monotonic()
        server.stop()
        out[label]["stop_ms"] = (time.monotonic() - t) * 1000
    b.report.heading(f"scale (1 -> {target} workers; mpd: `scale` on the control socket)")
    b.report.table(["server", f"all {target} ready ms", "first new ready ms", "stop ms",
                    f"`mpdctl scale {target}` ms"],
                   [[k, v["all_ready_ms"], v["first_ready_ms"], v["stop_ms"],
                     v.get("mpdctl_scale_ms", "-")] for k, v in out.items()])
    b.report.table(["ratio", "all ready", "stop"],
                   [["mpd / py pre-fork", ratio(out["mpd"]["all_ready_ms"],
                                                out["py"]["all_ready_ms"]),
                     ratio(out["mpd"]["stop_ms"], out["py"]["stop_ms"])]])
    return out


SCENARIOS: dict[str, Callable[[Bench], dict[str, Any]]] = {
    "ping": scenario_ping,
    "connrate": scenario_connrate,
    "handoff": scenario_handoff,
    "respawn": scenario_respawn,
    "memory": scenario_memory,
    "scale": scenario_scale,
}


# --- main ----------------------------------------------------------------------------------------

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
            "somaxconn": Path("/proc/sys/net/core/somaxconn").read_text().strip()}


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
    p.add_argument("--respawn-kills", type=int, help="workers killed, one per slot (default 8)")
    p.add_argument("--scale-to", type=int, default=30, help="workers to scale to (default 30)")
    p.add_argument("--mpd-python", help="interpreter that runs mpd and the Python baseline")
    p.add_argument("--out", default=str(ROOT / "bench-results"), help="results directory")
    p.add_argument("--no-cc", action="store_true",
                   help="act as if there were no C compiler (Python load generator, no C "
                        "baseline)")
    p.add_argument("--keep-hist", action="store_true",
                   help="keep latency histograms in the JSON (for plots)")
    args = p.parse_args(argv)
    q = args.quick
    defaults = {"rounds": 1 if q else 3, "duration": 0.3 if q else 3.0,
                "warmup": 0.1 if q else 0.5, "ping_conns": "10,1000" if q else
                "10,100,1000,10000", "connrate_conns": 16 if q else 32,
                "memory_conns": 1000 if q else 10000, "respawn_kills": 2 if q else 8}
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


def prepare(out: str, prefix: str, mpd_python: str | None,
            use_cc: bool = True) -> tuple[str, Path, Path, tuple[int, int], Tools]:
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
    tools = Tools(out_dir / "build", find_mpd_python(mpd_python), use_cc)
    tools.build()
    return stamp, out_dir, workdir, nofile, tools


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stamp, out_dir, workdir, nofile, tools = prepare(args.out, "run", args.mpd_python,
                                                     not args.no_cc)
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
                 "generator on CPU 0; spread = any CPU."])
    bench = Bench(args, tools, workdir, report)
    results: dict[str, Any] = {"meta": meta, "args": {k: v for k, v in vars(args).items()},
                               "scenarios": {}, "failed": {}}
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        for name in args.names:
            progress(f"scenario {name}")
            try:
                results["scenarios"][name] = SCENARIOS[name](bench)
            except (RuntimeError, TimeoutError, OSError, KeyError, subprocess.SubprocessError,
                    json.JSONDecodeError) as e:
                results["failed"][name] = repr(e)
                progress(f"scenario {name} FAILED: {e!r}")
            finally:
                bench.stop_all()
    finally:
        bench.stop_all()
        shutil.rmtree(bench.sockdir, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)
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
