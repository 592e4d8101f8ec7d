"""The HAProxy agent-check port (mpd.agent): the line computed from the master's state, and
the server on real sockets, driven by a selector loop as the master's would drive it. No
client, slow, silent, hostile or in a crowd, may hold that loop up."""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from conftest import wait_until

from mpd.ops.agent import AgentError, AgentServer, agent_line, open_socket

# --- the line ------------------------------------------------------------------------------


@pytest.mark.parametrize("state, ready, clients, capacity, line", [
    ("running", 4, 0, 4000, "up ready 100%"),
    ("running", 4, 1600, 4000, "up ready 60%"),
    ("running", 4, 1595, 4000, "up ready 60%"),  # rounded to the nearest percent
    ("running", 4, 3999, 4000, "up ready 1%"),  # nearly full: still up, at the least weight
    ("running", 4, 4000, 4000, "up ready 1%"),
    ("running", 4, 5000, 4000, "up ready 1%"),  # over (a reload lowered max_clients)
    ("running", 1, 0, 0, "up ready 1%"),  # no capacity known: the least weight, not a crash
    ("starting", 1, 0, 1000, "up ready 100%"),  # the first worker is ready: serve
    ("starting", 0, 0, 1000, "drain"),  # no worker ready yet
    ("running", 0, 10, 4000, "drain"),  # every worker died or backs off
    ("stopping", 4, 100, 4000, "drain"),  # graceful stop: finish these, take no more
    ("upgrading", 4, 100, 4000, "drain"),
    ("halting", 4, 100, 4000, "down"),  # immediate stop
    ("stopped", 0, 0, 4000, "down"),
])
def test_the_line_follows_the_masters_state(state, ready, clients, capacity, line):
    assert agent_line(state, ready, clients, capacity) == line


# --- the server on real sockets --------------------------------------------------------------

class AgentLoop(threading.Thread):
    """An AgentServer in its own selector loop, as the master runs it."""

    def __init__(self, line: str = "up ready 60%"):
        super().__init__(daemon=True)
        self.current = line
        self.selector = selectors.DefaultSelector()
        self.server = AgentServer(open_socket("127.0.0.1", 0), self.selector,
                                  lambda: self.current)
        self.address = self.server.sock.getsockname()
        self.turns = 0
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.halt.is_set():
                for key, events in self.selector.select(0.05):
                    key.data(events)
                self.server.tick(time.monotonic())
                self.turns += 1
        except BaseException as e:  # noqa: BLE001 - the test reads it
            self.error = e

    def stop(self) -> None:
        self.halt.set()
        self.join(5)
        self.server.close()
        self.selector.close()
        assert self.error is None, repr(self.error)


@pytest.fixture
def agent() -> Iterator[AgentLoop]:
    loop = AgentLoop()
    loop.start()
    yield loop
    loop.stop()


def ask(address: tuple[str, int], send: bytes = b"") -> bytes:
    """What HAProxy does: connect, (optionally send), read to EOF."""
    with socket.create_connection(address, timeout=5) as sock:
        if send:
            sock.sendall(send)
        data = b""
        while chunk := sock.recv(100):
            data += chunk
    return data


def test_each_connection_gets_one_line_then_eof(agent: AgentLoop):
    assert ask(agent.address) == b"up ready 60%\n"
    assert ask(agent.address) == b"up ready 60%\n"
    # The count moves just after the close the client saw: wait for it, in this thread.
    wait_until(lambda: agent.server.served == 2, what="two clients served")


def test_the_line_is_computed_when_a_client_connects(agent: AgentLoop):
    agent.current = "drain"
    assert ask(agent.address) == b"drain\n"
    agent.current = "up ready 100%"
    assert ask(agent.address) == b"up ready 100%\n"


def test_a_client_that_sends_first_gets_its_line_and_a_clean_close(agent: AgentLoop):
    """HAProxy's agent-send writes before it reads: that must not turn the close into a
    reset that could discard the line."""
    assert ask(agent.address, b"be_any/mpd1\n") == b"up ready 60%\n"


def test_silent_and_hostile_clients_never_hold_the_loop(agent: AgentLoop):
    silent = [socket.create_connection(agent.address) for _ in range(20)]  # never read
    flooders = []
    for _ in range(5):  # send a lot, read nothing
        s = socket.create_connection(agent.address)
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.send(b"x" * 1_000_000)
        flooders.append(s)
    resetters = []
    for _ in range(5):  # gone with a reset before the agent even accepts them
        s = socket.create_connection(agent.address)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        s.close()
        resetters.append(s)
    assert ask(agent.address) == b"up ready 60%\n"
    # All but the resetters for sure (the kernel may drop those before accept() sees them)
    wait_until(lambda: agent.server.served >= 26, what="every client answered")
    turns = agent.turns
    wait_until(lambda: agent.turns > turns + 5, what="the loop to keep turning")
    for s in silent + flooders:
        s.close()


def test_a_crowd_connecting_at_once_all_get_the_line(agent: AgentLoop):
    crowd = [socket.create_connection(agent.address, timeout=10) for _ in range(300)]
    for sock in crowd:
        data = b""
        while chunk := sock.recv(100):
            data += chunk
        assert data == b"up ready 60%\n"
        sock.close()


def test_a_port_in_use_is_a_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(AgentError) as error:
            open_socket("127.0.0.1", port)
    assert f"cannot listen on 127.0.0.1:{port} for the agent check" in str(error.value)
