"""Key routing and connection hand-off between workers, through the master."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import (
    M_PING,
    REPLY,
    build_seed_client,
    count_replies,
    cpu_seconds,
    fd_count,
    key_frame,
    keys_owned_by,
    recv_exact,
    run_seed_client,
    slot_pids,
    spills_from,
    wait_until,
)

from mpd.logs import log as logmod
from mpd.master import fdbudget
from mpd.master.broker import Broker
from mpd.master.slots import Slots, WorkerProc
from mpd.wire import messages as msg
from mpd.wire import routing
from mpd.wire.channel import Channel, close_fds

# --- rendezvous hashing ---------------------------------------------------------------------

def test_owner_is_stable_and_scaling_moves_few_keys():
    keys = range(-5000, 5000)
    h = routing.key_hash
    four = {k: routing.owner(h(k), (0, 1, 2, 3)) for k in keys}
    assert four == {k: routing.owner(h(k), (0, 1, 2, 3)) for k in keys}
    assert {routing.ranking(h(k), (0, 1, 2, 3))[0] for k in keys[:100]} <= {0, 1, 2, 3}
    assert all(routing.ranking(h(k), (0, 1, 2, 3))[0] == four[k] for k in keys)
    spread = [list(four.values()).count(s) for s in range(4)]
    assert min(spread) > 2000, spread  # 2500 each if even
    five = {k: routing.owner(h(k), (0, 1, 2, 3, 4)) for k in keys}
    moved = [k for k in keys if four[k] != five[k]]
    assert all(five[k] == 4 for k in moved)  # only the new slot takes keys
    assert 0.15 < len(moved) / len(keys) < 0.25, len(moved)  # about 1/5


# --- hand-off -------------------------------------------------------------------------------

def test_every_client_is_served_by_the_owner_of_its_key(mpd_factory):
    server = mpd_factory({"workers": {"workers": 4}, "log": {"level": "debug"}})
    rng = random.Random(7)
    keys = rng.sample(range(-2**31, 2**31 - 1), 400)

    def client(key: int) -> bytes:
        with server.connect() as sock:
            sock.sendall(key_frame(key) + M_PING)
            return recv_exact(sock, len(REPLY))

    with ThreadPoolExecutor(50) as pool:
        assert list(pool.map(client, keys)) == [REPLY] * 400
    pids = slot_pids(server)
    slots = (0, 1, 2, 3)
    bound = wait_until(lambda: len(server.events("client.bound")) >= 400 and
                       server.events("client.bound"), what="400 client.bound events")
    served_by = {e["key"]: e["pid"] for e in bound}
    assert set(served_by) == set(keys)
    wrong = [k for k in keys if served_by[k] != pids[routing.owner(routing.key_hash(k), slots)]]
    assert wrong == []
    dispatched = server.events("fd.dispatched")
    # About 3 in 4 clients were accepted by a worker that does not own their key.
    assert 200 < len(dispatched) < 400
    assert all(e["to_slot"] == routing.owner(routing.key_hash(e["key"]), slots)
               for e in dispatched)
    assert all(e["from_slot"] != e["to_slot"] and e["latency_us"] >= 0 for e in dispatched)


def test_pings_sent_with_the_key_frame_survive_the_hand_off_in_order(mpd_factory):
    server = mpd_factory({"workers": {"workers": 4}, "log": {"level": "debug"}})
    rng = random.Random(3)
    for _ in range(40):
        key = rng.randint(-2**31, 2**31 - 1)
        with server.connect() as sock:
            # Key frame, then pings of growing size, one send, before any reply.
            pings = [b"M" + b"x" * n + b"\0" for n in (1, 1000, 20000)] + [b"plain\0", M_PING]
            sock.sendall(key_frame(key) + b"".join(pings))
            assert recv_exact(sock, len(REPLY) * len(pings)) == REPLY * len(pings)
            # A frame split across sends after the hand-off still completes.
            sock.sendall(b"Mhalf")
            sock.sendall(b" a frame\0")
            assert recv_exact(sock, len(REPLY)) == REPLY
    assert len(server.events("fd.dispatched")) > 10


def test_a_hand_off_waits_until_the_replies_already_due_are_read(mpd_factory):
    # More replies than the kernel buffers between worker and client can hold (the
    # worker's send buffer grows to tcp_wmem's 4 MB at most, the client's receive buffer
    # is kept small), so when the key frame comes the worker still holds replies for this
    # client: it must write them all before the client moves, or the stream breaks.
    server = mpd_factory({"workers": {"workers": 2, "max_output_buffer": 64 << 20},
                          "log": {"level": "debug"}})
    slot_of = {pid: slot for slot, pid in slot_pids(server).items()}
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(30)
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(M_PING)
        assert recv_exact(sock, len(REPLY)) == REPLY
        here = slot_of[server.wait_event("client.accepted")["pid"]]
        key = keys_owned_by(1 - here, (0, 1), 1, seed=8)[0]  # the other slot's key
        pings = 250_000  # 5 MB of replies
        sender = threading.Thread(target=sock.sendall,
                                  args=(M_PING * pings + key_frame(key) + b"after\0",))
        sender.start()
        assert recv_exact(sock, len(REPLY) * (pings + 1)) == REPLY * (pings + 1)
        sender.join(30)
    dispatched = server.wait_event("fd.dispatched", key=key)
    assert dispatched["to_slot"] == 1 - here and dispatched["carried"] == len(b"after\0")


def test_keyless_clients_of_a_retiring_worker_move_on_a_scale_down(mpd_factory):
    # Three clients fill a worker: six keyless clients are three on each slot.
    server = mpd_factory({"workers": {"workers": 2, "max_clients": 3}, "log": {"level": "debug"}})
    clients: list[socket.socket] = []
    for _ in range(6):
        sock = server.connect()
        sock.sendall(M_PING)
        assert recv_exact(sock, len(REPLY)) == REPLY
        clients.append(sock)
    # One worker, with room for all (CONFIG reaches slot 0 before the clients do).
    server.config_path.write_text(server.config_path.read_text().replace(
        "workers = 2", "workers = 1").replace("max_clients = 3", "max_clients = 10"))
    server.signal(signal.SIGHUP)
    server.wait_event("worker.exited", worker_pid=slot_pids(server)[1])
    # The master may read the retiring worker's last HANDOFFs after it saw it exit.
    wait_until(lambda: len(server.events("fd.dispatched", from_slot=1)) >= 3,
               what="the retiring worker's three clients dispatched")
    moved = server.events("fd.dispatched", from_slot=1)
    assert len(moved) == 3 and all(e["key"] is None for e in moved)
    assert all(e["to_slot"] == 0 for e in moved)
    for sock in clients:  # every one of them is still served, now by slot 0
        sock.sendall(M_PING)
        assert recv_exact(sock, len(REPLY)) == REPLY
        sock.close()


def test_ten_thousand_hand_offs_leak_no_fd(mpd_factory):
    server = mpd_factory({"workers": {"workers": 2}, "log": {"level": "debug"}})
    workers = server.wait_workers(2)
    slots = (0, 1)
    keys = keys_owned_by(0, slots, 50) + keys_owned_by(1, slots, 50)

    def clients(count: int) -> None:
        def one(i: int) -> None:
            with server.connect() as sock:
                sock.sendall(key_frame(keys[i % len(keys)]) + M_PING)
                assert recv_exact(sock, len(REPLY)) == REPLY
                if i % 2:  # half of them reset the connection instead of closing it
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(one, range(count)))

    processes = [server.pid, *workers]
    baseline = {pid: fd_count(pid) for pid in processes}  # idle: no client yet
    clients(200)  # warm up
    before = len(server.events("fd.dispatched"))
    # Half the keys belong to the worker that did not accept the client: hand-offs.
    while len(server.events("fd.dispatched")) - before < 10_000:
        clients(2000)
    wait_until(lambda: {pid: fd_count(pid) for pid in processes} == baseline, timeout=10,
               what=f"fd counts back to {baseline}")
    # And nothing is left behind in an epoll set either: a stale registration of a
    # closed client would make its worker spin on events nobody reads.
    before_cpu = {pid: cpu_seconds(pid) for pid in processes}
    time.sleep(1.0)  # a span to measure CPU over, not a wait for a condition
    busy = {pid: cpu_seconds(pid) - before_cpu[pid] for pid in processes}
    assert all(used < 0.2 for used in busy.values()), busy


def test_a_stalled_worker_does_not_block_the_master_and_gets_its_clients_later(mpd_factory):
    server = mpd_factory({"workers": {"workers": 2, "worker_timeout": 120},
                          "log": {"level": "debug"}})
    server.wait_workers(2)
    pids = slot_pids(server)
    slots = (0, 1)
    stalled = pids[1]
    os.kill(stalled, signal.SIGSTOP)  # it stops reading its channel
    try:
        # 40 clients for slot 1, each carrying 30 KB: far more than a channel buffer holds.
        big = b"M" + b"y" * 30000 + b"\0"
        socks = []
        for key in keys_owned_by(1, slots, 40):
            sock = server.connect(timeout=20)
            sock.sendall(key_frame(key) + big)
            socks.append(sock)
        # Meanwhile the master and the other worker carry on.
        for _ in range(20):
            with server.connect() as sock:
                sock.sendall(b"hello\0")
                assert recv_exact(sock, len(REPLY)) == REPLY
        server.signal(signal.SIGHUP)  # the master still reacts
        server.wait_event("config.reloaded")
    finally:
        os.kill(stalled, signal.SIGCONT)
    for sock in socks:  # every queued hand-off arrives, bytes intact
        assert recv_exact(sock, len(REPLY)) == REPLY
        sock.close()
    assert len(server.events("fd.dispatched", to_slot=1)) == 40


def test_a_hot_key_that_fills_its_slot_does_not_lock_that_slots_other_keys_out(mpd_factory):
    server = mpd_factory({"workers": {"workers": 3, "max_clients": 10}, "log": {"level": "debug"}})
    server.wait_workers(3)
    slots = (0, 1, 2)
    hot = keys_owned_by(1, slots, 1, seed=21)[0]
    crowd = []
    for _ in range(10):  # one hot key's clients fill slot 1
        sock = server.connect()
        sock.sendall(key_frame(hot) + M_PING)
        assert recv_exact(sock, len(REPLY)) == REPLY
        crowd.append(sock)
    # Ordinary keyed clients, a third of them slot 1's: every one is served, slot 1's by
    # the next slot in their key's ranking, none refused.
    keys = [k for n in (0, 1, 2) for k in keys_owned_by(n, slots, 5, seed=30 + n)]
    ordinary = []
    for key in keys:
        sock = server.connect()
        sock.sendall(key_frame(key) + M_PING)
        assert recv_exact(sock, len(REPLY)) == REPLY, key
        ordinary.append(sock)
    for sock in ordinary:  # and they stay served where they landed
        sock.sendall(M_PING)
        assert recv_exact(sock, len(REPLY)) == REPLY
    spilled = wait_until(lambda: len(server.events("fd.spilled")) >= 5 and
                         server.events("fd.spilled"), what="slot 1's five keys passed on")
    theirs = set(keys_owned_by(1, slots, 5, seed=31))
    assert {e["key"] for e in spilled} == theirs and spills_from(server, 1) == spilled
    for key in theirs:
        (dispatched,) = [e for e in server.events("fd.dispatched", key=key)
                         if e["to_slot"] != 1]
        assert dispatched["to_slot"] == routing.ranking(routing.key_hash(key), slots)[1]
    assert server.events("fd.refused") == []
    for sock in crowd + ordinary:
        sock.close()


def test_handoff_to_a_respawning_slot_waits_for_it(mpd_factory):
    server = mpd_factory({"workers": {"workers": 2}, "log": {"level": "debug"}})
    server.wait_workers(2)
    pids = slot_pids(server)
    key = keys_owned_by(1, (0, 1), 1, seed=5)[0]
    os.kill(pids[1], signal.SIGKILL)
    server.wait_event("worker.exited", worker_slot=1)
    # The master either holds the hand-off until slot 1 is back, or the new worker
    # already serves: either way slot 1 gets the client.
    with server.connect(timeout=10) as sock:
        sock.sendall(key_frame(key) + M_PING)
        assert recv_exact(sock, len(REPLY)) == REPLY
    new_pid = server.wait_event("worker.spawned", worker_slot=1, count=2)["worker_pid"]
    assert server.wait_event("fd.dispatched", key=key)["to_pid"] == new_pid


def test_the_seeds_mpclient2_with_100_clients_against_4_workers(mpd_factory, tmp_path):
    mpclient2 = build_seed_client("mpclient2", tmp_path)
    server = mpd_factory({"workers": {"workers": 4}, "log": {"level": "debug"}})
    # 100 clients, each `C` + rand() key, then `M` pings in turn, 1 ms apart. One round
    # of 100 replies means every client was answered; two rounds, that they go on.
    output = run_seed_client([str(mpclient2), "127.0.0.1", str(server.port), "100", "1"],
                             lambda out: count_replies(out) >= 200, timeout=60)
    assert output.count("connect socket success!") == 100
    replies = [line for line in output if line.startswith("recv from server:")]
    assert set(replies) == {"recv from server: hello, server ping!"}
    dispatched = server.wait_event("fd.dispatched", count=50)  # about 3 in 4 are handed off
    assert dispatched["to_slot"] == routing.owner(routing.key_hash(dispatched["key"]),
                                                  (0, 1, 2, 3))
    assert all(e["key"] >= 0 for e in server.events("fd.dispatched"))  # glibc rand()


def test_the_owner_agrees_with_the_ranking():
    rng = random.Random(12)
    for slots in [(0,), (0, 1), (0, 1, 2, 3), tuple(range(30))]:
        for _ in range(2000):
            h = routing.key_hash(rng.randint(-2**31, 2**31 - 1))
            assert routing.owner(h, slots) == routing.ranking(h, slots)[0]
            h = routing.key_hash(rng.randbytes(8) if hasattr(rng, "randbytes") else
                                 bytes(rng.randrange(256) for _ in range(8)))
            assert routing.owner(h, slots) == routing.ranking(h, slots)[0]


def old_owner(key: int, slots: tuple[int, ...]) -> int:
    """How mpd routed an int32 key before keys were 64 bits (splitmix64 of key << 32 | slot)."""
    mask = (1 << 64) - 1
    best_score, best = -1, slots[0]
    for slot in slots:
        z = (((key & 0xFFFFFFFF) << 32) | slot) + 0x9E3779B97F4A7C15 & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z ^= z >> 31
        if z > best_score:
            best_score, best = z, slot
    return best


def test_int32_keys_route_exactly_as_before_and_other_keys_spread():
    rng = random.Random(5)
    for slots in [(0, 1), (0, 1, 2, 3), tuple(range(30))]:
        for _ in range(3000):
            key = rng.randint(-2**31, 2**31 - 1)
            assert routing.owner(routing.key_hash(key), slots) == old_owner(key, slots)
    for keys in (range(10_000), [b"room-%d" % n for n in range(10_000)],
                 [f"stream {n}" for n in range(10_000)], range(2**40, 2**40 + 10_000)):
        owners = [routing.owner(routing.key_hash(routing.normalize(k)), (0, 1, 2, 3))
                  for k in keys]
        assert min(owners.count(s) for s in range(4)) > 2000  # 2500 each if even
    # A str key is its UTF-8 bytes; anything else is refused with a reason.
    assert routing.normalize("caf\u00e9") == "caf\u00e9".encode()
    for bad in (True, 2**64, b"x" * 1025, 1.5, None):
        with pytest.raises((TypeError, ValueError)):
            routing.normalize(bad)


# --- the master's routing of one HANDOFF, on real socketpairs -------------------------------

@pytest.fixture
def broker_of_four():
    """The hand-off broker with four 'workers' whose channel ends the test holds: no
    processes, so a HANDOFF can carry any owner hint."""
    logmod.configure("warning")
    slots = Slots(4)
    ends: dict[int, Channel] = {}
    for slot in range(4):
        ours, theirs = Channel.pair()
        worker = WorkerProc(slot=slot, pid=4_000_000 + slot, channel=Channel(ours, f"slot {slot}"))
        worker.state = "ready"
        slots.add(worker)
        ends[slot] = Channel(theirs, "master")

    def send(worker: WorkerProc, message: msg.Message, fds: list[int]) -> bool:
        worker.channel.send(message, fds)
        return True
    try:
        yield Broker(slots, send), slots, ends
    finally:
        for worker in slots.workers.values():
            worker.channel.close()
        for end in ends.values():
            end.close()
        logmod.configure("info")


def handoff(key: int, fd: int, **fields) -> msg.Client:
    client = msg.Client(msg.Kind.HANDOFF, key, routing.key_hash(key), b"M\0", sent_ns=1)
    for name, value in fields.items():
        setattr(client, name, value)
    client.fds = [fd]
    return client


@pytest.mark.parametrize("hint, epoch, goes_to", [
    ("other", 1, "other"),   # the routes' epoch: the sender's answer stands, not recomputed
    ("other", 2, "owner"),   # the sender had other routes (a scale in between): recomputed
    ("other", 0, "owner"),   # no epoch (the release before's worker): computed
    (None, 1, "owner"),      # no answer (a retiring sender): computed
    (7, 1, "owner"),         # not a slot of the table: computed
])
def test_the_master_takes_the_senders_owner_only_from_the_same_routes(broker_of_four, hint,
                                                                     epoch, goes_to):
    broker, slots, ends = broker_of_four
    key = 123456789
    owner = routing.owner(routing.key_hash(key), (0, 1, 2, 3))
    sender, other = [slot for slot in range(4) if slot != owner][:2]
    r, w = os.pipe()
    broker.dispatch(slots.serving[sender], handoff(
        key, r, owner=other if hint == "other" else hint, epoch=epoch))
    received = {slot: end.receive() for slot, end in ends.items()}
    expected = other if goes_to == "other" else owner
    assert [slot for slot, messages in received.items() if messages] == [expected]
    (adopt,) = received[expected]
    assert adopt.kind == msg.Kind.ADOPT and adopt.unread == b"M\0" and adopt.key == key
    assert (adopt.from_slot, adopt.from_pid) == (sender, 4_000_000 + sender)
    os.write(w, b"x")
    assert os.read(adopt.fds[0], 1) == b"x"  # the client's fd came through
    close_fds([*adopt.fds, w])
    assert not broker.held


# --- held clients: the owner's slot has no worker ------------------------------------------

def test_held_clients_are_dropped_after_hold_max_and_on_stop(tmp_path):
    log_path = tmp_path / "master.log"
    logmod.configure(target="file", path=str(log_path))
    slots = Slots(2)  # no worker serves either slot: every hand-off is held
    broker = Broker(slots, lambda *args: True, hold_timeout=0.05, hold_max=0.5)
    sender = WorkerProc(slot=0, pid=4_000_000, channel=None)  # type: ignore[arg-type]

    def hand_off(key: int) -> socket.socket:
        ours, theirs = socket.socketpair()
        theirs.settimeout(5)
        broker.dispatch(sender, handoff(key, ours.detach()))
        return theirs

    try:
        client = hand_off(11)
        assert len(broker.held) == 1 and broker.next_deadline(time.monotonic())
        broker.retry_held()  # before any deadline: still held, nothing closed
        assert len(broker.held) == 1
        since = broker.held[0].since
        wait_until(lambda: (broker.retry_held(), not broker.held)[1], timeout=5,
                   what="the held client dropped after hold_max")
        assert time.monotonic() - since >= 0.5
        assert client.recv(1) == b""  # its connection is closed
        client.close()
        client = hand_off(13)  # another is dropped when mpd stops
        broker.drop_held("stopping")
        assert client.recv(1) == b"" and not broker.held
        client.close()
    finally:
        logmod.configure("info")
    events = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [(e["key"], e["reason"]) for e in events if e["event"] == "fd.dropped"] == [
        (11, "no worker took it"), (13, "stopping")]


def test_a_held_client_goes_to_its_owner_once_the_slot_has_a_worker(broker_of_four):
    broker, slots, ends = broker_of_four
    key = 987654
    owner = routing.owner(routing.key_hash(key), (0, 1, 2, 3))
    away = slots.serving.pop(owner)  # the owner's slot is between two workers
    r, w = os.pipe()
    sender = next(iter(slots.serving.values()))
    broker.dispatch(sender, handoff(key, r, epoch=1))
    assert len(broker.held) == 1  # held, not given to another slot at once
    assert not any(end.receive() for end in ends.values())
    slots.serving[owner] = away  # the respawned worker
    broker.retry_held()
    (adopt,) = ends[owner].receive()
    assert adopt.kind == msg.Kind.ADOPT and adopt.key == key and not broker.held
    close_fds([*adopt.fds, w])


def test_a_client_that_a_full_slot_passes_on_goes_down_its_keys_ranking(broker_of_four):
    broker, slots, ends = broker_of_four
    key = 424242
    ranking = routing.ranking(routing.key_hash(key), (0, 1, 2, 3))

    def passed_on(by: int, rank: int) -> tuple[int, msg.Client]:
        """`by` was full: its HANDOFF back, with the rank to look from. Who got the ADOPT."""
        r, w = os.pipe()
        os.close(w)
        broker.dispatch(slots.serving[by], handoff(key, r, owner=ranking[0], epoch=1,
                                                   rank=rank, passed_on=True))
        ((slot, adopt),) = [(s, m) for s, end in ends.items() for m in end.receive()]
        close_fds(adopt.fds)
        return slot, adopt

    for place in (1, 2, 3):  # each that passes it on counts as full until it says more
        slot, adopt = passed_on(ranking[place - 1], place)
        assert slot == ranking[place] and adopt.from_slot == ranking[place - 1]
        assert adopt.rank == place and adopt.last is False
    # The last one was full too: every slot is, so the broker holds it.
    r, w = os.pipe()
    broker.dispatch(slots.serving[ranking[3]], handoff(key, r, owner=ranking[0], epoch=1,
                                                       rank=4, passed_on=True))
    assert len(broker.held) == 1 and not any(end.receive() for end in ends.values())
    # A heartbeat says a slot has a place again: the held client goes there.
    slots.serving[ranking[2]].stats = {"clients": 3, "max_clients": 10}
    broker.retry_held()
    ((adopt,),) = [end.receive() for s, end in ends.items() if s == ranking[2]]
    assert (adopt.rank, adopt.last) == (2, False) and not broker.held
    close_fds([*adopt.fds, w])


def full(slots: Slots, *which: int) -> None:
    for slot in which:
        slots.serving[slot].stats = {"clients": 5, "max_clients": 5}


def test_the_master_spills_a_client_of_a_full_owner_by_its_heartbeat(broker_of_four):
    broker, slots, ends = broker_of_four
    key = 5151
    ranking = routing.ranking(routing.key_hash(key), (0, 1, 2, 3))
    full(slots, ranking[0])  # the owner's heartbeat said it is full
    r, w = os.pipe()
    sender = slots.serving[ranking[3]]
    broker.dispatch(sender, handoff(key, r, epoch=1))
    ((adopt,),) = [end.receive() for s, end in ends.items() if s == ranking[1]]
    assert (adopt.rank, adopt.last) == (1, False)
    assert slots.serving[ranking[1]].stats["clients"] == 1  # counted until its heartbeat
    close_fds([*adopt.fds, w])


def test_a_held_client_goes_as_the_last_once_full_wait_is_over(broker_of_four):
    broker, slots, ends = broker_of_four
    broker.full_wait = 0.2
    key = 6161
    ranking = routing.ranking(routing.key_hash(key), (0, 1, 2, 3))
    full(slots, 0, 1, 2, 3)
    sender = slots.serving[ranking[1]]
    sender.stats["clients"] += 1  # it took another since its heartbeat: full without this one
    r, w = os.pipe()
    broker.dispatch(sender, handoff(key, r, epoch=1))
    assert len(broker.held) == 1
    due = broker.next_deadline(time.monotonic())
    assert due is not None and due - broker.held[0].since == pytest.approx(0.2)
    wait_until(lambda: (broker.retry_held(), not broker.held)[1], timeout=5,
               what="the held client sent as the last")
    ((adopt,),) = [end.receive() for s, end in ends.items() if s == ranking[0]]
    assert (adopt.rank, adopt.last) == (0, True)  # the owner takes or refuses
    close_fds([*adopt.fds, w])


def test_past_its_fd_budget_the_master_holds_nothing(broker_of_four, tmp_path):
    broker, slots, ends = broker_of_four
    log_path = tmp_path / "master.log"
    logmod.configure(target="file", path=str(log_path))
    counted = []
    broker.count = lambda slot, name: counted.append((slot, name))
    broker.budget.set_limit(broker.budget.own + fdbudget.RESERVE)  # no room for any client
    key = 7171
    ranking = routing.ranking(routing.key_hash(key), (0, 1, 2, 3))
    full(slots, 0, 1, 2, 3)
    sender = slots.serving[ranking[2]]
    sender.stats["clients"] += 2  # full without the two it hands off
    r, w = os.pipe()
    broker.dispatch(sender, handoff(key, r, epoch=1))
    assert not broker.held  # not held: the last try at once
    ((adopt,),) = [end.receive() for s, end in ends.items() if s == ranking[0]]
    assert adopt.last is True
    close_fds([*adopt.fds, w])
    # No channel with room (each holds its share of the budget), and the queued clients'
    # fds already take the half of the reserve that a burst may use: the client is closed.
    queued = []
    for slot in range(4):
        channel = slots.serving[slot].channel
        fds = list(os.pipe())  # 4 x 2 = RESERVE // 2
        channel.queue.append((b"x", fds))
        channel.queued_fds += len(fds)
        queued += fds
    assert broker.holding() == fdbudget.RESERVE // 2
    client, ours = socket.socketpair()
    broker.dispatch(sender, handoff(key, ours.detach(), epoch=1))
    client.settimeout(5)
    assert client.recv(1) == b"" and not broker.held
    client.close()
    for slot in range(4):
        slots.serving[slot].channel.queue.clear()
        slots.serving[slot].channel.queued_fds = 0
    close_fds(queued)
    logmod.configure("info")
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    over = [(e["worker_slot"], e["to_slot"]) for e in lines if e["event"] == "fd.over_budget"]
    assert over == [(ranking[0], ranking[0]), (ranking[0], None)]
    assert counted == [(ranking[0], "over_budget")] * 2


def test_a_slot_whose_channel_holds_its_share_of_the_budget_is_passed_over(broker_of_four):
    broker, slots, ends = broker_of_four
    key = 8181
    ranking = routing.ranking(routing.key_hash(key), (0, 1, 2, 3))
    stalled = slots.serving[ranking[0]].channel  # its worker reads nothing (SIGSTOP)
    for _ in range(broker.budget.slot_share):
        stalled.queue.append((b"x", []))
    try:
        r, w = os.pipe()
        broker.dispatch(slots.serving[ranking[2]],
                        handoff(key, r, epoch=1))
        ((adopt,),) = [end.receive() for s, end in ends.items() if s == ranking[1]]
        close_fds([*adopt.fds, w])
    finally:
        stalled.queue.clear()
