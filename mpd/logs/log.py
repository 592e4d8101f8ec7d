"""Structured logs. Every event carries ts, level, event, pid, role and slot, then its own
fields; it goes out as one JSON line (jsonline.py), a console line for people, or a
journald entry with every field as MPD_* (text.py has the human forms, journal.py the
protocol).

Nothing here blocks: each writer puts its bytes into a non-blocking sink with a bounded
queue (sinks.py). The event loops wait on backlog() (watch, watch_epoll) and call flush();
lines are dropped only when a queue is full, counted (dropped_total()) and reported in a
`log.dropped` line once the sink catches up.

The plain calls (no exception, no %-arguments) go straight to the writer; structlog does
the rest: exceptions, %-arguments, log(n)."""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import time
from select import EPOLLOUT
from typing import Any, Callable

import structlog

from mpd.config.schema import ConfigError
from mpd.config.tomllines import line_of
from mpd.logs import journal
from mpd.logs import sinks as logsink
from mpd.logs import text as logtext
from mpd.logs.writers import (  # noqa: F401 - json_line: what the tests render lines with
    IDENTITY,
    JournalWriter,
    StreamWriter,
    SyslogWriter,
    Writer,
    json_line,
)

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}
SYSLOG_SOCKET = "/dev/log"

_identity = IDENTITY  # who is logging; set once per process (after fork) by set_role()
_current = {"level": logging.INFO}
_drops = logsink.Drops()  # this process's undelivered lines


class LogSetupError(ConfigError):
    """The log settings cannot be put in place (a log file that cannot be opened)."""


def set_role(role: str, slot: int | None = None) -> None:
    _identity.update(pid=os.getpid(), role=role, slot=slot)
    logtext.forget_templates()


set_role("master")


# --- setting up: prepare (open, may fail) then install (swap in, cannot fail) ------------

_shared: dict[str, logsink.Sink] = {}  # stdout, journal, syslog: kept across reloads
_writer: list[Writer] = []  # the writer in use
_live: list[logsink.Sink] = []  # the shared sinks and the writer's: those that may queue


class Setup:
    """Log settings opened and ready, not yet in use (see prepare())."""

    def __init__(self, level: str, writer: Writer, buffer: int):
        self.level = level
        self.writer = writer
        self.buffer = buffer  # bytes each sink may queue

    def discard(self) -> None:
        """Close what prepare() opened for this setup alone (a refused reload)."""
        for sink in self.writer.sinks:
            if sink not in _shared.values():
                sink.close()


def resolve_format(fmt: str, target: str) -> str:
    """"auto": console when stdout is a terminal (and the target), JSON otherwise."""
    if fmt != "auto":
        return fmt
    return "console" if target == "stdout" and os.isatty(1) else "json"


def _shared_sink(name: str, opener: Callable[[], logsink.Sink]) -> logsink.Sink:
    sink = _shared.get(name)
    if sink is None:
        sink = _shared[name] = opener()
        sink.on_caught_up = _report_drops
    return sink


def prepare(level: str = "info", fmt: str = "auto", target: str = "stdout", path: str = "",
            config_path: str | None = None, buffer: int = logsink.QUEUE_BYTES) -> Setup:
    """Open what these settings need, without changing the logging in use. Raises
    LogSetupError (a ConfigError) when the log file cannot be opened."""
    console = resolve_format(fmt, target) == "console"
    writer: Writer
    if target == "file":
        try:
            sink = logsink.open_file(path, _drops)
        except OSError as e:
            raise _cannot_open(config_path, path, e) from None
        sink.on_caught_up = _report_drops
        writer = StreamWriter(sink, console)
    elif target == "syslog":
        writer = SyslogWriter(_shared_sink("syslog", lambda: logsink.DatagramSink(
            SYSLOG_SOCKET, _drops, connect_now=False)), console)
    elif journal.stream_connected(1):
        stream = _shared_sink("stdout", lambda: logsink.open_fd(1, _drops))
        try:
            datagrams: logsink.Sink | None = _shared_sink("journal", lambda: logsink.DatagramSink(
                journal.JOURNAL_SOCKET, _drops))
        except OSError:
            datagrams = None
        if datagrams is not None:
            datagrams.count_refused = False  # the writer sends a refused entry to stdout
        writer = JournalWriter(datagrams, stream, json_message=fmt == "json")
    else:
        writer = StreamWriter(_shared_sink("stdout", lambda: logsink.open_fd(1, _drops)), console)
    return Setup(level, writer, buffer)


