"""The master<->worker channel on a real SEQPACKET socketpair: malformed messages are
dropped with their fds closed, and a full socket queues messages instead of blocking."""

from __future__ import annotations

import json
import os
import resource
import socket

import pytest

from mpd.logs import log as logmod
from mpd.wire.channel import (
    HANDOFF_META,
    HANDOFF_META_V1,
    HEADER,
    MAX_MESSAGE,
    VERSION,
    VERSIONS,
    Channel,
    ChannelClosed,
    Kind,
    decode,
    encode,
)


@pytest.fixture
def pair():
    logmod.configure(target="file", path=os.devnull)
    a, b = Channel.pair()
    left, right = Channel(a, "left"), Channel(b, "right")
    yield left, right
    left.close()
    right.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_malformed_messages_are_dropped_and_their_fds_closed(pair):
    left, right = pair
    before = open_fds()
    bad = [b"\x01",  # shorter than a header
           HEADER.pack(VERSION + 1, Kind.STATS, 2) + b"{}",  # unknown version
           HEADER.pack(0, Kind.STATS, 2) + b"{}",  # unknown version
           HEADER.pack(VERSION, 99, 2) + b"{}",  # unknown type
           HEADER.pack(VERSION, Kind.STATS, 5) + b"{nope",  # bad JSON
           HEADER.pack(VERSION, Kind.STATS, 2) + b"[]",  # not an object
           HEADER.pack(VERSION, Kind.STATS, 50) + b"{}",  # meta length past the end
           HEADER.pack(VERSION, Kind.ADOPT, 3) + b"abc"]  # short binary meta
    for data in bad:
        r, w = os.pipe()  # an fd rides along with every bad message
        socket.send_fds(left.sock, [data], [r, w])
        os.close(r)
        os.close(w)
    socket.send_fds(left.sock, [encode(Kind.STATS, {"clients": 3})], [])
    messages = right.receive()
    assert [(m.kind, m.meta) for m in messages] == [(Kind.STATS, {"clients": 3})]
    assert open_fds() == before  # the fds of the bad messages were closed


def test_handoff_meta_round_trips_with_its_fd_and_bytes(pair):
    left, right = pair
    r, w = os.pipe()
    left.send(Kind.HANDOFF, {"key": -5, "sent_ns": 123}, b"Mrest\0", [r])
    (message,) = right.receive()
    assert message.kind is Kind.HANDOFF and message.raw == b"Mrest\0"
    assert message.meta == {"key": -5, "from_slot": None, "from_pid": None, "sent_ns": 123,
                            "owner": None, "table": None, "rank": 0, "last": False,
                            "peer": None}
    assert len(message.fds) == 1
    os.write(w, b"x")
    assert os.read(message.fds[0], 1) == b"x"  # the same pipe came across
    for fd in (*message.fds, w):
        os.close(fd)
    with pytest.raises(OSError):
        os.fstat(r)  # the sender's copy was closed once sent


def test_handoff_meta_carries_the_senders_routing(pair):
    left, right = pair
    meta = {"key": 2**31 - 1, "from_slot": 29, "from_pid": 4_000_000, "sent_ns": 2**63,
            "owner": 0, "table": 30, "rank": 7, "last": True,
            "peer": ("2001:db8::7", 65535)}
    r, w = os.pipe()
    left.send(Kind.ADOPT, meta, b"", [r])
    (message,) = right.receive()
    assert message.kind is Kind.ADOPT and message.meta == meta and message.raw == b""
    # rank and last ride in table's high bits: the routing part keeps the previous
    # version's 29 bytes, which workers of that version (during an upgrade) still read.
    assert HANDOFF_META_V1.size == 29 and HANDOFF_META.size == 29 + 19
    for fd in (*message.fds, w):
        os.close(fd)


def test_a_version_1_peer_gets_the_layout_it_reads_without_the_client_address(pair):
    """After an upgrade in place the master speaks version 1 to the previous release's
    workers until the roll replaces them: no address, which they could not read."""
    left, right = pair
    left.version = 1
    r, w = os.pipe()
    left.send(Kind.ADOPT, {"key": 9, "from_slot": 1, "sent_ns": 5,
                           "peer": ("203.0.113.9", 41000)}, b"M\0", [r])
    data, fds, _flags, _addr = socket.recv_fds(right.sock, MAX_MESSAGE, 1)
    version, kind, meta_len = HEADER.unpack_from(data)
    assert (version, kind, meta_len) == (1, Kind.ADOPT, HANDOFF_META_V1.size) == (1, 11, 29)
    message = decode(data, fds)
    assert message.meta == {"key": 9, "from_slot": 1, "from_pid": None, "sent_ns": 5,
                            "owner": None, "table": None, "rank": 0, "last": False,
                            "peer": None}
    left.send(Kind.STATS, {"clients": 1})  # JSON messages carry the version too
    stats, _fds, _flags, _addr = socket.recv_fds(right.sock, MAX_MESSAGE, 1)
    assert stats[0] == 1 and decode(stats, []).meta == {"clients": 1}
    for fd in (*fds, w):
        os.close(fd)


