"""One log event as one line of JSON, rendered by hand.

An info line is on the hand-off path, once per handed-off client. Through structlog's
processor chain, json.JSONEncoder and datetime it cost 7.5 us on its own and about 20 us
in the loop, where caches are cold; this renderer and the direct path in mpd.log take it
to about 3 us. The output is what json.dumps() gives for the same dict: the same
separators, escapes and numbers, so every JSON reader sees the same thing."""

from __future__ import annotations

import json
import time
from typing import Any

_encoder = json.JSONEncoder(default=repr, ensure_ascii=False)  # values other than plain ones
_escape = json.encoder.encode_basestring  # C: a JSON string literal, non-ASCII kept
_keys: dict[str, str] = {}  # field name -> '"name": '
_second = {"at": -1, "text": ""}  # the timestamp up to the second, kept while it holds
MAX_KEYS = 4096  # field names from outside must not grow the cache without bound


def key(name: str) -> str:
    """'"name": ', cached: events use a few dozen field names."""
    text = _keys.get(name)
    if text is None:
        if len(_keys) >= MAX_KEYS:
            _keys.clear()
        text = _keys[name] = _escape(name if type(name) is str else str(name)) + ": "
    return text


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
    if second != _second["at"]:
        _second["at"] = second
        _second["text"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_second['text']}.{int((now - second) * 1_000_000):06d}Z"


def render(fields: dict[str, Any]) -> str:
    """Any dict as a JSON object, in its order."""
    return "{" + ", ".join([key(k) + value(v) for k, v in fields.items()]) + "}"


def render_event(head: str, fields: dict[str, Any]) -> str:
    """`head` (the rendered start of the object, without its closing brace) followed by
    `fields`. key() is inlined, and ints, most values here, go through an f-string."""
    if not fields:
        return head + "}"
    keys = _keys
    return head + ", " + ", ".join([
        f"{keys.get(name) or key(name)}{obj}" if type(obj) is int
        else (keys.get(name) or key(name)) + value(obj)
        for name, obj in fields.items()]) + "}"
