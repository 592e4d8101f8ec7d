"""Metrics (mpdctl metrics, the [metrics] listen endpoint) and the mpd.stats summary: the
exposition parsed by prometheus_client's own parsers, its counters checked against
`mpdctl status`, counters that never go backwards across a worker's death, and a metrics
port that no stalled, greedy or garbage-sending scraper can take from the master."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from bisect import bisect_left
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import M_PING, ME, REPLY, key_frame, keys_owned_by, ping, recv_exact, wait_until
from haproxy_support import free_port
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse
from prometheus_client.parser import text_string_to_metric_families

from mpd.config import schema as configmod
from mpd.config.schema import ConfigError
from mpd.master import tally
from mpd.ops import httpmetrics
from mpd.wire import latency

# --- the pieces -----------------------------------------------------------------------------


def test_a_latency_lands_in_the_bucket_whose_bound_it_does_not_pass():
    h = latency.Histogram()
    for us in (0, 10, 11, 30, 10**9):
        h.observe(us)
    report = h.report()["latency"]
    assert report["buckets"][0] == 2  # 0 and 10: le="10"
    assert report["buckets"][1] == 1  # 11: le="20"
    assert report["buckets"][2] == 1  # 30: le="30"
    assert report["buckets"][-1] == 1  # past every bound: +Inf
    assert report["sum_us"] == 51 + 10**9 and report["peak_us"] == 10**9
    assert h.report()["latency"]["peak_us"] == 0  # the peak is since the last report
    assert latency.counts(report) == (report["buckets"], report["sum_us"], 10**9)


@given(st.lists(st.integers(0, 20_000_000), min_size=1, max_size=300),
       st.sampled_from([0.5, 0.9, 0.99]))
def test_a_quantile_falls_within_the_bucket_of_the_true_one(values, q):
    h = latency.Histogram()
    for v in values:
        h.observe(v)
    estimate = latency.quantile(h.buckets, q)
    true = sorted(values)[math.ceil(q * len(values)) - 1]  # the rank-th smallest
    i = bisect_left(latency.BOUNDS_US, true)
    low = latency.BOUNDS_US[i - 1] if i else 0
    high = latency.BOUNDS_US[i] if i < len(latency.BOUNDS_US) else latency.BOUNDS_US[-1]
    assert estimate is not None and min(low, high) <= estimate <= high


@pytest.mark.parametrize("report", [None, "x", {}, {"bounds": 3, "buckets": [1, 2, 3, 4]},
                                    {"bounds": len(latency.BOUNDS_US), "buckets": [-1] * 26,
                                     "sum_us": 0, "peak_us": 0}])
def test_a_malformed_latency_report_is_ignored(report):
    assert latency.counts(report) is None


def test_totals_from_a_malformed_state_count_as_zero():
    t = tally.Tally()
    t.restore({"0": {"counts": {"requests": 5, "refused": "x"}, "buckets": [1]},
               "x": {}, "1": "nonsense"})
    assert t.kept[0].counts["requests"] == 5 and t.kept[0].counts["refused"] == 0
    assert sum(t.kept[0].buckets) == 0 and t.kept[1].counts["requests"] == 0
    assert tally.Tally.restore(t, None) is None  # nothing there: nothing changes


# --- a real mpd -----------------------------------------------------------------------------


def ctl(server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mpd.ctl", "--socket",
                           str(server.tmp / "mpd.sock"), *args],
                          capture_output=True, text=True, timeout=30)


def status(server) -> dict:
    result = ctl(server, "--json", "status")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def scrape(port: int, accept: str | None = None) -> tuple[int, dict[str, str], str]:
    """A plain HTTP/1.1 GET /metrics, by hand: (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: mpd\r\n"
                     + (f"Accept: {accept}\r\n".encode() if accept else b"") + b"\r\n")
        return parse_response(read_all(sock))


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def parse_response(raw: bytes) -> tuple[int, dict[str, str], str]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    assert int(headers["content-length"]) == len(body)
    return int(lines[0].split()[1]), headers, body.decode()


def samples(text: str, parser=text_string_to_metric_families) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} of an exposition, through prometheus_client's
    own parser."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in parser(text) for s in family.samples}


def traffic(server, handoffs: int, pings: int) -> None:
    """`handoffs` clients with a key that slot 1 owns (those that slot 0 accepts are
    handed off: about half), then `pings` pings on one more connection."""
    keys = keys_owned_by(1, (0, 1), handoffs)

    def client(key: int) -> None:
        with server.connect() as sock:
            sock.sendall(key_frame(key) + M_PING)
            assert recv_exact(sock, len(REPLY)) == REPLY

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(client, keys))
    with server.connect() as sock:
        for _ in range(pings):
            ping(sock)


@pytest.fixture
def metered(mpd_factory):
    port = free_port()
    server = mpd_factory({"workers": {"workers": 2}, "metrics": {"listen": f"127.0.0.1:{port}"},
                          "log": {"stats_interval": 0.5}})
    server.metrics_port = port
    return server


