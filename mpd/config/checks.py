"""Checks of config values, one per kind of value: each returns the value (normalised
where that helps) or raises ValueError saying what was expected; mpd/config/schema.py's SCHEMA
names one for every key."""

from __future__ import annotations

import grp
import ipaddress
import pwd
from typing import Any, Callable, Union

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


def int_range(lo: int, hi: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ValueError(f"an integer from {lo} to {hi}")
        return v
    return check


def float_range(lo: float, hi: float) -> Callable[[Any], float]:
    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            raise ValueError(f"a number of seconds from {lo:g} to {hi:g}")
        return float(v)
    return check


def choice(*options: str) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if v not in options:
            raise ValueError("one of " + ", ".join(f'"{o}"' for o in options))
        return v
    return check


def address(v: Any) -> str:
    try:
        if not isinstance(v, str):
            raise ValueError
        ipaddress.ip_address(v)
    except ValueError:
        raise ValueError('an IPv4 or IPv6 address such as "127.0.0.1", "0.0.0.0" or "::"') from None
    return v


def host_port(value: str) -> tuple[str, int]:
    """"127.0.0.1:1991" or "[::1]:1991" -> ("127.0.0.1", 1991); raises ValueError."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(value)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ":" not in host:
            raise ValueError(value)
    elif ":" in host:
        raise ValueError(value)  # an IPv6 address goes in brackets
    ipaddress.ip_address(host)
    return host, int(port)


def listen_or_empty(v: Any) -> str:
    try:
        if not isinstance(v, str):
            raise ValueError
        if v:
            host_port(v)
    except ValueError:
        raise ValueError('"address:port" such as "127.0.0.1:1991" or "[::1]:1991", or "" '
                         'for off') from None
    return v


def network(entry: str) -> Network:
    """One `server.proxy_from` entry: an address ("127.0.0.1", "::1") or a network
    ("10.0.0.0/8"); raises ValueError saying what is wrong."""
    try:
        return ipaddress.ip_network(entry, strict=True)
    except ValueError as e:
        if "has host bits set" in str(e):
            loose = ipaddress.ip_network(entry, strict=False)
            raise ValueError(f"{entry!r} has host bits set; the network is {loose}") from None
        raise ValueError(f"{entry!r} is not an IP address or network") from None


def networks(v: Any) -> tuple[str, ...]:
    expected = 'a list of IP addresses or networks such as ["127.0.0.0/8", "::1"]'
    if not isinstance(v, list) or not all(isinstance(e, str) for e in v):
        raise ValueError(expected)
    for entry in v:
        try:
            network(entry)
        except ValueError as e:
            raise ValueError(f"{expected} ({e})") from None
    return tuple(v)


def workers(v: Any) -> int | str:
    if v == "auto":
        return v
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 1024:
        raise ValueError('"auto" or an integer from 0 (single-process mode) to 1024')
    return v


MAX_CLIENTS = 1_000_000  # the most workers.max_clients may be, "auto" included


def max_clients(v: Any) -> int | str:
    if v == "auto":
        return v
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_CLIENTS:
        raise ValueError(f'"auto" or an integer from 1 to {MAX_CLIENTS}')
    return v


def socket_path(v: Any) -> str:
    if v == "auto":
        return v
    if not isinstance(v, str) or not v.startswith("/") or len(v.encode()) > 107:
        raise ValueError('"auto" or an absolute path of at most 107 bytes')
    return v


def path_or_empty(v: Any) -> str:
    if not isinstance(v, str) or (v and not v.startswith("/")):
        raise ValueError('an absolute path, or "" for none')
    return v


def mode(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 0o777:
        raise ValueError("a file mode from 0o000 to 0o777, written as an octal integer like 0o660")
    return v


def boolean(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError("true or false")
    return v


def uids(v: Any) -> tuple[int, ...]:
    if not isinstance(v, list) or not all(
            isinstance(u, int) and not isinstance(u, bool) and 0 <= u < 2**32 - 1 for u in v):
        raise ValueError("a list of numeric user ids, like [1000, 1001]")
    return tuple(v)


def group(v: Any) -> str:
    return existing_name(v, "group", grp.getgrnam)


def user(v: Any) -> str:
    return existing_name(v, "user", pwd.getpwnam)


def existing_name(v: Any, kind: str, lookup: Callable[[str], Any]) -> str:
    """A user's or group's name that this system knows, or "" for none."""
    if not isinstance(v, str):
        raise ValueError(f'a {kind} name, or "" for none')
    if v:
        try:
            lookup(v)
        except KeyError:
            raise ValueError(f'an existing {kind} name (no {kind} "{v}" on this system)'
                             ) from None
    return v


def protocol(v: Any) -> str:
    """An application's name: built-in, an entry point's, or package.module:factory (the
    config's check loads it: apps/loader.py's from_config())."""
    if not isinstance(v, str) or not v.strip() or any(c.isspace() for c in v):
        raise ValueError('an application: "ping", "rooms", "relay", an entry point\'s name, '
                         'or "package.module:factory"')
    return v
