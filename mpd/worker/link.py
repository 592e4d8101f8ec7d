"""How a worker talks to its master. Under a master, a MasterLink over the worker's
channel: HELLO, heartbeats (STATS), HANDOFF, and a group's move out; the master's
messages in. In single-process mode (`workers = 0`) there is no master: a StandaloneLink
takes the master's part of the signals (reload on SIGHUP, reopen on SIGUSR1), and the
worker serves every key itself. The worker loop is the same in both modes; only the
link differs."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
from typing import Any, Protocol, Union

from mpd import __version__
from mpd.config import schema as configmod
from mpd.logs import log as logmod
from mpd.reloading import reload_config
from mpd.system.signals import SignalQueue
from mpd.system.systemd import Notifier
from mpd.wire.channel import Channel, ChannelClosed
from mpd.wire.latency import Histogram
from mpd.wire.messages import Hello, Message, Stats

log = logmod.get_logger()

HEARTBEAT = 1.0  # seconds between STATS messages (the master's liveness check)
FINAL_FLUSH = 1.0  # seconds a stopping worker may block to get its last STATS out
INF = float("inf")
IN, OUT = select.EPOLLIN, select.EPOLLOUT


class WorkerView(Protocol):
    """What a link may ask of the worker it serves."""
    config: configmod.Config

    def stop(self) -> None: ...

    def quit(self) -> None: ...

    def reconfigure(self, settings: dict[str, Any]) -> None: ...

    def reopen_logs(self) -> None: ...


class MasterLink:
    heartbeat = HEARTBEAT

    def __init__(self, sock: socket.socket):
        self.channel = Channel(sock, "master")
        self.latency = Histogram()  # of the hand-offs adopted, sent with each heartbeat
        self.epoll: Any = None
        self.writable_wanted = False  # the channel is in epoll for OUT too

    def fileno(self) -> int:
        return self.channel.fileno()

    def boot(self, epoll: Any) -> None:
        self.epoll = epoll
        epoll.register(self.fileno(), IN)

    def signals(self, worker: WorkerView) -> SignalQueue:
        # The master coordinates INT (Ctrl-C hits the whole process group), HUP, TTIN, TTOU,
        # USR1 (a log reopen comes as REOPEN_LOGS: `systemctl kill -s USR1` without
        # --kill-whom=main must not end a worker).
        return SignalQueue({signal.SIGTERM: worker.stop, signal.SIGQUIT: worker.quit},
                           ignore=[signal.SIGINT, signal.SIGHUP, signal.SIGTTIN,
                                   signal.SIGTTOU, signal.SIGUSR1, signal.SIGUSR2])

    @property
    def lost(self) -> int:
        """Clients whose fd could not be received (fd.lost)."""
        return self.channel.lost

    @property
    def queued(self) -> int:
        """Clients' fds waiting in the queue to be sent (HANDOFFs, moves' chunks)."""
        return self.channel.queued_fds

    @property
    def wants_write(self) -> bool:
        return self.channel.wants_write

    def hello(self, slot: int | None, state_version: int) -> None:
        self.channel.send(Hello(slot=slot, pid=os.getpid(), version=__version__,
                                state_version=state_version))

    def report(self, values: dict[str, Any]) -> None:
        """The heartbeat. Raises ChannelClosed."""
        self.channel.send(Stats(values=self.stats(values)))
        self.watch()

    def stats(self, values: dict[str, Any]) -> dict[str, Any]:
        return {**values, "log_dropped": logmod.dropped_total(), **self.latency.report()}

    def send(self, message: Message, fds: list[int] | tuple[int, ...] = ()) -> None:
        """Send (or queue) a message; the channel owns `fds` once this returns. Raises
        ValueError or ChannelClosed, and the fds stay the caller's then."""
        self.channel.send(message, fds)

    def watch(self) -> None:
        """Wait for the channel to be writable only while something is queued for it."""
        wanted = self.channel.wants_write
        if wanted != self.writable_wanted and self.epoll is not None:
            self.writable_wanted = wanted
            self.epoll.modify(self.fileno(), IN | OUT if wanted else IN)

    def receive(self, writable: bool, limit: int) -> list[Message]:
        """Flush what is queued when writable, then take up to `limit` messages that
        arrived. Raises ChannelClosed when the master is gone."""
        if writable:
            self.channel.flush()
        messages = self.channel.receive(limit)
        self.watch()
        return messages

    def close(self, values: dict[str, Any]) -> None:
        """The last STATS, bounded: the master counts what this worker did to the end."""
        with contextlib.suppress(ChannelClosed, OSError, ValueError):
            self.channel.send(Stats(values=self.stats(values)))
            self.channel.sock.setblocking(True)
            self.channel.sock.settimeout(FINAL_FLUSH)
            self.channel.flush()
        self.channel.close()


class StandaloneLink:
    heartbeat = INF  # nobody listens for one
    wants_write = False
    queued = lost = 0

    def __init__(self) -> None:
        self.notifier = Notifier()
        self.latency = Histogram()  # kept for the worker's sake: no hand-off comes here

    def fileno(self) -> int:
        return -1

    def boot(self, _epoll: Any) -> None:
        pass

    def signals(self, worker: WorkerView) -> SignalQueue:
        return SignalQueue({signal.SIGTERM: worker.stop, signal.SIGINT: worker.stop,
                            signal.SIGQUIT: worker.quit,
                            signal.SIGHUP: lambda: self.reload(worker),
                            signal.SIGUSR1: worker.reopen_logs,
                            signal.SIGUSR2: self.refuse_upgrade})

    @staticmethod
    def refuse_upgrade() -> None:
        """SIGUSR2: an upgrade in place moves clients between workers; with none, it cannot."""
        log.error("upgrade.failed", error="single-process mode (workers = 0) cannot upgrade "
                  "in place: restart mpd to run the new code")

    def reload(self, worker: WorkerView) -> None:
        """SIGHUP: the same check as the master's reload; the worker takes what it can live."""
        self.notifier.reloading()
        new = reload_config(worker.config)
        if not isinstance(new, str):
            worker.reconfigure(configmod.live_settings(new))
        self.notifier.ready("serving")

    def hello(self, _slot: int | None, _state_version: int) -> None:
        """The loop serves, its signal handlers in place: only now may a signal come."""
        log.info("mpd.ready", workers=0)
        self.notifier.ready("serving")

    def report(self, _values: dict[str, Any]) -> None:
        pass

    def send(self, _message: Message, _fds: list[int] | tuple[int, ...] = ()) -> None:
        raise ChannelClosed("single-process mode has no master to send to")

    def watch(self) -> None:
        pass

    def receive(self, _writable: bool, _limit: int) -> list[Message]:
        return []

    def close(self, _values: dict[str, Any]) -> None:
        self.notifier.stopping()
        self.notifier.close()


Link = Union[MasterLink, StandaloneLink]
