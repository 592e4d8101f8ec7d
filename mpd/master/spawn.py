"""Forking a worker: a channel pair, fork(), and in the child PR_SET_PDEATHSIG then the
worker loop. The child never returns into the master's code, whatever happens in it.

The worker loop is given (`WorkerMain`, mpd.worker.worker.run_worker by the command line),
so that the master's package does not import the worker's."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
from collections.abc import Callable, Sequence

from mpd.apps.interface import Application
from mpd.config.schema import Config
from mpd.logs import log as logmod
from mpd.system import proctitle
from mpd.system import testhooks as hooks
from mpd.wire.channel import Channel
from mpd.wire.exits import EXIT_BOOT_ERROR
from mpd.wire.routing import Routes

PR_SET_PDEATHSIG = 1
# A worker's life in the forked child: (config, app, listener, its channel end, slot,
# routes) -> its exit code.
WorkerMain = Callable[[Config, Application, socket.socket, socket.socket, int, Routes], int]

log = logmod.get_logger()


def fork_worker(slot: int, config: Config, app: Application, listener: socket.socket,
                routes: Routes, close_masters: Sequence[Callable[[], None]],
                worker_main: WorkerMain) -> tuple[int, Channel]:
    """Start a worker for `slot`: its pid and the master's end of its channel. In the
    child, each of `close_masters` first closes something that is the master's (its signal
    handlers, selector, the other workers' channels, each service's fds). Raises OSError
    (EAGAIN, ENOMEM, EMFILE) with nothing left open."""
    master_end, worker_end = Channel.pair()
    try:
        pid = os.fork()
    except OSError:
        master_end.close()
        worker_end.close()
        raise
    if pid == 0:
        code = EXIT_BOOT_ERROR
        try:
            master_end.close()
            code = become_worker(slot, config, app, listener, worker_end, routes,
                                 close_masters, worker_main)
        except BaseException as e:  # noqa: BLE001 - anything here must end the child
            log.exception("worker.crashed", error=repr(e))
        finally:
            os._exit(code)
    worker_end.close()
    return pid, Channel(master_end, f"slot {slot}")


def become_worker(slot: int, config: Config, app: Application, listener: socket.socket,
                  channel: socket.socket, routes: Routes,
                  close_masters: Sequence[Callable[[], None]], worker_main: WorkerMain) -> int:
    """In the forked child: die with the master, drop its state, run the worker loop."""
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the master died between fork and prctl
        return EXIT_BOOT_ERROR
    logmod.set_role("worker", slot)
    proctitle.worker(slot)
    for close in close_masters:
        close()
    hooks.hold()  # MPD_TEST_HOLD_FILE: a worker slow to start (tests only)
    return worker_main(config, app, listener, channel, slot, routes)
