"""The control socket: AF_UNIX stream, one JSON object per line each way, served from the
master's own selector (no thread). Every peer is checked with SO_PEERCRED; requests are
bounded in size and time, so no client, slow or hostile, can stall the master."""

from __future__ import annotations

import contextlib
import grp
import json
import os
import selectors
import socket
import stat
import struct
import time
from typing import Any, Callable

from mpd.logs import log as logmod
from mpd.system import tcp

VERSION = 1
MAX_REQUEST = 64 * 1024  # bytes in one request line
MAX_CONNECTIONS = 64  # control connections at once; more are told to retry
REQUEST_TIMEOUT = 5.0  # seconds a started line may take to finish
IDLE_TIMEOUT = 60.0  # seconds an idle connection is kept
MAX_REPLY_BACKLOG = 1 << 20  # reply bytes a peer may leave unread before it is dropped
MAX_CLOSING = 256  # peers lingering after their last reply; past it they are closed at once
MIN_IDLE = 1.0  # seconds without a request before a peer may be evicted for a new one
LINGER = 1.0  # seconds a peer turned away may take to read why, before it is closed
ACCEPT_RETRY = 0.1  # seconds to stop accepting after EMFILE/ENFILE/ENOBUFS/ENOMEM
LOG_EVERY = 10.0  # seconds between two log lines about accept pauses, at least
MAX_DEPTH = 4  # nesting of a request's JSON: requests are flat objects
UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
QUIET_COMMANDS = frozenset(("status", "ping", "metrics"))  # logged at debug: they change nothing

log = logmod.get_logger()

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class ControlError(Exception):
    """The control socket cannot be set up; the message says why and what to do."""


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    return UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, UCRED.size))


def open_socket(path: str, mode: int, group: str) -> socket.socket:
    """Bind the control socket, replacing a stale one from a crashed run but never one
    that a live mpd answers on."""
    directory = os.path.dirname(path)
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
    except OSError as e:
        raise ControlError(f"cannot create {directory}: {e.strerror}") from None
    remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, mode)
    except OSError as e:
        sock.close()
        raise ControlError(f"cannot create the control socket {path}: {e.strerror}") from None
    if group:
        try:
            give_to_group(path, group)
        except OSError as e:
            sock.close()
            os.unlink(path)
            raise ControlError(f"cannot make the control socket {path} group-owned by {group} "
                               f"(control.allow_group): {e.strerror}; mpd must run as root or "
                               f"as a member of {group} (under systemd: Group={group}, see "
                               "README \"Access control under systemd\")") from None
    sock.listen(socket.SOMAXCONN)  # a burst of mpdctl calls queues instead of EAGAIN
    sock.setblocking(False)
    return sock


