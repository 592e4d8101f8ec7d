"""Several hosts behind a real HAProxy (Debian's 2.6): the shipped config, the local
cluster that scripts/cluster builds from it (PROXY protocol v2 and the agent check on),
and what it promises as mpd's own logs tell it: key affinity across hosts, the real
client in every host's logs, a host that stops drained first, a host that joins taking
its share of keys and no more."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import struct
import tempfile
import threading
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    M_PING,
    REPLY,
    Pingers,
    build_seed_client,
    count_replies,
    pid_alive,
    recv_exact,
    run_seed_client,
    wait_until,
)
from haproxy_support import SHIPPED, Cluster, check_config, cluster_module, free_port
from haproxy_support import directives as config_directives

# --- the shipped config --------------------------------------------------------------------

def test_the_shipped_config_is_valid_haproxy(tmp_path: Path):
    check = check_config(SHIPPED.read_text(), tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "Configuration file is valid" in check.stdout


def directives(section: str) -> list[str]:
    """The directive lines of one section of the shipped config, comments stripped."""
    return config_directives(SHIPPED, section)


def test_the_shipped_config_keeps_the_measured_recipe():
    """DESIGN.md, "Several hosts": on 2.6 the key must be captured in a variable before
    the accept rules, and the backend balanced on that variable with a consistent hash."""
    front = directives("frontend mpd")
    assert "tcp-request inspect-delay 5s" in front
    set_key = next(i for i, d in enumerate(front)
                   if "set-var(txn.key) req.payload(1,4),hex" in d)
    first_accept = next(i for i, d in enumerate(front)
                        if d.startswith("tcp-request content accept"))
    assert set_key < first_accept
    assert "use_backend mpd_keyed if { var(txn.key) -m found }" in front
    keyed, any_ = directives("backend mpd_keyed"), directives("backend mpd_any")
    assert "balance hash var(txn.key)" in keyed and "hash-type consistent" in keyed
    assert "balance leastconn" in any_
    servers = [d for d in keyed if d.startswith("server ")]
    assert servers and all(re.search(r"\bid \d+ track mpd_any/", s) for s in servers)
    assert all("send-proxy-v2" in d for d in (keyed + any_) if d.startswith("default-server"))
    assert any("agent-check agent-port 1991" in d for d in any_)
    assert not any("agent" in d for d in keyed)  # its weights would move keys on the ring
    assert "tcp-check connect default" in any_  # so the check sends its PROXY header too


def test_the_shipped_health_check_speaks_the_ping_protocol():
    any_ = directives("backend mpd_any")
    sent = next(d for d in any_ if d.startswith("tcp-check send-binary")).split()[-1]
    expected = next(d for d in any_ if d.startswith("tcp-check expect binary")).split()[-1]
    assert bytes.fromhex(sent).startswith(b"M") and bytes.fromhex(sent).endswith(b"\0")
    assert bytes.fromhex(expected) == REPLY


# --- the cluster's config, generated from it --------------------------------------------------

@pytest.mark.parametrize("hosts", [1, 2, 4])
@pytest.mark.parametrize("proxy_protocol, agent", [(True, True), (False, False), (True, False)])
def test_every_cluster_layout_is_valid_haproxy(hosts, proxy_protocol, agent, tmp_path):
    cluster = cluster_module()
    layout = cluster.Layout(hosts, 2990, 2991, tmp_path, proxy_protocol, agent)
    text = cluster.haproxy_config(SHIPPED.read_text(), layout)
    check = check_config(text, tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr + text
    code = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    servers = [c for c in code if c.startswith("server ")]
    assert servers == [f"server mpd{k} 127.0.0.{k + 1}:2990 id {k}" for k in range(1, hosts + 1)] \
        + [f"server mpd{k} 127.0.0.{k + 1}:2990 id {k} track mpd_any/mpd{k}"
           for k in range(1, hosts + 1)]
    assert "bind 127.0.0.1:2990" in code
    assert f"stats socket {tmp_path / 'haproxy.sock'} mode 600 level admin" in code
    assert any("send-proxy-v2" in c for c in code) == proxy_protocol
    assert any("agent-check agent-port 2991 agent-inter 2s" in c for c in code) == agent
    assert not any(c.split()[:1] in (["chroot"], ["user"], ["group"], ["daemon"]) for c in code)


def test_the_cluster_keeps_the_shipped_front_end_rules(tmp_path):
    """One source of truth: the frontend of the generated config is the shipped one,
    but for its bind address."""
    cluster = cluster_module()
    text = cluster.haproxy_config(SHIPPED.read_text(),
                                  cluster.Layout(3, 2990, 2991, tmp_path))
    shipped = SHIPPED.read_text()
    front = shipped[shipped.index("frontend mpd"):shipped.index("# Keyless clients")]
    assert front.replace("bind :1990", "bind 127.0.0.1:2990") in text


def test_a_shipped_config_that_drifted_is_refused(tmp_path):
    cluster = cluster_module()
    template = SHIPPED.read_text().replace("    bind :1990\n", "")
    with pytest.raises(cluster.ClusterError) as error:
        cluster.haproxy_config(template, cluster.Layout(2, 2990, 2991, tmp_path))
    assert "has no line for: bind" in str(error.value)


# --- a real cluster -------------------------------------------------------------------------------

@pytest.fixture
def cluster() -> Iterator[Cluster]:
    # A short path: the control sockets inside must stay under 108 bytes.
    state = Path(tempfile.mkdtemp(prefix="mpdc-"))
    running = Cluster(state, free_port())
    yield running
    running.down()
    shutil.rmtree(state, ignore_errors=True)


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def test_cluster_up_status_down(cluster: Cluster):
    cluster.up(2, "--workers", "1")
    status = cluster.status()
    assert status["proxy_protocol"] and status["agent"]  # on by default
    assert [s["state"] for s in status["haproxy"]] == ["up"] * 4
    assert [(s["backend"], s["server"], s["address"]) for s in status["haproxy"]] == [
        ("mpd_any", "mpd1", f"127.0.0.2:{cluster.port}"),
        ("mpd_any", "mpd2", f"127.0.0.3:{cluster.port}"),
        ("mpd_keyed", "mpd1", f"127.0.0.2:{cluster.port}"),
        ("mpd_keyed", "mpd2", f"127.0.0.3:{cluster.port}")]
    assert [(h["address"], h["master"]["state"], h["master"]["ready"]) for h in status["hosts"]] \
        == [("127.0.0.2", "running", 1), ("127.0.0.3", "running", 1)]
    with connect(cluster.port) as client:  # a plain ping through HAProxy
        client.sendall(b"hello, client ping!\0")
        assert recv_exact(client, len(REPLY)) == REPLY
    shown = cluster.run("status")
    assert shown.returncode == 0, shown.stderr
    assert f"host 2: 127.0.0.3:{cluster.port}" in shown.stdout
    assert re.search(rf"mpd_keyed\s+mpd2\s+127\.0\.0\.3:{cluster.port}\s+up\s+ready", shown.stdout)
    assert "workers 1/1 ready" in shown.stdout  # mpdctl status of each host
    assert "(proxy protocol on, agent on)" in shown.stdout
    again = cluster.run("up", "2")
    assert again.returncode == 1 and "already up" in again.stderr
    pids = cluster.pids()
    assert len(pids) == 3
    cluster.down()
    assert not any(pid_alive(pid) for pid in pids)
    gone = cluster.run("status")
    assert gone.returncode == 1 and "no cluster is up" in gone.stderr


def key_frame(key: int) -> bytes:
    return b"C" + struct.pack("<i", key)


def bound_where(cluster: Cluster) -> dict[int, Counter]:
    """key -> Counter of (host, slot) over every client.bound the hosts logged: each
    connection of a keyed client is bound once, by the worker that serves it."""
    where: dict[int, Counter] = defaultdict(Counter)
    for k in range(1, cluster.hosts + 1):
        for event in cluster.events(k, "client.bound"):
            where[event["key"]][(k, event["slot"])] += 1
    return where


def test_keyed_clients_land_on_the_same_host_and_slot_on_every_reconnect(cluster: Cluster):
    cluster.up(3, "--workers", "2", "--log-level", "debug")
    keys = random.Random(16).sample(range(-2**31, 2**31), 1000)
    rounds = 3
    clients: Counter = Counter()  # (key, the client's own address and port)
    for _ in range(rounds):
        for key in keys:
            with connect(cluster.port) as client:
                client.sendall(key_frame(key) + b"Mping\0")
                assert recv_exact(client, len(REPLY)) == REPLY
                clients[(key, "{}:{}".format(*client.getsockname()))] += 1
    # Through HAProxy's PROXY v2 header, each host logged the real client, port and all.
    logged = Counter((e["key"], e["client"]) for k in range(1, 4)
                     for e in cluster.events(k, "client.bound"))
    assert logged == clients
    where = bound_where(cluster)
    assert sorted(where) == sorted(keys)
    moved = {key: places for key, places in where.items() if len(places) != 1}
    assert moved == {}, (f"{len(moved)} of {len(keys)} keys served in more than one "
                         f"place, e.g. {list(moved.items())[:3]}")
    assert all(sum(places.values()) == rounds for places in where.values())
    hosts = Counter(host for places in where.values() for host, _slot in places)
    assert set(hosts) == {1, 2, 3}
    assert min(hosts.values()) >= 0.15 * len(keys), hosts  # the hash spreads the keys
    slots = {place for places in where.values() for place in places}
    assert len(slots) == 6  # and mpd spreads each host's keys over its two slots


def test_a_client_straight_to_a_host_is_refused_with_a_clear_line(cluster: Cluster):
    """The hosts take PROXY headers from HAProxy's address (127.0.0.1) only: a client that
    skips HAProxy is closed at its first byte (from there) or at once (from elsewhere)."""
    cluster.up(1, "--workers", "1")
    with socket.create_connection((cluster.host_address(1), cluster.port), timeout=10) \
            as direct:
        direct.sendall(key_frame(5) + M_PING)
        assert direct.recv(100) == b""
    stranger = socket.socket()
    stranger.bind(("127.0.0.9", 0))
    with stranger:
        stranger.connect((cluster.host_address(1), cluster.port))
        stranger.settimeout(10)
        assert stranger.recv(100) == b""
    lines = wait_until(lambda: len(cluster.events(1, "client.proxy_rejected")) == 2
                       and cluster.events(1, "client.proxy_rejected"), what="two refusals")
    assert [(e["reason"], e["peer"].split(":")[0]) for e in lines] == [
        ("malformed", "127.0.0.1"), ("untrusted", "127.0.0.9")]
    assert lines[0]["error"].startswith("not a PROXY protocol header: the connection starts "
                                        "with b'C\\x05\\x00\\x00\\x00Mclient, pi'")
    assert "is not in server.proxy_from" in lines[1]["error"]
    with connect(cluster.port) as client:  # through HAProxy, all is well
        client.sendall(key_frame(5) + M_PING)
        assert recv_exact(client, len(REPLY)) == REPLY


def test_keyless_clients_are_spread_by_least_connections(cluster: Cluster):
    cluster.up(3, "--workers", "1")
    clients = [connect(cluster.port) for _ in range(30)]
    for client in clients:
        client.sendall(b"hello, client ping!\0")
        assert recv_exact(client, len(REPLY)) == REPLY
    sessions = {s["server"]: s["sessions"] for s in cluster.status()["haproxy"]
                if s["backend"] == "mpd_any"}
    assert sessions == {"mpd1": 10, "mpd2": 10, "mpd3": 10}
    for client in clients:
        client.close()


def test_the_seeds_mpclient2_is_hashed_by_its_key_through_haproxy(cluster: Cluster, tmp_path):
    """mpclient2 connects, then sends `C` and its key in two writes a second later: the
    inspect delay lets HAProxy wait for them. A client of ours with the same key must land
    on the same host: HAProxy hashed mpclient2's key rather than balancing by load."""
    mpclient2 = build_seed_client("mpclient2", tmp_path)
    cluster.up(3, "--workers", "1", "--log-level", "debug")
    output = run_seed_client([str(mpclient2), "127.0.0.1", str(cluster.port), "20", "1"],
                             lambda out: count_replies(out) >= 40, timeout=60)
    assert set(line for line in output if line.startswith("recv from")) == {
        "recv from server: hello, server ping!"}
    seed_keys = wait_until(lambda: len(bound_where(cluster)) >= 20 and bound_where(cluster),
                           what="mpclient2's 20 keys bound")
    assert len(seed_keys) == 20
    for key in seed_keys:
        with connect(cluster.port) as client:
            client.sendall(key_frame(key) + b"Mping\0")
            assert recv_exact(client, len(REPLY)) == REPLY
    for key, places in bound_where(cluster).items():
        assert len({host for host, _slot in places}) == 1, (key, places)