def prepare_from(config: Any) -> Setup:
    """prepare() with a Config's log settings."""
    return prepare(config.log_level, config.log_format, config.log_target, config.log_file,
                   config.path, config.log_buffer)


def check_from(config: Any) -> None:
    """What prepare_from() would find wrong, without creating the log file (for mpd
    --check-config): LogSetupError when it could not be opened for appending."""
    if config.log_target != "file":
        return
    path = config.log_file
    try:
        if os.path.lexists(path):
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK | os.O_NOCTTY
                             | os.O_CLOEXEC))
        elif not os.path.isdir(os.path.dirname(path) or "/"):
            raise FileNotFoundError(2, "No such file or directory")
        elif not os.access(os.path.dirname(path) or "/", os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        raise _cannot_open(config.path, path, e) from None


def _cannot_open(config_path: str | None, path: str, error: OSError) -> LogSetupError:
    return LogSetupError(config_path or "(log settings)", f"cannot open the log file {path}: "
                         f"{error.strerror}", line=line_of(config_path, "log", "file"),
                         key="log.file")


def install(setup: Setup) -> None:
    """Put a prepared setup in use; the sinks the old writer alone used are closed."""
    old = _writer[0].sinks if _writer else ()
    _writer[:] = [setup.writer]
    for sink in setup.writer.sinks:
        sink.limit = setup.buffer
    for sink in old:
        if sink not in setup.writer.sinks and sink not in _shared.values():
            if sink.fileno() == _watched.fd:
                _watched.forget()  # before its fd number can be reused
            sink.flush()
            _drops.add(sink.discard())
            sink.close()
    _live[:] = _sinks()
    _bind(setup.level, setup.writer)


def configure(level: str = "info", fmt: str = "auto", target: str = "stdout",
              path: str = "") -> None:
    """(Re)configure logging. Raises LogSetupError, with the old logging still in place,
    when the log file cannot be opened."""
    install(prepare(level, fmt, target, path))


def configure_from(config: Any) -> None:
    """configure() with a Config's log settings (on reload: the log file is reopened)."""
    install(prepare_from(config))


def log_file() -> str | None:
    """The path of the log file in use; None when logs go elsewhere."""
    sink = _file_sink()
    return sink.path if sink is not None else None


def _file_sink() -> logsink.FileSink | None:
    for sink in _writer[0].sinks if _writer else ():
        if isinstance(sink, logsink.FileSink):
            return sink
    return None


def reopen() -> str | None:
    """Reopen the log file at its path (SIGUSR1, mpdctl reopen-logs: logrotate renamed it),
    in this process; nothing to do when logs go elsewhere. Lines go to the old file until
    the new one is open, and queued lines are kept. Returns why not (the old file then
    stays in use), logged as log.reopen_failed; else None, logged as log.reopened."""
    sink = _file_sink()
    if sink is None:
        return None
    log = _facade
    if sink.fileno() == _watched.fd:
        _watched.forget()  # the loop registers the fd again, with the new file behind it
    try:
        sink.reopen()
    except OSError as e:
        why_not = f"cannot reopen the log file {sink.path}: {e.strerror}; logging goes on " \
                  "to the old file"
        log.error("log.reopen_failed", file=sink.path, error=e.strerror)
        return why_not
    log.info("log.reopened", file=sink.path)
    return None


def forget_writer() -> None:
    """After python-daemon closed every fd: drop the sinks without closing their fd
    numbers, which may already belong to something else."""
    for sink in [*_shared.values(), *(_writer[0].sinks if _writer else ())]:
        sink.forget()
    _shared.clear()
    _writer.clear()
    _live.clear()


def _to_writer(_logger: Any, method: str, event: dict[str, Any]) -> Any:
    """structlog's last processor: the writer is called as writer.<level>(level, name,
    fields), after format_exc_info turned exc_info into an `exception` field."""
    level = "warning" if method == "warn" else "error" if method == "exception" else method
    name = event.pop("event")
    return (level, name, event), {}


def _bind(level: str, writer: Writer) -> None:
    """Point the shared facade at a logger for this configuration: no lazy proxy to
    rebuild on every call, and a reload takes effect everywhere at once."""
    _current["level"] = LEVELS[level]
    processors = [structlog.processors.format_exc_info, _to_writer]
    structlog.configure(processors=processors, logger_factory=lambda *_: writer,
                        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]))
    bound = structlog.get_config()["wrapper_class"](writer, processors=processors, context={})
    for name in ("debug", "info", "warning", "error", "exception", "log"):
        method = getattr(bound, name)
        if name in LEVELS and LEVELS[name] >= LEVELS[level]:
            method = _direct(name, writer, method)
        setattr(_facade, name, method)


