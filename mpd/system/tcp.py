"""Listening TCP sockets: mpd's own port, the agent check's and the metrics endpoint's are
opened the same way."""

from __future__ import annotations

import errno
import socket

# accept() errors that say the process or system is short of fds or memory: accepting
# again at once would fail the same way, so the listener pauses instead of spinning.
SHORTAGE = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def listen(host: str, port: int, backlog: int) -> socket.socket:
    """A non-blocking listening socket on host:port (IPv6 when the host has a colon), with
    SO_REUSEADDR so that a restart binds at once, and no_delay(). Raises OSError, with
    nothing left open."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        no_delay(sock)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def no_delay(sock: socket.socket) -> None:
    """TCP_NODELAY on a listening socket: every socket accepted from it inherits it (and a
    handed-off fd is the same socket). With Nagle on, a client's next small write (a
    broadcast line, a reply after a partial one) waits for the ACK of the last, up to the
    peer's 40 ms delayed ACK."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def where(host: str, port: int) -> str:
    """host:port as people write it ([::1]:9100 for IPv6)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
