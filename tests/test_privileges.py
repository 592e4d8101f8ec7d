"""Privileges outside systemd: started as root, mpd opens its sockets as root, then
becomes server.user, master and workers, before any worker serves; a root start without
server.user is refused. mpd runs here from the venv of Debian's Python under /opt (the
systemd tests' one), since "nobody" must read the code and the interpreter for an
upgrade in place to exec them, and pyenv's Python lives under /root."""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, Mpd, ping, toml_config, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")

NOBODY = pwd.getpwnam("nobody")


def ids(pid: int) -> tuple[list[int], list[int]]:
    """Real, effective, saved and filesystem uid and gid, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return ([int(x) for x in fields["Uid"].split()], [int(x) for x in fields["Gid"].split()])


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory "nobody" can read (pytest's tmp_path is root's alone), as /run/mpd and
    /etc are; root owns it, so the dropped mpd cannot write into it."""
    path = Path(tempfile.mkdtemp(prefix="mpd-priv-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def mpdctl(sock: Path, *args: str) -> subprocess.CompletedProcess:
    """mpdctl as root (this test's user), from the source tree."""
    return subprocess.run([sys.executable, "-m", "mpd.ctl", "--socket", str(sock), *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_started_as_root_mpd_serves_as_server_user(system_venv, shared_dir):
    server = Mpd(shared_dir, {"server": {"user": "nobody"}, "workers": {"workers": 2}},
                 cwd=Path("/"), python=str(system_venv / "bin" / "python"))
    try:
        dropped = server.wait_event("mpd.privileges_dropped")
        nogroup = grp.getgrgid(NOBODY.pw_gid)
        assert dropped == {**dropped, "user": "nobody", "uid": NOBODY.pw_uid,
                           "group": nogroup.gr_name, "gid": NOBODY.pw_gid}
        assert ids(server.pid) == ([NOBODY.pw_uid] * 4, [NOBODY.pw_gid] * 4)
        workers = server.wait_workers(2)
        for pid in workers:
            assert ids(pid) == ([NOBODY.pw_uid] * 4, [NOBODY.pw_gid] * 4)
        # Dropped before any worker was forked: every spawn comes after it in the log.
        names = [e["event"] for e in server.events()]
        assert names.index("mpd.privileges_dropped") < names.index("worker.spawned")
        sock = shared_dir / "mpd.sock"
        assert os.stat(sock).st_uid == NOBODY.pw_uid
        status = mpdctl(sock, "--json", "status")  # root may always steer mpd
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["master"]["ready"] == 2
        with server.connect() as client:
            ping(client)
        # An upgrade in place: the pre-flight and the exec run as nobody.
        upgrade = mpdctl(sock, "upgrade")
        assert upgrade.returncode == 0, upgrade.stderr + upgrade.stdout
        new = server.wait_workers(2)
        assert not set(new) & set(workers)
        for pid in [server.pid, *new]:
            assert ids(pid)[0] == [NOBODY.pw_uid] * 4
        with server.connect() as client:
            ping(client)
        server.signal(signal.SIGTERM)
        assert server.wait_exit() == 0  # the socket in root's directory stays: no crash
    finally:
        server.stop()


def test_daemon_started_as_root_serves_reloads_and_stops_as_server_user(system_venv,
                                                                       shared_dir):
    """`mpd --daemon` from an init script: pidfile and log file written as root, given to
    nobody, who then reopens the log and re-reads the config on SIGHUP."""
    log_file, pidfile = shared_dir / "mpd.log", shared_dir / "run" / "mpd.pid"
    config = shared_dir / "mpd.toml"
    settings = {"server": {"port": 0, "user": "nobody"}, "workers": {"workers": 1},
                "control": {"socket": str(shared_dir / "mpd.sock")},
                "log": {"target": "file", "file": str(log_file)},
                "daemon": {"pidfile": str(pidfile)}}
    config.write_text(toml_config(settings))
    result = subprocess.run([str(system_venv / "bin" / "python"), "-m", "mpd.cli", "--daemon",
                             "--config", str(config)], capture_output=True, text=True,
                            timeout=30, cwd="/")
    assert result.returncode == 0, result.stderr
    pid = int(wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(),
                         what="the pidfile"))
    try:
        wait_until(lambda: '"mpd.ready"' in log_file.read_text(), what="mpd.ready")
        assert ids(pid)[0] == [NOBODY.pw_uid] * 4
        assert os.stat(log_file).st_uid == NOBODY.pw_uid
        assert os.stat(pidfile).st_uid == NOBODY.pw_uid
        settings["workers"] = {"workers": 2}
        config.write_text(toml_config(settings))
        os.kill(pid, signal.SIGHUP)  # reads the config and reopens the log, as nobody
        wait_until(lambda: '"config.reloaded"' in log_file.read_text(), what="the reload")
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: '"mpd.stopped"' in log_file.read_text(), timeout=15,
                   what="mpd.stopped")
        assert "Traceback" not in log_file.read_text()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def start(python: str, config: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-m", "mpd.cli", "--config", str(config)],
                          capture_output=True, text=True, timeout=30, cwd="/", **kwargs)


def test_a_root_start_without_server_user_is_refused(shared_dir):
    config = shared_dir / "mpd.toml"
    config.write_text(toml_config({"server": {"port": 0}, "workers": {"workers": 1},
                                   "control": {"socket": str(shared_dir / "mpd.sock")}}))
    result = start(sys.executable, config)
    assert result.returncode == 78
    assert result.stderr == ("mpd: started as root without server.user: set server.user to "
                             "the user mpd should serve as (it opens its sockets and files "
                             "as root first), or server.user = \"root\" to serve as root "
                             "knowingly\n")
    assert '"mpd.privileges_failed"' in result.stdout
    assert not (shared_dir / "mpd.sock").exists()  # refused before it opened anything


def test_only_root_can_become_another_user(system_venv, shared_dir):
    config = shared_dir / "mpd.toml"
    config.write_text(toml_config({"server": {"port": 0, "user": "root"},
                                   "workers": {"workers": 1},
                                   "control": {"socket": str(shared_dir / "mpd.sock")}}))
    os.chmod(config, 0o644)
    result = start(str(system_venv / "bin" / "python"), config, user="nobody",
                   group=NOBODY.pw_gid, extra_groups=[])
    assert result.returncode == 78, result.stderr
    assert result.stderr.startswith(f"mpd: server.user = \"root\": mpd runs as uid "
                                    f"{NOBODY.pw_uid}, and only root can become another user")


def test_a_root_start_as_root_must_say_so(tmp_path):
    """`server.user = "root"` (or --user root) keeps root, knowingly: no drop is logged."""
    server = Mpd(tmp_path, {"server": {"user": "root"}, "workers": {"workers": 1}})
    try:
        wait_until(lambda: server.events("worker.ready"), what="a ready worker")
        assert not server.events("mpd.privileges_dropped")
        assert ids(server.pid)[0] == [0, 0, 0, 0]
    finally:
        server.stop()


def test_user_on_the_command_line_holds_across_reloads(shared_dir):
    """`mpd --user root` (scripts/run's way) is kept over every reload, as --log-format
    is: a reload of a file without server.user is no change of user."""
    config = shared_dir / "mpd.toml"
    settings = {"server": {"port": 0}, "workers": {"workers": 1},
                "control": {"socket": str(shared_dir / "mpd.sock")}}
    config.write_text(toml_config(settings))
    log = shared_dir / "out.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mpd.cli", "--config", str(config),
                                 "--user", "root", "--log-format", "json"], stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    try:
        wait_until(lambda: '"mpd.ready"' in log.read_text(), what="mpd.ready")
        settings["workers"] = {"workers": 2}
        config.write_text(toml_config(settings))
        reload = mpdctl(shared_dir / "mpd.sock", "reload")
        assert reload.returncode == 0, reload.stderr
        assert "need a restart" not in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0


# --- what server.user must reach, checked before the drop (issue 20, item 6) -------------

def private_dir(parent: Path) -> Path:
    """A 0700 directory of root's: nobody cannot even enter it."""
    path = parent / "private"
    path.mkdir(mode=0o700)
    return path


def test_a_config_that_server_user_cannot_read_is_one_line_and_exit_78(system_venv,
                                                                        shared_dir):
    """A reload reads the config again, as nobody: a start that could never reload is
    refused before the drop, with the path, and nothing is left behind."""
    config = private_dir(shared_dir) / "mpd.toml"
    sock = shared_dir / "mpd.sock"
    config.write_text(toml_config({"server": {"port": 0, "user": "nobody"},
                                   "workers": {"workers": 1},
                                   "control": {"socket": str(sock)}}))
    result = start(str(system_venv / "bin" / "python"), config)
    assert result.returncode == 78, result.stderr + result.stdout
    assert result.stderr == (f"mpd: server.user nobody cannot read the config {config} (a "
                             "reload reads it again): let nobody reach it (and search each "
                             "directory above it), or move it\n")
    assert '"mpd.privileges_failed"' in result.stdout and "Traceback" not in result.stdout
    assert not sock.exists()  # closed and removed as root, before the drop


def test_a_control_socket_in_a_directory_server_user_cannot_enter(system_venv, shared_dir):
    """The issue's setup: mpd no longer needs that directory to start (it crashed there,
    exit 1, when it stat()ed its socket after the drop). It serves, steered by root, and
    says once what it cannot do: bind its socket again if the file is removed."""
    private = private_dir(shared_dir)
    server = Mpd(shared_dir, {"server": {"user": "nobody"}, "workers": {"workers": 1},
                              "control": {"socket": str(private / "mpd.sock")}},
                 cwd=Path("/"), python=str(system_venv / "bin" / "python"))
    try:
        limited = server.wait_event("mpd.privileges_limited")
        assert limited["path"] == str(private) and "bind it again" in limited["consequence"]
        status = mpdctl(private / "mpd.sock", "--json", "status")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["master"]["uid"] == NOBODY.pw_uid
        with server.connect() as client:
            ping(client)
        server.signal(signal.SIGTERM)
        assert server.wait_exit() == 0
        assert not server.events("mpd.crashed")
        assert len(server.events("mpd.privileges_limited")) == 1
    finally:
        server.stop()


def test_a_socket_directory_mpd_makes_is_the_users_so_it_can_bind_the_socket_again(
        system_venv, shared_dir):
    """/run/mpd on a first start: mpd makes the directory as root and gives it to
    server.user, who can then bind the socket again when its file is removed."""
    made = shared_dir / "run" / "mpd"
    sock = made / "mpd.sock"
    server = Mpd(shared_dir, {"server": {"user": "nobody"}, "workers": {"workers": 1},
                              "control": {"socket": str(sock)}},
                 cwd=Path("/"), python=str(system_venv / "bin" / "python"))
    try:
        assert os.stat(made).st_uid == NOBODY.pw_uid
        assert not server.events("mpd.privileges_limited")
        sock.unlink()
        server.signal(signal.SIGHUP)
        server.wait_event("control.recreated", trigger="reload")
        assert os.stat(sock).st_uid == NOBODY.pw_uid
        status = mpdctl(sock, "ping")
        assert status.returncode == 0, status.stderr
        server.signal(signal.SIGTERM)
        assert server.wait_exit() == 0
        assert not sock.exists()  # its own directory: removed at exit, as nobody
    finally:
        server.stop()
