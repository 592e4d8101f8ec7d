"""rooms and relay on several hosts behind a real HAProxy (Debian's 2.6), with the shipped
configs packaging/haproxy/rooms.cfg and relay.cfg: HAProxy hashes the name in the first
frame (req.payload_lv(1,1)), so a room's members, or a stream's publisher and players,
meet on one host, and there mpd puts them in one worker."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, wait_until
from haproxy_support import (
    SHIPPED,
    Cluster,
    check_config,
    cluster_module,
    directives,
    free_port,
)
from test_apps import Member, chat, chat_names

CONFIGS = {"rooms": SHIPPED.with_name("rooms.cfg"), "relay": SHIPPED.with_name("relay.cfg")}
FIRST_BYTES = {"rooms": "4a", "relay": "50 53"}


@pytest.mark.parametrize("app", sorted(CONFIGS))
def test_the_application_configs_are_valid_haproxy_and_hash_the_first_frames_name(
        app, tmp_path):
    path = CONFIGS[app]
    check = check_config(path.read_text(), tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    front = directives(path, f"frontend {app}")
    set_key = next(i for i, d in enumerate(front)
                   if "set-var(txn.key) req.payload_lv(1,1),hex" in d)
    assert f"-m bin {FIRST_BYTES[app]}" in front[set_key]
    assert "{ req.payload_lv(1,1) -m found }" in front[set_key]  # waits for the whole name
    assert set_key < next(i for i, d in enumerate(front)
                          if d.startswith("tcp-request content accept"))
    keyed = directives(path, "backend mpd_keyed")
    assert "balance hash var(txn.key)" in keyed and "hash-type consistent" in keyed
    # The health check speaks the application's protocol: a first frame, then "ok ".
    any_ = directives(path, "backend mpd_any")
    sent = bytes.fromhex(next(d for d in any_ if d.startswith("tcp-check send-binary"))
                         .split()[-1])
    assert sent[0] == int(FIRST_BYTES[app].split()[-1], 16) and sent[1] == len(sent) - 2
    assert bytes.fromhex(next(d for d in any_ if d.startswith("tcp-check expect binary"))
                         .split()[-1]) == b"ok "


@pytest.mark.parametrize("app", sorted(CONFIGS))
def test_every_cluster_layout_of_the_application_configs_is_valid_haproxy(app, tmp_path):
    cluster = cluster_module()
    for hosts, proxy, agent in ((1, True, True), (3, False, False), (4, True, False)):
        text = cluster.haproxy_config(CONFIGS[app].read_text(), cluster.Layout(
            hosts, 2990, 2991, tmp_path, proxy, agent, app))
        check = check_config(text, tmp_path)
        assert check.returncode == 0, check.stdout + check.stderr + text
        assert f"from packaging/haproxy/{app}.cfg" in text.splitlines()[0]


# --- a real cluster ---------------------------------------------------------------------

@pytest.fixture
def cluster() -> Iterator[Cluster]:
    state = Path(tempfile.mkdtemp(prefix="mpdc-"))  # short: control sockets < 108 bytes
    running = Cluster(state, free_port())
    yield running
    running.down()
    shutil.rmtree(state, ignore_errors=True)


def where(cluster: Cluster, k: int, name: bytes) -> dict:
    """`where` of a name on host k, once its group's worker said its members."""
    request = json.dumps({"version": 1, "command": "where", "key": {"hex": name.hex()}})

    def ask() -> dict | None:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(cluster.state / f"host{k}" / "mpd.sock"))
            sock.sendall(request.encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                data += sock.recv(65536)
        reply = json.loads(data)
        return reply if not reply["placed"] or reply["members"] is not None else None
    return wait_until(ask, what=f"host {k}'s answer on {name!r}")


def test_rooms_through_haproxy_meet_on_one_host_and_every_line_reaches_every_member(
        cluster: Cluster):
    cluster.up(3, "--workers", "2", "--app", "rooms")
    members = chat(cluster.port, rooms=30, per_room=10)  # each line once, in order, no leak
    hosts_of_rooms = []
    for n in range(30):
        name = b"room-%d" % n
        found = {k: where(cluster, k, name) for k in (1, 2, 3)}
        placed = {k: reply["members"] for k, reply in found.items() if reply["placed"]}
        assert list(placed.values()) == [10], (name, found)  # one host, one group, all 10
        hosts_of_rooms.append(next(iter(placed)))
    assert len(set(hosts_of_rooms)) == 3  # and the rooms spread over the hosts
    # A member who comes back lands on its room's host again.
    first = next(n for n, name in enumerate(chat_names(30, 10)) if name == b"room-0")
    members[first].close()
    host = hosts_of_rooms[0]
    wait_until(lambda: where(cluster, host, b"room-0")["members"] == 9, what="one left")
    again = Member(cluster.port, b"room-0")
    assert again.line() == b"ok 10"
    for member in [*members, again]:
        member.close()


def test_relay_through_haproxy_plays_the_stream_with_the_shipped_client(cluster: Cluster,
                                                                         tmp_path: Path):
    cluster.up(3, "--workers", "2", "--app", "relay")
    streams = [f"cam{n}" for n in range(6)]
    payloads = {name: os.urandom(256 << 10) for name in streams}
    outputs: dict[str, list[Path]] = {name: [] for name in streams}
    players = []
    for name in streams:
        for n in range(3):
            path = tmp_path / f"{name}-{n}"
            outputs[name].append(path)
            with open(path, "wb") as out:
                players.append(subprocess.Popen(
                    [sys.executable, "-m", "mpd.apps.relay_client", "--port",
                     str(cluster.port), "play", name], stdin=subprocess.DEVNULL, stdout=out,
                    stderr=subprocess.PIPE, cwd=ROOT))
    for name in streams:  # the three players joined, on one host
        wait_until(lambda n=name: [r["members"] for k in (1, 2, 3)
                                   if (r := where(cluster, k, n.encode()))["placed"]] == [3],
                   what=f"{name}'s players on one host")
    for name in streams:
        publisher = Member(cluster.port, name.encode(), b"P")
        assert publisher.line() == b"ok 4"
        publisher.sock.sendall(payloads[name])
        publisher.close()  # the stream ends: the players get it all, then EOF
    for player in players:
        _, err = player.communicate(timeout=60)
        assert player.returncode == 0, err
    for name in streams:
        assert all(path.read_bytes() == payloads[name] for path in outputs[name]), name
