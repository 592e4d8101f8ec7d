"""What the master tells a worker, and the ends it asks for: the channel's messages
(ROUTES, CONFIG, DRAIN, STOP; ADOPT is handoff.py's), the heartbeat, the reload of live
settings, the graceful stop, the drain of a retiring worker and its last words.

Orders is a part of the Worker class (worker.py), kept in a file of its own as handoff.py
and upkeep.py are; it works on the worker's connections, epoll and link."""

from __future__ import annotations

import os
import select
import socket
import time
from typing import Any, Callable

from mpd.config import schema as configmod
from mpd.config.schema import Config, ConfigError
from mpd.logs import log as logmod
from mpd.wire.channel import ChannelClosed, Kind, Message, close_fds
from mpd.worker.connection import HEADER, Connection
from mpd.worker.link import Link
from mpd.worker.proxygate import ProxyGate
from mpd.worker.upkeep import UpkeepState

IN, OUT = select.EPOLLIN, select.EPOLLOUT
EXIT_OK, EXIT_CRASH, EXIT_BOOT_ERROR = 0, 1, 3  # 3: failed before serving: the master backs off
LOG_DRAIN = 0.5  # seconds an exiting worker may wait for its last log lines (LOG-HOOK)

log = logmod.get_logger()


class Orders:
    # The worker's state it works on (worker.py sets it up).
    config: Config
    conns: dict[int, Connection]
    epoll: select.epoll
    link: Link
    listener: socket.socket
    slots: tuple[int, ...]
    stats: dict[str, int]
    on_message_kind: dict[Kind, Callable[[Message], None]]
    accepting: bool
    listening: bool
    stopping: bool
    draining: bool
    running: bool
    stop_deadline: float
    link_writable_wanted: bool
    debug: bool
    max_clients: int
    rearm: Callable[[], None]
    resume_accepting: Callable[[], None]
    pause_accepting: Callable[..., None]
    on_readable: Callable[[Connection], None]
    hand_off: Callable[[Connection], None]
    close: Callable[[Connection, str], None]
    receive_room: Callable[[], int]
    set_limits: Callable[[int], None]
    up: UpkeepState
    gate: ProxyGate | None

    # --- the master: messages through the link ------------------------------------------

    def on_link(self, events: int) -> None:
        """What the master sent. Each message is handled inside a boundary: a bug in
        handling one is logged with its kind, its fds are closed (those its handler did not
        take: a handler that takes an fd removes it from message.fds), and the next one is
        handled. The worker reads only as far as it has free fds for the clients that
        messages may carry (its fd headroom is small under a low fd limit)."""
        try:
            messages = self.link.receive(bool(events & OUT), self.receive_room())
            self.watch_link()
            for message in messages:
                if self.debug:
                    log.debug("channel.message", kind=message.kind.name, size=len(message.raw))
                react = self.on_message_kind.get(message.kind)
                if react is None:
                    close_fds(message.fds)
                    log.warning("channel.error", error=f"unexpected {message.kind.name} "
                                "from master")
                    continue
                try:
                    react(message)
                except ChannelClosed:
                    raise
                except Exception as e:  # noqa: BLE001 - one message must not end the worker
                    log.exception("channel.error", kind=message.kind.name,
                                  fds=len(message.fds), error=repr(e))
                    close_fds(message.fds)
        except ChannelClosed:
            self.orphaned()

    def watch_link(self) -> None:
        """Wait for the channel to be writable only while something is queued for it."""
        wants_write = self.link.wants_write
        if wants_write != self.link_writable_wanted:
            self.link_writable_wanted = wants_write
            self.epoll.modify(self.link.fileno(), IN | OUT if wants_write else IN)

    def orphaned(self) -> None:
        # The master is gone: no one would route, supervise or reap us. Leave now.
        log.warning("worker.orphaned", reason="channel closed")
        self.running = False

    def report(self) -> None:
        try:
            self.link.report({"clients": len(self.conns), "max_clients": self.max_clients,
                              "lost": self.link.lost, **self.stats,
                              "config_generation": self.config.generation})
        except ChannelClosed:
            self.orphaned()
            return
        self.watch_link()

    def on_routes(self, message: Message) -> None:
        slots = slot_table(message)
        if slots is not None:
            self.slots = slots

    def on_config(self, message: Message) -> None:
        try:
            settings = check_live(message.meta)
        except ValueError as e:
            log.error("channel.error", kind="CONFIG", error=f"refused, nothing changed: {e}")
            return
        self.apply(settings)
        self.report()  # at once: the master counts who runs the new config

    def on_drain(self, message: Message) -> None:
        slots = slot_table(message)
        if slots is not None:
            self.drain(slots)

    def apply(self, settings: dict[str, Any]) -> None:
        """Take changed limits and log level from a reload."""
        self.config = self.config.replace(**settings)
        if self.gate is not None:
            self.gate.apply(self.config)
        try:
            logmod.configure_from(self.config)
        except ConfigError as e:  # the master could open the log and we cannot: keep ours
            log.error("config.reload_failed", error=str(e))
        self.debug = logmod.enabled("debug")
        self.set_limits(self.up.fd_limit)

    # --- stopping -----------------------------------------------------------------------

    def stop(self) -> None:
        """Graceful: no new clients; each client is closed once its replies are out."""
        if self.stopping:
            return
        self.stopping = True
        self.stop_deadline = time.monotonic() + self.config.graceful_timeout
        self.rearm()
        self.stop_listening()
        if self.draining:
            return
        log.info("worker.stopping", clients=len(self.conns))
        for conn in list(self.conns.values()):
            if conn.idle:
                # Take what the client already sent: a frame it started is finished and
                # answered before its connection is closed.
                self.on_readable(conn)
            # Every client left has bytes pending, so the loop's inline path (which has no
            # stop test) never serves it: consume() and flush() close it when it is done.
            if conn.fd in self.conns and conn.idle:
                self.close(conn, "stopping")

    def stop_listening(self) -> None:
        """Close our copy of the listening socket: once every process has, new clients are
        refused (in single-process mode ours is the only one)."""
        if self.accepting:
            self.epoll.unregister(self.listener.fileno())
            self.accepting = False
        self.listening = False
        self.listener.close()

    def quit(self) -> None:
        log.info("worker.quit")
        os._exit(EXIT_OK)

    def drain(self, slots: tuple[int, ...]) -> None:
        """Retire: stop accepting and hand every client, with its unread bytes, to the owner
        of its key under the new slot table (or to any worker when it has no key)."""
        if self.draining:
            return
        self.slots = slots
        log.info("worker.draining", clients=len(self.conns))
        self.draining = True
        self.stop()
        for conn in list(self.conns.values()):
            if conn.handoff != HEADER:  # the others follow once their header is in
                self.hand_off(conn)

    def shutdown(self) -> None:
        for conn in list(self.conns.values()):
            self.close(conn, "shutdown")
        self.link.close({"clients": 0, **self.stats})
        self.signals.close()
        self.epoll.close()
        log.info("worker.stopped", **self.stats)
        logmod.drain(LOG_DRAIN)  # LOG-HOOK: its last lines, if the sink is slow; bounded


