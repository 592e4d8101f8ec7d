"""The worker loop in this very process, on a real socketpair for its channel and a real
listening socket: the test plays the master on the channel's other end (in a thread) and
the clients, while the main thread runs Worker.run() until it returns."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
from conftest import M_PING, REPLY, key_frame, keys_owned_by, recv_exact
from moveload import join_frame

from mpd.apps import loader
from mpd.apps.interface import Application
from mpd.apps.ping import REFUSAL, Ping
from mpd.config import schema as configmod
from mpd.logs import log as logmod
from mpd.wire import messages as msg
from mpd.wire import routing
from mpd.wire.channel import Channel, ChannelClosed, close_fds
from mpd.wire.exits import EXIT_OK
from mpd.wire.routing import Routes
from mpd.worker.link import MasterLink
from mpd.worker.timeouts import ROUND
from mpd.worker.worker import Worker

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTTIN,
           signal.SIGTTOU)


class Harness:
    """A worker for slot 0 of a two-slot table, its listener, and the master's end."""

    def __init__(self, tmp_path: Path, settings: str = "", app: Application | None = None):
        self.log_path = tmp_path / "worker.log"
        # At debug: fd.dispatched, one line per hand-off, is a debug line.
        config = configmod.parse(f"[log]\ntarget = \"file\"\nfile = \"{self.log_path}\"\n"
                                 "level = \"debug\"\n"
                                 + settings, str(tmp_path / "mpd.toml"))
        logmod.configure_from(config)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        master_end, worker_end = Channel.pair()
        self.master_sock = master_end
        self.master = Channel(master_end, "worker")
        self.link = MasterLink(worker_end)
        self.app = app or loader.from_config(config)
        self.worker = Worker(config, self.app, self.listener, self.link, slot=0,
                             routes=Routes(1, (0, 1)))
        self.pending: list[msg.Message] = []  # received from the worker, not yet looked at

    def run(self, scenario: Callable[[], None]) -> int:
        """Run the worker here until it returns; `scenario` in a thread. Whatever the
        scenario does, the channel's end is closed after it, so the loop ends."""
        failure: list[BaseException] = []

        def play() -> None:
            try:
                scenario()
            except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
                failure.append(e)
            finally:
                self.master.close()  # an orphaned worker leaves its loop

        thread = threading.Thread(target=play, daemon=True)
        thread.start()
        code = self.worker.run()
        thread.join(30)
        if failure:
            raise failure[0]
        return code

    def receive(self, kind: msg.Kind, timeout: float = 10.0) -> Any:
        """The next message of `kind` from the worker (those before it are skipped)."""
        poller = select.poll()
        poller.register(self.master_sock.fileno(), select.POLLIN)
        while True:
            while self.pending:
                message = self.pending.pop(0)
                if message.kind == kind:
                    return message
                close_fds(message.fds)
            assert poller.poll(timeout * 1000), f"no {kind.name} from the worker"
            self.pending += self.master.receive()

    def last(self, kind: msg.Kind, timeout: float = 10.0) -> Any:
        """The last message of `kind` before the worker closed its end."""
        poller = select.poll()
        poller.register(self.master_sock.fileno(), select.POLLIN)
        found = next((m for m in reversed(self.pending) if m.kind == kind), None)
        while True:
            assert poller.poll(timeout * 1000), "the worker did not close its channel"
            try:
                messages = self.master.receive()
            except ChannelClosed:
                assert found is not None, f"no {kind.name} from the worker"
                return found
            for message in messages:
                close_fds(message.fds)
                found = message if message.kind == kind else found

    def send(self, message: msg.Message, fds: list[int] | None = None) -> None:
        self.master.send(message, fds or [])

    def events(self, name: str) -> list[dict[str, Any]]:
        lines = self.log_path.read_text().splitlines() if self.log_path.exists() else []
        return [e for e in map(json.loads, lines) if e["event"] == name]

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)


def adopt(handoff: msg.Client, **fields: Any) -> msg.Client:
    """The ADOPT the master would send for a HANDOFF."""
    adopted = msg.Client(msg.Kind.ADOPT, handoff.key, handoff.key_hash, handoff.unread,
                         handoff.state, handoff.peer, handoff.sent_ns)
    for name, value in fields.items():
        setattr(adopted, name, value)
    return adopted


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    handlers = {sig: signal.getsignal(sig) for sig in SIGNALS}
    made: list[Harness] = []

    def make(settings: str = "", app: Application | None = None) -> Harness:
        made.append(Harness(tmp_path, settings, app))
        return made[-1]
    try:
        yield make
    finally:
        for h in made:
            h.listener.close()
            h.master.close()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        logmod.configure("info")


