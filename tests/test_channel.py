"""The master<->worker channel on a real SEQPACKET socketpair, and the wire contract's
messages: malformed messages are dropped with their fds closed, a client's hand-off
carries its key, state, bytes and address whole, a full socket queues messages instead
of blocking, and the release before's workers (channel version 2) are spoken to in their
layout."""

from __future__ import annotations

import json
import os
import resource
import socket

import pytest

from mpd.logs import log as logmod
from mpd.wire import legacy
from mpd.wire import messages as msg
from mpd.wire.channel import MAX_MESSAGE, VERSIONS, Channel, ChannelClosed
from mpd.wire.messages import HEADER, VERSION, Kind
from mpd.wire.routing import key_hash


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


def client(kind: Kind, key: int | bytes | None, **fields) -> msg.Client:
    message = msg.Client(kind, key, key_hash(key) if key is not None else 0)
    for name, value in fields.items():
        setattr(message, name, value)
    return message


def test_malformed_messages_are_dropped_and_their_fds_closed(pair):
    left, right = pair
    before = open_fds()
    good = msg.Stats(values={"clients": 3}).encode()
    bad = [b"\x01",  # shorter than a header
           HEADER.pack(VERSION + 1, Kind.STATS, 2) + b"{}",  # unknown version
           HEADER.pack(0, Kind.STATS, 2) + b"{}",  # unknown version
           HEADER.pack(VERSION, 99, 2) + b"{}",  # unknown type
           HEADER.pack(VERSION, Kind.STATS, 5) + b"{nope",  # bad JSON
           HEADER.pack(VERSION, Kind.STATS, 2) + b"[]",  # not an object
           HEADER.pack(VERSION, Kind.HELLO, 11) + b'{"pid":"x"}',  # a field of the wrong type
           HEADER.pack(VERSION, Kind.STATS, 50) + b"{}",  # meta length past the end
           HEADER.pack(VERSION, Kind.ADOPT, 3) + b"abc"]  # short binary meta
    for data in bad:
        r, w = os.pipe()  # an fd rides along with every bad message
        socket.send_fds(left.sock, [data], [r, w])
        os.close(r)
        os.close(w)
    socket.send_fds(left.sock, [good], [])
    messages = right.receive()
    assert [(m.kind, m.values) for m in messages] == [(Kind.STATS, {"clients": 3})]
    assert open_fds() == before  # the fds of the bad messages were closed


@pytest.mark.parametrize("key", [-5, 2**31 - 1, 2**40, -(2**63), b"room 7", b"", None])
def test_a_client_round_trips_with_its_fd_key_state_bytes_and_address(pair, key):
    left, right = pair
    r, w = os.pipe()
    sent = client(Kind.HANDOFF, key, unread=b"Mrest\0", state=b"\x80state", sent_ns=123,
                  owner=3, epoch=9, peer=("2001:db8::7", 65535), rank=2, passed_on=True)
    left.send(sent, [r])
    (message,) = right.receive()
    assert isinstance(message, msg.Client) and message.kind == Kind.HANDOFF
    assert (message.key, message.key_hash) == (key, sent.key_hash)
    assert (message.unread, message.state) == (b"Mrest\0", b"\x80state")
    assert (message.owner, message.epoch, message.rank, message.passed_on, message.last) == \
        (3, 9, 2, True, False)
    assert message.peer == ("2001:db8::7", 65535) and message.sent_ns == 123
    assert len(message.fds) == 1
    os.write(w, b"x")
    assert os.read(message.fds[0], 1) == b"x"  # the same pipe came across
    for fd in (*message.fds, w):
        os.close(fd)
    with pytest.raises(OSError):
        os.fstat(r)  # the sender's copy was closed once sent


def test_every_message_of_the_contract_round_trips():
    messages = [msg.Hello(slot=2, pid=77, version="9.9", state_version=3),
                msg.Stats(values={"clients": 1, "latency": {"buckets": [1, 2]}}),
                msg.GroupEnded(key=msg.key_to_json(b"\xffroom"), gseq=4),
                msg.Moved(move=5, members=3, size=100, pause_us=1500),
                msg.MoveFailed(move=5, reason="too big"),
                msg.Routes(epoch=3, table=[0, 1, 3]), msg.Retire(epoch=4, table=[0]),
                msg.Config(settings={"max_clients": 10, "generation": 2}), msg.Stop(),
                msg.MoveOut(move=6, key=msg.key_to_json(-3), to_slot=1),
                msg.MoveDone(move=6), msg.MoveAbort(move=6), msg.ReopenLogs(),
                msg.MoveChunk(7, 2, True, 10, b"0123")]
    for message in messages:
        decoded = msg.decode(message.encode(), [])
        assert type(decoded) is type(message) and decoded.kind == message.kind
        assert vars(decoded) == {**vars(message), "fds": []}
    assert msg.key_from_json(msg.key_to_json(b"\xffroom")) == b"\xffroom"
    with pytest.raises(ValueError):
        msg.key_from_json({"float": 1.5})


