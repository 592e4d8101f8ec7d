"""Applications on mpd, on real processes: the shipped rooms and relay, with clients that
share a key meeting in one worker and reaching each other; an application's bug ending
only its connection or group; an application that cannot be loaded refused in one line."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import random
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import ROOT, recv_line, wait_until
from moveload import join_frame

from mpd.wire import routing

TESTS = Path(__file__).resolve().parent
APPKIT = {"PYTHONPATH": str(TESTS)}
PIDFD_GETFD = 438  # the system call's number (the same on every Linux architecture)


class Member:
    """A rooms client: joins, then sends and reads lines."""

    def __init__(self, port: int, room: bytes, kind: bytes = b"J"):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.sock.sendall(join_frame(kind, room))
        self.buf = b""

    def line(self) -> bytes:
        line, self.buf = recv_line(self.sock, self.buf)
        return line

    def lines(self, count: int) -> list[bytes]:
        return [self.line() for _ in range(count)]

    def closed(self) -> bool:
        """The server closed this connection (EOF or a reset), within the socket's timeout."""
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def mpdctl(server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mpd.ctl", "--socket",
                           str(server.tmp / "mpd.sock"), *args], capture_output=True,
                          text=True, timeout=30, cwd=ROOT)


def chat_names(rooms: int, per_room: int) -> list[bytes]:
    """The room of each of chat()'s members, in the order they join."""
    names = [b"room-%d" % (n % rooms) for n in range(rooms * per_room)]
    random.Random(3).shuffle(names)
    return names


def chat(port: int, rooms: int, per_room: int, lines: int = 5) -> list[Member]:
    """Members join their rooms (in shuffled order, so that members of a room arrive on
    every worker), each sends `lines` lines; every member must get every other member's
    lines of its own room exactly once, in each sender's order, and nothing else."""
    names = chat_names(rooms, per_room)
    members = [Member(port, name) for name in names]
    for member in members:
        assert member.line().startswith(b"ok ")
    for n, member in enumerate(members):
        member.sock.sendall(b"".join(b"%d %d\n" % (n, k) for k in range(lines)))
    for n, member in enumerate(members):
        others = [m for m, name in enumerate(names) if name == names[n] and m != n]
        got: dict[int, list[int]] = {}
        for line in member.lines(lines * len(others)):
            sender, seq = map(int, line.split())
            got.setdefault(sender, []).append(seq)
        assert got == {m: list(range(lines)) for m in others}, f"member {n}"
    return members


@pytest.mark.parametrize("workers", [4, 0])
def test_rooms_deliver_every_line_to_every_other_member_once_in_order(mpd_factory, workers):
    server = mpd_factory({"server": {"protocol": "rooms"}, "workers": {"workers": workers}})
    members = chat(server.port, rooms=30, per_room=10)
    if workers:
        # Every room's ten members are in its group's worker, whichever worker took them.
        for n in range(30):
            result = mpdctl(server, "--json", "where", f"room-{n}")
            assert result.returncode == 0, result.stderr
            where = json.loads(result.stdout)
            assert where["placed"] and where["members"] == 10, where
        status = json.loads(mpdctl(server, "--json", "status").stdout)
        wait_until(lambda: sum(w["groups"] for w in json.loads(
            mpdctl(server, "--json", "status").stdout)["workers"]) == 30, what="30 groups")
        assert status["master"]["protocol"] == "rooms"
    for member in members:
        member.close()


