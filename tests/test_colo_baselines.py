"""The co-location benchmark's baselines speak rooms and relay as BENCHMARKS.md states them:
each server (asyncio, the raw-fd floor, C, the Redis design with 2 workers) is started,
and clients do what a chat or a stream would do. (Their speed is the benchmark's.)"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest
from conftest import ROOT, recv_exact
from moveload import join_frame

BENCH = ROOT / "scripts" / "bench"
sys.path.insert(0, str(BENCH))
import colo_redis  # noqa: E402

SERVERS = ("asyncio", "rawfd", "c", "redis")


def start(argv: list[str], tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    err = open(tmp / "server.stderr", "wb")  # noqa: SIM115 - the server's whole life
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, cwd=BENCH,
                            start_new_session=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout=10)
        pytest.fail(f"{argv} did not start: {(tmp / 'server.stderr').read_text()}")
    return proc, int(json.loads(line)["port"])


@pytest.fixture(params=SERVERS)
def serve(request: pytest.FixtureRequest, tmp_path: Path
          ) -> Iterator[Callable[[str], int]]:
    """serve(protocol) -> the port of that baseline, speaking it."""
    kind = request.param
    procs: list[subprocess.Popen[bytes]] = []
    redis: colo_redis.RedisServer | None = None

    def run(protocol: str) -> int:
        nonlocal redis
        if kind == "c":
            cc = shutil.which("cc") or shutil.which("gcc")
            if cc is None:
                pytest.skip("no C compiler")
            binary = tmp_path / "baseline_colo"
            subprocess.run([cc, "-O2", "-o", str(binary), str(BENCH / "baseline_colo.c")],
                           check=True, timeout=120)
            argv = [str(binary), "-t", protocol]
        elif kind == "redis":
            if colo_redis.redis_server_binary() is None:
                pytest.skip("redis-server is not installed (apt-get install redis-server)")
            probe = subprocess.run([sys.executable, "-c", "import hiredis"],
                                   capture_output=True)
            if probe.returncode:
                pytest.skip(f"hiredis is not installed for {sys.executable} "
                            "(pip install -e '.[bench]')")
            redis = colo_redis.RedisServer(tmp_path).start()
            argv = [sys.executable, "baseline_colo_redis.py", "--protocol", protocol,
                    "--workers", "2", "--redis-port", str(redis.port)]
        else:
            argv = [sys.executable, f"baseline_colo_{kind}.py", "--protocol", protocol]
        proc, port = start(argv, tmp_path)
        procs.append(proc)
        return port

    yield run
    for proc in procs:
        os.killpg(proc.pid, 9)
        proc.wait(timeout=10)
    if redis is not None:
        redis.stop()


def client(port: int, first: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(first)
    return sock


def read_line(sock: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        line += chunk
    return line


def silent(sock: socket.socket, for_s: float = 0.3) -> bool:
    sock.settimeout(for_s)
    try:
        return sock.recv(1) == b"_never"
    except socket.timeout:
        return True
    finally:
        sock.settimeout(5)


def eof(sock: socket.socket) -> bool:
    """The server closed: EOF (or a reset) once what was due is read."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


def test_a_line_reaches_every_other_member_of_its_room_and_no_one_else(serve):
    port = serve("rooms")
    a1 = client(port, join_frame(b"J", b"alpha"))
    assert read_line(a1) == b"ok 1\n"
    a2 = client(port, join_frame(b"J", b"alpha"))
    assert read_line(a2) == b"ok 2\n"
    b1 = client(port, join_frame(b"J", b"beta"))
    assert read_line(b1) == b"ok 1\n"
    a3 = client(port, join_frame(b"J", b"alpha") + b"early line\n")  # coalesced with the frame
    assert read_line(a3) == b"ok 3\n"
    assert read_line(a1) == read_line(a2) == b"early line\n"
    a1.sendall(b"hel")  # lines in pieces, and two in one send
    time.sleep(0.05)
    a1.sendall(b"lo\nwor")
    time.sleep(0.05)
    a1.sendall(b"ld\n")
    for member in (a2, a3):
        assert recv_exact(member, 12) == b"hello\nworld\n"
    assert silent(a1) and silent(b1)