def test_the_worker_loop_serves_hands_off_adopts_and_stops(harness):
    h = harness()
    ours = keys_owned_by(0, (0, 1), 1, seed=3)[0]
    theirs = keys_owned_by(1, (0, 1), 1, seed=4)[0]

    def scenario() -> None:
        assert h.receive(msg.Kind.HELLO).slot == 0
        assert h.receive(msg.Kind.STATS).values["clients"] == 0  # the first heartbeat
        with h.connect() as plain, h.connect() as keyed, h.connect() as foreign:
            plain.sendall(M_PING)
            assert recv_exact(plain, len(REPLY)) == REPLY
            keyed.sendall(key_frame(ours) + M_PING)
            assert recv_exact(keyed, len(REPLY)) == REPLY
            foreign.sendall(key_frame(theirs) + M_PING)
            handoff = h.receive(msg.Kind.HANDOFF)
            assert handoff.key == theirs and handoff.owner == 1 and handoff.epoch == 1
            assert handoff.unread == M_PING and handoff.state == b""
            # As the master would for slot 1's worker, give it back: this one adopts it.
            h.send(adopt(handoff, from_slot=1, from_pid=9), handoff.fds)
            assert recv_exact(foreign, len(REPLY)) == REPLY  # the carried ping, answered
            foreign.sendall(M_PING)
            assert recv_exact(foreign, len(REPLY)) == REPLY
            h.send(msg.Stop())
            for sock in (plain, keyed, foreign):  # closed at a frame boundary
                assert sock.recv(1) == b""
        final = h.last(msg.Kind.STATS)
        assert final.values["requests"] == 4 and final.values["handoffs_out"] == 1
        assert final.values["adopted"] == 1 and final.values["clients"] == 0

    assert h.run(scenario) == EXIT_OK
    (dispatched,) = h.events("fd.dispatched")
    assert dispatched["key"] == theirs and dispatched["from_slot"] == 1
    assert h.events("worker.stopped")


def test_a_failed_hand_off_send_pins_the_client_and_serves_it_in_place(harness):
    h = harness()
    h.link.heartbeat = 60.0  # no heartbeat meets the broken channel during the scenario
    theirs = keys_owned_by(1, (0, 1), 1, seed=5)[0]

    def scenario() -> None:
        h.receive(msg.Kind.HELLO)
        h.receive(msg.Kind.STATS)
        # The master stops reading: every send of the worker's fails (EPIPE), while the
        # worker still reads what the master sends it.
        h.master_sock.shutdown(socket.SHUT_RD)
        with h.connect() as client:
            client.sendall(key_frame(theirs) + M_PING)
            assert recv_exact(client, len(REPLY)) == REPLY  # served here after all
            client.sendall(M_PING)  # pinned: no second try
            assert recv_exact(client, len(REPLY)) == REPLY
            h.send(msg.Stop())
            assert client.recv(1) == b""

    assert h.run(scenario) == EXIT_OK
    (failed,) = h.events("fd.handoff_failed")
    assert failed["key"] == theirs and "Broken pipe" in failed["error"]
    assert not h.events("fd.dispatched")


def test_a_worker_that_loses_its_master_leaves(harness):
    h = harness()

    def scenario() -> None:
        h.receive(msg.Kind.HELLO)
        with h.connect() as client:
            client.sendall(M_PING)
            assert recv_exact(client, len(REPLY)) == REPLY
            h.master.close()  # the master is gone
            assert client.recv(1) == b""  # the worker left, and its client with it

    assert h.run(scenario) == EXIT_OK
    assert h.events("worker.orphaned")[0]["reason"] == "channel closed"


