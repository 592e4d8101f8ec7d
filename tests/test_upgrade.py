"""Upgrade in place: `mpdctl upgrade` (or SIGUSR2) runs the code now on disk in the same
master process, and every live connection moves to a new-code worker. Each test runs mpd
from its own copy of the package, the "installed" code that the test then changes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import (
    M_PING,
    REPLY,
    ROOT,
    Mpd,
    Pingers,
    pid_alive,
    random_keys,
    recv_exact,
    slot_pids,
    wait_until,
)

from mpd import ctl


@pytest.fixture
def installed(tmp_path: Path) -> Path:
    """A copy of the mpd package that mpd runs from, as pip would have installed it."""
    home = tmp_path / "installed"
    shutil.copytree(ROOT / "mpd", home / "mpd", ignore=shutil.ignore_patterns("__pycache__"))
    return home


def set_version(home: Path, version: str) -> None:
    init = home / "mpd" / "__init__.py"
    text = init.read_text()
    start = text.index("__version__ = ")
    end = text.index("\n", start)
    init.write_text(text[:start] + f'__version__ = "{version}"' + text[end:])


def mpdctl(server, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mpd.ctl", "--socket",
                           str(server.tmp / "mpd.sock"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def status(server) -> dict:
    result = mpdctl(server, "--json", "status")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


class Stream(threading.Thread):
    """Connect, ping, close, over and over: counts what succeeded and what did not."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port = port
        self.halt = threading.Event()
        self.done = 0
        self.errors: list[Exception] = []

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
                    sock.sendall(M_PING)
                    assert recv_exact(sock, len(REPLY)) == REPLY
                self.done += 1
            except Exception as e:  # noqa: BLE001 - the test reads them
                self.errors.append(e)

    def stop(self) -> list[Exception]:
        self.halt.set()
        self.join(15)
        return self.errors


def test_upgrade_under_load_moves_every_connection_to_new_code(mpd_factory, installed):
    server = mpd_factory({"workers": {"workers": 4}}, cwd=installed)
    before = status(server)
    old_pids = {w["pid"] for w in before["workers"]}
    pingers = Pingers(server.port, random_keys(200, seed=15))
    stream = Stream(server.port)
    stream.start()
    pingers.wait_progress("200 clients pinging")
    set_version(installed, "99.0.0")
    result = mpdctl(server, "upgrade")
    assert result.returncode == 0, result.stderr
    assert "generation 2" in result.stdout
    after = status(server)
    assert after["master"]["pid"] == server.pid and after["master"]["version"] == "99.0.0"
    assert after["master"]["generation"] == 2
    assert {w["version"] for w in after["workers"]} == {"99.0.0"}
    assert {w["generation"] for w in after["workers"]} == {2}
    assert not old_pids & {w["pid"] for w in after["workers"]}
    for pid in old_pids:  # every old worker is gone: what still serves is new code
        wait_until(lambda p=pid: not pid_alive(p), what=f"old worker {pid} gone")
    pingers.wait_progress("every connection served after the upgrade")
    assert pingers.stop() == [None] * 200  # none reset, refused, lost or out of order
    assert stream.stop() == [] and stream.done > 0
    steps = [e["event"] for e in server.events() if e["event"].startswith("upgrade.")]
    assert steps == ["upgrade.started", "upgrade.exec", "upgrade.adopted",
                     *["upgrade.slot_replaced"] * 4, "upgrade.done"]
    assert server.proc.poll() is None


def test_sigusr2_upgrades_too(mpd_factory, installed):
    server = mpd_factory({"workers": {"workers": 2}}, cwd=installed)
    set_version(installed, "99.0.1")
    server.signal(signal.SIGUSR2)
    server.wait_event("upgrade.done", timeout=30)
    assert {w["version"] for w in status(server)["workers"]} == {"99.0.1"}


@pytest.mark.parametrize("breakage", ["import", "config"])
def test_a_new_version_that_fails_its_preflight_changes_nothing(mpd_factory, installed,
                                                                breakage):
    server = mpd_factory({"workers": {"workers": 2}}, cwd=installed)
    before = status(server)
    pingers = Pingers(server.port, random_keys(20, seed=16))
    set_version(installed, "99.0.2")
    if breakage == "import":
        (installed / "mpd" / "roll.py").write_text("def broken(:\n")
        expected = "SyntaxError"
    else:
        server.config_path.write_text("[workers]\nworkers = 'many'\n")
        expected = "workers.workers"
    result = mpdctl(server, "upgrade")
    assert result.returncode == ctl.EXIT_ERROR
    assert "pre-flight" in result.stderr and expected in result.stderr, result.stderr
    after = status(server)
    assert after["master"]["version"] == before["master"]["version"]
    assert after["workers"] == [{**w, "heartbeat_age": a["heartbeat_age"],
                                 "uptime": a["uptime"], **{k: a[k] for k in STATS}}
                                for w, a in zip(before["workers"], after["workers"])]
    assert after["master"]["upgrade"]["state"] == "failed"
    assert not server.events("upgrade.exec")
    pingers.wait_progress("clients still served")
    assert pingers.stop() == [None] * 20


