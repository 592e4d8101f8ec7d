"""Loads for the tests of key groups that move (test_moves.py, test_move_faults.py): rooms
whose members chat at a steady rate and relay streams whose players check every byte,
each driven by one thread over non-blocking sockets, checking as it reads.

RoomLoad: every member sends a numbered line ("SENDER SEQ\\n") every `interval` seconds;
every member checks that each line comes from another member of its own room and that
each sender's lines come exactly once, in order (SEQ is the one after the last it had
from that sender). Anything else (a line out of place, a gap, a repeat, a connection
that ends) is an error, kept with what it was. stop() stops sending and waits until
every member has every line the others of its room sent.

RelayLoad: per stream one publisher sends a known byte stream (a seeded pseudo-random
one) in pieces every `interval` seconds; every player checks each byte it reads against
the stream, from the first on. stop() waits until every player has all that was sent."""

from __future__ import annotations

import itertools
import json
import random
import selectors
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from conftest import ROOT, recv_line, wait_until

from mpd import ctl
from mpd.ops import keycommands
from mpd.wire import routing
from mpd.wire.messages import key_to_json


def join_frame(kind: bytes, name: bytes) -> bytes:
    return kind + bytes([len(name)]) + name


def mpdctl(server: Any, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mpd.ctl", "--socket",
                           str(server.tmp / "mpd.sock"), "--timeout", str(timeout), *args],
                          capture_output=True, text=True, timeout=timeout + 10, cwd=ROOT)


def ok(server: Any, *args: str, timeout: float = 60) -> str:
    """mpdctl ARGS, which must succeed: its output."""
    result = mpdctl(server, *args, timeout=timeout)
    assert result.returncode == 0, f"mpdctl {' '.join(args)}: {result.stderr}"
    return result.stdout


def control(server: Any, command: str, **fields: Any) -> dict[str, Any]:
    """One request on the control socket, as mpdctl sends it (no process started)."""
    client = ctl.Client(str(server.tmp / "mpd.sock"), 30)
    try:
        return client.request(command, **fields)
    finally:
        client.sock.close()


def status(server: Any) -> dict[str, Any]:
    return control(server, "status")


def where(server: Any, key: str) -> dict[str, Any]:
    return json.loads(ok(server, "--json", "where", key))


def rooms_of(slot: int, slots: tuple[int, ...], count: int) -> list[bytes]:
    """Names of `count` rooms whose key `slot` owns among `slots`."""
    names = (b"room-%d" % n for n in itertools.count())
    return list(itertools.islice((name for name in names if routing.owner(
        routing.key_hash(name), slots) == slot), count))


def placements(server: Any, keys: list[bytes]) -> dict[bytes, dict[str, Any]]:
    """`mpdctl where` of each key (one control connection): slot, pid, members."""
    client = ctl.Client(str(server.tmp / "mpd.sock"), 30)
    try:
        return {key: keycommands.ask_where(client.request, {"key": key_to_json(key)})
                for key in keys}
    finally:
        client.sock.close()


def settled(server: Any) -> dict[str, Any] | None:
    """The status once no group moves or waits to, and every worker serves; else None."""
    snap = status(server)
    groups = snap["master"]["groups"]
    busy = groups["under_way"] or groups["queued"] or snap["master"]["held"]
    ready = all(w["state"] == "ready" for w in snap["workers"])
    return None if busy or not ready else snap


class Sender:
    """Output for a non-blocking socket, queued when the kernel takes only part."""

    def __init__(self, sock: socket.socket, errors: list[str], what: str):
        self.sock = sock
        self.out = bytearray()
        self.errors, self.what = errors, what
        self.failed = False

    def send(self, data: bytes) -> None:
        self.out += data
        self.flush()

    def flush(self) -> None:
        if self.out and not self.failed:
            try:
                sent = self.sock.send(self.out)
            except BlockingIOError:
                return
            except OSError as e:
                self.failed = True
                self.errors.append(f"{self.what}: cannot send: {e!r}")
                return
            del self.out[:sent]


