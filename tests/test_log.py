"""The log line: as JSON, what json.dumps() gives; as a journald entry, a console line, a
syslog frame, the forms people read."""

from __future__ import annotations

import json
import math
import os
import re
import socket
import struct
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from mpd.logs import jsonline
from mpd.logs import log as logmod
from mpd.logs import sinks as logsink
from mpd.logs import text as logtext

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


def test_a_new_role_shows_in_the_next_line() -> None:
    before = dict(logmod._identity)
    try:
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


# --- for people, journald and syslog ---------------------------------------------------------

def test_console_line_puts_the_time_first_and_leaves_out_none() -> None:
    identity = {"pid": 7, "role": "master", "slot": None}
    line = logtext.console_line("warning", "worker.exited", identity,
                                {"worker_slot": 1, "worker_pid": 123, "exit_code": None,
                                 "signal": "SIGKILL", "error": "two words", "ratio": 0.5})
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z warning master\[7\] "
                        r'worker.exited worker_slot=1 worker_pid=123 signal=SIGKILL '
                        r'error="two words" ratio=0.5', line), line
    worker = logtext.console_line("info", "x.y", {"pid": 8, "role": "worker", "slot": 3},
                                  {"exception": "Traceback...\nValueError: boom\n"})
    first, *rest = worker.split("\n")
    assert first.endswith(" info    worker/3[8] x.y") and rest == ["Traceback...",
                                                                 "ValueError: boom"]


def parse_journal_entry(data: bytes) -> dict[str, str]:
    """journald's native format: NAME=value lines, or NAME, a 64-bit length, the bytes."""
    fields, at = {}, 0
    while at < len(data):
        end = data.index(b"\n", at)
        line = data[at:end]
        if b"=" in line:
            name, value = line.split(b"=", 1)
            at = end + 1
        else:
            name = line
            size = struct.unpack("<Q", data[end + 1:end + 9])[0]
            value = data[end + 9:end + 9 + size]
            assert data[end + 9 + size:end + 10 + size] == b"\n"
            at = end + 10 + size
        fields[name.decode()] = value.decode()
    return fields


@pytest.mark.parametrize("fmt", ["auto", "json"])
def test_journald_gets_a_sentence_as_message_and_every_field(tmp_path: Path, fmt: str) -> None:
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(str(tmp_path / "journal"))
    drops = logsink.Drops()
    stream = logsink.open_file(str(tmp_path / "stdout"), drops)
    writer = logmod.JournalWriter(logsink.DatagramSink(str(tmp_path / "journal"), drops),
                                  stream, json_message=fmt == "json")
    before = dict(logmod._identity)
    try:
        logmod.set_role("worker", 2)
        writer.emit("warning", "fd.refused", {"key": -5, "reason": "max_clients",
                                              "from_slot": None, "slots": [0, 1],
                                              "exception": "Traceback\nBoom"})
        entry = parse_journal_entry(journal.recv(65536))
    finally:
        logmod.set_role(before["role"], before["slot"])
        writer.datagrams.close()
        stream.close()
        journal.close()
    if fmt == "json":
        assert json.loads(entry["MESSAGE"])["event"] == "fd.refused"
    else:
        assert entry["MESSAGE"] == ("worker/2: fd.refused key=-5 reason=max_clients "
                                    "slots=[0, 1]\nTraceback\nBoom")
    assert entry["PRIORITY"] == "4" and entry["SYSLOG_IDENTIFIER"] == "mpd"
    assert entry["MPD_EVENT"] == "fd.refused" and entry["MPD_ROLE"] == "worker"
    assert entry["MPD_SLOT"] == "2" and entry["MPD_PID"] == str(os.getpid())
    assert entry["MPD_KEY"] == "-5" and entry["MPD_SLOTS"] == "[0, 1]"
    assert entry["MPD_EXCEPTION"] == "Traceback\nBoom" and "MPD_FROM_SLOT" not in entry
    assert (tmp_path / "stdout").read_bytes() == b""  # journald took it: nothing on stdout


def test_an_entry_journald_refuses_goes_to_stdout_as_json(tmp_path: Path) -> None:
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(str(tmp_path / "journal"))
    drops = logsink.Drops()
    datagrams = logsink.DatagramSink(str(tmp_path / "journal"), drops)
    datagrams.count_refused = False
    stream = logsink.open_file(str(tmp_path / "stdout"), drops)
    writer = logmod.JournalWriter(datagrams, stream, json_message=False)
    try:
        writer.emit("info", "big.one", {"blob": "x" * (1 << 22)})  # EMSGSIZE
    finally:
        datagrams.close()
        stream.close()
        journal.close()
    line = json.loads((tmp_path / "stdout").read_text())
    assert line["event"] == "big.one" and len(line["blob"]) == 1 << 22
    assert drops.total == 0


def test_syslog_gets_rfc3164_datagrams(tmp_path: Path) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(tmp_path / "log"))
    sink = logsink.DatagramSink(str(tmp_path / "log"), logsink.Drops())
    try:
        logmod.SyslogWriter(sink, console=False).emit("warning", "a.b", {"n": 1})
        logmod.SyslogWriter(sink, console=True).emit("error", "c.d", {"n": 2})
        first, second = server.recv(65536).decode(), server.recv(65536).decode()
    finally:
        sink.close()
        server.close()
    pid = os.getpid()
    head = r"<(\d+)>[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d mpd\[(\d+)\]: (.*)"
    match = re.fullmatch(head, first)
    assert match and match[1] == "28" and match[2] == str(pid)  # daemon.warning
    assert json.loads(match[3])["event"] == "a.b"
    match = re.fullmatch(head, second)
    assert match and match[1] == "27" and match[3] == "c.d n=2"  # daemon.err


@pytest.mark.parametrize("role, slot", [("master", None), ("worker", 3)])
@pytest.mark.parametrize("fields", [
    {"key": 5, "from_slot": 0, "to_pid": 77},
    {"reason": "max_clients", "n": -1},
    {"c": "100%s", "d%": 1, "w": "plain"},
    {"a": "two words", "b": 5},  # quoted in MESSAGE: the general way
    {"nothing": None, "k": 1},
    {"pid": 9, "k": 1},  # a field named like the identity
    {},
])
def test_journal_entry_from_a_template_is_the_general_one(role: str, slot: Any,
                                                           fields: dict[str, Any]) -> None:
    identity = {"pid": 1234, "role": role, "slot": slot}
    logtext.forget_templates()
    for _ in range(2):  # the first call builds the template, the second uses it
        fast = logtext.journal_entry("6", "x%.event", identity, dict(fields))
        assert fast == logtext._journal_entry("6", "x%.event", identity, dict(fields), None)
    entry = parse_journal_entry(fast)
    assert entry["MPD_EVENT"] == "x%.event" and entry["MESSAGE"].startswith(
        "x%.event" if slot is None else "worker/3: x%.event")
