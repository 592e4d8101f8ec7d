"""The master: forks workers into numbered slots and keeps them serving.

One single-threaded event loop over the signal wake-up fd and every worker's channel.
It never blocks and never parses the client protocol. The loop is three steps, as in
gunicorn's arbiter: wait for events and react, kill the hung, top up the slots."""

from __future__ import annotations

import contextlib
import ctypes
import os
import selectors
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from mpd import __version__, commands, routing
from mpd import config as configmod
from mpd import log as logmod
from mpd.channel import Channel, ChannelClosed, Kind, Message, close_fds
from mpd.config import LIVE_SETTINGS, Config
from mpd.control import ControlServer
from mpd.signals import SignalQueue
from mpd.systemd import Notifier
from mpd.worker import EXIT_BOOT_ERROR, Worker

PR_SET_PDEATHSIG = 1
STABLE_AFTER = 5.0  # seconds a worker must live before its slot's crash count resets
BACKOFF_FIRST = 0.1  # seconds before the second quick respawn; doubles after each
KILL_WAIT = 5.0  # seconds to reap SIGKILLed workers before exiting regardless
SPAWN_BATCH = 8  # forks per loop turn (each costs a few ms of the master's time)
HOLD_TIMEOUT = 1.0  # seconds a hand-off waits for its owner's respawn before a fallback
HOLD_MAX = 30.0  # seconds a hand-off may wait when no worker at all can take it
STATUS_EVERY = 1.0  # seconds between systemd STATUS= updates, at most

log = logmod.get_logger()


@dataclass
class WorkerProc:
    """The master's view of one worker process."""
    slot: int
    pid: int
    channel: Channel
    started: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    state: str = "starting"  # starting -> ready -> stopping
    stats: dict[str, int] = field(default_factory=dict)


@dataclass
class HeldClient:
    """A handed-off client whose owner slot has no worker right now."""
    meta: dict[str, Any]
    raw: bytes
    fd: int
    since: float = field(default_factory=time.monotonic)


@dataclass
class SlotHistory:
    """What survives a worker's death: how often this slot crashed, when to retry."""
    restarts: int = 0
    quick_failures: int = 0
    respawn_at: float = 0.0


