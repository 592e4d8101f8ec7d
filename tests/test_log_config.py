"""Log settings on a running mpd: a log file that cannot be opened is a config error (exit
78 at start; a reload refused as a whole, by SIGHUP or mpdctl); the console format on a
terminal or by --log-format, kept over reloads; quiet control commands at debug."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import ME, ROOT, pid_alive, toml_config, wait_until

from mpd import ctl

CONSOLE_LINE = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (debug|info|warning|error)"
                          r" +(master|worker/\d+|single)\[(\d+)\] ([a-z_]+\.[a-z_]+)(.*)")


def start_mpd(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mpd.cli", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=30, cwd=ROOT)


def mpdctl(socket_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mpd.ctl", "--socket", str(socket_path),
                           *args], capture_output=True, text=True, timeout=30, cwd=ROOT)


@pytest.mark.parametrize("problem", ["missing directory", "a directory"])
def test_a_log_file_that_cannot_be_opened_stops_the_start_in_one_line(tmp_path, problem):
    log_file = tmp_path / "nowhere" / "mpd.log" if problem == "missing directory" else tmp_path
    config = tmp_path / "mpd.toml"
    config.write_text(toml_config({"server": {"port": 0},
                                   "control": {"socket": str(tmp_path / "mpd.sock")},
                                   "log": {"target": "file", "file": str(log_file)}}))
    reason = "No such file or directory" if problem == "missing directory" else "Is a directory"
    for args in ((), ("--check-config",)):
        result = start_mpd(config, *args)
        assert result.returncode == 78, result
        assert result.stderr == (f"mpd: invalid config: {config}:7: log.file: cannot open the "
                                 f"log file {log_file}: {reason}\n")
        assert "Traceback" not in result.stdout + result.stderr
        logged = json.loads(result.stdout)  # and one config.invalid line on stdout
        assert logged["event"] == "config.invalid" and logged["key"] == "log.file"
    assert not (tmp_path / "mpd.sock").exists()
    if problem == "missing directory":
        assert not log_file.parent.exists()  # --check-config created nothing


def bad_log_file(server, workers: int) -> dict[str, dict[str, Any]]:
    """The server's settings with more workers and a log file in a missing directory."""
    settings = {**server.settings, "workers": {"workers": workers},
                "log": {"target": "file", "file": str(server.tmp / "gone" / "mpd.log")}}
    server.write_config(settings)
    return settings


def test_sighup_with_a_log_file_that_cannot_be_opened_changes_nothing(mpd_factory):
    server = mpd_factory({"workers": {"workers": 2}})
    server.wait_workers(2)
    good = server.settings
    bad_log_file(server, workers=3)
    server.signal(signal.SIGHUP)
    failed = server.wait_event("config.reload_failed")  # in the old log: still in use
    assert "cannot open the log file" in failed["error"] and "gone/mpd.log" in failed["error"]
    assert pid_alive(server.pid) and server.proc.poll() is None
    assert len(server.worker_pids()) == 2  # the worker count was not applied either
    assert not server.events("config.reloaded")
    # Fixed: the next reload applies all of it, and the new file gets the lines.
    new_log = server.tmp / "new.log"
    server.write_config({**good, "workers": {"workers": 3},
                         "log": {"target": "file", "file": str(new_log)}})
    server.signal(signal.SIGHUP)
    server.wait_workers(3)
    wait_until(lambda: new_log.exists() and '"config.reloaded"' in new_log.read_text(),
               what="config.reloaded in the new log file")


def test_mpdctl_reload_with_a_log_file_that_cannot_be_opened_fails_and_says_why(mpd_factory):
    server = mpd_factory({"workers": {"workers": 2}})
    server.wait_workers(2)
    bad_log_file(server, workers=3)
    result = mpdctl(server.tmp / "mpd.sock", "reload")
    assert result.returncode == ctl.EXIT_ERROR
    assert len(result.stderr.strip().splitlines()) == 1
    assert "reload failed, nothing changed" in result.stderr
    assert f"cannot open the log file {server.tmp}/gone/mpd.log: No such file" in result.stderr
    assert "internal error" not in result.stderr
    assert mpdctl(server.tmp / "mpd.sock", "ping").returncode == 0
    assert len(server.worker_pids()) == 2
    server.wait_event("config.reload_failed")


# --- formats ----------------------------------------------------------------------------------

