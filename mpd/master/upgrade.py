"""Upgrade in place, the running master's part: check the code now on disk (pre-flight),
write the master's state to a memfd, and execv() the new code in this same process with
every socket, channel and held client inherited. Same PID, so systemd and pidfiles see no
restart. The new master's part is Upgrades.adopt() below (take the state back) and roll.py
(replace the workers slot by slot).

Why in place rather than a second master (gunicorn's USR2): systemd knows one main PID,
and a second master would need MAINPID juggling and a hand-over of the listening socket
and of every live client between two processes; exec keeps every fd where it is."""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from typing import Any, Protocol

from mpd import __version__
from mpd.apps import loader
from mpd.apps.interface import Application
from mpd.logs import log as logmod
from mpd.master import roll, upgradestate
from mpd.master.channels import Channels
from mpd.master.slots import WorkerProc
from mpd.master.upgradestate import STATE_VERSION, STATE_VERSIONS
from mpd.system.signals import SignalQueue
from mpd.system.systemd import Notifier
from mpd.wire.channel import VERSIONS as CHANNEL_VERSIONS

PREFLIGHT_TIMEOUT = 30.0  # seconds the new code may take to import and check the config
MAX_PREFLIGHT_OUTPUT = 64 * 1024  # bytes of its output kept for the error message

log = logmod.get_logger()


def preflight_report(app: Application) -> dict[str, Any]:
    """What `mpd --preflight` prints: this code's version, what it can adopt (a master's
    state and workers that speak any of its channel versions) and its application (the
    state versions it reads: a group moves from an old worker to a new one in the roll)."""
    return {"version": __version__, "state_versions": list(STATE_VERSIONS),
            "channel_versions": list(CHANNEL_VERSIONS), "app": loader.describe(app)}


class Preflight:
    """`python -m mpd.cli --preflight` of the code on disk, run beside the master without
    blocking it: its output is read from the master's selector, its exit is reaped with
    the workers'."""

    def __init__(self, config_path: str | None):
        argv = [sys.executable, "-m", "mpd.cli", "--preflight"]
        if config_path:
            argv += ["--config", config_path]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.output = bytearray()
        self.deadline = time.monotonic() + PREFLIGHT_TIMEOUT
        self.status: int | None = None  # the exit status, once reaped

    @property
    def pid(self) -> int:
        return self.proc.pid

    def fileno(self) -> int:
        assert self.proc.stdout is not None
        return self.proc.stdout.fileno()

    def read(self) -> bool:
        """Take what it printed; False at EOF."""
        assert self.proc.stdout is not None
        try:
            data = os.read(self.fileno(), 65536)
        except BlockingIOError:
            return True
        if len(self.output) < MAX_PREFLIGHT_OUTPUT:
            self.output += data[:MAX_PREFLIGHT_OUTPUT - len(self.output)]
        return bool(data)

    def reaped(self, status: int) -> None:
        self.status = status
        self.proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by the master

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    def close(self) -> None:
        assert self.proc.stdout is not None
        self.proc.stdout.close()

    def verdict(self, channel_versions: Iterable[int], app: Application
                ) -> dict[str, Any] | str:
        """Its report, or why the new code cannot take over workers that speak
        `channel_versions` and serve `app`'s groups."""
        text = self.output.decode("utf-8", "replace").strip()
        code = os.waitstatus_to_exitcode(self.status) if self.status is not None else None
        if code != 0:
            last = text.splitlines()[-1] if text else f"exit code {code}"
            return f"the new code failed its pre-flight check: {last}"
        try:
            report = json.loads(text.splitlines()[-1])
        except (ValueError, IndexError):
            return f"the new code's pre-flight check said nothing readable: {text[-200:]!r}"
        if STATE_VERSION not in report.get("state_versions", []):
            return (f"the new code (mpd {report.get('version')}) cannot read this master's "
                    f"state (version {STATE_VERSION}); restart mpd instead")
        unknown = sorted(set(channel_versions) - set(report.get("channel_versions", [])))
        if unknown:
            return (f"the new code (mpd {report.get('version')}) cannot speak to these "
                    f"workers (channel version {unknown[0]}); restart mpd instead")
        new = report.get("app") or {}
        if app.group is not None and app.state_version not in new.get("reads_state", []):
            return (f"the new code's application {new.get('name')!r} reads state versions "
                    f"{new.get('reads_state')}, and the running groups' is "
                    f"{app.state_version}: their state could not move to the new workers; "
                    "restart mpd instead, or ship an application that reads it")
        return report


