"""The benchmark's machinery: building the C tools, starting servers (mpd and the
baselines) in their own sessions, running the load generator against them with the
server's CPU sampled around its measurement window, and rounds of cases interleaved."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from common import ALL_CPUS, HERE, NPROC, ROOT, Report, fmt, procfs, progress
from tools import Tools

HEARTBEAT_SETTLE = 1.3  # seconds: a worker's heartbeat interval, and some


def run_as(tree: Path) -> str:
    """`user = "root"` when run as root and the tree knows server.user: mpd refuses a root
    start without it, and older trees (ab.py) would refuse the unknown key."""
    schema = tree / "mpd" / "config" / "schema.py"  # mpd/config.py before the subpackages
    if not schema.exists():
        schema = tree / "mpd" / "config.py"
    if os.geteuid() != 0 or "Key(\"server\", \"user\"" not in schema.read_text():
        return ""
    return "user = \"root\"\n"


# --- servers -------------------------------------------------------------------------------------


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
            if alive_pid is not None and not procfs.alive(alive_pid):
                raise RuntimeError(f"server exited while waiting for {what}; see {self.path}")
            time.sleep(interval)


class Server:
    """A server process (mpd or a baseline) in its own session, with its log on disk."""

    def __init__(self, name: str, kind: str, argv: list[str], cpus: list[int] | None,
                 workdir: Path, ready: Callable[[dict[str, Any]], bool],
                 config_path: Path | None = None, workers: int = 0, cwd: Path = ROOT,
                 env: dict[str, str] | None = None):
        self.name, self.kind, self.argv, self.cpus = name, kind, argv, cpus
        self.env = env  # added to the driver's environment (mpd's test hooks, say)
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
                                         start_new_session=True, preexec_fn=setup,
                                         env={**os.environ, **self.env} if self.env else None)
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
        return procfs.tree(self.pid)

    def workers_pids(self) -> list[int]:
        with contextlib.suppress(ProcessLookupError):
            return procfs.children(self.pid)
        return []

    def cpu(self) -> float:
        return procfs.total_cpu_seconds(self.pids())

    def master_cpu(self) -> float:
        return procfs.total_cpu_seconds([self.pid])

    def check_alive(self, during: str) -> None:
        """Raise if the server has exited or its workers changed since it started: its
        figures would be another server's (on a shared machine, say, where someone else's
        `pkill` stopped it)."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited ({self.proc.returncode}) during {during}; "
                               f"see {self.log_path}")
        if self.kind == "mpd":
            self.tail.poll()
            gone = [e for e in self.tail.events
                    if e.get("event") in ("mpd.stopping", "worker.exited")]
            if gone:
                raise RuntimeError(f"{self.name} logged {gone[0]['event']} during {during}; "
                                   f"see {self.log_path}")

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
            max_clients: int = 20000, tree: Path = ROOT, protocol: str | None = None,
            env: dict[str, str] | None = None) -> Server:
        name = self._name(name)
        config = self.workdir / f"{name}.toml"
        self.write_mpd_config(config, workers, log_level, max_clients, tree, protocol)
        server = Server(name, "mpd", [self.tools.mpd_python, "-m", "mpd.cli", "--config",
                                      str(config)], cpus, self.workdir,
                        lambda e: e.get("event") in ("mpd.ready",), config, workers, tree,
                        env)
        return self.track(server)

    def write_mpd_config(self, path: Path, workers: int, log_level: str = "info",
                         max_clients: int = 20000, tree: Path = ROOT,
                         protocol: str | None = None) -> None:
        path.write_text(
            "[server]\nlisten = \"127.0.0.1\"\nport = 0\nbacklog = 4096\n" + run_as(tree) +
            (f"protocol = \"{protocol}\"\n" if protocol else "") +
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

    def rawfd_baseline(self, name: str, cpus: list[int] | None,
                       quickack: bool = False) -> Server:
        """The Python floor: raw fds, os.read/os.write (baseline_rawfd.py)."""
        argv = [self.tools.mpd_python, str(HERE / "baseline_rawfd.py")]
        return self.track(Server(self._name(name), "rawfd",
                                 argv + (["--quickack"] if quickack else []), cpus,
                                 self.workdir, lambda e: e.get("event") == "baseline.started"))

    def asyncio_baseline(self, name: str, cpus: list[int] | None,
                         uvloop: bool = False) -> Server | None:
        """An asyncio Protocol server (baseline_asyncio.py); on uvloop, None where no
        interpreter has uvloop."""
        python = self.tools.uvloop_python if uvloop else self.tools.mpd_python
        if python is None:
            return None
        argv = [python, str(HERE / "baseline_asyncio.py")] + (["--uvloop"] if uvloop else [])
        return self.track(Server(self._name(name), "uvloop" if uvloop else "asyncio", argv,
                                 cpus, self.workdir,
                                 lambda e: e.get("event") == "baseline.started"))

    def track(self, server: Server) -> Server:
        self.servers.append(server)
        return server

    def stop_all(self) -> None:
        for server in self.servers:
            server.stop()
        self.servers = []

    def run_scenarios(self, names: list[str], run_one: Callable[[str], None],
                      failed: dict[str, str]) -> None:
        """Each scenario in turn, its servers stopped after it; one that fails is noted in
        `failed` and the others still run. SIGTERM ends the run with the servers stopped."""
        previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        try:
            for name in names:
                progress(f"scenario {name}")
                try:
                    run_one(name)
                except (RuntimeError, TimeoutError, OSError, KeyError,
                        subprocess.SubprocessError, json.JSONDecodeError) as e:
                    failed[name] = repr(e)
                    progress(f"scenario {name} FAILED: {e!r}")
                finally:
                    self.stop_all()
        finally:
            self.stop_all()
            shutil.rmtree(self.sockdir, ignore_errors=True)
            signal.signal(signal.SIGTERM, previous)

    # the load generator ------------------------------------------------------------------

    def loadgen(self, mode: str, server: Server, conns: int, duration: float, warmup: float,
                cpus: list[int] | None, extra: list[str] | None = None) -> dict[str, Any]:
        # Pinned: one load-generator process on the server's CPU. Spread: one per CPU, as
        # a single client thread would ping-pong with the server and use one core at most.
        procs = 1 if cpus is not None else NPROC
        argv = self.tools.loadgen + [mode, "-p", str(server.port), "-c", str(conns),
                                     "-d", f"{duration:g}", "-w", f"{warmup:g}",
                                     "-s", str(self.seq), "-P", str(procs)] + (extra or [])

        batch = getattr(self.args, "client_batch", False)

        def setup() -> None:
            # Spread (cpus None) means every CPU, not the driver's own affinity.
            os.sched_setaffinity(0, cpus if cpus is not None else ALL_CPUS)
            if batch:  # a woken client does not preempt the server (see --client-batch)
                os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))

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

    # hand-offs from mpd's counters ----------------------------------------------------------

    def adopted(self, server: Server) -> int | None:
        """The hand-offs mpd's workers adopted so far (status totals; they arrive with the
        heartbeats), or None for a server without a control socket."""
        path = getattr(server, "control_path", None)  # a cluster's mpd names its own
        if path is None and getattr(server, "kind", "") == "mpd" and server.config_path:
            path = self.control_socket(server.config_path)
        if path is None:
            return None
        with contextlib.suppress(OSError, ValueError, KeyError):
            reply = control_request(str(path), {"command": "status"})
            return int(reply["totals"]["adopted"])
        return None

    def counted_handoffs(self, server: Server, before: int, res: dict[str, Any]
                         ) -> dict[str, Any]:
        """Without fd.dispatched lines (at info since issue 14) the hand-offs of a run
        come from the counters, once every worker's next heartbeat (1 s) is in."""
        time.sleep(HEARTBEAT_SETTLE)
        after = self.adopted(server)
        if after is None:
            return {}
        handoffs = after - before
        per_s = res["rate"] * handoffs / res["completed"] if res.get("completed") else 0.0
        return {"handoffs": handoffs, "handoffs_per_s": per_s}

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
                before = self.adopted(server) if case.get("collect") else None
                res = self.loadgen(case["mode"], server, case.get("conns", mode_conns),
                                   duration, warmup, case["cpus"])
                server.check_alive(f"{label} round {r + 1} {case['name']}")
                res["round"] = r
                if case.get("collect"):
                    res.update(case["collect"](server.tail.since(mark)))
                    if not res.get("handoffs") and before is not None:
                        res.update(self.counted_handoffs(server, before, res))
                results[case["name"]].append(res)
                progress(f"{label} round {r + 1}/{rounds} {case['name']}"
                         + (f" (c={case['conns']})" if "conns" in case else "") + ": "
                         f"{res['rate']:,.0f}/s, server {fmt(res.get('server_cpu_us_per_op'))}"
                         f" us/op, client {res['client_cpu_us_per_op']:.2f} us/op, "
                         f"p99 {res['lat_us']['p99']:.0f} us"
                         + (f", errors {res['errors']}" if res.get("errors") else "")
                         + (f", lost {res['lost']}" if res.get("lost") else ""))
        return results


