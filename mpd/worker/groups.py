"""The worker's key groups: one group object per key whose members are here, made by the
application's group factory, with the members in it. A group lives while it has members.

The master places a group (it sends every joining client of a grouped key to the worker
that holds the key's group, ADOPT by ADOPT, each numbered: gseq); when the last member of
a group the master placed leaves, the group ends and the master is told (GROUP_ENDED with
the newest gseq the group took), so that it forgets the placement unless it has sent
another client since. A hook or timer of the group that raises ends the group: its
members are closed, each with connection_lost("group_error")."""

from __future__ import annotations

from typing import Any

from mpd.apps.interface import GROUP_ERROR, Application, Group, Timer
from mpd.logs import log as logmod
from mpd.wire.channel import ChannelClosed
from mpd.wire.messages import GroupEnded, GroupInfo, GroupQuery, key_from_json, key_to_json
from mpd.wire.routing import Key, show
from mpd.worker.clients import Clients
from mpd.worker.connection import CLOSED_PHASE, Connection

log = logmod.get_logger()


class Groups:
    def __init__(self, app: Application, clients: Clients, link: Any, stats: dict[str, int]):
        self.app = app
        self.clients = clients
        self.link = link
        self.stats = stats
        self.groups: dict[Key, Group] = {}
        self.moving: set[Key] = set()  # groups being exported (moves.py): not joined here
        self.timers: Any = None  # worker/timers.py (the worker sets it)

    def local(self, key: Key | None) -> Group | None:
        """The key's group, if it is here and not on its way to another worker."""
        if key is None or key in self.moving:
            return None
        return self.groups.get(key)

    def create(self, key: Key) -> Group:
        """A new group for `key`, from the application's factory, set up for mpd."""
        assert self.app.group is not None
        group = self.app.group(key)
        if not isinstance(group, Group):
            raise TypeError(f"the group factory returned {type(group).__name__}, expected a "
                            "subclass of mpd.apps.Group")
        setup(group, key, self)
        self.groups[key] = group
        self.stats["groups_made"] += 1
        return group

    def writers(self, group: Group) -> dict[Connection, Any]:
        """The members a broadcast writes to (not those closing), each with its queue's
        append: made again after any change (changed()). Members frozen by a move are
        written too: a group restored here speaks to them once they are thawed."""
        writers = group._writers = {c: c.outq.append for c in group._members
                                    if not c.closing and c.phase != CLOSED_PHASE}
        return writers

    def changed(self, group: Group) -> None:
        """A member came or went, or began closing or moving."""
        group._snapshot = None
        group._writers = None

    def queued(self, group: Group) -> None:
        """A broadcast queued output: its members are flushed at the end of the turn."""
        group._dirty = True
        self.clients.dirty_groups.append(group)

    def add(self, conn: Connection, group: Group) -> None:
        """`conn` becomes a member: member_joined() runs before any of its data."""
        group._members.append(conn)
        self.changed(group)
        conn.group = group
        group._gseq = max(group._gseq, conn.gseq)
        try:
            group.member_joined(conn)
        except Exception as e:  # noqa: BLE001 - the application's bug ends this group
            self.fail(group, "member_joined", e)

    def attach(self, conn: Connection, group: Group) -> None:
        """A member restored with its moved group: no member_joined (it never left)."""
        group._members.append(conn)
        self.changed(group)
        conn.group = group

    def leave(self, conn: Connection, reason: str) -> None:
        """A member's connection ended: member_left(), and the group ends if it was the
        last."""
        group = conn.group
        conn.group = None
        if group is None or conn not in group._members:
            return
        group._members.remove(conn)
        self.changed(group)
        if not group._failed:
            try:
                group.member_left(conn, reason)
            except Exception as e:  # noqa: BLE001
                self.fail(group, "member_left", e)
                return
        if not group._members:
            self.end(group)

    def end(self, group: Group) -> None:
        """The group has no member left: its timers are cancelled and it is forgotten."""
        if self.groups.get(group.key) is not group:
            return
        del self.groups[group.key]
        if self.timers is not None:
            self.timers.cancel_all(group)
        gseq = group._gseq
        if gseq:
            try:
                self.link.send(GroupEnded(key=key_to_json(group.key), gseq=gseq))
                self.link.watch()
            except (ChannelClosed, ValueError) as e:
                log.warning("channel.error", kind="GROUP_ENDED", error=str(e))

    def fail(self, group: Group, where: str, error: Exception) -> None:
        """An exception in a group's hook or timer: the group ends, each member closed."""
        self.stats["app_errors"] += 1
        members = list(group._members)
        log.exception("app.error", where=where, key=show(group.key), members=len(members),
                      error=repr(error))
        group._failed = True  # no more hooks
        for conn in members:
            self.clients.close(conn, GROUP_ERROR)
        self.end(group)

    def call_later(self, group: Group, delay: float, callback: Any, args: tuple[Any, ...]
                   ) -> Timer:
        return self.timers.call_later(group, delay, callback, args)

    def members(self) -> int:
        return sum(len(g._members) for g in self.groups.values())

    def query(self, message: GroupQuery) -> None:
        """mpdctl where KEY: the group of that key here, if any."""
        try:
            key = key_from_json(message.key)
        except ValueError:
            key = None
        group = self.groups.get(key) if key is not None else None
        self.link.send(GroupInfo(query=message.query, key=message.key,
                                 members=-1 if group is None else len(group._members),
                                 moving=key in self.moving))
        self.link.watch()


def setup(group: Group, key: Key, host: Groups) -> None:
    """mpd's part of a group object (whatever its subclass's __init__ did)."""
    group.key = key
    group._members = []
    group._snapshot = None
    group._writers = None
    group._dirty = False
    group._host = host
    group._gseq = 0
    group._failed = False
