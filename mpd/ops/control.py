"""The control socket: AF_UNIX stream, one JSON object per line each way, served from the
master's own selector (no thread) on the server base (server.py). Every peer is checked
with SO_PEERCRED; requests are bounded in size and time, so no client, slow or hostile,
can stall the master. When every place is taken, the peer that has waited longest
without completing a request makes way, whatever its age, so mpdctl always gets in.

The socket's file is mpd's to keep (socketfile.py): every CHECK_EVERY seconds, and on
each reload, one lstat tells whether it is still the one mpd bound; when it is gone (or
a stale socket took its place) a new listening socket is bound there and the old one
closed, while the connected peers stay."""

from __future__ import annotations

import json
import selectors
import socket
import time
from typing import Any, Callable

from mpd.logs import log as logmod
from mpd.ops.server import Limits, Peer, Server
from mpd.ops.socketfile import ControlError, SocketFile, peer_credentials

VERSION = 1
MAX_REQUEST = 64 * 1024  # bytes in one request line
REQUEST_TIMEOUT = 5.0  # seconds a started line may take to finish (and an answer to be taken)
IDLE_TIMEOUT = 60.0  # seconds an idle connection is kept
CHECK_EVERY = 2.0  # seconds between two looks at the socket's file
LIMITS = Limits(peers=64, lingering=256, linger=1.0, backlog=1 << 20)
MAX_DEPTH = 4  # nesting of a request's JSON: requests are flat objects
QUIET_COMMANDS = frozenset(("status", "ping", "metrics"))  # logged at debug: they change nothing

log = logmod.get_logger()

Handler = Callable[[dict[str, Any]], dict[str, Any]]


def parse_request(line: bytes) -> dict[str, Any]:
    """The request on one line, checked strictly; ValueError says what is wrong."""
    if nesting(line) > MAX_DEPTH:
        raise ValueError(f"invalid JSON: nested deeper than {MAX_DEPTH} levels")
    try:
        request = json.loads(line)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"invalid JSON: {e}") from None
    if not isinstance(request, dict) or not isinstance(request.get("command"), str):
        raise ValueError('expected a JSON object with a "command" string')
    version = request.get("version")
    if type(version) is not int or version != VERSION:
        raise ValueError(f'unsupported version {version!r}; expected "version": {VERSION} '
                         "(an integer)")
    return request