class Driver(threading.Thread):
    """One thread: every `interval` a tick (send), in between read what is readable."""

    def __init__(self, interval: float):
        super().__init__(daemon=True)
        self.interval = interval
        self.sel = selectors.DefaultSelector()
        self.sending = threading.Event()
        self.halt = threading.Event()
        self.errors: list[str] = []
        self.lock = threading.Lock()

    def error(self, text: str) -> None:
        if len(self.errors) < 50:
            self.errors.append(text)

    def register(self, sock: socket.socket, data: Any) -> None:
        sock.setblocking(False)
        self.sel.register(sock, selectors.EVENT_READ, data)

    def run(self) -> None:
        next_tick = time.monotonic()
        try:
            while not self.halt.is_set():
                now = time.monotonic()
                if now >= next_tick:
                    with self.lock:
                        if self.sending.is_set():
                            self.tick()
                        else:
                            self.idle()
                    next_tick = max(next_tick + self.interval, now)
                for key, _ in self.sel.select(max(0.0, next_tick - time.monotonic())):
                    with self.lock:
                        self.readable(key.fileobj, key.data)  # type: ignore[arg-type]
        except Exception as e:  # noqa: BLE001 - the test reads it
            self.error(f"driver: {e!r}")

    def tick(self) -> None:
        raise NotImplementedError

    def idle(self) -> None:
        """A tick while not sending: what the kernel did not take yet goes now."""

    def readable(self, sock: socket.socket, data: Any) -> None:
        raise NotImplementedError

    def receive(self, sock: socket.socket, what: str) -> bytes:
        try:
            data = sock.recv(1 << 16)
        except BlockingIOError:
            return b""
        except OSError as e:
            self.error(f"{what}: {e!r}")
            self.sel.unregister(sock)
            return b""
        if not data:
            self.error(f"{what}: closed by the server")
            self.sel.unregister(sock)
        return data

    def finish(self, done: Any, timeout: float, what: str) -> None:
        """Stop sending; wait until `done()`; stop the thread."""
        self.sending.clear()
        try:
            wait_until(lambda: self.errors or done(), timeout, what=what)
        finally:
            self.halt.set()
            self.join(10)
            self.sel.close()


class RoomMember:
    def __init__(self, index: int, room: int, sock: socket.socket, errors: list[str]):
        self.index, self.room, self.sock = index, room, sock
        self.sender = Sender(sock, errors, f"member {index}")
        self.buf = b""
        self.sent = 0  # lines sent: SEQ 0 .. sent-1
        self.next: dict[int, int] = {}  # sender -> the SEQ due next from it
        self.received = 0
        self.where = 0  # the pid of its worker, by its last answer to #where


