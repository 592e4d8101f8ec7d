"""Who may use the control socket: root, mpd's own user, control.allow_uids and the members
of control.allow_group, checked with SO_PEERCRED on every connection; and, at start and on
reload, whether those ids can be seen at all from the user namespace mpd runs in.

Under systemd's PrivateUsers=yes only root and the unit's own user and group are mapped:
every other peer reads as uid 65534, and a chown to an unmapped group fails with EINVAL.
Then an allow-list can never match, so mpd refuses it with the fix (a drop-in) rather than
failing later with "Operation not permitted" or refusing every operator as "nobody"."""

from __future__ import annotations

import grp
import os
import pwd

from mpd.config.schema import Config

FIX = ("under systemd, install the access drop-in (PrivateUsers=no, Group=) from README "
       "\"Access control under systemd\"")


def why_denied(config: Config, uid: int, gid: int) -> str | None:
    """None when the peer may steer mpd, else why not (for its error line)."""
    if uid in (0, os.geteuid()) or uid in config.allow_uids:
        return None
    if config.allow_group and in_group(config.allow_group, uid, gid):
        return None
    allowed = [f"root and uid {os.geteuid()} (mpd's own)"]
    if config.allow_uids:
        allowed.append("uids " + ", ".join(str(u) for u in config.allow_uids))
    if config.allow_group:
        allowed.append(f"members of group {config.allow_group}")
    why = f"uid {uid} is not allowed: only {', '.join(allowed)} may steer mpd"
    if not visible(uid, "uid") and uid == overflow_id("uid"):
        why += (" (uid 65534 is how every user outside mpd's user namespace looks: "
                f"{FIX})")
    elif not config.allow_uids and not config.allow_group:
        why += "; set control.allow_group or control.allow_uids"
    return why


def in_group(name: str, uid: int, gid: int) -> bool:
    try:
        group = grp.getgrnam(name)
    except KeyError:
        return False
    if gid == group.gr_gid:
        return True
    try:
        return pwd.getpwuid(uid).pw_name in group.gr_mem
    except KeyError:
        return False


def id_ranges(kind: str) -> list[tuple[int, int]]:
    """The ids this process's user namespace maps, as (first, count) ranges."""
    try:
        with open(f"/proc/self/{kind}_map") as f:
            lines = f.read().splitlines()
    except OSError:
        return [(0, 2**32 - 1)]  # no user namespaces here: every id is real
    ranges = []
    for line in lines:
        inside, _outside, count = (int(x) for x in line.split())
        ranges.append((inside, count))
    return ranges


def visible(number: int, kind: str) -> bool:
    return any(first <= number < first + count for first, count in id_ranges(kind))


def overflow_id(kind: str) -> int:
    try:
        with open(f"/proc/sys/kernel/overflow{kind}") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65534


def unseen(config: Config) -> str | None:
    """Why the allow-lists cannot work in this user namespace, or None when they can."""
    hidden = [u for u in config.allow_uids if not visible(u, "uid")]
    if hidden:
        return (f"control.allow_uids: uid {hidden[0]} is not mapped in mpd's user namespace "
                f"(systemd's PrivateUsers=yes maps only root and mpd's own user): {FIX}")
    if not config.allow_group:
        return None
    try:
        gid = grp.getgrnam(config.allow_group).gr_gid
    except KeyError:
        return f"control.allow_group: no group {config.allow_group!r} on this system"
    if not visible(gid, "gid") or only_root_and_self():
        return (f"control.allow_group: the members of group {config.allow_group} (gid {gid}) "
                "are not mapped in mpd's user namespace (systemd's PrivateUsers=yes maps only "
                f"root and mpd's own user and group): {FIX}")
    return None


def only_root_and_self() -> bool:
    """The user namespace maps no uid but root's and mpd's own (PrivateUsers=yes)."""
    return sum(count for _first, count in id_ranges("uid")) <= 2
