"""Resource exhaustion and pressure: out of file descriptors (EMFILE) in a worker or the
master, full workers, thousands of idle clients."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import (
    M_PING,
    PING,
    REPLY,
    ROOT,
    cpu_seconds,
    fd_count,
    key_frame,
    keys_owned_by,
    random_keys,
    recv_exact,
    slot_pids,
    spills_from,
    wait_until,
)


def status(server) -> dict:
    result = subprocess.run([sys.executable, "-m", "mpd.ctl", "--config",
                             str(server.config_path), "--json", "status"],
                            capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_emfile_pauses_accepting_without_spinning_and_loses_no_client(mpd_factory):
    server = mpd_factory({"workers": {"workers": 1}})
    worker = server.wait_workers(1)[0]
    # No room at all: the lowest free fd number is the limit, so the first accept() meets
    # EMFILE whether or not the worker has seen the new limit yet (once it has, max_clients
    # is 1 and it still tries). Room for a few would race with that: max_clients would stop
    # accepting before EMFILE could.
    open_fds = {int(name) for name in os.listdir(f"/proc/{worker}/fd")}
    limit = min(set(range(len(open_fds) + 1)) - open_fds)
    soft, hard = resource.prlimit(worker, resource.RLIMIT_NOFILE)
    resource.prlimit(worker, resource.RLIMIT_NOFILE, (limit, hard))  # the soft limit only
    try:
        clients = [server.connect(timeout=20) for _ in range(5)]
        for sock in clients:
            sock.sendall(PING)
        paused = server.wait_event("worker.accept_paused")
        assert paused["reason"] == "EMFILE" and paused["pid"] == worker
        # It follows its new fd limit: max_clients is what that leaves for clients.
        assert server.wait_event("worker.fd_limit", pid=worker)["fd_limit"] == limit
        cpu = cpu_seconds(worker)
        start = time.monotonic()
        time.sleep(1.0)  # a span to measure CPU over, not a wait for a condition
        used = cpu_seconds(worker) - cpu
        assert used < 0.3 * (time.monotonic() - start), used  # no busy loop
        assert len(server.events("worker.accept_paused", pid=worker)) == 1
    finally:
        resource.prlimit(worker, resource.RLIMIT_NOFILE, (soft, hard))
    server.wait_event("worker.fd_limit", pid=worker, fd_limit=soft)
    for sock in clients:  # queued in the backlog meanwhile, served once fds free up
        assert recv_exact(sock, len(REPLY)) == REPLY
    for sock in clients:
        sock.close()
    resumed = server.wait_event("worker.accept_resumed", pid=worker)
    assert resumed["reason"] == "EMFILE" and resumed["paused_for"] >= 1.0
    # It tried again every ACCEPT_RETRY (0.1 s) meanwhile, not once a heartbeat or round: a
    # freed fd takes a client at once, and a pause is not reported over by a late retry.
    assert resumed["pauses"] >= 5, resumed
    assert len(server.events("worker.accept_paused", pid=worker)) == 1


def test_a_full_worker_that_frees_and_fills_its_place_says_so_once(mpd_factory):
    server = mpd_factory({"workers": {"workers": 1, "max_clients": 1}})
    for _ in range(30):  # each fills the worker's one place (a pause), then frees it
        with server.connect() as sock:
            sock.sendall(PING)
            assert recv_exact(sock, len(REPLY)) == REPLY
    resumed = wait_until(lambda: sum(e["pauses"] for e in server.events(
        "worker.accept_resumed")) == 30 and server.events("worker.accept_resumed"),
        what="30 pauses told in accept_resumed lines")
    paused = server.events("worker.accept_paused")
    assert len(paused) == len(resumed) <= 3, (paused, resumed)  # not 30 of each


def test_a_failed_spawn_is_retried_and_the_master_survives(mpd_factory):
    server = mpd_factory({"workers": {"workers": 1}})
    worker = server.wait_workers(1)[0]
    soft, hard = resource.prlimit(server.pid, resource.RLIMIT_NOFILE)
    # No fd left for the next worker's channel: its socketpair fails with EMFILE.
    resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (fd_count(server.pid), hard))
    try:
        os.kill(worker, signal.SIGKILL)
        failed = server.wait_event("worker.spawn_failed")
        assert failed["worker_slot"] == 0 and "Too many open files" in failed["error"]
        server.wait_event("worker.backoff", worker_slot=0)
    finally:
        resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (soft, hard))
    new = server.wait_event("worker.spawned", worker_slot=0, count=2, timeout=30)
    server.wait_event("worker.ready", worker_pid=new["worker_pid"])
    with server.connect() as sock:
        sock.sendall(PING)
        assert recv_exact(sock, len(REPLY)) == REPLY


def test_a_worker_out_of_fds_passes_its_keys_clients_on_and_loses_none(mpd_factory):
    server = mpd_factory({"workers": {"workers": 2}})
    server.wait_workers(2)
    short = slot_pids(server)[1]
    limit = fd_count(short) + 2  # two free fds
    soft, hard = resource.prlimit(short, resource.RLIMIT_NOFILE)
    resource.prlimit(short, resource.RLIMIT_NOFILE, (limit, hard))
    clients = []
    try:
        server.wait_event("worker.fd_limit", pid=short, fd_limit=limit)
        # 200 clients whose keys slot 1 owns, one after the other: each is answered, by
        # slot 1 while it has room, else by the next slot of its key.
        for key in keys_owned_by(1, (0, 1), 200, seed=12):
            sock = server.connect()
            sock.sendall(key_frame(key) + M_PING)
            assert recv_exact(sock, len(REPLY)) == REPLY, f"client {len(clients)} lost"
            clients.append(sock)
    finally:
        resource.prlimit(short, resource.RLIMIT_NOFILE, (soft, hard))
    for sock in clients:  # each is served where it is
        sock.sendall(M_PING)
        assert recv_exact(sock, len(REPLY)) == REPLY
        sock.close()
    assert server.events("fd.lost") == [] and server.events("channel.error") == []
    assert len(spills_from(server, 1)) >= 190  # by slot 1, or by the master for it


def test_ten_thousand_idle_clients_are_all_taken_with_the_default_settings(mpd_factory):
    wanted = 10_000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < wanted + 1000:
        pytest.skip(f"the hard fd limit ({hard}) leaves the test no room for {wanted} clients")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    server = mpd_factory()  # the defaults: max_clients = "auto", backlog 1024
    clients: list[socket.socket] = []
    try:
        for _ in range(wanted):
            clients.append(server.connect(timeout=5))  # a refused or queued one times out
        for sock in clients:
            sock.sendall(PING)  # one ping each, then they idle
        for sock in clients:
            assert recv_exact(sock, len(REPLY)) == REPLY
        served = wait_until(lambda: (lambda s: s["totals"]["clients"] == wanted and s)(
            status(server)), timeout=10, what=f"{wanted} clients counted")
        assert all(w["max_clients"] > wanted for w in served["workers"])
        for _ in range(23):  # and new clients are served while they stay
            with server.connect() as sock:
                sock.sendall(PING)
                assert recv_exact(sock, len(REPLY)) == REPLY
    finally:
        for sock in clients:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_master_and_workers_lift_their_soft_fd_limit_to_the_hard_one(mpd_factory):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard <= 1024:
        pytest.skip(f"the hard fd limit is {hard}: nothing to lift")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))  # mpd inherits a low soft one
    try:
        server = mpd_factory({"workers": {"workers": 2}})
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    for pid in [server.pid, *server.wait_workers(2)]:
        assert resource.prlimit(pid, resource.RLIMIT_NOFILE) == (hard, hard), pid
    # and max_clients = "auto" follows the lifted limit
    assert {w["max_clients"] for w in status(server)["workers"]} == {min(1_000_000, hard - 128)}


def control_request(server, request: dict) -> dict:
    """One request on the control socket, as mpdctl sends it, within 5 s."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(server.tmp / "mpd.sock"))
        sock.sendall(json.dumps(request).encode() + b"\n")
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = sock.recv(65536)
            assert chunk, f"closed after {reply!r}"
            reply += chunk
    return json.loads(reply)


