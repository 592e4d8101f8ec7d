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

from mpd.apps.ping import REFUSAL, PingProtocol
from mpd.config import schema as configmod
from mpd.logs import log as logmod
from mpd.wire.channel import Channel, ChannelClosed, Kind, Message, close_fds
from mpd.worker.link import MasterLink
from mpd.worker.upkeep import UPKEEP_EVERY
from mpd.worker.worker import EXIT_OK, Worker

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTTIN,
           signal.SIGTTOU)


class Harness:
    """A worker for slot 0 of a two-slot table, its listener, and the master's end."""

    def __init__(self, tmp_path: Path, settings: str = ""):
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
        self.worker = Worker(config, self.listener, self.link, slot=0, slots=(0, 1))
        self.pending: list[Message] = []  # received from the worker, not yet looked at

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

    def receive(self, kind: Kind, timeout: float = 10.0) -> Message:
        """The next message of `kind` from the worker (those before it are skipped)."""
        poller = select.poll()
        poller.register(self.master_sock.fileno(), select.POLLIN)
        while True:
            while self.pending:
                message = self.pending.pop(0)
                if message.kind is kind:
                    return message
                close_fds(message.fds)
            assert poller.poll(timeout * 1000), f"no {kind.name} from the worker"
            self.pending += self.master.receive()

    def last(self, kind: Kind, timeout: float = 10.0) -> Message:
        """The last message of `kind` before the worker closed its end."""
        poller = select.poll()
        poller.register(self.master_sock.fileno(), select.POLLIN)
        found = next((m for m in reversed(self.pending) if m.kind is kind), None)
        while True:
            assert poller.poll(timeout * 1000), "the worker did not close its channel"
            try:
                messages = self.master.receive()
            except ChannelClosed:
                assert found is not None, f"no {kind.name} from the worker"
                return found
            for message in messages:
                close_fds(message.fds)
                found = message if message.kind is kind else found

    def events(self, name: str) -> list[dict[str, Any]]:
        lines = self.log_path.read_text().splitlines() if self.log_path.exists() else []
        return [e for e in map(json.loads, lines) if e["event"] == name]

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    handlers = {sig: signal.getsignal(sig) for sig in SIGNALS}
    made: list[Harness] = []

    def make(settings: str = "") -> Harness:
        made.append(Harness(tmp_path, settings))
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
        assert h.receive(Kind.HELLO).meta["slot"] == 0
        assert h.receive(Kind.STATS).meta["clients"] == 0  # the first heartbeat
        with h.connect() as plain, h.connect() as keyed, h.connect() as foreign:
            plain.sendall(M_PING)
            assert recv_exact(plain, len(REPLY)) == REPLY
            keyed.sendall(key_frame(ours) + M_PING)
            assert recv_exact(keyed, len(REPLY)) == REPLY
            foreign.sendall(key_frame(theirs) + M_PING)
            handoff = h.receive(Kind.HANDOFF)
            assert handoff.meta["key"] == theirs and handoff.meta["owner"] == 1
            assert handoff.meta["table"] == 2 and handoff.raw == M_PING
            # As the master would for slot 1's worker, give it back: this one adopts it.
            h.master.send(Kind.ADOPT, {**handoff.meta, "from_slot": 1, "from_pid": 9},
                          handoff.raw, handoff.fds)
            assert recv_exact(foreign, len(REPLY)) == REPLY  # the carried ping, answered
            foreign.sendall(M_PING)
            assert recv_exact(foreign, len(REPLY)) == REPLY
            h.master.send(Kind.STOP)
            for sock in (plain, keyed, foreign):  # closed at a frame boundary
                assert sock.recv(1) == b""
        final = h.last(Kind.STATS)
        assert final.meta["requests"] == 4 and final.meta["handoffs_out"] == 1
        assert final.meta["adopted"] == 1 and final.meta["clients"] == 0

    assert h.run(scenario) == EXIT_OK
    (dispatched,) = h.events("fd.dispatched")
    assert dispatched["key"] == theirs and dispatched["from_slot"] == 1
    assert h.events("worker.stopped")


def test_a_failed_hand_off_send_pins_the_client_and_serves_it_in_place(harness):
    h = harness()
    h.link.heartbeat = 60.0  # no heartbeat meets the broken channel during the scenario
    theirs = keys_owned_by(1, (0, 1), 1, seed=5)[0]

    def scenario() -> None:
        h.receive(Kind.HELLO)
        h.receive(Kind.STATS)
        # The master stops reading: every send of the worker's fails (EPIPE), while the
        # worker still reads what the master sends it.
        h.master_sock.shutdown(socket.SHUT_RD)
        with h.connect() as client:
            client.sendall(key_frame(theirs) + M_PING)
            assert recv_exact(client, len(REPLY)) == REPLY  # served here after all
            client.sendall(key_frame(theirs) + M_PING)  # pinned: no second try
            assert recv_exact(client, len(REPLY)) == REPLY
            h.master.send(Kind.STOP)
            assert client.recv(1) == b""

    assert h.run(scenario) == EXIT_OK
    (failed,) = h.events("fd.handoff_failed")
    assert failed["key"] == theirs and "Broken pipe" in failed["error"]
    assert not h.events("fd.dispatched")


