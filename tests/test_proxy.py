"""The PROXY protocol parser on its own (mpd.proxy.parse), driven as a worker drives it:
the bytes so far, again and again as more arrive, split anywhere."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from proxy_headers import LOCAL, PROXY, SIGNATURE, TCP4, tlv, v1, v1_unknown, v2

from mpd.worker.proxy import MAX_HEADER, V1_MAX, ProxyError, ProxyHeader, crc32c, parse

CLIENT_BYTES = b"C\x01\x00\x00\x00Mhello\0"  # what follows the header: the client's own


def outcome(data: bytes) -> object:
    """parse()'s answer as a value: None, a ProxyHeader, or ("error", message)."""
    try:
        return parse(data)
    except ProxyError as e:
        return ("error", str(e))


def assert_split_everywhere(header: bytes, expected: ProxyHeader) -> None:
    """Every strict prefix needs more; the whole header, with or without the client's bytes
    after it, gives the same answer, whose length is the header's."""
    for cut in range(len(header)):
        assert parse(header[:cut]) is None, f"decided after {cut} of {len(header)} bytes"
    assert parse(header) == expected
    assert parse(bytearray(header + CLIENT_BYTES)) == expected
    assert parse(memoryview(header + CLIENT_BYTES)) == expected
    assert expected.length == len(header)


# --- valid headers -----------------------------------------------------------------------

VALID = {
    "v1 TCP4": (v1(("192.168.0.1", 56324), ("192.168.0.11", 443)),
                ProxyHeader(1, "PROXY", ("192.168.0.1", 56324), ("192.168.0.11", 443), 0)),
    "v1 TCP4 extremes": (v1(("255.255.255.255", 65535), ("0.0.0.0", 0)),
                         ProxyHeader(1, "PROXY", ("255.255.255.255", 65535), ("0.0.0.0", 0),
                                     0)),
    "v1 TCP6": (v1(("2001:db8::1", 40000), ("2001:db8::2", 1990)),
                ProxyHeader(1, "PROXY", ("2001:db8::1", 40000), ("2001:db8::2", 1990), 0)),
    "v1 TCP6 longest": (v1(("ffff:" * 7 + "ffff", 65535), ("FFFF:" * 7 + "FFFF", 65535)),
                        ProxyHeader(1, "PROXY", ("ffff:" * 7 + "ffff", 65535),
                                    ("ffff:" * 7 + "ffff", 65535), 0)),
    "v1 TCP6 IPv4-mapped": (b"PROXY TCP6 ::ffff:10.1.2.3 ::1 5 6\r\n",
                            ProxyHeader(1, "PROXY", ("10.1.2.3", 5), ("::1", 6), 0)),
    "v1 UNKNOWN": (v1_unknown(), ProxyHeader(1, "UNKNOWN", None, None, 0)),
    "v1 UNKNOWN, long form": (v1_unknown(b" " + b"ffff:" * 7 + b"ffff " + b"ffff:" * 7
                                         + b"ffff 65535 65535"),
                              ProxyHeader(1, "UNKNOWN", None, None, 0)),
    "v2 TCP4": (v2(("127.0.0.1", 50000), ("127.0.0.2", 1990)),
                ProxyHeader(2, "PROXY", ("127.0.0.1", 50000), ("127.0.0.2", 1990), 0)),
    "v2 TCP6": (v2(("2001:db8::7", 1), ("::1", 1990)),
                ProxyHeader(2, "PROXY", ("2001:db8::7", 1), ("::1", 1990), 0)),
    "v2 TCP6 IPv4-mapped": (v2(("::ffff:192.0.2.1", 9), ("::ffff:192.0.2.2", 10)),
                            ProxyHeader(2, "PROXY", ("192.0.2.1", 9), ("192.0.2.2", 10), 0)),
    "v2 TLVs skipped": (v2(("10.0.0.1", 1), ("10.0.0.2", 2),
                           tlv(0x04, b"") + tlv(0x05, b"u" * 128) + tlv(0x01, b"h2")
                           + tlv(0xE0, b"custom") + tlv(0x20, b"\x01\0\0\0\0")),
                        ProxyHeader(2, "PROXY", ("10.0.0.1", 1), ("10.0.0.2", 2), 0)),
    "v2 CRC32C checked": (v2(("10.0.0.1", 1), ("10.0.0.2", 2), tlv(0x05, b"id"), crc=True),
                          ProxyHeader(2, "PROXY", ("10.0.0.1", 1), ("10.0.0.2", 2), 0)),
    "v2 LOCAL": (v2(command=LOCAL), ProxyHeader(2, "LOCAL", None, None, 0)),
    "v2 LOCAL with an address block, ignored": (
        v2(("1.2.3.4", 5), ("5.6.7.8", 9), command=LOCAL),
        ProxyHeader(2, "LOCAL", None, None, 0)),
    "v2 LOCAL with any family, ignored": (SIGNATURE + b"\x20\xff\x00\x00",
                                          ProxyHeader(2, "LOCAL", None, None, 0)),
    "v2 PROXY UNSPEC": (v2(command=PROXY), ProxyHeader(2, "UNKNOWN", None, None, 0)),
    "v2 at the bound": (v2(("10.0.0.1", 1), ("10.0.0.2", 2),
                           tlv(0x04, b"\0" * (MAX_HEADER - 16 - 12 - 3))),
                        ProxyHeader(2, "PROXY", ("10.0.0.1", 1), ("10.0.0.2", 2), 0)),
}


