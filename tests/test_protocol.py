"""The ping protocol on its own: a Ping object driven the way the worker drives it (each
chunk to data_received(); after a join, the rest it gave back), against a model of the
stream. The transport here only records what the protocol asked of it."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpd.apps import ProtocolError
from mpd.apps.ping import MAX_FRAME, REPLY, Ping, application

Token = tuple  # ("reply",) or ("key", k)


class Recorder:
    """The transport's side as the worker plays it: what the protocol wrote and joined,
    in order; a join's rest is fed back as the worker does after a join here."""

    def __init__(self) -> None:
        self.out: list[Token] = []
        self.rest = b""

    def write(self, data: bytes) -> None:
        assert len(data) % len(REPLY) == 0 and data == REPLY * (len(data) // len(REPLY))
        self.out += [("reply",)] * (len(data) // len(REPLY))

    def count_requests(self, frames: int) -> None:
        pass

    def join(self, key: int, rest: bytes) -> None:
        self.out.append(("key", key))
        self.rest = rest


def run(chunks: list[bytes]) -> tuple[list[Token], bytearray]:
    """Feed `chunks` in order as the worker does; return what the server did, in order:
    one ("reply",) per reply and one ("key", k) per bound key, and the bytes it holds."""
    protocol = Ping()
    transport = Recorder()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    for chunk in chunks:
        protocol.data_received(chunk)
        while transport.rest:
            rest, transport.rest = transport.rest, b""
            protocol.data_received(rest)
    return transport.out, protocol.buf


def key_frame(key: int) -> bytes:
    return b"C" + struct.pack("<i", key)


# --- the frames of the protocol table ---------------------------------------------------------

_body = st.binary(max_size=40).map(lambda b: b.replace(b"\0", b"."))
plain_frames = st.tuples(st.integers(0, 255).filter(lambda c: c not in (0x00, 0x43)),
                         _body).map(lambda t: bytes([t[0]]) + t[1] + b"\0")
m_frames = _body.map(lambda b: b"M" + b + b"\0")
nul_frames = st.just(b"\0")  # a frame that starts with (and is only) its NUL
keys = st.integers(-(2**31), 2**31 - 1)
key_frames = keys.map(key_frame)
frames = st.lists(st.one_of(plain_frames, m_frames, nul_frames, key_frames), max_size=40)


def model(stream_frames: list[bytes]) -> list[Token]:
    """What the protocol table says the server does for these frames."""
    out: list[Token] = []
    for frame in stream_frames:
        if frame[0] == 0x43:
            out.append(("key", struct.unpack("<i", frame[1:5])[0]))
        else:
            out.append(("reply",))
    return out


@st.composite
def split_streams(draw: st.DrawFn) -> tuple[list[bytes], list[bytes]]:
    """Frames, and their concatenation cut at arbitrary points (each chunk may hold parts
    of several frames: splitting and coalescing at once)."""
    fs = draw(frames)
    stream = b"".join(fs)
    cuts: list[int] = []
    if len(stream) > 1:
        cuts = sorted(draw(st.sets(st.integers(1, len(stream) - 1), max_size=20)))
    bounds = [0, *cuts, len(stream)]
    chunks = [stream[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
    return fs, chunks


@settings(max_examples=300, deadline=None)
@given(split_streams())
def test_any_split_or_coalescing_gives_the_replies_and_keys_of_one_piece(case):
    fs, chunks = case
    whole, rest_whole = run([b"".join(fs)])
    split, rest_split = run(chunks)
    assert whole == model(fs)
    assert split == whole
    assert rest_whole == rest_split == b""


@settings(max_examples=100, deadline=None)
@given(frames)
def test_byte_by_byte_and_frame_by_frame_feeding(fs):
    stream = b"".join(fs)
    expected = model(fs)
    assert run([stream[i:i + 1] for i in range(len(stream))]) == (expected, bytearray())
    assert run(fs) == (expected, bytearray())


@settings(max_examples=200, deadline=None)
@given(keys, st.integers(1, 4), st.integers(0, 3))
def test_a_split_key_frame_binds_the_right_signed_key(key, cut, pings):
    frame = key_frame(key)
    stream = frame + b"Mhello\0" * pings
    out, rest = run([stream[:cut], stream[cut:]])
    assert out == [("key", key)] + [("reply",)] * pings
    assert rest == b""


@pytest.mark.parametrize("key", [-1, -(2**31), 2**31 - 1, 0, 1, 0x12345678, -0x12345678])
def test_key_frame_split_in_every_way(key):
    frame = key_frame(key)
    for cut in range(1, len(frame)):
        protocol, transport = Ping(), Recorder()
        protocol.connection_made(transport)  # type: ignore[arg-type]
        protocol.data_received(frame[:cut])
        assert transport.out == [] and protocol.buf == frame[:cut]  # incomplete: nothing
        assert protocol.pending  # the loop must not answer this client inline now
        protocol.data_received(frame[cut:])
        assert transport.out == [("key", key)] and protocol.buf == b""


def test_a_key_frame_gives_the_rest_back_for_the_keys_owner():
    protocol, transport = Ping(), Recorder()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    tail = b"Mone\0Mtw"
    protocol.data_received(b"ping\0" + key_frame(-7) + tail)
    assert transport.out == [("reply",), ("key", -7)]  # the reply before the join
    assert transport.rest == tail  # the bytes a hand-off carries, unconsumed and in order
    assert protocol.buf == b"" and not protocol.pending


def test_the_seed_clients_pings():
    """mpclient sends "hello, client ping!" with its NUL; mpclient2 sends C+key then M."""
    assert run([b"hello, client ping!\0"]) == ([("reply",)], bytearray())
    out, rest = run([key_frame(3) + b"Mhello, client ping!\0"])
    assert out == [("key", 3), ("reply",)] and rest == b""
    app = application()
    assert app.name == "ping" and app.group is None and app.stateless is not None
    assert app.stateless.reply == REPLY


# --- the frame bound --------------------------------------------------------------------------

def test_the_largest_allowed_frame_is_served_however_it_arrives():
    frame = b"x" * (MAX_FRAME - 1) + b"\0"  # MAX_FRAME bytes with its NUL
    for size in (1000, 32768, len(frame) - 1):
        chunks = [frame[i:i + size] for i in range(0, len(frame), size)]
        assert run(chunks) == ([("reply",)], bytearray())


@pytest.mark.parametrize("size", [1, 1000, 32768, MAX_FRAME])
def test_over_64k_without_a_nul_is_a_protocol_error(size):
    garbage = b"g" * (MAX_FRAME + 1)
    with pytest.raises(ProtocolError):
        run([garbage[i:i + size] for i in range(0, len(garbage), size)])


@pytest.mark.parametrize("prefix", [b"", b"ping\0", key_frame(5)])
def test_an_oversized_frame_that_ends_in_a_nul_is_a_protocol_error_when_split(prefix):
    frame = b"g" * MAX_FRAME + b"\0"
    chunks = [prefix + frame[:32768], frame[32768:]]
    with pytest.raises(ProtocolError):
        run(chunks)


def test_an_oversized_frame_that_ends_in_a_nul_is_a_protocol_error_in_one_piece():
    with pytest.raises(ProtocolError):
        run([b"g" * MAX_FRAME + b"\0"])
