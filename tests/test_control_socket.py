"""The control socket is mpd's to keep (issue 20, item 5): removed while mpd runs (by an
operator, or a cleaner of /tmp or /run), it comes back by itself within seconds, or at
once on a reload; an upgrade in place carries the open socket and never needs the path;
and mpdctl tells "not running" from "running, but its socket is gone"."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

from conftest import ROOT, Pingers, random_keys
from test_upgrade import Stream, installed, set_version  # noqa: F401 - a fixture

from mpd import ctl
from mpd.ops import control

PING = b'{"version": 1, "command": "ping"}\n'


def mpdctl(server, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mpd.ctl", "--socket",
                           str(server.tmp / "mpd.sock"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def connected(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    return sock


def test_a_reload_brings_a_removed_control_socket_back(mpd_factory):
    server = mpd_factory({"workers": {"workers": 1}})
    path = server.tmp / "mpd.sock"
    # The periodic check (every 2 s) may put it back first, between the unlink and the
    # SIGHUP: then again, until the reload is the one that did (each try takes ms).
    for attempt in range(1, 6):
        os.unlink(path)
        server.signal(signal.SIGHUP)
        recreated = server.wait_event("control.recreated", count=attempt)
        if recreated["trigger"] == "reload":
            break
    assert recreated["trigger"] == "reload" and recreated["reason"] == "gone"
    assert path.is_socket()
    result = mpdctl(server, "--json", "status")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["master"]["pid"] == server.pid


def test_the_periodic_check_brings_it_back_and_keeps_the_connected_peers(mpd_factory):
    server = mpd_factory({"workers": {"workers": 1}})
    path = server.tmp / "mpd.sock"
    peer = connected(str(path))  # connected before the file goes: it stays served
    os.unlink(path)
    recreated = server.wait_event("control.recreated", timeout=control.CHECK_EVERY + 2)
    assert recreated["trigger"] == "check" and path.is_socket()
    peer.sendall(PING)
    assert b'"pong":true' in peer.recv(65536)
    peer.close()
    assert mpdctl(server, "ping").returncode == 0
    # Replaced by a stale socket (a crashed process's): that is not mpd's either.
    os.unlink(path)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    server.wait_event("control.recreated", reason="replaced", timeout=control.CHECK_EVERY + 2)
    assert mpdctl(server, "ping").returncode == 0


def test_sigusr2_upgrades_with_every_client_kept_after_the_socket_file_was_removed(
        mpd_factory, installed):  # noqa: F811 - the fixture
    """SIGUSR2 is the way to upgrade when mpdctl cannot connect. The new master must not
    need the path: it carries the open socket, and binds the file again itself."""
    server = mpd_factory({"workers": {"workers": 2}}, cwd=installed)
    pingers = Pingers(server.port, random_keys(40, seed=20))
    stream = Stream(server.port)
    stream.start()
    pingers.wait_progress("40 clients pinging")
    set_version(installed, "99.0.7")
    os.unlink(server.tmp / "mpd.sock")
    server.signal(signal.SIGUSR2)
    server.wait_event("upgrade.done", timeout=30)
    pingers.wait_progress("every connection served after the upgrade")
    assert pingers.stop() == [None] * 40
    assert stream.stop() == [] and stream.done > 0
    assert server.proc.poll() is None
    result = mpdctl(server, "--json", "status")  # waits for the file if it is not back yet
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["master"]["pid"] == server.pid and reply["master"]["version"] == "99.0.7"
    assert {w["version"] for w in reply["workers"]} == {"99.0.7"}


def test_mpdctl_waits_for_the_socket_and_names_the_pid_when_it_stays_gone(mpd_factory):
    server = mpd_factory({"workers": {"workers": 1}})
    path = server.tmp / "mpd.sock"
    os.unlink(path)
    # Gone: mpd binds it again within seconds, and mpdctl waits for that.
    waited = mpdctl(server, "status")
    assert waited.returncode == 0, waited.stderr
    # A file that is not a socket in its place: mpd leaves it alone, and says so.
    os.unlink(path)
    path.write_text("not a socket\n")
    failed = server.wait_event("control.recreate_failed", timeout=control.CHECK_EVERY + 2)
    assert "is not a socket" in failed["error"]
    result = mpdctl(server, "--timeout", "1", "status")
    assert result.returncode == ctl.EXIT_UNREACHABLE
    assert result.stderr.count("\n") == 1, result.stderr
    assert f"mpd is running (pid {server.pid} (mpd: master {server.config_path}))" \
        in result.stderr
    assert f"kill -HUP {server.pid}" in result.stderr
    assert len(server.events("control.recreate_failed")) == 1  # once per cause
    # Once the file is out of the way, the next look binds the socket again.
    path.unlink()
    assert mpdctl(server, "ping").returncode == 0
    # And once mpd is gone, it is "not running", at once.
    server.signal(signal.SIGTERM)
    assert server.wait_exit() == 0
    gone = mpdctl(server, "status")
    assert gone.returncode == ctl.EXIT_NOT_RUNNING, gone.stderr


def test_an_old_masters_state_without_the_inode_is_adopted(tmp_path):
    """The release before did not record the inode (STATE_VERSION 1 all the same): the
    new master asks the socket at the path who listens there (SO_PEERCRED), and takes
    the file as its own only when that is itself."""
    from mpd.master import upgradestate
    from mpd.ops.socketfile import SocketFile

    path = str(tmp_path / "mpd.sock")
    ours = SocketFile(path, 0o660, "")
    sock = ours.bind()
    adopted = upgradestate.control_file_of({"control_fd": sock.fileno()}, _config(), sock)
    assert adopted.path == path and adopted.inode is None
    assert adopted.lost() is None and adopted.inode == ours.inode
    # The same path bound by another process: not ours, whatever listens there.
    os.unlink(path)
    other = subprocess.Popen([sys.executable, "-c", (
        "import socket, sys, time\n"
        f"s = socket.socket(socket.AF_UNIX); s.bind({path!r}); s.listen()\n"
        "print('up', flush=True); time.sleep(30)")], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout is not None and other.stdout.readline() == "up\n"
        assert SocketFile(path, 0o660, "").lost() == "replaced"
    finally:
        other.kill()
        other.wait()
    sock.close()


def _config():
    from mpd.config import schema as configmod

    return configmod.parse("", None)