class RoomLoad(Driver):
    def __init__(self, port: int, rooms: int | list[bytes], per_room: int,
                 interval: float = 0.02, seed: int = 3):
        """`rooms`: how many (room-0, room-1, ...), or their names."""
        super().__init__(interval)
        self.names = rooms if isinstance(rooms, list) else [b"room-%d" % n
                                                            for n in range(rooms)]
        rooms = len(self.names)
        order = [n % rooms for n in range(rooms * per_room)]
        random.Random(seed).shuffle(order)  # members of a room arrive on every worker
        self.members: list[RoomMember] = []
        for index, room in enumerate(order):
            sock = socket.create_connection(("127.0.0.1", port), timeout=20)
            sock.sendall(join_frame(b"J", self.names[room]))
            self.members.append(RoomMember(index, room, sock, self.errors))
        self.rooms: dict[int, list[RoomMember]] = {}
        for m in self.members:
            self.rooms.setdefault(m.room, []).append(m)
        for m in self.members:  # "ok N\n" first, in blocking mode
            m.buf = b""
            while b"\n" not in m.buf:
                chunk = m.sock.recv(4096)
                assert chunk, f"member {m.index} closed before its ok"
                m.buf += chunk
            line, _, m.buf = m.buf.partition(b"\n")
            assert line.startswith(b"ok "), line
        for m in self.members:
            self.register(m.sock, m)

    def tick(self) -> None:
        for m in self.members:
            m.sender.send(b"%d %d\n" % (m.index, m.sent))
            m.sent += 1

    def idle(self) -> None:
        for m in self.members:
            m.sender.flush()

    def readable(self, sock: socket.socket, m: RoomMember) -> None:
        data = self.receive(sock, f"member {m.index} of {self.names[m.room]!r}")
        if not data:
            return
        m.sender.flush()
        buf = m.buf + data
        end = buf.rfind(b"\n") + 1
        m.buf = buf[end:]
        nxt, members = m.next, self.members
        for line in buf[:end].splitlines():
            if line.startswith(b"where "):
                m.where = int(line[6:])
                continue
            try:
                sender, seq = map(int, line.split())
                other = members[sender]
            except (ValueError, IndexError):
                self.error(f"member {m.index}: unexpected line {line!r}")
                continue
            if other.room != m.room or sender == m.index:
                self.error(f"member {m.index} of room {m.room} got {line!r} from member "
                           f"{sender} of room {other.room}")
            elif nxt.get(sender, 0) != seq:
                self.error(f"member {m.index}: from {sender} seq {seq}, expected "
                           f"{nxt.get(sender, 0)}")
            nxt[sender] = seq + 1
            m.received += 1

    def locate(self, timeout: float = 20) -> dict[int, set[int]]:
        """Every member asks which worker serves it (#where, amid the load): the pids
        that answered, by room."""
        with self.lock:
            for m in self.members:
                m.where = 0
                m.sender.send(b"#where\n")
        wait_until(lambda: self.errors or all(m.where for m in self.members), timeout,
                   what="every member's answer to #where")
        assert not self.errors, self.errors
        found: dict[int, set[int]] = {}
        for m in self.members:
            found.setdefault(m.room, set()).add(m.where)
        return found

    def sent_to(self, room: int) -> int:
        return sum(m.sent for m in self.rooms[room])

    def complete(self) -> bool:
        for m in self.members:
            for other in self.rooms[m.room]:
                if other is not m and m.next.get(other.index, 0) != other.sent:
                    return False
        return True

    def lines_sent(self) -> int:
        return sum(m.sent for m in self.members)

    def wait_lines(self, count: int, timeout: float = 30) -> None:
        """Until every member has sent `count` more lines than now (the load goes on)."""
        target = self.members[0].sent + count
        wait_until(lambda: self.errors or self.members[0].sent >= target, timeout,
                   what=f"{count} more lines from each member")

    def stop(self, timeout: float = 60) -> None:
        self.finish(self.complete, timeout, "every line delivered to every other member")
        for m in self.members:
            m.sock.setblocking(True)
            m.sock.settimeout(20)

    def ask(self, m: RoomMember, command: bytes) -> bytes:
        """After stop(): a command line's answer (blocking)."""
        m.sock.sendall(command + b"\n")
        line, m.buf = recv_line(m.sock, m.buf)
        return line

    def close(self) -> None:
        for m in self.members:
            m.sock.close()


class Player:
    def __init__(self, stream: int, sock: socket.socket):
        self.stream, self.sock = stream, sock
        self.got = 0  # bytes of the stream checked so far


