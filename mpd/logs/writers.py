"""Writers: one log event to bytes for their sinks. The JSON line (jsonline.py), the
console line, journald's entry and syslog's frame (text.py), each stamped with who logs
it (IDENTITY, kept by log.set_role)."""

from __future__ import annotations

import os
from typing import Any

from mpd.logs import jsonline
from mpd.logs import sinks as logsink
from mpd.logs import text as logtext

PRIORITIES = {"debug": "7", "info": "6", "warning": "4", "warn": "4", "error": "3",
              "critical": "2", "exception": "3"}
# Who is logging: pid, role, slot. One dict, updated in place by log.set_role().
IDENTITY: dict[str, Any] = {"pid": os.getpid(), "role": "master", "slot": None}


def json_line(level: str, event: str, fields: dict[str, Any]) -> str:
    """The line for one event: the standard fields, then the event's own in their order."""
    return jsonline.line(level, event, IDENTITY, fields)


class Writer:
    """Called by the facade's direct path (emit) and by structlog (msg, by level name)."""

    sinks: tuple[logsink.Sink, ...] = ()

    def emit(self, level: str, event: str, fields: dict[str, Any]) -> None:
        raise NotImplementedError

    def msg(self, level: str, event: str, fields: dict[str, Any]) -> None:
        self.emit(level, event, fields)

    debug = info = warning = warn = error = critical = exception = log = msg


class OneSinkWriter(Writer):
    """A writer to one sink, of JSON lines or (console) of the forms people read."""

    def __init__(self, sink: logsink.Sink, console: bool):
        self.sink = sink
        self.console = console
        self.sinks = (sink,)


class StreamWriter(OneSinkWriter):
    """stdout or a log file: JSON lines, or console lines for people."""

    def emit(self, level: str, event: str, fields: dict[str, Any]) -> None:
        if self.console:
            text = logtext.console_line(level, event, IDENTITY, fields)
        else:
            text = json_line(level, event, fields)
        self.sink.write((text + "\n").encode("utf-8", "replace"))


class JournalWriter(Writer):
    """journald's native protocol: MESSAGE is a short sentence (the JSON line with
    log.format = "json"), PRIORITY the level, and every field its own journal field
    (MPD_EVENT=worker.exited, MPD_SLOT=3, ...). Without the journal socket, or for an
    entry it refuses, the JSON line goes to the stdout stream (journald's too)."""

    def __init__(self, datagrams: logsink.Sink | None, stream: logsink.Sink,
                 json_message: bool):
        self.datagrams = datagrams
        self.stream = stream
        self.json_message = json_message
        self.sinks = (stream,) if datagrams is None else (datagrams, stream)

    def emit(self, level: str, event: str, fields: dict[str, Any]) -> None:
        if self.datagrams is None or not self.datagrams.write(self.entry(level, event, fields)):
            self.stream.write((json_line(level, event, fields) + "\n").encode("utf-8", "replace"))

    def entry(self, level: str, event: str, fields: dict[str, Any]) -> bytes:
        return logtext.journal_entry(PRIORITIES.get(level, "6"), event, IDENTITY, fields,
                                     json_line(level, event, dict(fields))
                                     if self.json_message else None)


class SyslogWriter(OneSinkWriter):
    """The local syslog daemon (for `--daemon` without systemd): RFC 3164 datagrams to
    /dev/log, facility daemon; the text is the JSON line (console: the short sentence)."""

    def emit(self, level: str, event: str, fields: dict[str, Any]) -> None:
        if self.console:
            text = logtext.message(event, IDENTITY, fields)
        else:
            text = json_line(level, event, fields)
        self.sink.write(logtext.syslog_frame(level, text, IDENTITY["pid"]))
