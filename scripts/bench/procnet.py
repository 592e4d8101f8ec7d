"""Which process holds the server's end of a client's TCP connection, from /proc: the
connection's socket inode in /proc/net/tcp (by its ports), then the process whose fds
include that inode. The co-location driver uses it to tell which worker serves a room,
whatever the server (no log line or hash function of mpd's is needed). Standard library
only; IPv4 loopback, as everything the benchmark runs."""

from __future__ import annotations

import contextlib
import os


def server_inodes(server_port: int, client_ports: set[int]) -> dict[int, int]:
    """{client port: inode of the server's socket} for connections to server_port."""
    found: dict[int, int] = {}
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], int(fields[9])
            if int(local.rsplit(":", 1)[1], 16) != server_port:
                continue
            peer = int(remote.rsplit(":", 1)[1], 16)
            if peer in client_ports and inode:
                found[peer] = inode
    return found


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
    return inodes


def owners(pids: list[int], server_port: int, client_ports: list[int]) -> dict[int, int]:
    """{client port: pid of the process holding the server's end}; ports not found (the
    connection gone, or held by none of `pids`) are left out."""
    by_port = server_inodes(server_port, set(client_ports))
    held = {pid: socket_inodes(pid) for pid in pids}
    result = {}
    for port, inode in by_port.items():
        for pid, inodes in held.items():
            if inode in inodes:
                result[port] = pid
                break
    return result
