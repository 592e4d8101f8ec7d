"""The master's three operator-facing servers, the control socket, the metrics endpoint
and the HAProxy agent port, share one server base (mpd/ops/server.py): one accept pause,
one linger, one deadline sweep. Each policy is tested here once, against all three, on a
real mpd."""

from __future__ import annotations

import resource
import socket
import time
from collections.abc import Callable

import pytest
from conftest import cpu_seconds, fd_count, wait_until
from haproxy_support import free_port

from mpd.ops import control, httpmetrics

KINDS = ("control", "metrics", "agent")
PING = b'{"version": 1, "command": "ping"}\n'


@pytest.fixture
def ports(mpd_factory):
    for _ in range(3):  # another test on the machine may take the free ports first
        metrics = free_port()
        agent = metrics + 1  # free_port() makes sure the next one is free too
        try:
            server = mpd_factory({"workers": {"workers": 1},
                                  "metrics": {"listen": f"127.0.0.1:{metrics}"},
                                  "agent": {"listen": f"127.0.0.1:{agent}"}})
        except AssertionError as e:
            if "Address already in use" not in str(e):
                raise
            continue
        server.ports = {"metrics": metrics, "agent": agent}
        return server
    raise AssertionError("no two free ports for metrics and agent in three tries")


def connect(server, kind: str, timeout: float = 10) -> socket.socket:
    if kind == "control":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(str(server.tmp / "mpd.sock"))
        return sock
    return socket.create_connection(("127.0.0.1", server.ports[kind]), timeout=timeout)


# What each server is asked, and how its answer looks.
REQUEST = {"control": PING, "metrics": b"GET /metrics HTTP/1.1\r\n\r\n", "agent": b""}
ANSWERED: dict[str, Callable[[bytes], bool]] = {
    "control": lambda data: b'"pong":true' in data,
    "metrics": lambda data: data.startswith(b"HTTP/1.1 200 OK\r\n") and b"mpd_info" in data,
    "agent": lambda data: data == b"up ready 100%\n"}


def read_to_eof(sock: socket.socket) -> bytes:
    """Everything until the peer's FIN; a reset fails the test (ConnectionResetError)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def ask(server, kind: str) -> bytes:
    with connect(server, kind) as sock:
        sock.sendall(REQUEST[kind])
        if kind == "control":
            return sock.recv(65536)
        return read_to_eof(sock)


@pytest.mark.parametrize("kind", KINDS)
def test_out_of_fds_it_pauses_without_spinning_and_recovers(ports, kind):
    """accept() failing with EMFILE leaves the connection queued and the socket readable:
    a level-triggered loop would spin on it. The server leaves the selector a moment at a
    time, says so once, and says once when it is over."""
    soft, hard = resource.prlimit(ports.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(ports.pid, resource.RLIMIT_NOFILE, (fd_count(ports.pid) + 2, hard))
    try:
        waiting = [connect(ports, kind) for _ in range(8)]  # 2 taken, the rest queue
        ports.wait_event("ops.accept_paused", server=kind)
        before = cpu_seconds(ports.pid)
        time.sleep(1.0)  # a span to measure CPU over, not a wait for a condition
        assert cpu_seconds(ports.pid) - before < 0.2  # no busy loop on EMFILE
        assert len(ports.events("ops.accept_paused", server=kind)) == 1  # one line a pause
    finally:
        resource.prlimit(ports.pid, resource.RLIMIT_NOFILE, (soft, hard))
    for sock in waiting:
        sock.close()
    assert ANSWERED[kind](wait_until(lambda: ask(ports, kind), what=f"{kind} answers"))
    resumed = ports.wait_event("ops.accept_resumed", server=kind)
    assert resumed["pauses"] >= 1 and resumed["paused_for"] > 0
    assert len(ports.events("ops.accept_paused", server=kind)) == 1


# A last answer with the peer's bytes still unread: without the linger, the close would
# reset the connection, and the peer could lose the answer.
LAST_WORDS = {"control": b"x" * (control.MAX_REQUEST + 1),  # too long: an error, then close
              "metrics": b"GET /metrics HTTP/1.1\r\nContent-Length: 1048576\r\n\r\n",
              "agent": b"be_mpd/mpd1\n"}


@pytest.mark.parametrize("kind", KINDS)
def test_the_linger_delivers_the_last_answer_whatever_the_peer_still_sends(ports, kind):
    with connect(ports, kind) as sock:
        sock.sendall(LAST_WORDS[kind] + b"y" * (1 << 20))  # read and thrown away
        answer = read_to_eof(sock)
    if kind == "control":
        assert answer.endswith(b"\n") and b"request over" in answer
    else:
        assert ANSWERED[kind](answer), answer[:200]


@pytest.mark.parametrize("kind", KINDS)
def test_deadlines_close_stalled_peers(ports, kind):
    """A peer that stalls, before its request is whole or after its answer, holds its fd
    only until its deadline: the request's (5 s, with an error that says so), then the
    linger (1 s) during which it may read that error and close."""
    base = fd_count(ports.pid)
    start = time.monotonic()
    with connect(ports, kind) as stalled:
        stalled.sendall(REQUEST[kind][:10])  # half a request (the agent asks for nothing)
        said = read_to_eof(stalled)  # the answer or the error, then the half-close
        if kind == "control":
            assert b"not finished within 5 s" in said
        elif kind == "metrics":
            assert said.startswith(b"HTTP/1.1 408 ")
        else:
            assert ANSWERED["agent"](said)
        # It never closes: the master does, at the end of the linger.
        wait_until(lambda: fd_count(ports.pid) == base, timeout=10,
                   what=f"the {kind} peer's fd closed")
    waited = time.monotonic() - start
    limit = {"control": control.REQUEST_TIMEOUT, "metrics": httpmetrics.REQUEST_TIMEOUT,
             "agent": 0.0}[kind] + 1.0
    assert limit <= waited + 0.2 < limit + 2.0, waited
