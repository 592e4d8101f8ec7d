"""server.proxy_protocol in the worker: a PROXY header before the client's bytes names the
real client, which mpd's logs then show and its hand-offs carry; a client without one, with
a malformed or a late one, or from an address not in server.proxy_from is turned away with
a clear line and a counter. The real mpd in its own processes; then the worker loop in this
process (tests/test_worker_loop.py's harness), where the test plays the master."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest
from conftest import (
    M_PING,
    REPLY,
    ROOT,
    key_frame,
    keys_owned_by,
    recv_exact,
    wait_until,
)
from proxy_headers import v1, v2
from test_worker_loop import adopt, harness  # noqa: F401 - the fixture

from mpd.wire import messages as msg
from mpd.wire.exits import EXIT_OK
from mpd.wire.messages import Kind

PROXIED = {"server": {"proxy_protocol": True}, "log": {"level": "debug"}}
REAL = ("203.0.113.9", 41000)  # the client a proxy speaks for (TEST-NET-3)
FRONT = ("198.51.100.1", 1990)  # the proxy's own address, where the client connected


def closed(sock: socket.socket, timeout: float = 10.0) -> bool:
    """True once the peer has closed (EOF or reset), within `timeout`."""
    sock.settimeout(timeout)
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


def rejections(server, reason: str) -> list[dict]:
    return server.events("client.proxy_rejected", reason=reason)


def totals(server) -> dict:
    result = subprocess.run([sys.executable, "-m", "mpd.ctl", "--socket",
                             str(server.tmp / "mpd.sock"), "--json", "status"],
                            capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["totals"]


# --- the real mpd -------------------------------------------------------------------------

@pytest.mark.parametrize("workers", [1, 0])  # 0: single-process mode, the same loop
def test_the_logs_show_the_real_client_that_a_v2_or_v1_header_names(mpd_factory, workers):
    server = mpd_factory({**PROXIED, "workers": {"workers": workers}})
    for header, port in ((v2, 41000), (v1, 41001)):
        with server.connect() as client:
            client.sendall(header(("203.0.113.9", port), FRONT) + key_frame(7) + M_PING)
            assert recv_exact(client, len(REPLY)) == REPLY
            client.sendall(M_PING)  # and on: the header came once
            assert recv_exact(client, len(REPLY)) == REPLY
        where = f"203.0.113.9:{port}"
        proxied = server.wait_event("client.proxied", client=where)
        assert proxied["command"] == "PROXY" and proxied["proxy"].startswith("127.0.0.1:")
        assert server.wait_event("client.bound", client=where)["key"] == 7
        assert server.wait_event("client.closed", client=where)["reason"] == "eof"
    assert [e["version"] for e in server.events("client.proxied")] == [2, 1]


def test_a_header_split_anywhere_and_the_proxys_own_check_are_served(mpd_factory):
    server = mpd_factory({**PROXIED, "workers": {"workers": 1}})
    with server.connect() as client:
        for byte in v2(REAL, FRONT) + M_PING:  # one byte per write
            client.sendall(bytes([byte]))
        assert recv_exact(client, len(REPLY)) == REPLY
    with server.connect() as check:  # HAProxy's health check: a LOCAL header, no client
        check.sendall(v2(command=0x20) + M_PING)
        assert recv_exact(check, len(REPLY)) == REPLY
    local = server.wait_event("client.proxied", command="LOCAL")
    assert local["client"] is None
    # A LOCAL connection is the proxy's own: its logs name the proxy.
    events = server.events()
    after = events[events.index(local):]
    wait_until(lambda: any(e["event"] == "client.closed" for e in server.events()[
        server.events().index(local):]), what="the check closed")
    after = server.events()[server.events().index(local):]
    closed_line = next(e for e in after if e["event"] == "client.closed")
    assert closed_line["fd"] == local["fd"] and closed_line["client"] == local["proxy"]


def test_a_hand_off_carries_the_real_client_to_the_keys_owner(mpd_factory):
    server = mpd_factory({**PROXIED, "workers": {"workers": 2}})
    keys = keys_owned_by(0, (0, 1), 5, seed=21) + keys_owned_by(1, (0, 1), 5, seed=22)
    owner = {key: 0 for key in keys[:5]} | {key: 1 for key in keys[5:]}
    source = {key: ("192.0.2.77", 50000 + i) for i, key in enumerate(keys)}
    local = {}
    for key in keys:
        with server.connect() as client:
            local[key] = f"127.0.0.1:{client.getsockname()[1]}"
            client.sendall(v2(source[key], FRONT) + key_frame(key) + M_PING)
            assert recv_exact(client, len(REPLY)) == REPLY
    # The kernel picks the worker that accepts; each key the other slot owns is handed over.
    wait_until(lambda: len(server.events("client.bound")) >= len(keys), what="all keys bound")
    accepted_by = {e["peer"]: e["slot"] for e in server.events("client.accepted")}
    crossed = sorted(key for key in keys if accepted_by[local[key]] != owner[key])
    dispatched = server.events("fd.dispatched")
    assert sorted(e["key"] for e in dispatched) == crossed
    for event in dispatched:
        assert event["client"] == f"192.0.2.77:{source[event['key']][1]}"
        assert event["to_slot"] == owner[event["key"]]
    bound = {e["key"]: e["client"] for e in server.events("client.bound")}
    assert bound == {key: f"192.0.2.77:{port}" for key, (_, port) in source.items()}


def test_a_client_straight_to_mpd_without_a_header_is_closed_at_its_first_byte(mpd_factory):
    server = mpd_factory({**PROXIED, "workers": {"workers": 1}})
    with server.connect() as client:
        client.sendall(M_PING)
        assert closed(client)
    server.wait_event("client.proxy_rejected")
    (line,) = rejections(server, "malformed")
    assert line["level"] == "warning" and line["peer"].startswith("127.0.0.1:")
    assert line["error"] == ("not a PROXY protocol header: the connection starts with "
                             "b'Mclient, ping me'... (server.proxy_protocol is on: clients "
                             "must come through the proxy)")
    assert not server.events("client.protocol_error")  # no byte reached the protocol
    wait_until(lambda: totals(server).get("proxy_rejected") == 1, what="the counter")
    shown = subprocess.run([sys.executable, "-m", "mpd.ctl", "--socket",
                            str(server.tmp / "mpd.sock"), "status"], capture_output=True,
                           text=True, timeout=30, cwd=ROOT)
    assert "clients turned away for want of a valid PROXY header (server.proxy_protocol): 1" \
        in shown.stdout


def test_a_client_that_sends_no_whole_header_is_closed_at_the_deadline(mpd_factory):
    server = mpd_factory({**PROXIED, "server": {"proxy_protocol": True, "proxy_timeout": 0.5},
                          "workers": {"workers": 1}})
    with server.connect() as silent, server.connect() as slow:
        slow.sendall(b"PROXY TCP4 203.0.113.9 ")  # valid so far, never finished
        started = time.monotonic()
        assert closed(silent) and closed(slow)
        assert time.monotonic() - started >= 0.4  # not before its time
    lines = wait_until(lambda: len(rejections(server, "timeout")) == 2
                       and rejections(server, "timeout"), what="two timeouts")
    assert all("no complete PROXY header within server.proxy_timeout (0.5 s)" in e["error"]
               for e in lines)
    with server.connect() as client:  # the worker serves on
        client.sendall(v1(REAL, FRONT) + M_PING)
        assert recv_exact(client, len(REPLY)) == REPLY


def test_a_late_header_is_closed_within_the_slack_not_at_the_next_round(mpd_factory):
    # Silent clients one after the other, each connected once the last was closed: each
    # deadline is then the only one. Kept by the loop's round (every second) it would be
    # closed at the next round, about 0.8 s late from the second client on; each deadline
    # wakes the loop's timer itself: late by its slack (HEADER_SLACK, 0.1 s).
    timeout = 0.2
    server = mpd_factory({**PROXIED, "server": {"proxy_protocol": True,
                                                "proxy_timeout": timeout},
                          "workers": {"workers": 1}})
    lateness = []
    for _ in range(4):
        with server.connect() as sock:
            opened = time.monotonic()
            assert closed(sock)
            lateness.append(time.monotonic() - opened - timeout)
    assert min(lateness) > -0.05, lateness  # none before its time
    assert max(lateness) < 0.5, lateness  # none at the next round


def test_a_peer_outside_proxy_from_is_refused_at_once(mpd_factory):
    server = mpd_factory({**PROXIED, "server": {"proxy_protocol": True, "proxy_timeout": 30,
                                                "proxy_from": ["127.0.0.2"]},
                          "workers": {"workers": 1}})
    stranger = socket.socket()
    stranger.bind(("127.0.0.9", 0))
    stranger.connect(("127.0.0.1", server.port))
    with stranger:
        assert closed(stranger, timeout=10)  # at once: the header timeout is 30 s
        port = stranger.getsockname()[1]
    (line,) = wait_until(lambda: rejections(server, "untrusted"), what="the rejection")
    assert line["peer"] == f"127.0.0.9:{port}"
    assert line["error"] == (f"127.0.0.9:{port} is not in server.proxy_from, so it may not "
                             "send a PROXY header")
    proxy = socket.socket()
    proxy.bind(("127.0.0.2", 0))
    proxy.connect(("127.0.0.1", server.port))
    with proxy:
        proxy.sendall(v2(REAL, FRONT) + M_PING)
        assert recv_exact(proxy, len(REPLY)) == REPLY


def test_a_reload_changes_who_may_send_a_header(mpd_factory):
    server = mpd_factory({**PROXIED, "workers": {"workers": 2}})
    with server.connect() as client:
        client.sendall(v2(REAL, FRONT) + M_PING)
        assert recv_exact(client, len(REPLY)) == REPLY
    settings = server.settings
    settings["server"]["proxy_from"] = ["127.0.0.2"]
    server.write_config(settings)
    reload = subprocess.run([sys.executable, "-m", "mpd.ctl", "--socket",
                             str(server.tmp / "mpd.sock"), "reload"], capture_output=True,
                            text=True, timeout=30, cwd=ROOT)
    assert reload.returncode == 0, reload.stderr
    for _ in range(4):  # whichever worker takes it: both have the new list
        with server.connect() as client:
            client.sendall(v2(REAL, FRONT) + M_PING)
            assert closed(client)
    wait_until(lambda: len(rejections(server, "untrusted")) == 4, what="four refusals")


# --- the worker loop, with the test as its master -------------------------------------------

def test_the_real_client_rides_a_hand_off_both_ways(harness):  # noqa: F811
    h = harness("[server]\nproxy_protocol = true\n")
    theirs = keys_owned_by(1, (0, 1), 1, seed=23)[0]

    def scenario() -> None:
        h.receive(Kind.HELLO)
        with h.connect() as client:
            client.sendall(v2(REAL, FRONT) + key_frame(theirs) + M_PING)
            handoff = h.receive(Kind.HANDOFF)
            assert handoff.peer == REAL and handoff.unread == M_PING
            h.send(adopt(handoff, from_slot=1, from_pid=9), handoff.fds)
            assert recv_exact(client, len(REPLY)) == REPLY
            h.send(msg.Stop())
            assert closed(client)

    assert h.run(scenario) == EXIT_OK
    (dispatched,) = h.events("fd.dispatched")
    assert dispatched["client"] == "203.0.113.9:41000" and dispatched["key"] == theirs


def test_a_retiring_worker_hands_a_client_on_once_its_header_is_in(harness):  # noqa: F811
    h = harness("[server]\nproxy_protocol = true\n")
    ours = keys_owned_by(0, (0, 1), 1, seed=24)[0]
    header = v1(REAL, FRONT)

    def scenario() -> None:
        h.receive(Kind.HELLO)
        with h.connect() as client:
            client.sendall(header[:10])  # the header is on its way when RETIRE comes
            wait_until(lambda: h.worker.clients.conns, what="the client accepted")
            h.send(msg.Retire(epoch=2, table=[0]))
            wait_until(lambda: h.worker.handoff.retiring, what="the worker retiring")
            client.sendall(header[10:] + key_frame(ours) + M_PING)
            handoff = h.receive(Kind.HANDOFF)
            # Its own bytes, not the header's, and who it really is.
            assert handoff.unread == key_frame(ours) + M_PING and handoff.key is None
            assert handoff.peer == REAL and handoff.owner is None
            for fd in handoff.fds:
                socket.socket(fileno=fd).close()

    assert h.run(scenario) == EXIT_OK


def test_every_rejection_is_counted_in_the_heartbeat(harness):  # noqa: F811
    h = harness("[server]\nproxy_protocol = true\nproxy_timeout = 0.2\n")

    def scenario() -> None:
        h.receive(Kind.HELLO)
        with h.connect() as bad, h.connect() as late:
            bad.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert closed(bad) and closed(late)
        wait_until(lambda: h.receive(Kind.STATS).values["proxy_rejected"] == 2,
                   what="two rejections in STATS")

    assert h.run(scenario) == EXIT_OK
    assert [e["reason"] for e in h.events("client.proxy_rejected")] in (
        ["malformed", "timeout"], ["timeout", "malformed"])
