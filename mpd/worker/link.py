"""How a worker talks to its master. Under a master, a MasterLink over the worker's
channel: HELLO, heartbeats (STATS) and HANDOFF out; ADOPT, ROUTES, CONFIG, DRAIN and STOP
in. In single-process mode (`workers = 0`) there is no master: a StandaloneLink takes the
master's part of the signals (reload on SIGHUP) and the worker serves every key itself.
The worker loop is the same in both modes; only the link differs."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from typing import Any, Protocol, Union

from mpd import __version__
from mpd.config import schema as configmod
from mpd.config.reloading import reload_config
from mpd.logs import log as logmod
from mpd.system.signals import SignalQueue
from mpd.system.systemd import Notifier
from mpd.wire.channel import Channel, ChannelClosed, Kind, Message
from mpd.wire.latency import Histogram

log = logmod.get_logger()

HEARTBEAT = 1.0  # seconds between STATS messages (the master's liveness check)
FINAL_FLUSH = 1.0  # seconds a stopping worker may block to get its last STATS out
INF = float("inf")


class Worker(Protocol):
    """What a link may ask of the worker it serves."""
    config: configmod.Config

    def stop(self) -> None: ...

    def quit(self) -> None: ...

    def apply(self, settings: dict[str, Any]) -> None: ...


class MasterLink:
    heartbeat = HEARTBEAT

    def __init__(self, sock: socket.socket):
        self.channel = Channel(sock, "master")
        self.latency = Histogram()  # of the hand-offs adopted, sent with each heartbeat

    def fileno(self) -> int:
        return self.channel.fileno()

    def signals(self, worker: Worker) -> SignalQueue:
        # The master coordinates INT (Ctrl-C hits the whole process group), HUP, TTIN, TTOU,
        # USR1 (a log reopen comes as REOPEN_LOGS: `systemctl kill -s USR1` without
        # --kill-whom=main must not end a worker).
        return SignalQueue({signal.SIGTERM: worker.stop, signal.SIGQUIT: worker.quit},
                           ignore=[signal.SIGINT, signal.SIGHUP, signal.SIGTTIN,
                                   signal.SIGTTOU, signal.SIGUSR2, signal.SIGUSR1])

    @property
    def wants_write(self) -> bool:
        return self.channel.wants_write

    @property
    def lost(self) -> int:
        """Clients whose fd could not be received (fd.lost)."""
        return self.channel.lost

    @property
    def queued(self) -> int:
        """Messages waiting to be sent (each HANDOFF holds its client's fd until then)."""
        return len(self.channel.queue)

    def hello(self, slot: int | None) -> None:
        self.channel.send(Kind.HELLO, {"slot": slot, "pid": os.getpid(), "version": __version__})

    def report(self, counters: dict[str, int]) -> None:
        """The heartbeat: counters to the master. Raises ChannelClosed."""
        self.channel.send(Kind.STATS, self.stats(counters))

    def stats(self, counters: dict[str, int]) -> dict[str, object]:
        return {**counters, "log_dropped": logmod.dropped_total(), **self.latency.report()}

    def hand_off(self, meta: dict[str, Any], raw: bytes, fd: int) -> None:
        """HANDOFF the client's fd; the channel owns it from here. Raises ValueError or
        ChannelClosed, and the fd stays the caller's then."""
        self.channel.send(Kind.HANDOFF, meta, raw, [fd])

    def receive(self, writable: bool, limit: int) -> list[Message]:
        """Flush what is queued when writable, then take up to `limit` messages that
        arrived. Raises ChannelClosed when the master is gone."""
        if writable:
            self.channel.flush()
        return self.channel.receive(limit)

    def close(self, counters: dict[str, int]) -> None:
        """The last STATS, bounded: the master counts what this worker did to the end."""
        with contextlib.suppress(ChannelClosed, OSError):
            self.channel.send(Kind.STATS, self.stats(counters))
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

    def signals(self, worker: Worker) -> SignalQueue:
        return SignalQueue({signal.SIGTERM: worker.stop, signal.SIGINT: worker.stop,
                            signal.SIGQUIT: worker.quit,
                            signal.SIGHUP: lambda: self.reload(worker),
                            signal.SIGUSR1: logmod.reopen,
                            signal.SIGUSR2: self.refuse_upgrade})

    @staticmethod
    def refuse_upgrade() -> None:
        """SIGUSR2: an upgrade in place moves clients between workers; with none, it cannot."""
        log.error("upgrade.failed", error="single-process mode (workers = 0) cannot upgrade "
                  "in place: restart mpd to run the new code")

    def reload(self, worker: Worker) -> None:
        """SIGHUP: the same check as the master's reload; the worker takes what it can live."""
        self.notifier.reloading()
        new = reload_config(worker.config)
        if not isinstance(new, str):
            worker.apply(configmod.live_settings(new))
        self.notifier.ready("serving")

    def hello(self, _slot: int | None) -> None:
        """The loop serves, its signal handlers in place: only now may a signal come."""
        log.info("mpd.ready", workers=0)
        self.notifier.ready("serving")

    def report(self, _counters: dict[str, int]) -> None:
        pass

    def hand_off(self, _meta: dict[str, Any], _raw: bytes, _fd: int) -> None:
        raise ChannelClosed("single-process mode has no master to hand off to")

    def receive(self, _writable: bool, _limit: int) -> list[Message]:
        return []

    def close(self, _counters: dict[str, int]) -> None:
        self.notifier.stopping()
        self.notifier.close()


Link = Union[MasterLink, StandaloneLink]