STATS = ("clients", "accepted", "requests", "handoffs_out", "adopted", "refused")


def test_a_second_upgrade_while_one_runs_is_refused(mpd_factory, installed):
    server = mpd_factory({"workers": {"workers": 1}}, cwd=installed)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(server.tmp / "mpd.sock"))
        sock.sendall(b'{"version": 1, "command": "upgrade"}\n' * 2)  # read in one go
        replies = b""
        while replies.count(b"\n") < 2:
            replies += sock.recv(65536)
    first, second = (json.loads(line) for line in replies.splitlines())
    assert first["ok"] and first["generation"] == 2
    assert not second["ok"] and "already running" in second["error"]
    server.wait_event("upgrade.done", timeout=30)


def test_a_new_worker_that_cannot_start_stops_the_roll(mpd_factory, installed, tmp_path):
    crash = tmp_path / "crash"
    server = mpd_factory({"workers": {"workers": 2}}, cwd=installed,
                         env={"MPD_TEST_CRASH_FILE": str(crash)})
    old = {w["slot"]: w["pid"] for w in status(server)["workers"]}
    pingers = Pingers(server.port, random_keys(20, seed=17))
    set_version(installed, "99.0.3")
    crash.touch()  # every worker that starts now exits at once (exit code 3)
    result = mpdctl(server, "upgrade")
    assert result.returncode == ctl.EXIT_ERROR
    assert "slot 0 exited before it was ready" in result.stderr
    now = status(server)
    assert now["master"]["version"] == "99.0.3"  # the master runs the new code...
    assert {w["slot"]: w["pid"] for w in now["workers"]} == old  # ...the old workers serve
    assert {w["generation"] for w in now["workers"]} == {1}
    pingers.wait_progress("clients still served")
    crash.unlink()
    retry = mpdctl(server, "upgrade")  # once the new workers can start, it completes
    assert retry.returncode == 0, retry.stderr
    assert {w["generation"] for w in status(server)["workers"]} == {3}
    pingers.wait_progress("clients served by the new workers")
    assert pingers.stop() == [None] * 20


def test_single_process_mode_refuses_to_upgrade_in_place(mpd_factory, installed):
    server = mpd_factory({"workers": {"workers": 0}}, cwd=installed)
    server.signal(signal.SIGUSR2)
    refused = server.wait_event("upgrade.failed")
    assert "single-process mode" in refused["error"]
    with server.connect() as sock:  # and it serves on
        sock.sendall(M_PING)
        assert recv_exact(sock, len(REPLY)) == REPLY