def slot_table(message: Message) -> tuple[int, ...] | None:
    """The slot table a ROUTES or DRAIN carries: slots 0..N-1. None (logged) if it is not
    one: a table of anything else would fail later, on every keyed client."""
    slots = message.meta.get("slots")
    if isinstance(slots, list) and slots and all(type(s) is int for s in slots) \
            and slots == list(range(len(slots))):
        return tuple(slots)
    log.error("channel.error", kind=message.kind.name, error=f"not a slot table: {slots!r}")
    return None


def check_live(settings: dict[str, Any]) -> dict[str, Any]:
    """The live settings of a CONFIG message (configmod.live_settings), each checked as
    the schema checks it in a file; ValueError says what is wrong. A setting this code
    does not know (a newer master's, during an upgrade in place) is left out."""
    keys = {key.attr: key for key in configmod.SCHEMA if key.attr in configmod.LIVE_SETTINGS}
    checked: dict[str, Any] = {}
    for name, value in settings.items():
        if name == "generation":
            if type(value) is not int:
                raise ValueError(f"generation: expected an integer, got {value!r}")
            checked[name] = value
        elif name in keys:
            try:
                checked[name] = keys[name].check(value)
            except ValueError as e:
                raise ValueError(f"{keys[name].dotted}: expected {e}, got {value!r}") from None
    return checked
