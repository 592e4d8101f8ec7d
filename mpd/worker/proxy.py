"""PROXY protocol headers, v1 (text) and v2 (binary), as HAProxy's doc/proxy-protocol.txt
defines them: what a proxy such as HAProxy writes before the client's own bytes, so the
server learns who the client really is.

Strict and bounded. parse() looks at no more than MAX_HEADER bytes (V1_MAX for v1), so a
header can never make a worker hold more than that; given that many bytes it always
decides. It is incremental in the simplest way: call it again on the grown buffer as
bytes arrive (split anywhere); it answers None (need more), a ProxyHeader (whose
`length` says where the client's bytes begin), or raises ProxyError saying what is wrong,
as early as the bytes allow. Once it has raised for a buffer, it raises for any
extension of it; once it has answered a header, more bytes do not change that header.

Accepted: v1 TCP4, TCP6 and UNKNOWN; v2 LOCAL (the proxy's own health check: no client
address), v2 PROXY with TCP over IPv4 or IPv6, and v2 PROXY with UNSPEC (the v2 spelling
of v1's UNKNOWN). v2 TLVs are checked for framing, and a CRC32C TLV is verified; the rest
are skipped. Everything else (UDP, unix sockets, unknown versions, commands or families,
a stray CR or LF, leading zeros, a header over the bound) is a ProxyError."""

from __future__ import annotations

import ipaddress
import re
import socket
import struct
from typing import NamedTuple, Union

V1_PREFIX = b"PROXY "
V1_MAX = 107  # bytes of the longest v1 line, CRLF included ("PROXY UNKNOWN" + two IPv6...)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16  # signature, version/command, family/transport, length of the rest
MAX_HEADER = 536  # a v2 header with its addresses and TLVs; 576 - 40, the minimal TCP MSS
V2_MAX_BLOCK = MAX_HEADER - V2_FIXED

LOCAL, PROXY = 0x0, 0x1
UNSPEC, INET, INET6, UNIX = 0x0, 0x1, 0x2, 0x3
STREAM, DGRAM = 0x1, 0x2
ADDRESS_BLOCK = {INET: 12, INET6: 36}  # two addresses and two ports
FAMILY_NAMES = {UNSPEC: "UNSPEC", INET: "IPv4", INET6: "IPv6", UNIX: "unix sockets"}
TRANSPORT_NAMES = {UNSPEC: "UNSPEC", STREAM: "a stream (TCP)", DGRAM: "datagrams (UDP)"}
TLV_CRC32C = 0x03
# The common case: v2, PROXY, TCP over IPv4, exactly its 12 bytes of addresses and ports.
V2_TCP4 = V2_SIGNATURE + bytes([0x20 | PROXY, INET << 4 | STREAM]) + (12).to_bytes(2, "big")
TCP4_BLOCK = struct.Struct("!4s4sHH")
V2_TCP4_LENGTH = V2_FIXED + TCP4_BLOCK.size

V1_PROTOCOLS = (b"TCP4", b"TCP6", b"UNKNOWN")
V1_IPV4 = re.compile(rb"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
                     rb"(?:\.(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}\Z")
V1_IPV6_CHARS = re.compile(rb"[0-9A-Fa-f:.]{2,45}\Z")
V1_PORT = re.compile(rb"(?:0|[1-9][0-9]{0,4})\Z")
V1_ADDRESS_CHARS = re.compile(rb"[0-9A-Fa-f:. ]*\Z")  # what a TCP4/TCP6 line may hold

Buffer = Union[bytes, bytearray, memoryview]
Address = tuple[str, int]  # (host, port), as socket.accept() gives it


class ProxyError(ValueError):
    """The bytes are not a PROXY header mpd accepts; the message says what is wrong."""


class ProxyHeader(NamedTuple):
    version: int  # 1 or 2
    command: str  # "PROXY": addresses given; "LOCAL": the proxy's own check; "UNKNOWN"
    source: Address | None  # the real client, when the header names it
    destination: Address | None  # the address the client connected to on the proxy
    length: int  # bytes of the header: the client's own bytes start here


def parse(data: Buffer) -> ProxyHeader | None:
    """The header at the start of `data`; None while it is incomplete (and may still be
    valid); raises ProxyError as soon as it cannot be valid."""
    if data[:V2_FIXED] == V2_TCP4 and len(data) >= V2_TCP4_LENGTH:
        # What HAProxy's send-proxy-v2 writes for an IPv4 client: fixed size, no TLV,
        # nothing to check beyond these 16 bytes. A fifth of the general path's time.
        source, destination, source_port, destination_port = TCP4_BLOCK.unpack_from(
            data, V2_FIXED)
        return ProxyHeader(2, "PROXY", (socket.inet_ntop(socket.AF_INET, source), source_port),
                           (socket.inet_ntop(socket.AF_INET, destination), destination_port),
                           V2_TCP4_LENGTH)
    head = bytes(data[:MAX_HEADER])  # never look further: the bound holds by construction
    if not head:
        return None
    if head[0] == V2_SIGNATURE[0]:
        return _parse_v2(head)
    if head[0] == V1_PREFIX[0]:
        return _parse_v1(head[:V1_MAX])
    raise ProxyError(f"not a PROXY protocol header: the connection starts with {_show(head)}")


