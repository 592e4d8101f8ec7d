"""Serving, end to end: the real mpd in its own process tree, real TCP clients, real
signals. Each test is one scenario a user or a misbehaving client would cause."""

from __future__ import annotations

import collections
import contextlib
import fcntl
import select
import selectors
import signal
import socket
import struct
import termios
import time

import pytest
from conftest import (
    PING,
    REPLY,
    build_seed_client,
    children,
    count_replies,
    pid_alive,
    ping,
    recv_exact,
    run_seed_client,
    wait_until,
)

from mpd.apps.ping import MAX_FRAME

CLOSED = (ConnectionResetError, BrokenPipeError)


def ping_swarm(port: int, clients: int, pings: int, timeout: float = 20.0,
               connects_per_round: int = 10) -> list[socket.socket]:
    """`clients` concurrent connections, each doing `pings` round trips (send one ping, wait
    for its whole reply, send the next), driven by one selector loop. New clients keep
    arriving, `connects_per_round` per loop turn, while the earlier ones are pinging, as
    on a live server. Returns the sockets, still open. Fails on a wrong reply, an early
    close, or the deadline."""
    sel = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    done: dict[socket.socket, int] = {}
    pending: dict[socket.socket, bytes] = {}
    deadline = time.monotonic() + timeout
    unfinished = clients
    while unfinished:
        assert time.monotonic() < deadline, f"{unfinished} clients unfinished after {timeout}s"
        for _ in range(min(connects_per_round, clients - len(socks))):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ)
            socks.append(sock)
            done[sock], pending[sock] = 0, b""
            sock.sendall(PING)
        for key, _ in sel.select(1.0):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            data = sock.recv(4096)
            assert data, f"closed by mpd after {done[sock]} replies"
            pending[sock] += data
            while len(pending[sock]) >= len(REPLY):
                assert pending[sock][:len(REPLY)] == REPLY
                pending[sock] = pending[sock][len(REPLY):]
                done[sock] += 1
                assert done[sock] <= pings, "more replies than pings"
                if done[sock] < pings:
                    sock.sendall(PING)
                else:
                    sel.unregister(sock)
                    unfinished -= 1
    sel.close()
    assert len(socks) == clients
    assert all(n == pings for n in done.values()) and not any(pending.values())
    for sock in socks:
        sock.setblocking(True)
        sock.settimeout(5)
    return socks


