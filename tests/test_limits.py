"""Resource exhaustion: out of file descriptors while accepting (EMFILE)."""

from __future__ import annotations

import os
import resource
import signal
import time

from conftest import PING, REPLY, cpu_seconds, fd_count, recv_exact


def test_emfile_pauses_accepting_without_spinning_and_loses_no_client(mpd_factory):
    server = mpd_factory({"workers": {"workers": 1}})
    worker = server.wait_workers(1)[0]
    limit = fd_count(worker) + 2  # room for two clients, not three
    soft, hard = resource.prlimit(worker, resource.RLIMIT_NOFILE)
    resource.prlimit(worker, resource.RLIMIT_NOFILE, (limit, hard))  # the soft limit only
    try:
        clients = [server.connect(timeout=20) for _ in range(5)]
        for sock in clients:
            sock.sendall(PING)
        for sock in clients[:2]:
            assert recv_exact(sock, len(REPLY)) == REPLY
        paused = server.wait_event("worker.accept_paused")
        assert paused["reason"] == "EMFILE" and paused["pid"] == worker
        cpu = cpu_seconds(worker)
        start = time.monotonic()
        time.sleep(1.0)  # a span to measure CPU over, not a wait for a condition
        used = cpu_seconds(worker) - cpu
        assert used < 0.3 * (time.monotonic() - start), used  # retries, not a busy loop
        # It retried every 0.1 s meanwhile, and said so once, not on every retry.
        assert len(server.events("worker.accept_paused", pid=worker)) == 1
    finally:
        resource.prlimit(worker, resource.RLIMIT_NOFILE, (soft, hard))
    for sock in clients[2:]:  # queued in the backlog meanwhile, served once fds free up
        assert recv_exact(sock, len(REPLY)) == REPLY
    for sock in clients:
        sock.close()
    resumed = server.wait_event("worker.accept_resumed", pid=worker)
    assert resumed["reason"] == "EMFILE" and resumed["pauses"] > 5
    assert resumed["paused_for"] >= 1.0
    assert len(server.events("worker.accept_paused", pid=worker)) == 1


def test_a_failed_spawn_is_retried_and_the_master_survives(mpd_factory):
    server = mpd_factory({"workers": {"workers": 1}})
    worker = server.wait_workers(1)[0]
    soft, hard = resource.prlimit(server.pid, resource.RLIMIT_NOFILE)
    # No fd left for the next worker's channel: its socketpair fails with EMFILE.
    resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (fd_count(server.pid), hard))
    try:
        os.kill(worker, signal.SIGKILL)
        failed = server.wait_event("worker.spawn_failed")
        assert failed["worker_slot"] == 0 and "Too many open files" in failed["error"]
        server.wait_event("worker.backoff", worker_slot=0)
    finally:
        resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (soft, hard))
    new = server.wait_event("worker.spawned", worker_slot=0, count=2, timeout=30)
    server.wait_event("worker.ready", worker_pid=new["worker_pid"])
    with server.connect() as sock:
        sock.sendall(PING)
        assert recv_exact(sock, len(REPLY)) == REPLY
