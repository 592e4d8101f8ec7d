"""One log event as one line of JSON, rendered by hand.

An info line is on the hand-off path, once per handed-off client. Through structlog's
processor chain, json.JSONEncoder and datetime it cost 7.5 us on its own (timeit) and
about 20 us in the loop, where caches are cold. Rendered here, from a %-template per
shape of line, and written by mpd.log's direct path, it costs 2.6 us on its own. The
output is what json.dumps() gives for the same dict: the same separators, escapes and
numbers (tests/test_log.py compares the two), so every JSON reader sees the same thing."""

from __future__ import annotations

import functools
import json
import time
from typing import Any

_encoder = json.JSONEncoder(default=repr, ensure_ascii=False)  # values other than plain ones
_escape = json.encoder.encode_basestring  # C: a JSON string literal, non-ASCII kept
_second = {"at": -1, "text": ""}  # the timestamp up to the second, kept while it holds
_identity = {"text": ""}  # ', "pid": 1, "role": "master", "slot": null'
_templates: dict[tuple[str, ...], str] = {}  # (level, event, field names...) -> %-template
MAX_KEYS = MAX_TEMPLATES = 4096  # names from outside must not grow a cache without bound


@functools.lru_cache(maxsize=MAX_KEYS)
def key(name: str) -> str:
    """'"name": ', cached: events use a few dozen field names."""
    return _escape(name if type(name) is str else str(name)) + ": "


def value(obj: Any) -> str:
    kind = type(obj)
    if kind is int:
        return int.__repr__(obj)
    if kind is str:
        return _escape(obj)
    if obj is None:
        return "null"
    return _encoder.encode(obj)  # bools, floats (NaN too), containers, the repr of the rest


def timestamp(now: float | None = None) -> str:
    """UTC, ISO 8601 with microseconds and a Z."""
    if now is None:
        now = time.time()
    second = int(now)
    return f"{_up_to_second(second)}.{int((now - second) * 1_000_000):06d}Z"


def _up_to_second(second: int) -> str:
    """'2026-11-27T08:39:55' for this second, kept while it lasts (strftime costs 1 us)."""
    if second != _second["at"]:
        _second["at"] = second
        _second["text"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return _second["text"]


def render(fields: dict[str, Any]) -> str:
    """Any dict as a JSON object, in its order."""
    return "{" + ", ".join([key(k) + value(v) for k, v in fields.items()]) + "}"


def set_identity(fields: dict[str, Any]) -> None:
    """The fields every line carries after ts, level and event (pid, role, slot)."""
    _identity["text"] = "".join([", " + key(k) + value(v) for k, v in fields.items()])
    _templates.clear()  # they contain the old identity


def line(level: str, event: str, fields: dict[str, Any]) -> str:
    """The whole line: ts, level, event, the identity, then `fields` in their order. Lines
    of one shape (level, event, field names) share a %-template, so that what is left per
    line is the timestamp and the values: ints, most values here, as they are."""
    shape = (level, event, *fields)
    template = _templates.get(shape) or _template(shape)
    now = time.time()
    second = int(now)
    return template % (_up_to_second(second), int((now - second) * 1_000_000),
                       *[obj if type(obj) is int else value(obj) for obj in fields.values()])


def _template(shape: tuple[str, ...]) -> str:
    if len(_templates) >= MAX_TEMPLATES:
        _templates.clear()
    level, event, *names = shape
    head = f'", "level": {value(level)}, "event": {value(event)}{_identity["text"]}'
    body = "".join([", " + key(name).replace("%", "%%") + "%s" for name in names])
    template = _templates[shape] = '{"ts": "%s.%06dZ' + head.replace("%", "%%") + body + "}"
    return template