def test_a_version_1_handoff_decodes_as_one_without_an_address():
    body = HANDOFF_META_V1.pack(True, 7, 2, 4321, 99, 1, 3 | 2 << 16 | 1 << 30)
    data = HEADER.pack(1, Kind.HANDOFF, len(body)) + body + b"rest"
    assert decode(data, []).meta == {"key": 7, "from_slot": 2, "from_pid": 4321,
                                     "sent_ns": 99, "owner": 1, "table": 3, "rank": 2,
                                     "last": True, "peer": None}
    assert decode(data, []).raw == b"rest"
    with pytest.raises(ValueError) as error:  # a version-2 meta under a version-1 header
        decode(HEADER.pack(1, Kind.HANDOFF, HANDOFF_META.size)
               + encode(Kind.HANDOFF, {"key": 7})[HEADER.size:], [])
    assert "expected 29 (version 1)" in str(error.value)
    assert VERSIONS == (1, VERSION) and VERSION == 2


def test_a_full_channel_queues_in_order_and_delivers_when_read(pair):
    left, right = pair
    sent = 0
    while not left.wants_write:  # fill the socket until a send would block
        r, w = os.pipe()
        os.close(w)
        left.send(Kind.ADOPT, {"key": sent}, b"y" * 8000, [r])
        sent += 1
    for _ in range(5):  # these wait in the queue, their fds held open
        r, w = os.pipe()
        os.close(w)
        left.send(Kind.ADOPT, {"key": sent}, b"y" * 8000, [r])
        sent += 1
    assert len(left.queue) >= 5
    keys: list[int] = []
    while len(keys) < sent:
        for message in right.receive():
            keys.append(message.meta["key"])
            for fd in message.fds:
                os.close(fd)
        left.flush()
    assert keys == list(range(sent))
    assert not left.wants_write


def test_too_big_a_message_is_refused_and_the_fd_stays_the_callers(pair):
    left, _right = pair
    r, w = os.pipe()
    with pytest.raises(ValueError):
        left.send(Kind.ADOPT, {"key": 1}, b"z" * MAX_MESSAGE, [r])
    os.fstat(r)  # still open: the caller keeps it
    os.close(r)
    os.close(w)


def test_eof_after_the_last_messages(pair):
    left, right = pair
    left.send(Kind.STATS, {"clients": 1})
    left.send(Kind.HELLO, {"slot": 0})
    left.sock.close()
    assert [m.kind for m in right.receive()] == [Kind.STATS, Kind.HELLO]
    with pytest.raises(ChannelClosed):
        right.receive()


def test_messages_sent_before_a_reset_are_still_delivered(pair):
    # A worker that exits with a master's message unread makes the kernel report
    # ECONNRESET to the master before the worker's own last messages: a retiring worker's
    # final HANDOFFs, each carrying a live client.
    master, worker = pair
    for key in range(3):
        r, w = os.pipe()
        os.close(w)
        worker.send(Kind.HANDOFF, {"key": key}, b"", [r])
    master.send(Kind.ROUTES, {"slots": [0]})  # never read by the worker
    worker.sock.close()
    messages = master.receive()
    assert [m.meta["key"] for m in messages] == [0, 1, 2]
    for message in messages:
        for fd in message.fds:
            os.close(fd)
    with pytest.raises(ChannelClosed):
        master.receive()


def test_a_client_whose_fd_cannot_be_received_is_counted_and_logged_as_lost(tmp_path):
    log_path = tmp_path / "channel.log"
    logmod.configure(target="file", path=str(log_path))
    a, b = Channel.pair()
    left, right = Channel(a, "left"), Channel(b, "slot 2")
    client, peer = socket.socketpair()
    try:
        left.send(Kind.ADOPT, {"key": 77, "sent_ns": 1}, b"M\0", [client.detach()])
        left.send(Kind.STATS, {"clients": 1})
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        lowest_free = os.dup(0)
        os.close(lowest_free)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))  # no fd slot free
        try:
            messages = right.receive()
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        # The ADOPT lost its client; the message after it came whole.
        assert [m.kind for m in messages] == [Kind.STATS] and right.lost == 1
        peer.settimeout(5)
        assert peer.recv(1) == b""  # and the client's connection went with it
    finally:
        left.close()
        right.close()
        peer.close()
        logmod.configure("info")
    events = [json.loads(line) for line in log_path.read_text().splitlines()]
    (lost,) = [e for e in events if e["event"] == "fd.lost"]
    assert (lost["key"], lost["kind"], lost["peer"], lost["lost"]) == (77, "ADOPT", "slot 2", 1)
