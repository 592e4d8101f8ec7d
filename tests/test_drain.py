"""The HAProxy agent check served by a real mpd's master (`[agent] listen`), and the drain
before a graceful stop: for agent.drain_delay the agent says `drain` while mpd goes on
serving and accepting, so HAProxy sends no new client before the listeners close."""

from __future__ import annotations

import datetime
import os
import signal
import socket
import subprocess
import sys

import pytest
from conftest import M_PING, ME, REPLY, ROOT, recv_exact, toml_config, wait_until
from haproxy_support import free_port


def ask(port: int) -> str:
    """What HAProxy's agent check does: connect, read the line to EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        data = b""
        while chunk := sock.recv(100):
            data += chunk
    return data.decode()


def settings(agent_port: int, drain_delay: float = 1.5, **workers: int) -> dict:
    return {"agent": {"listen": f"127.0.0.1:{agent_port}", "drain_delay": drain_delay},
            "workers": {"workers": 2, **workers}}


def served(port: int) -> socket.socket:
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    client.sendall(M_PING)
    assert recv_exact(client, len(REPLY)) == REPLY
    return client


def at(event: dict) -> datetime.datetime:
    return datetime.datetime.fromisoformat(event["ts"].rstrip("Z"))


def test_the_master_answers_the_agent_with_its_free_share(mpd_factory):
    agent = free_port()
    server = mpd_factory(settings(agent, max_clients=10))  # capacity: 2 x 10 clients
    assert ask(agent) == "up ready 100%\n"
    clients = [served(server.port) for _ in range(5)]
    # The count reaches the master with each worker's heartbeat (a second).
    wait_until(lambda: ask(agent) == "up ready 75%\n", what="75% free", timeout=10)
    for client in clients:
        client.close()
    wait_until(lambda: ask(agent) == "up ready 100%\n", what="100% free again", timeout=10)


def test_a_graceful_stop_drains_first_and_serves_meanwhile(mpd_factory):
    agent = free_port()
    server = mpd_factory(settings(agent, drain_delay=1.5))
    before = served(server.port)
    server.signal(signal.SIGTERM)
    wait_until(lambda: ask(agent) == "drain\n", what="the agent says drain")
    assert server.events("mpd.draining")[0]["drain_delay"] == 1.5
    assert not server.events("mpd.stopping")
    late = served(server.port)  # HAProxy may still send one before its next check
    before.sendall(M_PING)  # and the clients it has are served as ever
    assert recv_exact(before, len(REPLY)) == REPLY
    stopping = server.wait_event("mpd.stopping")
    for client in (before, late):  # closed at a frame boundary, as any graceful stop
        assert client.recv(1) == b""
        client.close()
    assert server.wait_exit() == 0
    waited = (at(stopping) - at(server.events("mpd.draining")[0])).total_seconds()
    assert waited >= 1.5
    with pytest.raises(OSError):
        ask(agent)  # gone with the master


def test_a_second_stop_while_draining_stops_at_once(mpd_factory):
    agent = free_port()
    server = mpd_factory(settings(agent, drain_delay=30))
    server.signal(signal.SIGTERM)
    server.wait_event("mpd.draining")
    server.signal(signal.SIGTERM)
    assert server.wait_event("mpd.halting")["reason"] == "quit"
    assert server.wait_exit(timeout=10) == 0
    assert not server.events("mpd.stopping")


def test_without_the_agent_a_graceful_stop_does_not_wait(mpd_factory):
    server = mpd_factory({"workers": {"workers": 1}, "agent": {"drain_delay": 30}})
    server.signal(signal.SIGTERM)
    assert server.wait_exit(timeout=10) == 0
    assert server.events("mpd.stopping") and not server.events("mpd.draining")


def test_an_agent_port_in_use_is_refused_at_start(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "mpd.toml"
        config.write_text(toml_config({"server": {"port": 0, "user": ME},
                                       "control": {"socket": str(tmp_path / "mpd.sock")},
                                       "agent": {"listen": f"127.0.0.1:{port}"},
                                       "log": {"format": "json"}}))
        run = subprocess.run([sys.executable, "-m", "mpd.cli", "--config", str(config)],
                             capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert run.returncode == 69
    assert (f"mpd: cannot listen on 127.0.0.1:{port} for the agent check: Address already "
            "in use") in run.stderr
    assert '"event": "agent.failed"' in run.stdout
    assert not os.path.exists(tmp_path / "mpd.sock")  # nothing left behind