@pytest.mark.parametrize("name", VALID)
def test_a_valid_header_split_at_every_byte(name: str):
    header, expected = VALID[name]
    assert_split_everywhere(header, expected._replace(length=len(header)))


def test_the_longest_v1_line_is_107_bytes_and_accepted():
    header = v1_unknown(b" " + b"ffff:" * 7 + b"ffff " + b"ffff:" * 7 + b"ffff 65535 65535")
    assert len(header) == V1_MAX
    assert parse(header).length == V1_MAX


def test_the_v2_bound_is_536_bytes():
    assert len(VALID["v2 at the bound"][0]) == MAX_HEADER


# --- malformed headers: a clear error, as early as the bytes allow -------------------------

def v2_raw(command: int, family: int, length: int, body: bytes = b"") -> bytes:
    return SIGNATURE + bytes([command, family]) + length.to_bytes(2, "big") + body


def v2_with_crc_flipped() -> bytes:
    header = bytearray(v2(("10.0.0.1", 1), ("10.0.0.2", 2), crc=True))
    header[-1] ^= 0x01
    return bytes(header)


MALFORMED = {
    "no header: the ping protocol": (b"hello, client ping!\0", "not a PROXY protocol header"),
    "no header: a key frame": (b"C\x01\x02\x03\x04", "starts with b'C\\x01"),
    "no header: HTTP": (b"GET / HTTP/1.1\r\n", "not a PROXY protocol header"),
    "lower-case proxy": (b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "not a PROXY protocol header"),
    "v1 without the space": (b"PROXYTCP4", "not a PROXY protocol header"),
    "v1 unknown protocol": (b"PROXY UDP4 1.2.3.4", "protocol b'UDP4'"),
    "v1 protocol cut by CRLF": (b"PROXY TCP\r\n", "protocol b'TCP'"),
    "v1 nothing after PROXY": (b"PROXY \r\n", "expected TCP4, TCP6 or UNKNOWN"),
    "v1 UNKNOWN glued": (b"PROXY UNKNOWNX\r\n", "protocol b'UNKNOWNX'"),
    "v1 missing ports": (b"PROXY TCP4 1.2.3.4 5.6.7.8\r\n", "single spaces"),
    "v1 double space": (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "single spaces"),
    "v1 trailing space": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "single spaces"),
    "v1 leading zero in an address": (b"PROXY TCP4 1.2.3.04 5.6.7.8 1 2\r\n",
                                      "without leading zeros"),
    "v1 octet over 255": (b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "source address"),
    "v1 IPv6 in TCP4": (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "source address"),
    "v1 IPv4 in TCP6": (b"PROXY TCP6 ::1 5.6.7.8 1 2\r\n", "destination address"),
    "v1 bad IPv6": (b"PROXY TCP6 1::2::3 ::1 1 2\r\n", "is not an IPv6 address"),
    "v1 IPv6 zone": (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "not part of an address"),
    "v1 port over 65535": (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "source port"),
    "v1 port with a leading zero": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 02\r\n",
                                    "destination port"),
    "v1 negative port": (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "not part of an address"),
    "v1 letters in an address": (b"PROXY TCP4 1.2.3.x", "not part of an address"),
    "v1 bare LF": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "bare LF"),
    "v1 bare CR": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX", "CR not followed by LF"),
    "v1 LF before CR": (b"PROXY UNKNOWN\n\r\n", "bare LF"),
    "v1 no CRLF in 107 bytes": (b"PROXY UNKNOWN " + b"x" * 100, "without CRLF"),
    "v1 line of 108 bytes": (b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n", "longer than 107"),
    "v2 bad signature": (SIGNATURE[:7] + b"X", "not a PROXY protocol header"),
    "v2 version 1": (SIGNATURE + b"\x11", "version 1; only 2 exists"),
    "v2 version 3": (SIGNATURE + b"\x31", "version 3"),
    "v2 unknown command": (SIGNATURE + b"\x22", "command 0x2"),
    "v2 UDP over IPv4": (SIGNATURE + b"\x21\x12", "datagrams (UDP) over IPv4"),
    "v2 UDP over IPv6": (SIGNATURE + b"\x21\x22", "datagrams (UDP) over IPv6"),
    "v2 unix stream": (SIGNATURE + b"\x21\x31", "a stream (TCP) over unix sockets"),
    "v2 IPv4 without transport": (SIGNATURE + b"\x21\x10", "UNSPEC over IPv4"),
    "v2 undefined family": (SIGNATURE + b"\x21\x41", "byte 0x41"),
    "v2 undefined transport": (SIGNATURE + b"\x21\x13", "byte 0x13"),
    "v2 over the bound": (v2_raw(PROXY, TCP4, MAX_HEADER - 16 + 1), "over the bound of 536"),
    "v2 at the maximum length field": (v2_raw(PROXY, TCP4, 0xFFFF), "65551 bytes"),
    "v2 LOCAL over the bound": (v2_raw(LOCAL, 0, 600), "over the bound"),
    "v2 IPv4 block too short": (v2_raw(PROXY, TCP4, 11), "11 bytes of addresses; it needs 12"),
    "v2 IPv6 block too short": (v2_raw(PROXY, 0x21, 35), "it needs 36"),
    "v2 TLV cut short": (v2(("10.0.0.1", 1), ("10.0.0.2", 2), b"\x04\x00"), "TLV cut short"),
    "v2 TLV past the end": (v2(("10.0.0.1", 1), ("10.0.0.2", 2), b"\x05\x00\x09abc"),
                            "runs 6 bytes past"),
    "v2 CRC32C of 3 bytes": (v2(("10.0.0.1", 1), ("10.0.0.2", 2), tlv(0x03, b"abc")),
                             "CRC32C TLV must be one, of 4 bytes"),
    "v2 two CRC32C TLVs": (v2(("10.0.0.1", 1), ("10.0.0.2", 2), tlv(0x03, b"abcd"),
                              crc=True), "CRC32C TLV must be one"),
    "v2 CRC32C mismatch": (v2_with_crc_flipped(), "fails its CRC32C checksum"),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_a_malformed_header_is_a_clear_error(name: str):
    data, message = MALFORMED[name]
    with pytest.raises(ProxyError) as error:
        parse(data)
    assert message in str(error.value)
    assert isinstance(outcome(data + CLIENT_BYTES), tuple), "more bytes undid the error"


@pytest.mark.parametrize("data, decided_at", [
    (b"hello", 1),  # the first byte says it is no header
    (b"PROXY TCP5", 10),  # the protocol word is wrong
    (SIGNATURE + b"\x21\x12", 14),  # UDP: known from its 14th byte
    (v2_raw(PROXY, TCP4, 600), 16),  # too long: known from the length field
])
def test_an_error_is_raised_as_soon_as_the_bytes_show_it(data: bytes, decided_at: int):
    for cut in range(decided_at):
        assert parse(data[:cut]) is None
    with pytest.raises(ProxyError):
        parse(data[:decided_at])


def test_a_truncated_header_waits_for_the_rest_and_never_guesses():
    """A header cut short (the proxy's bytes still on their way, or never coming) is not
    an answer: the caller's timeout deals with one that never completes."""
    for header, _expected in VALID.values():
        assert parse(header[:-1]) is None


def test_crc32c_matches_the_published_check_values():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC catalogue's check value
    assert crc32c(b"\0" * 32) == 0x8A9136AA  # RFC 3720, B.4
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E


# --- properties: any bytes at all ----------------------------------------------------------

@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=700))
def test_any_bytes_give_an_answer_or_a_proxy_error(data: bytes):
    result = outcome(data)  # anything but ProxyError propagates and fails the test
    if isinstance(result, ProxyHeader):
        assert result.length <= min(len(data), MAX_HEADER)
        if result.version == 1:
            assert result.length <= V1_MAX
    if len(data) >= MAX_HEADER:
        assert result is not None, "a full bound of bytes left undecided"


