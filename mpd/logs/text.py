"""Log events as text for people: the console line, journald's MESSAGE and the syslog
frame. The JSON line is jsonline.py's, journald's protocol journal.py's.

    console   2026-11-27T08:39:55.123Z warning master[1234] worker.exited worker_slot=1
              worker_pid=1240 signal=SIGKILL   (one line)
    journald  worker.exited worker_slot=1 worker_pid=1240 signal=SIGKILL
              worker/1: fd.dispatched key=5 from_slot=0 to_slot=1 latency_us=42

Fields whose value is None are left out; a traceback follows on the next lines."""

from __future__ import annotations

import re
import time
from typing import Any

from mpd.logs import journal, jsonline

IDENTITY = ("pid", "role", "slot")
_plain = re.compile(r"[^\s\"'=\\]+").fullmatch  # a value that needs no quotes
_syslog_second = {"at": -1, "text": ""}
FACILITY_DAEMON = 3


def value(obj: Any) -> str:
    if type(obj) is str:
        return obj if _plain(obj) else jsonline.value(obj)
    return jsonline.value(obj)


def who(identity: dict[str, Any]) -> str:
    """'master', 'worker/3', 'single'."""
    role, slot = identity.get("role") or "?", identity.get("slot")
    return role if slot is None else f"{role}/{slot}"


def pairs(fields: dict[str, Any]) -> str:
    """' key=value ...' for every field but the identity, None and the traceback."""
    return "".join([f" {name}={value(v)}" for name, v in fields.items()
                    if v is not None and name not in IDENTITY and name != "exception"])


def traceback(fields: dict[str, Any]) -> str:
    exception = fields.get("exception")
    return "\n" + str(exception).rstrip("\n") if exception else ""


def console_line(level: str, event: str, identity: dict[str, Any],
                 fields: dict[str, Any]) -> str:
    """The time first, the level, who (with its pid), the event, then its fields."""
    ts = jsonline.timestamp()
    merged = {**identity, **fields}
    return (f"{ts[:23]}Z {level:<7} {who(merged)}[{merged.get('pid')}] {event}"
            f"{pairs(fields)}{traceback(fields)}")


def message(event: str, identity: dict[str, Any], fields: dict[str, Any]) -> str:
    """A short sentence for journald's MESSAGE (or syslog): journald stores the time, the
    pid and the priority itself, and each field as MPD_*. A worker's lines say which."""
    merged = {**identity, **fields}
    prefix = "" if merged.get("slot") is None else who(merged) + ": "
    return f"{prefix}{event}{pairs(fields)}{traceback(fields)}"


def journal_entry(priority: str, event: str, identity: dict[str, Any], fields: dict[str, Any],
                  json_message: str | None = None) -> bytes:
    """One event in journald's native format: MESSAGE (the sentence of message(), or
    `json_message`), PRIORITY, SYSLOG_IDENTIFIER=mpd and every field as MPD_<NAME> (None
    left out; lists and the like as JSON). A line can come at a client's rate under
    systemd (a flood of bad clients' warnings): when every value is an int or a plain
    word, it is made from a %-template per shape of event."""
    if json_message is None:
        values: list[Any] = []
        for obj in fields.values():
            if type(obj) is int or (type(obj) is str and _plain(obj)):
                values.append(obj)
            else:
                break
        else:
            shape = (priority, event, *fields)
            template = _templates.get(shape) or _journal_template(shape, identity)
            if template:
                return (template % (*values, *values)).encode("utf-8", "replace")
    return _journal_entry(priority, event, identity, fields, json_message)


_templates: dict[tuple[str, ...], str] = {}  # (priority, event, names...) -> %-template
MAX_TEMPLATES = 4096


def forget_templates() -> None:
    """The identity (pid, role, slot) changed: the templates hold the old one."""
    _templates.clear()


def _journal_template(shape: tuple[str, ...], identity: dict[str, Any]) -> str:
    """'' when this shape cannot have one (a field named like the identity, a newline)."""
    priority, event, *names = shape
    if len(_templates) >= MAX_TEMPLATES:
        _templates.clear()
    name = journal.field_name
    head = [f"PRIORITY={priority}", "SYSLOG_IDENTIFIER=mpd", f"MPD_EVENT={event}"]
    head += [f"{name('MPD_' + k)}={v if type(v) is str else jsonline.value(v)}"
             for k, v in identity.items() if v is not None]
    slot = identity.get("slot")
    message = f"{'' if slot is None else who(identity) + ': '}{event}"
    if not set(identity).isdisjoint(names) or "\n" in "".join(head) + message:
        _templates[shape] = ""
        return ""
    escaped = "\n".join(head).replace("%", "%%") + "\n"
    escaped += "".join([name("MPD_" + k).replace("%", "%%") + "=%s\n" for k in names])
    escaped += "MESSAGE=" + message.replace("%", "%%")
    escaped += "".join([f" {k}".replace("%", "%%") + "=%s" for k in names]) + "\n"
    _templates[shape] = escaped
    return escaped


def _journal_entry(priority: str, event: str, identity: dict[str, Any],
                   fields: dict[str, Any], json_message: str | None) -> bytes:
    """The general way, one pass over the fields, for values of any kind."""
    if not set(identity).isdisjoint(fields):  # a field overrides the identity: one of each
        fields = {**identity, **fields}
        identity = {}
    name = journal.field_name
    out = [f"PRIORITY={priority}\nSYSLOG_IDENTIFIER=mpd\nMPD_EVENT={event}\n"]
    said: list[str] = []  # " key=value" for the sentence
    multiline: list[tuple[str, str]] = []  # fields that need the binary-safe form
    for fields_now, quiet in ((identity, True), (fields, False)):
        for key, obj in fields_now.items():
            kind = type(obj)
            if kind is int:
                text = int.__repr__(obj)
                if not quiet:
                    said.append(f" {key}={text}")
            elif obj is None:
                continue
            else:
                text = obj if kind is str else jsonline.value(obj)
                if not quiet and key != "exception":
                    plain = kind is not str or _plain(text)
                    said.append(f" {key}={text if plain else jsonline.value(text)}")
                if "\n" in text:
                    multiline.append((name("MPD_" + key), text))
                    continue
            out.append(f"{name('MPD_' + key)}={text}\n")
    if json_message is None:
        slot = identity.get("slot", fields.get("slot"))
        prefix = "" if slot is None else f"{identity.get('role', fields.get('role'))}/{slot}: "
        json_message = f"{prefix}{event}{''.join(said)}{traceback(fields)}"
    if "\n" in json_message:
        multiline.append(("MESSAGE", json_message))
    else:
        out.append(f"MESSAGE={json_message}\n")
    data = "".join(out).encode("utf-8", "replace")
    return data + journal.entry(multiline) if multiline else data


SEVERITY = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3, "critical": 2}


def syslog_frame(level: str, text: str, pid: int, tag: str = "mpd") -> bytes:
    """One RFC 3164 message as glibc's syslog(3) sends it to /dev/log:
    '<PRI>Mmm dd hh:mm:ss mpd[PID]: text' (local time; no hostname on the local socket)."""
    now = int(time.time())
    if now != _syslog_second["at"]:
        _syslog_second["at"] = now
        _syslog_second["text"] = time.strftime("%b %e %H:%M:%S", time.localtime(now))
    pri = FACILITY_DAEMON * 8 + SEVERITY.get(level, 6)
    return f"<{pri}>{_syslog_second['text']} {tag}[{pid}]: {text}".encode("utf-8", "replace")
