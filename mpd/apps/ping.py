"""The ping protocol of the seed's mpclient/mpclient2, byte for byte.

Frames: `C` + int32 little-endian key (bind the connection to that key, no reply);
anything else runs up to and including a NUL and gets REPLY."""

from __future__ import annotations

from mpd.apps.base import ProtocolError, StatelessFrame

REPLY = b"hello, server ping!\0"
REFUSAL = b"busy, server full!\0"
KEY_FRAME = 0x43  # "C"
KEY_FRAME_LEN = 5
MAX_FRAME = 65536  # bytes without a NUL before the client is cut off


class PingProtocol:
    name = "ping"
    refusal = REFUSAL
    # A plain ping read whole: the worker loop answers it without calling feed().
    stateless = StatelessFrame(end=0, keyed=KEY_FRAME, reply=REPLY, max_frame=MAX_FRAME)

    def feed(self, buf: bytearray, data: bytes) -> tuple[bytes, int, int | None]:
        # Fast path: nothing pending and `data` is exactly one plain frame (the usual ping).
        if (not buf and data and data[0] != KEY_FRAME and data.find(0) == len(data) - 1
                and len(data) <= MAX_FRAME):
            return REPLY, 1, None
        buf += data
        frames = 0
        pos = 0
        end = len(buf)
        key = None
        while pos < end:
            if buf[pos] == KEY_FRAME:
                if end - pos < KEY_FRAME_LEN:
                    break
                key = int.from_bytes(buf[pos + 1:pos + KEY_FRAME_LEN], "little", signed=True)
                pos += KEY_FRAME_LEN
                break
            nul = buf.find(0, pos)
            if nul < 0:
                if end - pos > MAX_FRAME:
                    raise ProtocolError(f"frame of over {MAX_FRAME} bytes without a NUL")
                break
            if nul - pos >= MAX_FRAME:
                raise ProtocolError(f"frame of {nul - pos + 1} bytes, over {MAX_FRAME}")
            frames += 1
            pos = nul + 1
        if pos:
            del buf[:pos]
        return REPLY * frames, frames, key