def test_a_full_worker_passes_an_adopted_client_on_and_refuses_it_as_the_last(harness):
    h = harness("[workers]\nmax_clients = 1\n")
    key = keys_owned_by(0, (0, 1), 1, seed=6)[0]

    def scenario() -> None:
        h.receive(msg.Kind.HELLO)
        with h.connect() as client:  # the one place it has
            client.sendall(M_PING)
            assert recv_exact(client, len(REPLY)) == REPLY
            ours, theirs = socket.socketpair()
            offer = msg.Client(msg.Kind.ADOPT, key, routing.key_hash(key), M_PING,
                               sent_ns=1, from_slot=1, from_pid=9)
            h.send(offer, [ours.detach()])
            back = h.receive(msg.Kind.HANDOFF)  # full: back to the master for the next slot
            assert back.key == key and back.rank == 1 and back.passed_on
            assert back.unread == M_PING and len(back.fds) == 1
            # The next slot is full too, and so on to the last, which is this one again.
            h.send(adopt(back, rank=1, last=True), back.fds)
            theirs.settimeout(10)
            assert recv_exact(theirs, len(REFUSAL)) == REFUSAL
            assert theirs.recv(1) == b""
            theirs.close()
            h.send(msg.Stop())
            assert client.recv(1) == b""
        final = h.last(msg.Kind.STATS)
        assert final.values["spilled"] == 1 and final.values["refused"] == 1

    assert h.run(scenario) == EXIT_OK
    (spilled,) = h.events("fd.spilled")
    assert spilled["key"] == key and spilled["rank"] == 0 and spilled["clients"] == 1
    (refused,) = h.events("fd.refused")
    assert refused["key"] == key


def test_bad_messages_from_the_master_change_nothing_and_the_worker_serves_on(harness):
    h = harness()
    theirs = keys_owned_by(1, (0, 1), 1, seed=7)[0]
    directory = os.open("/", os.O_RDONLY)  # an fd that is no socket

    def scenario() -> None:
        h.receive(msg.Kind.HELLO)
        with h.connect() as client:
            client.sendall(M_PING)
            assert recv_exact(client, len(REPLY)) == REPLY
            h.send(msg.Retire(epoch=2, table=[]))  # decodable, and no slot table
            h.send(msg.Routes(epoch=2, table=[1, 1]))
            h.send(msg.Config(settings={"max_clients": "lots"}))
            h.send(msg.Client(msg.Kind.ADOPT, 1, 1, sent_ns=1), [directory])
            client.sendall(M_PING)  # served on, by the same rules
            assert recv_exact(client, len(REPLY)) == REPLY
            with h.connect() as keyed:
                keyed.sendall(key_frame(theirs) + M_PING)
                handoff = h.receive(msg.Kind.HANDOFF)  # still slot 1's: the table held
                assert handoff.owner == 1 and handoff.epoch == 1
                close_fds(handoff.fds)
            h.send(msg.Stop())
            assert client.recv(1) == b""
        assert h.last(msg.Kind.STATS).values["clients"] == 0  # the directory never counted

    assert h.run(scenario) == EXIT_OK
    errors = h.events("channel.error")
    assert [e.get("kind") for e in errors] == ["RETIRE", "ROUTES", "CONFIG", "ADOPT"]
    assert "max_clients" in errors[2]["error"] and "refused, nothing changed" in errors[2]["error"]
    assert errors[3]["error"] == "fd unusable: Socket operation on non-socket"
    assert not h.events("worker.crashed")


class Buggy(Ping):
    """The ping protocol with a bug: a frame that starts with "boom" raises."""

    def data_received(self, data: bytes) -> None:
        if (bytes(self.buf) + data).startswith(b"boom"):
            raise RuntimeError("a bug in the protocol")
        super().data_received(data)


def raises(_message: msg.Message) -> None:
    raise RuntimeError("a bug in a message's handler")


def test_a_bug_met_with_one_client_or_message_ends_that_one_only(harness):
    # No stateless offer: every read reaches the protocol object.
    h = harness(app=Application(name="buggy", protocol=Buggy, refusal=REFUSAL))
    h.worker.reactions[msg.Kind.ROUTES] = raises

    def scenario() -> None:
        h.receive(msg.Kind.HELLO)
        with h.connect() as good, h.connect() as bad:
            good.sendall(M_PING)
            assert recv_exact(good, len(REPLY)) == REPLY
            bad.sendall(b"boom\0")
            assert bad.recv(1) == b""  # closed
            good.sendall(M_PING)  # served on
            assert recv_exact(good, len(REPLY)) == REPLY
            h.send(msg.Routes(epoch=2, table=[0, 1]))
            good.sendall(M_PING)
            assert recv_exact(good, len(REPLY)) == REPLY
            h.send(msg.Stop())
            assert good.recv(1) == b""
        final = h.last(msg.Kind.STATS).values
        assert final["requests"] == 3 and final["app_errors"] == 1

    assert h.run(scenario) == EXIT_OK
    (error,) = h.events("app.error")
    assert error["error"] == "RuntimeError('a bug in the protocol')"
    assert error["where"] == "data_received" and "Traceback" in error["exception"]
    (error,) = h.events("channel.error")
    assert error["kind"] == "ROUTES" and "a bug in a message's handler" in error["error"]
    assert "Traceback" in error["exception"]