def settled(server, requests: int) -> dict:
    """Status once every worker's heartbeat has counted `requests` requests."""
    return wait_until(lambda: (s := status(server))["totals"]["requests"] >= requests and s,
                      what=f"{requests} requests counted")


def test_the_scrape_parses_and_its_counters_are_status(metered):
    traffic(metered, handoffs=60, pings=25)
    st_ = settled(metered, 60 + 25)
    code, headers, body = scrape(metered.metrics_port)
    assert code == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    got = samples(body)
    totals = st_["totals"]
    assert got[("mpd_requests_total", ())] == totals["requests"] == 85
    assert got[("mpd_handoffs_in_total", ())] == totals["adopted"] > 0
    assert got[("mpd_handoffs_out_total", ())] == totals["handoffs_out"] == totals["adopted"]
    assert got[("mpd_accepted_connections_total", ())] == totals["accepted"] == 61
    assert got[("mpd_refused_total", ())] == totals["refused"] == 0
    assert got[("mpd_restarts_total", ())] == 0
    assert got[("mpd_workers_ready", ())] == 2
    for worker in st_["workers"]:
        slot = (("slot", str(worker["slot"])),)
        assert got[("mpd_slot_requests_total", slot)] == worker["requests"]
        assert got[("mpd_slot_handoffs_in_total", slot)] == worker["adopted"]
        assert got[("mpd_slot_worker_pid", slot)] == worker["pid"]
        assert got[("mpd_slot_resident_memory_bytes", slot)] > 1_000_000
    assert got[("mpd_master_resident_memory_bytes", ())] > 1_000_000
    assert got[("mpd_master_cpu_seconds_total", ())] > 0
    # The hand-off histogram: as many observations as hand-offs, in cumulative buckets.
    assert got[("mpd_handoff_latency_seconds_count", ())] == totals["adopted"]
    assert got[("mpd_handoff_latency_seconds_bucket", (("le", "+Inf"),))] == totals["adopted"]
    assert 0 < got[("mpd_handoff_latency_seconds_sum", ())] < totals["adopted"]  # < 1 s each
    # mpdctl metrics prints the same families.
    printed = ctl(metered, "metrics")
    assert printed.returncode == 0, printed.stderr
    assert samples(printed.stdout)[("mpd_requests_total", ())] == 85


def test_openmetrics_when_the_scraper_asks_for_it(metered):
    traffic(metered, handoffs=10, pings=0)
    settled(metered, 10)
    code, headers, body = scrape(metered.metrics_port,
                                 "application/openmetrics-text; version=1.0.0")
    assert code == 200 and headers["content-type"].startswith("application/openmetrics-text")
    assert body.endswith("# EOF\n")
    got = samples(body, om_parse)  # the strict parser: it raises on any flaw
    assert got[("mpd_requests_total", ())] == 10
    assert got[("mpd_info", (("version", status(metered)["master"]["version"]),))] == 1


def test_counters_never_go_backwards_when_a_worker_dies(metered):
    traffic(metered, handoffs=40, pings=30)
    before = settled(metered, 70)
    victim = next(w for w in before["workers"] if w["requests"] > 0)
    os.kill(victim["pid"], signal.SIGKILL)  # no last words: its last heartbeat counts
    after = wait_until(lambda: (s := status(metered))["master"]["ready"] == 2
                       and victim["pid"] not in [w["pid"] for w in s["workers"]] and s,
                       what="the slot respawned")
    slot = (("slot", str(victim["slot"])),)
    got = samples(scrape(metered.metrics_port)[2])
    assert got[("mpd_requests_total", ())] == after["totals"]["requests"] == 70
    assert got[("mpd_slot_requests_total", slot)] == victim["requests"]
    assert got[("mpd_restarts_total", ())] == got[("mpd_slot_restarts_total", slot)] == 1
    assert got[("mpd_handoffs_in_total", ())] == before["totals"]["adopted"]
    assert got[("mpd_handoff_latency_seconds_count", ())] == before["totals"]["adopted"]
    # The new worker counts on top of the dead one's.
    traffic(metered, handoffs=0, pings=5)
    settled(metered, 75)
    # A scrape within httpmetrics.CACHE of the last one gets the same text: wait it out.
    got = wait_until(lambda: (g := samples(scrape(metered.metrics_port)[2]))[
        ("mpd_requests_total", ())] == 75 and g, what="the new worker's requests scraped")
    assert got[("mpd_workers_cpu_seconds_total", ())] > 0