def test_the_state_carries_workers_queued_messages_and_held_clients(tmp_path):
    """What crosses the exec, on real sockets: capture() in one master, a JSON round trip
    (the memfd), restore() into another; every fd is the same open socket after."""
    import selectors as selectors_mod

    from mpd.apps import loader
    from mpd.config import schema as configmod
    from mpd.master import upgradestate
    from mpd.master.broker import HeldClient
    from mpd.master.master import Master
    from mpd.master.slots import WorkerProc
    from mpd.ops.agent import AgentServer, open_socket
    from mpd.ops.control import ControlServer
    from mpd.ops.socketfile import SocketFile
    from mpd.wire import messages as msg
    from mpd.wire.channel import Channel
    from mpd.worker.worker import run_worker

    config = configmod.parse("[workers]\nworkers = 2\n", str(tmp_path / "mpd.toml"))
    app = loader.from_config(config)
    listener = socket.create_server(("127.0.0.1", 0))
    control_file = SocketFile(str(tmp_path / "mpd.sock"), 0o660, "")
    control_sock = control_file.bind()
    old = Master(config, app, listener, control_sock, control_file=control_file,
                 worker_main=run_worker)
    selector = selectors_mod.DefaultSelector()
    old.control = ControlServer(control_sock, control_file, selector, lambda r: r,
                                lambda u, g: None)
    agent_sock = open_socket("127.0.0.1", 0)
    old.agent = AgentServer(agent_sock, selector, lambda: "up ready 100%")
    ours, theirs = Channel.pair()
    # A worker of the release before (channel version 2), adopted by an earlier upgrade.
    worker = WorkerProc(slot=1, pid=4_000_001, channel=Channel(ours, "slot 1", version=2),
                        state="ready", stats={"clients": 3}, version="1.0")
    old.slots.add(worker)
    worker.channel.queue.append((b"queued", []))  # not yet sent when the exec comes
    held_ours, held_theirs = socket.socketpair()
    client = msg.Client(msg.Kind.HANDOFF, 7, 7, b"M\0", sent_ns=1, epoch=1)
    client.fds = [held_ours.detach()]
    old.broker.held.append(HeldClient(client))
    state, fds = upgradestate.capture(old)
    state = json.loads(json.dumps(state))  # as the memfd carries it
    assert set(fds) == {listener.fileno(), control_sock.fileno(), ours.fileno(),
                        *old.broker.held_fds(), agent_sock.fileno()}
    address, agent_address = listener.getsockname(), agent_sock.getsockname()
    # The new image owns these fds now: the old objects must not close them again (by then
    # the numbers may be another socket's).
    for sock in (listener, control_sock, ours, agent_sock):
        sock.detach()
    new = Master(upgradestate.config_of(state), app, *upgradestate.sockets_of(state),
                 upgradestate.agent_socket_of(state), worker_main=run_worker)
    upgradestate.restore(new, state)
    assert new.generation == 2 and new.started == old.started
    adopted = new.slots.serving[1]
    assert (adopted.pid, adopted.state, adopted.stats, adopted.version, adopted.generation) \
        == (4_000_001, "ready", {"clients": 3}, "1.0", 1)
    assert adopted.channel.version == 2  # it is spoken to as it speaks
    assert adopted.channel.flush()  # the queued message goes out on the same socket
    assert theirs.recv(100) == b"queued"
    (held,) = new.broker.held
    assert (held.client.key, held.client.unread, held.client.epoch) == (7, b"M\0", 1)
    os.write(held.client.fds[0], b"x")  # the held client's fd is the same connection
    assert held_theirs.recv(1) == b"x"
    assert new.listener.getsockname() == address
    new_agent, new_control = new.sockets["agent"], new.sockets["control"]
    assert new_agent is not None and new_agent.getsockname() == agent_address
    for sock in (theirs, held_theirs, new.listener, new_control, new_agent):
        sock.close()
    os.close(held.client.fds[0])
    adopted.channel.close()
    selector.close()


# --- the agent-check port, and an upgrade from the release before -----------------------------

PREVIOUS_RELEASE = "774f03a"  # the release before applications: channel 2, state 1, ping


def listening_inode(port: int) -> str:
    """The inode of the socket listening on 127.0.0.1:port (/proc/net/tcp)."""
    wanted = f"0100007F:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == wanted and fields[3] == "0A":  # 0A: LISTEN
            return fields[9]
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


