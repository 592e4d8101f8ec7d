"""Resource exhaustion: out of file descriptors while accepting (EMFILE)."""

from __future__ import annotations

import resource
import time

from conftest import PING, REPLY, fd_count, recv_exact, wait_until
from test_supervision import cpu_seconds


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
    finally:
        resource.prlimit(worker, resource.RLIMIT_NOFILE, (soft, hard))
    for sock in clients[2:]:  # queued in the backlog meanwhile, served once fds free up
        assert recv_exact(sock, len(REPLY)) == REPLY
    for sock in clients:
        sock.close()
    wait_until(lambda: server.events("worker.accept_paused", reason="EMFILE"), what="logged")