class Terminal:
    """mpd with stdout and stderr on a real pseudo-terminal."""

    def __init__(self, tmp: Path, settings: dict[str, dict[str, Any]], *args: str):
        config = tmp / "mpd.toml"
        config.write_text(toml_config({"server": {"port": 0, "user": ME},
                                       "workers": {"workers": 1},
                                       "control": {"socket": str(tmp / "mpd.sock")},
                                       **settings}))
        self.config = config
        self.master_fd, slave = pty.openpty()
        self.proc = subprocess.Popen([sys.executable, "-m", "mpd.cli", "--config", str(config),
                                      *args], stdin=subprocess.DEVNULL, stdout=slave,
                                     stderr=slave, cwd=ROOT, start_new_session=True)
        os.close(slave)
        self.text = ""

    def read(self) -> str:
        while select.select([self.master_fd], [], [], 0.05)[0]:
            try:
                self.text += os.read(self.master_fd, 65536).decode(errors="replace")
            except OSError:  # EIO: every writer closed the terminal
                break
        return self.text

    def lines(self) -> list[str]:
        return [line for line in self.read().replace("\r\n", "\n").split("\n")[:-1] if line]

    def wait_for(self, text: str) -> None:
        wait_until(lambda: text in self.read(), what=f"{text!r} on the terminal")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        os.close(self.master_fd)


@pytest.fixture
def terminal(tmp_path):
    started: list[Terminal] = []

    def start(settings: dict[str, dict[str, Any]], *args: str) -> Terminal:
        started.append(Terminal(tmp_path, settings, *args))
        return started[-1]

    yield start
    for t in started:
        t.stop()


def test_on_a_terminal_the_log_is_for_people(terminal):
    term = terminal({})  # log.format = "auto"
    term.wait_for("mpd.ready")
    lines = term.lines()
    parsed = [CONSOLE_LINE.fullmatch(line) for line in lines]
    assert all(parsed), lines
    started = next(m for m in parsed if m and m[5] == "mpd.started")
    assert started[2] == "info" and started[3] == "master" and int(started[4]) == term.proc.pid
    assert " port=" in started[6] and " workers=1" in started[6]
    worker = next(m for m in parsed if m and m[5] == "worker.serving")
    assert worker[3] == "worker/0"
    # No None fields: the master's lines have no slot=None (nor slot=null).
    assert "None" not in term.read() and not re.search(r"\bslot=", term.read())


def test_log_format_json_on_a_terminal(terminal):
    term = terminal({}, "--log-format", "json")
    term.wait_for("mpd.ready")
    events = [json.loads(line) for line in term.lines()]
    assert "mpd.ready" in [e["event"] for e in events]


def test_log_format_console_overrides_the_file_and_survives_a_reload(mpd_factory):
    server = mpd_factory({"workers": {"workers": 1}, "log": {"format": "json"}})
    server.stop()  # the harness reads JSON; this one runs with --log-format console
    log = server.tmp / "console.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mpd.cli", "--config",
                                 str(server.config_path), "--log-format", "console"],
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True)
    try:
        wait_until(lambda: "mpd.ready" in log.read_text(), what="mpd.ready")
        os.kill(proc.pid, signal.SIGHUP)
        wait_until(lambda: "config.reloaded" in log.read_text(), what="config.reloaded")
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(15) == 0
        lines = log.read_text().splitlines()
        assert all(CONSOLE_LINE.fullmatch(line) for line in lines), lines
        after = lines[[i for i, x in enumerate(lines) if "config.reloaded" in x][0]:]
        assert any("worker.stopped" in line for line in after)  # workers too, after it
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_status_and_ping_are_logged_at_debug_other_commands_at_info(mpd_factory):
    server = mpd_factory({"workers": {"workers": 1}, "log": {"level": "debug"}})
    sock = server.tmp / "mpd.sock"
    assert mpdctl(sock, "status").returncode == 0
    assert mpdctl(sock, "ping").returncode == 0
    assert mpdctl(sock, "scale", "2").returncode == 0
    server.wait_event("control.command", command="scale")
    levels = {e["command"]: e["level"] for e in server.events("control.command")}
    assert levels == {"status": "debug", "ping": "debug", "scale": "info"}
    assert server.events("control.command", command="scale")[0]["peer_uid"] == os.getuid()


def test_single_process_sighup_with_a_log_file_that_cannot_be_opened(mpd_factory):
    server = mpd_factory({"workers": {"workers": 0}})
    bad_log_file(server, workers=0)
    server.signal(signal.SIGHUP)
    failed = server.wait_event("config.reload_failed")
    assert "cannot open the log file" in failed["error"]
    sock = server.connect()
    sock.sendall(b"ping\0")
    assert sock.recv(100) == b"hello, server ping!\0"
    sock.close()
    assert server.proc.poll() is None
