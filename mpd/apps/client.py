"""What the shipped applications' clients share (rooms_client.py, relay_client.py):
connect, send the first frame that joins a key, read the server's first line, then copy
bytes between the terminal (stdin, stdout) and the connection until either side ends.

A client for people to try an application with, not a library: it blocks, one process,
one connection. Exit codes: 0 when the connection ended normally, 1 with one line on
stderr when it could not join or the server cut it off."""

from __future__ import annotations

import argparse
import os
import selectors
import socket
import sys
import time
from typing import Callable

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 1990  # mpd's server.port (and the shipped HAProxy configs' front end)
CONNECT_TIMEOUT = 10.0  # seconds to connect and to get the server's first line
READ_SIZE = 65536


class ClientError(Exception):
    """The client cannot go on; the message says why, in one line."""


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"mpd's address, or HAProxy's in front of several (default {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"its port (default {DEFAULT_PORT})")
    return p


def first_frame(kind: bytes, name: str) -> bytes:
    """`kind`, one length byte, the name's UTF-8 bytes: what HAProxy hashes
    (req.payload_lv(1,1)) and mpd routes on."""
    raw = name.encode()
    if not 1 <= len(raw) <= 255:
        raise ClientError(f"the name must be 1 to 255 bytes of UTF-8, got {len(raw)}")
    return kind + bytes([len(raw)]) + raw


def join(host: str, port: int, frame: bytes) -> tuple[socket.socket, bytes, bytes]:
    """Connect, send the first frame, read the server's first line: the connection, that
    line (without its newline) and whatever came after it."""
    try:
        sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
    except OSError as e:
        raise ClientError(f"cannot connect to {host}:{port}: {e.strerror or e}") from None
    try:
        sock.sendall(frame)
        data = b""
        while b"\n" not in data:
            chunk = sock.recv(READ_SIZE)
            if not chunk:
                raise ClientError(f"{host}:{port} closed the connection before it answered")
            data += chunk
    except OSError as e:
        sock.close()
        raise ClientError(f"{host}:{port}: {e.strerror or e}") from None
    except ClientError:
        sock.close()
        raise
    line, _, rest = data.partition(b"\n")
    if not line.startswith(b"ok"):
        sock.close()
        raise ClientError(f"{host}:{port} refused: {line.decode(errors='replace')}")
    sock.settimeout(None)
    return sock, line, rest


class Pace:
    """At most `rate` bytes a second from stdin: a recording played as a live source."""

    def __init__(self, rate: float):
        self.rate = rate
        self.start = time.monotonic()
        self.sent = 0

    def chunk(self) -> int:
        return max(1, min(READ_SIZE, int(self.rate / 20)))  # about 20 sends a second

    def sent_now(self, count: int) -> None:
        self.sent += count
        ahead = self.start + self.sent / self.rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)  # the rate asked for; the server's bytes wait meanwhile


def rate_argument(text: str) -> float:
    """Bytes a second: 250000, 500k, 2M (powers of 1000)."""
    scale = {"k": 1e3, "m": 1e6, "g": 1e9}.get(text[-1:].lower(), 1.0)
    try:
        rate = float(text[:-1] if scale != 1.0 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not bytes a second (2M, 500k, "
                                         "250000)") from None
    if not rate > 0:
        raise argparse.ArgumentTypeError(f"the rate must be more than 0, got {text!r}")
    return rate


def copy(sock: socket.socket, rest: bytes, source: int | None, sink: int | None,
         whole_lines: bool = False, pace: Pace | None = None) -> None:
    """Bytes from `source` (an fd: stdin) to the connection and from the connection to
    `sink` (an fd: stdout; None throws them away) until the server closes it. At the
    source's end the connection is half-closed, so the server finishes and closes.
    `whole_lines`: a last line without its newline gets one (the server reads lines).
    `pace`: the source is sent no faster than its rate."""
    if sink is not None and rest:
        write_all(sink, rest)
    # poll, not epoll: stdin may be a regular file (`< recording`), which epoll refuses.
    with selectors.PollSelector() as sel:
        sel.register(sock, selectors.EVENT_READ)
        if source is not None:
            sel.register(source, selectors.EVENT_READ)
        last = b"\n"
        while True:
            for key, _ in sel.select():
                if key.fileobj is sock:
                    try:
                        data = sock.recv(READ_SIZE)
                    except ConnectionResetError:
                        raise ClientError("the server cut the connection off (a reset: "
                                          "it fell behind, or broke the protocol)") from None
                    if not data:
                        return
                    if sink is not None:
                        write_all(sink, data)
                    continue
                data = os.read(source, pace.chunk() if pace else READ_SIZE)  # type: ignore[arg-type]
                if data:
                    send(sock, data)
                    last = data[-1:]
                    if pace is not None:
                        pace.sent_now(len(data))
                    continue
                if whole_lines and last != b"\n":
                    send(sock, b"\n")
                sel.unregister(source)
                sock.shutdown(socket.SHUT_WR)


def send(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError as e:  # a reset, or EPIPE: the server is done with this connection
        raise ClientError(f"the server closed the connection ({e.strerror}): it cut "
                          "this client off, or broke off") from None


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def run(body: Callable[[], int], prog: str) -> int:
    """Call `body()`; a ClientError is one line on stderr and exit 1."""
    try:
        return body()
    except ClientError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `... | head`: whoever read stdout has had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130
