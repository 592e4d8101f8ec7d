"""Signals as events: handlers do nothing but let Python write the signal number to a
wake-up socket (signal.set_wakeup_fd); the event loop reads the numbers and runs the
reaction that the process's one table gives. No logging or real work ever runs inside a
signal handler (gunicorn's "reentrant call" deadlocks came from that)."""

from __future__ import annotations

import signal
import socket
from collections.abc import Iterable
from typing import Any, Callable

from mpd.logs import log as logmod

log = logmod.get_logger()

Table = dict[signal.Signals, Callable[[], Any]]


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # a real-time signal has no name in the enum
        return f"SIG{number}"


def _record(_signum: int, _frame: object) -> None:
    """The handler: the number already went to the wake-up fd."""


class SignalQueue:
    """The process's signal table: each signal with its reaction, run from the loop."""

    def __init__(self, handlers: Table, ignore: Iterable[signal.Signals] = ()):
        self.handlers = handlers
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        for sig in handlers:
            signal.signal(sig, _record)
        for sig in ignore:
            signal.signal(sig, signal.SIG_IGN)

    def fileno(self) -> int:
        return self._reader.fileno()

    def read_out(self) -> list[signal.Signals]:
        """The signals that arrived since the last call, in order."""
        received: list[signal.Signals] = []
        while True:
            try:
                data = self._reader.recv(256)
            except (BlockingIOError, InterruptedError):
                break
            if not data:
                break
            received += [signal.Signals(number) for number in data]
        return received

    def dispatch(self) -> None:
        """Run the reaction to every signal that arrived, in order; each inside a boundary:
        a bug in one reaction is logged, and the next signal is handled."""
        for sig in self.read_out():
            try:
                self.handlers[sig]()
            except Exception as e:  # noqa: BLE001 - a signal must not end the process
                log.exception("loop.error", where=f"signal {sig.name}", error=repr(e))

    def close(self, disposition: signal.Handlers = signal.SIG_DFL) -> None:
        """Drop the wake-up fd and set the signals to `disposition`: SIG_DFL in a forked
        child; SIG_IGN in a process on its way out, which a late SIGTERM must not kill."""
        signal.set_wakeup_fd(-1)
        for sig in self.handlers:
            signal.signal(sig, disposition)
        self._reader.close()
        self._writer.close()
