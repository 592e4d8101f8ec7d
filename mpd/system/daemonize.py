"""`mpd --daemon`, for systems without systemd: python-daemon detaches the process, and a
pidfile (written by hand: it is a few lines) says which process is mpd."""

from __future__ import annotations

import errno
import os
from types import TracebackType
from typing import Any


class PidFileError(Exception):
    pass


def running_pid(path: str) -> int | None:
    """The pid in `path` if that process is alive and is an mpd, else None (stale/absent)."""
    try:
        with open(path) as f:
            pid = int(f.read().strip() or 0)
    except (FileNotFoundError, ValueError):
        return None
    if pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return None
    return pid if b"mpd" in cmdline else None


class PidFile:
    """Context manager for python-daemon: written by the detached process, removed at
    exit (only if it still names us). Refuses when a live mpd holds the file."""

    def __init__(self, path: str):
        self.path = path

    def check(self) -> None:
        pid = running_pid(self.path)
        if pid is not None:
            raise PidFileError(f"another mpd is running: pid {pid} holds {self.path}")

    def __enter__(self) -> PidFile:
        self.check()
        os.makedirs(os.path.dirname(self.path), mode=0o755, exist_ok=True)
        tmp = f"{self.path}.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, self.path)  # atomic: a reader never sees a half-written pid
        return self

    def __exit__(self, *exc: tuple[type[BaseException] | None, BaseException | None,
                                   TracebackType | None]) -> None:
        if running_pid(self.path) == os.getpid():
            try:
                os.unlink(self.path)
            except OSError as e:
                # EACCES: mpd became server.user, and the directory is root's; the next
                # start replaces the stale file.
                if e.errno not in (errno.ENOENT, errno.EACCES, errno.EPERM):
                    raise


def detach(pidfile: PidFile, keep: list[Any]) -> Any:
    """Enter the daemon context: fork away from the terminal, keep `keep` (sockets) open,
    leave signal handling to mpd (signal_map={}), then write the pidfile."""
    import daemon

    context = daemon.DaemonContext(
        working_directory="/", umask=0o022, pidfile=pidfile, signal_map={},
        files_preserve=[k.fileno() for k in keep], detach_process=True)
    context.open()
    return context
