"""A real redis-server for the Redis design (baseline_colo_redis.py): Debian's binary,
started on a free loopback port (never a port something else holds, so never a running
6379), with nothing saved to disk, and stopped again. Standard library only."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

BINARY_PATHS = "/usr/bin:/usr/sbin:/usr/local/bin"


def redis_server_binary() -> str | None:
    return shutil.which("redis-server") or shutil.which("redis-server", path=BINARY_PATHS)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RedisServer:
    """redis-server in its own session, on 127.0.0.1:port; `cpus` pins it (None: any)."""

    def __init__(self, workdir: Path, name: str = "redis",
                 cpus: list[int] | None = None) -> None:
        binary = redis_server_binary()
        if binary is None:
            raise FileNotFoundError("redis-server is not installed (apt-get install "
                                    "redis-server)")
        self.binary = binary
        self.workdir = workdir
        self.name = name
        self.cpus = cpus
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.version = ""

    def start(self, timeout: float = 10.0) -> RedisServer:
        cpus = self.cpus
        for _attempt in range(5):  # the port may be taken between probe and bind
            self.port = free_port()
            argv = [self.binary, "--bind", "127.0.0.1", "--port", str(self.port),
                    "--save", "", "--appendonly", "no", "--daemonize", "no",
                    "--protected-mode", "no", "--dir", str(self.workdir),
                    "--logfile", str(self.workdir / f"{self.name}.log"),
                    # a subscriber (a worker) is never cut off for a backlog: the benchmark
                    # counts what is lost, and the default (32 MB) would lose it on purpose
                    "--client-output-buffer-limit", "pubsub 0 0 0"]

            def setup() -> None:
                if cpus is not None:
                    os.sched_setaffinity(0, cpus)

            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                         start_new_session=True, preexec_fn=setup)
            if self.wait_ready(timeout):
                return self
            self.stop()
        raise RuntimeError(f"redis-server did not start; see {self.workdir / self.name}.log")

    def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            with contextlib.suppress(OSError), \
                    socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"INFO server\r\n")
                reply = s.recv(65536)
                if b"redis_version:" in reply:
                    self.version = reply.split(b"redis_version:")[1].split(b"\r\n")[0].decode()
                    return True
            time.sleep(0.02)
        return False

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        if proc.stderr:
            proc.stderr.close()
