"""Privileges outside systemd. Started as root (an init script, or by hand), mpd opens
what needs root (the listening socket, the control socket, the pidfile, the log file),
hands those files to `server.user`, then becomes that user for good, master and workers
alike, before any worker is forked: as nginx and HAProxy do with `user`. A start as root
without `server.user` is refused, so that mpd never serves as root unless its config
says `user = "root"`. Under systemd the unit's DynamicUser= (or User=) decides instead."""

from __future__ import annotations

import ctypes
import grp
import os
import pwd
from dataclasses import dataclass

from mpd.config.schema import Config
from mpd.logs import log as logmod

PR_SET_DUMPABLE = 4

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


def drop(who: Identity, files: list[tuple[str, bool]]) -> None:
    """Give `files` (path, keep its group) to the user, then become it for good."""
    for path, keep_group in files:
        if path and os.path.exists(path):
            os.chown(path, who.uid, -1 if keep_group else who.gid)
    os.setgroups([])
    os.initgroups(who.user, who.gid)  # the user's own supplementary groups, no more
    os.setgid(who.gid)
    os.setuid(who.uid)  # as root: real, effective and saved uid, so there is no way back
    if os.getresuid() != (who.uid,) * 3 or os.getresgid() != (who.gid,) * 3:
        raise PrivilegeError(f"could not become {who.user}:{who.group}")
    # setuid() made the process undumpable: its /proc files would stay root's, and the
    # user could not read its own /proc/self. Nothing of root's is left to protect.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 1)
    log.info("mpd.privileges_dropped", user=who.user, uid=who.uid, group=who.group,
             gid=who.gid)
