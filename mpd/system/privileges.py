"""Privileges outside systemd. Started as root (an init script, or by hand), mpd opens
what needs root (the listening socket, the control socket, the pidfile, the log file),
hands those files to `server.user`, then becomes that user for good, master and workers
alike, before any worker is forked: as nginx and HAProxy do with `user`. A start as root
without `server.user` is refused, so that mpd never serves as root unless its config
says `user = "root"`. Under systemd the unit's DynamicUser= (or User=) decides instead.

What must still work after the drop (the config for a reload, the code for an upgrade,
the log's and the control socket's directories) is checked before it, by a forked child
that becomes the user and asks the kernel (unreachable()): the one test that counts
modes, owners, supplementary groups, ACLs, read-only mounts and security modules alike."""

from __future__ import annotations

import ctypes
import grp
import json
import os
import pwd
import select
import signal
import time
from dataclasses import dataclass

from mpd.config.schema import Config
from mpd.logs import log as logmod

PR_SET_DUMPABLE = 4
CHECK_TIMEOUT = 10.0  # seconds the child that checks access may take (a hung NFS mount)

log = logmod.get_logger()


class PrivilegeError(Exception):
    """mpd must not start as it is (exit 78); the message says what to change."""


@dataclass(frozen=True)
class Identity:
    user: str
    uid: int
    group: str
    gid: int


def target(config: Config) -> Identity | None:
    """Who mpd must become once its files are open; None to stay as it is."""
    euid = os.geteuid()
    if not config.user:
        if euid == 0:
            raise PrivilegeError(
                "started as root without server.user: set server.user to the user mpd "
                "should serve as (it opens its sockets and files as root first), or "
                'server.user = "root" to serve as root knowingly')
        return None
    try:
        user = pwd.getpwnam(config.user)
        group = grp.getgrnam(config.group) if config.group else grp.getgrgid(user.pw_gid)
    except KeyError as e:
        raise PrivilegeError(f"server.user/server.group: {e.args[0]}") from None
    if user.pw_uid == euid and group.gr_gid == os.getegid():
        return None
    if euid != 0:
        raise PrivilegeError(
            f"server.user = \"{config.user}\": mpd runs as uid {euid}, and only root can "
            "become another user; start mpd as root, or leave server.user empty (under "
            "systemd, the unit's User= or DynamicUser= says who mpd runs as)")
    return Identity(user.pw_name, user.pw_uid, group.gr_name, group.gr_gid)


@dataclass(frozen=True)
class Need:
    """Something the user must be able to do once mpd runs as it."""
    path: str
    mode: int  # for os.access(): R_OK, W_OK, X_OK
    what: str  # "read the config", said of the path
    why: str  # what needs it
    required: bool = True  # else a warning: only something later fails without it


def unreachable(who: Identity, needs: list[Need]) -> list[Need]:
    """The needs that `who` cannot meet, asked by a forked child that becomes `who`.
    Raises PrivilegeError when the child cannot tell (it cannot become the user, or
    takes over CHECK_TIMEOUT)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: it only asks and writes, and never returns
        code = 1
        try:
            os.close(read)
            become(who)
            failed = [i for i, n in enumerate(needs) if not os.access(n.path, n.mode)]
            os.write(write, json.dumps(failed).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    try:
        answer = read_within(read, CHECK_TIMEOUT)
    finally:
        os.close(read)
        if os.waitpid(pid, os.WNOHANG) == (0, 0):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    if not answer:
        raise PrivilegeError(f"could not check what {who.user} can reach: the check, run "
                             f"as {who.user}:{who.group}, failed or took over "
                             f"{CHECK_TIMEOUT:g} s")
    return [needs[i] for i in json.loads(answer)]


def read_within(fd: int, timeout: float) -> bytes:
    """Everything until EOF, or what came before the timeout."""
    deadline = time.monotonic() + timeout
    data = b""
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
    return data


def drop(who: Identity, files: list[tuple[str, bool]]) -> None:
    """Give `files` (path, keep its group) to the user, then become it for good."""
    for path, keep_group in files:
        if path and os.path.exists(path):
            os.chown(path, who.uid, -1 if keep_group else who.gid)
    become(who)
    log.info("mpd.privileges_dropped", user=who.user, uid=who.uid, group=who.group,
             gid=who.gid)


def become(who: Identity) -> None:
    """Become the user and its group, for good (no way back to root)."""
    os.setgroups([])
    os.initgroups(who.user, who.gid)  # the user's own supplementary groups, no more
    os.setgid(who.gid)
    os.setuid(who.uid)  # as root: real, effective and saved uid, so there is no way back
    if os.getresuid() != (who.uid,) * 3 or os.getresgid() != (who.gid,) * 3:
        raise PrivilegeError(f"could not become {who.user}:{who.group}")
    # setuid() made the process undumpable: its /proc files would stay root's, and the
    # user could not read its own /proc/self. Nothing of root's is left to protect.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 1)