def nesting(line: bytes) -> int:
    """How deep brackets nest, outside strings: json.loads recurses once per level."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in line:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


class ControlPeer(Peer):
    __slots__ = ("pid", "uid", "gid")

    def __init__(self, sock: socket.socket, now: float):
        super().__init__(sock, now)
        self.pid, self.uid, self.gid = peer_credentials(sock)


class ControlServer(Server):
    name = "control"

    def __init__(self, sock: socket.socket, file: SocketFile,
                 selector: selectors.BaseSelector, handle: Handler,
                 why_denied: Callable[[int, int], str | None]):
        super().__init__(sock, selector, LIMITS)
        self.file = file  # the socket's path, mode, group and the inode that is ours
        self.handle = handle  # request dict -> reply dict (the master's commands)
        self.why_denied = why_denied  # (uid, gid) -> None if this peer may steer mpd
        self.next_check = 0.0  # when to look at the socket's file next (0: at the first tick)
        self.keep_error = ""  # why the socket's file could not be kept, as last logged

    # --- peers ----------------------------------------------------------------------------

    def make_peer(self, conn: socket.socket, now: float) -> ControlPeer:
        return ControlPeer(conn, now)

    def admit(self, peer: Peer) -> None:
        assert isinstance(peer, ControlPeer)
        why = self.why_denied(peer.uid, peer.gid)
        if why is not None:
            log.warning("control.denied", peer_uid=peer.uid, peer_pid=peer.pid)
            self.finish(peer, encode({"ok": False, "error": f"permission denied on "
                                      f"{self.file.path}: {why}"}), REQUEST_TIMEOUT)
            return
        self.due_at(peer, peer.since + IDLE_TIMEOUT)
        self.serve(peer)

    def evictable(self) -> Peer:
        """The peer that has waited longest without completing a request, whatever its
        age: a flood of fresh connections cannot lock mpdctl out, and a peer that just
        asked something is the last to go."""
        return min(self.peers.values(), key=lambda p: p.since)

    def evict(self, peer: Peer) -> None:
        assert isinstance(peer, ControlPeer)
        waited = time.monotonic() - peer.since
        log.info("control.evicted", peer_uid=peer.uid, peer_pid=peer.pid,
                 waited_for=round(waited, 3))
        self.finish(peer, encode({"ok": False, "error": (
            f"closed to let another peer in: every control connection was taken, and this "
            f"one had waited longest ({waited:.1f} s) without a request")}), REQUEST_TIMEOUT)

    def received(self, peer: Peer, data: bytes) -> None:
        """Answer each whole line; a line that began starts its REQUEST_TIMEOUT, an idle
        peer has IDLE_TIMEOUT."""
        assert isinstance(peer, ControlPeer)
        now = time.monotonic()
        began = not peer.inbuf
        peer.inbuf += data
        while not peer.done:
            end = peer.inbuf.find(b"\n")
            if end < 0:
                break
            if end > MAX_REQUEST:
                self.fail(peer, f"request over {MAX_REQUEST} bytes")
                return
            line = bytes(peer.inbuf[:end])
            del peer.inbuf[:end + 1]
            peer.since = now
            began = True
            self.send(peer, encode(self.answer(peer, line)))
        if peer.done:
            return
        if len(peer.inbuf) > MAX_REQUEST:
            self.fail(peer, f"request over {MAX_REQUEST} bytes")
        elif not peer.inbuf:
            self.due_at(peer, now + IDLE_TIMEOUT)
        elif began:
            self.due_at(peer, now + REQUEST_TIMEOUT)

    def expired(self, peer: Peer, now: float) -> None:
        """A line that did not finish in time gets an error; an idle peer is closed."""
        if peer.inbuf:
            self.fail(peer, f"request not finished within {REQUEST_TIMEOUT:g} s")
        else:
            self.drop(peer)

    def answer(self, peer: ControlPeer, line: bytes) -> dict[str, Any]:
        try:
            request = parse_request(line)
        except ValueError as e:
            return {"ok": False, "error": str(e)}
        if request["command"] in QUIET_COMMANDS:  # polled by scripts and monitors
            log.debug("control.command", command=request["command"], peer_uid=peer.uid,
                      peer_pid=peer.pid)
        else:
            log.info("control.command", command=request["command"], peer_uid=peer.uid,
                     peer_pid=peer.pid)
        try:
            return self.handle(request)
        except Exception as e:  # noqa: BLE001 - a bad request must never kill the master
            log.exception("control.error", command=request["command"])
            return {"ok": False, "error": f"internal error: {e!r}"}

    def fail(self, peer: ControlPeer, error: str) -> None:
        """Answer with an error and close: the rest of the stream cannot be trusted."""
        log.warning("control.bad_request", peer_uid=peer.uid, error=error)
        self.finish(peer, encode({"ok": False, "error": error}), REQUEST_TIMEOUT)

    # --- the socket's file ----------------------------------------------------------------

    def deadline(self) -> float | None:
        due = super().deadline()
        return min(due, self.next_check) if due else self.next_check

    def tick(self, now: float) -> None:
        super().tick(now)
        if now >= self.next_check:
            self.next_check = now + CHECK_EVERY
            self.keep_socket("check")

    def keep_socket(self, trigger: str) -> None:
        """Bind the socket's file anew if it is gone or a stale socket replaced it (one
        lstat when all is well). `trigger`: check or reload, for the log."""
        try:
            lost = self.file.lost()
        except OSError as e:
            self.keep_failed(f"cannot look at {self.file.path}: {e.strerror}")
            return
        if lost is None:
            self.keep_error = ""
            return
        try:
            sock = self.file.bind()
        except ControlError as e:
            self.keep_failed(str(e))
            return
        except OSError as e:
            self.keep_failed(f"cannot create the control socket {self.file.path}: "
                             f"{e.strerror}")
            return
        if not self.paused_until:
            self.on_accept(0)  # what queued on the old socket, before it is closed
        self.swap_listener(sock)
        self.keep_error = ""
        log.warning("control.recreated", path=self.file.path, reason=lost, trigger=trigger)

    def keep_failed(self, error: str) -> None:
        """Logged once per cause; tried again at every check."""
        if error != self.keep_error:
            self.keep_error = error
            log.error("control.recreate_failed", path=self.file.path, error=error)

    def close(self) -> None:
        """Close everything and unlink the socket's file, if it is still ours."""
        super().close()
        self.file.unlink()


def encode(reply: dict[str, Any]) -> bytes:
    return json.dumps({"version": VERSION, **reply}, separators=(",", ":")).encode() + b"\n"
