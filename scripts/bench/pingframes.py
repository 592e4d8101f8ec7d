"""The ping protocol's framing for the Python baselines that speak it in full (the raw-fd
floor and the asyncio servers), as mpd/apps/ping.py defines it: `C` + a 4-byte key
binds a connection (no reply; its bytes may hold NULs), any other frame runs up to a NUL
and gets REPLY. A frame may arrive in pieces, so a connection carries a state between
reads. Standard library only (nothing at all, in fact): each baseline imports it as a
sibling module."""

from __future__ import annotations

REPLY = b"hello, server ping!\0"
KEY_FRAME = 0x43  # "C"
KEY_LEN = 4
AT_START = 0  # the next byte starts a frame
IN_TEXT = -1  # inside a frame's text, its NUL still to come
# 1..KEY_LEN: that many key bytes of a `C` frame still to come


def parse(state: int, data: bytes) -> tuple[int, int]:
    """(frames to reply to, state after `data`) for `data` read in `state`."""
    frames = 0
    pos = 0
    end = len(data)
    while pos < end:
        if state > 0:
            step = min(state, end - pos)
            pos += step
            state -= step
            continue
        if state == AT_START and data[pos] == KEY_FRAME:
            state = KEY_LEN
            pos += 1
            continue
        nul = data.find(0, pos)
        if nul < 0:
            return frames, IN_TEXT
        frames += 1
        pos = nul + 1
        state = AT_START
    return frames, state