def test_a_worker_that_loses_its_master_leaves(harness):
    h = harness()

    def scenario() -> None:
        h.receive(Kind.HELLO)
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
        h.receive(Kind.HELLO)
        with h.connect() as client:  # the one place it has
            client.sendall(M_PING)
            assert recv_exact(client, len(REPLY)) == REPLY
            ours, theirs = socket.socketpair()
            meta = {"key": key, "from_slot": 1, "from_pid": 9, "sent_ns": 1, "owner": 0,
                    "table": 2, "rank": 0, "last": False}
            h.master.send(Kind.ADOPT, meta, M_PING, [ours.detach()])
            back = h.receive(Kind.HANDOFF)  # full: back to the master for the next slot
            assert back.meta["key"] == key and back.meta["rank"] == 1
            assert back.raw == M_PING and len(back.fds) == 1
            # The next slot is full too, and so on to the last, which is this one again.
            h.master.send(Kind.ADOPT, {**meta, "rank": 1, "last": True}, back.raw,
                          back.fds)
            theirs.settimeout(10)
            assert recv_exact(theirs, len(REFUSAL)) == REFUSAL
            assert theirs.recv(1) == b""
            theirs.close()
            h.master.send(Kind.STOP)
            assert client.recv(1) == b""
        final = h.last(Kind.STATS)
        assert final.meta["spilled"] == 1 and final.meta["refused"] == 1

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
        h.receive(Kind.HELLO)
        with h.connect() as client:
            client.sendall(M_PING)
            assert recv_exact(client, len(REPLY)) == REPLY
            h.master.send(Kind.DRAIN, {"slots": 5})  # decodable, and no slot table
            h.master.send(Kind.ROUTES, {"slots": "xy"})
            h.master.send(Kind.CONFIG, {"max_clients": "lots"})
            h.master.send(Kind.ADOPT, {"key": 1, "sent_ns": 1}, b"", [directory])
            client.sendall(M_PING)  # served on, by the same rules
            assert recv_exact(client, len(REPLY)) == REPLY
            with h.connect() as keyed:
                keyed.sendall(key_frame(theirs) + M_PING)
                handoff = h.receive(Kind.HANDOFF)  # still slot 1's: the table held
                assert handoff.meta["owner"] == 1 and handoff.meta["table"] == 2
                close_fds(handoff.fds)
            h.master.send(Kind.STOP)
            assert client.recv(1) == b""
        assert h.last(Kind.STATS).meta["clients"] == 0  # the directory never counted

    assert h.run(scenario) == EXIT_OK
    errors = h.events("channel.error")
    assert [e.get("kind") for e in errors] == ["DRAIN", "ROUTES", "CONFIG", "ADOPT"]
    assert "max_clients" in errors[2]["error"] and "refused, nothing changed" in errors[2]["error"]
    assert errors[3]["error"] == "fd unusable: Socket operation on non-socket"
    assert not h.events("worker.crashed")


class BuggyProtocol(PingProtocol):
    """The ping protocol with a bug: a frame that starts with "boom" raises. It offers the
    loop no fast path, so that every read reaches feed()."""
    stateless = None

    def feed(self, buf: bytearray, data: bytes) -> tuple[bytes, int, int | None]:
        if (bytes(buf) + data).startswith(b"boom"):
            raise RuntimeError("a bug in the protocol")
        return super().feed(buf, data)


def raises(_message: Message) -> None:
    raise RuntimeError("a bug in a message's handler")


def test_a_bug_met_with_one_client_or_message_ends_that_one_only(harness):
    h = harness()
    h.worker.protocol = BuggyProtocol()
    h.worker.on_message_kind[Kind.ROUTES] = raises

    def scenario() -> None:
        h.receive(Kind.HELLO)
        with h.connect() as good, h.connect() as bad:
            good.sendall(M_PING)
            assert recv_exact(good, len(REPLY)) == REPLY
            bad.sendall(b"boom\0")
            assert bad.recv(1) == b""  # closed
            good.sendall(M_PING)  # served on
            assert recv_exact(good, len(REPLY)) == REPLY
            h.master.send(Kind.ROUTES, {"slots": [0, 1]})
            good.sendall(M_PING)
            assert recv_exact(good, len(REPLY)) == REPLY
            h.master.send(Kind.STOP)
            assert good.recv(1) == b""
        assert h.last(Kind.STATS).meta["requests"] == 3

    assert h.run(scenario) == EXIT_OK
    (error,) = h.events("client.error")
    assert error["error"] == "RuntimeError('a bug in the protocol')"
    assert "Traceback" in error["exception"] and error["key"] is None
    (error,) = h.events("channel.error")
    assert error["kind"] == "ROUTES" and "a bug in a message's handler" in error["error"]
    assert "Traceback" in error["exception"]


def test_a_retry_after_emfile_is_no_end_of_the_pause_until_a_round_passes(harness):
    # The retry turns accepting on; when the upkeep round falls in the same turn, it must
    # not take that for a pause that is over (accept() has not even been tried yet).
    h = harness()
    worker = h.worker
    worker.epoll = select.epoll()  # what boot() makes: the loop is not run here
    worker.init_upkeep()
    worker.resume_accepting()
    worker.pause_accepting("EMFILE", retry=True)
    retry = worker.accept_retry_at
    worker.up.next_upkeep = retry  # the upkeep round is due in the retry's turn
    worker.on_timers(retry)
    assert worker.accepting  # the retry happened
    assert worker.up.pause_reason == "EMFILE"  # and the pause goes on
    worker.pause_accepting("EMFILE", retry=True)  # that accept() met EMFILE again
    worker.accept_retry_at = 0.0
    worker.resume_accepting()  # ... and the next goes through, and lasts a whole round:
    worker.on_timers(max(worker.up.next_upkeep, worker.up.last_pause + UPKEEP_EVERY))
    assert worker.up.pause_reason == ""
    resumed = [json.loads(line) for line in h.log_path.read_text().splitlines()
               if '"worker.accept_resumed"' in line]
    assert len(resumed) == 1 and resumed[0]["reason"] == "EMFILE"
    assert resumed[0]["pauses"] == 2
