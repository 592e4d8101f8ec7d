"""Scenarios of a server's life: respawn after SIGKILL, memory idle and with idle
connections, and scaling from 1 to 30 workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from typing import Any

from common import NPROC, fmt, median, procfs, progress, ratio
from harness import Bench, Server, control_request


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
            pids = {s: p for p, s in victims.items() if procfs.alive(p) and p in
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
    """RSS and USS idle, with `--memory-conns` idle connections, and after they close."""
    conns = b.args.memory_conns
    servers: list[tuple[str, Server | None]] = [
        ("mpd-1w", b.mpd("mpd-1w-memory", 1, None)),
        (f"mpd-{NPROC}w", b.mpd(f"mpd-{NPROC}w-memory", NPROC, None)),
        ("py-rawfd", b.rawfd_baseline("py-rawfd-memory", None)),
        ("py", b.py_baseline("py-1p-memory", 0, None)),
        ("asyncio", b.asyncio_baseline("asyncio-memory", None)),
        ("uvloop", b.asyncio_baseline("uvloop-memory", None, uvloop=True)),
        ("c", b.c_baseline("c-1p-memory", 0, None))]
    out = {label: memory_under_idle_load(b, server, conns)
           for label, server in servers if server is not None}
    for label, m in out.items():
        progress(f"memory {label}: {m['established']} conns, {fmt(m['bytes_per_conn'])} B/conn")
    memory_tables(b, out, conns)
    return out


def memory_under_idle_load(b: Bench, server: Server, conns: int) -> dict[str, Any]:
    server.start()
    time.sleep(0.2)

    def sample() -> dict[str, Any]:
        workers = server.workers_pids() if server.kind == "mpd" else []
        return {"master": procfs.memory(server.pid)._asdict(),
                "workers": [procfs.memory(p)._asdict() for p in workers],
                "worker_fds": [procfs.fd_count(p) for p in workers],
                "fds": procfs.fd_count(server.pid)}

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
    established = ready.get("established", 0)
    per_conn = (serving_uss(loaded) - serving_uss(idle)) / established if established else None
    return {"idle": idle, "loaded": loaded, "after_close": after, "established": established,
            "bytes_per_conn": per_conn}


def serving_uss(sample: dict[str, Any]) -> int:
    """USS of what serves: mpd's workers, or the baseline's one process."""
    if sample["workers"]:
        return sum(w["uss"] for w in sample["workers"])
    return sample["master"]["uss"]


def footprint(m: dict[str, Any]) -> int:
    """Idle: the master's RSS plus every worker's USS (what one more server costs)."""
    return m["idle"]["master"]["rss"] + sum(w["uss"] for w in m["idle"]["workers"])


def memory_tables(b: Bench, out: dict[str, Any], conns: int) -> None:
    rows = [[label, m["idle"]["master"]["rss"] / 1e6, serving_uss(m["idle"]) / 1e6,
             serving_uss(m["loaded"]) / 1e6, serving_uss(m["after_close"]) / 1e6,
             m["bytes_per_conn"], "/".join(str(f) for f in m["loaded"]["worker_fds"]) or "-"]
            for label, m in out.items()]
    b.report.heading(f"memory (idle, then {conns} idle connections, each pinged once)")
    b.report.table(["server", "master RSS MB", "serving USS MB idle",
                    f"USS MB with {conns}", "USS MB after close", "bytes/conn",
                    "fds per worker"], rows)
    pairs = [("mpd-1w", y) for y in ("py-rawfd", "py", "asyncio", "uvloop", "c")]
    b.report.table(["ratio", "bytes/conn", "idle footprint (master RSS + workers' USS)"],
                   [[f"{x} / {y}", ratio(out[x]["bytes_per_conn"], out[y]["bytes_per_conn"]),
                     ratio(footprint(out[x]), footprint(out[y]))]
                    for x, y in pairs if x in out and y in out])
    b.report.note("USS = Private_Clean + Private_Dirty from smaps_rollup; 'serving' = the "
                  "workers for mpd, the process itself for the baselines. Kernel socket "
                  "buffers are not in any of these; the C baseline keeps no per-connection "
                  "state in user space, so its bytes/conn is 0 and that ratio is undefined; "
                  "the raw-fd floor keeps none either for a connection with no frame "
                  "pending, so its bytes/conn is what its epoll and fd bookkeeping cost.")


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
