"""Applications on mpd, more of what issue 22 promises, on real processes: a relay player
that only receives is never idle while the stream flows to it; `mpdctl status` shows each
slot's groups and members; relay in single-process mode; a connection's timer that raises
ends that connection alone."""

from __future__ import annotations

import json
import os
import select

from conftest import recv_exact, wait_until
from test_apps import APPKIT, Member, mpdctl

IDLE = 1.0  # workers.idle_timeout in the idle test: its sweep runs every second


def cut_off(member: Member, timeout: float) -> bool:
    """The server closed this connection within `timeout` seconds (EOF or a reset)."""
    if not select.select([member.sock], [], [], timeout)[0]:
        return False
    try:
        return member.sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def test_a_player_that_only_receives_is_not_idle_while_the_stream_flows(mpd_factory):
    server = mpd_factory({"server": {"protocol": "relay"},
                          "workers": {"workers": 2, "idle_timeout": IDLE}})
    player = Member(server.port, b"live", b"S")
    assert player.line() == b"ok 1"
    publisher = Member(server.port, b"live", b"P")
    assert publisher.line() == b"ok 2"
    chunk, received = os.urandom(1024), 0
    # Three idle players of a quiet stream, one after the other: each is cut off by
    # idle_timeout while the live stream flows, and the live player goes on all along.
    for _ in range(3):
        quiet = Member(server.port, b"quiet", b"S")
        assert quiet.line() == b"ok 1"
        while not cut_off(quiet, 0.05):
            publisher.sock.sendall(chunk)
            assert recv_exact(player.sock, len(chunk)) == chunk, f"at byte {received}"
            received += len(chunk)
        quiet.close()
    # The quiet ones were timed out (logged once the sweep is over), the live one never.
    wait_until(lambda: sum(e["idle"] for e in server.events("client.timed_out")) == 3,
               what="three idle players timed out")
    publisher.sock.sendall(b"still flowing")
    assert player.sock.recv(100) == b"still flowing"
    assert sum(e["idle"] for e in server.events("client.timed_out")) == 3
    assert received >= 3 * 1024


def status_table(server) -> dict[int, dict[str, int]]:
    """`mpdctl status`'s table as a person reads it: slot -> column -> number."""
    result = mpdctl(server, "status")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(line.split() for line in lines if line.split()[:1] == ["SLOT"])
    rows = [line.split() for line in lines if line.split()[:1] and line.split()[0].isdigit()]
    return {int(row[0]): {name: int(row[header.index(name)]) for name in ("GROUPS", "MEMBERS")}
            for row in rows}


def test_mpdctl_status_shows_each_slots_groups_and_members(mpd_factory):
    server = mpd_factory({"server": {"protocol": "rooms"}, "workers": {"workers": 3}})
    sizes = {b"room-%d" % n: n for n in range(1, 9)}  # 8 rooms of 1 to 8 members: 36
    members = [Member(server.port, name) for name, size in sizes.items() for _ in range(size)]
    for member in members:
        assert member.line().startswith(b"ok ")
    expected: dict[int, dict[str, int]] = {slot: {"GROUPS": 0, "MEMBERS": 0} for slot in range(3)}
    for name, size in sizes.items():
        where = json.loads(mpdctl(server, "--json", "where", name.decode()).stdout)
        expected[where["slot"]]["GROUPS"] += 1
        expected[where["slot"]]["MEMBERS"] += size
    assert sum(e["GROUPS"] for e in expected.values()) == 8
    # The table counts from the workers' heartbeats: about a second behind.
    wait_until(lambda: status_table(server) == expected, timeout=15,
               what=f"mpdctl status showing {expected}")
    for member in members[:8]:  # rooms 1 to 3 whole, and 2 of room-4's 4 members, leave
        member.close()
    for slot_counts in expected.values():
        slot_counts.update(GROUPS=0, MEMBERS=0)
    for name, size in sizes.items():
        if size > 3:
            where = json.loads(mpdctl(server, "--json", "where", name.decode()).stdout)
            expected[where["slot"]]["GROUPS"] += 1
            expected[where["slot"]]["MEMBERS"] += size - (2 if size == 4 else 0)
    wait_until(lambda: status_table(server) == expected, timeout=15,
               what=f"mpdctl status showing {expected} once members left")
    for member in members[8:]:
        member.close()


def test_relay_serves_in_single_process_mode(mpd_factory):
    server = mpd_factory({"server": {"protocol": "relay"}, "workers": {"workers": 0}})
    streams = [b"s%d" % n for n in range(4)]
    players = {name: [Member(server.port, name, b"S") for _ in range(5)] for name in streams}
    for group in players.values():
        assert sorted(p.line() for p in group) == [b"ok %d" % n for n in range(1, 6)]
    payloads = {name: os.urandom(200_000) for name in streams}
    for name in streams:
        publisher = Member(server.port, name, b"P")
        assert publisher.line() == b"ok 6"
        publisher.sock.sendall(payloads[name])
        publisher.close()
    for name, group in players.items():
        for player in group:
            data = player.buf
            while chunk := player.sock.recv(1 << 16):
                data += chunk
            assert data == payloads[name], name
    assert not server.worker_pids()  # one process served it all


def test_a_connections_timer_that_raises_ends_that_connection_only(mpd_factory):
    server = mpd_factory({"server": {"protocol": "appkit.buggy:application"},
                          "workers": {"workers": 2}}, env=APPKIT)
    a, b, c = (Member(server.port, b"lobby") for _ in range(3))
    assert sorted(m.line() for m in (a, b, c)) == [b"ok 1", b"ok 2", b"ok 3"]
    a.sock.sendall(b"ctimer\n")  # a's own timer raises 50 ms later: a ends
    assert a.closed()
    error = server.wait_event("app.error")
    assert error["where"] == "timer" and "a bug in a connection's timer" in error["exception"]
    b.sock.sendall(b"the room goes on\n")
    assert c.line() == b"the room goes on"
    d = Member(server.port, b"lobby")
    assert d.line() == b"ok 3"  # b, c and d: a alone left
    assert not server.events("worker.crashed") and not server.events("worker.exited")
    for member in (b, c, d):
        member.close()