def _show(data: bytes, limit: int = 16) -> str:
    return repr(data[:limit]) + ("..." if len(data) > limit else "")


# --- version 2 ----------------------------------------------------------------------------

def _parse_v2(head: bytes) -> ProxyHeader | None:
    if not V2_SIGNATURE.startswith(head[:len(V2_SIGNATURE)]):
        raise ProxyError(f"not a PROXY protocol header: the connection starts with "
                         f"{_show(head)}")
    if len(head) <= 12:
        return None
    version, command = head[12] >> 4, head[12] & 0xF
    if version != 2:
        raise ProxyError(f"PROXY v2 signature with version {version}; only 2 exists")
    if command not in (LOCAL, PROXY):
        raise ProxyError(f"PROXY v2 with command 0x{command:x}; only 0 (LOCAL) and 1 (PROXY) "
                         "exist")
    if len(head) <= 13:
        return None
    family, transport = head[13] >> 4, head[13] & 0xF
    if command == PROXY:
        _check_family(family, transport)
    if len(head) < V2_FIXED:
        return None
    block = int.from_bytes(head[14:16], "big")
    if block > V2_MAX_BLOCK:
        raise ProxyError(f"PROXY v2 header of {V2_FIXED + block} bytes, over the bound of "
                         f"{MAX_HEADER}")
    needed = ADDRESS_BLOCK.get(family, 0) if command == PROXY else 0
    if block < needed:
        raise ProxyError(f"PROXY v2 over {FAMILY_NAMES[family]} with {block} bytes of "
                         f"addresses; it needs {needed}")
    length = V2_FIXED + block
    if len(head) < length:
        return None
    if command == LOCAL:  # the spec: ignore the block, family included
        return ProxyHeader(2, "LOCAL", None, None, length)
    if family == UNSPEC:  # forwarded, but the proxy cannot say from where
        return ProxyHeader(2, "UNKNOWN", None, None, length)
    _check_tlvs(head, V2_FIXED + needed, length)
    source, destination = _v2_addresses(head, family)
    return ProxyHeader(2, "PROXY", source, destination, length)


def _check_family(family: int, transport: int) -> None:
    """Only TCP over IPv4 or IPv6, or UNSPEC (unknown), for a PROXY command."""
    if (family, transport) in ((INET, STREAM), (INET6, STREAM), (UNSPEC, UNSPEC)):
        return
    if family not in FAMILY_NAMES or transport not in TRANSPORT_NAMES:
        raise ProxyError(f"PROXY v2 with family/transport byte 0x{family:x}{transport:x}, "
                         "which the protocol does not define")
    raise ProxyError(f"PROXY v2 for {TRANSPORT_NAMES[transport]} over "
                     f"{FAMILY_NAMES[family]}: mpd takes only TCP over IPv4 or IPv6")


def _v2_addresses(head: bytes, family: int) -> tuple[Address, Address]:
    size = 4 if family == INET else 16
    at = V2_FIXED
    source = _host(head[at:at + size])
    destination = _host(head[at + size:at + 2 * size])
    ports = at + 2 * size
    return ((source, int.from_bytes(head[ports:ports + 2], "big")),
            (destination, int.from_bytes(head[ports + 2:ports + 4], "big")))


MAPPED_PREFIX = b"\0" * 10 + b"\xff\xff"  # ::ffff:a.b.c.d, an IPv4 client behind an IPv6 bind


def _host(packed: bytes) -> str:
    """An address as text; an IPv4-mapped IPv6 one as the IPv4 address it maps."""
    if len(packed) == 16 and packed.startswith(MAPPED_PREFIX):
        packed = packed[12:]
    if len(packed) == 4:
        return socket.inet_ntop(socket.AF_INET, packed)
    # Not inet_ntop: glibc writes ::1:0 as "::0.1.0.0" (IPv4-compatible, long obsolete)
    return str(ipaddress.IPv6Address(packed))


