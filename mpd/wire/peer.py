"""The real client's address (a PROXY header's) in a fixed 19 bytes, so that a hand-off
and a group's move can carry it: family (0 = none, 4, 6), the packed address (IPv4 in
the first 4 bytes), the port."""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Any

Address = tuple[str, int]
PEER = struct.Struct("!B16sH")
NO_PEER = PEER.pack(0, b"", 0)


def pack_peer(peer: Address | None) -> bytes:
    """The fixed PEER bytes for (host, port), or for None."""
    if peer is None:
        return NO_PEER
    host, port = peer
    if ":" in host:
        return PEER.pack(6, socket.inet_pton(socket.AF_INET6, host), port)
    return PEER.pack(4, socket.inet_pton(socket.AF_INET, host), port)


def unpack_peer(data: bytes) -> Address | None:
    """Inverse of pack_peer(); raises ValueError on bytes it cannot have made."""
    if len(data) != PEER.size:
        raise ValueError(f"peer of {len(data)} bytes, expected {PEER.size}")
    if data == NO_PEER:
        return None
    family, packed, port = PEER.unpack(data)
    if family == 4:
        return socket.inet_ntop(socket.AF_INET, packed[:4]), port
    if family == 6:
        return str(ipaddress.IPv6Address(packed)), port
    raise ValueError(f"peer with family {family}; expected 0, 4 or 6")


def format_peer(peer: Any) -> str | None:
    """host:port, [v6host]:port; None stays None."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = str(peer[0])
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    return None if peer is None else str(peer)
