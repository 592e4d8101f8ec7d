"""The master's end of its workers' channels: watching each one in the selector, reading
it (a dead worker's last words too), reacting to each message by one table the master
gives (HELLO, STATS; HANDOFF goes to the broker), and sending to one worker or to all that
serve. It knows no message's meaning: that is the master's and the broker's."""

from __future__ import annotations

import contextlib
import functools
import selectors
import time
from typing import Any, Callable

from mpd.logs import log as logmod
from mpd.master.slots import Slots, WorkerProc
from mpd.wire.channel import ChannelClosed, close_fds
from mpd.wire.messages import Kind, Message

PAUSE_CHECK = 0.05  # seconds between two looks for free fds while channels are not read

log = logmod.get_logger()

Reaction = Callable[[WorkerProc, Any], None]


class Channels:
    def __init__(self, selector: selectors.BaseSelector, slots: Slots,
                 reactions: dict[int, Reaction], room: Callable[[], int] = lambda: 64):
        self.selector = selector
        self.slots = slots
        self.reactions = reactions  # what the master does with each kind of message
        self.room = room  # how many messages to read now: as far as free fds allow
        self.paused = False  # out of fds for clients: no channel is read until some free

    def watch(self, worker: WorkerProc) -> None:
        """Read `worker`'s channel from now on (and write it when messages are queued)."""
        self.rewatch(worker)

    def events(self, worker: WorkerProc) -> int:
        """Read unless paused; write while messages wait."""
        return (0 if self.paused else selectors.EVENT_READ) | (
            selectors.EVENT_WRITE if worker.channel.wants_write else 0)

    def forget(self, worker: WorkerProc) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(worker.channel)

    def on_event(self, worker: WorkerProc, events: int) -> None:
        try:
            if events & selectors.EVENT_WRITE and worker.channel.flush():
                self.rewatch(worker)
            if events & selectors.EVENT_READ:  # as far as free fds allow (fdbudget.py)
                room = self.room()
                if room <= 0:
                    self.pause()
                    return
                for message in worker.channel.receive(room):
                    self.on_message(worker, message)
        except ChannelClosed:
            # The worker is dying; SIGCHLD will tell how. Stop listening to it.
            self.forget(worker)

    def rewatch(self, worker: WorkerProc) -> None:
        """Register the channel for the events it needs now (none: out of the selector)."""
        events = self.events(worker)
        # A partial, not a closure: a closure that re-registers itself refers to itself, and
        # that cycle kept every dead worker's channel alive until a full garbage collection
        # (the master grew 25 -> 52 MB over 1,500 respawns).
        react = functools.partial(self.on_event, worker)
        try:
            self.selector.get_key(worker.channel)
        except (KeyError, ValueError):
            if events and worker.channel.fileno() >= 0:
                self.selector.register(worker.channel, events, react)
            return
        if events:
            self.selector.modify(worker.channel, events, react)
        else:
            self.selector.unregister(worker.channel)

    def pause(self) -> None:
        """The master holds as many clients' fds as it may: the workers' HANDOFFs wait in
        their channels (in the kernel, and then in the workers' own queues) until some are
        delivered and fds free again, rather than be received with no fd for them."""
        self.paused = True
        for worker in list(self.slots.workers.values()):
            self.rewatch(worker)

    def deadline(self) -> float | None:
        return time.monotonic() + PAUSE_CHECK if self.paused else None

    def tick(self, _now: float) -> None:
        """Read again once fds are free (held clients delivered, queues flushed)."""
        if self.paused and self.room() > 0:
            self.paused = False
            for worker in list(self.slots.workers.values()):
                self.rewatch(worker)

    def close(self) -> None:
        pass

    def read_last_words(self, worker: WorkerProc) -> None:
        """Take what a dead worker sent before it died: a retiring worker's last HANDOFFs
        carry live clients, which closing the channel unread would drop."""
        while True:
            try:
                messages = worker.channel.receive(max(1, self.room()))
            except ChannelClosed:
                return
            if not messages:
                return
            for message in messages:
                self.on_message(worker, message)

    def send(self, worker: WorkerProc, message: Message, fds: list[int] | None = None) -> bool:
        """Send or queue; False if the worker's channel is gone (fds stay the caller's)."""
        try:
            worker.channel.send(message, fds or ())
        except (ChannelClosed, ValueError) as e:
            # A retiring worker may end before our last words reach it: that is its
            # expected end, not an error (every scale-down logged a Broken pipe).
            log.log(10 if worker.state == "stopping" else 30, "channel.error",
                    worker_pid=worker.pid, worker_slot=worker.slot, error=str(e))
            return False
        if worker.channel.wants_write:
            self.rewatch(worker)
        return True

    def broadcast(self, message: Message) -> None:
        """To every worker that is not retiring (they got what they need with RETIRE): the
        serving ones, and an upgrade's new worker that is not ready yet, which will serve
        (sent to the serving ones only, a reload during a roll left it on the old config)."""
        for worker in list(self.slots.workers.values()):
            if worker.state != "stopping":
                self.send(worker, message)

    def on_message(self, worker: WorkerProc, message: Message) -> None:
        """React to one message, inside a boundary: a bug in handling it is logged with the
        worker and the kind, its fds are closed (those its handler did not take: a handler
        that takes an fd removes it from message.fds), and the next message is handled."""
        worker.last_seen = time.monotonic()
        react = self.reactions.get(message.kind)
        if react is None:
            close_fds(message.fds)
            log.warning("channel.error", worker_pid=worker.pid, worker_slot=worker.slot,
                        error=f"unexpected {Kind(message.kind).name} from a worker")
            return
        try:
            react(worker, message)
        except Exception as e:  # noqa: BLE001 - one message must not end the master
            log.exception("channel.error", worker_pid=worker.pid, worker_slot=worker.slot,
                          kind=Kind(message.kind).name, fds=len(message.fds), error=repr(e))
            close_fds(message.fds)

    def in_child(self) -> None:
        """In a forked worker: its siblings' channels are the master's (else a sibling
        never sees EOF when the master dies)."""
        for worker in self.slots.workers.values():
            worker.channel.close()