def _check_tlvs(head: bytes, start: int, end: int) -> None:
    """Each TLV (type, 2-byte length, value) must fit the header exactly; a CRC32C TLV
    must match the header's checksum (computed with its own value zeroed)."""
    pos = start
    crc_at = -1
    while pos < end:
        if end - pos < 3:
            raise ProxyError(f"PROXY v2 TLV cut short: {end - pos} bytes left at the end, "
                             "a TLV takes at least 3")
        kind, size = head[pos], int.from_bytes(head[pos + 1:pos + 3], "big")
        if pos + 3 + size > end:
            raise ProxyError(f"PROXY v2 TLV 0x{kind:02x} of {size} bytes runs "
                             f"{pos + 3 + size - end} bytes past the header's end")
        if kind == TLV_CRC32C:
            if size != 4 or crc_at >= 0:
                raise ProxyError("PROXY v2 CRC32C TLV must be one, of 4 bytes")
            crc_at = pos + 3
        pos += 3 + size
    if crc_at >= 0:
        zeroed = head[:crc_at] + b"\0\0\0\0" + head[crc_at + 4:end]
        if crc32c(zeroed) != int.from_bytes(head[crc_at:crc_at + 4], "big"):
            raise ProxyError("PROXY v2 header fails its CRC32C checksum")


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as RFC 4960 appendix B and the PROXY v2 CRC32C TLV use it."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# --- version 1 ----------------------------------------------------------------------------

def _parse_v1(head: bytes) -> ProxyHeader | None:
    if not V1_PREFIX.startswith(head[:len(V1_PREFIX)]):
        raise ProxyError(f"not a PROXY protocol header: the connection starts with "
                         f"{_show(head)}")
    end = _v1_line_end(head)
    if end >= 0:
        _check_v1_so_far(head[:end], complete=True)
    else:  # the line so far, without a CR whose LF is yet to come
        _check_v1_so_far(head[:-1] if head.endswith(b"\r") else head, complete=False)
    if end < 0:
        if len(head) >= V1_MAX:
            raise ProxyError(f"PROXY v1 line without CRLF in its first {V1_MAX} bytes")
        return None
    words = head[:end].split(b" ")
    length = end + 2
    if words[1] == b"UNKNOWN":  # the spec: ignore whatever follows, up to the CRLF
        return ProxyHeader(1, "UNKNOWN", None, None, length)
    if len(words) != 6:
        raise ProxyError(f"PROXY v1 line {_show(head[:end], 64)}: expected "
                         f"'PROXY {words[1].decode()} <source> <destination> <source port> "
                         "<destination port>', single spaces")
    source = _v1_address(words[1], words[2], "source")
    destination = _v1_address(words[1], words[3], "destination")
    return ProxyHeader(1, "PROXY", (source, _v1_port(words[4], "source")),
                       (destination, _v1_port(words[5], "destination")), length)


def _v1_line_end(head: bytes) -> int:
    """Where the line's CRLF starts; -1 while there is none yet. A CR or LF that is not
    part of a CRLF is an error."""
    cr, lf = head.find(b"\r"), head.find(b"\n")
    if lf >= 0 and (cr < 0 or lf < cr):
        raise ProxyError("PROXY v1 line ends with a bare LF; it must end with CRLF")
    if cr < 0 or cr + 1 == len(head):
        if cr + 1 >= V1_MAX:
            raise ProxyError(f"PROXY v1 line longer than {V1_MAX} bytes")
        return -1
    if head[cr + 1] != 0x0A:
        raise ProxyError("PROXY v1 line with a CR not followed by LF")
    return cr


def _check_v1_so_far(line: bytes, complete: bool) -> None:
    """Reject a line as soon as its protocol word is wrong, or a TCP4/TCP6 line holds a
    byte no address or port can have. `complete`: the line's CRLF has arrived."""
    rest = line[len(V1_PREFIX):]
    word = rest.split(b" ", 1)[0]
    complete = complete or b" " in rest  # the protocol word is whole
    if not any(p == word if complete else p.startswith(word) for p in V1_PROTOCOLS):
        raise ProxyError(f"PROXY v1 with protocol {_show(word)}; expected TCP4, TCP6 or "
                         "UNKNOWN")
    if complete and word != b"UNKNOWN" and not V1_ADDRESS_CHARS.match(rest[len(word):]):
        raise ProxyError(f"PROXY v1 {word.decode()} line with a byte that is not part of an "
                         f"address or a port: {_show(line, 64)}")


def _v1_address(protocol: bytes, text: bytes, which: str) -> str:
    if protocol == b"TCP4":
        if not V1_IPV4.match(text):
            raise ProxyError(f"PROXY v1 TCP4 {which} address {_show(text, 48)} is not a dotted "
                             "IPv4 address without leading zeros")
        return text.decode()
    try:
        if not V1_IPV6_CHARS.match(text):
            raise ValueError
        return _host(ipaddress.IPv6Address(text.decode()).packed)
    except ValueError:
        raise ProxyError(f"PROXY v1 TCP6 {which} address {_show(text, 48)} is not an IPv6 "
                         "address") from None


def _v1_port(text: bytes, which: str) -> int:
    if not V1_PORT.match(text) or int(text) > 65535:
        raise ProxyError(f"PROXY v1 {which} port {_show(text, 16)} is not a number from 0 to "
                         "65535 without leading zeros")
    return int(text)

