"""Supervision under faults: respawn, back-off, hung workers, orphans, stop and reload."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime

import pytest
from conftest import (
    M_PING,
    REPLY,
    ROOT,
    Pingers,
    cpu_seconds,
    fd_count,
    key_frame,
    keys_owned_by,
    pid_alive,
    random_keys,
    recv_exact,
    slot_pids,
    wait_until,
)
from procfs import zombies_of

from mpd.master.slots import FLOOR_WAIT, Slots, WorkerProc


def ts(event: dict) -> float:
    return datetime.fromisoformat(event["ts"].replace("Z", "+00:00")).timestamp()


def test_sigkill_of_a_worker_spares_the_other_workers_clients(mpd_factory):
    server = mpd_factory({"workers": {"workers": 2}})
    server.wait_workers(2)
    victim = slot_pids(server)[1]
    pingers = Pingers(server.port, keys_owned_by(0, (0, 1), 50, seed=2))
    doomed = Pingers(server.port, keys_owned_by(1, (0, 1), 50, seed=3))
    pingers.wait_progress("pings flowing")
    os.kill(victim, signal.SIGKILL)
    exited = server.wait_event("worker.exited", worker_pid=victim)
    assert exited["signal"] == "SIGKILL"
    new_pid = server.wait_event("worker.spawned", worker_slot=1, count=2)["worker_pid"]
    ready = server.wait_event("worker.ready", worker_pid=new_pid)
    assert ts(ready) - ts(exited) < 1.0  # the slot serves again within a second
    pingers.wait_progress("slot 0's clients still pinging")
    assert pingers.stop() == [None] * 50
    assert None not in doomed.stop()  # they were the dead worker's
    with server.connect() as sock:  # and slot 1 serves new clients
        sock.sendall(key_frame(keys_owned_by(1, (0, 1), 1, seed=9)[0]) + M_PING)
        assert recv_exact(sock, len(REPLY)) == REPLY


def test_killing_every_worker_five_times_in_a_row(mpd_factory):
    server = mpd_factory({"workers": {"workers": 3}})
    for round_ in range(5):
        pids = server.wait_workers(3, timeout=15)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda p=pids: not set(p) & set(server.worker_pids()),
                   what=f"round {round_}: the killed workers reaped")
    assert pid_alive(server.pid)
    new = server.wait_workers(3, timeout=30)
    for pid in new:
        server.wait_event("worker.ready", worker_pid=pid, timeout=30)
    with server.connect() as sock:
        sock.sendall(M_PING)
        assert recv_exact(sock, len(REPLY)) == REPLY


def test_a_crash_looping_slot_backs_off_and_recovers(mpd_factory, tmp_path):
    crash = tmp_path / "crash"
    server = mpd_factory({"workers": {"workers": 1}}, env={"MPD_TEST_CRASH_FILE": str(crash)})
    first = server.wait_workers(1)[0]
    crash.touch()
    cpu_before = cpu_seconds(server.pid)
    wall_before = time.monotonic()
    os.kill(first, signal.SIGKILL)
    backoffs = [server.wait_event("worker.backoff", count=n, timeout=15) for n in (1, 2, 3, 4, 5)]
    delays = [e["delay"] for e in backoffs]
    assert delays == sorted(delays) and delays[-1] > delays[0], delays
    crashes = server.events("worker.exited", exit_code=3)
    assert len(crashes) >= 5
    # Spacing of the crashes grows with the delays: the master really waits.
    gaps = [ts(b) - ts(a) for a, b in zip(crashes, crashes[1:])]
    assert gaps[-1] >= delays[-2] * 0.9, (gaps, delays)
    cpu_used = cpu_seconds(server.pid) - cpu_before
    wall = time.monotonic() - wall_before
    assert cpu_used < 0.5 * wall, (cpu_used, wall)  # no spinning while backing off
    # The client of a key whose slot is backing off is not left waiting: single slot, so
    # it waits in the backlog until the slot recovers.
    crash.unlink()
    spawned = len(server.events("worker.spawned"))
    new_pid = server.wait_event("worker.spawned", count=spawned + 1, timeout=40)["worker_pid"]
    server.wait_event("worker.ready", worker_pid=new_pid, timeout=10)
    with server.connect() as sock:
        sock.sendall(M_PING)
        assert recv_exact(sock, len(REPLY)) == REPLY


def test_only_workers_that_never_served_back_off_and_never_below_a_floor():
    slots = Slots(2)
    other = WorkerProc(slot=0, pid=4_000_000, channel=None)  # type: ignore[arg-type]
    other.state = "ready"
    slots.add(other)
    assert slots.schedule_respawn(1, served=True, backoff_max=30) == 0
    assert slots.schedule_respawn(1, served=True, backoff_max=30) == 0  # killed, again
    failing = [slots.schedule_respawn(1, served=False, backoff_max=30) for _ in range(6)]
    assert failing == [0, 0.1, 0.2, 0.4, 0.8, 1.6]
    assert slots.backing_off(1, time.monotonic())
    assert slots.schedule_respawn(1, served=True, backoff_max=30) == 0  # it served: over
    assert slots.schedule_respawn(1, served=False, backoff_max=30) == 0
    # The floor: while no other slot serves, a failing slot waits FLOOR_WAIT at most.
    slots.remove(other.pid)
    failing = [slots.schedule_respawn(1, served=False, backoff_max=30) for _ in range(6)]
    assert failing == [0.1, 0.2, 0.4, 0.8, FLOOR_WAIT, FLOOR_WAIT]
    assert slots.history[1].restarts == 16


def test_a_backing_off_slot_does_not_hold_its_keys_clients(mpd_factory, tmp_path):
    crash = tmp_path / "crash"
    server = mpd_factory({"workers": {"workers": 2}, "log": {"level": "debug"}},
                         env={"MPD_TEST_CRASH_FILE": str(crash)})
    server.wait_workers(2)
    victim = slot_pids(server)[1]
    crash.touch()
    os.kill(victim, signal.SIGKILL)
    server.wait_event("worker.backoff", worker_slot=1)
    key = keys_owned_by(1, (0, 1), 1, seed=4)[0]
    with server.connect(timeout=10) as sock:
        sock.sendall(key_frame(key) + M_PING)
        assert recv_exact(sock, len(REPLY)) == REPLY  # served by the next slot: 0
    assert server.wait_event("fd.dispatched", key=key)["to_slot"] == 0
    crash.unlink()


def test_a_hung_worker_is_killed_and_replaced(mpd_factory, tmp_path):
    hang = tmp_path / "hang"
    server = mpd_factory({"workers": {"workers": 2, "worker_timeout": 1}},
                         env={"MPD_TEST_HANG_FILE": str(hang)})
    before = set(server.wait_workers(2))
    hang.touch()  # the next worker to tick hangs
    timeout = server.wait_event("worker.timeout", timeout=10)
    assert timeout["worker_pid"] in before and timeout["silent_for"] >= 1
    exited = server.wait_event("worker.exited", worker_pid=timeout["worker_pid"])
    assert exited["signal"] == "SIGKILL"
    new_pid = server.wait_event("worker.spawned", worker_slot=timeout["worker_slot"],
                                count=2)["worker_pid"]
    server.wait_event("worker.ready", worker_pid=new_pid)
    assert len(server.wait_workers(2)) == 2


def test_workers_die_with_their_master(mpd_factory):
    server = mpd_factory({"workers": {"workers": 3}})
    workers = server.wait_workers(3)
    os.kill(server.pid, signal.SIGKILL)
    server.proc.wait(5)
    wait_until(lambda: not any(pid_alive(p) for p in workers), timeout=2,
               what="every worker gone after the master's SIGKILL")


def test_sigterm_with_500_clients_exits_cleanly(mpd_factory):
    server = mpd_factory({"workers": {"workers": 2, "graceful_timeout": 5}})
    workers = server.wait_workers(2)
    clients = []
    for _ in range(500):
        sock = server.connect()
        clients.append(sock)
    for sock in clients[::10]:
        sock.sendall(M_PING)
        assert recv_exact(sock, len(REPLY)) == REPLY
    start = time.monotonic()
    server.signal(signal.SIGTERM)
    assert server.wait_exit(timeout=5 + 5) == 0
    assert time.monotonic() - start < 5 + 1
    assert not any(pid_alive(p) for p in workers)
    for sock in clients:
        assert sock.recv(10) == b""  # closed cleanly at a frame boundary
        sock.close()
    server.wait_event("mpd.stopped")


def test_sigquit_stops_at_once(mpd_factory):
    server = mpd_factory({"workers": {"workers": 2, "graceful_timeout": 60}})
    workers = server.wait_workers(2)
    busy = server.connect()
    busy.sendall(b"partial frame without its NUL")  # would hold a graceful stop
    server.signal(signal.SIGQUIT)
    assert server.wait_exit(timeout=10) == 0
    assert not any(pid_alive(p) for p in workers)
    busy.close()


def test_second_sigterm_makes_the_stop_immediate(mpd_factory):
    server = mpd_factory({"workers": {"workers": 1, "graceful_timeout": 60}})
    server.wait_workers(1)
    busy = server.connect()
    busy.sendall(M_PING)  # served: accepted before the stop begins
    assert recv_exact(busy, len(REPLY)) == REPLY
    busy.sendall(b"partial frame")  # keeps the worker from finishing
    server.signal(signal.SIGTERM)
    server.wait_event("mpd.stopping")
    server.signal(signal.SIGTERM)
    assert server.wait_exit(timeout=10) == 0
    assert server.events("mpd.halting")
    busy.close()


def test_reload_with_a_broken_config_keeps_serving(mpd_factory):
    server = mpd_factory({"workers": {"workers": 2}})
    workers = server.wait_workers(2)
    server.config_path.write_text("[workers]\nworkers = -3\n")
    server.signal(signal.SIGHUP)
    failed = server.wait_event("config.reload_failed")
    assert "workers.workers" in failed["error"] and ":2:" in failed["error"]
    assert server.worker_pids() == workers
    with server.connect() as sock:
        sock.sendall(M_PING)
        assert recv_exact(sock, len(REPLY)) == REPLY


@pytest.mark.parametrize("workers", [1, 0], ids=["master", "single-process"])
def test_reload_refuses_a_change_of_port(mpd_factory, workers):
    server = mpd_factory({"workers": {"workers": workers}})
    settings = dict(server.settings)
    settings["server"] = {"port": 1}
    server.write_config(settings)
    server.signal(signal.SIGHUP)
    assert "port" in server.wait_event("config.reload_failed")["error"]


def test_reload_changes_the_worker_count_without_dropping_clients(mpd_factory):
    server = mpd_factory({"workers": {"workers": 2}})
    server.wait_workers(2)
    pingers = Pingers(server.port, random_keys(40, seed=1))
    for count in (4, 1, 3):
        settings = dict(server.settings)
        settings["workers"] = {"workers": count}
        server.write_config(settings)
        server.signal(signal.SIGHUP)
        server.wait_event("config.reloaded", workers=count)
        server.wait_workers(count, timeout=15)
        pingers.wait_progress(f"every client pinging with {count} workers")
    assert pingers.stop() == [None] * 40


def signal_in_order(pid: int, sig: int) -> None:
    """Send `sig` and wait until it has been delivered (no longer pending): the kernel
    delivers pending signals by number, not by arrival, so the test orders them itself."""
    os.kill(pid, sig)

    def delivered() -> bool:
        with open(f"/proc/{pid}/status") as f:
            masks = [int(line.split()[1], 16) for line in f
                     if line.startswith(("SigPnd:", "ShdPnd:"))]
        return not any(mask & (1 << (sig - 1)) for mask in masks)
    wait_until(delivered, what=f"signal {sig} delivered")


def test_sigttin_and_sigttou_add_and_remove_one_worker(mpd_factory):
    server = mpd_factory({"workers": {"workers": 1, "max_workers": 2}})
    server.wait_workers(1)
    signal_in_order(server.pid, signal.SIGTTOU)  # never fewer than one
    signal_in_order(server.pid, signal.SIGTTIN)
    server.wait_workers(2)
    signal_in_order(server.pid, signal.SIGTTIN)  # never more than max_workers
    signal_in_order(server.pid, signal.SIGTTOU)
    server.wait_workers(1)
    scaled = [e["workers"] for e in server.events("worker.scaled")]
    assert scaled == [2, 1]
    refused = server.events("mpd.signal_refused")  # each says why, as mpdctl scale would
    assert [(e["signal"], e["error"]) for e in refused] == [
        ("SIGTTOU", "worker count 0 out of range: 1 to 2 (workers.max_workers)"),
        ("SIGTTIN", "worker count 3 out of range: 1 to 2 (workers.max_workers)")]


def test_reload_changes_max_clients_live(mpd_factory):
    server = mpd_factory({"workers": {"workers": 1, "max_clients": 2}})
    held = [server.connect() for _ in range(2)]
    for sock in held:
        sock.sendall(M_PING)
        assert recv_exact(sock, len(REPLY)) == REPLY
    server.wait_event("worker.accept_paused", reason="max_clients", clients=2)
    third = server.connect()  # queued in the backlog: the worker is full
    third.sendall(M_PING)
    settings = dict(server.settings)
    settings["workers"] = {"workers": 1, "max_clients": 3}
    server.write_config(settings)
    server.signal(signal.SIGHUP)
    server.wait_event("config.reloaded")
    assert recv_exact(third, len(REPLY)) == REPLY  # the worker took the new limit
    held.append(third)
    # Lowered below what it serves: nobody is dropped, and no one new gets in until
    # the worker is under the new limit (under the old one, a free place would do).
    settings["workers"] = {"workers": 1, "max_clients": 1}
    server.write_config(settings)
    server.signal(signal.SIGHUP)
    server.wait_event("config.reloaded", count=2)
    for sock in held:
        sock.sendall(M_PING)
        assert recv_exact(sock, len(REPLY)) == REPLY
    fourth = server.connect()
    fourth.sendall(M_PING)
    held.pop().close()  # 2 clients: under the old limit of 3, not under the new one
    fourth.settimeout(0.5)  # the bounded negative check
    with pytest.raises(socket.timeout):
        fourth.recv(len(REPLY))
    for sock in held:
        sock.close()
    fourth.settimeout(10)
    assert recv_exact(fourth, len(REPLY)) == REPLY  # 0 clients: the worker accepts again
    fourth.close()


class StallMeter(threading.Thread):
    """A client that keeps asking, each time on a new connection with a key of its own:
    connect, key frame, ping, reply. A connection that its killed worker takes down is
    tried again at once; the stall is the time from the first try to the reply."""

    def __init__(self, port: int, keys: list[int]):
        super().__init__(daemon=True)
        self.port, self.keys = port, keys
        self.halt = threading.Event()
        self.longest = 0.0
        self.exchanges = self.retries = 0
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.halt.is_set():
            key = self.keys[self.exchanges % len(self.keys)]
            start = time.monotonic()
            while not self.exchange(key):
                self.retries += 1
                if time.monotonic() - start > 10:
                    self.errors.append(f"key {key}: no reply for 10 s")
                    return
            self.longest = max(self.longest, time.monotonic() - start)
            self.exchanges += 1

    def exchange(self, key: int) -> bool:
        """True when answered; False when the connection died under it (its worker was
        killed); anything else is an error."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
                sock.sendall(key_frame(key) + M_PING)
                reply = recv_exact(sock, len(REPLY))
        except ConnectionRefusedError as e:  # the door was shut
            self.errors.append(f"key {key}: {e!r}")
            return True
        except ConnectionError:  # reset, or closed before the reply
            return False
        except OSError as e:  # timed out
            self.errors.append(f"key {key}: {e!r}")
            return True
        if reply != REPLY:
            self.errors.append(f"key {key}: {reply!r}")
        return True