def test_the_release_befores_workers_are_spoken_to_in_channel_version_2(pair):
    """After an upgrade in place the master adopts the previous release's workers, which
    read and write version 2 until the roll replaces them."""
    left, right = pair
    left.version = legacy.VERSION
    r, w = os.pipe()
    left.send(client(Kind.ADOPT, 9, unread=b"M\0", from_slot=1, sent_ns=5, rank=1,
                     last=True, peer=("203.0.113.9", 41000)), [r])
    data, fds, _flags, _addr = socket.recv_fds(right.sock, MAX_MESSAGE, 1)
    version, kind, meta_len = HEADER.unpack_from(data)
    assert (version, kind, meta_len) == (2, Kind.ADOPT, legacy.HANDOFF_META.size) == (2, 11, 48)
    has_key, key, from_slot, _pid, sent_ns, owner, packed, _peer = \
        legacy.HANDOFF_META.unpack_from(data, HEADER.size)
    assert (has_key, key, from_slot, sent_ns, owner) == (True, 9, 1, 5, -1)
    assert packed == 1 << 16 | 1 << 30 and data.endswith(b"M\0")  # rank 1, last
    left.send(msg.Routes(epoch=5, table=[0, 1]))  # its JSON: the slot table as it knew it
    routes, _fds, _flags, _addr = socket.recv_fds(right.sock, MAX_MESSAGE, 1)
    assert routes[0] == 2 and json.loads(routes[HEADER.size:]) == {"slots": [0, 1]}
    with pytest.raises(ValueError):  # what it could not read is not sent
        left.send(client(Kind.ADOPT, b"room"))
    with pytest.raises(ValueError):
        left.send(msg.MoveOut(move=1, key=None, to_slot=0))
    # What it sends: a version-2 HANDOFF, read as this code's Client.
    right.version = legacy.VERSION
    body = legacy.HANDOFF_META.pack(True, -7, 2, 4321, 99, 1, 3 | 2 << 16, b"\0" * 19)
    socket.send_fds(left.sock, [HEADER.pack(2, Kind.HANDOFF, len(body)) + body + b"rest"], [])
    left.version = legacy.VERSION
    right.sock, left.sock = left.sock, right.sock
    (handoff,) = left.receive()
    assert (handoff.key, handoff.key_hash, handoff.unread) == (-7, (-7) & 0xFFFFFFFF, b"rest")
    assert (handoff.rank, handoff.passed_on, handoff.epoch) == (2, True, 0)
    assert VERSIONS == (2, VERSION) and VERSION == 3
    for fd in (*fds, w):
        os.close(fd)


def test_a_full_channel_queues_in_order_and_delivers_when_read(pair):
    left, right = pair
    sent = 0
    while not left.wants_write:  # fill the socket until a send would block
        r, w = os.pipe()
        os.close(w)
        left.send(client(Kind.ADOPT, sent, unread=b"y" * 8000), [r])
        sent += 1
    for _ in range(5):  # these wait in the queue, their fds held open
        r, w = os.pipe()
        os.close(w)
        left.send(client(Kind.ADOPT, sent, unread=b"y" * 8000), [r])
        sent += 1
    assert len(left.queue) >= 5 and left.queued_fds >= 5
    keys: list[int] = []
    while len(keys) < sent:
        for message in right.receive():
            keys.append(message.key)
            for fd in message.fds:
                os.close(fd)
        left.flush()
    assert keys == list(range(sent))
    assert not left.wants_write


def test_too_big_a_message_is_refused_and_the_fd_stays_the_callers(pair):
    left, _right = pair
    r, w = os.pipe()
    with pytest.raises(ValueError):
        left.send(client(Kind.ADOPT, 1, unread=b"z" * MAX_MESSAGE), [r])
    os.fstat(r)  # still open: the caller keeps it
    os.close(r)
    os.close(w)


def test_eof_after_the_last_messages(pair):
    left, right = pair
    left.send(msg.Stats(values={"clients": 1}))
    left.send(msg.Hello(slot=0))
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
        worker.send(client(Kind.HANDOFF, key), [r])
    master.send(msg.Routes(epoch=2, table=[0]))  # never read by the worker
    worker.sock.close()
    messages = master.receive()
    assert [m.key for m in messages] == [0, 1, 2]
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
    peer_client, peer = socket.socketpair()
    try:
        left.send(client(Kind.ADOPT, 77, unread=b"M\0", sent_ns=1), [peer_client.detach()])
        left.send(msg.Stats(values={"clients": 1}))
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