def remove_stale(path: str) -> None:
    """Unlink a socket nothing answers on (a crashed run's); refuse a live one."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(f"{path} exists and is not a socket; remove it or set "
                           "control.socket to another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # stale: its mpd is gone
    except OSError as e:
        raise ControlError(f"cannot check {path}: {e.strerror}") from None
    else:
        raise ControlError(f"another mpd is running: it answers on {path}")
    finally:
        probe.close()


def give_to_group(path: str, group: str) -> None:
    """chown the socket to `group`, unless it has that group already: the socket of a
    process whose group it is (systemd's Group=) needs no chown, which the unit's system
    call filter forbids."""
    gid = grp.getgrnam(group).gr_gid
    if os.stat(path).st_gid != gid:
        os.chown(path, -1, gid)


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


class Peer:
    __slots__ = ("sock", "uid", "pid", "inbuf", "outbuf", "since", "close_after", "closing")

    def __init__(self, sock: socket.socket, pid: int, uid: int):
        self.sock, self.pid, self.uid = sock, pid, uid
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.since = time.monotonic()  # start of the current line, or of idleness
        self.close_after = False  # close once the reply is out
        self.closing = 0.0  # lingering since its last reply went out: close by this time


class ControlServer:
    def __init__(self, sock: socket.socket, path: str, selector: selectors.BaseSelector,
                 handle: Handler, why_denied: Callable[[int, int], str | None]):
        self.sock = sock
        self.path = path
        self.selector = selector
        self.handle = handle  # request dict -> reply dict (the master's commands)
        self.why_denied = why_denied  # (uid, gid) -> None if this peer may steer mpd
        self.peers: dict[int, Peer] = {}  # served: at most MAX_CONNECTIONS
        self.closing: dict[int, Peer] = {}  # answered for the last time, draining to EOF
        self.accept_paused_until = 0.0  # out of fds: the socket is out of the selector
        self.pauses = 0  # accept pauses since the last log line about them
        self.pause_logged = 0.0
        self.inode = os.stat(path).st_ino  # ours to unlink at exit, and only ours
        selector.register(sock, selectors.EVENT_READ, self.on_accept)

    # --- connections ---------------------------------------------------------------------

    def on_accept(self, _events: int) -> None:
        for _ in range(MAX_CONNECTIONS):
            try:
                conn, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in tcp.SHORTAGE:
                    self.pause_accepting(e)
                    return
                continue
            try:
                self.admit(conn)
            except Exception as e:  # noqa: BLE001 - one peer must not end the master
                log.exception("control.error", command=None, error=repr(e))
                self.forget(conn)

    def admit(self, conn: socket.socket) -> None:
        """A new peer: checked, turned away, or served."""
        conn.setblocking(False)
        pid, uid, gid = peer_credentials(conn)
        peer = Peer(conn, pid, uid)
        why = self.why_denied(uid, gid)
        if why is not None:
            log.warning("control.denied", peer_uid=uid, peer_pid=pid)
            self.reject(peer, f"permission denied on {self.path}: {why}")
            return
        if len(self.peers) >= MAX_CONNECTIONS and not self.evict_idle():
            log.warning("control.busy", peer_uid=uid, connections=len(self.peers))
            self.reject(peer, "too many control connections; retry")
            return
        self.peers[conn.fileno()] = peer
        self.selector.register(conn, selectors.EVENT_READ, self.reader(peer))

    def forget(self, conn: socket.socket) -> None:
        """Close a peer whose state a bug may have left half-made."""
        fd = conn.fileno()
        self.peers.pop(fd, None)
        self.closing.pop(fd, None)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn)
        conn.close()

    def pause_accepting(self, error: OSError) -> None:
        """Out of fds (or memory): a listening socket stays readable, so leave the selector
        for ACCEPT_RETRY instead of spinning; say so once in LOG_EVERY at most."""
        self.selector.unregister(self.sock)
        now = time.monotonic()
        self.accept_paused_until = now + ACCEPT_RETRY
        self.pauses += 1
        if now - self.pause_logged >= LOG_EVERY:
            log.warning("control.accept_failed", error=error.strerror, pauses=self.pauses,
                        retry_in=ACCEPT_RETRY)
            self.pause_logged, self.pauses = now, 0

    def evict_idle(self) -> bool:
        """Make room by closing the peer that has idled longest (nothing half-read, nothing
        unsent, for MIN_IDLE at least: a peer accepted in this very burst has had no turn to
        be read yet): idle connections must not lock mpdctl out. False when none is idle."""
        now = time.monotonic()
        idle = [p for p in self.peers.values()
                if not p.inbuf and not p.outbuf and now - p.since >= MIN_IDLE]
        if not idle:
            return False
        oldest = min(idle, key=lambda p: p.since)
        log.info("control.evicted", peer_uid=oldest.uid, peer_pid=oldest.pid,
                 idle_for=round(now - oldest.since, 3))
        self.linger(oldest)  # not a plain close: a request it sent just now would reset it
        return True

    def reject(self, peer: Peer, error: str) -> None:
        """An error line, then close, without ever waiting on the peer we turn away."""
        peer.outbuf += self.encode({"ok": False, "error": error})
        if len(self.closing) >= MAX_CLOSING:  # too many to linger for: best effort
            with contextlib.suppress(OSError):
                peer.sock.send(peer.outbuf)
            peer.sock.close()
            return
        self.selector.register(peer.sock, selectors.EVENT_READ, self.reader(peer))
        self.linger(peer)

    def linger(self, peer: Peer) -> None:
        """The peer gets no more answers: once its last reply is out, half-close and read
        to its EOF (bounded by LINGER) before closing. Closing with its request unread
        would reset the connection, and the peer would lose the reply that says why."""
        self.peers.pop(peer.sock.fileno(), None)
        peer.close_after = True
        peer.inbuf.clear()
        self.closing[peer.sock.fileno()] = peer
        self.flush(peer)

    def reader(self, peer: Peer) -> Callable[[int], None]:
        def on_event(events: int) -> None:
            try:
                if events & selectors.EVENT_WRITE:
                    self.flush(peer)
                if events & selectors.EVENT_READ and self.known(peer):
                    self.on_readable(peer)
            except Exception as e:  # noqa: BLE001 - a bug with one peer ends that peer only
                log.exception("control.error", command=None, peer_uid=peer.uid, error=repr(e))
                self.forget(peer.sock)
        return on_event

    def known(self, peer: Peer) -> bool:
        fd = peer.sock.fileno()
        return self.peers.get(fd) is peer or self.closing.get(fd) is peer

    def on_readable(self, peer: Peer) -> None:
        try:
            data = peer.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.drop(peer)
            return
        if not data:
            self.drop(peer)
            return
        if peer.close_after:
            return  # lingering: what it still sends is read and thrown away
        if not peer.inbuf:
            peer.since = time.monotonic()
        peer.inbuf += data
        while not peer.close_after:
            end = peer.inbuf.find(b"\n")
            if end < 0:
                if len(peer.inbuf) > MAX_REQUEST:
                    self.fail(peer, f"request over {MAX_REQUEST} bytes")
                break
            line = bytes(peer.inbuf[:end])
            del peer.inbuf[:end + 1]
            peer.since = time.monotonic()
            if end > MAX_REQUEST:
                self.fail(peer, f"request over {MAX_REQUEST} bytes")
                break
            self.reply(peer, self.answer(peer, line))

    def answer(self, peer: Peer, line: bytes) -> dict[str, Any]:
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

    @staticmethod
    def encode(reply: dict[str, Any]) -> bytes:
        return json.dumps({"version": VERSION, **reply}, separators=(",", ":")).encode() + b"\n"

    def reply(self, peer: Peer, reply: dict[str, Any]) -> None:
        peer.outbuf += self.encode(reply)
        self.flush(peer)

    def fail(self, peer: Peer, error: str) -> None:
        """Answer with an error and close: the rest of the stream cannot be trusted."""
        log.warning("control.bad_request", peer_uid=peer.uid, error=error)
        peer.outbuf += self.encode({"ok": False, "error": error})
        self.linger(peer)

    def flush(self, peer: Peer) -> None:
        if not self.known(peer):
            return
        try:
            sent = peer.sock.send(peer.outbuf) if peer.outbuf else 0
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.drop(peer)
            return
        del peer.outbuf[:sent]
        if len(peer.outbuf) > MAX_REPLY_BACKLOG:
            self.drop(peer)
            return
        if not peer.outbuf and peer.close_after and not peer.closing:
            peer.closing = time.monotonic() + LINGER
            with contextlib.suppress(OSError):
                peer.sock.shutdown(socket.SHUT_WR)
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if peer.outbuf else 0)
        self.selector.modify(peer.sock, events, self.reader(peer))

    def drop(self, peer: Peer) -> None:
        fd = peer.sock.fileno()
        if self.peers.get(fd) is peer:
            del self.peers[fd]
        elif self.closing.get(fd) is peer:
            del self.closing[fd]
        else:
            return
        self.selector.unregister(peer.sock)
        peer.sock.close()

    def deadline(self) -> float | None:
        """When tick() next has work that the clock alone brings (an accept pause ends)."""
        return self.accept_paused_until or None

    def tick(self, now: float) -> None:
        """Resume accepting after a pause; close peers whose line stalled past
        REQUEST_TIMEOUT, that idled too long, or that lingered past LINGER."""
        if self.accept_paused_until and now >= self.accept_paused_until:
            self.accept_paused_until = 0.0
            self.selector.register(self.sock, selectors.EVENT_READ, self.on_accept)
        for peer in list(self.peers.values()):
            if peer.inbuf and now - peer.since > REQUEST_TIMEOUT:
                self.fail(peer, f"request not finished within {REQUEST_TIMEOUT:g} s")
            elif not peer.inbuf and not peer.outbuf and now - peer.since > IDLE_TIMEOUT:
                self.drop(peer)
        for peer in list(self.closing.values()):
            if peer.closing and now >= peer.closing:
                self.drop(peer)
            elif not peer.closing and now - peer.since > LINGER + REQUEST_TIMEOUT:
                self.drop(peer)  # its last reply never left: it does not read

    def in_child(self) -> None:
        self.close(unlink=False)

    def close(self, unlink: bool = True) -> None:
        """Close everything; the master also unlinks the path (a forked worker must not)."""
        for peer in [*self.peers.values(), *self.closing.values()]:
            peer.sock.close()
        self.peers.clear()
        self.closing.clear()
        self.sock.close()
        if unlink:
            try:
                if os.stat(self.path).st_ino == self.inode:
                    os.unlink(self.path)
            except (FileNotFoundError, PermissionError):
                pass  # gone, or in a directory that the user mpd dropped to cannot write