def test_chaos_kills_never_stall_clients_and_leave_a_clean_tree(mpd_factory):
    """A random worker killed every 0.3-1 s for 30 s: a worker that served is replaced at
    once, so no client waits long, and the tree is clean after."""
    seconds = float(os.environ.get("MPD_CHAOS_SECONDS", "30"))
    server = mpd_factory({"workers": {"workers": 4}})
    for pid in server.wait_workers(4):
        server.wait_event("worker.ready", worker_pid=pid)
    base_fds = fd_count(server.pid)
    rng = random.Random(42)
    meters = [StallMeter(server.port, random_keys(50, seed=n)) for n in range(4)]
    for meter in meters:
        meter.start()
    deadline = time.monotonic() + seconds
    kills = 0
    while time.monotonic() < deadline:
        time.sleep(rng.uniform(0.3, 1.0))  # the chaos pace, not a wait for a condition
        pids = server.worker_pids()
        if pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(rng.choice(pids), signal.SIGKILL)
                kills += 1
    for meter in meters:
        meter.halt.set()
    for meter in meters:
        meter.join(30)
    assert kills > seconds
    assert [e for m in meters for e in m.errors] == []
    assert all(m.exchanges > 100 for m in meters), [m.exchanges for m in meters]
    longest = max(m.longest for m in meters)
    print(f"longest {longest:.3f} s, kills {kills}, exchanges {[m.exchanges for m in meters]}, "
          f"retries {[m.retries for m in meters]}")
    assert longest < 1.0, f"a client waited {longest:.2f} s"
    assert pid_alive(server.pid)
    # The last kill may be a zombie for the moment the master takes to reap it (a zombie
    # is still a child, so it would count among the 4): every one reaped, within a bound.
    wait_until(lambda: zombies_of(server.pid) == [], what="every killed worker reaped")
    for pid in server.wait_workers(4, timeout=10):
        server.wait_event("worker.ready", worker_pid=pid)
    wait_until(lambda: fd_count(server.pid) == base_fds, what=f"master back to {base_fds} fds")
    assert zombies_of(server.pid) == []


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_the_masters_memory_stays_flat_over_respawns(mpd_factory):
    server = mpd_factory({"workers": {"workers": 4, "backoff_max": 0.1}})

    def respawn_every_worker(rounds: int) -> None:
        for _ in range(rounds):
            pids = server.wait_workers(4, timeout=15)
            for pid in pids:  # each has served: its death is no crash loop
                server.wait_event("worker.ready", worker_pid=pid)
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            wait_until(lambda p=pids: not set(p) & set(server.worker_pids()),
                       what="the killed workers reaped")

    respawn_every_worker(25)  # warm-up: 100 respawns
    before = rss_kib(server.pid)
    respawn_every_worker(75)  # 300 more
    server.wait_workers(4)
    grown = rss_kib(server.pid) - before
    assert grown < 1024, f"the master grew by {grown} KiB over 300 respawns"


