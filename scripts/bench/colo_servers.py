"""The co-location benchmark's servers: each target by name (asyncio, uvloop, rawfd, c,
redis:W, mpd:W), started pinned or spread, with every process it runs accounted for (the
Redis design's redis-server included). A target that cannot run here is skipped with the
reason; mpd is skipped when it refuses the protocol in its config (exit 78 naming
server.protocol), which is how an mpd without the applications answers."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any

from ab import resolve
from colo_redis import RedisServer, redis_server_binary
from common import HERE, ROOT, procfs, progress
from harness import Bench, Server
from tools import TOOLS_VENV, find_python_with

BASELINES = ("asyncio", "uvloop", "rawfd", "c", "redis:1", "redis:2")
ALL_TARGETS = BASELINES + ("mpd:1", "mpd:2")
EXIT_CONFIG = 78  # mpd: invalid configuration


class Skipped(Exception):
    """A target that cannot run here; the message says why."""


class RedisDesign:
    """baseline_colo_redis.py's workers and their redis-server, seen as one server: its
    CPU is both's (the Redis share also on its own)."""

    def __init__(self, design: Server, redis: RedisServer) -> None:
        self.design, self.redis = design, redis
        self.name, self.kind = design.name, "redis"

    @property
    def port(self) -> int:
        return self.design.port

    def start(self) -> RedisDesign:
        self.design.start()
        return self

    def pids(self) -> list[int]:
        return self.design.pids() + [self.redis.pid]

    def check_alive(self, during: str) -> None:
        self.design.check_alive(during)
        if not procfs.alive(self.redis.pid):
            raise RuntimeError(f"redis-server of {self.name} exited during {during}")

    def stop(self) -> None:
        self.design.stop()
        self.redis.stop()


class Interpreters:
    """Which Python runs which baseline: mpd's for asyncio and the raw-fd floor, one with
    uvloop for uvloop, one with hiredis (and redis-py, uvloop if it has them) for Redis."""

    def __init__(self, mpd_python: str, uvloop_python: str | None,
                 redis_python: str | None) -> None:
        self.mpd = mpd_python
        self.uvloop = uvloop_python
        candidates = (mpd_python, str(TOOLS_VENV / "bin" / "python"))
        self.redis = find_python_with("hiredis", redis_python, *candidates)
        self.redis_py = bool(self.redis and find_python_with("redis.asyncio", self.redis))
        self.redis_uvloop = bool(self.redis and find_python_with("uvloop", self.redis))


def start_target(b: Bench, py: Interpreters, target: str, protocol: str,
                 placement: str, cpus: list[int] | None, redis_client: str = "hiredis",
                 env: dict[str, str] | None = None, label: str = "") -> Any:
    """The server for `target`, started; raises Skipped if it cannot run here. `mpd:W@V`
    runs version V of mpd (a directory with mpd/, or a git revision, as ab.py takes)."""
    name = f"{protocol}-{re.sub(r'[^A-Za-z0-9]+', '', target)}{label}-{placement}"
    target, _, version = target.partition("@")
    kind, _, count = target.partition(":")
    if kind in ("asyncio", "uvloop", "rawfd"):
        python = py.uvloop if kind == "uvloop" else py.mpd
        if python is None:
            raise Skipped("no interpreter here has uvloop (pip install -e '.[bench]', or "
                          "--uvloop-python)")
        script = "baseline_colo_rawfd.py" if kind == "rawfd" else "baseline_colo_asyncio.py"
        argv = [python, str(HERE / script), "--protocol", protocol]
        argv += ["--uvloop"] if kind == "uvloop" else []
        server = Server(b._name(name), kind, argv, cpus, b.workdir, started)
        return b.track(server).start()
    if kind == "c":
        binary = b.tools.build_c("baseline_colo") if b.tools.cc else None
        if binary is None:
            raise Skipped("no C compiler")
        server = Server(b._name(name), "c", [binary, "-t", protocol], cpus, b.workdir,
                        started)
        return b.track(server).start()
    if kind == "redis":
        return start_redis_design(b, py, name, int(count), protocol, cpus, redis_client)
    if kind == "mpd":
        tree = resolve(version, b.workdir) if version else ROOT
        return start_mpd(b, name, int(count), protocol, cpus, env, tree)
    raise ValueError(f"unknown target {target!r}")


def known(target: str) -> bool:
    """A target this module can start: one of ALL_TARGETS, or mpd:W@version."""
    base, at, version = target.partition("@")
    return base in ALL_TARGETS and (not at or (base.startswith("mpd:") and bool(version)))


def started(event: dict[str, Any]) -> bool:
    return event.get("event") == "baseline.started"


def start_redis_design(b: Bench, py: Interpreters, name: str, workers: int, protocol: str,
                       cpus: list[int] | None, client: str) -> RedisDesign:
    if redis_server_binary() is None:
        raise Skipped("redis-server is not installed (apt-get install redis-server)")
    if py.redis is None:
        raise Skipped("no interpreter here has hiredis (pip install -e '.[bench]', or "
                      "--redis-python)")
    if client == "redis-py" and not py.redis_py:
        raise Skipped(f"{py.redis} has no redis-py (pip install -e '.[bench]')")
    name = b._name(name)
    redis = RedisServer(b.workdir, f"{name}-redis-server", cpus).start()
    argv = [py.redis, str(HERE / "baseline_colo_redis.py"), "--protocol", protocol,
            "--workers", str(workers), "--redis-port", str(redis.port), "--client", client]
    argv += ["--uvloop"] if py.redis_uvloop else []
    design = RedisDesign(Server(name, "redis", argv, cpus, b.workdir, started,
                                workers=workers), redis)
    b.servers.append(design)  # type: ignore[arg-type] - stopped with the others
    try:
        return design.start()
    except (RuntimeError, TimeoutError):
        redis.stop()
        raise


def start_mpd(b: Bench, name: str, workers: int, protocol: str, cpus: list[int] | None,
              env: dict[str, str] | None, tree: Path = ROOT) -> Server:
    server = b.mpd(name, workers, cpus, protocol=protocol, env=env, tree=tree)
    try:
        return server.start()
    except (RuntimeError, TimeoutError):
        reason = refused_protocol(server)
        server.stop()
        if reason:
            raise Skipped(reason) from None
        raise


def refused_protocol(server: Server) -> str:
    """Why mpd exited at start, if it refused the protocol; else ""."""
    proc = server.proc
    if proc is None:
        return ""
    with contextlib.suppress(Exception):
        proc.wait(timeout=5)
    if proc.returncode != EXIT_CONFIG:
        return ""
    lines = read(server.err_path).strip().splitlines() + read(server.log_path).splitlines()
    said = next((line for line in lines if "server.protocol" in line), "")
    if not said:
        return ""
    progress(f"{server.name}: mpd refuses the protocol: {said}")
    said = said.split("server.protocol", 1)[1].lstrip(":\" ,").strip()
    return f"this mpd does not speak it yet (exit 78, server.protocol: {said[:100]})"


def read(path: Path) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")
    return ""