def write_state(state: dict[str, Any]) -> int:
    """The state in a memfd the new image inherits (not close-on-exec); its fd."""
    fd = os.memfd_create("mpd-upgrade-state", 0)
    data = json.dumps(state, separators=(",", ":")).encode()
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def read_state(fd: int) -> dict[str, Any]:
    with os.fdopen(fd, "rb") as f:
        state = json.loads(f.read())
    if state.get("state_version") not in STATE_VERSIONS:
        raise ValueError(f"upgrade state version {state.get('state_version')!r}, this mpd "
                         f"reads {list(STATE_VERSIONS)}")
    return state


def exec_master(config_path: str | None, signals: Iterable[signal.Signals],
                state: dict[str, Any], fds: list[int]) -> str:
    """Replace this process's code with the code on disk. Returns only on failure: why.
    Signals are blocked across the exec (a default disposition would let a SIGTERM in the
    gap kill the master); the new master unblocks them once its handlers are in place."""
    state_fd = write_state(state)
    inherited = [*fds, state_fd]
    argv = [sys.executable, "-m", "mpd.cli", "--upgrade-state", str(state_fd)]
    if config_path:
        argv += ["--config", config_path]
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        for fd in inherited:
            os.set_inheritable(fd, True)
        log.info("upgrade.exec", generation=state["generation"] + 1, inherited=len(inherited))
        logmod.write_out(1.0)  # queued lines would die with this image; bounded
        os.execv(sys.executable, argv)
    except OSError as e:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)
        os.close(state_fd)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        return f"exec of {sys.executable} failed: {e.strerror}"
    raise AssertionError("not reached")  # pragma: no cover


class UpgradeView(upgradestate.StateView, roll.RollView, Protocol):
    """What an upgrade needs of the master."""
    selector: selectors.BaseSelector
    notifier: Notifier
    signals: SignalQueue
    channels: Channels
    app: Application

    def signal_table(self) -> dict[signal.Signals, Any]: ...

    def reap_workers(self) -> None: ...

    def status_line(self) -> str: ...


class Upgrade:
    """One upgrade as the old master runs it: pre-flight, then exec (which does not
    return). Any failure on the way changes nothing; the master is told why."""

    def __init__(self, master: UpgradeView, upgrades: Upgrades):
        self.master = master
        self.upgrades = upgrades
        self.preflight = Preflight(master.config.path)
        self.eof = False
        self.report: dict[str, Any] | None = None  # the pre-flight's, once it passed
        master.selector.register(self.preflight.fileno(), selectors.EVENT_READ, self.on_output)
        log.info("upgrade.started", generation=master.generation + 1,
                 preflight_pid=self.preflight.pid)

    def on_output(self, _events: int) -> None:
        if not self.preflight.read():
            self.master.selector.unregister(self.preflight.fileno())
            self.eof = True
            self.decide()

    def reaped(self, pid: int, status: int) -> bool:
        """The master reaped `pid`: True if it was the pre-flight check."""
        if pid != self.preflight.pid:
            return False
        self.preflight.reaped(status)
        self.decide()
        return True

    def deadline(self) -> float | None:
        return self.preflight.deadline if self.report is None else None

    def tick(self, now: float) -> None:
        if self.report is not None:
            self.execute()  # once the moves under way have ended
        elif now >= self.preflight.deadline and self.preflight.status is None:
            self.preflight.kill()  # reaped like any child; then decide() fails it

    def cancel(self) -> None:
        """mpd is stopping: the check's verdict no longer matters."""
        self.preflight.kill()
        if not self.eof:
            self.master.selector.unregister(self.preflight.fileno())
            self.eof = True
        self.preflight.close()
        self.master.moves.paused = False

    def decide(self) -> None:
        if not self.eof or self.preflight.status is None or self.upgrades.job is not self \
                or self.report is not None:
            return
        self.preflight.close()
        verdict = self.preflight.verdict(
            {w.channel.version for w in self.master.slots.workers.values()}, self.master.app)
        if time.monotonic() >= self.preflight.deadline:
            verdict = f"the new code's pre-flight check took over {PREFLIGHT_TIMEOUT:g} s"
        if isinstance(verdict, str):
            self.upgrades.ended(verdict)
            return
        self.report = verdict
        self.execute()

    def execute(self) -> None:
        """The exec, once no group is on its way between workers: the new master would
        know nothing of a move under way, and its group would stay frozen. No move starts
        meanwhile; those under way end within MOVE_TIMEOUT."""
        moves = self.master.moves
        if self.master.state != "running":
            moves.paused = False
            self.upgrades.ended(f"mpd is {self.master.state}")
            return
        if moves.under_way:
            if not moves.paused:
                log.info("upgrade.waiting", generation=self.master.generation + 1,
                         moves=len(moves.under_way))
            moves.paused = True
            return  # tick() comes back
        moves.paused = True
        self.master.notifier.reloading()
        state, fds = upgradestate.capture(self.master)
        error = exec_master(self.master.config.path, self.master.signal_table(), state, fds)
        self.master.notifier.ready(self.master.status_line())
        moves.paused = False
        moves.plan()
        self.upgrades.ended(error)

    def on_ready(self, _worker: WorkerProc) -> None:
        pass

    def on_exit(self, _worker: WorkerProc) -> bool:
        return False


