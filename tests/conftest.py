"""Test harness: run the real mpd as a subprocess, read its JSON log, talk to it over
real sockets. Every wait polls a condition against a deadline; nothing sleeps and hopes."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import random
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

from mpd.wire import routing

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT / "scripts" / "bench"))  # the /proc kit the benchmarks share
from procfs import alive as pid_alive  # noqa: E402
from procfs import children  # noqa: E402
from procfs import cpu_seconds as cpu_seconds  # noqa: E402 - re-exported for the tests
from procfs import fd_count as fd_count  # noqa: E402

REPLY = b"hello, server ping!\0"
PING = b"hello, client ping!\0"  # what the seed's mpclient sends
# The suite runs mpd as whoever runs the tests (root in CI): said explicitly, as a root
# start without server.user is refused.
ME = pwd.getpwuid(os.geteuid()).pw_name


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01,
               what: str = "condition") -> Any:
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def toml_config(settings: dict[str, dict[str, Any]]) -> str:
    lines = []
    for section, values in settings.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if isinstance(value, bool):
                lines.append(f"{key} = {'true' if value else 'false'}")
            elif isinstance(value, str):
                lines.append(f'{key} = "{value}"')
            else:
                lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n"


class Mpd:
    """A running mpd: its process, its log, its port."""

    def __init__(self, tmp: Path, settings: dict[str, dict[str, Any]],
                 env: dict[str, str] | None = None, cwd: Path = ROOT,
                 python: str = sys.executable, fd_limit: int | None = None):
        """`fd_limit`: mpd starts with RLIMIT_NOFILE at that, soft and hard (as under
        `prlimit --nofile=N`), so that it cannot lift it."""
        self.tmp = tmp
        self.config_path = tmp / "mpd.toml"
        merged: dict[str, dict[str, Any]] = {"server": {"port": 0, "user": ME},
                                             "control": {"socket": str(tmp / "mpd.sock")}}
        for section, values in settings.items():
            merged.setdefault(section, {}).update(values)
        self.write_config(merged)
        self.log_path = tmp / "mpd.log"
        # A file, not a pipe: mpd never blocks on a reader that fell behind.
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        limit = [] if fd_limit is None else ["prlimit", f"--nofile={fd_limit}", "--"]
        self.proc = subprocess.Popen(
            [*limit, python, "-m", "mpd.cli", "--config", str(self.config_path)],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=cwd, env={**os.environ, **(env or {})}, start_new_session=True)
        self.pid = self.proc.pid
        self._offset = 0
        self._events: list[dict[str, Any]] = []
        started = self.wait_event("mpd.started")
        self.port: int = started["port"]
        self.wait_event("mpd.ready")

    def write_config(self, settings: dict[str, dict[str, Any]]) -> None:
        self.settings = settings
        self.config_path.write_text(toml_config(settings))

    # --- the log --------------------------------------------------------------------------

    def events(self, name: str | None = None, **fields: Any) -> list[dict[str, Any]]:
        with open(self.log_path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # only whole lines
        self._offset += end
        for line in data[:end].splitlines():
            try:
                self._events.append(json.loads(line))
            except ValueError:
                self._events.append({"event": "<non-json>", "line": line.decode(errors="replace")})
        return [e for e in self._events
                if (name is None or e.get("event") == name)
                and all(e.get(k) == v for k, v in fields.items())]

    def wait_event(self, name: str, timeout: float = 10.0, count: int = 1,
                   **fields: Any) -> dict[str, Any]:
        def found() -> Any:
            if self.proc.poll() is not None and len(self.events(name, **fields)) < count:
                raise AssertionError(f"mpd exited ({self.proc.returncode}) before {name}:\n"
                                     + self.log_path.read_text()[-3000:])
            matches = self.events(name, **fields)
            return matches[count - 1] if len(matches) >= count else None
        return wait_until(found, timeout, what=f"{count}x {name} {fields or ''}")

    # --- processes --------------------------------------------------------------------------

    def worker_pids(self) -> list[int]:
        return sorted(children(self.pid))

    def wait_workers(self, count: int, timeout: float = 10.0) -> list[int]:
        return wait_until(lambda: len(self.worker_pids()) == count and self.worker_pids(),
                          timeout, what=f"{count} workers")

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait_exit(self, timeout: float = 15.0) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        """Tear down whatever is left, whatever state the test left it in."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        for pid in children(self.pid) if pid_alive(self.pid) else []:
            os.kill(pid, signal.SIGKILL)
        self._log.close()

    # --- clients ----------------------------------------------------------------------------

    def connect(self, timeout: float = 5.0) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def bash_complete(script: str, *words: str) -> list[str]:
    """What a bash completion script for mpdctl offers after `mpdctl WORDS`, run by bash."""
    line = " ".join(["mpdctl", *words])
    program = (f"{script}\nCOMP_WORDS=(mpdctl {' '.join(repr(w) for w in words)}); "
               f"COMP_CWORD={len(words)}; COMP_LINE='{line}'; COMP_POINT={len(line)}; "
               "_shtab_mpdctl mpdctl; printf '%s\\n' \"${COMPREPLY[@]}\"")
    out = subprocess.run(["bash", "-c", program], capture_output=True, text=True,
                         check=True).stdout
    return sorted(out.split())