def ask_agent(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        data = b""
        while chunk := sock.recv(100):
            data += chunk
    return data.decode()


def test_an_upgrade_keeps_the_agent_port_it_inherits(mpd_factory, installed):
    from haproxy_support import free_port

    agent = free_port()
    server = mpd_factory({"workers": {"workers": 2},
                          "agent": {"listen": f"127.0.0.1:{agent}"}}, cwd=installed)
    inode = listening_inode(agent)
    assert ask_agent(agent) == "up ready 100%\n"
    set_version(installed, "99.0.4")
    result = mpdctl(server, "upgrade")
    assert result.returncode == 0, result.stderr
    assert listening_inode(agent) == inode  # the same socket: never closed, never rebound
    assert ask_agent(agent) == "up ready 100%\n"
    assert not server.events("agent.failed")


def test_the_agent_says_drain_while_an_upgrade_runs(mpd_factory, installed):
    """HAProxy sends new clients elsewhere while the host upgrades (its live ones stay)."""
    import threading

    from haproxy_support import free_port

    agent = free_port()
    server = mpd_factory({"workers": {"workers": 1},
                          "agent": {"listen": f"127.0.0.1:{agent}"}}, cwd=installed)
    set_version(installed, "99.0.6")
    with open(installed / "mpd" / "master" / "upgrade.py", "a") as slow:  # a 1.5 s pre-flight
        slow.write("\nimport time as _time\n_time.sleep(1.5)\n")
    done: list[subprocess.CompletedProcess] = []
    upgrading = threading.Thread(target=lambda: done.append(mpdctl(server, "upgrade")))
    upgrading.start()
    wait_until(lambda: ask_agent(agent) == "drain\n", what="the agent says drain")
    upgrading.join(60)
    assert done and done[0].returncode == 0, done
    assert ask_agent(agent) == "up ready 100%\n"


def previous_release(home: Path) -> None:
    """The mpd package of PREVIOUS_RELEASE, from git, as pip would have installed it."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed: the previous release's code comes from it")
    found = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e",
                            f"{PREVIOUS_RELEASE}^{{commit}}"], capture_output=True)
    if found.returncode != 0:
        pytest.skip(f"commit {PREVIOUS_RELEASE} (the previous release) is not in this "
                    "checkout's history (a shallow clone?)")
    shutil.rmtree(home / "mpd")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", PREVIOUS_RELEASE, "mpd"],
                             capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(home)], input=archive.stdout, check=True)


def test_an_upgrade_from_the_release_before(tmp_path, installed):
    """Its workers speak channel version 2 (a flat layout of modules, the ping protocol
    alone, no client state) and its master writes state version 1: the new master reads
    that state, speaks version 2 to the old workers until the roll has replaced them, and
    every live client moves."""
    from haproxy_support import free_port

    previous_release(installed)
    agent = free_port()
    server = Mpd(tmp_path, {"workers": {"workers": 3},
                            "agent": {"listen": f"127.0.0.1:{agent}"}}, cwd=installed)
    try:
        upgrade_from_the_previous_release(server, installed, agent)
    finally:
        server.stop()


def upgrade_from_the_previous_release(server: Mpd, installed: Path, agent: int) -> None:
    assert ask_agent(agent).startswith("up ready ")
    pingers = Pingers(server.port, random_keys(60, seed=25))
    stream = Stream(server.port)
    stream.start()
    pingers.wait_progress("60 clients pinging")
    shutil.rmtree(installed / "mpd")
    shutil.copytree(ROOT / "mpd", installed / "mpd",
                    ignore=shutil.ignore_patterns("__pycache__"))
    set_version(installed, "99.0.5")
    result = mpdctl(server, "upgrade")
    assert result.returncode == 0, result.stderr
    assert {w["version"] for w in status(server)["workers"]} == {"99.0.5"}
    pingers.wait_progress("every connection served after the upgrade")
    assert pingers.stop() == [None] * 60
    assert stream.stop() == [] and stream.done > 0
    assert ask_agent(agent).startswith("up ready ")  # the clients count until they are gone
    assert len(server.events("upgrade.slot_replaced")) == 3


def test_an_upgrade_keeps_the_metrics_port_and_every_counter(mpd_factory, installed):
    """The dead workers' totals, the restarts of a slot a scale-down removed and the
    latency histogram cross the exec: no counter goes backwards."""
    from haproxy_support import free_port
    from test_metrics import samples, scrape, traffic

    port = free_port()
    server = mpd_factory({"workers": {"workers": 2, "max_workers": 3},
                          "metrics": {"listen": f"127.0.0.1:{port}"}}, cwd=installed)
    inode = listening_inode(port)
    traffic(server, handoffs=30, pings=20)
    wait_until(lambda: status(server)["totals"]["requests"] == 50, what="50 requests")
    os.kill(slot_pids(server)[1], signal.SIGKILL)  # a restart, and a dead worker's counts
    wait_until(lambda: status(server)["master"]["ready"] == 2, what="slot 1 respawned")
    assert mpdctl(server, "scale", "1").returncode == 0  # slot 1's restart is retired
    counters = ("mpd_requests_total", "mpd_handoffs_in_total", "mpd_restarts_total",
                "mpd_accepted_connections_total", "mpd_handoff_latency_seconds_count")
    before = {k: samples(scrape(port)[2])[(k, ())] for k in counters}
    assert before["mpd_requests_total"] == 50 and before["mpd_restarts_total"] == 1
    set_version(installed, "99.0.5")
    result = mpdctl(server, "upgrade")
    assert result.returncode == 0, result.stderr
    assert listening_inode(port) == inode  # the same socket: never closed, never rebound
    after = wait_until(lambda: (s := samples(scrape(port)[2])) and {k: s[(k, ())]
                                                                   for k in counters},
                       what="a scrape of the new master")
    assert after == before
    assert not server.events("metrics.failed")


def test_mpdctl_top_goes_on_across_an_upgrade(mpd_factory, installed):
    server = mpd_factory({"workers": {"workers": 2}}, cwd=installed)
    top = subprocess.Popen([sys.executable, "-m", "mpd.ctl", "--socket",
                            str(server.tmp / "mpd.sock"), "top", "--frames", "12",
                            "--interval", "0.5"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, cwd=ROOT)
    set_version(installed, "99.0.6")
    result = mpdctl(server, "upgrade")
    assert result.returncode == 0, result.stderr
    out, err = top.communicate(timeout=60)
    assert top.returncode == 0, err
    versions = [line.split()[1] for line in out.splitlines() if line.startswith("mpd ")]
    assert len(versions) == 12 and versions[-1] == "99.0.6", out
