"""The ping protocol of the seed's mpclient/mpclient2, byte for byte.

Frames: `C` + int32 little-endian key (bind the connection to that key, no reply: it
moves to the key's owner); anything else runs up to and including a NUL and gets REPLY.
Ping has no groups: its keys only route. A plain ping read whole is answered by the
worker loop itself (its stateless offer), without a call into the protocol object."""

from __future__ import annotations

from mpd.apps.interface import Application, Protocol, ProtocolError, StatelessFrame

REPLY = b"hello, server ping!\0"
REFUSAL = b"busy, server full!\0"
KEY_FRAME = 0x43  # "C"
KEY_FRAME_LEN = 5
MAX_FRAME = 65536  # bytes without a NUL before the client is cut off


class Ping(Protocol):
    __slots__ = ("transport", "buf", "pending")

    def __init__(self) -> None:
        self.transport = None
        self.buf = bytearray()  # an incomplete frame
        self.pending = False

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        frames = pos = 0
        end = len(buf)
        key = None
        try:
            while pos < end:
                if buf[pos] == KEY_FRAME:
                    if end - pos < KEY_FRAME_LEN:
                        break
                    key = int.from_bytes(buf[pos + 1:pos + KEY_FRAME_LEN], "little",
                                         signed=True)
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
        finally:
            if frames:  # the replies due before a key frame go out before its hand-off
                self.transport.write(REPLY * frames)
                self.transport.count_requests(frames)
        if key is not None:
            rest = bytes(buf[pos:])
            buf.clear()
            self.pending = False
            self.transport.join(key, rest)  # the rest is fed to us (or the owner) after it
            return
        if pos:
            del buf[:pos]
        self.pending = bool(buf)

    def export_state(self) -> bytes | None:
        return bytes(self.buf) or None  # a partial frame (ping moves only at a key frame)

    def state_restored(self, state: bytes | None) -> None:
        self.buf = bytearray(state or b"")
        self.pending = bool(self.buf)


def application() -> Application:
    return Application(name="ping", protocol=Ping, refusal=REFUSAL,
                       stateless=StatelessFrame(end=0, keyed=KEY_FRAME, reply=REPLY,
                                                max_frame=MAX_FRAME,
                                                key_size=KEY_FRAME_LEN - 1))