def read_all(fd: int) -> bytes:
    """Everything a non-blocking fd has to read now (up to EOF)."""
    out = b""
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


def recv_line(sock: socket.socket, buf: bytes) -> tuple[bytes, bytes]:
    """One line from a blocking socket, `buf` holding what came before it: (the line
    without its newline, what came after it)."""
    while b"\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed with {buf!r} unread")
        buf += chunk
    line, _, rest = buf.partition(b"\n")
    return line, rest


def ping(sock: socket.socket, payload: bytes = PING) -> None:
    sock.sendall(payload)
    assert recv_exact(sock, len(REPLY)) == REPLY


@pytest.fixture
def mpd_factory(tmp_path: Path) -> Iterator[Callable[..., Mpd]]:
    started: list[Mpd] = []

    def start(settings: dict[str, dict[str, Any]] | None = None,
              env: dict[str, str] | None = None, cwd: Path = ROOT,
              fd_limit: int | None = None) -> Mpd:
        server = Mpd(tmp_path, settings or {}, env, cwd, fd_limit=fd_limit)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


# --- a real systemd (tests/sdbox.py) and mpd installed for it -------------------------

@pytest.fixture(scope="session")
def system_venv() -> Path:
    """mpd installed (not editable) into a venv of Debian's Python under /opt, as the
    README says; reused while the source is unchanged."""
    import sdbox

    if not os.path.exists(sdbox.SYSTEM_PYTHON):
        pytest.skip(f"{sdbox.SYSTEM_PYTHON} is missing")
    return sdbox.build_system_venv()


@pytest.fixture
def box(system_venv: Path) -> Iterator[Any]:
    """A booted sdbox, always torn down."""
    import sdbox

    b = sdbox.Box()
    try:
        yield b
    finally:
        b.down()


# --- the seed's C++ clients -----------------------------------------------------------------

SEED = Path(os.environ.get("MPD_SEED", "/work/shared/seed/000_9156ad83d542a1c1.txt"))


def seed_program(name: str, seed: Path = SEED) -> str:
    """The C++ source of `name` (mpclient, mpclient2, ...) from the seed article, where each
    code line is prefixed with "- ": from the line "- // NAME —— ..." up to the last code
    line before the article's text resumes."""
    lines = seed.read_text(encoding="utf-8").splitlines()
    start = next((i for i, line in enumerate(lines)
                  if line.startswith(f"- // {name} ") and "——" in line), None)
    if start is None:
        raise LookupError(f"no program {name!r} in {seed}")
    code = []
    for line in lines[start:]:
        if not line.startswith("- "):
            break
        code.append(line[2:])
    return "\n".join(code) + "\n"


def count_replies(output: list[str]) -> int:
    return sum(line.startswith("recv from server:") for line in output)


