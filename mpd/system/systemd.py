"""The few systemd interfaces mpd speaks, written by hand (each is a few lines):
sd_notify (READY, STATUS, RELOADING, STOPPING, WATCHDOG) and socket activation
(LISTEN_FDS). journald's native protocol is the logs' (mpd/logs/journal.py)."""

from __future__ import annotations

import os
import socket
import time
from typing import Callable

SD_LISTEN_FDS_START = 3
STATUS_EVERY = 1.0  # seconds between STATUS= updates, at most


def _address(name: str) -> str | bytes:
    """A path, or an abstract socket name ("@name" -> b"\\0name")."""
    return b"\0" + name[1:].encode() if name.startswith("@") else name


class Notifier:
    """sd_notify(3) from the master. Without NOTIFY_SOCKET every call does nothing."""

    def __init__(self, describe: Callable[[], str | None] = lambda: None) -> None:
        """`describe`: the STATUS= line to send now, or None while there is nothing to
        tell (the master's loop sends it from tick())."""
        self.describe = describe
        self.path = os.environ.get("NOTIFY_SOCKET") or ""
        self.sock: socket.socket | None = None
        if self.path:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.watchdog_interval = self._watchdog_interval()
        self.last_status = ""
        self.next_watchdog = 0.0
        self.next_status = 0.0

    @staticmethod
    def _watchdog_interval() -> float:
        """Half of WATCHDOG_USEC (as sd_watchdog_enabled advises), or 0 when off."""
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
            return 0.0
        return int(usec) / 2e6

    def notify(self, *lines: str) -> bool:
        if self.sock is None:
            return False
        try:
            self.sock.sendto("\n".join(lines).encode(), _address(self.path))
        except OSError:
            return False  # systemd gone or the socket full: never fatal
        return True

    def ready(self, status: str) -> None:
        self.last_status = status
        self.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def reloading(self) -> None:
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={now_usec}")

    def stopping(self) -> None:
        self.notify("STOPPING=1")

    def status(self, status: str) -> None:
        if status != self.last_status:
            self.last_status = status
            self.notify(f"STATUS={status}")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def tick(self, now: float) -> None:
        """The loop's periodic duties: WATCHDOG=1 at its interval, from the loop itself (a
        stuck loop stops it); STATUS= when it changed, at most every STATUS_EVERY seconds."""
        if self.watchdog_interval and now >= self.next_watchdog:
            self.next_watchdog = now + self.watchdog_interval
            self.watchdog()
        if now >= self.next_status:
            status = self.describe()
            if status is not None:
                self.next_status = now + STATUS_EVERY
                self.status(status)

    def deadline(self) -> float | None:
        """When tick() must run next for the watchdog."""
        return self.next_watchdog if self.watchdog_interval else None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def in_child(self) -> None:
        self.close()  # a worker is not the service's main process


def listen_fds() -> list[socket.socket]:
    """Sockets passed by systemd socket activation (sd_listen_fds), as socket objects.
    Unsets LISTEN_* so that the workers do not take them for their own."""
    pid, count = os.environ.get("LISTEN_PID", ""), os.environ.get("LISTEN_FDS", "")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if pid != str(os.getpid()) or not count.isdigit():
        return []
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)):
        os.set_inheritable(fd, False)
        sockets.append(socket.socket(fileno=fd))
    return sockets
