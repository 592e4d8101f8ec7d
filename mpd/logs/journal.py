"""journald's native protocol, as mpd's logs speak it: whether stdout is the stream systemd
connected to journald (JOURNAL_STREAM), and an entry's fields in the datagram format
(binary-safe for values of several lines)."""

from __future__ import annotations

import functools
import os
import struct

JOURNAL_SOCKET = "/run/systemd/journal/socket"


def stream_connected(fd: int = 1) -> bool:
    """True when `fd` is the stream systemd connected to journald (JOURNAL_STREAM)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    if ":" not in expected:
        return False
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


@functools.lru_cache(maxsize=4096)  # events use a few dozen names; built char by char
def field_name(name: str) -> str:
    """A valid journal field name: upper case letters, digits, underscores, no leading _."""
    cleaned = "".join(c if c.isalnum() else "_" for c in name.upper()).lstrip("_")
    return cleaned[:64] or "FIELD"


def entry(fields: list[tuple[str, str]]) -> bytes:
    """Serialise fields in journald's native format (binary-safe for multi-line values)."""
    out = bytearray()
    for name, value in fields:
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += name.encode() + b"=" + data + b"\n"
    return bytes(out)
