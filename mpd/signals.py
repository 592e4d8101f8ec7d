"""Signals as events: handlers do nothing but let Python write the signal number to a
wake-up socket (signal.set_wakeup_fd); the event loop reads the numbers and reacts. No
logging or real work ever runs inside a handler."""

from __future__ import annotations

import signal
import socket
from collections.abc import Iterable


def _record(_signum: int, _frame: object) -> None:
    """The handler: the number already went to the wake-up fd."""


class SignalQueue:
    def __init__(self, signals: Iterable[signal.Signals], ignore: Iterable[signal.Signals] = ()):
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        self.signals = list(signals)
        signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        for sig in self.signals:
            signal.signal(sig, _record)
        for sig in ignore:
            signal.signal(sig, signal.SIG_IGN)

    def fileno(self) -> int:
        return self._reader.fileno()

    def drain(self) -> list[signal.Signals]:
        """The signals that arrived since the last call, in order."""
        received: list[signal.Signals] = []
        while True:
            try:
                data = self._reader.recv(256)
            except (BlockingIOError, InterruptedError):
                break
            if not data:
                break
            for number in data:
                received.append(signal.Signals(number))
        return received

    def close(self, disposition: signal.Handlers = signal.SIG_DFL) -> None:
        """Drop the wake-up fd and set the signals to `disposition`: SIG_DFL in a forked
        child; SIG_IGN in a process on its way out, which a late SIGTERM must not kill."""
        signal.set_wakeup_fd(-1)
        for sig in self.signals:
            signal.signal(sig, disposition)
        self._reader.close()
        self._writer.close()