class Master:
    def __init__(self, config: Config, listener: socket.socket,
                 control_sock: socket.socket | None = None):
        self.config = config
        self.listener = listener
        self.control_sock = control_sock
        self.control: ControlServer | None = None
        self.selector = selectors.DefaultSelector()
        self.signals = SignalQueue([signal.SIGTERM, signal.SIGINT, signal.SIGQUIT,
                                    signal.SIGHUP, signal.SIGCHLD, signal.SIGTTIN,
                                    signal.SIGTTOU])
        self.workers: dict[int, WorkerProc] = {}  # by pid
        self.serving: dict[int, WorkerProc] = {}  # by slot: workers that take clients
        self.held: list[HeldClient] = []  # hand-offs waiting for a worker
        self.history: dict[int, SlotHistory] = {}  # by slot
        self.target = config.worker_count
        self.slots = tuple(range(self.target))  # the slot table; changes only in scale()
        self.state = "starting"  # starting -> running -> stopping
        self.stop_deadline = 0.0
        self.kill_deadline = 0.0
        self.started = time.monotonic()
        self.port: int = listener.getsockname()[1]
        self.notifier = Notifier()
        self.next_watchdog = 0.0
        self.next_status = 0.0
        self.spawn_pending = False  # more slots to fill than one turn spawned

    # --- the loop -------------------------------------------------------------------------

    def run(self) -> int:
        self.selector.register(self.signals, selectors.EVENT_READ, self.on_signals)
        if self.control_sock is not None:
            self.control = ControlServer(
                self.control_sock, self.config.socket_path, self.selector,
                lambda request: commands.handle(self, request),
                lambda uid, gid: commands.allowed(self, uid, gid))
        log.info("mpd.started", version=__version__, config=self.config.path,
                 listen=self.config.listen, port=self.port, workers=self.target,
                 control=self.config.socket_path if self.control else None)
        self.manage_workers()
        while self.state != "stopped":
            logmod.watch(self.selector)  # LOG-HOOK: wait writable on a slow log sink
            for key, events in self.selector.select(self.timeout()):
                key.data(events)
            self.murder_workers()
            self.manage_workers()
            if self.held:
                self.deliver_held()
            if self.control is not None:
                self.control.expire()
            self.tell_systemd()
        self.drop_held("stopping")
        if self.control is not None:
            self.control.close()
        self.selector.close()
        self.signals.close(signal.SIG_IGN)  # stopped: a late SIGTERM must not turn exit 0 to -15
        self.notifier.close()
        log.info("mpd.stopped", uptime=round(time.monotonic() - self.started, 3))
        return 0

    def timeout(self) -> float:
        """Seconds until the next timed duty: a respawn, a heartbeat check, a deadline."""
        now = time.monotonic()
        if self.spawn_pending:
            return 0.0
        due = [now + 1.0]
        due += [h.respawn_at for h in self.history.values() if h.respawn_at]
        due += [d for d in (self.stop_deadline, self.kill_deadline) if d]
        due += [h.since + HOLD_TIMEOUT for h in self.held[:1]]
        if self.notifier.watchdog_interval:
            due.append(self.next_watchdog)
        return max(0.0, min(due) - now)

    def tell_systemd(self) -> None:
        """WATCHDOG=1 from the loop itself (a stuck loop stops it), STATUS= when it changes."""
        now = time.monotonic()
        if self.notifier.watchdog_interval and now >= self.next_watchdog:
            self.next_watchdog = now + self.notifier.watchdog_interval
            self.notifier.watchdog()
        if now >= self.next_status and self.state == "running":
            self.next_status = now + STATUS_EVERY
            self.notifier.status(self.status_line())

    def status_line(self) -> str:
        clients = sum(w.stats.get("clients", 0) for w in self.workers.values())
        return f"{self.ready_count()}/{self.target} workers ready, {clients} clients"

    # --- signals: one table, one handler each ----------------------------------------------

    def on_signals(self, _events: int) -> None:
        for sig in self.signals.drain():
            getattr(self, "handle_" + sig.name[3:].lower())()

    def handle_term(self) -> None:
        self.stop(graceful=self.state != "stopping")  # a second TERM: stop at once

    handle_int = handle_term

    def handle_quit(self) -> None:
        self.stop(graceful=False)

    def handle_chld(self) -> None:
        self.reap_workers()

    def handle_hup(self) -> None:
        self.reload()

    def handle_ttin(self) -> None:
        self.scale(self.target + 1)

    def handle_ttou(self) -> None:
        self.scale(self.target - 1)

    # --- workers ----------------------------------------------------------------------------

    def spawn_worker(self, slot: int) -> None:
        try:
            master_end, worker_end = Channel.pair()
        except OSError as e:
            self.spawn_failed(slot, e)
            return
        try:
            pid = os.fork()
        except OSError as e:  # EAGAIN/ENOMEM: out of processes or memory; try again later
            master_end.close()
            worker_end.close()
            self.spawn_failed(slot, e)
            return
        if pid == 0:  # the child: never returns into the master's code
            code = EXIT_BOOT_ERROR
            try:
                master_end.close()
                code = self.become_worker(slot, worker_end)
            except BaseException as e:  # noqa: BLE001 - anything here must end the child
                log.exception("worker.crashed", error=repr(e))
            finally:
                os._exit(code)
        worker_end.close()
        worker = WorkerProc(slot=slot, pid=pid, channel=Channel(master_end, f"slot {slot}"))
        self.workers[pid] = worker
        self.serving[slot] = worker
        history = self.history.setdefault(slot, SlotHistory())
        history.respawn_at = 0.0
        self.selector.register(worker.channel, selectors.EVENT_READ, self.channel_reader(worker))
        log.info("worker.spawned", worker_pid=pid, worker_slot=slot, restarts=history.restarts)

    def spawn_failed(self, slot: int, error: OSError) -> None:
        log.error("worker.spawn_failed", worker_slot=slot, error=error.strerror)
        self.schedule_respawn(slot, uptime=0.0)

    def become_worker(self, slot: int, worker_end: socket.socket) -> int:
        """In the forked child: drop the master's state, then run the worker loop."""
        parent = os.getppid()
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the master died between fork and prctl
            return EXIT_BOOT_ERROR
        logmod.set_role("worker", slot)
        self.signals.close()
        self.selector.close()
        self.notifier.close()
        if self.control is not None:
            self.control.close(unlink=False)
        for other in self.workers.values():
            other.channel.close()  # else a sibling never sees EOF when the master dies
        close_fds([held.fd for held in self.held])  # the master's to deliver, not ours
        worker = Worker(self.config, self.listener, Channel(worker_end, "master"), slot,
                        self.slots)
        return worker.run()

    def channel_reader(self, worker: WorkerProc) -> Callable[[int], None]:
        def on_event(events: int) -> None:
            try:
                if events & selectors.EVENT_WRITE and worker.channel.flush():
                    self.selector.modify(worker.channel, selectors.EVENT_READ, on_event)
                if events & selectors.EVENT_READ:
                    for message in worker.channel.receive():
                        self.on_message(worker, message)
            except ChannelClosed:
                # The worker is dying; SIGCHLD will tell how. Stop listening to it.
                self.forget_channel(worker)
        return on_event

    def read_last_words(self, worker: WorkerProc) -> None:
        """Take what a dead worker sent before it died: a retiring worker's last HANDOFFs
        carry live clients, which closing the channel unread would drop."""
        while True:
            try:
                messages = worker.channel.receive()
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
            log.warning("channel.error", worker_pid=worker.pid, worker_slot=worker.slot,
                        error=str(e))
            return False
        if worker.channel.wants_write:
            self.selector.modify(worker.channel, selectors.EVENT_READ | selectors.EVENT_WRITE,
                                 self.channel_reader(worker))
        return True

    def retire(self, worker: WorkerProc) -> None:
        """The worker takes no more clients; it is on its way out."""
        worker.state = "stopping"
        if self.serving.get(worker.slot) is worker:
            del self.serving[worker.slot]

    # --- hand-off: route a client to the worker that owns its key -------------------------

    def dispatch(self, sender: WorkerProc, message: Message) -> None:
        meta = message.meta
        if len(message.fds) != 1 or not isinstance(meta.get("key"), (int, type(None))):
            close_fds(message.fds)
            log.error("channel.error", worker_pid=sender.pid, worker_slot=sender.slot,
                      error="HANDOFF without exactly one fd and a key")
            return
        meta["from_slot"], meta["from_pid"] = sender.slot, sender.pid
        if not self.deliver(meta, message.raw, message.fds[0]):
            self.held.append(HeldClient(meta, message.raw, message.fds[0]))

    def deliver(self, meta: dict[str, Any], raw: bytes, fd: int,
                since: float | None = None) -> bool:
        """ADOPT to the key's owner; while the owner is respawning, wait HOLD_TIMEOUT (from
        `since`, else from now), then (or at once if the slot is backing off) take the next
        slot in the key's ranking."""
        key = meta["key"]
        if key is None:  # a keyless client from a retiring worker: the least busy worker
            target = min(self.serving.values(), key=lambda w: w.stats.get("clients", 0),
                         default=None)
            if target is None or not self.send(target, Kind.ADOPT, meta, raw, [fd]):
                return False
            # Count it now: the next STATS is up to a second away, and a burst would
            # otherwise all land on one worker.
            target.stats["clients"] = target.stats.get("clients", 0) + 1
            return True
        # The sender's answer stands if it used the same table: tables are always slots
        # 0..N-1 (see scale()), so the same size means the same table.
        owner = meta.get("owner")
        if meta.get("table") != len(self.slots) or not isinstance(owner, int) \
                or not 0 <= owner < len(self.slots):
            owner = routing.owner(key, self.slots)
        target = self.serving.get(owner)
        if target is None:
            history = self.history.get(owner)
            now = time.monotonic()
            backing_off = history is not None and history.respawn_at > now
            if (since is None or now - since < HOLD_TIMEOUT) and not backing_off:
                return False
            for slot in routing.ranking(key, self.slots)[1:]:
                target = self.serving.get(slot)
                if target is not None:
                    break
            else:
                return False
        return self.send(target, Kind.ADOPT, meta, raw, [fd])

    def deliver_held(self) -> None:
        waiting, self.held = self.held, []
        for held in waiting:
            if self.deliver(held.meta, held.raw, held.fd, held.since):
                continue
            if time.monotonic() - held.since > HOLD_MAX:
                close_fds([held.fd])
                log.error("fd.dropped", key=held.meta["key"], reason="no worker took it",
                          waited=round(time.monotonic() - held.since, 3))
            else:
                self.held.append(held)

    def drop_held(self, reason: str) -> None:
        for held in self.held:
            close_fds([held.fd])
            log.warning("fd.dropped", key=held.meta["key"], reason=reason)
        self.held = []

    def broadcast_routes(self) -> None:
        for worker in self.workers.values():
            self.send(worker, Kind.ROUTES, {"slots": list(self.slots)})

    def on_message(self, worker: WorkerProc, message: Message) -> None:
        worker.last_seen = time.monotonic()
        if message.kind is Kind.HANDOFF:
            self.dispatch(worker, message)
        elif message.kind is Kind.STATS:
            worker.stats = {k: v for k, v in message.meta.items() if isinstance(v, int)}
            if self.config.autoscale:
                self.autoscale()
        elif message.kind is Kind.HELLO:
            if worker.state == "starting":
                worker.state = "ready"
            log.info("worker.ready", worker_pid=worker.pid, worker_slot=worker.slot,
                     boot_ms=round((worker.last_seen - worker.started) * 1000, 1))
            if self.state == "starting" and self.ready_count() >= self.target:
                self.state = "running"
                log.info("mpd.ready", workers=self.ready_count())
                self.notifier.ready(self.status_line())
        else:
            close_fds(message.fds)
            log.warning("channel.error", worker_pid=worker.pid, worker_slot=worker.slot,
                        error=f"unexpected {message.kind.name} from a worker")

    def autoscale(self) -> None:
        """Add a worker when every worker is full, one at a time (the last must be ready)."""
        serving = list(self.serving.values())
        if (self.state != "running" or self.target >= self.config.max_workers
                or len(serving) < self.target or any(w.state != "ready" for w in serving)):
            return
        if all(w.stats.get("clients", 0) >= self.config.max_clients for w in serving):
            log.info("worker.autoscaled", previous=self.target, workers=self.target + 1,
                     max_clients=self.config.max_clients)
            self.scale(self.target + 1)

    def ready_count(self) -> int:
        return sum(1 for w in self.workers.values() if w.state == "ready")

    def reap_workers(self) -> None:
        """Collect every child that ended (several may end at once) and schedule respawns."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            if self.serving.get(worker.slot) is worker:
                del self.serving[worker.slot]
            self.forget_channel(worker)
            self.read_last_words(worker)
            worker.channel.close()
            uptime = time.monotonic() - worker.started
            how: dict[str, Any] = {}
            if os.WIFSIGNALED(status):
                how["signal"] = signal_name(os.WTERMSIG(status))
            else:
                how["exit_code"] = os.WEXITSTATUS(status)
            expected = worker.state == "stopping" or self.state == "stopping"
            log.log(20 if expected else 30, "worker.exited", worker_pid=pid,
                    worker_slot=worker.slot, uptime=round(uptime, 3), **how)
            if not expected:
                self.schedule_respawn(worker.slot, uptime)

    def schedule_respawn(self, slot: int, uptime: float) -> None:
        history = self.history.setdefault(slot, SlotHistory())
        history.restarts += 1
        history.quick_failures = history.quick_failures + 1 if uptime < STABLE_AFTER else 1
        delay = 0.0
        if history.quick_failures > 1:  # a crash loop: wait longer each time, capped
            delay = min(self.config.backoff_max, BACKOFF_FIRST * 2 ** (history.quick_failures - 2))
            log.warning("worker.backoff", worker_slot=slot, failures=history.quick_failures,
                        delay=delay)
        history.respawn_at = time.monotonic() + delay

    def murder_workers(self) -> None:
        """SIGKILL workers whose heartbeat stopped; reap_workers() respawns them."""
        now = time.monotonic()
        for worker in list(self.workers.values()):
            if worker.state != "stopping" and now - worker.last_seen > self.config.worker_timeout:
                log.error("worker.timeout", worker_pid=worker.pid, worker_slot=worker.slot,
                          silent_for=round(now - worker.last_seen, 3))
                self.retire(worker)  # killed on purpose: its slot is refilled at once
                self.kill(worker)
                history = self.history.setdefault(worker.slot, SlotHistory())
                history.restarts += 1
                history.respawn_at = now
        if self.stop_deadline and now >= self.stop_deadline:
            self.halt("graceful_timeout")
        if self.kill_deadline and now >= self.kill_deadline:
            log.error("mpd.stop_incomplete", workers=[w.pid for w in self.workers.values()])
            self.state = "stopped"

    def manage_workers(self) -> None:
        """Top up: spawn wanted slots that have no worker and whose back-off is over, at
        most SPAWN_BATCH per turn, so that a big scale-up never stalls hand-offs."""
        self.spawn_pending = False
        if self.state == "stopping":
            if not self.workers:
                self.state = "stopped"
            return
        if len(self.serving) >= self.target:
            return
        now = time.monotonic()
        spawned = 0
        for slot in range(self.target):
            if slot in self.serving:
                continue
            history = self.history.get(slot)
            if history is None or history.respawn_at <= now:
                if spawned == SPAWN_BATCH:
                    self.spawn_pending = True  # the loop comes back at once
                    return
                if history is not None and history.restarts:
                    log.info("worker.respawned", worker_slot=slot, restarts=history.restarts)
                self.spawn_worker(slot)
                spawned += 1

    def kill(self, worker: WorkerProc) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signal.SIGKILL)

    # --- lifecycle ---------------------------------------------------------------------------

    def scale(self, count: int) -> None:
        count = max(1, min(count, self.config.max_workers))
        if count == self.target or self.state == "stopping":
            return
        log.info("worker.scaled", previous=self.target, workers=count)
        self.target = count
        self.slots = tuple(range(count))  # always 0..N-1: deliver() relies on it
        for worker in list(self.serving.values()):
            if worker.slot >= count:  # retire: it hands its clients to their new owners
                self.retire(worker)
                self.send(worker, Kind.DRAIN, {"slots": list(self.slots)})
        for slot in [s for s in self.history if s >= count]:
            del self.history[slot]
        self.broadcast_routes()

    def reload(self) -> str | None:
        """Re-read the config and apply it; on any problem change nothing and return why."""
        self.notifier.reloading()
        try:
            return self.apply_config()
        finally:
            self.notifier.ready(self.status_line())

    def apply_config(self) -> str | None:
        try:
            new = configmod.reload(self.config)
            logmod.configure_from(new)  # LOG-HOOK: opens the new log first; ConfigError
        except configmod.ConfigError as e:  # (LogSetupError) leaves the old one in use
            log.error("config.reload_failed", error=str(e))
            return str(e)
        self.config = new
        settings = {k: getattr(new, k) for k in LIVE_SETTINGS}
        for worker in self.workers.values():
            self.send(worker, Kind.CONFIG, settings)
        log.info("config.reloaded", path=new.path, workers=new.worker_count)
        self.scale(new.worker_count)
        return None

    def stop(self, graceful: bool = True) -> None:
        if not graceful:
            self.halt("quit")
            return
        log.info("mpd.stopping", workers=len(self.workers),
                 graceful_timeout=self.config.graceful_timeout)
        self.notifier.stopping()
        self.state = "stopping"
        self.listener.close()  # no new connections queue up for us
        self.stop_deadline = time.monotonic() + self.config.graceful_timeout
        for worker in self.workers.values():
            self.retire(worker)
            self.send(worker, Kind.STOP)

    def halt(self, reason: str) -> None:
        """Stop now: SIGKILL every worker, then exit once they are reaped (bounded)."""
        if self.kill_deadline:
            return
        log.warning("mpd.halting", reason=reason, workers=len(self.workers))
        self.notifier.stopping()
        self.state = "stopping"
        self.listener.close()
        self.stop_deadline = 0.0
        self.kill_deadline = time.monotonic() + KILL_WAIT
        for worker in self.workers.values():
            self.retire(worker)
            self.kill(worker)


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # a real-time signal has no name in the enum
        return f"SIG{number}"
