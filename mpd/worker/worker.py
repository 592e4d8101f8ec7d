"""A worker: one level-triggered epoll loop over the shared listening socket, its link to
the master, its clients and its signals, and the parts it owns:

    clients   the client table: a connection comes and goes, is read and written
    acceptor  taking new clients (pauses, batches, the fd limit)
    proxy     server.proxy_protocol's header phase (None without it)
    handoff   a client joining a key: here, or handed to the key's worker; adopting one
    groups    the key groups whose members are here
    moves     a whole group leaving for another worker, or arriving
    timers    the application's call_later()
    timeouts  first-frame and idle timeouts

The loop answers the common case itself: a readable client with nothing pending whose
read is one stateless frame (the application's offer: ping's). Everything else goes to
the client table. What the master says comes through the link (link.py), each message
to its reaction by one table; under a master the link is a channel, in single-process
mode (`workers = 0`) a stand-in, with the same loop."""

from __future__ import annotations

import os
import select
import socket
import time
from typing import Any, Callable

from mpd.apps.interface import STOP, Application
from mpd.config import schema as configmod
from mpd.config.schema import Config, ConfigError
from mpd.logs import log as logmod
from mpd.system import testhooks as hooks
from mpd.wire import counters
from mpd.wire import messages as msg
from mpd.wire.channel import ChannelClosed, close_fds
from mpd.wire.exits import EXIT_BOOT_ERROR, EXIT_CRASH, EXIT_OK
from mpd.wire.routing import Routes, show
from mpd.worker.acceptor import Acceptor
from mpd.worker.clients import RECV_SIZE, Clients
from mpd.worker.connection import HEADER, LEAVING
from mpd.worker.groups import Groups
from mpd.worker.handoff import HandOff
from mpd.worker.link import Link, MasterLink, StandaloneLink
from mpd.worker.moves import Moves
from mpd.worker.proxyphase import ProxyPhase
from mpd.worker.timeouts import ROUND, Timeouts
from mpd.worker.timers import Timers

IN, OUT = select.EPOLLIN, select.EPOLLOUT
INF = float("inf")
NO_ROUTES = Routes(0, ())  # single-process mode: every key is ours
LOG_WRITE_OUT = 0.5  # seconds an exiting worker may wait for its last log lines
BULK_READ = 262144  # bytes the loop reads at a time for an application without an offer

log = logmod.get_logger()


def run_worker(config: Config, app: Application, listener: socket.socket,
               channel: socket.socket, slot: int, routes: Routes) -> int:
    """A forked worker's life, under its master."""
    return Worker(config, app, listener, MasterLink(channel), slot, routes).run()


def run_single(config: Config, app: Application, listener: socket.socket) -> int:
    """Single-process mode: this process serves, with no master."""
    return Worker(config, app, listener, StandaloneLink()).run()