def test_mpd_stats_sums_up_the_hand_offs_at_info_and_fd_dispatched_is_debug(metered):
    traffic(metered, handoffs=50, pings=0)
    adopted = settled(metered, 50)["totals"]["adopted"]
    stats = wait_until(lambda: sum(e["handoffs"] for e in metered.events("mpd.stats"))
                       == adopted and metered.events("mpd.stats"), what="mpd.stats lines")
    busy = [e for e in stats if e["handoffs"]]
    assert all(e["level"] == "info" for e in stats)
    assert sum(e["requests"] for e in stats) == 50
    assert all(0 < e["handoff_p50_us"] <= e["handoff_p99_us"] for e in busy)
    assert all(e["handoff_max_us"] > 0 for e in busy)
    assert metered.events("fd.dispatched") == []  # at debug: not in an info log


# --- the endpoint against bad scrapers --------------------------------------------------------


def still_serving(server) -> None:
    """The master's loop goes on: clients are served, mpdctl answers, a scrape works."""
    with server.connect() as sock:
        ping(sock)
    assert status(server)["master"]["ready"] == 2
    assert scrape(server.metrics_port)[0] == 200


def closed(sock: socket.socket) -> bool:
    """The master closed it (an EOF; a reset when it closed with our bytes unread)."""
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


def test_stalled_scrapers_hold_nothing(metered):
    cap = httpmetrics.LIMITS.peers
    stalled = []
    for _ in range(cap + 4):  # each sends half a request and waits forever
        sock = socket.create_connection(("127.0.0.1", metered.metrics_port), timeout=15)
        sock.sendall(b"GET /metr")
        stalled.append(sock)
    # One that asks and never reads: its answer waits in the kernel, not in the master.
    greedy = socket.create_connection(("127.0.0.1", metered.metrics_port))
    greedy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    greedy.sendall(b"GET /metrics HTTP/1.1\r\n\r\n" * 50)
    still_serving(metered)  # past the cap: the oldest stalled ones made way
    assert closed(stalled[0])  # the oldest made way for a newcomer
    # The newest stalled scraper is closed at the request deadline, with a 408.
    start = time.monotonic()
    answer = read_all(stalled[-1])
    assert answer.startswith(b"HTTP/1.1 408 ") or answer == b""
    assert time.monotonic() - start < httpmetrics.REQUEST_TIMEOUT + 2
    for sock in [*stalled, greedy]:
        sock.close()
    still_serving(metered)


@pytest.mark.parametrize(("request_bytes", "code"), [
    (b"POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", 405),
    (b"GET /admin HTTP/1.1\r\n\r\n", 404),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),  # TLS, or junk
    (b"GET /metrics\r\n\r\n", 400),  # HTTP/0.9
    (b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n", 431),
    (os.urandom(3000).replace(b"\n", b"") * 4, 431),  # no end of head in sight
])
def test_garbage_gets_an_http_error_and_the_master_goes_on(metered, request_bytes, code):
    with socket.create_connection(("127.0.0.1", metered.metrics_port), timeout=10) as sock:
        # The answer may come, and the socket close, before all of it was sent.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request_bytes)
        raw = read_all(sock)
    assert raw.startswith(f"HTTP/1.1 {code} ".encode()), raw[:200]
    still_serving(metered)


def test_a_port_in_use_is_a_clear_error_at_start(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "mpd.toml"
        config.write_text(f'[server]\nport = 0\nuser = "{ME}"\n[control]\nsocket = "{tmp_path}/s"\n'
                          f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
        result = subprocess.run([sys.executable, "-m", "mpd.cli", "--config", str(config)],
                                capture_output=True, text=True, timeout=30)
    assert result.returncode == 69
    assert "metrics.failed" in result.stdout and "for metrics" in result.stdout
    assert not (tmp_path / "s").exists()  # the control socket was cleaned up


@pytest.mark.parametrize(("text", "error"), [
    ('[server]\nport = 1990\n[metrics]\nlisten = "0.0.0.0:1990"\n', "other than server.port"),
    ('[agent]\nlisten = "127.0.0.1:9190"\n[metrics]\nlisten = "127.0.0.1:9190"\n',
     "other than agent.listen"),
    ('[workers]\nworkers = 0\n[metrics]\nlisten = "127.0.0.1:9190"\n', "single-process"),
    ('[metrics]\nlisten = "localhost:9190"\n', "address:port"),
    ('[log]\nstats_interval = -1\n', "log.stats_interval"),
])
def test_a_metrics_setting_that_cannot_work_is_a_config_error(text, error):
    with pytest.raises(ConfigError) as caught:
        configmod.parse(text, "mpd.toml")
    assert error in str(caught.value)


def test_the_metrics_port_needs_a_restart_and_the_stats_interval_does_not(tmp_path):
    path = tmp_path / "mpd.toml"
    path.write_text('[metrics]\nlisten = "127.0.0.1:9190"\n')
    current = configmod.load(str(path))
    path.write_text('[metrics]\nlisten = "127.0.0.1:9191"\n')
    with pytest.raises(ConfigError, match="metrics_listen"):
        configmod.reload(current)
    path.write_text('[metrics]\nlisten = "127.0.0.1:9190"\n[log]\nstats_interval = 5\n')
    assert configmod.reload(current).log_stats_interval == 5
