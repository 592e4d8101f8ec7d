"""Key groups whose move fails, on real processes (issue 23): a worker or the master
SIGKILLed in the middle of a move (held there by MPD_TEST_MOVE_HOLD_FILE, testhooks.py),
a group whose state is over workers.max_group_state, and an upgrade whose new code
cannot read the running groups' state. A failure before the new owner acknowledges
leaves the group where it was; no group is ever served by two workers; nothing is left
behind."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, pid_alive, wait_until
from moveload import (
    Chat,
    RoomLoad,
    join_frame,
    mpdctl,
    ok,
    placements,
    rooms_of,
    settled,
    status,
)

TESTS = Path(__file__).resolve().parent
COUNTING = {"protocol": "appkit.counting:application"}


def hold_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    hold = tmp_path / "move.hold"
    return {"PYTHONPATH": str(TESTS), "MPD_TEST_MOVE_HOLD_FILE": str(hold),
            "MPD_TEST_HOLD_FILE": str(tmp_path / "start.hold")}, hold


def held_by(hold: Path) -> tuple[str, int]:
    """Wait until a worker holds at the step the hold file names: (step, its pid)."""
    marker = Path(f"{hold}.held")
    text = wait_until(lambda: marker.exists() and marker.read_text().strip(), 20,
                      what="a worker holding in the move")
    step, pid = text.split()
    return step, int(pid)


def slot_pid(server: Any, slot: int) -> int:
    return next(w["pid"] for w in status(server)["workers"] if w["slot"] == slot
                and w["state"] == "ready")


def start_mpdctl(server: Any, *args: str) -> subprocess.Popen:
    """mpdctl in the background: it waits for what the test makes happen meanwhile."""
    return subprocess.Popen([sys.executable, "-m", "mpd.ctl", "--socket",
                             str(server.tmp / "mpd.sock"), "--timeout", "30", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)


def test_the_new_owner_killed_during_a_move_leaves_the_group_whole_on_the_old_one(
        mpd_factory, tmp_path):
    env, hold = hold_env(tmp_path)
    server = mpd_factory({"server": COUNTING, "workers": {"workers": 2}}, env=env)
    # Rooms of slot 0 only: the worker killed (slot 1's) has none but what comes to it.
    load = RoomLoad(server.port, rooms_of(0, (0, 1), 3), per_room=6, interval=0.02)
    load.sending.set()
    load.start()
    try:
        load.wait_lines(5)
        name = load.names[0]
        before = placements(server, [name])[name]
        to = 1
        target = slot_pid(server, to)
        hold.write_text("restore")
        mover = start_mpdctl(server, "move", name.decode(), str(to))
        assert held_by(hold) == ("restore", target)  # every chunk in, not restored
        slow_start = Path(env["MPD_TEST_HOLD_FILE"])
        slow_start.touch()  # the slot's next worker waits to start: the room stays put
        os.kill(target, signal.SIGKILL)
        hold.unlink()
        failed = server.wait_event("group.move_failed", role="master")
        assert failed["key"] == name.decode() and failed["error"] == "the new owner died"
        aborted = server.wait_event("group.move_aborted", pid=before["pid"])
        assert aborted["key"] == name.decode() and aborted["members"] == 6
        load.wait_lines(10)  # the room chats on, on the old owner
        assert load.locate()[0] == {before["pid"]}
        slow_start.unlink()
        mover.wait(60)  # the pin stays: the room moves to the slot's new worker next
        wait_until(lambda: settled(server), 30, what="the moves done")
        assert placements(server, [name])[name]["slot"] == to
        load.wait_lines(5)
        load.stop()
        assert not load.errors, load.errors
        for n, members in load.rooms.items():
            assert load.ask(members[0], b"#count") == b"count %d" % load.sent_to(n)
    finally:
        load.close()


def test_the_old_owner_killed_during_a_move_takes_its_members_and_newcomers_meet_anew(
        mpd_factory, tmp_path):
    env, hold = hold_env(tmp_path)
    server = mpd_factory({"server": COUNTING, "workers": {"workers": 2}}, env=env)
    old = Chat(server.port, b"room-0", 4)
    old.say(0, b"before")
    before = placements(server, [b"room-0"])[b"room-0"]
    hold.write_text("export")
    drain = start_mpdctl(server, "drain", str(before["slot"]))
    assert held_by(hold) == ("export", before["pid"])  # frozen, nothing sent
    newcomers = [socket.create_connection(("127.0.0.1", server.port), timeout=20)
                 for _ in range(2)]
    for sock in newcomers:
        sock.sendall(join_frame(b"J", b"room-0"))
    wait_until(lambda: status(server)["master"]["held"] == 2, 20,
               what="the newcomers held by the master while their room moves")
    os.kill(before["pid"], signal.SIGKILL)
    hold.unlink()
    for n in range(4):  # the old owner's members went with it, as in any crash
        assert old.closed(n)
    fresh = Chat.__new__(Chat)
    fresh.members, fresh.bufs = newcomers, [b"", b""]
    assert sorted([fresh.line(0), fresh.line(1)]) == [b"ok 1", b"ok 2"]  # a fresh room
    fresh.say(0, b"anew")
    new_pid = slot_pid(server, 1 - before["slot"])
    assert fresh.ask(0, b"#where") == fresh.ask(1, b"#where") == b"where %d" % new_pid
    assert fresh.ask(1, b"#count") == b"count 1"
    assert drain.wait(60) == 0, drain.stderr.read()  # type: ignore[union-attr]
    where = placements(server, [b"room-0"])[b"room-0"]
    assert where["pid"] == new_pid and where["members"] == 2
    wait_until(lambda: sum(w["groups"] for w in status(server)["workers"]) == 1,
               what="one room-0 group in one worker, none in the respawned one")
    old.close()
    fresh.close()


def test_the_master_killed_during_a_move_leaves_no_process_and_frees_the_port(
        mpd_factory, tmp_path):
    env, hold = hold_env(tmp_path)
    server = mpd_factory({"server": COUNTING, "workers": {"workers": 2}}, env=env)
    chat = Chat(server.port, b"room-0", 3)
    chat.say(0, b"hello")
    before = placements(server, [b"room-0"])[b"room-0"]
    workers = server.worker_pids()
    hold.write_text("restore")
    start_mpdctl(server, "move", "room-0", str(1 - before["slot"]))
    held_by(hold)
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)
    wait_until(lambda: not any(pid_alive(pid) for pid in workers), 10,
               what="every worker gone with the master (PR_SET_PDEATHSIG)")
    hold.unlink()
    for n in range(3):
        assert chat.closed(n)
    with socket.socket() as sock:  # the port is free: a restart can bind it
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", server.port))
        sock.listen()
    chat.close()


def test_a_group_state_over_the_bound_is_refused_naming_the_key(mpd_factory):
    server = mpd_factory({"server": COUNTING, "workers": {"workers": 2,
                                                          "max_group_state": 65536}},
                         env={"PYTHONPATH": str(TESTS)})
    chat = Chat(server.port, b"big-room", 3)
    assert chat.ask(0, b"#pad 100000") == b"pad 100000"
    before = placements(server, [b"big-room"])[b"big-room"]
    result = mpdctl(server, "move", "big-room", str(1 - before["slot"]))
    assert result.returncode == 1
    assert "the move failed: the state of key 'big-room' is " in result.stderr
    assert "bytes, over workers.max_group_state (65536)" in result.stderr
    chat.say(1, b"still here")  # it serves on where it was, whole
    after = placements(server, [b"big-room"])[b"big-room"]
    assert (after["pid"], after["members"]) == (before["pid"], 3)
    assert chat.ask(2, b"#count") == b"count 1"
    failed = server.events("group.move_failed", role="worker")
    assert failed and "'big-room'" in failed[0]["error"]
    chat.close()


@pytest.fixture
def installed(tmp_path: Path) -> Path:
    home = tmp_path / "installed"
    shutil.copytree(ROOT / "mpd", home / "mpd", ignore=shutil.ignore_patterns("__pycache__"))
    return home


def test_an_upgrade_whose_application_cannot_read_the_state_is_refused_before_any_move(
        mpd_factory, installed, tmp_path):
    apps = tmp_path / "apps"
    apps.mkdir()
    module = apps / "versioned.py"
    version = ("from appkit import counting\n\n\ndef application():\n"
               "    return counting.application(state_version={})\n")
    module.write_text(version.format(1))
    server = mpd_factory({"server": {"protocol": "versioned:application"},
                          "workers": {"workers": 2}},
                         env={"PYTHONPATH": f"{apps}:{TESTS}"}, cwd=installed)
    chat = Chat(server.port, b"room-0", 3)
    chat.say(0, b"before")
    workers = server.worker_pids()
    module.write_text(version.format(2))  # the new code writes and reads version 2 only
    result = mpdctl(server, "upgrade")
    assert result.returncode != 0
    assert ("the new code's application 'counting' reads state versions [2], and the "
            "running groups' is 1") in result.stderr, result.stderr
    assert not server.events("upgrade.exec") and not server.events("group.moved")
    assert server.worker_pids() == workers
    assert status(server)["master"]["generation"] == 1
    chat.say(2, b"after")
    assert chat.ask(1, b"#count") == b"count 2"
    ok(server, "status")
    chat.close()


def test_an_upgrade_execs_only_once_no_move_is_under_way(mpd_factory, installed, tmp_path):
    """The new master would know nothing of a move under way (its group would stay frozen
    on the old owner): the exec waits for it, and no move starts meanwhile."""
    env, hold = hold_env(tmp_path)
    server = mpd_factory({"server": COUNTING, "workers": {"workers": 2}}, env=env,
                         cwd=installed)
    chat = Chat(server.port, b"room-0", 3)
    before = placements(server, [b"room-0"])[b"room-0"]
    hold.write_text("restore")
    mover = start_mpdctl(server, "move", "room-0", str(1 - before["slot"]))
    held_by(hold)  # the new owner has the transfer, and holds
    upgrade = start_mpdctl(server, "upgrade")
    waiting = server.wait_event("upgrade.waiting", timeout=30)
    assert waiting["moves"] == 1 and not server.events("upgrade.exec")
    hold.unlink()
    assert mover.wait(60) == 0, mover.stderr.read()  # type: ignore[union-attr]
    assert upgrade.wait(90) == 0, upgrade.stderr.read()  # type: ignore[union-attr]
    names = [e["event"] for e in server.events()]
    assert names.index("upgrade.exec") > names.index("group.moved")
    chat.say(1, b"after the upgrade")  # whole, on new code
    assert chat.ask(0, b"#count") == b"count 1"
    where = placements(server, [b"room-0"])[b"room-0"]
    assert where["members"] == 3 and where["slot"] == 1 - before["slot"]
    chat.close()