class Worker:
    def __init__(self, config: Config, app: Application, listener: socket.socket, link: Link,
                 slot: int | None = None, routes: Routes = NO_ROUTES):
        self.config = config
        self.app = app
        self.link = link
        self.slot = slot
        self.stats = counters.zeroed()
        clients = self.clients = Clients(app, config.max_output_buffer, self.stats,
                                         {"slot": slot, "pid": os.getpid()})
        self.proxy = ProxyPhase(config, clients, self.stats) if config.proxy_protocol else None
        self.acceptor = Acceptor(config, listener, clients)
        self.acceptor.allowed = hooks.accepts(slot)
        self.handoff = HandOff(app, clients, link, self.stats, slot, routes,
                               self.acceptor.family, self.acceptor.kind)
        self.groups = Groups(app, clients, link, self.stats)
        self.timers = Timers(clients, self.groups)
        self.moves = Moves(config, app, clients, self.groups, self.timers, link, self.stats,
                           self.acceptor.family, self.acceptor.kind)
        self.timeouts = Timeouts(config, clients, self.stats)
        clients.groups, clients.handoff, clients.acceptor = self.groups, self.handoff, \
            self.acceptor
        clients.timers, clients.proxy = self.timers, self.proxy
        self.handoff.groups, self.handoff.acceptor = self.groups, self.acceptor
        self.groups.timers = self.timers
        self.timers.wake = self.acceptor.wake = self.wake  # timed work they begin
        if self.proxy is not None:
            self.proxy.handoff, self.proxy.wake = self.handoff, self.wake
        self.acceptor.on_full = self.report
        self.running = True
        self.stop_deadline = 0.0  # stopping: close whatever is left at this time
        self.next_heartbeat = 0.0
        self.next_round = 0.0
        self.next_timer = 0.0  # the earliest of the times the loop looks at: one test a turn
        # What the master may tell us: one table, as nginx keeps one switch.
        self.reactions: dict[int, Callable[[Any], None]] = {
            msg.Kind.ADOPT: self.handoff.adopt, msg.Kind.ROUTES: self.on_routes,
            msg.Kind.CONFIG: self.on_config, msg.Kind.RETIRE: self.retire,
            msg.Kind.STOP: lambda _m: self.stop(),
            msg.Kind.MOVE_OUT: self.moves.move_out, msg.Kind.MOVE_CHUNK: self.moves.chunk,
            msg.Kind.MOVE_DONE: self.moves.done, msg.Kind.MOVE_ABORT: self.moves.abort,
            msg.Kind.REOPEN_LOGS: lambda _m: self.reopen_logs(),
            msg.Kind.GROUP_QUERY: self.groups.query}

    # --- the loop ---------------------------------------------------------------------

    def run(self) -> int:
        """Boot, then serve until stopped. An exception before the loop serves is a boot
        error (exit 3: the master backs off); one that escapes the loop later is a crash."""
        if hooks.crash_requested():
            log.error("worker.test_crash")
            return EXIT_BOOT_ERROR
        self.boot()
        try:
            self.serve()
        except Exception as e:  # noqa: BLE001 - logged; the master respawns the slot at once
            log.exception("worker.crashed", error=repr(e))
            return EXIT_CRASH
        self.shutdown()
        return EXIT_OK

    def boot(self) -> None:
        self.epoll = self.clients.epoll = select.epoll()
        self.signals = self.link.signals(self)
        self.epoll.register(self.signals.fileno(), IN)
        self.link.boot(self.epoll)
        self.acceptor.boot(self.epoll)  # and accept
        self.link.hello(self.slot, self.app.state_version)
        log.info("worker.serving", max_clients=self.acceptor.max_clients,
                 protocol=self.app.name)

    def serve(self) -> None:
        """The loop. Its common case is served right here, with locals: a client with
        nothing pending whose read is one stateless frame (README: design notes)."""
        clients, conns, stats = self.clients, self.clients.conns, self.stats
        poll, monotonic, readv, write = self.epoll.poll, time.monotonic, os.readv, os.write
        end, keyed, reply, size, inbox = self.fast_path()
        into, view = (inbox,), memoryview(inbox)
        requests, log_fd = 0, -1  # requests: published at the timer turn
        now = clients.now = monotonic()
        while self.running and not (clients.stopping and not conns and not self.moves.busy):
            fd = -1  # the fd whose event is handled: a bug there ends that one peer only
            try:
                if now >= self.next_timer:
                    stats["requests"], requests = stats["requests"] + requests, 0
                    self.on_timers(now)
                log_fd = logmod.watch_epoll(self.epoll)
                ready = poll(self.next_timer - now if self.next_timer < INF else -1)
                now = clients.now = monotonic()  # the clients' stamp: no clock read per read
                for fd, events in ready:
                    conn = conns.get(fd)
                    if conn is None:
                        self.on_other(fd, events, log_fd)
                    elif events != IN or conn.phase or conn.held:
                        clients.on_event(conn, events)
                    else:  # the common case: one read, the offer's test inline, one write
                        try:
                            n = readv(fd, into)
                        except OSError as e:
                            clients.read_failed(conn, e)
                            continue
                        # (output already queued goes first: the reply joins the queue)
                        if n and inbox[n - 1] == end and not conn.outq and inbox[0] != keyed \
                                and inbox.find(end, 0, n) == n - 1:
                            conn.seen = now
                            requests += 1
                            try:
                                sent = write(fd, reply)
                            except OSError:  # full (EAGAIN) or failed: the queue tries again
                                sent = 0
                            if sent != size:
                                conn.write(reply[sent:])
                        else:  # EOF, part of a frame, several frames, a key frame
                            clients.received(conn, view[:n].tobytes())
                fd = -1
                if clients.dirty or clients.dirty_groups:
                    clients.flush_dirty()
            except Exception as e:  # noqa: BLE001 - the rest of the turn's events come again
                self.contain(fd, e)  # (level-triggered) at the next poll
                now = clients.now = monotonic()
        stats["requests"] += requests

    def fast_path(self) -> tuple[int, int, bytes, int, bytearray]:
        """The application's stateless offer for the loop: (end, keyed, reply, its size,
        the buffer reads go to). Without one `end` is -1, which no byte equals: every read
        goes to the protocol, and reads may be bigger: a relay publisher's bulk then costs
        fewer turns per byte, and a small read costs what it reads (no allocation)."""
        offer = self.app.stateless
        if offer is None or offer.max_frame < RECV_SIZE:
            return -1, -1, b"", 0, bytearray(BULK_READ)
        return offer.end, offer.keyed, offer.reply, len(offer.reply), bytearray(RECV_SIZE)

    def on_other(self, fd: int, events: int, log_fd: int) -> None:
        """An event on something other than a client."""
        if fd == self.acceptor.fd:
            self.acceptor.accept(self.clients.now)
        elif fd == self.link.fileno():
            self.on_link(events)
        elif fd == self.signals.fileno():
            self.signals.dispatch()
        elif fd == log_fd:  # the log sink can take queued lines again
            logmod.flush()

    def contain(self, fd: int, error: Exception) -> None:
        """A bug met in handling one event: log it with what it was about, end that one
        peer, and go on. A client is closed; accepting pauses as after EMFILE; the timers
        wait a second; a failing channel to the master is a lost master."""
        conn = self.clients.conns.get(fd)
        if conn is not None:
            log.exception("client.error", fd=fd, key=show(conn.key), error=repr(error))
            self.clients.discard(conn)
            return
        where = {self.acceptor.fd: "accept", self.link.fileno(): "channel",
                 self.signals.fileno(): "signals"}.get(fd, "timers") if fd >= 0 else "timers"
        log.exception("loop.error", where=where, fd=fd, error=repr(error))
        now = time.monotonic()
        if where == "accept":
            self.acceptor.pause("error", now, retry=True)
        elif where == "channel":
            self.orphaned()
        elif where == "timers":
            self.clients.drop_dirty()  # what a failing flush left: written on OUT or never
            self.next_heartbeat = max(self.next_heartbeat, now + 1)
            self.next_round = max(self.next_round, now + 1)
            self.stop_deadline = self.stop_deadline and max(self.stop_deadline, now + 1)
        self.rearm()

    def wake(self, when: float) -> None:
        """Something timed was set for `when` (an application's timer)."""
        if when < self.next_timer:
            self.next_timer = when

    def rearm(self) -> None:
        """The next time the loop has timed work."""
        self.next_timer = min(self.acceptor.retry_at or INF, self.stop_deadline or INF,
                              self.next_heartbeat, self.next_round, self.timers.next_due(),
                              self.proxy.next_due() if self.proxy is not None else INF,
                              self.moves.deadline())

    def on_timers(self, now: float) -> None:
        self.acceptor.retry(now)
        if now >= self.next_heartbeat:
            self.next_heartbeat = now + self.link.heartbeat
            if hooks.hang_requested():
                hooks.hang()
            self.report()
        if now >= self.next_round:
            self.next_round = now + ROUND
            self.acceptor.each_round(now, ROUND)
            self.timeouts.sweep(now)
        if self.proxy is not None and now >= self.proxy.next_due():
            self.proxy.expire(now)
        self.timers.run_due(now)
        self.moves.tick(now)
        if self.clients.stopping and (not self.clients.conns and not self.moves.busy
                                      or now >= self.stop_deadline):
            self.running = False
        self.rearm()

    # --- the master: messages through the link ------------------------------------------

    def on_link(self, events: int) -> None:
        """What the master sent, each message inside a boundary: a bug in handling one is
        logged with its kind, its fds are closed (those its handler did not take), and the
        next one is handled. Full (or near the fd limit), the worker reads only as far as
        it has free fds for the clients that messages may carry."""
        try:
            limit = self.acceptor.receive_room(self.link.queued)
            messages = self.link.receive(bool(events & OUT), limit)
            if not self.link.wants_write:
                self.moves.link_flushed()
            for message in messages:
                self.on_message(message)
        except ChannelClosed:
            self.orphaned()

    def on_message(self, message: msg.Message) -> None:
        if self.clients.debug:
            log.debug("channel.message", kind=msg.Kind(message.kind).name)
        react = self.reactions.get(message.kind)
        if react is None:
            close_fds(message.fds)
            log.warning("channel.error", error=f"unexpected {msg.Kind(message.kind).name} "
                        "from master")
            return
        try:
            react(message)
        except ChannelClosed:
            raise
        except Exception as e:  # noqa: BLE001 - one message must not end the worker
            log.exception("channel.error", kind=msg.Kind(message.kind).name,
                          fds=len(message.fds), error=repr(e))
        if message.fds:
            close_fds(message.fds)  # what its reaction did not take
            message.fds = []

    def orphaned(self) -> None:
        # The master is gone: no one would route, supervise or reap us. Leave now.
        log.warning("worker.orphaned", reason="channel closed")
        self.running = False

    def report(self) -> None:
        """The heartbeat: counters and gauges (wire/counters.py) to the master."""
        try:
            self.link.report({
                **self.stats, "clients": len(self.clients.conns),
                "max_clients": self.acceptor.max_clients, "lost": self.link.lost,
                "groups": len(self.groups.groups), "members": self.groups.members(),
                "config_generation": self.config.generation})
        except ChannelClosed:
            self.orphaned()

    def on_routes(self, message: msg.Routes) -> None:
        routes = slot_table(message)
        if routes is not None:
            self.handoff.routes = routes

    def on_config(self, message: msg.Config) -> None:
        try:
            settings = check_live(message.settings)
        except ValueError as e:
            log.error("channel.error", kind="CONFIG", error=f"refused, nothing changed: {e}")
            return
        self.reconfigure(settings)
        self.report()  # at once: the master counts who runs the new config

    def reconfigure(self, settings: dict[str, Any]) -> None:
        """Take changed limits and log settings from a reload."""
        self.config = self.config.replace(**settings)
        for part in (self.acceptor, self.timeouts, self.moves):
            part.config = self.config
        self.clients.max_output = self.config.max_output_buffer
        if self.proxy is not None:
            self.proxy.apply(self.config)
        try:
            logmod.configure_from(self.config)
        except ConfigError as e:  # the master could open the log and we cannot: keep ours
            log.error("config.reload_failed", error=str(e))
        self.clients.debug = logmod.enabled("debug")
        self.acceptor.set_limits(self.acceptor.fd_limit)

    def reopen_logs(self) -> None:
        """Open the log file anew at its path (logrotate renamed it); logmod logs how."""
        logmod.reopen()

    # --- stopping -----------------------------------------------------------------------

    def stop(self) -> None:
        """Graceful: no new clients; each client is closed once it is idle (whatever it
        already sent answered, whatever is due to it written)."""
        clients = self.clients
        if clients.stopping:
            return
        clients.stopping = True
        self.stop_deadline = time.monotonic() + self.config.graceful_timeout
        self.rearm()
        self.acceptor.stop_listening()
        if self.handoff.retiring:
            return
        log.info("worker.stopping", clients=len(clients.conns))
        for conn in list(clients.conns.values()):
            if conn.idle and conn.phase == 0:
                clients.readable(conn)  # a frame it started is finished and answered first
            if conn.idle and conn.phase == 0:
                clients.close(conn, STOP)
            # The others close once they are idle (clients.py: after_input, written).

    def quit(self) -> None:
        log.info("worker.quit")
        os._exit(EXIT_OK)

    def retire(self, message: msg.Retire) -> None:
        """Stop accepting and hand every client that is in no group to its key's owner
        under the new slot table (or to any worker when it has no key); the master moves
        the groups (MOVE_OUT), then the worker exits."""
        if self.handoff.retiring:
            return
        routes = slot_table(message)
        if routes is None:
            return
        self.handoff.routes = routes
        log.info("worker.retiring", clients=len(self.clients.conns),
                 groups=len(self.groups.groups))
        self.handoff.retiring = True
        self.clients.keep_members = True  # they go with their groups (MOVE_OUT)
        self.stop()
        for conn in list(self.clients.conns.values()):
            if conn.group is None and conn.phase != HEADER:  # a header comes first
                conn.phase = LEAVING
                self.handoff.give(conn)

    def shutdown(self) -> None:
        self.moves.close()
        for conn in list(self.clients.conns.values()):
            self.clients.close(conn, STOP)
        self.link.close({**self.stats, "clients": 0})
        self.signals.close()
        self.epoll.close()
        log.info("worker.stopped", **self.stats)
        logmod.write_out(LOG_WRITE_OUT)  # its last lines, if the sink is slow; bounded


def slot_table(message: msg.Routes) -> Routes | None:
    """The routes a ROUTES or RETIRE carries: slots of a table. None (logged) if they are
    not: a table of anything else would fail later, on every keyed client."""
    table = message.table
    if table and all(type(s) is int and s >= 0 for s in table) and len(set(table)) == len(table):
        return Routes(message.epoch, tuple(table))
    log.error("channel.error", kind=msg.Kind(message.kind).name,
              error=f"not a slot table: {table!r}")
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

