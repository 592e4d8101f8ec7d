"""One log event as one line of JSON: json's encoder over the event's fields in order,
after the timestamp, the level, the event's name and who logs it. Values that JSON has no
form for (an object, bytes) are written as their repr, so a log call never fails."""

from __future__ import annotations

import json
import time
from typing import Any

_encoder = json.JSONEncoder(default=repr, ensure_ascii=False)
_second = {"at": -1, "text": ""}  # the timestamp up to the second, kept while it holds


def line(level: str, event: str, identity: dict[str, Any], fields: dict[str, Any]) -> str:
    """ts, level, event, the identity, then `fields` in their order; a field named as one
    of those takes its value in its place, so every key is in the line once."""
    return _encoder.encode({"ts": timestamp(), "level": level, "event": event, **identity,
                            **fields})


def value(obj: Any) -> str:
    """One value as JSON (a str quoted and escaped, non-ASCII kept)."""
    return _encoder.encode(obj)


def timestamp(now: float | None = None) -> str:
    """UTC, ISO 8601 with microseconds and a Z."""
    if now is None:
        now = time.time()
    second = int(now)
    if second != _second["at"]:  # strftime once a second, not once a line
        _second["at"] = second
        _second["text"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_second['text']}.{int((now - second) * 1_000_000):06d}Z"