def test_a_host_that_dies_costs_its_keyed_clients_no_error(cluster: Cluster):
    """Before HAProxy's checks notice a dead host, a connection to it is refused; `retries`
    and `option redispatch` send it to another host, so the client sees no error. Its key
    moves (what is not guaranteed), the other keys stay."""
    cluster.up(3, "--workers", "1", "--log-level", "debug")
    keys = random.Random(3).sample(range(-2**31, 2**31), 90)

    def ping_all() -> None:
        for key in keys:
            with connect(cluster.port) as client:
                client.sendall(key_frame(key) + b"Mping\0")
                assert recv_exact(client, len(REPLY)) == REPLY

    ping_all()
    before = {key: next(iter(places))[0] for key, places in bound_where(cluster).items()}
    # HAProxy notices a dead host within two checks; stop host 1's checks so that the
    # window in which it has not noticed yet lasts the whole test.
    api = cluster_module().runtime_api
    assert api(cluster.state, "disable health mpd_any/mpd1").strip() == ""
    victim = cluster.pids()[1]  # host 1's master; its workers follow it (PDEATHSIG)
    workers = [int(p) for p in Path(f"/proc/{victim}/task/{victim}/children").read_text()
               .split()]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: not any(pid_alive(p) for p in [victim, *workers]), what="host 1 gone")
    ping_all()  # every client answered, by a host that is alive
    view = {(s["backend"], s["server"]): s for s in cluster.status()["haproxy"]}
    assert view[("mpd_keyed", "mpd1")]["state"] == "up"  # still, for HAProxy
    stat = api(cluster.state, "show stat").splitlines()
    columns = stat[0].lstrip("# ").split(",")
    rows = [dict(zip(columns, row.split(","))) for row in stat[1:] if row]
    redispatched = next(int(r["wredis"]) for r in rows
                        if (r["pxname"], r["svname"]) == ("mpd_keyed", "mpd1"))
    assert redispatched == sum(1 for key in keys if before[key] == 1)
    after: dict[int, int] = {}
    for key, places in bound_where(cluster).items():
        hosts = {host for host, _slot in places}
        after[key] = max(hosts - {before[key]}) if len(hosts) > 1 else before[key]
    moved = [key for key in keys if after[key] != before[key]]
    assert sorted(moved) == sorted(key for key in keys if before[key] == 1)
    assert all(after[key] != 1 for key in moved)


