"""The control socket: AF_UNIX stream, one JSON object per line each way, served from the
master's own selector (no thread). Every peer is checked with SO_PEERCRED; requests are
bounded in size and time, so no client, slow or hostile, can stall the master."""

from __future__ import annotations

import contextlib
import errno
import grp
import json
import os
import selectors
import socket
import stat
import struct
import time
from typing import Any, Callable

from mpd import log as logmod

VERSION = 1
MAX_REQUEST = 64 * 1024  # bytes in one request line
MAX_CONNECTIONS = 64  # control connections at once; more are told to retry
REQUEST_TIMEOUT = 5.0  # seconds a started line may take to finish
IDLE_TIMEOUT = 60.0  # seconds an idle connection is kept
MAX_REPLY_BACKLOG = 1 << 20  # reply bytes a peer may leave unread before it is dropped
UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
QUIET_COMMANDS = frozenset(("status", "ping"))  # logged at debug: they change nothing

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
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
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
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, mode)
        if group:
            os.chown(path, -1, grp.getgrnam(group).gr_gid)
    except OSError as e:
        sock.close()
        raise ControlError(f"cannot create the control socket {path}: {e.strerror}") from None
    sock.listen(64)
    sock.setblocking(False)
    return sock


class Peer:
    __slots__ = ("sock", "uid", "pid", "inbuf", "outbuf", "since", "close_after")

    def __init__(self, sock: socket.socket, pid: int, uid: int):
        self.sock, self.pid, self.uid = sock, pid, uid
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.since = time.monotonic()  # start of the current line, or of idleness
        self.close_after = False  # close once the reply is out


class ControlServer:
    def __init__(self, sock: socket.socket, path: str, selector: selectors.BaseSelector,
                 handle: Handler, allowed: Callable[[int, int], bool]):
        self.sock = sock
        self.path = path
        self.selector = selector
        self.handle = handle  # request dict -> reply dict (the master's commands)
        self.allowed = allowed  # (uid, gid) -> may this peer steer mpd?
        self.peers: dict[int, Peer] = {}
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
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("control.accept_failed", error=e.strerror)
                    return
                continue
            conn.setblocking(False)
            pid, uid, gid = peer_credentials(conn)
            peer = Peer(conn, pid, uid)
            if not self.allowed(uid, gid):
                log.warning("control.denied", peer_uid=uid, peer_pid=pid)
                self.reject(peer, f"permission denied: uid {uid} may not use {self.path}")
                continue
            if len(self.peers) >= MAX_CONNECTIONS:
                log.warning("control.busy", peer_uid=uid, connections=len(self.peers))
                self.reject(peer, "too many control connections; retry")
                continue
            self.peers[conn.fileno()] = peer
            self.selector.register(conn, selectors.EVENT_READ, self.reader(peer))

    def reject(self, peer: Peer, error: str) -> None:
        """Best-effort error line, then close: never wait on a peer we turn away."""
        with contextlib.suppress(OSError):
            peer.sock.send(self.encode({"ok": False, "error": error}))
        peer.sock.close()

    def reader(self, peer: Peer) -> Callable[[int], None]:
        def on_event(events: int) -> None:
            if events & selectors.EVENT_WRITE:
                self.flush(peer)
            if events & selectors.EVENT_READ and peer.sock.fileno() in self.peers:
                self.on_readable(peer)
        return on_event

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
            request = json.loads(line)
        except ValueError as e:
            return {"ok": False, "error": f"invalid JSON: {e}"}
        if not isinstance(request, dict) or not isinstance(request.get("command"), str):
            return {"ok": False, "error": 'expected a JSON object with a "command" string'}
        if request.get("version", VERSION) != VERSION:
            return {"ok": False, "error": f"unsupported version {request.get('version')!r}; "
                    f"this mpd speaks version {VERSION}"}
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
        peer.inbuf.clear()
        peer.close_after = True
        self.reply(peer, {"ok": False, "error": error})

    def flush(self, peer: Peer) -> None:
        if peer.sock.fileno() not in self.peers:
            return
        try:
            sent = peer.sock.send(peer.outbuf) if peer.outbuf else 0
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.drop(peer)
            return
        del peer.outbuf[:sent]
        if not peer.outbuf and peer.close_after:
            self.drop(peer)
            return
        if len(peer.outbuf) > MAX_REPLY_BACKLOG:
            self.drop(peer)
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if peer.outbuf else 0)
        self.selector.modify(peer.sock, events, self.reader(peer))

    def drop(self, peer: Peer) -> None:
        if self.peers.pop(peer.sock.fileno(), None) is not None:
            self.selector.unregister(peer.sock)
        peer.sock.close()

    def expire(self) -> None:
        """Close peers whose line stalled past REQUEST_TIMEOUT or that idled too long."""
        now = time.monotonic()
        for peer in list(self.peers.values()):
            if peer.inbuf and now - peer.since > REQUEST_TIMEOUT and not peer.close_after:
                self.fail(peer, f"request not finished within {REQUEST_TIMEOUT:g} s")
            elif not peer.inbuf and not peer.outbuf and now - peer.since > IDLE_TIMEOUT:
                self.drop(peer)

    def close(self, unlink: bool = True) -> None:
        """Close everything; the master also unlinks the path (a forked worker must not)."""
        for peer in list(self.peers.values()):
            peer.sock.close()
        self.peers.clear()
        self.sock.close()
        if unlink:
            try:
                if os.stat(self.path).st_ino == self.inode:
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
