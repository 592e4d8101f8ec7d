"""PROXY protocol headers built by hand from HAProxy's doc/proxy-protocol.txt, for the
tests: what a proxy would write before a client's bytes."""

from __future__ import annotations

import socket
import struct

from mpd.worker.proxy import crc32c

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
LOCAL, PROXY = 0x20, 0x21  # version 2 with each command
TCP4, TCP6, UNSPEC = 0x11, 0x21, 0x00


def v1(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    protocol = "TCP6" if ":" in source[0] else "TCP4"
    return (f"PROXY {protocol} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n"
            .encode())


def v1_unknown(rest: bytes = b"") -> bytes:
    return b"PROXY UNKNOWN" + rest + b"\r\n"


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def v2(source: tuple[str, int] | None = None, destination: tuple[str, int] | None = None,
       tlvs: bytes = b"", command: int = PROXY, family: int | None = None,
       crc: bool = False) -> bytes:
    """A v2 header; with crc, a CRC32C TLV is appended and filled in."""
    block = b""
    if source is not None and destination is not None:
        ipv6 = ":" in source[0]
        af = socket.AF_INET6 if ipv6 else socket.AF_INET
        block = (socket.inet_pton(af, source[0]) + socket.inet_pton(af, destination[0])
                 + struct.pack("!HH", source[1], destination[1]))
        if family is None:
            family = TCP6 if ipv6 else TCP4
    if family is None:
        family = UNSPEC
    if crc:
        tlvs += tlv(0x03, b"\0\0\0\0")
    body = block + tlvs
    header = SIGNATURE + bytes([command, family]) + struct.pack("!H", len(body)) + body
    if crc:
        header = header[:-4] + struct.pack("!I", crc32c(header))
    return header