def header_like() -> st.SearchStrategy[bytes]:
    """Bytes that start like a header, so the fuzzing reaches past the first byte."""
    starts = st.sampled_from([b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN",
                              SIGNATURE, SIGNATURE + b"\x21", SIGNATURE + b"\x21\x11",
                              SIGNATURE + b"\x20", SIGNATURE + b"\x21\x21"])
    tails = st.binary(max_size=600) | st.text("0123456789abcdef:. \r\n", max_size=110).map(
        str.encode)
    return st.tuples(starts, tails).map(lambda t: t[0] + t[1])


@settings(max_examples=2000, deadline=None)
@given(header_like(), st.integers(0, 700))
def test_more_bytes_never_change_a_decision(data: bytes, cut: int):
    """An error stays an error and a header stays the same header when more bytes come;
    only "need more" may turn into either."""
    before, after = outcome(data[:cut]), outcome(data)
    if isinstance(before, tuple):
        assert isinstance(after, tuple), (before, after)
    elif before is not None:
        assert after == before


@settings(max_examples=1000, deadline=None)
@given(header_like(), st.binary(min_size=1, max_size=200))
def test_bytes_past_the_bound_are_never_read(data: bytes, beyond: bytes):
    head = (data + b"\0" * MAX_HEADER)[:MAX_HEADER]
    assert outcome(head + beyond) == outcome(head)


