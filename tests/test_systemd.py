"""mpd under a real systemd (252, booted as PID 1 by sdbox in throw-away namespaces) and
a real journald; sd_notify against a socket the test holds; socket activation; --daemon."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
from conftest import ME, REPLY, ROOT, Mpd, pid_alive, recv_exact, toml_config, wait_until
from sdbox import BASE, install, mpdctl_status, needs_box, ping_inside, prop


@needs_box
def test_systemctl_start_serve_status_journal_reload_respawn_stop(box, system_venv):
    install(box, system_venv, BASE)
    box.run("systemctl", "start", "mpd", check=True)
    # Type=notify: start returned, so READY=1 came, after the workers said HELLO.
    assert prop(box, "ActiveState") == "active"
    assert box.events("mpd.ready"), "READY before the workers served"
    assert ping_inside(box, system_venv)
    assert "workers ready" in prop(box, "StatusText")
    status = mpdctl_status(box, system_venv)  # through /run/mpd/mpd.sock, as root
    assert status["master"]["ready"] == 2
    assert status["master"]["pid"] == int(prop(box, "MainPID"))
    # Each field is a journal field of its own; MESSAGE is a short sentence for people.
    spawned = box.events("worker.spawned")
    assert len(spawned) == 2 and {e["worker_slot"] for e in spawned} == {0, 1}
    matched = box.journal("MPD_EVENT=worker.spawned")
    assert len(matched) == 2
    assert {m["MPD_WORKER_SLOT"] for m in matched} == {"0", "1"}
    assert all(m["MPD_ROLE"] == "master" and m["PRIORITY"] == "6" for m in matched)
    assert {m["MESSAGE"] for m in matched} == {
        f"worker.spawned worker_pid={m['MPD_WORKER_PID']} worker_slot={m['MPD_WORKER_SLOT']} "
        "restarts=0 generation=1" for m in matched}
    serving = box.journal("MPD_EVENT=worker.serving")
    # max_clients = "auto": what the fd limit (LimitNOFILE, or less in a container) leaves.
    auto = status["master"]["max_clients"]
    assert auto > 1000 and {w["max_clients"] for w in status["workers"]} == {auto}
    assert {m["MESSAGE"] for m in serving} == {
        f"worker/{slot}: worker.serving max_clients={auto} protocol=ping" for slot in (0, 1)}
    # systemctl reload applies a changed worker count.
    box.copy(toml_config({**BASE, "workers": {"workers": 3, "graceful_timeout": 2}}),
             "/etc/mpd.toml")
    box.run("systemctl", "reload", "mpd", check=True)
    wait_until(lambda: mpdctl_status(box, system_venv)["master"]["ready"] == 3,
               what="3 workers after systemctl reload")
    assert box.journal("MPD_EVENT=config.reloaded")
    # kill -9 of a worker: worker.exited, then worker.respawned, in the journal.
    victim = status["workers"][0]["pid"]
    box.run("kill", "-9", str(victim), check=True)

    def exited_then_respawned() -> bool:
        events = [e["event"] for e in box.events()
                  if e["event"] in ("worker.exited", "worker.respawned")]
        return "worker.exited" in events and "worker.respawned" in events[
            events.index("worker.exited"):]
    wait_until(exited_then_respawned, timeout=20, interval=0.2, what="exited then respawned")
    exited = box.journal("MPD_EVENT=worker.exited")
    assert exited[0]["MPD_WORKER_PID"] == str(victim) and exited[0]["MPD_SIGNAL"] == "SIGKILL"
    assert ping_inside(box, system_venv)
    # systemctl stop leaves no mpd process (found by their titles: one master, 3 workers).
    assert len(box.run("pgrep", "-f", "^mpd: ").stdout.split()) == 4
    box.run("systemctl", "stop", "mpd", check=True)
    assert prop(box, "ActiveState") == "inactive"
    assert prop(box, "Result") == "success"
    left = box.run("pgrep", "-f", "^mpd: ")  # the process titles of master and workers
    assert left.stdout.strip() == ""
    assert box.events("mpd.stopped")


@needs_box
def test_a_broken_config_fails_the_start_without_a_restart_loop(box, system_venv):
    install(box, system_venv, BASE)
    box.copy("[workers]\nworkers = 'many'\n", "/etc/mpd.toml")
    assert box.run("systemctl", "start", "mpd").returncode != 0
    assert prop(box, "ActiveState") == "failed"
    assert prop(box, "ExecMainStatus") == "78"
    # RestartPreventExitStatus=78: give a restart (RestartSec=1) the chance to happen.
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:  # watching for something that must not happen
        assert prop(box, "NRestarts") == "0"
        time.sleep(0.25)
    invalid = box.journal("MPD_EVENT=config.invalid")
    assert invalid and invalid[0]["MPD_KEY"] == "workers.workers"


@needs_box
def test_socket_activation_with_mpd_socket(box, system_venv):
    install(box, system_venv, BASE, socket_unit=True)
    box.run("systemctl", "start", "mpd.socket", check=True)
    assert prop(box, "ActiveState") == "inactive"  # nothing runs until a client comes
    assert ping_inside(box, system_venv)  # the connection starts mpd.service
    assert prop(box, "ActiveState") == "active"
    activated = box.events("mpd.socket_activated")
    assert activated and activated[0]["port"] == 1990
    assert not box.events("mpd.socket_mismatch")
    box.run("systemctl", "stop", "mpd", check=True)


@needs_box
def test_exposure_level_is_low(box, system_venv):
    install(box, system_venv, BASE)
    out = box.run("systemd-analyze", "security", "mpd.service").stdout
    level = float(out.strip().splitlines()[-1].split("level for mpd.service:")[1].split()[0])
    assert level <= 1.5, out[-500:]


# --- without a box ----------------------------------------------------------------------------

class NotifySocket:
    """A NOTIFY_SOCKET that the test holds: every message mpd sends, with its arrival time."""

    def __init__(self, abstract: bool):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"mpd-test-{os.getpid()}-{time.monotonic_ns()}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self.dir = tempfile.mkdtemp()
            self.address = os.path.join(self.dir, "notify")
            self.sock.bind(self.address)
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def collect(self) -> list[tuple[float, dict[str, str]]]:
        while True:
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                return self.messages
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append((time.monotonic(), fields))

    def wait_for(self, key: str, value: str | None = None, after: int = 0) -> int:
        def found() -> int | None:
            for i, (_, fields) in enumerate(self.collect()[after:], after):
                if key in fields and (value is None or fields[key] == value):
                    return i + 1
            return None
        return wait_until(found, what=f"{key}={value} on NOTIFY_SOCKET")


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_sd_notify_messages(tmp_path, abstract):
    notify = NotifySocket(abstract)
    env = {"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "400000"}
    server = Mpd(tmp_path, {"workers": {"workers": 2}}, env=env)
    try:
        ready_at = notify.wait_for("READY", "1")
        _, ready = notify.messages[ready_at - 1]
        assert ready["STATUS"] == "2/2 workers ready, 0 clients"
        assert int(ready["MAINPID"]) == server.pid
        # READY only after every worker is ready.
        assert len(server.events("worker.ready")) == 2
        # WATCHDOG=1 at half of WATCHDOG_USEC (0.2 s), from the master's loop.
        first = notify.wait_for("WATCHDOG", "1", after=ready_at)
        wait_until(lambda: sum("WATCHDOG" in m for _, m in notify.collect()) >= 6,
                   what="6 watchdog pings")
        times = [t for t, m in notify.messages if "WATCHDOG" in m]
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert all(0.1 < g < 0.4 for g in gaps), gaps
        # STATUS follows the clients (at most once a second).
        client = server.connect()
        client.sendall(b"x\0")
        assert recv_exact(client, len(REPLY)) == REPLY
        notify.wait_for("STATUS", "2/2 workers ready, 1 clients", after=first)
        # Reload: RELOADING=1 with MONOTONIC_USEC, then READY=1.
        mark = len(notify.collect())
        server.signal(signal.SIGHUP)
        reloading = notify.wait_for("RELOADING", "1", after=mark)
        usec = int(notify.messages[reloading - 1][1]["MONOTONIC_USEC"])
        assert abs(usec / 1e6 - time.clock_gettime(time.CLOCK_MONOTONIC)) < 5
        notify.wait_for("READY", "1", after=reloading)
        # Stop: STOPPING=1.
        client.close()
        server.signal(signal.SIGTERM)
        notify.wait_for("STOPPING", "1", after=reloading)
        assert server.wait_exit() == 0
    finally:
        server.stop()
        notify.sock.close()


def test_a_stuck_master_loop_stops_the_watchdog(tmp_path):
    notify = NotifySocket(abstract=True)
    server = Mpd(tmp_path, {"workers": {"workers": 1}},
                 env={"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "200000"})
    try:
        notify.wait_for("WATCHDOG", "1")
        os.kill(server.pid, signal.SIGSTOP)  # the master's loop can no longer run
        notify.collect()
        stopped_at = time.monotonic()
        time.sleep(0.5)  # an interval in which no ping may arrive, not a wait for one
        notify.collect()
        assert not [t for t, m in notify.messages if "WATCHDOG" in m and t > stopped_at + 0.05]
        os.kill(server.pid, signal.SIGCONT)
        count = sum("WATCHDOG" in m for _, m in notify.messages)
        wait_until(lambda: sum("WATCHDOG" in m for _, m in notify.collect()) > count,
                   what="watchdog pings again")
    finally:
        os.kill(server.pid, signal.SIGCONT)
        server.stop()
        notify.sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate is not installed")
def test_socket_activation_with_systemd_socket_activate(tmp_path):
    port = free_port()
    config = tmp_path / "mpd.toml"
    config.write_text(toml_config({"server": {"port": 1990, "user": ME},
                                   "workers": {"workers": 2},
                                   "control": {"socket": str(tmp_path / "mpd.sock")}}))
    log = open(tmp_path / "mpd.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(["systemd-socket-activate", "-l", f"127.0.0.1:{port}",
                             sys.executable, "-m", "mpd.cli", "--config", str(config)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                            start_new_session=True)
    try:
        sock = wait_until(lambda: _try_connect(port), what="systemd-socket-activate listening")
        sock.sendall(b"ping\0")
        assert recv_exact(sock, len(REPLY)) == REPLY
        sock.close()
        events = [json.loads(line) for line in (tmp_path / "mpd.log").read_text().splitlines()
                  if line.startswith("{")]
        activated = [e for e in events if e["event"] == "mpd.socket_activated"]
        assert activated and activated[0]["port"] == port
        mismatch = [e for e in events if e["event"] == "mpd.socket_mismatch"]
        assert mismatch and mismatch[0]["config_port"] == 1990  # the config said 1990
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
        log.close()


def _try_connect(port: int) -> socket.socket | None:
    try:
        return socket.create_connection(("127.0.0.1", port), timeout=10)
    except ConnectionRefusedError:
        return None


def test_daemon_mode_detaches_writes_a_pidfile_and_stops_by_it(tmp_path):
    pidfile = tmp_path / "run" / "mpd.pid"
    logfile = tmp_path / "mpd.log"
    config = tmp_path / "mpd.toml"
    port = free_port()
    config.write_text(toml_config({
        "server": {"port": port, "user": ME}, "workers": {"workers": 2},
        "control": {"socket": str(tmp_path / "mpd.sock")},
        "log": {"target": "file", "file": str(logfile)},
        "daemon": {"pidfile": str(pidfile)}}))
    start = subprocess.run([sys.executable, "-m", "mpd.cli", "--daemon", "--config",
                            str(config)], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert start.returncode == 0, start.stderr
    pid = int(wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(),
                         what="the pidfile"))
    try:
        assert pid_alive(pid)
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read().rsplit(")", 1)[1].split()
        assert int(stat[1]) != os.getpid()  # detached: not our child
        assert int(stat[3]) != os.getsid(0)  # nor in our session (no controlling tty)
        sock = wait_until(lambda: _try_connect(port), what="the daemon serving")
        sock.sendall(b"ping\0")
        assert recv_exact(sock, len(REPLY)) == REPLY
        sock.close()
        wait_until(lambda: '"mpd.ready"' in logfile.read_text(), what="mpd.ready in the file")
        second = subprocess.run([sys.executable, "-m", "mpd.cli", "--daemon", "--config",
                                 str(config)], capture_output=True, text=True, timeout=30,
                                cwd=ROOT)
        assert second.returncode == 69
        assert f"pid {pid} holds {pidfile}" in second.stderr
        assert pid_alive(pid)
        os.kill(int(pidfile.read_text()), signal.SIGTERM)
        wait_until(lambda: not pid_alive(pid), timeout=15, what="the daemon gone")
        assert not pidfile.exists()
        assert '"mpd.stopped"' in logfile.read_text()
    finally:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


@needs_box
def test_mpdctl_upgrade_under_systemd_keeps_the_unit_active(box, system_venv):
    install(box, system_venv, BASE)
    box.run("systemctl", "start", "mpd", check=True)
    main_pid = prop(box, "MainPID")
    before = {w["pid"] for w in mpdctl_status(box, system_venv)["workers"]}
    # The new version, installed over the old one (inside the box only: its / is an overlay).
    init = next(system_venv.glob("lib/python3*/site-packages/mpd/__init__.py"))
    box.run("sed", "-i", 's/^__version__ = .*/__version__ = "99.1.0"/', str(init), check=True)
    states: list[str] = []
    watching = [True]

    def watch() -> None:
        while watching[0]:
            states.append(prop(box, "ActiveState"))

    import threading

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    result = box.run(f"{system_venv}/bin/mpdctl", "upgrade", timeout=90)
    watching[0] = False
    watcher.join(30)
    assert result.returncode == 0, result.stderr + result.stdout
    status = mpdctl_status(box, system_venv)
    assert status["master"]["version"] == "99.1.0"
    assert {w["version"] for w in status["workers"]} == {"99.1.0"}
    assert not before & {w["pid"] for w in status["workers"]}
    assert prop(box, "MainPID") == main_pid and prop(box, "NRestarts") == "0"
    assert set(states) <= {"active", "reloading"} and prop(box, "ActiveState") == "active"
    assert ping_inside(box, system_venv)
    assert [e["event"] for e in box.events() if e["event"].startswith("upgrade.")][-1] \
        == "upgrade.done"