def worker_sockets(pid: int) -> list[socket.socket]:
    """Copies of the TCP connections worker `pid` holds (pidfd_getfd, as root or its own
    user): the very sockets it serves, to read their options."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    found = []
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            fd = libc.syscall(PIDFD_GETFD, pidfd, int(name), 0)
            if fd < 0:
                continue  # closed meanwhile
            sock = socket.socket(fileno=fd)
            if sock.family == socket.AF_INET and sock.type == socket.SOCK_STREAM \
                    and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                found.append(sock)
            else:
                sock.close()
    finally:
        os.close(pidfd)
    return found


def test_rooms_joined_through_hand_offs_only_when_one_slot_accepts(mpd_factory):
    # MPD_TEST_ACCEPT_SLOTS=0: slot 1 accepts nobody, so the members of its rooms all
    # join through a hand-off from slot 0; they are served as any others, and every
    # client's socket has TCP_NODELAY in the worker that serves it (a broadcast line
    # does not wait for the ACK of the last one).
    server = mpd_factory({"server": {"protocol": "rooms"}, "workers": {"workers": 2}},
                         env={"MPD_TEST_ACCEPT_SLOTS": "0"})
    rooms = [b"room-%d" % n for n in range(8)]
    owners = {routing.owner(routing.key_hash(name), (0, 1)) for name in rooms}
    assert owners == {0, 1}  # both kinds of room: joined directly, and handed off
    members = chat(server.port, rooms=8, per_room=5)

    def accepted() -> dict[int, int] | None:
        workers = json.loads(mpdctl(server, "--json", "status").stdout)["workers"]
        counts = {w["slot"]: w["accepted"] for w in workers}
        return counts if counts.get(0) == 40 else None

    assert wait_until(accepted, what="slot 0's 40 accepts reported") == {0: 40, 1: 0}
    pids = {e["worker_slot"]: e["worker_pid"] for e in server.events("worker.spawned")}
    ports = {m.sock.getsockname()[1] for m in members}
    for slot, pid in pids.items():
        held = worker_sockets(pid)
        try:
            served = [s for s in held if s.getpeername()[1] in ports]
            assert len(served) == 5 * sum(1 for name in rooms if routing.owner(
                routing.key_hash(name), (0, 1)) == slot), slot
            assert all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in served)
        finally:
            for s in held:
                s.close()
    for member in members:
        member.close()


def test_relay_copies_the_publishers_bytes_to_every_player_and_cuts_off_a_stuck_one(
        mpd_factory):
    server = mpd_factory({"server": {"protocol": "relay"},
                          "workers": {"workers": 2, "max_output_buffer": 65536}})
    streams = [b"stream-%d" % n for n in range(10)]
    players = {name: [Member(server.port, name, b"S") for _ in range(50)] for name in streams}
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: its window
    stuck.connect(("127.0.0.1", server.port))
    stuck.sendall(join_frame(b"S", streams[0]))  # it never reads a byte
    for group in players.values():
        for player in group:
            assert player.line().startswith(b"ok ")
    wait_until(lambda: json.loads(mpdctl(server, "--json", "where", "stream-0").stdout)
               .get("members") == 51, what="the stuck player in stream-0")
    publishers = {name: Member(server.port, name, b"P") for name in streams}
    for publisher in publishers.values():
        assert publisher.line().startswith(b"ok ")
    second = Member(server.port, streams[1], b"P")  # a second publisher is refused
    assert second.line() == b"error: stream has a publisher" and second.closed()
    # stream-0's is more than the stuck player's kernel buffers and its bound together.
    payloads = {name: os.urandom(8 << 20 if name == streams[0] else 1 << 20)
                for name in streams}
    received: dict[bytes, list[bytes]] = {name: [b""] * 50 for name in streams}
    progress: dict[bytes, list[int]] = {name: [0] * 50 for name in streams}

    def play(name: bytes, n: int) -> None:
        player = players[name][n]
        data = bytearray(player.buf)
        while True:
            chunk = player.sock.recv(1 << 16)
            if not chunk:
                break
            data += chunk
            progress[name][n] = len(data)
        received[name][n] = bytes(data)

    threads = [threading.Thread(target=play, args=(name, n)) for name in streams
               for n in range(50)]
    for thread in threads:
        thread.start()
    for name, publisher in publishers.items():
        if name != streams[0]:
            publisher.sock.sendall(payloads[name])
    # stream-0 goes out as its healthy players take it: only the stuck one falls behind.
    for sent in range(1 << 16, len(payloads[streams[0]]) + 1, 1 << 16):
        publishers[streams[0]].sock.sendall(payloads[streams[0]][sent - (1 << 16):sent])
        wait_until(lambda s=sent: min(progress[streams[0]]) >= s, timeout=30,
                   interval=0.001, what=f"stream-0's players at byte {sent}")
    for publisher in publishers.values():
        publisher.close()  # the stream ends: every player gets EOF once it has it all
    for thread in threads:
        thread.join(60)
    for name in streams:
        assert all(data == payloads[name] for data in received[name]), name
    stuck.settimeout(20)
    with pytest.raises(ConnectionResetError):  # cut off with a reset, not left to grow
        while stuck.recv(1 << 16):
            pass
    overflow = server.wait_event("client.overflow")
    assert overflow["key"] == "stream-0" and overflow["max_output_buffer"] == 65536


def test_an_application_bug_ends_only_its_connection_or_its_group(mpd_factory):
    server = mpd_factory({"server": {"protocol": "appkit.buggy:application"},
                          "workers": {"workers": 2}}, env=APPKIT)
    a, b, c = (Member(server.port, b"lobby") for _ in range(3))
    for member in (a, b, c):
        assert member.line().startswith(b"ok ")
    a.sock.sendall(b"boom\n")  # data_received raises: a ends, b and c chat on
    assert a.closed()
    b.sock.sendall(b"still here\n")
    assert c.line() == b"still here"
    other = Member(server.port, b"other")
    assert other.line() == b"ok 1"
    b.sock.sendall(b"hook\n")  # the next member_joined raises: the lobby ends
    b.sock.sendall(b"armed\n")
    assert c.line() == b"armed"  # the hook is armed: b's lines before this one are read
    d = Member(server.port, b"lobby")
    assert d.closed() and b.closed() and c.closed()
    e = Member(server.port, b"timed")  # one after the other: two joins at once may come
    assert e.line() == b"ok 1"  # to the owner in either order (one is handed off)
    f = Member(server.port, b"timed")
    assert f.line() == b"ok 2"
    e.sock.sendall(b"timer\n")  # a room timer raises: that room ends
    assert e.closed() and f.closed()
    other.sock.sendall(b"ping\n")  # the worker and the other room never noticed
    g = Member(server.port, b"other")
    assert g.line() == b"ok 2"
    g.sock.sendall(b"hi\n")
    assert other.line() == b"hi"
    errors = server.events("app.error")
    assert [e["where"] for e in errors] == ["data_received", "member_joined", "timer"]
    assert all("Traceback" in e["exception"] for e in errors)
    assert not server.events("worker.crashed") and not server.events("worker.exited")


@pytest.mark.parametrize("protocol, says", [
    ("nope", "no application 'nope'"),
    ("appkit.broken_import:application", "cannot import appkit.broken_import"),
    ("appkit.buggy:broken_factory", "raised ValueError('this factory always fails')"),
    ("appkit.buggy:missing", "appkit.buggy has no missing"),
])
def test_an_application_that_cannot_be_loaded_is_a_config_error_in_one_line(tmp_path, protocol,
                                                                            says):
    config = tmp_path / "mpd.toml"
    config.write_text(f'[server]\nport = 0\nprotocol = "{protocol}"\n'
                      f'[control]\nsocket = "{tmp_path / "mpd.sock"}"\n')
    for args in (["--check-config"], ["--user", "root"] if os.geteuid() == 0 else []):
        result = subprocess.run([sys.executable, "-m", "mpd.cli", "--config", str(config),
                                 "--log-format", "json", *args], capture_output=True,
                                text=True, timeout=30, cwd=ROOT, env={**os.environ, **APPKIT})
        assert result.returncode == 78, result.stderr
        (line,) = result.stderr.splitlines()
        assert line.startswith(f"mpd: invalid config: {config}:3: server.protocol: cannot "
                               "load the application: ") and says in line, line
