"""The clients shipped for people to try rooms and relay (`python -m mpd.apps.rooms_client`,
`python -m mpd.apps.relay_client`), run as a user runs them: subprocesses with their stdin
and stdout, against a real mpd."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, wait_until
from test_apps import mpdctl


def client(module: str, port: int, *args: str, stdin=subprocess.PIPE,
           stdout=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", f"mpd.apps.{module}", "--port", str(port),
                             *args], stdin=stdin, stdout=stdout, stderr=subprocess.PIPE,
                            cwd=ROOT)


def members(server, key: str) -> int | None:
    return json.loads(mpdctl(server, "--json", "where", key).stdout).get("members")


def test_rooms_client_sends_stdin_lines_to_the_room_and_prints_the_others(mpd_factory):
    server = mpd_factory({"server": {"protocol": "rooms"}, "workers": {"workers": 2}})
    alice = client("rooms_client", server.port, "lobby")
    assert alice.stderr.readline() == b"joined 'lobby' (1 member)\n"
    bob = client("rooms_client", server.port, "lobby")
    assert bob.stderr.readline() == b"joined 'lobby' (2 members)\n"
    alice.stdin.write(b"hello\nfrom alice\n")
    alice.stdin.flush()
    assert bob.stdout.readline() == b"hello\n" and bob.stdout.readline() == b"from alice\n"
    # The end of bob's stdin: he leaves, and his client exits once the server closed.
    out, err = bob.communicate(b"hi alice, no newline at the end",  # the client ends the line
                               timeout=20)
    assert bob.returncode == 0 and out == b"" and err == b"", err
    assert alice.stdout.readline() == b"hi alice, no newline at the end\n"
    out, err = alice.communicate(b"", timeout=20)
    assert alice.returncode == 0 and out == b"" and err == b"", err


def test_relay_client_publishes_stdin_and_plays_the_stream_to_stdout(mpd_factory,
                                                                     tmp_path: Path):
    server = mpd_factory({"server": {"protocol": "relay"}, "workers": {"workers": 2}})
    recording = tmp_path / "recording"
    recording.write_bytes(os.urandom(3 << 20))
    outputs = [tmp_path / f"copy{n}" for n in range(3)]
    players = []
    for path in outputs:
        with open(path, "wb") as out:
            players.append(client("relay_client", server.port, "play", "cam1",
                                  stdin=subprocess.DEVNULL, stdout=out))
    wait_until(lambda: members(server, "cam1") == 3, what="3 players in cam1")
    first = client("relay_client", server.port, "publish", "cam1", stdout=subprocess.DEVNULL)
    wait_until(lambda: members(server, "cam1") == 4, what="the publisher in cam1")
    second = client("relay_client", server.port, "publish", "cam1", stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL)
    _, err = second.communicate(timeout=20)
    assert second.returncode == 1
    assert err.decode().splitlines() == [
        f"python -m mpd.apps.relay_client: 127.0.0.1:{server.port} refused: "
        "error: stream has a publisher"]
    # Its stdin goes out as the players take it: a player more than max_output_buffer
    # behind would be cut off (the relay's promise), and this test is about the clients.
    data = recording.read_bytes()
    for sent in range(1 << 18, len(data) + 1, 1 << 18):
        first.stdin.write(data[sent - (1 << 18):sent])
        first.stdin.flush()
        wait_until(lambda s=sent: all(path.stat().st_size >= s for path in outputs),
                   timeout=30, interval=0.002, what=f"the players at byte {sent}")
    _, err = first.communicate(timeout=30)  # its stdin ends: so does the stream
    assert first.returncode == 0, err
    for player, path in zip(players, outputs):
        _, err = player.communicate(timeout=30)
        assert player.returncode == 0, err
        assert path.read_bytes() == recording.read_bytes()


def test_a_client_that_cannot_join_says_why_in_one_line(mpd_factory):
    server = mpd_factory({"server": {"protocol": "rooms"}, "workers": {"workers": 1}})
    wrong = client("relay_client", server.port, "play", "cam1")  # relay's frame to rooms
    _, err = wrong.communicate(timeout=20)
    assert wrong.returncode == 1
    assert err.decode().splitlines() == [
        f"python -m mpd.apps.relay_client: 127.0.0.1:{server.port} refused: error: expected "
        "J, a length byte (1-255) and a room name"]
    server.stop()  # nothing listens there now
    gone = client("rooms_client", server.port, "lobby")
    _, err = gone.communicate(timeout=20)
    assert gone.returncode == 1
    assert err.decode().splitlines() == [
        f"python -m mpd.apps.rooms_client: cannot connect to 127.0.0.1:{server.port}: "
        "Connection refused"]
    long_name = client("rooms_client", server.port, "x" * 256)
    _, err = long_name.communicate(timeout=20)
    assert long_name.returncode == 1 and b"1 to 255 bytes" in err
    bad_rate = client("relay_client", server.port, "publish", "--rate", "fast", "cam1")
    _, err = bad_rate.communicate(timeout=20)
    assert bad_rate.returncode == 2 and b"'fast' is not bytes a second" in err


def test_a_client_the_server_cuts_off_says_so_in_one_line(mpd_factory, tmp_path: Path):
    server = mpd_factory({"server": {"protocol": "rooms"}, "workers": {"workers": 1},
                          "app": {"max_line": 16}})
    flood = tmp_path / "flood"
    flood.write_bytes(b"x" * (4 << 20))  # one endless line: a protocol error at 16 bytes
    with open(flood, "rb") as stdin:
        cut = client("rooms_client", server.port, "--quiet", "lobby", stdin=stdin)
        out, err = cut.communicate(timeout=30)
    server.wait_event("client.protocol_error")
    # The server closed it while the client still sent: EOF first (exit 0), or a reset
    # that the next send or the next read meets (exit 1, and why); never a traceback.
    assert out == b"" and len(err.splitlines()) == cut.returncode, err
    if cut.returncode:
        assert err.startswith((b"python -m mpd.apps.rooms_client: the server closed the "
                               b"connection (",
                               b"python -m mpd.apps.rooms_client: the server cut the "
                               b"connection off (a reset")), err