def _direct(level: str, writer: Writer, through_structlog: Any) -> Any:
    """One event straight to the writer, without structlog's layers of calls, which add
    nothing to a plain event. Exceptions and %-style arguments take structlog's way."""
    emit = writer.emit

    def log(event: str, *args: Any, **fields: Any) -> None:
        if args or "exc_info" in fields:
            through_structlog(event, *args, **fields)
        else:
            emit(level, event, fields)
    return log


# --- what every module logs through -------------------------------------------------------

class _Facade:
    """`log = get_logger()` at import time; configure() rebinds its methods."""

    def __init__(self) -> None:
        self.debug = self.info = self.warning = self.error = self.exception = self._unset
        self.log = self._unset

    @staticmethod
    def _unset(*_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError("mpd.logs.log.configure() was not called")


_facade = _Facade()


def get_logger() -> Any:
    return _facade


def enabled(level: str) -> bool:
    """Whether `level` passes the current filter: guards debug logs on hot paths."""
    return LEVELS[level] >= _current["level"]


# --- the event loops' side: wait for a slow sink, never block -----------------------------

def _sinks() -> list[logsink.Sink]:
    sinks = list(_shared.values())
    if _writer:
        sinks += [s for s in _writer[0].sinks if s not in sinks]
    return sinks


def flush() -> None:
    """Write what the sinks take now; never blocks."""
    for sink in _live:
        if sink.queue:
            sink.flush()


def write_out(timeout: float) -> bool:
    """At exit: wait up to `timeout` seconds in all for queued lines to go out."""
    deadline = time.monotonic() + timeout
    return all([sink.write_out(deadline - time.monotonic()) for sink in _live if sink.queue])


def dropped_total() -> int:
    """Log lines this process could not deliver since it started (or forked)."""
    return _drops.total


def _report_drops() -> None:
    """A sink caught up after lines were dropped: say how many (once each time)."""
    count = _drops.unreported
    if count:
        _drops.unreported = 0
        log = _facade
        log.warning("log.dropped", dropped=count, total=_drops.total)


class _Watch:
    """The one fd a loop watches for the log: which loop (a selector or an epoll object)
    and which fd, so that a sink closed on reload is unregistered before its fd number
    can be reused."""

    __slots__ = ("poller", "fd")

    def __init__(self) -> None:
        self.poller: Any = None
        self.fd = -1

    def forget(self) -> None:
        if self.fd >= 0 and self.poller is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.poller.unregister(self.fd)
        self.poller, self.fd = None, -1


_watched = _Watch()


def backlog() -> int:
    """The fd to wait writable on while log lines are queued; -1 when nothing is."""
    for sink in _live:
        if sink.queue:
            return sink.fileno()
    return -1


def watch(selector: selectors.BaseSelector) -> None:
    """For a selectors loop (the master), once per turn: keep the backlog fd registered
    for EVENT_WRITE exactly while lines are queued; the event's data is flush()."""
    fd = backlog()
    if fd == _watched.fd and selector is _watched.poller:
        return
    _watched.forget()
    if fd >= 0:
        selector.register(fd, selectors.EVENT_WRITE, lambda _events: flush())
        _watched.poller, _watched.fd = selector, fd


def watch_epoll(epoll: Any) -> int:
    """For an epoll loop (the worker), once per turn: keep the backlog fd registered for
    EPOLLOUT exactly while lines are queued; returns it (-1: none). The loop calls
    flush() when that fd is reported."""
    fd = -1
    for sink in _live:
        if sink.queue:
            fd = sink.fileno()
            break
    if fd == _watched.fd and (fd < 0 or epoll is _watched.poller):
        return fd  # the usual turn: nothing queued, nothing registered
    _watched.forget()
    if fd >= 0:
        epoll.register(fd, EPOLLOUT)
        _watched.poller, _watched.fd = epoll, fd
    return fd


def _after_fork_in_child() -> None:
    """A forked child starts with no queued lines (they are the parent's to write), no
    drop counts, and its own pid in its lines."""
    for sink in _live:
        sink.discard()
    _drops.total = _drops.unreported = 0
    _watched.poller, _watched.fd = None, -1  # the parent's loop, closed in the child
    _identity["pid"] = os.getpid()
    logtext.forget_templates()


os.register_at_fork(after_in_child=_after_fork_in_child)
