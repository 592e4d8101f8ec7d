"""Sustained hand-off load under the shipped unit and journald with its default rate limit
(10,000 messages per 30 s per service, scaled by free space; the box turns the limit off,
so the test puts the default back): at the default log level no line is lost, because a
hand-off logs nothing at info and the mpd.stats summary says what happened.

A line per hand-off at info (fd.dispatched, before) would not survive it: the load hands
off more clients than the limit lets lines through in 30 s, and journald drops the rest
without a word until the window ends."""

from __future__ import annotations

from conftest import M_PING, REPLY, wait_until
from sdbox import BASE, install, mpdctl_status, needs_box

JOURNALD_DEFAULTS = "[Journal]\nRateLimitIntervalSec=30s\nRateLimitBurst=10000\n"
SECONDS = 12.0
NOMINAL_BURST = 10_000

# Run inside the box: processes that each re-key one connection between the two slots'
# keys with a ping, as fast as mpd answers; each re-key is a hand-off. Prints the total.
REKEY = f"""
import multiprocessing, socket, struct, sys, time
from mpd.wire import routing
port, seconds, procs = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
keys = [next(k for k in range(10**6) if routing.owner(routing.key_hash(k), (0, 1)) == s)
        for s in (0, 1)]
frames = [b"C" + struct.pack("<i", k) + {M_PING!r} for k in keys]
def run(total):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    n, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        s.sendall(frames[n % 2])
        got = b""
        while len(got) < {len(REPLY)}:
            chunk = s.recv(100)
            assert chunk, "closed"
            got += chunk
        n += 1
    with total.get_lock():
        total.value += n
total = multiprocessing.Value("q", 0)
ps = [multiprocessing.Process(target=run, args=(total,)) for _ in range(procs)]
[p.start() for p in ps]
[p.join() for p in ps]
print(total.value)
"""

SCRAPE = """
import urllib.request
from prometheus_client.parser import text_string_to_metric_families
text = urllib.request.urlopen("http://127.0.0.1:9190/metrics", timeout=10).read().decode()
print(next(s.value for f in text_string_to_metric_families(text) for s in f.samples
           if s.name == "mpd_handoffs_in_total"))
"""

@needs_box
def test_sustained_hand_offs_lose_no_line_under_journalds_default_rate_limit(box,
                                                                             system_venv):
    box.run("mkdir", "-p", "/etc/systemd/journald.conf.d", check=True)
    box.copy(JOURNALD_DEFAULTS, "/etc/systemd/journald.conf.d/60-mpd-test-defaults.conf")
    box.run("systemctl", "restart", "systemd-journald", check=True)
    install(box, system_venv, {**BASE, "log": {"stats_interval": 2},
                               "metrics": {"listen": "127.0.0.1:9190"}})
    box.run("systemctl", "start", "mpd", check=True)
    result = box.run(f"{system_venv}/bin/python", "-c", REKEY, "1990", str(SECONDS), "2",
                     timeout=SECONDS + 60)
    assert result.returncode == 0, result.stderr
    rekeyed = int(result.stdout)
    # Every re-key was a hand-off (but a connection's first key may be its acceptor's own),
    # counted once the workers' next heartbeats are in.
    status = wait_until(lambda: (s := mpdctl_status(box, system_venv))["totals"]["adopted"]
                        >= rekeyed - 2 and s, what=f"{rekeyed} hand-offs counted")
    adopted = status["totals"]["adopted"]
    # More hand-offs in SECONDS than journald lets a service log in 30 s: one line each
    # would have been cut off.
    assert adopted > NOMINAL_BURST, f"only {adopted} hand-offs: the load proves nothing"

    def summed() -> int:
        return sum(e["handoffs"] for e in box.events("mpd.stats"))

    wait_until(lambda: summed() == adopted, timeout=20,
               what=f"mpd.stats lines that add up to {adopted} hand-offs")
    stats = box.events("mpd.stats")
    assert all(e["handoff_p99_us"] >= e["handoff_p50_us"] > 0 for e in stats if e["handoffs"])
    assert sum(e["requests"] for e in stats) == status["totals"]["requests"]
    assert box.events("fd.dispatched") == []
    # The metrics endpoint under the unit's sandbox says the same.
    scraped = box.run(f"{system_venv}/bin/python", "-c", SCRAPE, check=True).stdout
    assert float(scraped) == adopted
    # Every line mpd logged since the start is there: the workers' and the master's.
    assert len(box.events("worker.serving")) == 2 and box.events("mpd.ready")