class Upgrades:
    """The master's upgrades in place: at most one at a time, either its pre-flight and
    exec (Upgrade, in the old code) or its roll over the slots (Roll, in the new code)."""

    def __init__(self, master: UpgradeView):
        self.master = master
        self.job: Upgrade | roll.Roll | None = None
        self.status: dict[str, Any] = {"state": "none"}  # for `status`
        self.queued_count: int | None = None  # a scale asked for during the roll

    @property
    def rolling(self) -> bool:
        return isinstance(self.job, roll.Roll)

    def queue_scale(self, count: int) -> None:
        """A scale (mpdctl, a signal, a reload, autoscale) during the roll: the roll goes
        slot by slot over the table, so the table changes once it is over (done or not)."""
        if count != self.master.target:
            log.info("worker.scale_queued", previous=self.master.target, workers=count)
        self.queued_count = count

    def start(self) -> str | None:
        """`mpdctl upgrade`, SIGUSR2: why not, or None once the pre-flight runs."""
        if self.master.state != "running":
            return f"mpd is {self.master.state}"
        if self.job is not None:
            return (f"an upgrade is already running ({self.status['state']}, generation "
                    f"{self.status.get('generation')}); `mpdctl status` shows when it is done")
        self.status = {"state": "preflight", "generation": self.master.generation + 1}
        try:
            self.job = Upgrade(self.master, self)
        except OSError as e:
            self.ended(f"cannot run the pre-flight check: {e.strerror}")
        return None

    def adopt(self, state: dict[str, Any]) -> None:
        """After the exec, in the new code: take over the old master's workers, then roll."""
        master = self.master
        upgradestate.restore(master, state)
        for worker in master.slots.workers.values():
            master.channels.watch(worker)
        # Blocked across the exec (exec_master); the handlers are in place now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, master.signals.handlers)
        master.reap_workers()  # those that ended meanwhile
        master.state = "running"
        self.status = {"state": "rolling", "generation": master.generation}
        log.info("upgrade.adopted", generation=master.generation, version=__version__,
                 from_version=state["from_version"], workers=len(master.slots.workers),
                 held=len(master.broker.held))
        master.notifier.ready(master.status_line())
        self.job = roll.Roll(master, self.ended)
        self.job.step()

    def ended(self, error: str | None, stopping: bool = False) -> None:
        self.job = None
        self.status = {**self.status, "state": "done" if error is None else "failed",
                       "error": error}
        if error is not None:
            log.error("upgrade.failed", generation=self.status.get("generation"), error=error)
        count, self.queued_count = self.queued_count, None
        if count is not None and not stopping:
            self.master.scale(count)  # what waited for the roll (queue_scale)

    def cancel(self) -> None:
        """mpd is stopping."""
        if isinstance(self.job, Upgrade):
            self.job.cancel()
        if self.job is not None:
            self.ended("mpd is stopping", stopping=True)

    def on_ready(self, worker: WorkerProc) -> None:
        if self.job is not None:
            self.job.on_ready(worker)

    def on_exit(self, worker: WorkerProc) -> bool:
        """True when the worker was the roll's new one that never got ready."""
        return self.job is not None and self.job.on_exit(worker)

    def reaped(self, pid: int, status: int) -> None:
        """A child that is not a worker: the pre-flight check."""
        if isinstance(self.job, Upgrade):
            self.job.reaped(pid, status)

    def tick(self, now: float) -> None:
        if self.job is not None:
            self.job.tick(now)

    def deadline(self) -> float | None:
        return self.job.deadline() if self.job is not None else None

    def close(self) -> None:
        self.cancel()

    def in_child(self) -> None:
        """The pre-flight's output is the master's to read."""
        if isinstance(self.job, Upgrade):
            self.job.preflight.close()
