"""Key groups that move whole, on real processes (issue 23): rooms of a counting
application (tests/appkit/counting.py) and relay streams under a steady load while mpd
scales down and up, upgrades in place, and an operator moves a key and drains a slot.
Every line reaches every other member of its room exactly once, in order; every player's
bytes are the publisher's; every room's count of lines (its state) comes along; no
member is ever served by another worker than its room's; no client sees an error."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, wait_until
from moveload import Chat, RelayLoad, RoomLoad, ok, placements, settled, status
from prometheus_client.parser import text_string_to_metric_families

TESTS = Path(__file__).resolve().parent
APPKIT = {"PYTHONPATH": str(TESTS)}
COUNTING = {"protocol": "appkit.counting:application"}


@pytest.fixture
def installed(tmp_path: Path) -> Path:
    """A copy of the mpd package that mpd runs from (an upgrade execs the code on disk)."""
    home = tmp_path / "installed"
    shutil.copytree(ROOT / "mpd", home / "mpd", ignore=shutil.ignore_patterns("__pycache__"))
    return home


def settle(server: Any, timeout: float = 30) -> dict[str, Any]:
    return wait_until(lambda: settled(server), timeout, interval=0.05,
                      what="no group moving, every worker ready")


def check_rooms(server: Any, load: RoomLoad, per_room: int) -> dict[bytes, dict[str, Any]]:
    """Each room is whole in the worker that the master names for it: every member says
    (#where, amid the load) that it is served by that one worker, which has them all."""
    snap = settle(server)
    where = placements(server, load.names)
    located = load.locate()
    assert not load.errors, load.errors
    pids = {w["pid"]: w["slot"] for w in snap["workers"]}
    for n, name in enumerate(load.names):
        placed = where[name]
        assert placed["placed"] and placed["members"] == per_room, placed
        assert located[n] == {placed["pid"]}, (name, located[n], placed)
        assert pids.get(placed["pid"]) == placed["slot"], (placed, pids)
    # By the heartbeats (a second apart): no group and no member anywhere else.
    wait_until(lambda: [sum(w[k] for w in status(server)["workers"])
                        for k in ("groups", "members")] == [len(load.names),
                                                            len(load.members)],
               what=f"{len(load.names)} groups and {len(load.members)} members by the "
               "workers' heartbeats")
    return where


def moved_in(server: Any) -> float:
    return next(s.value for f in text_string_to_metric_families(ok(server, "metrics"))
                for s in f.samples if s.name == "mpd_groups_moved_in_total")


def test_rooms_move_whole_through_scale_upgrade_move_and_drain(mpd_factory, installed):
    """30 rooms of 10 members, each member a line every 20 ms, on 4 workers: scale 1,
    scale 6, scale 2, upgrade, move a room, drain a slot, undrain."""
    server = mpd_factory({"server": COUNTING, "workers": {"workers": 4}}, env=APPKIT,
                         cwd=installed)
    load = RoomLoad(server.port, rooms=30, per_room=10, interval=0.02)
    load.sending.set()
    load.start()
    try:
        check_rooms(server, load, 10)
        for step in (["scale", "1"], ["scale", "6"], ["scale", "2"], ["upgrade"]):
            done = status(server)["master"]["groups"]["done"]
            ok(server, *step)
            load.wait_lines(10)
            where = check_rooms(server, load, 10)
            slots = {w["slot"] for w in where.values()}
            assert slots <= set(range(int(step[1]) if step[0] == "scale" else 2)), slots
            # Every room moved in the upgrade's roll; the counts went on across its exec.
            assert status(server)["master"]["groups"]["done"] >= done + (
                30 if step == ["upgrade"] else 1)
        # An operator moves a hot room to the other slot, then drains that slot.
        name = load.names[0]
        to = 1 - where[name]["slot"]
        ok(server, "move", name.decode(), str(to))
        load.wait_lines(10)
        where = check_rooms(server, load, 10)
        assert where[name]["slot"] == to and where[name]["pin"] == to
        ok(server, "drain", str(to))
        load.wait_lines(10)
        where = check_rooms(server, load, 10)
        assert {w["slot"] for w in where.values()} == {1 - to}
        ok(server, "undrain", str(to))
        load.wait_lines(10)
        check_rooms(server, load, 10)
        load.stop()
        assert not load.errors, load.errors
        for n, members in load.rooms.items():
            assert load.ask(members[0], b"#count") == b"count %d" % load.sent_to(n)
    finally:
        load.close()
    moved = server.events("group.moved")
    assert moved and all(e["members"] == 10 and e["bytes"] > 0 and e["pause_ms"] >= 0
                         for e in moved)
    groups = status(server)["master"]["groups"]
    assert groups["failed"] == 0 and groups["done"] == len(moved)
    metrics = {(s.name, tuple(s.labels.items())): s.value
               for f in text_string_to_metric_families(ok(server, "metrics"))
               for s in f.samples}
    assert metrics[("mpd_group_moves_total", (("result", "done"),))] == len(moved)
    assert metrics[("mpd_group_moves_total", (("result", "failed"),))] == 0
    assert metrics[("mpd_group_move_pause_seconds_count", ())] == len(moved)
    assert metrics[("mpd_group_move_pause_seconds_sum", ())] == pytest.approx(
        sum(e["pause_ms"] for e in moved) / 1000, abs=len(moved) * 1e-5)
    # The workers' own count comes with their heartbeats (a second apart, and a last one
    # as a worker exits): the moves of the last step may not be in yet.
    wait_until(lambda: moved_in(server) == len(moved), 5,
               what=f"mpd_groups_moved_in_total at {len(moved)} by the heartbeats")
    assert not server.events("client.error") and not server.events("app.error")


def test_relay_streams_stay_byte_exact_through_scale_and_upgrade(mpd_factory, installed):
    """10 streams of 50 players and their publishers, on 4 workers: scale 1, scale 6,
    scale 2, upgrade; every player gets the publisher's bytes, none missing or repeated."""
    server = mpd_factory({"server": {"protocol": "relay"}, "workers": {"workers": 4}},
                         cwd=installed)
    load = RelayLoad(server.port, streams=10, players=50, interval=0.02)
    load.sending.set()
    load.start()
    try:
        load.wait_bytes(16 << 10)
        for step in (["scale", "1"], ["scale", "6"], ["scale", "2"], ["upgrade"]):
            ok(server, *step)
            settle(server)
            load.wait_bytes(16 << 10)
            assert not load.errors, load.errors
            where = placements(server, load.names)
            assert all(w["members"] == 51 for w in where.values()), where
        load.stop()
        assert not load.errors, load.errors
    finally:
        load.close()
    assert server.events("group.moved")
    assert status(server)["master"]["groups"]["failed"] == 0


def test_a_restored_group_speaks_to_its_members_before_they_are_served(mpd_factory):
    """What a group's state_restored() writes to its members (each member's write and a
    broadcast) waits until they are served by the new owner, then reaches each of them,
    ahead of anything the room says after the move."""
    server = mpd_factory({"server": COUNTING, "workers": {"workers": 2}}, env=APPKIT)
    chat = Chat(server.port, b"room-0", 3)
    try:
        chat.say(0, b"before")
        assert chat.ask(1, b"#announce") == b"announce"
        before = placements(server, [b"room-0"])[b"room-0"]
        ok(server, "move", "room-0", str(1 - before["slot"]))
        after = placements(server, [b"room-0"])[b"room-0"]
        assert after["slot"] == 1 - before["slot"] and after["pid"] != before["pid"]
        for n in range(3):
            assert [chat.line(n), chat.line(n)] == [
                b"you moved", b"room moved to %d" % after["pid"]], n
        chat.say(2, b"after")
        assert chat.ask(0, b"#where") == b"where %d" % after["pid"]
        assert chat.ask(0, b"#count") == b"count 2"
    finally:
        chat.close()
    assert not server.events("client.error") and not server.events("app.error")