def test_a_cluster_that_cannot_start_says_why_and_leaves_nothing_running(cluster: Cluster):
    with socket.socket() as taken:  # host 2's address and port, taken
        taken.bind(("127.0.0.3", cluster.port))
        taken.listen()
        failed = cluster.run("up", "3", "--workers", "1")
    assert failed.returncode == 1
    assert "cluster: host 2 (127.0.0.3) did not start (exit 69)" in failed.stderr
    assert "Address already in use" in failed.stderr
    host1 = cluster.events(1, "mpd.stopped")  # started, then stopped by the clean-up
    assert len(host1) == 1
    assert not (cluster.state / "cluster.json").exists()


def test_haproxy_that_cannot_start_says_why_and_leaves_nothing_running(cluster: Cluster):
    with socket.socket() as taken:  # HAProxy's own address and port, taken
        taken.bind(("127.0.0.1", cluster.port))
        taken.listen()
        failed = cluster.run("up", "1", "--workers", "1")
    assert failed.returncode == 1
    assert "cluster: HAProxy exited at start" in failed.stderr
    assert "cannot bind socket" in failed.stderr
    assert len(cluster.events(1, "mpd.stopped")) == 1


# --- hosts that leave and join -----------------------------------------------------------------

class Rounds:
    """Where each key lands, as the hosts' own logs say (client.bound): one round is one
    connect-ping-close client per key, through HAProxy."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster

    def run(self, keys: list[int]) -> dict[int, int]:
        """key -> the host that served it in this round."""
        hosts = range(1, self.cluster.hosts + 1)
        marks = {k: len(self.cluster.events(k, "client.bound")) for k in hosts}
        for key in keys:
            with connect(self.cluster.port) as client:
                client.sendall(key_frame(key) + M_PING)
                assert recv_exact(client, len(REPLY)) == REPLY

        def placed() -> dict[int, int]:
            return {e["key"]: k for k in hosts
                    for e in self.cluster.events(k, "client.bound")[marks[k]:]}
        return wait_until(lambda: len(placed()) == len(keys) and placed(),
                          what=f"{len(keys)} keys bound")


class KeyedStream(threading.Thread):
    """New keyed clients, one after another (connect, key, ping, reply, close), through
    HAProxy; every failure is kept."""

    def __init__(self, port: int, keys: list[int]):
        super().__init__(daemon=True)
        self.port, self.keys = port, keys
        self.halt = threading.Event()
        self.done = 0
        self.errors: list[tuple[int, Exception]] = []

    def run(self) -> None:
        while not self.halt.is_set():
            key = self.keys[self.done % len(self.keys)]
            try:
                with connect(self.port) as client:
                    client.sendall(key_frame(key) + M_PING)
                    assert recv_exact(client, len(REPLY)) == REPLY
            except Exception as e:  # noqa: BLE001 - the test reads them
                self.errors.append((key, e))
            self.done += 1

    def stop(self) -> list[tuple[int, Exception]]:
        self.halt.set()
        self.join(30)
        return self.errors


def test_a_host_stopped_under_load_drains_first_then_its_keys_move_and_return(
        cluster: Cluster):
    cluster.up(3, "--workers", "1", "--log-level", "debug")
    keys = random.Random(17).sample(range(-2**31, 2**31), 600)
    rounds = Rounds(cluster)
    first = rounds.run(keys)
    assert set(first.values()) == {1, 2, 3}
    pingers = Pingers(cluster.port, keys[:30])  # long-lived clients on every host
    stream = KeyedStream(cluster.port, keys)  # and new ones all the while
    stream.start()
    pingers.wait_progress("30 clients pinging through HAProxy")
    host2 = cluster.host_pid(2)
    stopping = cluster.start_run("stop", "2")  # SIGTERM, as systemctl stop would
    # HAProxy hears `drain` from the agent while host 2 still serves: no new client
    # goes there, and the keyed backend (tracking) takes it off the hash ring.
    wait_until(lambda: cluster.servers()[("mpd_any", "mpd2")]["admin"] == "drain",
               what="HAProxy drains host 2", timeout=10)
    assert pid_alive(host2) and not cluster.events(2, "mpd.stopping")
    assert cluster.servers()[("mpd_keyed", "mpd2")]["admin"] == "drain"
    assert stopping.wait(timeout=60) == 0, stopping.stdout.read() if stopping.stdout else ""
    drained = cluster.events(2, "mpd.draining")
    assert drained and cluster.events(2, "mpd.stopped")
    errors = pingers.stop()
    # Host 2's long-lived clients were closed at a frame boundary; no one else's.
    assert [key for key, error in zip(keys[:30], errors) if error is not None] \
        == [key for key in keys[:30] if first[key] == 2]
    assert stream.stop() == [] and stream.done > 0  # no new client saw an error
    second = rounds.run(keys)
    assert not [key for key in keys if second[key] == 2]
    others = [key for key in keys if first[key] != 2]
    moved = [key for key in others if second[key] != first[key]]
    assert len(moved) <= 0.05 * len(others), f"{len(moved)} of {len(others)} keys moved"
    started = cluster.run("start", "2")
    assert started.returncode == 0, started.stdout + started.stderr
    third = rounds.run(keys)
    back = [key for key in keys if third[key] == first[key]]
    assert len(back) == len(keys), f"{len(keys) - len(back)} keys not back on their host"


def test_a_fourth_host_takes_about_a_quarter_of_the_keys(cluster: Cluster):
    cluster.up(3, "--workers", "1", "--log-level", "debug")
    keys = random.Random(18).sample(range(-2**31, 2**31), 800)
    rounds = Rounds(cluster)
    before = rounds.run(keys)
    added = cluster.run("add")
    assert added.returncode == 0, added.stdout + added.stderr
    cluster.hosts = 4
    assert {s["server"] for s in cluster.status()["haproxy"]} == {"mpd1", "mpd2", "mpd3",
                                                                "mpd4"}
    after = rounds.run(keys)
    moved = [key for key in keys if after[key] != before[key]]
    assert {after[key] for key in moved} == {4}  # keys move to the new host only
    share = len(moved) / len(keys)
    assert 0.25 / 1.5 <= share <= 0.25 * 1.5, f"{len(moved)} of {len(keys)} keys moved"
