"""Structured logs: structlog, one JSON object per line on stdout (journald stores each
line as MESSAGE). Every event carries ts, level, event, pid, role and slot."""

from __future__ import annotations

import errno
import logging
import os
import sys
from typing import Any

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}

# Who is logging; set once per process (after fork) by set_role().
_identity: dict[str, Any] = {"pid": os.getpid(), "role": "master", "slot": None}
_current = {"level": logging.INFO}


def set_role(role: str, slot: int | None = None) -> None:
    _identity.update(pid=os.getpid(), role=role, slot=slot)


def _order_fields(_logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    """Put the fields every event has first, in a fixed order, then the event's own."""
    head = {"ts": event.pop("timestamp"), "level": method if method != "warn" else "warning",
            "event": event.pop("event"), **_identity}
    head.update(event)
    return head


class FdWriter:
    """A structlog logger that writes each line with one os.write(2) call: no user-space
    buffer to duplicate across fork, and lines of concurrent processes never interleave."""

    def __init__(self, fd: int):
        self.fd = fd

    def msg(self, line: str) -> None:
        data = (line + "\n").encode("utf-8", "replace")
        while data:
            try:
                written = os.write(self.fd, data)
            except InterruptedError:
                continue
            except OSError as e:
                # A gone or full log sink must never take the daemon down.
                if e.errno in (errno.EPIPE, errno.EAGAIN, errno.EBADF, errno.ENOSPC, errno.EIO):
                    return
                raise
            data = data[written:]

    debug = info = warning = warn = error = critical = exception = log = msg


def configure(level: str = "info", fmt: str = "json", fd: int | None = None) -> None:
    """(Re)configure logging; safe to call again on reload to change the level."""
    _current["level"] = LEVELS[level]
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
            structlog.processors.format_exc_info,
            _order_fields,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=lambda *_: FdWriter(sys.stdout.fileno() if fd is None else fd),
        cache_logger_on_first_use=False,
    )


def get_logger() -> Any:
    return structlog.get_logger()


def enabled(level: str) -> bool:
    """Whether `level` passes the current filter: guards debug logs on hot paths."""
    return LEVELS[level] >= _current["level"]