def visit(port: int, first: bytes, stay: float) -> str:
    """A client that connects, asks, stays a while, asks again and leaves: "ok", or what
    went wrong."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            for frame in (first, M_PING):
                sock.sendall(frame)
                reply = recv_exact(sock, len(REPLY))
                if reply != REPLY:
                    return f"refused: {reply!r}"
                time.sleep(stay)  # the client's own pace, not a wait on mpd
    except (OSError, ConnectionError) as e:
        return f"{type(e).__name__}: {e}"
    return "ok"


@pytest.mark.parametrize("keyed", [False, True], ids=["plain", "keyed"])
def test_a_low_fd_limit_serves_every_client_and_refuses_none(mpd_factory, keyed):
    """Issue 20: with RLIMIT_NOFILE 64, a fixed 128-fd headroom left each worker one
    client. 200 clients at once, each staying half a second: the workers take what their
    limit allows, the backlog and the master hold the rest until places free."""
    server = mpd_factory({"workers": {"workers": 2}}, fd_limit=64)
    first = [key_frame(k) + M_PING for k in random_keys(200, seed=20)] if keyed else [PING] * 200
    start = time.monotonic()
    with ThreadPoolExecutor(200) as pool:
        outcomes = list(pool.map(lambda f: visit(server.port, f, 0.5), first))
    assert [o for o in outcomes if o != "ok"] == []
    assert time.monotonic() - start < 30
    for event in ("fd.refused", "fd.lost", "fd.over_budget", "fd.dropped", "channel.error"):
        assert server.events(event) == [], event
    served = wait_until(lambda: (s := status(server))["totals"]["requests"] == 400 and s,
                        what="400 requests counted")
    assert served["totals"]["refused"] == 0 and served["master"]["ready"] == 2
    assert {w["max_clients"] for w in served["workers"]} == {48}  # 64 less 16


def test_mpdctl_reaches_a_master_that_holds_clients_for_a_stopped_worker(mpd_factory):
    """Issue 20: a stopped worker's hand-offs queued in the master until it ran out of fds,
    and `mpdctl status` timed out. The master holds a slot's share of its fd budget, then
    spills to the next slot; its reserve keeps the control socket open."""
    server = mpd_factory({"workers": {"workers": 2}})
    stopped = slot_pids(server)[1]
    # The master's limit only: its workers keep places for every client, so it sends the
    # stopped one all that its key brings.
    _soft, hard = resource.prlimit(server.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (64, hard))
    wait_until(lambda: status(server)["master"]["fd_budget"] < 64, what="the master's count")
    os.kill(stopped, signal.SIGSTOP)  # it reads nothing: the master's ADOPTs queue up
    clients = []
    try:
        for key in keys_owned_by(1, (0, 1), 1000, seed=22):  # within the backlog
            sock = socket.socket()
            sock.settimeout(30)
            sock.connect(("127.0.0.1", server.port))
            sock.sendall(key_frame(key) + M_PING)
            clients.append(sock)
        end = time.monotonic() + 3
        while time.monotonic() < end:  # the master is busy with them all the while
            start = time.monotonic()
            reply = control_request(server, {"version": 1, "command": "status"})
            assert reply["ok"] and time.monotonic() - start < 1.0
        master = status(server)["master"]  # and mpdctl itself
        assert 0 < master["holding"] <= master["fd_budget"]  # its share, for slot 1
    finally:
        os.kill(stopped, signal.SIGCONT)
    for sock in clients:  # each is answered: by slot 0, or by slot 1 once it goes on
        assert recv_exact(sock, len(REPLY)) == REPLY
        sock.close()
    for event in ("fd.refused", "fd.lost", "fd.over_budget", "fd.dropped", "control.accept_failed"):
        assert server.events(event) == [], event
    assert server.events("fd.spilled", worker_slot=1, reason="stalled")  # past its share
