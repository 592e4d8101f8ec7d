from __future__ import annotations

from conftest import ping


def test_serves_a_ping(mpd_factory):
    server = mpd_factory({"workers": {"workers": 2}})
    with server.connect() as sock:
        ping(sock)
    assert len(server.wait_workers(2)) == 2
