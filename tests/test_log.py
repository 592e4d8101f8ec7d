"""The JSON log line: rendered by hand for speed, it must be what json.dumps() gives."""

from __future__ import annotations

import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from mpd import jsonline
from mpd import log as logmod

ODD_FIELDS: list[dict[str, Any]] = [
    {},
    {"key": 12345678, "from_slot": 1, "from_pid": None, "carried": 0, "latency_us": -3},
    {"error": 'quote " backslash \\ newline \n tab \t nul \x00 bell \x07', "path": "/tmp/x"},
    {"peer": "héllo wörld ✓ 日本", "emoji": "\U0001f600", "surrogate": "\ud800"},
    {"flag": True, "off": False, "ratio": 0.1, "big": 1e300, "nan": math.nan,
     "inf": -math.inf},
    {"slots": [0, 1, 2], "nested": {"a": [1, {"b": None}]}, "empty": [], "t": (1, "x")},
    {"obj": object(), "bytes": b"\xff", "big_int": 2 ** 70, "neg": -(2 ** 63)},
    {"weird key \"\n": 1, "ключ": "значение"},
    {"100%": "50%s %d %%", "%s": 1},
]


def expected_line(line: str, level: str, event: str, fields: dict[str, Any]) -> str:
    """What json.dumps gives for the same fields, with the line's own timestamp."""
    ts = json.loads(line)["ts"]
    ordered = {"ts": ts, "level": level, "event": event, **logmod._identity, **fields}
    return json.dumps(ordered, ensure_ascii=False, default=repr)


@pytest.mark.parametrize("fields", ODD_FIELDS)
def test_line_is_what_json_dumps_gives(fields: dict[str, Any]) -> None:
    line = logmod.json_line("info", "some.event", dict(fields))
    assert line == expected_line(line, "info", "some.event", fields)


def test_lines_of_one_shape_keep_their_own_values() -> None:
    """Lines of one shape share a template: values of any type still render as their own."""
    for value in (1, "one", None, True, 1.5, [1], -7):
        line = logmod.json_line("info", "same.shape", {"a": value, "b": 2})
        assert line == expected_line(line, "info", "same.shape", {"a": value, "b": 2})


def test_a_new_role_shows_in_the_next_line() -> None:
    before = dict(logmod._identity)
    try:
        logmod.json_line("info", "role.test", {"n": 1})  # the shape's template exists now
        logmod.set_role("worker", 7)
        parsed = json.loads(logmod.json_line("info", "role.test", {"n": 1}))
        assert (parsed["role"], parsed["slot"]) == ("worker", 7)
    finally:
        logmod.set_role(before["role"], before["slot"])


def test_a_field_named_like_a_standard_one_appears_once() -> None:
    line = logmod.json_line("warning", "x.y", {"pid": 5, "slot": 2, "z": 1})
    assert line.count('"pid"') == 1 and line.count('"slot"') == 1
    parsed = json.loads(line)
    assert parsed["pid"] == 5 and parsed["slot"] == 2 and parsed["level"] == "warning"
    assert list(parsed)[:6] == ["ts", "level", "event", "pid", "role", "slot"]


def test_timestamp_matches_datetime_across_second_boundaries() -> None:
    base = 1_795_000_000.0  # 2026-11-19
    for offset in (0.0, 0.000001, 0.5, 0.999999, 1.0, 1.25, 59.999999, 60.0, 86399.5,
                   86400.0, 3600 * 24 * 365.25):
        now = base + offset
        text = jsonline.timestamp(now)
        assert text.endswith("Z") and len(text) == len("2026-11-19T01:02:03.123456Z")
        parsed = datetime.fromisoformat(text[:-1]).replace(tzinfo=timezone.utc)
        # Truncated to the microsecond where datetime rounds: at most 1 us apart.
        assert abs(parsed.timestamp() - now) <= 1.5e-6, (now, text)


def test_key_cache_is_bounded() -> None:
    for i in range(jsonline.MAX_KEYS + 100):
        assert jsonline.key(f"field_{i}") == f'"field_{i}": '
    assert jsonline.key.cache_info().currsize <= jsonline.MAX_KEYS


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_logging_call_writes_one_json_line(tmp_path: Path) -> None:
    path = tmp_path / "mpd.log"
    log = logmod.get_logger()
    try:
        logmod.configure("info", "json", "file", str(path))
        log.debug("not.written", n=1)
        log.info("plain.info", n=1, s="x")
        log.warning("plain.warning", reason="r")
        log.error("plain.error", error="e")
        log.log(30, "via.log", code=3)
        log.info("with.args %s", "interpolated")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("an.exception", command="c")
        lines = read_lines(path)
    finally:
        logmod.configure("info")
    assert [e["event"] for e in lines] == ["plain.info", "plain.warning", "plain.error",
                                          "via.log", "with.args interpolated", "an.exception"]
    assert [e["level"] for e in lines] == ["info", "warning", "error", "warning", "info",
                                          "error"]
    assert all(e["pid"] == os.getpid() for e in lines)
    assert "ValueError: boom" in lines[-1]["exception"] and lines[-1]["command"] == "c"


def test_console_format_still_renders(tmp_path: Path) -> None:
    path = tmp_path / "mpd.log"
    try:
        logmod.configure("debug", "console", "file", str(path))
        logmod.get_logger().debug("console.event", answer=42)
        text = path.read_text()
    finally:
        logmod.configure("info")
    assert "console.event" in text and "answer=42" in text