def sees_eof(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True when mpd closed `sock`: recv gives b"" (FIN) or ECONNRESET, within `timeout`."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def unread(sock: socket.socket) -> int:
    """Bytes waiting in the socket's receive queue (FIONREAD), without reading them."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]


# --- load and balance ---------------------------------------------------------------------------

def test_200_concurrent_clients_are_served_by_both_workers(mpd_factory):
    server = mpd_factory({"workers": {"workers": 2}, "log": {"level": "debug"}})
    workers = server.wait_workers(2)
    socks = ping_swarm(server.port, clients=200, pings=50)
    try:
        server.wait_event("client.accepted", count=200)
        spread = collections.Counter(e["pid"] for e in server.events("client.accepted"))
        print(f"client.accepted by worker pid: {dict(spread)}")
        assert sum(spread.values()) == 200
        assert set(spread) == set(workers), f"accepts by {spread}, workers are {workers}"
        assert all(spread[pid] >= 1 for pid in workers)
    finally:
        for sock in socks:
            sock.close()


# --- limits ----------------------------------------------------------------------------------

def test_max_clients_is_enforced_and_accepting_resumes(mpd_factory):
    server = mpd_factory({"workers": {"workers": 1, "max_clients": 5}})
    first = [server.connect() for _ in range(5)]
    for sock in first:
        ping(sock)
    paused = server.wait_event("worker.accept_paused", reason="max_clients")
    assert paused["max_clients"] == 5 and paused["clients"] == 5

    sixth = server.connect()  # the kernel completes the handshake; no worker accepts it
    sixth.sendall(PING)
    sixth.settimeout(0.5)  # the bounded negative check
    with pytest.raises(socket.timeout):
        sixth.recv(len(REPLY))
    for sock in first:  # the five are still served while the sixth waits
        ping(sock)

    first.pop().close()
    sixth.settimeout(5)
    assert recv_exact(sixth, len(REPLY)) == REPLY
    ping(sixth)
    for sock in [*first, sixth]:
        ping(sock)
        sock.close()


# --- misbehaving clients ---------------------------------------------------------------------

def test_an_oversized_frame_closes_that_client_only(mpd_factory):
    server = mpd_factory({"workers": {"workers": 1}})
    other = server.connect()
    ping(other)
    garbage = (bytes(range(1, 256)) * 300)[:MAX_FRAME + 4096]  # no NUL: one endless frame
    assert 0 not in garbage
    bad = server.connect()
    with contextlib.suppress(*CLOSED):  # mpd may close it before the last bytes are out
        bad.sendall(garbage)
    assert sees_eof(bad)
    event = server.wait_event("client.protocol_error")
    assert "NUL" in event["error"]
    ping(other)  # same worker, still serving
    with server.connect() as late:
        ping(late)
    other.close()
    bad.close()


def test_a_client_that_never_reads_does_not_slow_the_others(mpd_factory):
    server = mpd_factory({"workers": {"workers": 1, "max_output_buffer": 1024}})
    other = server.connect()
    ping(other)
    flooder = server.connect()
    flooder.setblocking(False)
    burst = PING * 200  # 200 pings per send; it never calls recv
    sent = 0
    broken: OSError | None = None

    def flood() -> None:
        nonlocal sent, broken
        if broken is None:
            try:
                sent += flooder.send(burst)
            except BlockingIOError:  # mpd is behind on reading it: wait until it reads
                select.select([], [flooder], [], 0.01)
            except CLOSED as e:
                broken = e

    # Flood until the flooder's own receive queue holds replies it never reads...
    deadline = time.monotonic() + 10
    while broken is None and unread(flooder) < 32768:
        assert time.monotonic() < deadline, "mpd's replies never piled up at the flooder"
        flood()
    assert broken is None, f"flooder closed before its replies piled up: {broken!r}"
    # ...then keep flooding while the other client does its 200 pings, one burst per ping.
    during = 0
    started = time.monotonic()
    for _ in range(200):
        flood()
        was_flooding = broken is None and unread(flooder) >= 32768
        ping(other)  # socket timeout 5 s: a stalled worker fails here
        during += was_flooding
    took = time.monotonic() - started
    # Flood on until mpd cuts the flooder off.
    deadline = time.monotonic() + 20
    while broken is None:
        assert time.monotonic() < deadline, f"flooder still connected after {sent} bytes"
        flood()
    print(f"200 pings in {took:.3f}s, {during} of them while the flooder held >= 32 KiB "
          f"of unread replies; flooder cut off after sending {sent} bytes ({broken!r})")
    assert during >= 1
    overflow = server.wait_event("client.overflow")
    assert overflow["max_output_buffer"] == 1024 and overflow["buffered"] > 1024
    for _ in range(10):
        ping(other)
    other.close()
    flooder.close()


def test_frames_are_answered_however_the_reads_cut_them(mpd_factory):
    """The loop answers a read that is one whole frame inline; every other cut goes through
    the protocol: a frame across reads, several frames in one read, a whole frame after a
    partial one, a key frame, an EOF. Each piece is sent only once mpd has read the one
    before, so each is a read of its own."""
    server = mpd_factory({"workers": {"workers": 1}})
    sock = server.connect()

    def send_read(piece: bytes) -> None:
        sock.sendall(piece)
        wait_until(lambda: not unread_by_mpd(server.port, sock), what="mpd read the piece")

    ping(sock)  # one whole frame: the inline case
    for cut in (1, 5, len(PING) - 1):  # one frame over two reads
        send_read(PING[:cut])
        ping(sock, PING[cut:])
    send_read(PING[:3])  # the end of one frame and a whole one in the second read
    ping(sock, PING[3:] + PING)
    assert recv_exact(sock, len(REPLY)) == REPLY
    sock.sendall(PING * 3)  # several frames in one read: three replies
    assert recv_exact(sock, 3 * len(REPLY)) == REPLY * 3
    ping(sock, b"C" + (7).to_bytes(4, "little") + PING)  # a key frame (ours: one worker)
    send_read(b"\0")  # an empty frame, just its NUL
    assert recv_exact(sock, len(REPLY)) == REPLY
    ping(sock)  # and inline again
    sock.shutdown(socket.SHUT_WR)
    assert sees_eof(sock)
    sock.close()


def test_a_client_that_sends_each_frame_in_two_writes_is_answered(mpd_factory):
    """As the seed's mpclient2 does, with Nagle's algorithm on: `C` then its key, `M` then
    its text. Each first piece is read alone (the next is sent once mpd has read it), so
    each read leaves a frame incomplete: the path that sets TCP_QUICKACK. (What the
    quick-ACK buys, no 40 ms wait per message, is measured by scripts/bench, not here.)
    Two workers: about half the keys are handed off after their split key frame."""
    server = mpd_factory({"workers": {"workers": 2}, "log": {"level": "debug"}})  # fd.dispatched
    clients = [server.connect() for _ in range(16)]

    def send_read(sock: socket.socket, piece: bytes) -> None:
        sock.sendall(piece)
        wait_until(lambda: not unread_by_mpd(server.port, sock), what="mpd read the piece")

    for key, sock in enumerate(clients):
        assert not sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)  # Nagle on
        send_read(sock, b"C")
        sock.sendall(key.to_bytes(4, "little"))
    for _ in range(5):
        for sock in clients:
            send_read(sock, b"M")
            ping(sock, b"essage from client\0")
    wait_until(lambda: len(server.events("fd.dispatched")) >= 1, what="a hand-off")
    for sock in clients:
        ping(sock)
        sock.close()


# --- half-close and timeouts ---------------------------------------------------------------

def read_to_eof(sock: socket.socket, timeout: float = 60) -> int:
    """Bytes received until mpd closes the connection."""
    sock.settimeout(timeout)
    total = 0
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            return total
        total += len(chunk)


def unread_by_mpd(port: int, client: socket.socket) -> int | None:
    """Bytes that mpd's end of `client`'s connection has received and not read yet (its
    rx_queue in /proc/net/tcp); None once that end is closed."""
    local = f"0100007F:{port:04X}"
    remote = f"0100007F:{client.getsockname()[1]:04X}"
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] == local and fields[2] == remote and fields[3] == "01":  # ESTABLISHED
                return int(fields[4].split(":")[1], 16)
    return None


def test_a_client_that_half_closes_gets_every_reply_it_asked_for(mpd_factory):
    # Room for every reply in mpd's buffer: what is tested is the half-close, not the bound.
    server = mpd_factory({"workers": {"workers": 1, "max_output_buffer": 16 << 20}})
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)  # kernel buffers: small
    sock.connect(("127.0.0.1", server.port))
    count = 400_000  # 8 MB of replies: megabytes of them wait in mpd when the EOF comes
    sock.sendall(PING * count)
    sock.shutdown(socket.SHUT_WR)
    # A slow reader: it reads nothing until mpd has read every ping and the EOF.
    wait_until(lambda: not unread_by_mpd(server.port, sock), what="mpd read every ping")
    assert read_to_eof(sock) == count * len(REPLY)
    sock.close()


def test_a_half_closed_client_that_stops_reading_is_closed_after_idle_timeout(mpd_factory):
    server = mpd_factory({"workers": {"workers": 1, "idle_timeout": 1,
                                      "max_output_buffer": 16 << 20}})
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    sock.connect(("127.0.0.1", server.port))
    sock.sendall(PING * 400_000)
    sock.shutdown(socket.SHUT_WR)  # and never reads
    timed_out = server.wait_event("client.timed_out", timeout=10)
    assert timed_out["idle"] == 1 and timed_out["clients"] == 0
    sock.close()


def test_clients_without_a_first_frame_are_closed_after_first_frame_timeout(mpd_factory):
    server = mpd_factory({"workers": {"workers": 1, "first_frame_timeout": 1}})
    greeted = server.connect()
    ping(greeted)
    silent = server.connect()
    dripping = server.connect()
    dripping.sendall(b"h")  # a byte now and then, never a whole frame (slowloris)
    assert sees_eof(silent) and sees_eof(dripping)
    timed_out = server.wait_event("client.timed_out")
    assert timed_out["first_frame"] == 2 and timed_out["idle"] == 0
    ping(greeted)  # the client that spoke is served on
    for sock in (greeted, silent, dripping):
        sock.close()


def test_clients_idle_for_idle_timeout_are_closed_and_busy_ones_are_not(mpd_factory):
    server = mpd_factory({"workers": {"workers": 1, "idle_timeout": 1}})
    idle, busy = server.connect(), server.connect()
    ping(idle)
    ping(busy)
    # The busy client pings on (every 0.1 s) until the idle one is closed.
    wait_until(lambda: (ping(busy), server.events("client.timed_out"))[1], timeout=10,
               interval=0.1, what="the idle client timed out")
    assert sees_eof(idle)
    ping(busy)
    (timed_out,) = server.events("client.timed_out")
    assert timed_out["idle"] == 1 and timed_out["clients"] == 1
    server.signal(signal.SIGTERM)
    stopped = server.wait_event("worker.stopped")
    assert stopped["idle_timeouts"] == 1 and stopped["first_frame_timeouts"] == 0
    idle.close()
    busy.close()


# --- stopping ------------------------------------------------------------------------------

def test_sigterm_with_idle_clients_exits_0_and_leaves_no_process(mpd_factory):
    server = mpd_factory({"workers": {"workers": 2, "graceful_timeout": 5.0}})
    workers = server.wait_workers(2)
    clients = ping_swarm(server.port, clients=50, pings=1)
    started = time.monotonic()
    server.signal(signal.SIGTERM)
    assert server.wait_exit(timeout=5.0 + 5) == 0
    took = time.monotonic() - started
    assert took < 5.0, f"idle clients held the stop for {took:.2f}s"
    assert [pid for pid in workers if pid_alive(pid)] == []
    assert all(sees_eof(sock) for sock in clients)
    assert server.events("mpd.stopped")
    for sock in clients:
        sock.close()


def test_sigterm_waits_at_most_graceful_timeout_for_a_busy_client(mpd_factory):
    server = mpd_factory({"workers": {"workers": 2, "graceful_timeout": 1.0}})
    workers = server.wait_workers(2)
    busy = server.connect()
    ping(busy)
    busy.sendall(b"half a pi")  # a frame in progress: not idle, so not closed at once
    idle = ping_swarm(server.port, clients=10, pings=1)
    started = time.monotonic()
    server.signal(signal.SIGTERM)
    assert server.wait_exit(timeout=1.0 + 5) == 0
    took = time.monotonic() - started
    assert took < 1.0 + 3, f"stop took {took:.2f}s with graceful_timeout 1.0"
    assert [pid for pid in workers if pid_alive(pid)] == []
    assert sees_eof(busy)
    assert all(sees_eof(sock) for sock in idle)
    for sock in [busy, *idle]:
        sock.close()


def refused(port: int) -> bool:
    """True once a connect is refused; a connect that gets through is closed again."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.parametrize("workers", [2, 0], ids=["workers", "single-process"])
def test_a_graceful_stop_refuses_new_clients_at_once(mpd_factory, workers):
    server = mpd_factory({"workers": {"workers": workers, "graceful_timeout": 60}})
    busy = server.connect()
    ping(busy)
    busy.sendall(b"half a pi")  # a frame in progress: the stop waits for it
    server.signal(signal.SIGTERM)
    server.wait_event("worker.stopping")
    # Not accepted by the kernel and left to hang until the workers exit: refused.
    wait_until(lambda: refused(server.port), timeout=5, what="a new client refused")
    busy.sendall(b"ng\0")  # the client that was there finishes its frame
    assert recv_exact(busy, len(REPLY)) == REPLY
    assert sees_eof(busy)
    busy.close()
    assert server.wait_exit(timeout=10) == 0


def test_single_process_mode_serves_and_stops_on_sigterm(mpd_factory):
    server = mpd_factory({"workers": {"workers": 0}})
    assert children(server.pid) == []  # no workers: the one process serves
    with server.connect() as plain:
        for _ in range(3):
            ping(plain)
    keyed = server.connect()
    keyed.sendall(b"C" + struct.pack("<i", -12345) + b"Mhello, client ping!\0" * 3)
    assert recv_exact(keyed, 3 * len(REPLY)) == REPLY * 3
    ping(keyed, b"Mhello, client ping!\0")
    assert server.events("worker.serving", role="single")
    server.signal(signal.SIGTERM)
    assert server.wait_exit(timeout=5) == 0
    assert sees_eof(keyed)
    keyed.close()


# --- the seed's own client ---------------------------------------------------------------------

def test_the_seeds_mpclient_works_unchanged(mpd_factory, tmp_path):
    mpclient = build_seed_client("mpclient", tmp_path)
    server = mpd_factory({"workers": {"workers": 2}, "log": {"level": "debug"}})
    # It connects its clients, then pings them in turn with sleep(3) after each reply,
    # forever: two clients answer within about 3 s.
    output = run_seed_client([str(mpclient), "127.0.0.1", str(server.port), "2"],
                             lambda out: count_replies(out) >= 2, timeout=30)
    assert output.count("connect socket success!") == 2
    replies = [line for line in output if line.startswith("recv from server:")]
    assert replies == ["recv from server: hello, server ping!"] * 2
    assert len(server.events("client.accepted")) == 2