def test_a_bad_first_frame_gets_an_error_line_and_is_closed(serve):
    port = serve("rooms")
    for first in (b"X\x03abc", b"J\x00"):
        sock = client(port, first)
        assert read_line(sock).startswith(b"error: ")
        assert eof(sock)


def test_a_line_longer_than_64_kib_closes_its_sender_alone(serve):
    port = serve("rooms")
    good = client(port, join_frame(b"J", b"r"))
    assert read_line(good) == b"ok 1\n"
    bad = client(port, join_frame(b"J", b"r"))
    assert read_line(bad) == b"ok 2\n"
    bad.sendall(b"x" * 65536)  # 65,536 bytes and still no `\n`
    assert eof(bad)
    third = client(port, join_frame(b"J", b"r"))
    assert read_line(third) == b"ok 2\n"
    third.sendall(b"y" * 65535 + b"\n")  # the longest line there may be
    assert recv_exact(good, 65536) == b"y" * 65535 + b"\n"


def test_a_publishers_bytes_reach_every_player_and_its_end_closes_them(serve):
    port = serve("relay")
    pub = client(port, join_frame(b"P", b"stream"))
    assert read_line(pub) == b"ok 1\n"
    players = [client(port, join_frame(b"S", b"stream")) for _ in range(3)]
    assert sorted(read_line(p) for p in players) == [b"ok 2\n", b"ok 3\n", b"ok 4\n"]
    second = client(port, join_frame(b"P", b"stream"))
    assert read_line(second) == b"error: stream has a publisher\n"
    assert eof(second)
    players[0].sendall(b"ignored")  # a player's bytes are read and discarded
    payload = os.urandom(1 << 20)
    received: dict[int, bytes] = {}

    def drain(i: int, sock: socket.socket) -> None:
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
        received[i] = b"".join(chunks)

    readers = [threading.Thread(target=drain, args=(i, p)) for i, p in enumerate(players)]
    for t in readers:
        t.start()
    pub.sendall(payload)
    pub.close()  # the stream ends: each player gets what was due, then EOF
    for t in readers:
        t.join(timeout=20)
    assert [received.get(i) == payload for i in range(3)] == [True] * 3


def test_a_player_that_falls_behind_is_reset_and_the_others_go_on(serve):
    port = serve("relay")
    pub = client(port, join_frame(b"P", b"s"))
    assert read_line(pub) == b"ok 1\n"
    slow = client(port, join_frame(b"S", b"s"))
    assert read_line(slow) == b"ok 2\n"
    fast = client(port, join_frame(b"S", b"s"))
    assert read_line(fast) == b"ok 3\n"
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    chunk = b"z" * 65536
    for _ in range(512):  # 32 MiB in step with the fast player, which reads everything
        pub.sendall(chunk)
        assert recv_exact(fast, len(chunk)) == chunk
    with pytest.raises(ConnectionResetError):  # after what it had in its buffer, a reset
        while slow.recv(1 << 20):
            pass


def test_the_server_goes_on_when_a_stream_and_all_its_players_leave_at_once(serve):
    port = serve("relay")
    pub = client(port, join_frame(b"P", b"gone"))
    assert read_line(pub) == b"ok 1\n"
    players = [client(port, join_frame(b"S", b"gone")) for _ in range(50)]
    for p in players:
        assert read_line(p).startswith(b"ok ")
    pub.sendall(b"x" * 100000)
    for sock in [pub, *players]:  # the stream's end and its players' in one turn, likely
        sock.close()
    deadline = time.monotonic() + 5  # the Redis design counts the leaves asynchronously
    while True:
        again = client(port, join_frame(b"P", b"gone"))
        line = read_line(again)
        again.close()
        if line == b"ok 1\n" or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert line == b"ok 1\n"