class RelayLoad(Driver):
    def __init__(self, port: int, streams: int, players: int, interval: float = 0.02,
                 piece: int = 1024, size: int = 4 << 20, seed: int = 5):
        super().__init__(interval)
        self.names = [b"stream-%d" % n for n in range(streams)]
        rng = random.Random(seed)
        self.data = [rng.randbytes(size) for _ in range(streams)]
        self.piece = piece
        self.sent = [0] * streams
        self.players: list[Player] = []
        for n, name in enumerate(self.names):
            for _ in range(players):
                sock = socket.create_connection(("127.0.0.1", port), timeout=20)
                sock.sendall(join_frame(b"S", name))
                self.players.append(Player(n, sock))
        for p in self.players:
            expect_ok(p.sock)
        self.publishers = []
        for name in self.names:
            sock = socket.create_connection(("127.0.0.1", port), timeout=20)
            sock.sendall(join_frame(b"P", name))
            expect_ok(sock)
            self.publishers.append(Sender(sock, self.errors, f"publisher of {name!r}"))
        for p in self.players:
            self.register(p.sock, p)
        for n, pub in enumerate(self.publishers):
            self.register(pub.sock, n)

    def idle(self) -> None:
        for pub in self.publishers:
            pub.flush()

    def tick(self) -> None:
        for n, pub in enumerate(self.publishers):
            start = self.sent[n]
            if pub.out or start + self.piece > len(self.data[n]):
                continue  # the kernel did not take the last piece yet; or all is out
            pub.send(self.data[n][start:start + self.piece])
            self.sent[n] = start + self.piece

    def readable(self, sock: socket.socket, p: Player | int) -> None:
        if isinstance(p, int):  # a publisher: the server sends it nothing after its ok
            data = self.receive(sock, f"publisher of {self.names[p]!r}")
            if data:
                self.error(f"publisher of {self.names[p]!r} got {data[:80]!r}")
            return
        data = self.receive(sock, f"a player of {self.names[p.stream]!r}")
        if not data:
            return
        stream = self.data[p.stream]
        if stream[p.got:p.got + len(data)] != data or p.got + len(data) > \
                self.sent[p.stream]:
            self.error(f"a player of {self.names[p.stream]!r}: bytes {p.got}.."
                       f"{p.got + len(data)} differ from the publisher's")
        p.got += len(data)

    def progress(self) -> int:
        return min(p.got for p in self.players)

    def wait_bytes(self, count: int, timeout: float = 30) -> None:
        target = self.progress() + count
        wait_until(lambda: self.errors or self.progress() >= target, timeout,
                   what=f"{count} more bytes to every player")

    def stop(self, timeout: float = 60) -> None:
        self.finish(lambda: all(p.got == self.sent[p.stream] for p in self.players) and
                    not any(pub.out for pub in self.publishers), timeout,
                    "every byte sent reached every player")

    def close(self) -> None:
        for p in self.players:
            p.sock.close()
        for pub in self.publishers:
            pub.sock.close()


def expect_ok(sock: socket.socket) -> None:
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(1)
        assert chunk, "closed before its ok"
        line += chunk
    assert line.startswith(b"ok "), line


class Chat:
    """Plain blocking members of one room (the tests read and write them in turn)."""

    def __init__(self, port: int, room: bytes, count: int):
        self.members = [socket.create_connection(("127.0.0.1", port), timeout=20)
                        for _ in range(count)]
        self.bufs = [b""] * count
        for sock in self.members:
            sock.sendall(join_frame(b"J", room))
        for n in range(count):
            assert self.line(n).startswith(b"ok "), n

    def line(self, n: int) -> bytes:
        line, self.bufs[n] = recv_line(self.members[n], self.bufs[n])
        return line

    def ask(self, n: int, command: bytes) -> bytes:
        self.members[n].sendall(command + b"\n")
        return self.line(n)

    def say(self, n: int, text: bytes) -> None:
        """One line from member n reaches each other member."""
        self.members[n].sendall(text + b"\n")
        for m in range(len(self.members)):
            if m != n:
                assert self.line(m) == text, m

    def closed(self, n: int) -> bool:
        try:
            while self.members[n].recv(65536):
                pass
        except ConnectionResetError:
            pass
        return True

    def close(self) -> None:
        for sock in self.members:
            sock.close()
