"""The control socket and mpdctl, against a running mpd."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from conftest import (
    M_PING,
    REPLY,
    ROOT,
    Pingers,
    children,
    pid_alive,
    random_keys,
    recv_exact,
    wait_until,
)

from mpd import ctl
from mpd.config.schema import MAX_CLIENTS, fd_headroom

NOBODY = 65534


def mpdctl(server, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mpd.ctl", "--config", str(server.config_path),
                           *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def status(server) -> dict:
    result = mpdctl(server, "--json", "status")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def raw_request(path: str, data: bytes, timeout: float = 10) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        # mpd may have turned us away already: then its reason waits to be read.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        out = b""
        while not out.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            out += chunk
        return out


def test_status_tells_the_truth(mpd_factory):
    server = mpd_factory({"workers": {"workers": 3}})
    workers = server.wait_workers(3)
    held = [server.connect() for _ in range(7)]
    for sock in held:
        sock.sendall(M_PING)
        assert recv_exact(sock, len(REPLY)) == REPLY
    reply = wait_until(lambda: (r := status(server))["totals"]["clients"] == 7 and r,
                       what="status to count the 7 clients")
    master = reply["master"]
    assert master["pid"] == server.pid and master["state"] == "running"
    assert master["port"] == server.port and master["listen"] == "127.0.0.1"
    assert master["config"] == str(server.config_path) and master["ready"] == 3
    rows = reply["workers"]
    assert sorted(w["pid"] for w in rows) == workers == sorted(children(server.pid))
    assert all(pid_alive(w["pid"]) for w in rows)
    assert sorted(w["slot"] for w in rows) == [0, 1, 2]
    assert sum(w["clients"] for w in rows) == 7 and sum(w["accepted"] for w in rows) == 7
    assert sum(w["requests"] for w in rows) == 7
    # max_clients = "auto": what each worker's fd limit leaves for clients.
    assert all(w["state"] == "ready" for w in rows)
    limits = [resource.prlimit(w["pid"], resource.RLIMIT_NOFILE)[0] for w in rows]
    assert [w["max_clients"] for w in rows] == [
        min(MAX_CLIENTS, limit - fd_headroom(limit)) for limit in limits]
    assert all(0 <= w["heartbeat_age"] < 5 for w in rows)
    table = mpdctl(server, "status")
    assert table.returncode == 0
    assert "3/3 ready" in table.stdout and str(server.pid) in table.stdout
    for w in rows:
        assert str(w["pid"]) in table.stdout
    for sock in held:
        sock.close()
    wait_until(lambda: status(server)["totals"]["clients"] == 0, what="clients gone")
    # status changes nothing and is polled: logged at debug only (tests/test_log_config.py)
    assert server.events("control.command", command="status") == []


def test_scale_to_30_and_back_to_2_under_load_drops_nothing(mpd_factory):
    server = mpd_factory({"workers": {"workers": 2}})
    server.wait_workers(2)
    pingers = Pingers(server.port, random_keys(200, seed=5))
    up = mpdctl(server, "scale", "30")
    assert up.returncode == 0, up.stderr
    assert len(server.worker_pids()) == 30
    pingers.wait_progress("every client pinging with 30 workers")
    down = mpdctl(server, "scale", "2")
    assert down.returncode == 0, down.stderr
    assert len(server.worker_pids()) == 2
    pingers.wait_progress("every client pinging with 2 workers again")
    assert pingers.stop() == [None] * 200
    assert len(server.events("worker.retiring")) == 28


def test_relative_scale_and_limits(mpd_factory):
    server = mpd_factory({"workers": {"workers": 2, "max_workers": 4}})
    assert mpdctl(server, "scale", "+2").returncode == 0
    assert status(server)["master"]["ready"] == 4
    too_many = mpdctl(server, "scale", "+1")
    assert too_many.returncode == ctl.EXIT_ERROR
    assert "out of range: 1 to 4" in too_many.stderr
    assert mpdctl(server, "scale", "-3").returncode == 0
    assert status(server)["master"]["ready"] == 1


def test_reload_and_stop_through_mpdctl(mpd_factory):
    server = mpd_factory({"workers": {"workers": 1}})
    server.config_path.write_text(server.config_path.read_text().replace(
        "[workers]\nworkers = 1", "[workers]\nworkers = 2"))
    ok = mpdctl(server, "reload")
    assert ok.returncode == 0 and "2 workers" in ok.stdout
    server.wait_workers(2)
    good_config = server.config_path.read_text()
    server.config_path.write_text("[server]\nport = 'x'\n")
    # mpdctl itself refuses to read a broken config...
    assert mpdctl(server, "reload").returncode == ctl.EXIT_CONFIG
    # ...and mpd, asked through the socket, reports it and changes nothing.
    bad = subprocess.run([sys.executable, "-m", "mpd.ctl", "--socket",
                          str(server.tmp / "mpd.sock"), "reload"],
                         capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert bad.returncode == ctl.EXIT_ERROR and "server.port" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    assert len(server.worker_pids()) == 2
    server.config_path.write_text(good_config)
    assert mpdctl(server, "ping").returncode == 0
    assert mpdctl(server, "stop").returncode == 0
    assert server.wait_exit() == 0
    assert not os.path.exists(server.tmp / "mpd.sock")


def test_exit_codes(mpd_factory, tmp_path):
    gone = subprocess.run([sys.executable, "-m", "mpd.ctl", "--socket",
                           str(tmp_path / "none.sock"), "status"],
                          capture_output=True, text=True, cwd=ROOT)
    assert gone.returncode == ctl.EXIT_NOT_RUNNING
    assert gone.stderr.startswith("mpdctl: mpd is not running") and gone.stderr.count("\n") == 1
    for bad in (["scale"], ["scale", "many"], ["status", "3"], ["frobnicate"]):
        result = subprocess.run([sys.executable, "-m", "mpd.ctl", *bad], capture_output=True,
                                text=True, cwd=ROOT)
        assert result.returncode == ctl.EXIT_USAGE, bad
    help_text = subprocess.run([sys.executable, "-m", "mpd.ctl", "--help"], capture_output=True,
                               text=True, cwd=ROOT).stdout
    assert "exit codes" in help_text and "permission denied" in help_text


def run_as(uid: int, argv: list[str]) -> tuple[int, str]:
    """Run mpdctl's main in a child that has dropped to `uid`: a real other user.
    Imports happen first: this Python lives under /root, which that user cannot read."""
    import locale  # noqa: F401 - argparse's gettext wants it
    ctl.build_parser().format_help()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            sys.stderr = os.fdopen(write, "w")  # pytest has replaced the usual one
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            code = ctl.main(argv)
            sys.stderr.flush()
        except BaseException:  # noqa: BLE001
            code = 99
        finally:
            os._exit(code if isinstance(code, int) else 98)
    os.close(write)
    with os.fdopen(read) as f:
        err = f.read()
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), err


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run mpdctl as another user")
def test_permission_denied_as_another_user(mpd_factory):
    shared = tempfile.mkdtemp(prefix="mpd-ctl-")  # reachable by other users
    os.chmod(shared, 0o755)
    path = os.path.join(shared, "mpd.sock")
    server = mpd_factory({"workers": {"workers": 1}, "control": {"socket": path}})
    # The socket's mode (0660, root's) keeps uid 65534 out.
    code, err = run_as(NOBODY, ["--socket", path, "status"])
    assert code == ctl.EXIT_DENIED, err
    assert "permission denied" in err and "mode 660" in err
    # With the mode opened up, mpd's own SO_PEERCRED allow-list still says no.
    os.chmod(path, 0o666)
    code, err = run_as(NOBODY, ["--socket", path, "status"])
    assert code == ctl.EXIT_DENIED, err
    assert f"uid {NOBODY} is not allowed" in err
    assert server.wait_event("control.denied")["peer_uid"] == NOBODY
    server.stop()
    shutil.rmtree(shared, ignore_errors=True)


def test_bad_requests_get_errors_and_never_stall_the_master(mpd_factory):
    server = mpd_factory({"workers": {"workers": 1}})
    path = str(server.tmp / "mpd.sock")
    assert b"invalid JSON" in raw_request(path, b"{not json\n")
    assert b"unknown command" in raw_request(path, b'{"version": 1, "command": "dance"}\n')
    assert b"expected a JSON object" in raw_request(path, b"[1, 2]\n")
    assert b"scale takes" in raw_request(
        path, b'{"version": 1, "command": "scale", "workers": "x"}\n')
    # The version is exactly the integer 1: not 9, not true, not 1.0, not missing.
    for version in (b'9', b'true', b'1.0', b'"1"', b'null'):
        answer = raw_request(path, b'{"version": %s, "command": "ping"}\n' % version)
        assert b"unsupported version" in answer, version
    assert b"unsupported version" in raw_request(path, b'{"command": "ping"}\n')
    # Deep nesting is refused before the parser recurses (a RecursionError once killed
    # the master), inside a string it is only text.
    assert b"nested deeper" in raw_request(path, b"[" * 1000 + b"\n")
    assert b"nested deeper" in raw_request(path, b'{"version": 1, "command": "ping", "x": '
                                           + b"[" * 30_000 + b"]" * 30_000 + b"}\n")
    assert b'"pong":true' in raw_request(path, b'{"version": 1, "command": "ping", '
                                         b'"x": "' + b"[" * 1000 + b'"}\n')
    # A 10 MB line: an error, then the connection is closed.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as big:
        big.settimeout(10)
        big.connect(path)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            big.sendall(b"x" * (10 * 1024 * 1024) + b"\n")
        answer = big.recv(65536)
        assert b"request over" in answer
    # Half a line, then silence: the master answers others meanwhile, and closes it.
    stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stalled.connect(path)
    stalled.sendall(b'{"version": 1, "command": "sta')
    assert status(server)["ok"]
    stalled.settimeout(15)
    assert b"not finished within" in stalled.recv(65536)
    assert stalled.recv(100) == b""
    stalled.close()
    # 200 clients at once: each is answered or turned away, and status still answers.
    results: list[bytes] = []
    lock = threading.Lock()

    def hammer() -> None:
        try:
            out = raw_request(path, b'{"version": 1, "command": "ping"}\n')
        except OSError as e:
            out = repr(e).encode()
        with lock:
            results.append(out)

    threads = [threading.Thread(target=hammer) for _ in range(200)]
    for t in threads:
        t.start()
    assert status(server)["ok"]
    for t in threads:
        t.join(30)
    assert len(results) == 200
    evicted = b"closed to let another peer in"
    assert all(b'"pong":true' in r or evicted in r for r in results), \
        [r for r in results if b'"pong":true' not in r and evicted not in r]
    assert sum(b'"pong":true' in r for r in results) >= 64
    assert status(server)["master"]["state"] == "running"


def test_a_second_mpd_on_the_same_socket_refuses_to_start(mpd_factory):
    first = mpd_factory({"workers": {"workers": 1}})
    second = subprocess.run([sys.executable, "-m", "mpd.cli", "--config",
                             str(first.config_path)], capture_output=True, text=True,
                            timeout=30, cwd=ROOT)
    assert second.returncode == 69
    assert "another mpd is running" in second.stderr
    assert status(first)["master"]["pid"] == first.pid  # the first one is untouched


def test_a_stale_socket_is_replaced(mpd_factory, tmp_path):
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "mpd.sock"))  # bound, never listening: a crashed run's
    stale.close()
    server = mpd_factory({"workers": {"workers": 1}})
    assert status(server)["ok"]


def test_autoscale_adds_a_worker_when_all_are_full(mpd_factory):
    server = mpd_factory({"workers": {"workers": 1, "max_clients": 3, "max_workers": 3,
                                      "autoscale": True}})
    held = []
    for _ in range(3):
        sock = server.connect()
        sock.sendall(M_PING)
        assert recv_exact(sock, len(REPLY)) == REPLY
        held.append(sock)
    scaled = server.wait_event("worker.autoscaled")
    assert scaled["previous"] == 1 and scaled["workers"] == 2
    server.wait_workers(2)
    sock = server.connect()  # the new worker takes it
    sock.sendall(M_PING)
    assert recv_exact(sock, len(REPLY)) == REPLY
    held.append(sock)
    for sock in held:
        sock.close()


def test_idle_control_connections_never_lock_mpdctl_out(mpd_factory):
    server = mpd_factory({"workers": {"workers": 1}})
    path = str(server.tmp / "mpd.sock")
    idle = []
    for _ in range(64):  # the whole table, each served once and then silent
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(b'{"version": 1, "command": "ping"}\n')
        assert b'"pong":true' in sock.recv(65536)
        idle.append(sock)
    # A newcomer takes the place of the one that waited longest since its last request.
    result = mpdctl(server, "status")
    assert result.returncode == 0, result.stderr
    assert "1/1 ready" in result.stdout
    evicted = server.wait_event("control.evicted")
    assert evicted["waited_for"] > 0
    # The first one in was the one closed, with a line that says why.
    reason = json.loads(idle[0].recv(65536))
    assert not reason["ok"] and "waited longest" in reason["error"]
    assert idle[0].recv(100) == b""
    for sock in idle:
        sock.close()


def test_a_flood_of_fresh_control_connections_never_locks_mpdctl_out(mpd_factory):
    """Issue 20, item 3: 200 connections, none idle long (half of them even started a
    request and stalled), fill the control table; mpdctl's request still gets in at
    once: the peer that has waited longest without completing a request makes way,
    whatever its age."""
    server = mpd_factory({"workers": {"workers": 1}})
    path = str(server.tmp / "mpd.sock")
    flood = []
    for i in range(200):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        if i < 100:
            sock.sendall(b'{"version": 1, "comm')  # a request begun, never finished
        flood.append(sock)
    time.sleep(0.5)  # the scenario: connections half a second old, far from any timeout
    start = time.monotonic()
    result = mpdctl(server, "--timeout", "2", "status")
    assert result.returncode == 0, result.stderr
    assert "1/1 ready" in result.stdout
    assert time.monotonic() - start < 2.0
    assert len(server.events("control.evicted")) == 200 - 64 + 1  # one place made for it
    for sock in flood:
        sock.close()
