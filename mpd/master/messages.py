"""The master's end of its workers' channels: reading each one (a dead worker's last
words too), reacting to each message by one table (HELLO, STATS; HANDOFF goes to the
broker), and sending to one worker or to all that serve.

Messages is a part of the Master class (master.py), kept in a file of its own as the
worker's handoff.py is; it works on the master's selector, slots and state."""

from __future__ import annotations

import contextlib
import functools
import selectors
import time
from typing import Any, Callable

from mpd.config.schema import Config, fd_soft_limit
from mpd.logs import log as logmod
from mpd.master.broker import Broker
from mpd.master.slots import Slots, WorkerProc
from mpd.master.tally import Tally
from mpd.master.upgrade import Upgrades
from mpd.system import testhooks as hooks
from mpd.system.systemd import Notifier
from mpd.wire.channel import ChannelClosed, Kind, Message, close_fds

log = logmod.get_logger()


class Messages:
    # The master's state it works on (master.py sets it up).
    config: Config
    selector: selectors.BaseSelector
    slots: Slots
    state: str
    target: int
    max_clients: int
    notifier: Notifier
    on_message_kind: dict[Kind, Callable[[WorkerProc, Message], None]]
    status_line: Callable[[], str]
    scale: Callable[[int], str | None]
    upgrades: Upgrades
    tally: Tally
    broker: Broker

    def on_channel_event(self, worker: WorkerProc, events: int) -> None:
        try:
            if events & selectors.EVENT_WRITE and worker.channel.flush():
                self.watch_channel(worker, selectors.EVENT_READ)
            if events & selectors.EVENT_READ:  # as far as free fds allow (fdbudget.py)
                for message in worker.channel.receive(self.broker.receive_room()):
                    self.on_message(worker, message)
        except ChannelClosed:
            # The worker is dying; SIGCHLD will tell how. Stop listening to it.
            self.forget_channel(worker)

    def watch_channel(self, worker: WorkerProc, events: int) -> None:
        with contextlib.suppress(KeyError, ValueError):  # not registered: it is gone
            self.selector.modify(worker.channel, events,
                                 functools.partial(self.on_channel_event, worker))

    def read_last_words(self, worker: WorkerProc) -> None:
        """Take what a dead worker sent before it died: a retiring worker's last HANDOFFs
        carry live clients, which closing the channel unread would drop."""
        while True:
            try:
                messages = worker.channel.receive(self.broker.receive_room())
            except ChannelClosed:
                return
            if not messages:
                return
            for message in messages:
                self.on_message(worker, message)

    def forget_channel(self, worker: WorkerProc) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(worker.channel)

    def send(self, worker: WorkerProc, kind: Kind, meta: dict[str, Any] | None = None,
             raw: bytes = b"", fds: list[int] | None = None) -> bool:
        """Send or queue; False if the worker's channel is gone (fds stay the caller's)."""
        try:
            worker.channel.send(kind, meta, raw, fds or ())
        except (ChannelClosed, ValueError) as e:
            # A retiring worker may end before our last words reach it: that is its
            # expected end, not an error (every scale-down logged a Broken pipe).
            log.log(10 if worker.state == "stopping" else 30, "channel.error",
                    worker_pid=worker.pid, worker_slot=worker.slot, error=str(e))
            return False
        if worker.channel.wants_write:
            self.watch_channel(worker, selectors.EVENT_READ | selectors.EVENT_WRITE)
        return True

    def broadcast(self, kind: Kind, meta: dict[str, Any]) -> None:
        """To every worker that is not retiring (they got what they need with DRAIN): the
        serving ones, and an upgrade's new worker that is not ready yet, which will serve
        (sent to the serving ones only, a reload during a roll left it on the old config)."""
        for worker in list(self.slots.workers.values()):
            if worker.state != "stopping":
                self.send(worker, kind, meta)

    # --- channel messages: one table (on_message_kind) -----------------------------------

    def on_message(self, worker: WorkerProc, message: Message) -> None:
        """React to one message, inside a boundary: a bug in handling it is logged with the
        worker and the kind, its fds are closed (those its handler did not take: a handler
        that takes an fd removes it from message.fds), and the next message is handled."""
        worker.last_seen = time.monotonic()
        react = self.on_message_kind.get(message.kind)
        if react is None:
            close_fds(message.fds)
            log.warning("channel.error", worker_pid=worker.pid, worker_slot=worker.slot,
                        error=f"unexpected {message.kind.name} from a worker")
            return
        try:
            react(worker, message)
        except Exception as e:  # noqa: BLE001 - one message must not end the master
            log.exception("channel.error", worker_pid=worker.pid, worker_slot=worker.slot,
                          kind=message.kind.name, fds=len(message.fds), error=repr(e))
            close_fds(message.fds)

    def on_stats(self, worker: WorkerProc, message: Message) -> None:
        """The heartbeat: counters, and the number of the config the worker runs."""
        hooks.fault("master.stats")
        worker.config_generation = message.meta.pop("config_generation",
                                                    worker.config_generation)
        self.tally.heard(worker, message.meta.pop("latency", None))
        worker.stats = {k: v for k, v in message.meta.items() if isinstance(v, int)}
        if self.config.autoscale:
            self.autoscale()

    def on_hello(self, worker: WorkerProc, message: Message) -> None:
        worker.version = str(message.meta.get("version", ""))
        if worker.state == "starting":
            worker.state = "ready"
        self.upgrades.on_ready(worker)
        log.info("worker.ready", worker_pid=worker.pid, worker_slot=worker.slot,
                 boot_ms=round((worker.last_seen - worker.started) * 1000, 1))
        if self.state == "starting" and self.slots.ready_count() >= self.target:
            self.state = "running"
            log.info("mpd.ready", workers=self.slots.ready_count())
            self.notifier.ready(self.status_line())

    def set_max_clients(self) -> None:
        """What one worker serves at most: max_clients, "auto" resolved by the fd limit
        (which workers inherit); say so when the fd limit cuts a configured number."""
        self.max_clients = self.config.clients_per_worker()
        if self.config.max_clients not in ("auto", self.max_clients):
            log.warning("mpd.max_clients_capped", configured=self.config.max_clients,
                        max_clients=self.max_clients, fd_limit=fd_soft_limit())

    def autoscale(self) -> None:
        """Add a worker when every worker is full, one at a time (the last must be ready)."""
        serving = list(self.slots.serving.values())
        if (self.state != "running" or self.target >= self.config.max_workers
                or len(serving) < self.target or any(w.state != "ready" for w in serving)):
            return
        if all(w.clients >= w.stats.get("max_clients", self.max_clients) for w in serving):
            log.info("worker.autoscaled", previous=self.target, workers=self.target + 1,
                     max_clients=self.max_clients)
            self.scale(self.target + 1)