# --- properties: valid headers of every shape ---------------------------------------------

ports = st.integers(0, 65535)
ipv4 = st.integers(0, 2**32 - 1).map(lambda n: ".".join(str(n >> s & 255)
                                                         for s in (24, 16, 8, 0)))
ipv6 = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address) \
    .filter(lambda a: a.ipv4_mapped is None).map(str)
tlvs = st.lists(st.tuples(st.integers(0, 255).filter(lambda k: k != 0x03),
                          st.binary(max_size=40)), max_size=5) \
    .map(lambda items: b"".join(tlv(k, v) for k, v in items))


@st.composite
def valid_headers(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    addresses = draw(st.sampled_from([ipv4, ipv6]))
    source = (draw(addresses), draw(ports))
    destination = (draw(addresses), draw(ports))
    if draw(st.booleans()):
        header = v1(source, destination)
        return header, ProxyHeader(1, "PROXY", source, destination, len(header))
    header = v2(source, destination, draw(tlvs), crc=draw(st.booleans()))
    return header, ProxyHeader(2, "PROXY", source, destination, len(header))


@settings(max_examples=500, deadline=None)
@given(valid_headers(), st.data())
def test_valid_headers_of_any_address_split_anywhere(case, data):
    header, expected = case
    cut = data.draw(st.integers(0, len(header) - 1))
    assert parse(header[:cut]) is None
    assert parse(header + CLIENT_BYTES) == expected


@settings(max_examples=1000, deadline=None)
@given(valid_headers(), st.data())
def test_a_corrupted_header_gives_an_answer_or_a_proxy_error(case, data):
    header, _expected = case
    at = data.draw(st.integers(0, len(header) - 1))
    corrupted = bytearray(header)
    corrupted[at] = data.draw(st.integers(0, 255))
    result = outcome(bytes(corrupted) + CLIENT_BYTES)
    if isinstance(result, ProxyHeader):
        assert result.length <= MAX_HEADER


def test_v2_tcp4_header_bytes_are_those_of_the_spec():
    """The builder itself, against the spec's layout, so the tests above test the parser
    and not the builder's idea of the format."""
    header = v2(("127.0.0.1", 80), ("127.0.0.2", 1990))
    assert header == (b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, TCP4]) + b"\x00\x0c"
                      + b"\x7f\x00\x00\x01\x7f\x00\x00\x02" + b"\x00\x50\x07\xc6")


ipv4_addresses = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))


@settings(max_examples=300, deadline=None)
@given(ipv4_addresses, st.integers(0, 65535), ipv4_addresses, st.integers(0, 65535),
       st.binary(max_size=40))
def test_the_fast_path_for_haproxys_tcp4_header_answers_as_the_general_one(
        source: str, source_port: int, destination: str, destination_port: int, rest: bytes):
    """parse() takes a short cut for a v2 TCP4 header without TLVs (what HAProxy sends for
    an IPv4 client); the long way round must give the very same header."""
    from mpd.worker.proxy import _parse_v2

    data = v2((source, source_port), (destination, destination_port)) + rest
    fast = parse(data)
    assert fast == _parse_v2(data[:MAX_HEADER])
    assert fast == ProxyHeader(2, "PROXY", (source, source_port),
                               (destination, destination_port), 28)