def test_a_scale_down_is_no_channel_error(mpd_factory):
    server = mpd_factory({"workers": {"workers": 1, "max_workers": 4}})
    for round_ in range(3):
        for _ in range(3):
            signal_in_order(server.pid, signal.SIGTTIN)
        server.wait_workers(4)
        for _ in range(3):
            signal_in_order(server.pid, signal.SIGTTOU)
        server.wait_workers(1)
        server.wait_event("worker.exited", count=3 * (round_ + 1))
    # A retiring worker may end before the master's last messages reach it: expected.
    assert [e for e in server.events("channel.error") if e["level"] != "debug"] == []


def test_a_bug_in_handling_a_message_or_a_signal_does_not_end_the_master(mpd_factory):
    server = mpd_factory({"workers": {"workers": 2}},
                         env={"MPD_TEST_FAULT": "master.stats,master.reload"})
    error = server.wait_event("channel.error", kind="STATS")  # every heartbeat meets it
    assert "simulated bug at master.stats" in error["error"] and error["worker_pid"]
    assert "Traceback" in error["exception"]
    server.signal(signal.SIGHUP)
    error = server.wait_event("loop.error", where="signal SIGHUP")
    assert "simulated bug at master.reload" in error["error"]
    reload = subprocess.run([sys.executable, "-m", "mpd.ctl", "--config",
                             str(server.config_path), "reload"], capture_output=True,
                            text=True, timeout=30, cwd=ROOT)
    assert reload.returncode == 1 and "internal error" in reload.stderr
    with server.connect() as sock:  # and it serves, hands off and supervises on
        sock.sendall(key_frame(keys_owned_by(1, (0, 1), 1, seed=8)[0]) + M_PING)
        assert recv_exact(sock, len(REPLY)) == REPLY
    victim = slot_pids(server)[0]
    os.kill(victim, signal.SIGKILL)
    server.wait_event("worker.spawned", worker_slot=0, count=2)
    server.signal(signal.SIGTERM)
    assert server.wait_exit() == 0
    assert not server.events("mpd.crashed")