def test_a_retry_after_emfile_is_no_end_of_the_pause_until_a_round_passes(harness):
    # The retry turns accepting on; when the upkeep round falls in the same turn, it must
    # not take that for a pause that is over (accept() has not even been tried yet).
    h = harness()
    worker = h.worker
    acceptor = worker.acceptor
    worker.epoll = worker.clients.epoll = select.epoll()  # what boot() makes
    acceptor.boot(worker.epoll)
    acceptor.pause("EMFILE", 100.0, retry=True)
    retry = acceptor.retry_at
    worker.next_round = retry  # the upkeep round is due in the retry's turn
    worker.next_heartbeat = float("inf")
    worker.on_timers(retry)
    assert acceptor.accepting  # the retry happened
    assert acceptor.pause_reason == "EMFILE"  # and the pause goes on
    acceptor.pause("EMFILE", retry, retry=True)  # that accept() met EMFILE again
    acceptor.retry_at = 0.0
    acceptor.resume()  # ... and the next goes through, and lasts a whole round:
    worker.on_timers(max(worker.next_round, acceptor.last_pause + ROUND))
    assert acceptor.pause_reason == ""
    resumed = [json.loads(line) for line in h.log_path.read_text().splitlines()
               if '"worker.accept_resumed"' in line]
    assert len(resumed) == 1 and resumed[0]["reason"] == "EMFILE"
    assert resumed[0]["pauses"] == 2


def test_a_room_forms_through_the_master_and_moves_out_and_back_whole(harness):
    """rooms in one worker: the first join goes through the master (the test), which sends
    the client back (ADOPT); the others find the room here. The room then moves out
    (MOVE_OUT: the transfer comes in chunks with the members' fds) and, as if this worker
    were the new owner, back in: the members chat on, the room's state (its count of
    lines) came along."""
    h = harness("[server]\nprotocol = \"rooms\"\n")
    key = b"lobby"

    def scenario() -> None:
        h.receive(msg.Kind.HELLO)
        members = []
        for n in range(3):
            client = h.connect()
            client.sendall(join_frame(b"J", key))
            if n == 0:
                handoff = h.receive(msg.Kind.HANDOFF)
                assert handoff.key == key and handoff.owner is None  # the master decides
                h.send(adopt(handoff, gseq=1), handoff.fds)
            assert recv_exact(client, len(b"ok 1\n")) == b"ok %d\n" % (n + 1)
            members.append(client)
        a, b, c = members
        a.sendall(b"hello\nfrom a\n")
        for other in (b, c):
            assert recv_exact(other, 13) == b"hello\nfrom a\n"
        c.sendall(b"half a li")  # a partial line: in c's protocol state when it moves
        # The move out: frozen, exported, sent in chunks with copies of the fds.
        h.send(msg.MoveOut(move=7, key=msg.key_to_json(key), to_slot=1))
        chunks = [h.receive(msg.Kind.MOVE_CHUNK)]
        while not chunks[-1].last:
            chunks.append(h.receive(msg.Kind.MOVE_CHUNK))
        assert sum(len(ch.fds) for ch in chunks) == 3
        b.sendall(b"while frozen\n")  # waits in the kernel: read by the new owner
        h.send(msg.MoveDone(move=7))  # this worker forgets the room ...
        for chunk in chunks:  # ... and takes it back as the new owner
            h.send(chunk, chunk.fds)
        moved = h.receive(msg.Kind.MOVED)
        assert moved.move == 7 and moved.members == 3
        for other in (a, c):
            assert recv_exact(other, 13) == b"while frozen\n"
        c.sendall(b"ne\n")
        assert recv_exact(a, 12) == b"half a line\n"
        assert recv_exact(b, 12) == b"half a line\n"
        assert h.worker.groups.groups[key].lines == 4  # the room's state came along
        for client in members:
            client.close()
        h.send(msg.Stop())
        final = h.last(msg.Kind.STATS).values
        assert final["groups_moved_out"] == 1 and final["groups_moved_in"] == 1

    assert h.run(scenario) == EXIT_OK
    (moved,) = h.events("group.moved")
    assert moved["key"] == "lobby" and moved["members"] == 3 and moved["pause_ms"] >= 0