def run_seed_client(argv: list[str], done: Callable[[list[str]], bool],
                    timeout: float) -> list[str]:
    """Run a seed client (they loop forever) until its output lines satisfy `done`, with a
    deadline; then kill it and return the lines."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    output: list[str] = []
    buffer = b""
    deadline = time.monotonic() + timeout
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while not done(output):
                assert time.monotonic() < deadline, f"{argv[0]} said only: {output[-20:]}"
                assert proc.poll() is None, f"{argv[0]} exited ({proc.returncode}): {output}"
                if sel.select(0.5):
                    buffer += os.read(proc.stdout.fileno(), 65536)
                    *lines, buffer = buffer.split(b"\n")
                    output += [line.decode(errors="replace") for line in lines]
    finally:
        proc.kill()
        proc.wait(timeout=5)
    return output


def build_seed_client(name: str, dest_dir: Path) -> Path:
    """Compile the seed's program `name` with g++ into dest_dir and return the binary.
    Skips the calling test when g++ or the seed is missing."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ is not installed: cannot build the seed's C++ client")
    if not SEED.exists():
        pytest.skip(f"the seed article {SEED} is not here (set MPD_SEED)")
    source = dest_dir / f"{name}.cpp"
    source.write_text(seed_program(name), encoding="utf-8")
    binary = dest_dir / name
    built = subprocess.run([gxx, "-O2", "-o", str(binary), str(source)],
                           capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, f"g++ failed on the seed's {name}:\n{built.stderr}"
    return binary


# --- shared by the routing, supervision and control tests ------------------------------

M_PING = b"Mclient, ping message!\0"



def key_frame(key: int) -> bytes:
    return b"C" + struct.pack("<i", key)


def keys_owned_by(slot: int, slots: tuple[int, ...], count: int, seed: int = 1) -> list[int]:
    rng = random.Random(seed)
    keys: list[int] = []
    while len(keys) < count:
        key = rng.randint(-2**31, 2**31 - 1)
        if routing.owner(routing.key_hash(key), slots) == slot:
            keys.append(key)
    return keys


def spills_from(server, slot: int) -> list[dict[str, Any]]:
    """The fd.spilled lines of clients that `slot` could not take: said by its worker (full
    when the client came) or by the master (full by its heartbeat, or respawning)."""
    return [e for e in server.events("fd.spilled")
            if (e["slot"] if e["role"] == "worker" else e.get("worker_slot")) == slot]


def slot_pids(server) -> dict[int, int]:
    """slot -> pid of its current worker, from the master's worker.spawned events."""
    return {e["worker_slot"]: e["worker_pid"] for e in server.events("worker.spawned")}


class Pinger(threading.Thread):
    """A client bound to `key` that pings until told to stop; records any failure."""

    def __init__(self, port: int, key: int):
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(key_frame(key) + M_PING)
        assert recv_exact(self.sock, len(REPLY)) == REPLY
        self.halt = threading.Event()
        self.error: Exception | None = None
        self.count = 0

    def run(self) -> None:
        try:
            while not self.halt.is_set():
                self.sock.sendall(M_PING)
                assert recv_exact(self.sock, len(REPLY)) == REPLY
                self.count += 1
        except Exception as e:  # noqa: BLE001 - the test reads it
            self.error = e
        finally:
            self.sock.close()


class Pingers:
    """A crowd of Pinger threads, one per key, started together."""

    def __init__(self, port: int, keys: list[int]):
        self.all = [Pinger(port, key) for key in keys]
        for p in self.all:
            p.start()

    def wait_progress(self, what: str, timeout: float = 30) -> None:
        """Wait until every one of them has pinged again since now."""
        marks = [p.count for p in self.all]
        wait_until(lambda: all(p.count > c for p, c in zip(self.all, marks)), timeout,
                   what=what)

    def stop(self) -> list[Exception | None]:
        """Stop them all; their errors, in order (None for a client that saw none)."""
        for p in self.all:
            p.halt.set()
        for p in self.all:
            p.join(10)
        return [p.error for p in self.all]


def random_keys(count: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(-2**31, 2**31 - 1) for _ in range(count)]
